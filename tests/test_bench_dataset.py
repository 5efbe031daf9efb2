"""The procedural bench dataset: splits, coverage, the caption grammar and its parser."""
import random
from collections import Counter

import pytest

from qdrift.bench.grammar import (
    ATTRIBUTES,
    BACKGROUNDS,
    CELLS,
    COLOURS,
    MAX_TOKENS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    caption_of,
    random_swap,
    scene_of,
    swaps,
    vocabulary,
)
from qdrift.bench.dataset import SPLITS, captions, scenes, split_of, training_set
from qdrift.bench.models import bench_tokenizer
from qdrift.bench.tokens import token_ids


@pytest.fixture(scope="module")
def train_scenes():
    return scenes("train", 3000)


def test_captions_are_deterministic_and_seeded():
    assert captions("eval", 40) == captions("eval", 40)
    assert captions("eval", 40)[:10] == captions("eval", 10)      # a longer list extends a shorter one
    assert captions("eval", 40, seed=1) != captions("eval", 40)
    assert len(set(captions("eval", 300))) == 300                  # prompt splits are distinct captions


def test_splits_do_not_overlap():
    by_split = {s: set(captions(s, 600 if s == "train" else 300)) for s in SPLITS}
    assert not by_split["train"] & by_split["calib"]
    assert not by_split["train"] & by_split["eval"]
    assert not by_split["calib"] & by_split["eval"]
    for split, caps in by_split.items():
        assert all(split_of(c) == split for c in caps)


def test_every_factor_occurs(train_scenes):
    objs = [o for s in train_scenes for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES) and len(SHAPES) >= 5
    assert {o.colour for o in objs} == set(COLOURS) and len(COLOURS) == 8
    assert {o.size for o in objs} == set(SIZES) and len(SIZES) == 3
    assert {o.cell for o in objs} == set(range(9)) and len(CELLS) == 9
    assert {s.background for s in train_scenes} == set(BACKGROUNDS) and len(BACKGROUNDS) >= 6
    n_objects = Counter(len(s.objects) for s in train_scenes)
    assert set(n_objects) == {1, 2, 3} and min(n_objects.values()) > 600
    counts = Counter(len(g) for s in train_scenes for g in s.groups())
    assert counts[2] > 200 and counts[3] > 100                     # counted groups are common, not accidents


def test_caption_grammar_examples():
    objects = (Obj(0, "circle", "red", "small"), Obj(4, "circle", "red", "small"), Obj(7, "square", "blue", "medium"))
    scene = Scene(objects, "pink")
    assert caption_of(scene) == ("two small red circles at the top left and the center and a blue square at the bottom "
                                 "on a pink background")
    one = Scene((Obj(8, "star", "orange", "large"),), "olive")
    assert caption_of(one) == "a large orange star at the bottom right on an olive background"
    three = Scene(tuple(Obj(c, "cross", "orange", "medium") for c in (5, 1, 3)), "gray")
    assert caption_of(three) == "three orange crosses at the top , the left and the right on a gray background"


def test_scene_of_inverts_caption_of(train_scenes):
    for scene in train_scenes[:500]:
        assert scene_of(caption_of(scene)) == scene
    for bad in ("a red circle", "a purple cat at the top on a gray background",
                "two red circles at the top on a gray background", "a red circle at the top on a gray backdrop"):
        with pytest.raises(ValueError):
            scene_of(bad)


def test_captions_fit_the_tokenizer_without_unknown_words(train_scenes):
    longest = Scene((Obj(0, "triangle", "orange", "small"), Obj(6, "diamond", "yellow", "large"),
                     Obj(8, "circle", "purple", "small")), "checkered")
    tok = bench_tokenizer()
    caps = [caption_of(longest)] + [caption_of(s) for s in train_scenes[:300]]
    enc = tok(caps)
    assert max(len(ids) for ids in enc.input_ids) == MAX_TOKENS == len(enc.input_ids[0])
    assert tok.unk_token_id not in {i for ids in enc.input_ids for i in ids}
    assert set(vocabulary()) <= set(tok.get_vocab())


def test_fast_token_ids_match_the_tokenizer(train_scenes):
    tok = bench_tokenizer()
    caps = [caption_of(s) for s in train_scenes[:200]] + [""]
    ids, mask = token_ids(tok, caps, MAX_TOKENS)
    ref = tok(caps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    assert ids.equal(ref.input_ids) and mask.equal(ref.attention_mask)
    with pytest.raises(ValueError, match="vocabulary"):
        token_ids(tok, ["a red dog"], MAX_TOKENS)


def _differences(a: Scene, b: Scene) -> set[str]:
    diff = set()
    if a.background != b.background:
        diff.add("background")
    if len(a.objects) != len(b.objects):
        return diff | {"count"}
    cells_a, cells_b = {o.cell for o in a.objects}, {o.cell for o in b.objects}
    if cells_a != cells_b:
        diff.add("position")
    else:
        for x, y in zip(a.objects, b.objects):
            diff |= {f for f in ("shape", "colour", "size") if getattr(x, f) != getattr(y, f)}
    return diff


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_swaps_change_exactly_one_attribute(train_scenes, attribute):
    rng = random.Random(0)
    for scene in train_scenes[:150]:
        alts = swaps(scene, attribute, 3, rng)
        assert alts and len({caption_of(s) for s in alts}) == len(alts)
        for alt in alts:
            assert caption_of(alt) != caption_of(scene)
            assert _differences(scene, alt) == {attribute}
        fast = random_swap(scene, rng, attribute)
        assert _differences(scene, fast) == {attribute}


def test_training_set_is_chunked_deterministically():
    a = training_set(25, seed=3, negatives=2)
    b = training_set(25, seed=3, negatives=2)
    assert a == b and len(a[0]) == len(a[1]) == len(a[2]) == 25
    assert all(split_of(c) == "train" for c in a[1]) and all(len(n) == 2 for n in a[2])
    assert all(neg != cap for cap, negs in zip(a[1], a[2]) for neg in negs)


def test_gpu_side_code_imports_nothing_the_gpu_box_lacks():
    """train_bench.py and qdrift.bench run where hydra, omegaconf, wandb, torchmetrics and scipy are absent."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    files = [root / "experiments" / "train_bench.py", *sorted((root / "qdrift" / "bench").glob("*.py")),
             root / "qdrift" / "models" / "tokenizers.py", root / "qdrift" / "models" / "families.py"]
    forbidden = {"hydra", "omegaconf", "wandb", "torchmetrics", "scipy"}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not {n.split(".")[0] for n in names} & forbidden, (f.name, names)
