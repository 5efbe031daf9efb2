"""The bench vocabulary, structured scenes and the caption grammar (scene <-> caption, both ways).

A scene is 1-3 objects (shape, colour, size) on distinct cells of a 3x3 grid over a background.
Its caption names every object with its cell, so the caption pins down the image up to the small
render jitter. Identical objects merge into a counted group:

    "two small red circles at the top left and the center and a blue square at the bottom
     on a pink background"

Medium is the unmarked size (no word). Groups are listed in reading order of their first cell, so
every scene has exactly one (canonical) caption and `scene_of` inverts `caption_of`.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SIZES = ("small", "medium", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = ("gray", "pink", "cyan", "brown", "navy", "olive", "striped", "checkered")
COUNT_WORDS = {2: "two", 3: "three"}
MAX_OBJECTS = 3
MAX_TOKENS = 32          # longest caption (three distinct groups) is 30 words + <bos>/<eos>

ATTRIBUTES = ("colour", "shape", "size", "count", "position", "background")


@dataclass(frozen=True, order=True)
class Obj:
    cell: int            # 0..8, row-major from the top left
    shape: str
    colour: str
    size: str

    @property
    def kind(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]     # canonical: sorted by cell, cells distinct
    background: str

    def __post_init__(self):
        cells = [o.cell for o in self.objects]
        if not 1 <= len(cells) <= MAX_OBJECTS or len(set(cells)) != len(cells):
            raise ValueError(f"a scene needs 1-{MAX_OBJECTS} objects on distinct cells, got cells {cells}")
        object.__setattr__(self, "objects", tuple(sorted(self.objects)))

    def groups(self) -> list[list[Obj]]:
        """Objects of the same (size, colour, shape), in reading order of their first cell."""
        by_kind: dict[tuple, list[Obj]] = {}
        for o in self.objects:
            by_kind.setdefault(o.kind, []).append(o)
        return sorted(by_kind.values(), key=lambda g: g[0].cell)


def vocabulary() -> list[str]:
    """Every word (and the comma) a caption can contain."""
    words = {"a", "an", "at", "the", "and", "on", "background", ","}
    words |= set(SHAPES) | set(PLURALS.values()) | set(COLOURS) | set(BACKGROUNDS) | set(COUNT_WORDS.values())
    words |= {w for s in SIZES for w in s.split()} | {w for c in CELLS for w in c.split()}
    return sorted(words)


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else " , ".join(items[:-1]) + " and " + items[-1]


def _group_phrase(group: list[Obj]) -> str:
    o, n = group[0], len(group)
    words = ([] if o.size == "medium" else [o.size]) + [o.colour, o.shape if n == 1 else PLURALS[o.shape]]
    det = _article(words[0]) if n == 1 else COUNT_WORDS[n]
    where = _join(["the " + CELLS[g.cell] for g in group])
    return f"{det} {' '.join(words)} at {where}"


def caption_of(scene: Scene) -> str:
    """The canonical caption of `scene` (commas are separate words, so tokenizers see them as tokens)."""
    body = _join([_group_phrase(g) for g in scene.groups()])
    return f"{body} on {_article(scene.background)} {scene.background} background"


_CELL_PATTERN = "|".join(sorted(CELLS, key=len, reverse=True))
_GROUP_RE = re.compile(
    rf"(?P<det>an|a|two|three) (?:(?P<size>small|large) )?(?P<colour>{'|'.join(COLOURS)}) (?P<shape>\w+) at "
    rf"(?P<cells>the (?:{_CELL_PATTERN})(?:(?: ,| and) the (?:{_CELL_PATTERN}))*)"
)
_CAPTION_RE = re.compile(rf"(?P<body>.+) on an? (?P<bg>{'|'.join(BACKGROUNDS)}) background")
_SHAPE_OF = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}


def scene_of(caption: str) -> Scene:
    """Parse a caption of the bench grammar back into its scene; ValueError for anything else."""
    text = " ".join(caption.lower().replace(",", " , ").split())
    m = _CAPTION_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not a bench caption: {caption!r}")
    objects, pos, body = [], 0, m["body"]
    while pos < len(body):
        g = _GROUP_RE.match(body, pos)
        if g is None or g["shape"] not in _SHAPE_OF:
            raise ValueError(f"not a bench caption (at {body[pos:]!r}): {caption!r}")
        cells = [CELLS.index(c) for c in re.split(r" , the | and the ", g["cells"][len("the "):])]
        if len(cells) != {"a": 1, "an": 1, "two": 2, "three": 3}[g["det"]]:
            raise ValueError(f"count and locations disagree in {caption!r}")
        objects += [Obj(c, _SHAPE_OF[g["shape"]], g["colour"], g["size"] or "medium") for c in cells]
        pos = g.end()
        for sep in (" , ", " and "):
            if body.startswith(sep, pos):
                pos += len(sep)
                break
    scene = Scene(tuple(objects), m["bg"])
    if caption_of(scene) != text:
        raise ValueError(f"not the canonical caption of its scene: {caption!r} (canonical: {caption_of(scene)!r})")
    return scene


def random_scene(rng: random.Random) -> Scene:
    """One scene: 1-3 objects, split into counted groups often enough that counts >1 are common."""
    n = rng.randint(1, MAX_OBJECTS)
    sizes_of_groups = rng.choice({1: [[1]], 2: [[2], [1, 1], [1, 1]], 3: [[3], [2, 1], [1, 2], [1, 1, 1]]}[n])
    kinds: list[tuple[str, str, str]] = []
    while len(kinds) < len(sizes_of_groups):      # distinct kinds, so groups never merge
        k = (rng.choice(SIZES), rng.choice(COLOURS), rng.choice(SHAPES))
        if k not in kinds:
            kinds.append(k)
    cells = rng.sample(range(len(CELLS)), n)
    objects = []
    for (size, colour, shape), count in zip(kinds, sizes_of_groups):
        objects += [Obj(cells.pop(), shape, colour, size) for _ in range(count)]
    return Scene(tuple(objects), rng.choice(BACKGROUNDS))


# ---- one-attribute swaps (hard negatives for the evaluation CLIP and its attribute accuracy) ----

def _recolour_group(scene: Scene, group: list[Obj], **change) -> Scene:
    members = set(group)
    return Scene(tuple(replace(o, **change) if o in members else o for o in scene.objects), scene.background)


def _candidates(scene: Scene, attribute: str) -> list[Scene]:
    groups = scene.groups()
    free = [c for c in range(len(CELLS)) if c not in {o.cell for o in scene.objects}]
    out: list[Scene] = []
    if attribute == "background":
        out = [Scene(scene.objects, b) for b in BACKGROUNDS if b != scene.background]
    elif attribute in ("colour", "shape", "size"):
        values = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}[attribute]
        for g in groups:
            out += [_recolour_group(scene, g, **{attribute: v}) for v in values if v != getattr(g[0], attribute)]
    elif attribute == "position":
        for o in scene.objects:
            out += [Scene(tuple(p for p in scene.objects if p != o) + (replace(o, cell=c),), scene.background)
                    for c in free]
    elif attribute == "count":
        for g in groups:
            if len(scene.objects) < MAX_OBJECTS:      # one more of this kind
                out += [Scene(scene.objects + (replace(g[0], cell=c),), scene.background) for c in free]
            if len(scene.objects) > 1:                # one fewer (a single one may vanish)
                out += [Scene(tuple(p for p in scene.objects if p != o), scene.background) for o in g]
    else:
        raise ValueError(f"unknown attribute {attribute!r}; known: {ATTRIBUTES}")
    keep = len(groups) if attribute != "count" else None
    # A swap must change exactly that attribute: drop ones that merge or split groups.
    return [s for s in out if keep is None or len(s.groups()) == keep]


def swaps(scene: Scene, attribute: str, k: int, rng: random.Random) -> list[Scene]:
    """Up to `k` distinct scenes that differ from `scene` in one `attribute` of one group."""
    own = caption_of(scene)
    unique = {caption_of(s): s for s in _candidates(scene, attribute)}
    unique.pop(own, None)
    keys = sorted(unique)
    return [unique[c] for c in rng.sample(keys, min(k, len(keys)))]


def random_swap(scene: Scene, rng: random.Random, attribute: str | None = None) -> Scene:
    """One random one-attribute swap, drawn directly (fast enough to make hard negatives in bulk)."""
    groups = scene.groups()
    used = {o.cell for o in scene.objects}
    free = [c for c in range(len(CELLS)) if c not in used]
    for _ in range(100):
        attr = attribute or rng.choice(ATTRIBUTES)
        if attr == "background":
            return Scene(scene.objects, rng.choice([b for b in BACKGROUNDS if b != scene.background]))
        if attr == "position":
            o = rng.choice(scene.objects)
            return Scene(tuple(p for p in scene.objects if p != o) + (replace(o, cell=rng.choice(free)),),
                         scene.background)
        g = rng.choice(groups)
        if attr == "count":
            grow = len(scene.objects) == 1 or (len(scene.objects) < MAX_OBJECTS and rng.random() < 0.5)
            if grow:
                return Scene(scene.objects + (replace(g[0], cell=rng.choice(free)),), scene.background)
            drop = rng.choice(g)
            return Scene(tuple(p for p in scene.objects if p != drop), scene.background)
        values = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}[attr]
        new = _recolour_group(scene, g, **{attr: rng.choice([v for v in values if v != getattr(g[0], attr)])})
        if len(new.groups()) == len(groups):
            return new
    raise RuntimeError(f"no swap found for {caption_of(scene)!r}")
