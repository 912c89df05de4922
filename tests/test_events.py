"""A run's event stream: timestamped records on disk and in memory, delivered to subscribers that can never
slow or break training."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from nbtune import events as events_module
from nbtune.disk import NoSpaceLeft
from nbtune.events import Event, EventStream


def test_each_event_is_a_timestamped_json_line_on_disk_before_the_next_one(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    stream = EventStream(path)
    before = time.time()
    stream.emit("step", step=1, loss=2.5)
    # flushed per record: readable while the stream is still open (a killed kernel loses at most one record)
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["kind"] == "step" and record["data"] == {"step": 1, "loss": 2.5}
    assert before <= record["time"] <= time.time()
    stream.close()


def test_nan_and_infinite_values_are_written_as_null(tmp_path: Path) -> None:
    stream = EventStream(tmp_path / "e.jsonl")
    stream.emit("step", step=3, loss=float("nan"), grad_norm=float("inf"))
    stream.close()
    (event,) = EventStream.read(tmp_path / "e.jsonl")
    assert event.data == {"step": 3, "loss": None, "grad_norm": None}


def test_a_torn_last_line_from_a_killed_process_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    good = Event("step", 1.0, {"step": 1}).to_json()
    path.write_text(good + "\n" + good[: len(good) // 2])
    assert [e.data for e in EventStream.read(path)] == [{"step": 1}]


def test_a_slow_subscriber_does_not_slow_emitting() -> None:
    stream = EventStream()
    hurry = threading.Event()
    stream.subscribe(lambda event: hurry.wait(0.5))  # 0.5 s per event until told to hurry
    start = time.perf_counter()
    for step in range(200):
        stream.emit("step", step=step)
    assert time.perf_counter() - start < 0.5  # one slow delivery alone would take longer
    hurry.set()
    stream.close()


def test_a_failing_subscriber_is_logged_once_and_others_still_get_every_event(caplog) -> None:
    stream = EventStream()
    received: list[int] = []

    def broken(event: Event) -> None:
        raise RuntimeError("chart exploded")

    stream.subscribe(broken)
    stream.subscribe(lambda event: received.append(event.data["step"]))
    with caplog.at_level(logging.ERROR, logger="nbtune"):
        for step in range(5):
            stream.emit("step", step=step)
        stream.close()
    assert received == [0, 1, 2, 3, 4]
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1 and "broken" in failures[0].getMessage()


def test_a_late_subscriber_reads_all_events_so_far_then_new_ones(monkeypatch) -> None:
    monkeypatch.setattr(events_module, "QUEUE_SIZE", 4)  # the past is replayed whole, whatever the queue size
    stream = EventStream()
    for step in range(10):
        stream.emit("step", step=step)
    received: list[Event] = []
    stream.subscribe(received.append)
    stream.emit("finished", step=10)
    stream.close()
    assert [e.data["step"] for e in received] == list(range(11))
    assert received[-1].kind == "finished"


def test_a_stuck_subscriber_drops_its_oldest_events_but_still_sees_the_end(monkeypatch, caplog) -> None:
    monkeypatch.setattr(events_module, "QUEUE_SIZE", 5)
    stream = EventStream()
    release = threading.Event()
    received: list[Event] = []

    def stuck(event: Event) -> None:
        release.wait(5)
        received.append(event)

    stream.subscribe(stuck)
    with caplog.at_level(logging.WARNING, logger="nbtune"):
        for step in range(50):
            stream.emit("step", step=step)
        stream.emit("finished", step=50)
        release.set()
        stream.close()
    assert received[-1].kind == "finished"
    assert len(received) <= 7  # at most the one in hand and a full queue
    assert sum("too slow" in r.getMessage() for r in caplog.records) == 1


def test_unsubscribed_callbacks_get_no_more_events() -> None:
    stream = EventStream()
    received: list[Event] = []
    unsubscribe = stream.subscribe(received.append)
    stream.emit("step", step=1)
    unsubscribe()
    stream.emit("step", step=2)
    stream.close()
    assert [e.data["step"] for e in received] == [1]


def test_iterating_yields_past_and_live_events_and_ends_with_the_run() -> None:
    stream = EventStream()
    stream.emit("started")

    def train() -> None:
        for step in (1, 2):
            time.sleep(0.05)
            stream.emit("step", step=step)
        stream.emit("stopped", step=2)

    threading.Thread(target=train).start()
    assert [e.kind for e in stream] == ["started", "step", "step", "stopped"]


def test_iterating_and_subscribing_to_a_stream_read_from_disk_end_without_a_terminal_event(tmp_path: Path) -> None:
    # an interrupted run has no finished/stopped/failed event: reading it back must not wait forever
    live = EventStream(tmp_path / "e.jsonl")
    live.emit("started")
    live.emit("step", step=1)
    live.close()
    stored = EventStream(history=EventStream.read(tmp_path / "e.jsonl"))
    assert [e.kind for e in stored] == ["started", "step"]
    received: list[Event] = []
    done = threading.Event()
    stored.subscribe(lambda e: (received.append(e), len(received) == 2 and done.set()))
    assert done.wait(5)
    assert stored._subscribers == []  # no thread left waiting for events that will never come


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux), a file that is always full")
def test_a_full_disk_fails_one_emit_naming_the_file_and_the_stream_still_ends() -> None:
    stream = EventStream(Path("/dev/full"))
    received: list[Event] = []
    stream.subscribe(received.append)
    with pytest.raises(NoSpaceLeft, match="^no space left on /dev/full$"):
        stream.emit("step", step=1)
    stream.emit("failed", error="no space left")  # later events stay in memory; the file failed once
    stream.close()  # closing never raises, so the run's end is always recorded
    assert [e.kind for e in stream.history] == ["step", "failed"]
    assert isinstance(stream.write_error, NoSpaceLeft)
    deadline = time.time() + 5
    while len(received) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert received == stream.history  # subscribers got the event whose write failed, and the end
    assert list(stream) == stream.history
