"""Training a run on several processes from the notebook: accelerate's `notebook_launcher`, from the runner's
background thread.

`execute` is what the runner calls for every run: one process trains in this one (`training.execute`); a
process started by a launcher trains its part (`distributed_worker.train_here`); a config whose distributed
section asks for several processes on this machine forks them here, each a copy of the kernel that trains its
part (`distributed_worker.on_rank`). Rank 0's events come back through a pipe and are emitted into the run's own
stream, so the charts and the store see one run; its summary comes back the same way, with every rank's peak
memory; a stop of the run reaches every process. What cannot fork says so before anything trains: CUDA already
initialised in this kernel, several nodes, a platform without fork, a strategy this machine cannot run.

Importing this module imports neither torch nor transformers: `nbtune.training` loads bitsandbytes, whose import
initialises CUDA on a GPU machine, after which the processes could not be forked. Other names (StopRequested,
failure_summary, ...) are nbtune.training's, imported when first used.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait as wait_for_data
from pathlib import Path
from typing import Any

from nbtune import distributed
from nbtune.config import TuneConfig
from nbtune.events import EventStream
from nbtune.records import RunSummary


class CannotLaunch(RuntimeError):
    """The processes a config asks for cannot be started from here; the message says what to do instead."""


def __getattr__(name: str) -> Any:
    """nbtune.training's names (StopRequested, failure_summary, ...), imported on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module("nbtune.training"), name)


def execute(config: TuneConfig, run_dir: Path, events: EventStream, stop: threading.Event | None = None,
            resume_from: Path | None = None, extra_callbacks: list[Any] | None = None) -> RunSummary:
    """Train `config` as `training.execute` does, on as many processes as its distributed section asks."""
    stop = stop or threading.Event()
    if distributed.launched():  # one of several processes a launcher started: this one's part
        from nbtune import distributed_worker

        return distributed_worker.train_here(config, run_dir, events, stop, resume_from, extra_callbacks)
    if distributed.world_size(config) == 1:
        from nbtune import training

        return training.execute(config, run_dir, events, stop, resume_from, extra_callbacks=extra_callbacks)
    return launch_here(config, run_dir, events, stop, resume_from, extra_callbacks or [])


def launch_here(config: TuneConfig, run_dir: Path, events: EventStream, stop: threading.Event,
                resume_from: Path | None, extra_callbacks: list[Any]) -> RunSummary:
    """Fork distributed.processes copies of this process through accelerate's notebook_launcher, each training
    its part; returns rank 0's summary. Raises the first error a process met when training failed."""
    check_can_launch(config)
    from accelerate import notebook_launcher
    from accelerate.state import AcceleratorState

    processes = config.distributed.processes
    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier run's state would stop the launcher
    events.emit("message", source="nbtune", level="INFO", text=(
        f"training on {processes} processes of this machine (distributed.strategy {config.distributed.strategy})"))
    wire = Wire(processes)
    relay = threading.Thread(target=wire.relay, args=(events, stop), name="nbtune-distributed-relay", daemon=True)
    relay.start()
    failure: BaseException | None = None
    try:
        with _launcher_library_check_off(), _gloo_on_loopback(), _no_collection_across_the_fork():
            notebook_launcher(_on_rank, args=(config, run_dir, resume_from, extra_callbacks, wire),
                              num_processes=processes, use_port=str(free_port()))
    except Exception as err:  # a process failed: its own error (below) says more than the launcher's
        failure = err
    finally:
        wire.done.set()
        relay.join()
    return wire.outcome(failure)


def _on_rank(*args: Any) -> None:
    """In each forked process: import what trains (here it would initialise CUDA before the fork), train."""
    from nbtune import distributed_worker

    gc.freeze()  # what the kernel left for its collector stays uncollected here: see _no_collection_across_the_fork
    gc.enable()

    distributed_worker.on_rank(*args)


def check_can_launch(config: TuneConfig) -> None:
    """Raise CannotLaunch, saying what to do, where this kernel cannot fork the processes `config` asks for."""
    import multiprocessing

    d = config.distributed
    if d.nodes > 1:
        raise CannotLaunch(f"distributed.nodes is {d.nodes}: a notebook starts processes on its own machine only; "
                           "train on several nodes with `nbtune run CONFIG --launch` (it prints the command each "
                           "node runs)")
    if "fork" not in multiprocessing.get_all_start_methods():
        raise CannotLaunch(f"this platform ({sys.platform}) cannot fork processes, which training on "
                           f"{d.processes} processes from a notebook needs; run `nbtune run CONFIG --launch` in a "
                           "terminal instead")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise CannotLaunch(
            "CUDA is already initialised in this kernel (by an earlier run, a model loaded or an import that "
            f"touched the GPU), and the {d.processes} processes of distributed.processes can only be forked "
            "before that: restart the kernel and launch this config before anything uses the GPU, or run "
            "`nbtune run CONFIG --launch` in a terminal")
    if d.strategy in distributed.ZERO_STAGES and importlib.util.find_spec("deepspeed") is None:
        raise CannotLaunch(f"distributed.strategy {d.strategy} is DeepSpeed's, which is not installed here "
                           "(pip install deepspeed)")
    if d.strategy != "ddp":
        from accelerate.utils import is_cuda_available  # asks NVML: CUDA stays uninitialised

        if not is_cuda_available():
            raise CannotLaunch(f"distributed.strategy {d.strategy} shards the model across GPUs, and this machine "
                               "has none (accelerate applies FSDP and DeepSpeed to GPU processes only); use ddp to "
                               "train on several CPU processes")


