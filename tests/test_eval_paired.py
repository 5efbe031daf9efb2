"""PSNR / SSIM / LPIPS of a variant against the FP image of the same index."""
import math

import pytest
import torch
import torchvision

from qdrift.eval.paired import PSNR_CAP_DB, load_lpips, lpips, paired_metrics, psnr, ssim


pytestmark = pytest.mark.usefixtures("one_thread")


def _smooth_images(n=4, size=32, seed=0):
    """Low-frequency images (SSIM is meaningful on structure, not on white noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def _noisy(images, std, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (images + std * torch.randn(images.shape, generator=g)).clamp(0, 1)


def test_identical_images_give_capped_psnr_and_unit_ssim():
    fp = _smooth_images()
    assert torch.equal(psnr(fp, fp), torch.full((4,), PSNR_CAP_DB, dtype=torch.float64))
    assert torch.allclose(ssim(fp, fp), torch.ones(4, dtype=torch.float64), atol=1e-6)


def test_psnr_matches_formula_and_noise_lowers_both():
    fp = _smooth_images()
    mild, strong = _noisy(fp, 0.02), _noisy(fp, 0.2)
    mse = (mild.double() - fp.double()).square().mean(dim=(1, 2, 3))
    assert torch.allclose(psnr(mild, fp), 10 * torch.log10(1 / mse))
    assert (psnr(strong, fp) < psnr(mild, fp)).all() and (psnr(mild, fp) < PSNR_CAP_DB).all()
    assert (ssim(strong, fp) < ssim(mild, fp)).all() and (ssim(mild, fp) < 1).all()


def test_paired_metrics_are_per_image():
    fp = _smooth_images(n=3)
    variant = fp.clone()
    variant[1] = _noisy(fp[1:2], 0.3)[0]  # only image 1 differs
    out = paired_metrics(variant, fp)
    assert set(out) == {"psnr", "ssim"} and out["psnr"].shape == (3,)
    assert out["psnr"][0] == PSNR_CAP_DB and out["psnr"][2] == PSNR_CAP_DB and out["psnr"][1] < 30
    with pytest.raises(ValueError, match="shape"):
        paired_metrics(variant[:2], fp)


def test_lpips_without_weights_is_skipped_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="eval.lpips_weights"):
        assert load_lpips(None) is None
    with pytest.warns(UserWarning, match="alexnet-owt-7be5be79.pth"):
        assert load_lpips(tmp_path / "nope.pth") is None
    torch.save({"something": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.warns(UserWarning, match="not a torchvision alexnet"):
        assert load_lpips(tmp_path / "wrong.pth") is None


def test_lpips_with_local_backbone(tmp_path):
    """Random backbone weights saved as a torchvision state dict: checks the offline loading path."""
    torch.manual_seed(0)
    backbone = {k: v for k, v in torchvision.models.alexnet().state_dict().items() if k.startswith("features.")}
    torch.save(backbone, tmp_path / "alexnet.pth")
    net = load_lpips(tmp_path / "alexnet.pth")
    assert net is not None
    assert torch.equal(getattr(net.net.slice2, "3").weight, backbone["features.3.weight"])
    fp = _smooth_images(size=64)
    same, mild, strong = lpips(fp, fp, net), lpips(_noisy(fp, 0.05), fp, net), lpips(_noisy(fp, 0.3), fp, net)
    assert torch.allclose(same, torch.zeros(4, dtype=torch.float64), atol=1e-6)
    assert (mild > 0).all() and (strong.mean() > mild.mean())
    assert "lpips" in paired_metrics(fp, fp, net)
    assert not math.isnan(float(strong.mean()))
