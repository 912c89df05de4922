"""Faults end cleanly (issue 11, problems 3 and 10): a full disk at any write of a run fails it with "no space
left on <path>" without hanging, keeps the previous checkpoint and removes what was half-written; a launch of
a config that is already queued or training, in this kernel or another process, attaches to that run."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

import nbtune
from nbtune import claims
from nbtune.events import EventStream
from nbtune.store import RunStore, cache_key

ROWS = [{"q": f"Q: what is {i} plus {j}?\nA:", "a": f" {i + j}"} for i in range(20) for j in range(10)]


def tiny_config(seed: int, **training: Any) -> nbtune.TuneConfig:
    return nbtune.TuneConfig(
        data={"source": ROWS, "prompt_template": "{q}", "target_column": "a", "eval_split": 0.1},
        training={"max_steps": 4, "eval_every": None, "log_every": 1, "micro_batch_size": 8, "seed": seed,
                  **training},
        method="lora")


class FullDisk:
    """A fault-injecting file layer: once full, every write to a path that `where` picks raises
    OSError(ENOSPC), through Python's files (events, summary, JSON configs, model cards) and torch.save
    (optimizer, scheduler and RNG state); a torch.save leaves a torn file behind, as a real full disk does.
    Closing a Python file whose write failed raises again (its buffer cannot be flushed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, where: Callable[[str], bool], full: bool = False):
        self.where, self.full, self.refused = where, full, []
        real_open, real_save = builtins.open, torch.save

        def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            f = real_open(file, mode, *args, **kwargs)
            path = _path_of(file)
            return _FillingFile(f, self, path) if set(mode) & set("wax+") and path and where(path) else f

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            path = _path_of(f)
            if self.full and path and where(path):
                Path(path).write_bytes(b"\0" * 64)
                self.refuse(path)
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)  # os.fdopen, as write_atomic uses it, opens through io.open
        monkeypatch.setattr(torch, "save", save)

    def refuse(self, path: str) -> None:
        self.refused.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")


def _path_of(file: Any) -> str | None:
    if isinstance(file, int):  # a descriptor (tempfile.mkstemp + os.fdopen): its path on Linux
        try:
            return os.readlink(f"/proc/self/fd/{file}")
        except OSError:
            return None
    return os.fspath(file) if isinstance(file, (str, os.PathLike)) else None


class _FillingFile:
    def __init__(self, file: Any, disk: FullDisk, path: str):
        self._file, self._disk, self._path, self._torn = file, disk, path, False

    def write(self, data: Any) -> int:
        if self._disk.full:
            self._torn = True
            self._disk.refuse(self._path)
        return self._file.write(data)

    def close(self) -> None:
        self._file.close()
        if self._torn:
            self._disk.refuse(self._path)

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


class AtStep(TrainerCallback):
    def __init__(self, step: int, action: Callable[[], Any]):
        self.step, self.action = step, action

    def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
        if state.global_step == self.step:
            self.action()