@contextlib.contextmanager
def _no_collection_across_the_fork() -> Iterator[None]:
    """The kernel's collector off while the processes are forked and run (they inherit it off, then freeze what they
    inherited): a forked process that collects the kernel's garbage runs its finalizers without the threads they
    join. A torch.distributed TCPStore the kernel no longer reached hung both processes, joining its daemon thread,
    in the first gc.collect() (accelerate calls one as training ends)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


@contextlib.contextmanager
def _launcher_library_check_off() -> Iterator[None]:
    """accelerate 1.x's notebook_launcher refuses to fork once bitsandbytes is imported, because that import can
    initialise CUDA; nbtune imports it with peft. What the refusal stands for is checked by `check_can_launch`
    (torch.cuda.is_initialized), so the name check is lifted around the launch."""
    import accelerate.launchers as launchers

    original = launchers.are_libraries_initialized
    launchers.are_libraries_initialized = lambda *names: []
    try:
        yield
    finally:
        launchers.are_libraries_initialized = original


@contextlib.contextmanager
def _gloo_on_loopback() -> Iterator[None]:
    """CPU processes of one machine talk over the loopback interface (gloo otherwise picks the interface of the
    host name, which container and CI hosts do not always route; accelerate's debug_launcher does the same)."""
    import os

    if sys.platform != "linux" or os.environ.get("GLOO_SOCKET_IFNAME"):
        yield
        return
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        yield
    finally:
        os.environ.pop("GLOO_SOCKET_IFNAME", None)


def free_port() -> int:
    """A TCP port free on this machine now, for the processes' rendezvous (another launch may hold 29500)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Wire:
    """Between this process and the forked ones: a pipe per rank (what it sends: rank 0's events and summary, a
    rank's error) and a flag that asks them to stop. Made before the fork, so each process inherits its end."""

    def __init__(self, processes: int):
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self.pipes = [context.Pipe(duplex=False) for _ in range(processes)]  # (reader, writer) per rank
        self.stop_requested = context.Event()
        self.done = threading.Event()  # set here once the processes have ended
        self.summary: RunSummary | None = None
        self.errors: list[BaseException] = []  # as they came: the first is the cause, later ones its echoes
        self.write_error: OSError | None = None

    def sender(self, rank: int) -> Callable[[tuple[Any, ...]], None]:
        """In process `rank`: send one message to the kernel."""
        return self.pipes[rank][1].send

    def relay(self, events: EventStream, stop: threading.Event) -> None:
        """Here, on a thread of its own until the processes end: emit rank 0's events into the run's stream,
        keep the summary and errors, and pass a stop of the run on to the processes."""
        readers = [reader for reader, _ in self.pipes]
        while True:
            if stop.is_set():
                self.stop_requested.set()
            ready = wait_for_data(readers, timeout=0.2)
            if not ready and self.done.is_set():
                return
            for reader in ready:
                try:
                    message = reader.recv()
                except Exception:  # its process ended, or was killed mid-message: nothing more comes from it
                    readers.remove(reader)
                    continue
                self._receive(message, events)

    def _receive(self, message: tuple[Any, ...], events: EventStream) -> None:
        if message[0] == "event":
            try:
                events.emit(message[1], **message[2])
            except OSError as err:  # the run's events file (a full disk): failed as a one-process run would be
                self.write_error = self.write_error or err
        elif message[0] == "summary":
            self.summary = RunSummary.from_dict(message[1])
        elif message[0] == "error":
            self.errors.append(message[2])

    def outcome(self, failure: BaseException | None) -> RunSummary:
        """Rank 0's summary, or the error to record: the first a process sent (the others that fail then fail
        for it: their peer is gone), else the launcher's."""
        if self.errors:
            raise self.errors[0] from failure
        if failure is not None:
            raise RuntimeError(f"the launched processes failed without saying why: {failure}") from failure
        if self.write_error is not None:
            raise self.write_error
        if self.summary is None:
            raise RuntimeError("the launched processes ended without rank 0's summary")
        return self.summary
