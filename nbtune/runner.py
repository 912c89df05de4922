"""Runs inside the notebook kernel: `launch` returns a `Run` at once and trains on a background thread.

One run trains at a time per process (one device): a second launch while one trains is queued, visible as
state "queued", and starts when the first ends. A finished run with the same cache key is served from the
store at once, without importing torch, unless `force=True`; a launch of a config that is queued or training,
in this kernel or in another process on the same store, attaches to that run (nbtune/claims.py). The
kernel's interrupt button does not reach the training thread; `Run.stop()` does (and `train()` turns an
interrupt into a stop). Outside a kernel (a plain script) the interpreter waits at exit for the runs to end,
and Ctrl-C stops them. A run always ends, whatever fails while it records its end (a full disk): `wait()`
returns and the handle says why.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from nbtune import claims, disk
from nbtune.config import TuneConfig
from nbtune.events import TERMINAL, Event, EventStream, standing
from nbtune.records import RunSummary
from nbtune.store import RunRecord, RunStore, cache_key, write_atomic

log = logging.getLogger("nbtune")


class Run:
    """A handle on one run: live while it trains, and the same API for a run read back from the store."""

    def __init__(self, record: RunRecord, config: TuneConfig, events: EventStream, cached: bool = False):
        self.record = record
        self.config = config
        self.events = events
        self.cached = cached
        self._stop = threading.Event()
        self._done = threading.Event()
        self._resume_from: Path | None = None
        self._model: Any = None
        self._live = False  # True while this process trains (or has queued) it
        self._claim: claims.Claim | None = None  # the lock on its cache key, held while queued or training
        self._summary: RunSummary | None = None  # how it ended, also when summary.json could not be written
        self.extra_callbacks: list[Any] = []  # extra TrainerCallbacks (fault injection in tests, custom hooks)
        if record.summary is not None:
            self._done.set()

    def __repr__(self) -> str:
        return f"<nbtune.Run {self.id} {self.status}>"

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def path(self) -> Path:
        return self.record.path

    @property
    def status(self) -> str:
        """queued, running, finished, stopped, failed or interrupted."""
        if self._summary is not None and self.record.summary is None:
            return self._summary.state
        return self.record.state

    @property
    def summary(self) -> RunSummary | None:
        summary = self.record.summary
        return summary if summary is not None else self._summary

    @property
    def error(self) -> str | None:
        summary = self.summary
        return summary.error if summary is not None else None

    @property
    def artifact_path(self) -> Path:
        return self.record.artifact_path

    @property
    def resumable(self) -> bool:
        """Whether `nbtune.resume` continues it from where it was: stopped or interrupted, or failed after
        leaving a checkpoint (a failed run without one would start again from step 0)."""
        status = self.status
        if status == "failed":
            return self.record.latest_checkpoint() is not None
        return status in ("stopped", "interrupted")

    @property
    def metrics(self) -> Any:
        """Step and eval metrics as a pandas DataFrame (one row per event, `kind` says which); the steps a
        recovery trained again (training.on_oom shrink) appear once, as trained the last time."""
        import pandas as pd

        rows = []
        for e in standing(list(self.events.history)):
            if e.kind in ("step", "eval"):
                row = {"kind": e.kind, "time": e.time}
                for k, v in e.data.items():
                    if k == "memory" and isinstance(v, dict):
                        row.update({f"memory_{name}": value for name, value in v.items()})
                    else:
                        row[k] = v
                rows.append(row)
        return pd.DataFrame(rows)

    @property
    def model(self) -> Any:
        """The trained model, loaded from the artifact on first use (see `load_model`)."""
        return self.load_model()

    def load_model(self, trust_remote_code: bool = False) -> Any:
        """The trained model, loaded once. An imported run whose config sets model.trust_remote_code is refused
        (`RemoteCodeRefused`, naming the model) unless `trust_remote_code=True`: its archive chose that code."""
        if self._model is None:
            if not self.artifact_path.exists():
                raise RuntimeError(f"run {self.id} has no artifact (state {self.status})")
            from nbtune import noise
            from nbtune.training import load_trained_model

            with noise.captured(self.record.log_path):  # the libraries' load reports go to the run's log.txt
                self._model = load_trained_model(self, trust_remote_code=trust_remote_code)
        return self._model

    def generate(self, prompts: str | Sequence[str], **settings: Any) -> list[str]:
        """The trained model's answers to `prompts` (the answer only, not the prompt), one per prompt.

        Settings, with their defaults in nbtune.generation.GenerationSettings: max_new_tokens, do_sample,
        temperature, top_k, top_p, num_beams, seed, chat_template (the tokenizer's template when it has one,
        unless False). Greedy by default, sampling with do_sample=True, beam search with num_beams > 1; the same
        seed gives the same answers. A bad setting fails before the model loads. Classification runs: `predict`.
        """
        from nbtune import generation

        return generation.generate(self, prompts, **settings)

    def draw(self, prompts: str | Sequence[str], seed: int = 0) -> list[Any]:
        """A text-to-image run's image (PIL) for each prompt, the i-th from seed `seed + i`, with the sampling
        its evaluations use (nbtune.generation.SAMPLING)."""
        from nbtune import generation

        return generation.draw(self, prompts, seed)

    def predict(self, texts: str | Sequence[str]) -> list[str]:
        """A classification run's label name for each text (the model input, as in training)."""
        from nbtune import generation

        return generation.predict(self, texts)

    def merge(self, directory: str | Path) -> Path:
        """Write the trained model, with its tokenizer, as one folder that loads without nbtune:
        `AutoModelForCausalLM.from_pretrained(directory)` (or the task's auto class).

        LoRA, DoRA, IA3, AdaLoRA and QLoRA are folded into the base weights (QLoRA's onto the full-precision
        base); full-model methods are written as they are; bottleneck adapters cannot be folded (their
        non-linearity sits inside), so the folder carries them with their modeling file: load it with
        `trust_remote_code=True`. Prompt-learning methods are refused: their artifact is the portable form.
        """
        from nbtune.methods.artifacts import export_merged
        from nbtune.store import check_remote_code

        check_remote_code(self.record, self.config)  # merging loads the model: an imported run's code is refused
        return export_merged(self, directory)

    def stop(self) -> None:
        """Stop at the next step boundary, keeping what was learned (state "stopped", with a checkpoint).

        Safe to call at any time and more than once; a queued run ends without training.
        """
        self._stop.set()

    def wait(self, timeout: float | None = None) -> Run:
        """Block until the run ends (or `timeout` seconds pass); returns the run.

        A run trained by another kernel is followed through the store.
        """
        if self._live or self._done.is_set():
            self._done.wait(timeout)
            return self
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.record.state in ("running", "queued") and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.5)
        if self.record.state not in ("running", "queued"):
            self.events = EventStream(history=EventStream.read(self.record.events_path))  # all of them now
            self._done.set()
        return self

    @property
    def done(self) -> bool:
        return self._done.is_set() or (not self._live and self.record.state not in ("running", "queued"))

    def subscribe(self, callback: Callable[[Event], Any], replay: bool = True) -> Callable[[], None]:
        """Call `callback(event)` on every event, the past ones first; returns a function that unsubscribes."""
        return self.events.subscribe(callback, replay=replay)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)


