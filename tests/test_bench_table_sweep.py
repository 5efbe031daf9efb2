"""experiments/bench_table_sweep.sh: parts x replicates queued round-robin on GPU slots, each one Hydra multirun."""
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "bench_table_sweep.sh"


def _fake_python(tmp_path: Path, gpus: int, fail_model: str = "", seconds: int = 0) -> Path:
    """Stands in for python: reports `gpus` devices and records every run.py call with its GPU (each
    taking `seconds`)."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [[ $1 == -c ]]; then echo {gpus}; exit 0; fi
echo "$CUDA_VISIBLE_DEVICES $OMP_NUM_THREADS ${{*:2}}" >> {tmp_path}/calls
sleep {seconds}
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


def test_correctors_can_be_chosen(tmp_path):
    res = _sweep(tmp_path, _fake_python(tmp_path, 1), "dit:svdquant_w3a4", CORRECTORS="[qdrift_plus,ptqd]")
    assert res.returncode == 0, res.stderr
    (call,) = (tmp_path / "calls").read_text().splitlines()
    assert "quant=svdquant_w3a4 replicate=0 corrector=[qdrift_plus,ptqd] eval.num_prompts=40" in call


def test_unknown_part_fails_before_any_run(tmp_path):
    res = _sweep(tmp_path, _fake_python(tmp_path, 1), "dit", "unet_xl")
    assert res.returncode == 2 and "unknown part 'unet_xl'" in res.stderr
    res = _sweep(tmp_path, _fake_python(tmp_path, 1), "dit", "unet:")
    assert res.returncode == 2 and "'unet:' names no quantizer" in res.stderr
    assert not (tmp_path / "calls").exists()


def test_a_failed_part_does_not_stop_the_others(tmp_path):
    res = _sweep(tmp_path, _fake_python(tmp_path, 1, fail_model="bench_dit"), "dit", "unet")
    assert res.returncode == 1 and "dit replicate 0 failed" in res.stderr
    assert len((tmp_path / "calls").read_text().splitlines()) == 2


def test_replicates_are_jobs_of_their_own_spread_over_several_slots_per_gpu(tmp_path):
    res = _sweep(tmp_path, _fake_python(tmp_path, 2), "dit", "unet", REPLICATES="0,1,2,1", JOBS_PER_GPU="2")
    assert res.returncode == 0, res.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 6                                     # 2 parts x 3 replicates (1 named twice, run once)
    for model in ("bench_dit", "bench_unet"):
        mine = [c for c in calls if f"model={model}" in c]
        assert sorted(c.split("replicate=")[1].split()[0] for c in mine) == ["0", "1", "2"]
        assert len({c.split("hydra.sweep.dir=")[1].split()[0] for c in mine}) == 3   # a multirun folder each
        assert {c.split()[0] for c in mine} == {"0", "1"}      # a part's replicates on both GPUs
    assert {int(c.split()[1]) for c in calls} == {max(1, len(os.sched_getaffinity(0)) // 4)}   # 4 slots


@pytest.mark.parametrize("env, match", [
    (dict(DEADLINE="1"), "already past"),
    (dict(DEADLINE="tomorrow"), "seconds since the epoch"),
    (dict(CORRECTORS="qdrift_plus,ptqd"), "CORRECTORS is one corrector option or a list"),
    (dict(CORRECTORS="[qdrift_plus;ls]"), "CORRECTORS is one corrector option or a list"),
    (dict(JOBS_PER_GPU="0"), "JOBS_PER_GPU must be an integer >= 1"),
    (dict(JOBS_PER_GPU="abc"), "JOBS_PER_GPU must be an integer >= 1"),
    (dict(REPLICATES="0 1"), "comma-separated list of integers"),
    (dict(REPLICATES="0,,1"), "comma-separated list of integers"),
])
def test_bad_settings_fail_before_any_run(tmp_path, env, match):
    res = _sweep(tmp_path, _fake_python(tmp_path, 1), "dit", **env)
    assert res.returncode == 2 and match in res.stderr
    assert not (tmp_path / "calls").exists()


def test_a_deadline_reached_between_jobs_skips_the_rest(tmp_path):
    res = _sweep(tmp_path, _fake_python(tmp_path, 1, seconds=4), "dit", "unet", DEADLINE=str(int(time.time()) + 13))
    assert res.returncode == 1 and "skip unet replicate 0: deadline" in res.stderr
    assert len((tmp_path / "calls").read_text().splitlines()) == 1


def test_stopping_the_sweep_stops_its_runs(tmp_path):
    fake = _fake_python(tmp_path, 2, seconds=300)
    fake.write_text(fake.read_text().replace("sleep 300", f"echo $$ >> {tmp_path}/pids; exec sleep 300"))
    env = {**os.environ, "PYTHON": str(fake), "REPLICATES": "0"}
    sweep = subprocess.Popen(["bash", str(SCRIPT), str(tmp_path / "out"), "dit", "unet"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = tmp_path / "pids"
    for _ in range(100):                                       # both GPUs' runs started
        if pids.exists() and len(pids.read_text().split()) == 2:
            break
        time.sleep(0.1)
    sweep.terminate()
    assert sweep.wait(timeout=30) != 0
    runs = [int(p) for p in pids.read_text().split()]
    assert len(runs) == 2
    time.sleep(1)
    for pid in runs:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_resumed_sweep_runs_only_the_unfinished_quantizers(tmp_path):
    """A job with results is skipped when the sweep is run again (its directory is never reused); one of
    another corrector list or prompt count is not the same job."""
    def finished(job: str, quant: str, corrector: str = "all", prompts: int = 40):
        d = tmp_path / "out" / "dit" / "multirun_r0" / job
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(
            f"- model=bench_dit\n- quant={quant}\n- replicate=0\n- corrector={corrector}\n- eval.num_prompts={prompts}\n")
        (d / "metrics.json").write_text("{}")

    finished("0_w4", "svdquant_w4a4")
    finished("1_w3", "svdquant_w3a4", corrector="qdrift")
    finished("2_mixdq", "mixdq_w4a8", prompts=2000)
    res = _sweep(tmp_path, _fake_python(tmp_path, 1), "dit")
    assert res.returncode == 0, res.stderr
    (call,) = (tmp_path / "calls").read_text().splitlines()
    assert "quant=svdquant_w3a4,mixdq_w4a8 replicate=0" in call
    finished("3_w3", "svdquant_w3a4")
    finished("4_mixdq", "mixdq_w4a8")
    res = _sweep(tmp_path, _fake_python(tmp_path, 1), "dit")
    assert res.returncode == 0 and "done: dit replicate 0" in res.stdout
    assert len((tmp_path / "calls").read_text().splitlines()) == 1