def leftovers(run_dir: Path) -> list[str]:
    """Half-written files a failed run must not leave: *.partial, temporary files, incomplete checkpoints."""
    found = [p for p in run_dir.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    found += [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if not (p / "trainer_state.json").exists()]
    return sorted(str(p.relative_to(run_dir)) for p in found)


def ends_failed_for_lack_of_space(run: nbtune.Run, on: str) -> None:
    assert run.wait(timeout=120).done, "the run hangs"
    assert run.status == "failed"
    assert "no space left on" in run.error and on in run.error, run.error
    assert run.events.history[-1].kind == "failed" and "no space left" in run.events.history[-1].data["error"]
    assert leftovers(run.path) == []
    assert nbtune.runner.active_runs() == [] or run not in nbtune.runner.active_runs()


def checkpoint_steps(run: nbtune.Run) -> list[int]:
    folder = run.path / "checkpoints"
    return sorted(json.loads((p / "trainer_state.json").read_text())["global_step"] for p in folder.iterdir())


def test_a_full_disk_at_the_events_file_fails_the_run_without_hanging_and_it_resumes(store, monkeypatch):
    disk = FullDisk(monkeypatch, lambda path: path.endswith("events.jsonl"))
    run = nbtune.launch(tiny_config(1, max_steps=6, checkpoint_every=2), store=store,
                        callbacks=[AtStep(3, lambda: setattr(disk, "full", True))])
    ends_failed_for_lack_of_space(run, "events.jsonl")
    assert disk.refused and run.summary.step == 3
    assert checkpoint_steps(run) == [2] and "checkpoint-2" in run.error  # the previous checkpoint is kept
    disk.full = False
    resumed = nbtune.resume(run, store=store)
    assert resumed.wait(timeout=120).status == "finished", resumed.error
    assert [e.data["step"] for e in resumed.events.history if e.kind == "step"] == [3, 4, 5, 6]


def test_a_full_disk_while_checkpointing_removes_the_torn_checkpoint_and_keeps_the_previous_one(store, monkeypatch):
    disk = FullDisk(monkeypatch, lambda path: "/checkpoints/checkpoint-" in path)
    run = nbtune.launch(tiny_config(2, max_steps=6, checkpoint_every=2), store=store,
                        callbacks=[AtStep(3, lambda: setattr(disk, "full", True))])
    ends_failed_for_lack_of_space(run, "checkpoint-4")
    assert any("checkpoint-4" in path for path in disk.refused)
    assert checkpoint_steps(run) == [2] and run.summary.checkpoint.endswith("checkpoint-2")
    disk.full = False
    resumed = nbtune.resume(run, store=store)
    assert resumed.wait(timeout=120).status == "finished", resumed.error


def test_a_full_disk_while_saving_the_artifact_leaves_no_partial_artifact(store, monkeypatch):
    disk = FullDisk(monkeypatch, lambda path: "artifact.partial" in path, full=True)
    run = nbtune.launch(tiny_config(3, checkpoint_every=2), store=store)
    ends_failed_for_lack_of_space(run, "artifact")
    assert disk.refused and not (run.path / "artifact").exists()
    assert checkpoint_steps(run) == [4]  # the last checkpoint is intact
    assert store.find_finished(run.record.meta["key"]) is None


def test_a_full_disk_at_the_summary_fails_the_run_in_memory_and_it_is_never_served(store, monkeypatch):
    disk = FullDisk(monkeypatch, lambda path: "summary.json" in path, full=True)
    run = nbtune.launch(tiny_config(4), store=store)
    ends_failed_for_lack_of_space(run, "summary.json")
    assert disk.refused and not (run.path / "summary.json").exists()
    assert json.loads((run.path / "meta.json").read_text())["state"] == "failed"
    assert store.get(run.id).state == "failed"
    assert store.find_finished(run.record.meta["key"]) is None


def test_a_launch_on_a_full_disk_says_so_and_leaves_no_claim(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "store")
    FullDisk(monkeypatch, lambda path: path.startswith(str(tmp_path.resolve())), full=True)
    config = tiny_config(11)
    with pytest.raises(OSError, match="^no space left on .*runs$"):
        nbtune.launch(config, store=store)
    free = claims.claim(store.root, cache_key(config).key)
    assert free is not None  # the next launch, with space again, trains
    free.release()


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A real 2 MiB filesystem (tmpfs), where this machine lets the tests mount one."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs Linux")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Fill the filesystem of `folder` until a write fails."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # unbuffered: nothing left to flush at close
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_really_full_disk_fails_the_run_cleanly_and_it_resumes_once_space_is_freed(small_disk):
    store = RunStore(small_disk / "store")
    filler: list[Path] = []
    run = nbtune.launch(tiny_config(5, max_steps=6, checkpoint_every=2), store=store,
                        callbacks=[AtStep(3, lambda: filler.append(fill(small_disk)))])
    ends_failed_for_lack_of_space(run, str(small_disk))
    assert filler and (run.path / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists()
    filler[0].unlink()
    resumed = nbtune.resume(run, store=store)
    assert resumed.wait(timeout=120).status == "finished", resumed.error


def test_two_threads_launching_one_config_train_it_once(store):
    config, barrier, handles = tiny_config(6, max_steps=2), threading.Barrier(2), []

    def launch() -> None:
        barrier.wait()
        handles.append(nbtune.launch(config, store=store))

    threads = [threading.Thread(target=launch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    first, second = handles
    assert first.id == second.id
    assert first.wait(timeout=120).status == "finished" and second.wait(timeout=120).status == "finished"
    assert second.summary.final_train_loss == first.summary.final_train_loss
    key = cache_key(config).key
    assert [r.id for r in store.list() if r.meta["key"] == key] == [first.id]
    assert not (store.root / "claims" / f"{key}.lock").exists()  # released when the run ended


def test_a_launch_of_a_queued_config_attaches_to_it(store):
    training = nbtune.launch(tiny_config(7, max_steps=2), store=store)
    queued = nbtune.launch(tiny_config(8, max_steps=2), store=store)
    again = nbtune.launch(tiny_config(8, max_steps=2), store=store)
    assert again is queued and not again.cached
    assert again.wait(timeout=120).status == "finished" and training.status == "finished"


def test_a_claim_left_by_a_dead_process_is_taken_over(store):
    config = tiny_config(9, max_steps=1)
    key = cache_key(config).key
    stale = store.root / "claims" / f"{key}.lock"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("20261201-000000-lora-dead")  # a killed process's claim: named, but no lock holds it
    run = nbtune.launch(config, store=store)
    assert run.id != "20261201-000000-lora-dead"
    assert run.wait(timeout=120).status == "finished", run.error
    free = claims.claim(store.root, key)
    assert free is not None  # released when the run ended
    free.release()


HOLDER = """
import sys, time
from pathlib import Path
from nbtune import claims
claims.claim(Path(sys.argv[1]), "k").name("run-of-the-other-process")
print("held", flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(claims.fcntl is None, reason="claims across processes need flock (not on Windows)")
def test_a_claim_is_held_while_its_process_lives_and_taken_over_once_it_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert claims.claim(tmp_path, "k") is None
        assert claims.claimant(tmp_path, "k") == "run-of-the-other-process"
    finally:
        holder.kill()
        holder.wait()
    taken = claims.claim(tmp_path, "k")
    assert taken is not None
    taken.name("run-of-this-process")
    assert claims.claimant(tmp_path, "k") == "run-of-this-process"
    taken.release()
    assert not (tmp_path / "claims" / "k.lock").exists() and claims.claimant(tmp_path, "k") is None


ANOTHER_KERNEL = """
import sys, time
import nbtune
from transformers import TrainerCallback

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        time.sleep(0.5)

run = nbtune.launch(nbtune.TuneConfig.from_yaml(sys.argv[2]), store=sys.argv[1], callbacks=[Slow()])
print(run.id, flush=True)
print(run.wait().status, flush=True)
"""


@pytest.mark.slow  # a second process imports torch and trains
@pytest.mark.skipif(claims.fcntl is None, reason="claims across processes need flock (not on Windows)")
def test_a_launch_of_a_config_another_process_is_training_attaches_to_that_run(store, tmp_path):
    rows_path = tmp_path / "rows.jsonl"  # config.yaml names in-memory rows without them: both read a file
    rows_path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    config = tiny_config(10, max_steps=6).replace(**{"data.source": str(rows_path)})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config.to_yaml())
    child = subprocess.Popen([sys.executable, "-c", ANOTHER_KERNEL, str(store.root), str(config_path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        child_id = child.stdout.readline().strip()
        deadline = time.time() + 120
        while time.time() < deadline and not any(
                e.kind == "step" for e in EventStream.read(store.runs_dir / child_id / "events.jsonl")):
            time.sleep(0.1)
        run = nbtune.launch(config, store=store)
        assert run.id == child_id and not run.cached and run.status == "running"
        assert run.wait(timeout=120).status == "finished"
        assert child.stdout.readline().strip() == "finished"
    finally:
        child.kill()
        child.wait()
    key = cache_key(config).key
    assert [r.id for r in store.list() if r.meta["key"] == key] == [child_id]
    assert run.summary.step == 6 and [e.kind for e in run.events.history][-1] == "finished"
