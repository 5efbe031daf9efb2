"""The local report: a K sweep's runs become table rows with K as a column, figures carry the expected
axes, image grids show every variant, and `qdrift` runs and reports from an installed package."""
from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from PIL import Image

from qdrift import figures
from qdrift.report import gap_recovered, load_runs, table_rows, write_report

from .test_cache_runs import ROOT

ENV = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
BENCH_RESULTS = ROOT / "experiments" / "results" / "bench_table"


def _axes_of(png: bytes):
    return Image.open(io.BytesIO(png))


def test_gap_recovered_maps_the_delta_ci():
    m = {"fp": {"fid": 1.0}, "quant": {"fid": 2.0},
         "qdrift": {"fid": 1.5, "fid_delta_ci_low": -0.7, "fid_delta_ci_high": -0.3}}
    assert gap_recovered(m, "qdrift") == pytest.approx((0.5, 0.3, 0.7))
    m["quant"]["fid"] = 0.5   # quantized better than FP: the interval still reads low to high
    gap, low, high = gap_recovered(m, "qdrift")
    assert gap == pytest.approx(2.0) and low == pytest.approx(-1.4) and high == pytest.approx(-0.6)
    m["quant"]["fid"] = 1.0   # no gap: nothing to recover
    assert gap_recovered(m, "qdrift") is None


class PairedAccumulatorPool1:
    num_runs = 1


def test_figures_have_the_expected_axes(monkeypatch):
    """Each figure function on synthetic data: the axes it draws carry the paper's quantities."""
    seen = []
    real = figures._png

    def capture(fig):
        seen.append([(ax.get_xlabel(), ax.get_ylabel(), ax.get_yscale(), len(ax.patches), len(ax.lines))
                     for ax in fig.axes])
        return real(fig)

    monkeypatch.setattr(figures, "_png", capture)
    gap = figures.gap_recovered_figure(["a", "b"], [{"qdrift": (0.4, 0.1, 0.7), "ptqd": (-0.1, -0.3, 0.1)},
                                                   {"qdrift": (0.2, 0.0, 0.4), "ptqd": None}])
    assert seen[-1][0][:4] == ("setting", "gap recovered (%)", "linear", 3)   # three bars
    k = figures.fid_vs_k_figure({"s": {"quant": [(1, 2.0), (5, 2.0)], "qdrift": [(1, 1.9), (5, 1.7)]}})
    assert seen[-1][0][:3] == ("calibration size K", "FID", "linear") and seen[-1][0][4] == 2   # two lines
    from qdrift.drift.calibration import PairedAccumulator

    acc = PairedAccumulator(num_steps=4)
    gen = torch.Generator().manual_seed(0)
    for i in range(4):   # 12 runs whose error grows with the step
        u = torch.randn(12, 2, 4, 4, generator=gen)
        acc.add(i, u + (i + 1) * 0.1 * torch.randn(12, 2, 4, 4, generator=gen), u)
    fig2 = figures.calibration_size_figure(acc.pool(), ks=(1, 5, 10), resamples=20)
    ax = seen[-1][0]
    assert ax[:3] == ("sampling step i", "V_i fitted from K runs", "log") and ax[4] == 4   # K = 1, 5, 10, 12
    assert figures.calibration_size_figure(PairedAccumulatorPool1()) is None
    v = figures.residual_variance_figure([("run", {"residual_var_scalar": [[1e-3], [1e-2], [1e-1]]})])
    assert seen[-1][0][:3] == ("sampling step i", "residual variance V_i", "log") and seen[-1][0][4] == 1
    for png in (gap, k, v, fig2):
        assert _axes_of(png).size[0] > 200


def test_report_of_the_committed_bench_table(tmp_path):
    out = write_report([BENCH_RESULTS], tmp_path / "r.html")
    runs = load_runs([BENCH_RESULTS])
    header, rows = table_rows(runs)
    assert len(rows) == len(runs) == len(list(BENCH_RESULTS.glob("*/metrics.json")))
    md = out["md"].read_text()
    assert md.count("\n") == len(rows) + 2 and "qdrift gap recovered [95% CI]" in md
    page = out["html"].read_text()
    assert "<h2>Gap recovered per setting (95% CI)</h2>" in page and "Residual variance V_i" in page
    assert "http://" not in page and "https://" not in page   # self-contained: nothing to fetch


