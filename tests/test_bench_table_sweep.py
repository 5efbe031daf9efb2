"""experiments/bench_table_sweep.sh: parts x replicates queued round-robin on GPU slots, each one Hydra multirun."""
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


def _sweep(tmp_path: Path, fake: Path, *parts: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": str(fake), "PROMPTS": "40", "REPLICATES": "0", **env_vars}
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
    assert all("-m " in c and "replicate=0 corrector=all eval.num_prompts=40" in c and "device=cuda" in c
               for c in calls)
    threads = {int(c.split()[1]) for c in calls}
    assert threads == {max(1, len(os.sched_getaffinity(0)) // 2)}   # nproc split between 2 GPUs


def test_unknown_part_fails_before_any_run(tmp_path):
    res = _sweep(tmp_path, _fake_python(tmp_path, 1), "dit", "unet_xl")
    assert res.returncode == 2 and "unknown part 'unet_xl'" in res.stderr
    assert not (tmp_path / "calls").exists()


def test_a_failed_part_does_not_stop_the_others(tmp_path):
    res = _sweep(tmp_path, _fake_python(tmp_path, 1, fail_model="bench_dit"), "dit", "unet")
    assert res.returncode == 1 and "dit replicate 0 failed" in res.stderr
    assert len((tmp_path / "calls").read_text().splitlines()) == 2


def test_replicates_are_jobs_of_their_own_spread_over_several_slots_per_gpu(tmp_path):
    res = _sweep(tmp_path, _fake_python(tmp_path, 2), "dit", "unet", REPLICATES="0,1,2", JOBS_PER_GPU="2")
    assert res.returncode == 0, res.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 6                                     # 2 parts x 3 replicates
    for model in ("bench_dit", "bench_unet"):
        reps = sorted(c.split("replicate=")[1].split()[0] for c in calls if f"model={model}" in c)
        assert reps == ["0", "1", "2"]
        dirs = {c.split("hydra.sweep.dir=")[1].split()[0] for c in calls if f"model={model}" in c}
        assert len(dirs) == 3                                  # one multirun folder per replicate
    assert {c.split()[0] for c in calls} == {"0", "1"}
    assert {int(c.split()[1]) for c in calls} == {max(1, len(os.sched_getaffinity(0)) // 4)}   # 4 slots


def test_a_past_deadline_runs_nothing_and_says_so(tmp_path):
    res = _sweep(tmp_path, _fake_python(tmp_path, 1), "dit", DEADLINE="1")
    assert res.returncode == 1 and "deadline" in res.stderr
    assert not (tmp_path / "calls").exists()
