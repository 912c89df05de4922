"""A run's event stream: what training does, as timestamped records that the charts, the disk and tests consume.

Kinds: queued (with `position`: how many runs are ahead of it), phase (what a starting run does, one of
PHASES), started, step, eval, checkpoint, message (a library's log record or warning, nbtune/noise.py),
recovered (a failure the run goes on from, nbtune/recovery.py: its `text` says it in words; training starts
again at its `resume_step`, see `standing`), finished, stopped, failed. The training thread only appends (to the history, to the JSON-lines file, flushed
per record, and to each subscriber's bounded queue); each subscriber is called on its own thread, so a slow or
failing subscriber never slows or breaks training.
A write to the file that fails (a full disk) raises once, from that `emit`, after the event has still reached
the history and the subscribers; later events stay in memory, and closing the stream never raises.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from nbtune.disk import NoSpaceLeft, is_disk_full

log = logging.getLogger("nbtune")

TERMINAL = ("finished", "stopped", "failed")
# What a run does before its first step, in order: "phase" events, each with data {"phase": <one of these>}.
PHASES = ("loading model", "preparing data", "loading weights")
QUEUE_SIZE = 10_000


@dataclass(frozen=True)
class Event:
    kind: str
    time: float
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=_jsonable, allow_nan=False)

    @classmethod
    def from_json(cls, line: str) -> Event:
        d = json.loads(line)
        return cls(kind=d["kind"], time=d["time"], data=d.get("data", {}))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _clean(data: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities become None (JSON has neither); tensors become numbers."""
    out = {}
    for k, v in data.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def standing(history: list[Event]) -> list[Event]:
    """The events of the training that stands: after a "recovered" event training goes on from its
    `resume_step`, so the step events past that step and the eval events from it on (the new attempt evaluates
    when it starts) that came before the recovery are left out."""
    out: list[Event] = []
    for event in history:
        if event.kind == "recovered":
            out = [e for e in out if not redone(e, event.data.get("resume_step") or 0)]
        out.append(event)
    return out


def redone(event: Event, resume_step: int) -> bool:
    """Whether an attempt that resumes at `resume_step` trains (step) or evaluates (eval) `event` again."""
    step = event.data.get("step") or 0
    return (event.kind == "step" and step > resume_step) or (event.kind == "eval" and step >= resume_step)


class _Subscriber:
    """One callback fed from its own thread: first the events so far (`backlog`), then a bounded queue.

    When the queue is full the oldest waiting event is dropped, so a slow subscriber still sees the latest
    state and the run's last event; it is told once, in the log.
    """

    def __init__(self, callback: Callable[[Event], Any], name: str, backlog: list[Event]):
        self.callback = callback
        self.name = name
        self.backlog = backlog
        self.queue: queue.Queue[Event | None] = queue.Queue(QUEUE_SIZE)
        self.dropped = 0
        self.failed = False
        self.thread = threading.Thread(target=self._deliver, name=f"nbtune-subscriber-{name}", daemon=True)
        self.thread.start()

    def put(self, event: Event | None) -> None:
        while True:
            try:
                self.queue.put_nowait(event)
                return
            except queue.Full:
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    continue
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("nbtune: subscriber %s is too slow; dropping its oldest events", self.name)

    def _call(self, event: Event) -> None:
        try:
            self.callback(event)
        except Exception:  # a broken subscriber must not break training; say so once
            if not self.failed:
                self.failed = True
                log.exception("nbtune: subscriber %s failed (further errors are not shown)", self.name)

    def _deliver(self) -> None:
        for event in self.backlog:
            self._call(event)
        self.backlog = []
        while True:
            event = self.queue.get()
            if event is None:
                return
            self._call(event)

    def close(self) -> None:
        self.put(None)


class EventStream:
    """The events of one run: history in memory, a JSON-lines file, and subscribers."""

    def __init__(self, path: Path | None = None, history: list[Event] | None = None):
        self.history: list[Event] = list(history or [])
        self.path = path
        self._file: IO[str] | None = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115
        self.write_error: OSError | None = None  # why the file stopped receiving events (a full disk)
        self._subscribers: list[_Subscriber] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.closed = path is None and history is not None  # a stream read back from disk gets no new events

    @classmethod
    def read(cls, path: Path) -> list[Event]:
        """Events of a file; a torn last line (killed process) is skipped."""
        events = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    events.append(Event.from_json(line))
                except (json.JSONDecodeError, KeyError):
                    continue
        return events

    def emit(self, kind: str, **data: Any) -> Event:
        event = Event(kind=kind, time=time.time(), data=_clean(data))
        with self._lock:
            self.history.append(event)
            failed = self._write(event)
            subscribers = list(self._subscribers)
            self._changed.notify_all()
        for s in subscribers:
            s.put(event)
        if failed is not None:
            raise failed
        return event

    def _write(self, event: Event) -> OSError | None:
        """Append one line to the file; on failure stop writing there and return the error (once)."""
        if self._file is None:
            return None
        try:
            self._file.write(event.to_json() + "\n")
            self._file.flush()
            return None
        except OSError as err:
            self.write_error = err
            if is_disk_full(err, self.path):
                self.write_error = NoSpaceLeft(self.path)
                self.write_error.__cause__ = err
            self._close_file()
            return self.write_error

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is None:
            return
        try:
            file.close()  # flushes: fails again on a full disk, and the stream must still end
        except OSError as err:
            log.warning("nbtune: could not close %s (%s)", self.path, err)

    def subscribe(self, callback: Callable[[Event], Any], replay: bool = True) -> Callable[[], None]:
        """Call `callback(event)` for every event (first the past ones if `replay`); returns an unsubscribe.

        The callback runs on its own thread; on an ended stream it gets the past events and then stops.
        """
        with self._lock:
            name = getattr(callback, "__qualname__", None) or type(callback).__name__
            sub = _Subscriber(callback, name, list(self.history) if replay else [])
            if self.closed:
                sub.close()
            else:
                self._subscribers.append(sub)

        def unsubscribe() -> None:
            """Stop delivery; events already emitted are still delivered before this returns."""
            with self._lock:
                if sub in self._subscribers:
                    self._subscribers.remove(sub)
            sub.close()
            if threading.current_thread() is not sub.thread:
                sub.thread.join(timeout=5)

        return unsubscribe

    def __iter__(self) -> Iterator[Event]:
        """All events so far, then new ones as they come, until the run ends."""
        index = 0
        while True:
            with self._lock:
                while index >= len(self.history):
                    if self.closed or (self.history and self.history[-1].kind in TERMINAL):
                        return
                    self._changed.wait(timeout=0.5)
                event = self.history[index]
            index += 1
            yield event
            if event.kind in TERMINAL:
                return

    def close(self) -> None:
        """End the stream: close the file, let subscribers finish what they have, wake iterators."""
        with self._lock:
            self.closed = True
            self._close_file()
            subscribers, self._subscribers = self._subscribers, []
            self._changed.notify_all()
        for s in subscribers:
            s.close()
        for s in subscribers:
            s.thread.join(timeout=5)