class _Device:
    """The one worker thread that trains queued runs in order."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Run] = queue.Queue()
        self.current: Run | None = None
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.unfinished = 0  # runs submitted and not yet ended

    def ahead(self) -> int:
        """How many runs a run submitted now waits for (0: it starts at once)."""
        with self.lock:
            return self.unfinished

    def submit(self, run: Run) -> None:
        with self.lock:
            self.unfinished += 1
            self.queue.put(run)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._work, name="nbtune-training", daemon=True)
                self.thread.start()

    def _work(self) -> None:
        while True:
            try:
                run = self.queue.get(timeout=1.0)
            except queue.Empty:
                with self.lock:
                    if self.queue.empty():
                        self.thread = None
                        return
                continue
            self.current = run
            try:
                _train(run)
            finally:
                self.current = None
                with self.lock:
                    self.unfinished -= 1
                _end(run)  # after the counts: a launch woken by this run's end finds the worker free


_DEVICE = _Device()


_ACTIVE: dict[str, Run] = {}  # runs queued or training in this process, by id
# A forked process (a distributed launch's, nbtune/distributed_launch.py) trains none of them; without this its
# exit would wait for them (_finish_runs_at_exit).
if hasattr(os, "register_at_fork"):  # not on Windows, which cannot fork
    os.register_at_fork(after_in_child=_ACTIVE.clear)


def active_runs() -> list[Run]:
    """The runs this process has queued or is training, oldest first."""
    return list(_ACTIVE.values())


def _train(run: Run) -> None:
    """Train one run on this thread and record how it ended; never raises (the worker then ends the run).

    What the libraries log or warn on this thread meanwhile goes to the run's log.txt and events, not stderr.
    """
    from nbtune import noise

    try:
        with noise.captured(run.record.log_path, run.events):
            summary = _execute(run)
            gc.collect()  # the model, optimizer and data are unreachable now; free them before the next run
            _empty_cuda_cache()
            summary.cache = summary.cache or run.record.cache_key
            _record_end(run, summary)
    except BaseException:  # never expected: still end the run, never hang a waiter
        log.exception("nbtune: could not record the end of run %s", run.id)


def _record_end(run: Run, summary: RunSummary) -> None:
    """Write the summary and the final state, then announce the end. A summary that cannot be written (a full
    disk) fails the run, kept in memory: a run folder never reads as finished without its summary."""
    record = run.record
    try:
        with disk.writing(record.path / "summary.json"):
            write_atomic(record.path / "summary.json", summary.to_json())
    except OSError as err:
        _not_saved(summary, err)
        log.warning("nbtune: run %s failed: %s", run.id, summary.error)
    run._summary = summary
    try:
        with disk.writing(record.path / "meta.json"):
            record.update_meta(state=summary.state, ended=time.time())
    except OSError as err:
        log.warning("nbtune: could not record the end of run %s (%s)", run.id, err)
    kind = summary.state if summary.state in TERMINAL else "failed"
    try:
        run.events.emit(kind, **{k: getattr(summary, k) for k in
                                 ("step", "error", "reason", "checkpoint", "final_eval_loss", "wall_time_s")})
    except OSError as err:  # in the history and with the subscribers all the same; only the file missed it
        log.warning("nbtune: run %s: %s", run.id, err)


def _not_saved(summary: RunSummary, err: OSError) -> None:
    """The summary could not be written: the run has failed, for its first reason if it had one."""
    if summary.state == "failed":
        summary.error = f"{summary.error}; its summary could not be saved either ({err})"
    else:
        summary.state, summary.error_type = "failed", type(err).__name__
        summary.error = f"{err}; its summary could not be saved"
    summary.reason = summary.error


def _end(run: Run) -> None:
    """Close the events, release the cache key's claim, wake every waiter; each step even if one fails."""
    try:
        run.events.close()
    finally:
        _ACTIVE.pop(run.id, None)
        try:
            if run._claim is not None:
                run._claim.release()
        except OSError as err:
            log.warning("nbtune: could not release the claim of run %s (%s)", run.id, err)
        finally:
            run._done.set()


