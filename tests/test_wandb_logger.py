"""W&B under a scheduler: SIGTERM still finishes the run, and online mode without network gives up quickly."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qdrift.signals import Terminated, terminate_on_sigterm

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["model=tiny_pixart", "eval=smoke", "eval.num_prompts=2", "batch_size=2", "sampler.steps=2", "quant=none",
            "corrector=none", "logger=wandb"]


def wandb_env(tmp_path: Path, **extra) -> dict:
    """W&B on, with its settings and caches inside tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONUNBUFFERED="1", WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"), WANDB_DATA_DIR=str(tmp_path / "wandb-data"), **extra)
    return env


def wandb_records(path: Path) -> list:
    """Records of a .wandb file: a 7-byte W&B header, then a LevelDB log of protobuf records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf, out = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                       # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:      # zero padding up to the end of the block
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                 # FULL or LAST fragment: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def test_sigterm_becomes_an_exception_once():
    previous = signal.getsignal(signal.SIGTERM)
    cleaned = False
    with pytest.raises(Terminated) as err:
        with terminate_on_sigterm():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
                pytest.fail("SIGTERM did not interrupt")
            finally:
                os.kill(os.getpid(), signal.SIGTERM)   # a second one during the cleanup is ignored
                cleaned = True
    assert cleaned and err.value.code == 143 and isinstance(err.value, SystemExit)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_sigterm_handler_as_a_decorator():
    """`@terminate_on_sigterm()` on a function (the form proposed for runner.run) installs it per call."""
    previous = signal.getsignal(signal.SIGTERM)

    @terminate_on_sigterm()
    def stage():
        assert signal.getsignal(signal.SIGTERM) is not previous
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    for _ in range(2):
        with pytest.raises(Terminated):
            stage()
        assert signal.getsignal(signal.SIGTERM) is previous


# The run as `python run.py`, with a stand-in evaluate stage that takes "hours".
LONG_STAGE = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import qdrift.runner

def evaluate_for_hours(ctx, dirs):
    Path({ready!r}).write_text("1")
    time.sleep(300)

qdrift.runner.evaluate_stage = evaluate_for_hours
import runpy
sys.argv = ["run.py", *{args!r}]
runpy.run_path({run_py!r}, run_name="__main__")
"""


@pytest.mark.slow  # a `python run.py` process
def test_sigterm_mid_run_finishes_wandb_and_leaves_a_consistent_run_dir(tmp_path):
    ready = tmp_path / "ready"
    args = [*TINY_RUN, "logger.mode=offline", f"output_root={tmp_path / 'out'}"]
    script = LONG_STAGE.format(root=str(ROOT), ready=str(ready), args=args, run_py=str(ROOT / "run.py"))
    # Own session: SIGTERM goes to the whole process group (W&B's service too), as Slurm does.
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=wandb_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never reached its long stage"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    assert "error: terminated (SIGTERM)" in err and "Traceback" not in err, err[-3000:]
    (run_dir,) = (tmp_path / "out" / "runs").glob("*/*")
    assert (run_dir / "config.json").is_file() and not (run_dir / "metrics.json").exists()
    assert len(list((run_dir / "images" / "quant").glob("*.png"))) == 2
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    exits = [r.exit for r in wandb_records(wandb_file) if r.WhichOneof("record_type") == "exit"]
    assert len(exits) == 1 and exits[0].exit_code == 1   # finished, and marked failed


@pytest.mark.slow  # a `python run.py` process
def test_online_without_network_gives_up_within_the_timeout(tmp_path):
    """Loopback port 9 refuses connections: W&B's default would retry for 90 s before the run could go on."""
    env = wandb_env(tmp_path, WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="x" * 40)
    args = [sys.executable, "run.py", *TINY_RUN, "logger.mode=online", "logger.init_timeout=2",
            f"output_root={tmp_path / 'out'}"]
    start = time.monotonic()
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    assert out.returncode == 0, out.stderr[-3000:]
    assert "W&B init failed, continuing without it (logger.init_timeout=2)" in out.stdout + out.stderr
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    assert (run_dir / "metrics.json").is_file()
    assert took < 60, took


def test_init_timeout_reaches_wandb(monkeypatch, tmp_path):
    import wandb

    from qdrift.tracking.wandb_logger import WandbLogger

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise wandb.errors.CommError("unreachable")

    monkeypatch.setattr(wandb, "init", fake_init)
    cfg = OmegaConf.create({"kind": "wandb", "mode": "online", "project": "p", "init_timeout": 3.5})
    assert WandbLogger(cfg, tmp_path, {}, name="x").run is None
    assert seen["settings"].init_timeout == 3.5


