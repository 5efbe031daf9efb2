"""evaluate_variants end to end on small PNG directories, its input checks, and the summary table."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from qdrift.eval.clip_score import ClipScorer
from qdrift.eval.evaluate import evaluate_variants, format_table
from qdrift.eval.features import PixelFeatures


pytestmark = pytest.mark.usefixtures("one_thread")

N, SIZE = 24, 32
pytestmark = pytest.mark.filterwarnings("ignore:LPIPS skipped")  # no LPIPS weights here; checked once below
PROMPTS = [f"prompt number {i}" for i in range(N)]


def _smooth(rng, n):
    low = torch.from_numpy(rng.random((n, 3, 4, 4))).float()
    return torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def _write_dir(path, images):
    path.mkdir(parents=True)
    for i, im in enumerate(images):
        arr = (im.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(path / f"{i}.png")
    return path


@pytest.fixture()
def run_dirs(tmp_path):
    """fp; quant = fp brightened and noised; qdrift = the same, mildly; ref = fresh draws like fp.

    The noise is low-frequency so that it survives the coarse pixel features.
    """
    rng = np.random.default_rng(0)
    fp = _smooth(rng, N)
    noise = _smooth(rng, N) * 2 - 1
    dirs = {
        "fp": _write_dir(tmp_path / "fp", fp),
        "quant": _write_dir(tmp_path / "quant", fp + 0.3 + 0.1 * noise),
        "qdrift": _write_dir(tmp_path / "qdrift", fp + 0.03 + 0.02 * noise),
    }
    return dirs, _write_dir(tmp_path / "ref", _smooth(rng, N))


class CountingPixels(PixelFeatures):
    def __init__(self):
        super().__init__(size=2)
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return super().__call__(images)


def _tiny_scorer():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, patch_size=8, image_size=32, head_width=16),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
    )

    def tokenize(prompts):
        return torch.tensor([[1 + (len(p) + k) % 60 for k in range(7)] + [63] for p in prompts])

    return ClipScorer(model, tokenize, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_evaluate_variants_end_to_end(run_dirs):
    dirs, ref = run_dirs
    # 12-d features for 24 images: the batched bootstrap route (D > N is covered in test_eval_bootstrap)
    with pytest.warns(UserWarning, match="LPIPS skipped.*eval.lpips_weights"):
        m = evaluate_variants(
            dirs, PROMPTS, ref, PixelFeatures(size=2), _tiny_scorer(), num_resamples=100, kid_subset_size=12
        )
    assert set(m) == {"fp", "quant", "qdrift"}
    common = {"fid", "kid_mean", "kid_std", "clip_score", "clip_score_ci_low", "clip_score_ci_high"}
    paired = {"fid_vs_fp", "psnr_vs_fp", "ssim_vs_fp"}
    delta = {"fid_delta_vs_quant", "fid_delta_ci_low", "fid_delta_ci_high", "fid_delta_p_below_zero"}
    assert set(m["fp"]) == common
    assert set(m["quant"]) == common | paired
    assert set(m["qdrift"]) == common | paired | delta
    assert all(type(v) is float for row in m.values() for v in row.values())
    json.dumps(m, allow_nan=False)

    # the mildly perturbed variant is closer to FP, and to the FP-like reference, than the strongly perturbed one
    assert m["qdrift"]["psnr_vs_fp"] > m["quant"]["psnr_vs_fp"] + 6
    assert m["qdrift"]["ssim_vs_fp"] > m["quant"]["ssim_vs_fp"]
    assert m["qdrift"]["fid_vs_fp"] < m["quant"]["fid_vs_fp"]
    assert m["qdrift"]["fid_delta_vs_quant"] == pytest.approx(m["qdrift"]["fid"] - m["quant"]["fid"], rel=1e-9)
    assert m["qdrift"]["fid_delta_ci_low"] <= m["qdrift"]["fid_delta_ci_high"] < 0
    for row in m.values():
        assert row["clip_score_ci_low"] <= row["clip_score"] <= row["clip_score_ci_high"]
        assert 0 <= row["clip_score"] <= 100

    table = format_table(m)
    lines = table.splitlines()
    assert len(lines) == 5 and len({len(line) for line in lines}) == 1  # header, rule, 3 aligned rows
    assert "FID delta" in lines[0] and "LPIPS" not in lines[0]  # no LPIPS computed: column dropped
    assert lines[4].startswith("qdrift") and lines[4].endswith("vs quant")


def test_evaluate_without_reference_or_clip(run_dirs):
    dirs, _ = run_dirs
    m = evaluate_variants(dirs, PROMPTS, None, PixelFeatures(size=2), None, num_resamples=10)
    assert m["fp"] == {}
    assert set(m["qdrift"]) == {"fid_vs_fp", "psnr_vs_fp", "ssim_vs_fp"}
    assert "FID delta" not in format_table(m)


def test_feature_cache_is_reused_across_runs(run_dirs):
    dirs, ref = run_dirs
    ext = CountingPixels()
    evaluate_variants(dirs, PROMPTS, ref, ext, None, num_resamples=5)
    first = ext.calls
    evaluate_variants(dirs, PROMPTS, ref, ext, None, num_resamples=5)
    assert first > 0 and ext.calls == first


@pytest.mark.parametrize(
    "break_inputs, message",
    [
        (lambda dirs, ref: (dirs["qdrift"] / "5.png").unlink(), "variant 'qdrift'.*missing e.g. \\[5\\]"),
        (lambda dirs, ref: shutil.copy(dirs["quant"] / "0.png", dirs["quant"] / f"{N}.png"), r"unexpected e.g. \[24\]"),
        (lambda dirs, ref: [p.unlink() for p in ref.glob("*.png")], "no '<index>.png'"),
    ],
)
def test_inconsistent_inputs_fail_before_any_work(run_dirs, break_inputs, message):
    dirs, ref = run_dirs
    break_inputs(dirs, ref)
    ext = CountingPixels()
    with pytest.raises(ValueError, match=message):
        evaluate_variants(dirs, PROMPTS, ref, ext, None)
    assert ext.calls == 0


def test_argument_errors(run_dirs):
    dirs, ref = run_dirs
    ext = CountingPixels()
    with pytest.raises(ValueError, match="24 images but there are 23 prompts"):
        evaluate_variants(dirs, PROMPTS[:-1], ref, ext, None)
    with pytest.raises(ValueError, match="FP variant 'fp'"):
        evaluate_variants({k: v for k, v in dirs.items() if k != "fp"}, PROMPTS, ref, ext, None)
    with pytest.raises(ValueError, match="baseline 'quant'"):
        evaluate_variants({k: v for k, v in dirs.items() if k != "quant"}, PROMPTS, ref, ext, None)
    with pytest.raises(ValueError, match="does not exist"):
        evaluate_variants({**dirs, "other": dirs["fp"].parent / "missing"}, PROMPTS, ref, ext, None)
    assert ext.calls == 0