def _execute(run: Run) -> RunSummary:
    """Train and return the summary, whatever happens: stopped, finished, or failed with the reason."""
    record = run.record
    try:
        # nbtune.training's names; its execute trains on the processes the distributed section asks for
        from nbtune import distributed_launch as training

        if run.events.write_error is not None:  # its "queued" event met a full disk already
            raise run.events.write_error
        with disk.writing(record.path / "meta.json"):
            record.update_meta(state="running", started=time.time())
        try:
            if run._stop.is_set():
                raise training.StopRequested
            summary = training.execute(run.config, record.path, run.events, run._stop, run._resume_from,
                                       extra_callbacks=run.extra_callbacks)
        except training.StopRequested:
            summary = RunSummary(state="stopped", step=0, method=run.config.method.name)
        if summary.state == "stopped":
            summary.reason = "stopped by Run.stop()" if summary.step else "stopped before the first step"
        return summary
    except BaseException as err:  # any failure ends the run with the reason; the kernel stays usable
        try:
            summary = training.failure_summary(run.config, err, run.events)
        except BaseException as inner:  # even describing the failure failed: keep the original error
            summary = RunSummary(state="failed", step=0, error=f"{type(err).__name__}: {err}",
                                 note=f"failure_summary raised {inner!r}")
        _remove_partial_files(record.path)
        checkpoint = record.latest_checkpoint()
        summary.checkpoint = str(checkpoint) if checkpoint else None
        if checkpoint is not None and (summary.error_type == "LossNotFinite" or disk.is_disk_full(err)):
            summary.error += f"; the last good checkpoint ({checkpoint.name}) is kept"
        summary.reason = summary.error
        log.warning("nbtune: run %s failed: %s", run.id, summary.error)
        return summary


