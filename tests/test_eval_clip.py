"""CLIP score and CLIP features with a tiny open_clip model built in code (no weights, no network)."""
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from qdrift.eval.clip_score import ClipScorer, clip_preprocess, load_openclip
from qdrift.eval.features import ClipImageFeatures


pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, CTX = 100, 16
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def tiny_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, patch_size=8, image_size=32, head_width=16),
        text_cfg=CLIPTextCfg(context_length=CTX, vocab_size=VOCAB, width=32, heads=2, layers=1),
    ).eval()


def tokenize(prompts: list[str]) -> torch.Tensor:
    """Word ids from a character sum; end-of-text = the largest id, as open_clip's argmax pooling expects."""
    out = torch.zeros(len(prompts), CTX, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = [1 + sum(map(ord, w)) % (VOCAB - 2) for w in p.lower().split()][: CTX - 1] + [VOCAB - 1]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


PROMPTS = ["a red cube", "a blue sphere", "two cats", "a city at night", "an old map", "green", "a ship", "fog"]


def _images(n=8, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_clip_score_equals_hand_computation():
    model = tiny_clip(seed=3)  # a seed whose cosines take both signs, so the clamp at 0 is exercised
    images = _images()
    scores = ClipScorer(model, tokenize, 32, MEAN, STD)(images, PROMPTS)
    with torch.no_grad():  # images are already 32x32: preprocessing is only the normalisation
        norm = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        cos = F.cosine_similarity(model.encode_image(norm), model.encode_text(tokenize(PROMPTS)), dim=-1)
    assert scores.shape == (8,)
    assert (cos < 0).any() and (cos > 0).any()
    assert torch.allclose(scores, 100 * cos.clamp(min=0), atol=1e-4)
    assert ((scores >= 0) & (scores <= 100)).all()
    assert (scores[cos < 0] == 0).all()


def test_clip_score_batch_size_invariant_and_checks_counts():
    model, images = tiny_clip(), _images(seed=1)
    a = ClipScorer(model, tokenize, 32, MEAN, STD, batch_size=3)(images, PROMPTS)
    b = ClipScorer(model, tokenize, 32, MEAN, STD, batch_size=8)(images, PROMPTS)
    assert torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="prompts"):
        ClipScorer(model, tokenize, 32, MEAN, STD)(images, PROMPTS[:-1])


def test_clip_preprocess_resizes_short_side_and_centre_crops():
    wide = torch.rand(2, 3, 48, 96)
    out = clip_preprocess(wide, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert out.shape == (2, 3, 32, 32)
    # centre crop of the resized (32 x 64) image: columns 16..48
    full = F.interpolate(wide, size=(32, 64), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    assert torch.allclose(out, full[..., 16:48])


def test_clip_image_features_are_unit_norm_and_deterministic():
    feats = ClipImageFeatures(tiny_clip(), 32, MEAN, STD, batch_size=3)
    images = _images(n=7, size=40)  # exercises the resize path
    f = feats(images)
    assert f.shape == (7, 32)
    assert torch.allclose(f.norm(dim=-1), torch.ones(7), atol=1e-5)
    assert torch.allclose(feats(images), f)
    assert feats.fingerprint != ClipImageFeatures(tiny_clip(seed=1), 32, MEAN, STD).fingerprint


def test_load_openclip_without_weights_names_file_and_key(tmp_path):
    for path in (None, tmp_path / "missing.safetensors"):
        with pytest.raises(FileNotFoundError) as err:
            load_openclip("ViT-L-14-quickgelu", "openai", path)
        msg = str(err.value)
        assert "eval.clip_weights" in msg
        assert "timm/vit_large_patch14_clip_224.openai" in msg and "ViT-L-14.pt" in msg


def test_load_openclip_from_local_file(tmp_path):
    """The real loading path with a registered tiny architecture and a random local checkpoint."""
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    (tmp_path / "qdrift-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "qdrift-tiny-clip.json")
    torch.manual_seed(0)
    saved = open_clip.create_model("qdrift-tiny-clip").state_dict()
    torch.save(saved, tmp_path / "tiny.pt")

    loaded = load_openclip("qdrift-tiny-clip", None, tmp_path / "tiny.pt")
    assert loaded.image_size == (32, 32) and len(loaded.mean) == 3
    assert torch.equal(loaded.model.state_dict()["visual.conv1.weight"], saved["visual.conv1.weight"])
    scores = ClipScorer(*loaded)(_images(n=2), ["a red cube", "fog"])  # real open_clip tokenizer, offline
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 100)).all()
