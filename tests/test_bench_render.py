"""The batched bench renderer: format, determinism, and that images show what the scene says."""
import pytest
import torch

from qdrift.bench.grammar import SHAPES, SIZES, Obj, Scene, caption_of
from qdrift.bench.dataset import (
    REFERENCE_RENDER_SEED,
    TRAIN_RENDER_SEED,
    reference_images,
    scenes,
)
from qdrift.bench.render import BACKGROUND_RGB, RGB, render


pytestmark = pytest.mark.usefixtures("one_thread")


def _cell_centre(cell: int) -> tuple[int, int]:
    return int((cell // 3 + 0.5) * 64 / 3), int((cell % 3 + 0.5) * 64 / 3)


def test_format_and_determinism():
    sc = scenes("train", 12)
    img = render(sc, seed=5)
    assert img.shape == (12, 3, 64, 64) and img.dtype == torch.float32
    assert 0 <= img.min() and img.max() <= 1
    assert torch.equal(img, render(sc, seed=5))
    # An image depends on (seed, index), not on how the batch was cut.
    assert torch.allclose(render(sc[4:9], seed=5, start_index=4), img[4:9], atol=1e-6)
    assert torch.allclose(render(sc, seed=5, chunk=5), img, atol=1e-6)
    assert not torch.equal(render(sc, seed=6), img)            # jitter moves with the seed


def test_references_use_their_own_seeds():
    caps = [caption_of(s) for s in scenes("eval", 6)]
    refs = reference_images(caps)
    assert REFERENCE_RENDER_SEED > TRAIN_RENDER_SEED + 10**5
    assert torch.allclose(refs, render(scenes("eval", 6), seed=REFERENCE_RENDER_SEED), atol=1e-6)
    assert not torch.equal(refs, render(scenes("eval", 6), seed=TRAIN_RENDER_SEED))
    assert torch.allclose(reference_images(caps[2:], start_index=2), refs[2:], atol=1e-6)


@pytest.mark.parametrize("background", ["gray", "pink", "cyan", "brown", "navy", "olive"])
def test_background_colour_dominates_the_border(background):
    sc = [Scene((Obj(c, "square", "white", "large"),), background) for c in (0, 4, 8)]
    img = render(sc)
    border = torch.cat([img[:, :, 0], img[:, :, -1], img[:, :, :, 0], img[:, :, :, -1]], dim=-1)  # [N, 3, 256]
    want = torch.tensor(BACKGROUND_RGB[background][0]).view(1, 3, 1)
    close = ((border - want).abs().max(dim=1).values < 0.06).float().mean(dim=-1)
    assert (close > 0.6).all(), close


def test_textured_backgrounds_are_textured():
    for bg in ("striped", "checkered"):
        img = render([Scene((Obj(4, "circle", "red", "small"),), bg)])[0]
        light, dark = BACKGROUND_RGB[bg]
        corner = img[:, :16, :16]
        assert corner.std() > 0.15                                  # two colours, not a plain field
        assert abs(corner.max() - light[0]) < 0.06 and abs(corner.min() - dark[0]) < 0.06


@pytest.mark.parametrize("colour", list(RGB))
def test_object_colour_appears_at_its_cell(colour):
    shapes = [s for s in SHAPES if s != "ring"]                      # rings are hollow in the middle
    sc = [Scene((Obj(cell, shape, colour, "large"),), "gray") for cell, shape in zip((0, 2, 4, 6, 8, 1), shapes)]
    img = render(sc)
    for i, scene in enumerate(sc):
        y, x = _cell_centre(scene.objects[0].cell)
        assert torch.allclose(img[i, :, y, x], torch.tensor(RGB[colour]), atol=0.05), (scene, img[i, :, y, x])


def _mask(scene: Scene) -> torch.Tensor:
    img = render([scene])[0]
    return ((img - torch.tensor(BACKGROUND_RGB["gray"][0]).view(3, 1, 1)).abs().sum(0) > 0.3).float()


def test_shapes_and_sizes_are_distinct():
    masks = {s: _mask(Scene((Obj(4, s, "red", "large"),), "gray")) for s in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                iou = (masks[a] * masks[b]).sum() / ((masks[a] + masks[b]) > 0).float().sum()
                assert iou < 0.8, (a, b, iou)
    areas = [_mask(Scene((Obj(4, "circle", "red", size),), "gray")).sum() for size in SIZES]
    assert areas[0] < 0.6 * areas[1] and areas[1] < 0.7 * areas[2]
    ring = render([Scene((Obj(4, "ring", "red", "large"),), "gray")])[0]
    assert torch.allclose(ring[:, 32, 32], torch.tensor(BACKGROUND_RGB["gray"][0]), atol=0.05)   # the hole


def test_objects_land_on_their_cells():
    objects = (Obj(0, "circle", "blue", "medium"), Obj(5, "square", "yellow", "small"), Obj(7, "star", "red", "large"))
    sc = Scene(objects, "navy")
    img = render([sc])[0]
    for o in sc.objects:
        y, x = _cell_centre(o.cell)
        assert torch.allclose(img[:, y, x], torch.tensor(RGB[o.colour]), atol=0.05)
    for empty in (1, 2, 3, 4, 6, 8):
        y, x = _cell_centre(empty)
        assert torch.allclose(img[:, y, x], torch.tensor(BACKGROUND_RGB["navy"][0]), atol=0.05)