def _remove_partial_files(run_dir: Path) -> None:
    """What a failed run leaves half-written: the artifact being saved, checkpoints without their
    trainer_state.json (written last), temporary files of atomic writes. Frees the space a full disk needs."""
    partial = [run_dir / "artifact.partial", *run_dir.glob(".*.tmp")]
    partial += [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if not (p / "trainer_state.json").exists()]
    for path in partial:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _empty_cuda_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def open_run(record: RunRecord) -> Run:
    """A Run handle for a stored run (no training, no model loading); the live handle if this kernel trains it."""
    active = _ACTIVE.get(record.id)
    if active is not None:
        return active
    events = EventStream(history=EventStream.read(record.events_path))
    return Run(record, record.config, events, cached=True)


def _start(run: Run, **queued: Any) -> Run:
    run._live = True
    _ACTIVE[run.id] = run
    try:
        run.events.emit("queued", position=_DEVICE.ahead(), **queued)
    except OSError as err:  # the worker fails the run for it; launching still returns its handle
        log.warning("nbtune: run %s: %s", run.id, err)
    _DEVICE.submit(run)
    if not _in_kernel():
        _wait_at_exit()
    return run


def _in_kernel() -> bool:
    """Whether this process is a Jupyter kernel, which outlives every cell (IPython is never imported here)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


_EXIT_WAIT: list[bool] = []  # [True] once the exit handler is registered


def _wait_at_exit() -> None:
    if _EXIT_WAIT:
        return
    _EXIT_WAIT.append(True)
    # Importing these registers a thread-exit hook, refused once shutdown begins: the training thread's lazy
    # imports (torch, transformers) would fail while the interpreter waits for it, so they are imported now.
    import concurrent.futures.process  # noqa: F401
    import concurrent.futures.thread  # noqa: F401

    # threading's exit hooks run when the main thread ends, before every atexit handler (those of libraries
    # imported later by the training thread included); concurrent.futures waits for its workers the same way.
    register = getattr(threading, "_register_atexit", atexit.register)
    register(_finish_runs_at_exit)


def _finish_runs_at_exit() -> None:
    """At interpreter exit outside a kernel, let this process's runs end: the training thread is a daemon, so
    without this wait a script's `launch` would die with the process and leave its run interrupted.

    A script ended by Ctrl-C, or Ctrl-C during this wait, stops the runs at their next step boundary instead.
    """
    interrupted = isinstance(getattr(sys, "last_value", None), KeyboardInterrupt)
    while _ACTIVE:
        runs = list(_ACTIVE.values())
        try:
            for run in runs:
                if interrupted:
                    run.stop()
            for run in runs:
                run.wait()
        except KeyboardInterrupt:
            interrupted = True


def launch(config: TuneConfig | dict[str, Any] | str | None = None, store: RunStore | str | Path | None = None,
           force: bool = False, callbacks: list[Any] | None = None) -> Run:
    """Start training `config` on a background thread and return its Run at once.

    A finished run of the same config, data and base model is returned from the store instead (no training,
    no model loading) unless `force=True`; so is the run of that config being queued or trained right now, by
    this kernel or another process on the same store (its `callbacks` are not added). A launch while another
    run trains is queued. `callbacks` are extra transformers TrainerCallbacks for this run (custom hooks, fault
    injection in tests).
    """
    config = _as_config(config)
    store = store if isinstance(store, RunStore) else RunStore(store)
    key = cache_key(config)
    with _LAUNCHING:  # two threads launching one config: the second finds the first's claim
        claim = None
        if not force:
            cached = store.find_finished(key.key)
            if cached is not None:
                return open_run(cached)
            in_flight = _in_flight(store, key.key)
            if in_flight is not None:
                return in_flight
            claim = claims.claim(store.root, key.key)
            if claim is None:
                attached = _attach(store, key.key)
                if attached is not None:
                    return attached
        try:
            with disk.writing(store.runs_dir):
                record = store.create(config, key)
            if claim is not None:
                claim.name(record.id)
        except BaseException:
            if claim is not None:
                claim.release()
            raise
        run = Run(record, config, EventStream(record.events_path))
        run._claim = claim
        run.extra_callbacks = list(callbacks or [])
        return _start(run)


_LAUNCHING = threading.RLock()


def _in_flight(store: RunStore, key: str) -> Run | None:
    """This kernel's run of `key` in `store` that is queued or training and not being stopped."""
    for run in list(_ACTIVE.values()):
        if (run.record.meta.get("key") == key and not run._stop.is_set()
                and run.path.parent.resolve() == store.runs_dir.resolve()):
            return run
    return None