@pytest.mark.slow
def test_offline_sweep_runs_are_grouped_tagged_with_step_history_and_local_images(tmp_path):
    """A 2-job K sweep with offline W&B: both runs in one group named after the sweep, tagged with model,
    sampler, quantizer, corrector and K, a per-step history of V_i, and the image files inside each run dir."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("WANDB_MODE", None)
    proc = subprocess.run([sys.executable, "run.py", "-m", "model=tiny_pixart", "eval=smoke", "eval.num_prompts=4",
                           "batch_size=2", "sampler.steps=3", "logger=wandb", "logger.mode=offline",
                           "logger.log_images=2", f"output_root={tmp_path}", "calib.num_runs=1,2", "quant=rtn_w4a8",
                           "++quant.calib_prompts=2", "corrector=qdrift"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted(p.parent for p in tmp_path.rglob("metrics.json"))
    assert len(runs) == 2
    groups = set()
    for k, run_dir in zip((1, 2), runs):
        wandb_file = next(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
        records = wandb_records(wandb_file)
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        groups.add(run.run_group)
        assert run.job_type == "sweep-job" and run.display_name.startswith(f"tiny_pixart-rtn_w4a8-dpmpp-K{k}-")
        assert {"model:tiny_pixart", "sampler:dpmpp", "quant:rtn_w4a8", "corrector:qdrift", f"K:{k}"} <= set(run.tags)
        steps = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
                 for r in records if r.WhichOneof("record_type") == "history"]
        per_step = [h for h in steps if "per_step/V_i" in h]
        assert [int(h["step"]) for h in per_step] == [0, 1, 2]   # one history row per sampling step
        summary = json.loads((run_dir / "stats" / "summary.json").read_text())
        assert [float(h["per_step/V_i"]) for h in per_step] == pytest.approx(
            [v[0] for v in summary["residual_var_scalar"]])
        factors = [float(h["per_step/qdrift/drift_factor"]) for h in per_step]   # Q-Drift's c_i, per step
        assert factors == pytest.approx([c[0] for c in summary["drift_factors"]["qdrift"]]) and any(factors)
        media = list(run_dir.glob("wandb/offline-run-*/files/media/images/samples/*.png"))
        assert len(media) == 3 * 2   # fp, quant, qdrift x 2 prompts, inside the run dir
    assert len(groups) == 1 and next(iter(groups)).startswith("sweep-")


def test_review_workspace_lays_out_every_panel_offline():
    """The saved-workspace definition builds without a server and names the keys the runs log."""
    from qdrift.tracking.workspace import build_workspace

    model = build_workspace("me", "qdrift", group="sweep-abc")._to_model().model_dump(by_alias=True)
    text = json.dumps(model, default=str)
    for key in ("summary:qdrift/gap_recovered", "config:calib.value.num_runs", "per_step/V_i",
                "per_step/channel_spread", "per_step/qdrift/drift_factor", "per_step/qdrift_exact/drift_factor",
                "samples/quant", "sweep-abc"):
        assert key in text, key


def _history(run_dir: Path) -> list[dict]:
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in wandb_records(wandb_file) if r.WhichOneof("record_type") == "history"]


LOG_STEPS = """
import json
from pathlib import Path
from omegaconf import OmegaConf
from qdrift.tracking.wandb_logger import WandbLogger
run_dir = Path({run_dir!r})
cfg = OmegaConf.create({{"kind": "wandb", "mode": "offline", "project": "p"}})
logger = WandbLogger(cfg, run_dir, {{"corrector": {{"qdrift": {{}}, "ptqd": {{}}}}}}, name="factors")
assert logger.run is not None
logger.log_steps(json.loads((run_dir / "summary.json").read_text()))
logger.finish()
"""


def test_per_step_history_has_each_correctors_drift_factors(tmp_path):
    """log_steps puts every Q-Drift variant's c_i on the step axis under per_step/<variant>/drift_factor:
    one value per sampling step, equal to the corrector's drift_factors() (the channel mean for
    channel pooling); a variant without factors (PTQD) gets no series."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from qdrift.drift import QDrift, wrap_scheduler
    from qdrift.drift.calibration import PairedAccumulator

    steps, gen = 5, torch.Generator().manual_seed(0)
    acc = PairedAccumulator(steps)
    for i in range(steps):   # an error that grows with the step and differs between the 3 channels
        u = torch.randn(6, 3, 4, 4, generator=gen)
        scale = (i + 1) * torch.tensor([0.01, 0.03, 0.1]).reshape(1, 3, 1, 1)
        acc.add(i, u + scale * torch.randn(6, 3, 4, 4, generator=gen), u)
    pool = acc.pool()
    factors = {}
    for name, pooling, mode in (("qdrift", "scalar", "paper"), ("qdrift_ch", "channel", "exact")):
        hook = QDrift(pool.fit(None, pooling), mode=mode)
        sch = wrap_scheduler(DPMSolverMultistepScheduler(), hook)
        sch.set_timesteps(steps)
        factors[name] = hook.drift_factors().double()
    assert factors["qdrift_ch"].shape == (steps, 3) and factors["qdrift"].shape == (steps, 1)
    summary = {"timesteps": sch.timesteps.tolist(), "residual_var_scalar": pool.fit(None).residual_var.tolist(),
               "residual_var_channel": pool.fit(None, "channel").residual_var.tolist(),
               "drift_factors": {name: f.tolist() for name, f in factors.items()}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    # In its own process, as a run logs: the offline file is complete once the process (and W&B's service) ends.
    subprocess.run([sys.executable, "-c", LOG_STEPS.format(run_dir=str(tmp_path))], cwd=ROOT, env=wandb_env(tmp_path),
                   check=True, capture_output=True, text=True, timeout=300)
    rows = [h for h in _history(tmp_path) if "per_step/V_i" in h]
    assert [int(h["step"]) for h in rows] == list(range(steps))
    for name, f in factors.items():
        logged = [h[f"per_step/{name}/drift_factor"] for h in rows]
        assert logged == pytest.approx(f.mean(dim=1).tolist(), rel=1e-12, abs=0)
        assert len(set(logged)) == steps   # a real per-step series, not one value repeated
    assert not [k for h in rows for k in h if k.startswith("per_step/ptqd")]
