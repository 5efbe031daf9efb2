"""The artifact cache: build once under a lock, checksums verified on read, unique temporaries, modes."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from qdrift import cache as cache_mod
from qdrift.cache import Artifact, CacheError, atomic_write_bytes, copy_file, text_hash


def _writer(content: bytes):
    calls = []

    def build(staging: Path):
        calls.append(staging)
        (staging / "a.bin").write_bytes(content)
        (staging / "sub").mkdir()
        (staging / "sub" / "b.txt").write_text("b")
        return {"note": "x"}

    return build, calls


def test_built_once_then_read(tmp_path):
    build, calls = _writer(b"data")
    art = Artifact(tmp_path, "stage", {"x": 1}).ensure(build)
    assert len(calls) == 1 and art.file("a.bin").read_bytes() == b"data"
    manifest = art.manifest()
    assert set(manifest["files"]) == {"a.bin", "sub/b.txt"} and manifest["note"] == "x"
    assert manifest["inputs"] == {"x": 1}
    Artifact(tmp_path, "stage", {"x": 1}).ensure(build)
    assert len(calls) == 1                     # a fresh handle finds it complete
    assert not list(art.path.parent.glob(".*.tmp"))   # no staging left behind


def test_key_holds_every_input(tmp_path):
    base = {"a": 1, "b": [1, 2], "c": {"d": "e"}}
    key = Artifact(tmp_path, "s", base).key
    assert Artifact(tmp_path, "s", dict(reversed(list(base.items())))).key == key   # order does not matter
    for changed in ({**base, "a": 2}, {**base, "b": [2, 1]}, {**base, "c": {"d": "f"}}, {**base, "z": None}):
        assert Artifact(tmp_path, "s", changed).key != key
    assert Artifact(tmp_path, "other", base).key != key
    assert text_hash(["a b", "c"]) != text_hash(["a", "b c"])


@pytest.mark.parametrize("damage", ["truncate", "alter", "delete_file", "manifest_garbage", "manifest_missing",
                                    "manifest_other_key"])
def test_damaged_artifact_is_reported_and_rebuilt(tmp_path, caplog, damage):
    build, calls = _writer(b"0123456789")
    art = Artifact(tmp_path, "stage", {"x": 1}).ensure(build)
    target = art.file("a.bin")
    if damage == "truncate":
        target.write_bytes(b"01234")
    elif damage == "alter":
        target.write_bytes(b"0123456780")     # same size, one byte changed
    elif damage == "delete_file":
        target.unlink()
    elif damage == "manifest_garbage":
        art.manifest_path.write_text("{not json")
    elif damage == "manifest_missing":
        art.manifest_path.unlink()
    else:
        m = art.manifest()
        art.manifest_path.write_text(json.dumps({**m, "key": "0" * 16}))
    fresh = Artifact(tmp_path, "stage", {"x": 1})
    assert not fresh.verify()
    assert str(art.path) in caplog.text       # reported with the cache path
    fresh.ensure(build)
    assert len(calls) == 2 and fresh.file("a.bin").read_bytes() == b"0123456789" and fresh.verify()


def test_failed_build_leaves_nothing(tmp_path):
    def broken(staging):
        (staging / "half").write_bytes(b"x")
        raise RuntimeError("crash mid-build")

    art = Artifact(tmp_path, "stage", {"x": 1})
    with pytest.raises(RuntimeError):
        art.ensure(broken)
    assert not art.path.exists() and not [p for p in (tmp_path / "stage").iterdir() if p.suffix != ".lock"]
    build, calls = _writer(b"ok")
    art.ensure(build)
    assert len(calls) == 1


def test_files_respect_the_umask(tmp_path):
    build, _ = _writer(b"x")
    art = Artifact(tmp_path, "stage", {"x": 1}).ensure(build)
    umask = os.umask(0)
    os.umask(umask)
    for f in (art.file("a.bin"), art.manifest_path):
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode == 0o666 & ~umask, oct(mode)
    atomic_write_bytes(tmp_path / "plain.bin", b"x")
    assert stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode) == 0o666 & ~umask


def test_copy_is_not_a_link(tmp_path):
    src = tmp_path / "src.png"
    src.write_bytes(b"cached")
    copy_file(src, tmp_path / "run" / "0.png")
    (tmp_path / "run" / "0.png").write_bytes(b"edited in the run dir")
    assert src.read_bytes() == b"cached"
    assert (tmp_path / "run" / "0.png").stat().st_ino != src.stat().st_ino


def _race(cache: str, log: str, start: float) -> None:
    while time.time() < start:
        time.sleep(0.001)

    def build(staging):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)                        # long enough that the other process must wait
        (staging / "a.bin").write_bytes(b"shared")

    art = Artifact(cache, "stage", {"x": 1}).ensure(build)
    assert art.file("a.bin").read_bytes() == b"shared"


def test_two_processes_build_it_once(tmp_path):
    log = tmp_path / "builds.log"
    start = time.time() + 1.0
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "cache"), str(log), start)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(log.read_text().splitlines()) == 1


def _hold_lock_and_die(cache: str) -> None:
    art = Artifact(cache, "stage", {"x": 1})
    art.lock().acquire()
    os._exit(1)                                # a crashed holder: no release, no cleanup


def test_a_crashed_holder_does_not_block(tmp_path):
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_hold_lock_and_die, args=(str(tmp_path),))
    p.start()
    p.join(60)
    build, calls = _writer(b"x")
    art = Artifact(tmp_path, "stage", {"x": 1})
    lock = art.lock()
    lock.acquire(timeout=5)                    # the OS released the dead process's lock
    lock.release()
    art.ensure(build)
    assert len(calls) == 1


def test_unreadable_or_misplaced_files_are_rebuilt(tmp_path, monkeypatch, caplog):
    build, calls = _writer(b"x")
    art = Artifact(tmp_path, "stage", {"x": 1}).ensure(build)
    real = cache_mod.file_sha256

    def unreadable(path):
        if Path(path).name == "a.bin":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(cache_mod, "file_sha256", unreadable)
    assert not Artifact(tmp_path, "stage", {"x": 1}).verify()
    assert "a.bin is unreadable (Permission denied)" in caplog.text
    monkeypatch.setattr(cache_mod, "file_sha256", real)
    shutil.rmtree(art.path)
    art.path.write_text("a file where the artifact's directory belongs")
    Artifact(tmp_path, "stage", {"x": 1}).ensure(build)
    assert len(calls) == 2 and art.file("a.bin").read_bytes() == b"x"


def test_a_killed_builders_staging_dir_is_cleaned(tmp_path):
    art = Artifact(tmp_path, "stage", {"x": 1})
    stale = art.path.with_name(f".{art.key}.12345.deadbeef.tmp")
    stale.mkdir(parents=True)
    (stale / "half.bin").write_bytes(b"x" * 1000)
    build, _ = _writer(b"x")
    art.ensure(build)
    assert not stale.exists()


def test_a_lock_path_that_is_not_a_file_is_one_clear_error(tmp_path):
    art = Artifact(tmp_path, "stage", {"x": 1})
    (tmp_path / "stage" / f"{art.key}.lock").mkdir(parents=True)
    with pytest.raises(CacheError, match=r"cache lock .*\.lock is not a file"):
        art.ensure(_writer(b"x")[0])
