"""experiments/bench_table_sweep.sh: parts queued round-robin on the GPUs, each one Hydra multirun."""
import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "bench_table_sweep.sh"


def _fake_python(tmp_path: Path, gpus: int, fail_model: str = "") -> Path:
    """Stands in for python: reports `gpus` devices and records every run.py call with its GPU."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [[ $1 == -c ]]; then echo {gpus}; exit 0; fi
echo "$CUDA_VISIBLE_DEVICES $OMP_NUM_THREADS ${{*:2}}" >> {tmp_path}/calls
[[ -n "{fail_model}" && "$*" == *"model={fail_model}"* ]] && exit 1
exit 0
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake


def _sweep(tmp_path: Path, fake: Path, *parts: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": str(fake), "PROMPTS": "40"}
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), *parts], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_parts_are_queued_round_robin_on_the_gpus(tmp_path):
    res = _sweep(tmp_path, _fake_python(tmp_path, 2), "dit", "unet:svdquant_w3a4", "flow_dpmpp")
    assert res.returncode == 0, res.stderr
    calls = sorted((tmp_path / "calls").read_text().splitlines())
    assert len(calls) == 3
    gpu0 = [c for c in calls if c.startswith("0 ")]
    gpu1 = [c for c in calls if c.startswith("1 ")]
    assert len(gpu0) == 2 and len(gpu1) == 1
    assert any("model=bench_dit quant=svdquant_w4a4,svdquant_w3a4,mixdq_w4a8" in c for c in gpu0)
    assert any("model=bench_flow sampler=dpmpp" in c for c in gpu0)
    assert "model=bench_unet quant=svdquant_w3a4 " in gpu1[0]
    assert all("-m " in c and "corrector=all eval.num_prompts=40" in c and "device=cuda" in c for c in calls)
    threads = {int(c.split()[1]) for c in calls}
    assert threads == {max(1, len(os.sched_getaffinity(0)) // 2)}   # nproc split between 2 GPUs


def test_unknown_part_fails_before_any_run(tmp_path):
    res = _sweep(tmp_path, _fake_python(tmp_path, 1), "dit", "unet_xl")
    assert res.returncode == 2 and "unknown part 'unet_xl'" in res.stderr
    assert not (tmp_path / "calls").exists()


def test_a_failed_part_does_not_stop_the_others(tmp_path):
    res = _sweep(tmp_path, _fake_python(tmp_path, 1, fail_model="bench_dit"), "dit", "unet")
    assert res.returncode == 1 and "dit failed" in res.stderr
    assert len((tmp_path / "calls").read_text().splitlines()) == 2