def _attach(store: RunStore, key: str) -> Run | None:
    """The run that holds the claim on `key` (another launch queued or is training it), or None when it
    cannot be followed: gone, ended other than finished, or being stopped in this kernel."""
    run_id = claims.claimant(store.root, key)
    try:
        record = store.get(run_id) if run_id else None
    except KeyError:
        record = None
    if record is None or record.state not in ("queued", "running", "finished"):
        return None
    run = open_run(record)
    if run._stop.is_set():
        return None
    run.cached = run.cached and record.state == "finished"  # attached to a live run: not served from the store
    return run


def resume(run: Run | RunRecord | str, store: RunStore | str | Path | None = None,
           callbacks: list[Any] | None = None) -> Run:
    """Continue a stopped or interrupted run from its last checkpoint, as a new run in the same store.

    The new run records `resumed_from`; its step count continues from the checkpoint's. A run that ended
    before any checkpoint (stopped before the first step, or killed without `training.checkpoint_every`)
    starts again from step 0.
    """
    own_config = run.config if isinstance(run, Run) else None  # holds in-memory rows; config.yaml only names them
    if isinstance(run, Run):
        store = store or RunStore(run.path.parent.parent)
        run = run.record
    store = store if isinstance(store, RunStore) else RunStore(store)
    record = store.get(run) if isinstance(run, str) else run
    if record.state not in ("stopped", "interrupted", "failed"):
        raise ValueError(f"run {record.id} is {record.state}; only stopped, interrupted or failed runs resume")
    checkpoint = record.latest_checkpoint()
    if checkpoint is None:
        log.warning("nbtune: run %s has no checkpoint; its resumption starts from step 0", record.id)
    config = own_config or record.config
    new = store.create(config, record.cache_key)
    new.update_meta(resumed_from=record.id)
    resumed = Run(new, config, EventStream(new.events_path))
    resumed._resume_from = checkpoint
    resumed.extra_callbacks = list(callbacks or [])
    return _start(resumed, resumed_from=record.id, checkpoint=str(checkpoint) if checkpoint else None)


def train(config: TuneConfig | dict[str, Any] | str | None = None, store: RunStore | str | Path | None = None,
          force: bool = False, progress: bool = True) -> Run:
    """Train in the foreground (headless use): launch, show progress, wait; returns the ended Run.

    An interrupt (Ctrl-C, the kernel's stop button) stops the run at the next step boundary and keeps it.
    """
    run = launch(config, store=store, force=force)
    try:
        if progress and not run.done:
            _show_progress(run)
        run.wait()
    except KeyboardInterrupt:
        run.stop()
        run.wait()
    return run


def _show_progress(run: Run) -> None:
    from tqdm.auto import tqdm

    bar = None
    for event in run:
        if event.kind == "started":
            bar = tqdm(total=event.data.get("total_steps"), desc=f"{run.config.method.name}", unit="step")
        elif event.kind == "step" and bar is not None:
            bar.n = event.data["step"]
            loss = event.data.get("loss")
            bar.set_postfix(loss="nan" if loss is None else f"{loss:.4f}")
            bar.refresh()
        elif event.kind == "eval" and bar is not None and event.data.get("loss") is not None:
            bar.set_postfix(eval_loss=f"{event.data['loss']:.4f}")
    if bar is not None:
        bar.close()


def _as_config(config: TuneConfig | dict[str, Any] | str | None) -> TuneConfig:
    if config is None:
        return TuneConfig()
    if isinstance(config, TuneConfig):
        return config
    if isinstance(config, dict):
        return TuneConfig.from_dict(config)
    return TuneConfig.from_yaml(config)
