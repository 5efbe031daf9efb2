"""Feature extractors (Inception through its real loading path, pixels) and the per-directory cache."""
import os

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from PIL import Image

from qdrift.eval.features import INCEPTION_FILE, InceptionFeatures, PixelFeatures, feature_cache
from qdrift.eval.images import image_indices


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_png(path, value: float, size=16, seed=None):
    if seed is None:
        arr = np.full((size, size, 3), round(value * 255), dtype=np.uint8)
    else:
        arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


class Counting:
    """Wraps an extractor and counts the images it was asked to process."""

    def __init__(self, inner, fingerprint=None):
        self.inner, self.calls, self.name = inner, 0, inner.name
        self.fingerprint = fingerprint or inner.fingerprint

    def __call__(self, images):
        self.calls += images.shape[0]
        return self.inner(images)


def test_pixel_features_are_area_means():
    images = torch.rand(3, 3, 32, 32)
    f = PixelFeatures(size=4)(images)
    assert f.shape == (3, 48)
    assert torch.allclose(f[:, 0], images[:, 0, :8, :8].mean(dim=(1, 2)))


def test_image_indices_are_numeric_not_lexicographic(tmp_path):
    for i in (0, 1, 2, 10, 11, 9):
        _write_png(tmp_path / f"{i}.png", 0.5)
    (tmp_path / "notes.txt").write_text("ignored")
    _write_png(tmp_path / "007.png", 0.5)  # zero-padded names are not ours
    assert image_indices(tmp_path) == [0, 1, 2, 9, 10, 11]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no '<index>.png'"):
        image_indices(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        image_indices(tmp_path / "missing")


def test_feature_cache_computes_once_and_follows_changes(tmp_path):
    for i in range(12):  # image i is uniform grey i/20, so its features identify it
        _write_png(tmp_path / f"{i}.png", i / 20)
    ext = Counting(PixelFeatures(size=2))
    feats = feature_cache(tmp_path, ext, batch_size=5)
    assert ext.calls == 12 and feats.shape == (12, 12)
    assert torch.allclose(feats[:, 0], torch.tensor([round(i / 20 * 255) / 255 for i in range(12)]))
    assert (tmp_path / "features-pixel2.safetensors").is_file()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]

    again = feature_cache(tmp_path, ext)
    assert ext.calls == 12 and torch.equal(again, feats)  # served from the cache

    _write_png(tmp_path / "3.png", 0.0, seed=0)  # changed content (size changes too)
    changed = feature_cache(tmp_path, ext)
    assert ext.calls == 24 and not torch.equal(changed[3], feats[3]) and torch.equal(changed[4], feats[4])

    _write_png(tmp_path / "12.png", 0.9)  # a new image
    assert feature_cache(tmp_path, ext).shape == (13, 12) and ext.calls == 37

    other_weights = Counting(PixelFeatures(size=2), fingerprint="other")  # same name, other model
    feature_cache(tmp_path, other_weights)
    assert other_weights.calls == 13


def test_feature_cache_recovers_from_corrupt_file(tmp_path):
    for i in range(3):
        _write_png(tmp_path / f"{i}.png", i / 4)
    (tmp_path / "features-pixel2.safetensors").write_bytes(b"not a safetensors file")
    ext = Counting(PixelFeatures(size=2))
    assert feature_cache(tmp_path, ext).shape == (3, 12) and ext.calls == 3
    feature_cache(tmp_path, ext)
    assert ext.calls == 3


def test_feature_cache_detects_altered_features(tmp_path):
    """A feature file whose tensor bytes were changed (header intact) is recomputed, not used."""
    for i in range(3):
        _write_png(tmp_path / f"{i}.png", i / 4)
    ext = Counting(PixelFeatures(size=2))
    good = feature_cache(tmp_path, ext)
    path = tmp_path / "features-pixel2.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-20] ^= 0xFF                          # inside the data section
    path.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match="checksum"):
        again = feature_cache(tmp_path, ext)
    assert ext.calls == 6 and torch.equal(again, good)


def test_feature_cache_handles_mixed_image_sizes(tmp_path):
    _write_png(tmp_path / "0.png", 0.2, size=16)
    _write_png(tmp_path / "1.png", 0.4, size=24)
    _write_png(tmp_path / "2.png", 0.6, size=24)
    feats = feature_cache(tmp_path, PixelFeatures(size=4))
    assert feats.shape == (3, 48)
    assert torch.allclose(feats[:, 0], torch.tensor([51, 102, 153]) / 255)


def test_inception_missing_weights_error_names_file_url_and_key(tmp_path):
    for path in (None, tmp_path / "nope.pth"):
        with pytest.raises(FileNotFoundError) as err:
            InceptionFeatures(path)
        msg = str(err.value)
        assert INCEPTION_FILE in msg and "https://github.com/toshas/torch-fidelity/releases" in msg
        assert "eval.inception_weights=" in msg


@pytest.mark.slow  # one Inception forward on CPU: ~1-3 s, more on a busy machine
def test_inception_features_with_local_random_weights(tmp_path, monkeypatch):
    """torch-fidelity's real architecture and loading path; weights are random (the real file cannot be fetched)."""

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    torch.manual_seed(0)
    state = tf_inception.FeatureExtractorInceptionV3("x", ["2048"]).state_dict()  # random init
    monkeypatch.undo()
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_download)
    path = tmp_path / INCEPTION_FILE
    torch.save(state, path)

    ext = InceptionFeatures(path)
    key = "Mixed_7c.branch_pool.conv.weight"
    assert torch.equal(ext.model.state_dict()[key], state[key])
    images = torch.randint(0, 256, (2, 3, 40, 56)).float() / 255  # any size: the extractor resizes to 299
    feats = ext(images)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert not torch.allclose(feats[0], feats[1])

    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(RuntimeError, match="not an Inception-v3 FID state dict"):
        InceptionFeatures(tmp_path / "wrong.pth")