@pytest.mark.slow
def test_report_of_a_k_sweep_has_both_runs_k_figure_and_grids(tmp_path):
    subprocess.run([sys.executable, "run.py", "-m", "model=tiny_pixart", "eval=bench", "eval.num_prompts=8",
                    "eval.num_resamples=50", "eval.kid_subset_size=4", "batch_size=4", "sampler.steps=3",
                    "logger=none", f"output_root={tmp_path}", "calib.num_runs=1,2", "quant=rtn_w4a8",
                    "++quant.calib_prompts=2"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    out = write_report([tmp_path / "multirun"], tmp_path / "report.html")
    header, rows = table_rows(load_runs([tmp_path / "multirun"]))
    k = header.index("calib.num_runs")
    assert sorted(r[k] for r in rows) == ["1", "2"]          # K kept as a column: two distinct rows
    page = out["html"].read_text()
    titles = re.findall(r"<h2>([^<]*)</h2>", page)
    assert titles[:3] == ["Table", "Gap recovered per setting (95% CI)", "FID vs K"]
    assert titles[3].startswith("Calibration size") and titles[4:] == [
        "Residual variance V_i per step", "Drift factor c_i per step",
        "Error samples: Gaussianity (Fig. 4) and correlations (Fig. 5)", "Runs"]
    # Fig. 4 and Fig. 5 once for the setting (both K share their calibration runs), from the run's own samples
    fig4 = re.findall(r"<img alt='Fig. 4 gaussianity: ([^']*)' src='data:image/png;base64,[^']+'", page)
    fig5 = re.findall(r"<img alt='Fig. 5 correlation: ([^']*)' src='data:image/png;base64,[^']+'", page)
    assert fig4 == fig5 == ["K=1"] and "4 calibration runs" in page and "No raw error samples" not in page
    assert page.count("<h3>") == 2                            # one section per run, with its command
    assert page.count("python run.py") == 2 and "calib.num_runs=1" in page
    grids = re.findall(r"<img alt='image grid' src='data:image/png;base64,([^']+)'", page)
    assert len(grids) == 2
    # fp, quant, qdrift and reference rows
    assert Image.open(io.BytesIO(base64.b64decode(grids[0]))).size[1] > 4 * 64


@pytest.mark.slow
def test_installed_package_runs_and_reports_outside_a_checkout(tmp_path):
    """`pip install` of the wheel (configs inside the package) gives `qdrift run` and `qdrift report`."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "wheel").glob("qdrift-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "qdrift/conf/config.yaml" in names and "qdrift/conf/hydra/launcher/slurm.yaml" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(ENV, PYTHONPATH=str(site))   # the installed copy first, its dependencies from this venv
    cli = [sys.executable, "-c", "import sys, qdrift.cli; assert 'site' in qdrift.cli.__file__; "
                                 "sys.exit(qdrift.cli.main())"]
    run = subprocess.run([*cli, "run", "model=tiny_pixart", "eval=smoke", "eval.num_prompts=2", "batch_size=2",
                          "sampler.steps=2", "quant=none", "corrector=none", "logger=none", "output_root=out"],
                         cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    run_dir = work / run.stdout.strip().splitlines()[-1]
    assert (run_dir / "run.log").is_file() and (run_dir / "metrics.json").is_file()
    rep = subprocess.run([*cli, "report", "out", "--out", "rep/report.html"], cwd=work, env=env,
                         capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert (work / "rep" / "report.csv").is_file() and "tiny_pixart" in (work / "rep" / "report.md").read_text()


def test_report_refuses_a_folder_without_runs(tmp_path, capsys):
    from qdrift.report import main

    assert main([str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "no run directory" in capsys.readouterr().err


@pytest.mark.skipif(not shutil.which("chromium"), reason="headless check needs Debian's chromium package")
def test_page_renders_every_image_in_headless_chromium_offline(tmp_path):
    out = write_report([BENCH_RESULTS], tmp_path / "r.html")
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
                          "--virtual-time-budget=5000", "--dump-dom", out["html"].as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    counts = re.search(r'data-images="(\d+)" data-rendered="(\d+)"', dom)
    assert counts and int(counts[1]) >= 2 and counts[1] == counts[2]


def test_error_figures_tell_gaussian_from_skewed_and_correlated_from_shuffled(monkeypatch):
    import numpy as np

    titles = []
    real = figures._png
    monkeypatch.setattr(figures, "_png", lambda fig: (titles.append([ax.get_title() for ax in fig.axes]), real(fig))[1])
    rng = np.random.default_rng(0)
    figures.gaussianity_figure({"step 0": {"output u": rng.normal(size=200), "error e": rng.exponential(size=200)}})
    p_normal, p_skewed = (float(t.rsplit("p = ", 1)[1]) for t in titles[-1])
    assert p_normal > 0.05 and p_skewed < 0.001          # the title's Shapiro-Wilk p tells them apart
    common = rng.normal(size=(200, 1))
    figures.correlation_figure({"correlated": common + 0.5 * rng.normal(size=(200, 8)),
                                "independent": rng.normal(size=(200, 8))})
    (real_c, shuf_c), (real_i, shuf_i) = (map(float, re.findall(r"(\d\.\d+)", t)) for t in titles[-1])
    assert real_c > 0.6 > 0.2 > shuf_c and abs(real_i - shuf_i) < 0.1


def _samples(runs: int, seed: int = 0):
    """Raw calibration samples of `runs` synthetic runs (the accumulator calibration uses)."""
    from qdrift.drift.calibration import PairedAccumulator

    gen = torch.Generator().manual_seed(seed)
    acc = PairedAccumulator(num_steps=5)
    for i in range(5):
        u = torch.randn(runs, 4, 8, 8, generator=gen)
        acc.add(i, u + 0.1 * torch.randn(runs, 4, 8, 8, generator=gen), u)
    return acc.samples()


def test_report_draws_fig4_and_fig5_from_the_runs_raw_samples(tmp_path, monkeypatch):
    """A run with stats/samples.safetensors gets Fig. 4 (u and e at a coordinate per kept step, fitted
    normals) and Fig. 5 (error correlations vs shuffled); a run without them and one with too few runs
    are named in notes, not errors. A summary with drift factors gets the c_i figure."""
    import json

    titles = []
    real = figures._png
    monkeypatch.setattr(figures, "_png", lambda fig: (titles.append([ax.get_title() for ax in fig.axes]), real(fig))[1])
    names = {"with": "bench_dit_dpmpp_svdquant_w3a4", "without": "bench_dit_dpmpp_mixdq_w4a8",
             "few": "bench_dit_dpmpp_svdquant_w4a4"}
    for key, name in names.items():
        shutil.copytree(BENCH_RESULTS / name, tmp_path / "runs" / key)
    (tmp_path / "runs" / "with" / "stats").mkdir()
    _samples(12).save(tmp_path / "runs" / "with" / "stats" / "samples.safetensors")
    (tmp_path / "runs" / "few" / "stats").mkdir()
    _samples(2).save(tmp_path / "runs" / "few" / "stats" / "samples.safetensors")
    summary = json.loads((tmp_path / "runs" / "with" / "stats_summary.json").read_text())
    steps = len(summary["residual_var_scalar"])
    summary["drift_factors"] = {"qdrift": [[1e-3 * (i + 1)] for i in range(steps)]}
    (tmp_path / "runs" / "with" / "stats_summary.json").write_text(json.dumps(summary))

    page = write_report([tmp_path / "runs"], tmp_path / "r.html")["html"].read_text()
    assert "<h2>Error samples: Gaussianity (Fig. 4) and correlations (Fig. 5)</h2>" in page
    assert "<h2>Drift factor c_i per step</h2>" in page
    fig4 = re.findall(r"<img alt='Fig. 4 gaussianity: ([^']*)' src='data:image/png;base64,([^']+)'", page)
    fig5 = re.findall(r"<img alt='Fig. 5 correlation: ([^']*)' src='data:image/png;base64,([^']+)'", page)
    assert [label for label, _ in fig4] == [label for label, _ in fig5] == ["quant=svdquant_w3a4"]
    for _, png in fig4 + fig5:
        assert Image.open(io.BytesIO(base64.b64decode(png))).size[0] > 300
    assert "12 calibration runs" in page
    note = re.search(r"No raw error samples \(samples.safetensors\) in: ([^<]*)", page)
    assert note and "quant=mixdq_w4a8" in note[1] and "svdquant" not in note[1]
    assert "quant=svdquant_w4a4</h4><p class='note'>Not drawn: 2 calibration run(s): too few" in page
    gauss, corr = (t for t in titles if any("Shapiro-Wilk" in x or "mean |r|" in x for x in t))
    assert len(gauss) == 6 and all("Shapiro-Wilk p = " in t for t in gauss)   # u and e at steps 0, 2, 4
    assert [t.split(",")[0] for t in gauss[:3]] == ["step 0 (channel 0", "step 2 (channel 0", "step 4 (channel 0"]
    assert len(corr) == 3 and all("128 coordinates: mean |r|" in t for t in corr)   # 2 channels x 64 positions


def test_report_without_any_raw_samples_says_so(tmp_path):
    page = write_report([BENCH_RESULTS], tmp_path / "r.html")["html"].read_text()
    assert "No raw error samples" in page and "Fig. 4 gaussianity" not in page


def test_report_counts_a_run_once_and_refuses_a_copy_before_writing(tmp_path):
    """A run named twice is one row, and so is a copy of a run with the same results (a resumed sweep's
    rerun); a copy with other results is refused before any output file is written."""
    import shutil

    run = BENCH_RESULTS / "bench_dit_dpmpp_svdquant_w3a4"
    out = write_report([run, run, BENCH_RESULTS / "bench_unet_euler_mixdq_w4a8"], tmp_path / "once.html")
    assert out["md"].read_text().count("\n") == 2 + 2
    shutil.copytree(run, tmp_path / "copy")                 # a copy with the same results counts once
    out = write_report([run, tmp_path / "copy"], tmp_path / "same.html")
    assert out["md"].read_text().count("\n") == 2 + 1
    metrics = json.loads((tmp_path / "copy" / "metrics.json").read_text())
    metrics["variants"]["quant"]["fid"] += 0.01              # one with other results is refused
    (tmp_path / "copy" / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match="same replicate of one setting"):
        write_report([run, tmp_path / "copy"], tmp_path / "dup.html")
    assert not list(tmp_path.glob("dup.*"))


def test_a_bar_beyond_the_axis_limit_is_cut_and_labelled():
    from qdrift.figures import clipped_bar, gap_recovered_figure

    assert clipped_bar(-3642.0, -6268.0, -1015.0, 100) == (-100.0, -100.0, -100.0, "-3642")   # no whisker
    assert clipped_bar(30.0, -92.0, 152.0, 100) == (30.0, -92.0, 100.0, "")                   # whisker stops
    val, lo, hi, label = clipped_bar(17.0, math.nan, math.nan, 100)                           # one replicate
    assert (val, label) == (17.0, "") and math.isnan(lo) and math.isnan(hi)
    assert clipped_bar(-3642.0, -6268.0, -1015.0, None) == (-3642.0, -6268.0, -1015.0, "")
    png = gap_recovered_figure(["a", "b"], [{"qdrift": (-36.42, -62.68, -10.15)}, {"qdrift": (0.17, math.nan, math.nan)}],
                               limit=100)
    assert png.startswith(b"\x89PNG")


def test_image_grid_takes_a_joined_runs_corrector_rows(tmp_path):
    """A corrector joined from a later run of the same replicate gets its row of images in the grid."""
    from PIL import Image

    from qdrift.figures import image_grid

    def images(run, variants):
        for v in variants:
            (run / "images" / v).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(run / "images" / v / f"{i}.png")

    images(tmp_path / "a", ["fp", "quant", "qdrift"])
    images(tmp_path / "b", ["fp", "quant", "late"])
    rows = lambda png: Image.open(io.BytesIO(png)).size[1]   # noqa: E731  (one row of thumbnails each)
    alone, joined = image_grid(tmp_path / "a", 2), image_grid(tmp_path / "a", 2, joined=(tmp_path / "b",))
    assert rows(joined) > rows(alone)
    assert image_grid(tmp_path / "a", 2, joined=(tmp_path / "missing",)) == alone
