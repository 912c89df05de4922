"""One process's part of a run that several processes train together (the `distributed` section).

Every process runs `training.execute` on the same config and run folder; the Trainer (through accelerate) makes
them one training: each takes its share of every batch and the gradients are averaged (ddp) or sharded (fsdp,
zero2, zero3). What differs by rank:

- events: rank 0's reach the run (its metrics are the run's); the other ranks keep theirs in memory only;
- the artifact: rank 0 saves it, once all have trained (training.py);
- memory: every rank's peak is gathered into rank 0's summary (`peak_memory`, as `rank<N>_<name>`);
- stopping: a stop asked of any rank is agreed on at each step's end (`SyncedStop`), so all stop at one step.

Started from a notebook, the processes are forks of the kernel (`distributed_launch.py`) and `on_rank` sends
rank 0's events back to it. Started by `accelerate launch` (`nbtune run CONFIG --launch`), each runs `main`:
rank 0 trains through the runner as `nbtune run` does (store, claim, events, summary) and tells the others
which run folder to train into. Imported only in a process that trains (it loads transformers).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from nbtune import noise, training
from nbtune.config import TuneConfig
from nbtune.events import Event, EventStream
from nbtune.records import RunSummary


class RankStream(EventStream):
    """One process's events: kept in memory (training's summary reads them back) and, given `send`, each also
    handed to it (rank 0 of a notebook launch: to the kernel, which emits it into the run's own stream)."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None] | None = None):
        super().__init__()
        self._send = send

    def emit(self, kind: str, **data: Any) -> Event:
        event = super().emit(kind, **data)
        if self._send is not None:
            self._send(("event", event.kind, event.data))
        return event


class SyncedStop(TrainerCallback):
    """Stops every process at the same step: at each step's end the processes agree (an all-reduce of one flag)
    whether any was asked to stop (`requested`), and then all set `stop`, which training reads."""

    def __init__(self, requested: Any, stop: threading.Event):
        self.requested = requested  # anything with is_set(): the run's stop, or the kernel's flag across a fork
        self.stop = stop

    def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.requested.is_set() else 0.0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            self.stop.set()
            control.should_training_stop = True


def rank() -> int:
    """This process's rank among all the run's processes (0 trains for the record)."""
    return int(os.environ.get("RANK", "0"))


def train_here(config: TuneConfig, run_dir: Path, events: EventStream, requested: Any,
               resume_from: Path | None = None, extra_callbacks: list[Any] | None = None) -> RunSummary:
    """This process's part of the run: `training.execute` with the stop agreed between the processes; on rank 0
    the summary carries every rank's memory (peak_memory's `rank<N>_...` entries)."""
    stop = threading.Event()
    summary = training.execute(config, run_dir, events, stop, resume_from,
                               extra_callbacks=[SyncedStop(requested, stop), *(extra_callbacks or [])])
    for index, memory in enumerate(_from_every_rank(training.memory_now())):
        summary.peak_memory.update({f"rank{index}_{name}": value for name, value in memory.items()})
    return summary


def _from_every_rank(value: Any) -> list[Any]:
    """`value` of each process, by rank (a collective: every process calls it)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def on_rank(config: TuneConfig, run_dir: Path, resume_from: Path | None, extra_callbacks: list[Any],
            wire: Any) -> None:
    """What each process of a notebook launch runs (a fork of the kernel): its part of the run, rank 0's events
    and summary sent back through `wire` (distributed_launch.Wire), and any rank's failure."""
    me = rank()
    _output_to(run_dir / "log.txt")
    send = wire.sender(me)
    events = RankStream(send if me == 0 else None)
    try:
        # the kernel's capture of this thread was copied by the fork: rank 0's library messages become its events
        with noise.captured(run_dir / "log.txt", events if me == 0 else None):
            summary = train_here(config, run_dir, events, wire.stop_requested, resume_from, extra_callbacks)
        if me == 0:
            send(("summary", summary.to_dict()))
    except BaseException as err:
        err.add_note(f"on rank {me} of {os.environ.get('WORLD_SIZE')}:\n{traceback.format_exc()[-3000:]}")
        send(("error", me, _sendable(err)))
        raise


def _output_to(log: Path) -> None:
    """This process's own output (torch's C++ warnings, prints) appended to the run's log, not to the kernel's
    cell: file descriptors 1 and 2 become the log, and sys.stdout/stderr write to them (a kernel's streams
    would send to a thread the fork did not copy)."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for number in (1, 2):
        os.dup2(fd, number)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115


def _sendable(err: BaseException) -> BaseException:
    """`err` if it survives pickling (its type, message and attributes such as the step reached), else a
    RuntimeError with its words."""
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        plain = RuntimeError(f"{type(err).__name__}: {err}")
        for note in getattr(err, "__notes__", []):
            plain.add_note(note)
        return plain


def main(argv: list[str] | None = None) -> int:
    """`accelerate launch ... -m nbtune.distributed_worker CONFIG [--store DIR] [--force]`: every process trains
    its part; rank 0 through the runner (the run folder, events and summary of `nbtune run`), which it names to
    the others. Returns the exit code: 0 when the run finished (or was served from the store)."""
    parser = argparse.ArgumentParser(prog="nbtune.distributed_worker",
                                     description="one process of `nbtune run CONFIG --launch`")
    parser.add_argument("config", help="the YAML config, the same file on every node")
    parser.add_argument("--store", help="run store folder (default: $NBTUNE_HOME or ./.nbtune)")
    parser.add_argument("--force", action="store_true", help="train even if an identical finished run is stored")
    args = parser.parse_args(argv)
    from nbtune import cli

    config = cli.load_config(args.config)
    handshake = _join(config)
    return _lead(config, args, handshake) if rank() == 0 else _follow(config, handshake)


def _lead(config: TuneConfig, args: argparse.Namespace, handshake: Any) -> int:
    """Rank 0: the run as `nbtune run` trains it (served from the store when it is there), its folder told to
    the other processes before it trains."""
    import torch.distributed as dist

    from nbtune import runner

    folder: list[Any] = [None]  # None: nothing to train (served from the store, trained elsewhere, failed)
    try:
        run = runner.launch(config, store=args.store, force=args.force)
        if run in runner.active_runs():
            folder = [str(run.path)]
    finally:
        dist.broadcast_object_list(folder, src=0, group=handshake)
    try:
        run.wait()
    except KeyboardInterrupt:  # stops every process at the next step (SyncedStop), keeping a checkpoint
        run.stop()
        run.wait()
    print(f"run {run.id}: {run.status}{' (from the store)' if run.cached else ''} -> {run.path}")
    if run.error:
        print(f"  error {run.error}")
    return 0 if run.status == "finished" else 1


def _follow(config: TuneConfig, handshake: Any) -> int:
    """Another rank: its part of the run rank 0 names, its library messages in the run's log.txt."""
    import torch.distributed as dist

    folder: list[Any] = [None]
    dist.broadcast_object_list(folder, src=0, group=handshake)
    if folder[0] is not None:
        run_dir = Path(folder[0])
        with noise.captured(run_dir / "log.txt"):
            train_here(config, run_dir, RankStream(), threading.Event())
    return 0


def _join(config: TuneConfig) -> Any:
    """Join the launched processes' process group (as the Trainer would), after checking that the launcher
    started as many as the config's distributed section says; returns a group of their own for telling the run
    folder (rank 0's training thread may already use the default group)."""
    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.utils import is_cuda_available

    from nbtune import distributed

    started, wanted = int(os.environ.get("WORLD_SIZE", "1")), distributed.world_size(config)
    if started != wanted:
        raise SystemExit(f"nbtune: the launcher started {started} processes, and distributed.processes x "
                         f"distributed.nodes is {wanted} (strategy {config.distributed.strategy}); launch the "
                         "command `nbtune run CONFIG --launch` prints, with its config file")
    PartialState(cpu=not is_cuda_available())
    return dist.new_group(backend="gloo")


if __name__ == "__main__":
    sys.exit(main())
