"""Library noise captured: while nbtune trains, evaluates or loads a model on a thread, what transformers, peft
and accelerate log there, and the Python warnings raised there, go to the run's `log.txt` (and, while it trains,
to its events as "message") instead of the cell's stderr.

Why: the embedded base on classification logged a red "LlamaForSequenceClassification LOAD REPORT …
score.weight MISSING" box (transformers.utils.loading_report, a WARNING of "transformers.modeling_utils") once
per run, 14 times in the compare notebook, and transformers' FutureWarnings reached cell outputs.
Logging handlers and `warnings.showwarning` are process-wide, so only records made on a captured thread are
diverted: the same libraries used from the user's own code (the main thread) still speak to the user.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from nbtune import disk

log = logging.getLogger("nbtune")

LIBRARIES = ("transformers", "peft", "accelerate", "diffusers")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # transformers' report is styled for a terminal


class Capture:
    """Where one thread's library messages go: appended to `path` (flushed per message) and, given `events`,
    emitted as "message" events. A file that cannot be written (a full disk) is given up, said once."""

    def __init__(self, path: Path, events: Any = None):
        self.path = path
        self.events = events
        self.count = 0
        self._file: IO[str] | None = None
        self._broken = False
        self._busy = False  # a message raised while one is written goes to the file only (never recurses)

    def write(self, source: str, level: str, text: str) -> None:
        text = _ANSI.sub("", text).rstrip()
        self.count += 1
        self._append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {level} [{source}] {text}\n")
        if self.events is None or self._busy:
            return
        self._busy = True
        try:
            with suppress(OSError):  # the events file met a full disk: the runner fails the run for it
                self.events.emit("message", source=source, level=level, text=text)
        finally:
            self._busy = False

    def _append(self, line: str) -> None:
        if self._broken:
            return
        try:
            with disk.writing(self.path):
                if self._file is None:
                    self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
                self._file.write(line)
                self._file.flush()
        except OSError as err:
            self._broken = True
            log.warning("nbtune: library messages are no longer written to %s (%s)", self.path, err)

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with suppress(OSError):  # a full disk: what was flushed is kept
                file.close()


_CAPTURES: dict[int, Capture] = {}  # thread ident -> where its messages go
_LOCK = threading.Lock()
_previous_showwarning: Any = None


@contextmanager
def captured(path: Path, events: Any = None) -> Iterator[Capture]:
    """Divert this thread's library log records and warnings to `path` (and `events`) inside the block."""
    capture = Capture(path, events)
    ident = threading.get_ident()
    with _LOCK:
        outer = _CAPTURES.get(ident)
        _CAPTURES[ident] = capture
        _install()
    try:
        yield capture
    finally:
        with _LOCK:
            if outer is not None:
                _CAPTURES[ident] = outer
            else:
                _CAPTURES.pop(ident, None)
            if not _CAPTURES:
                _uninstall()
        capture.close()


@contextmanager
def no_torchvision_note() -> Iterator[None]:
    """Inside: transformers does not say, where torchvision is missing, that an image processor falls back to
    its PIL version (it changes nothing nbtune does; said once, it reached the cell that first loaded one)."""
    logger = logging.getLogger("transformers.utils.import_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _is_library(name: str) -> bool:
    return name.split(".", 1)[0] in LIBRARIES


class _NotCaptured(logging.Filter):
    """On every other handler: drops the library records of a captured thread (they went to its log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.thread in _CAPTURES and _is_library(record.name))


_NOT_CAPTURED = _NotCaptured()


class _Diverter(logging.Handler):
    """On the libraries' loggers: a captured thread's record goes to its log; another thread's is left to the
    other handlers, or to logging's last resort (stderr) when it has none, as if this handler were not here."""

    def handle(self, record: logging.LogRecord) -> bool:
        others = _guard_other_handlers(record.name)  # transformers adds its own handler when first imported
        capture = _CAPTURES.get(record.thread)
        if capture is not None:
            capture.write(record.name, record.levelname, record.getMessage())
        elif not others and logging.lastResort is not None and record.levelno >= logging.lastResort.level:
            logging.lastResort.handle(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:  # handle() does the work
        pass


_DIVERTER = _Diverter()


def _guard_other_handlers(name: str) -> int:
    """Put the filter on every other handler a record of logger `name` reaches; returns how many there are."""
    logger: logging.Logger | None = logging.getLogger(name)
    count = 0
    while logger is not None:
        for handler in logger.handlers:
            if handler is not _DIVERTER:
                handler.addFilter(_NOT_CAPTURED)  # once: addFilter skips a filter it has
                count += 1
        logger = logger.parent if logger.propagate else None
    return count


def _showwarning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
    capture = _CAPTURES.get(threading.get_ident())
    if capture is None or file is not None:
        _previous_showwarning(message, category, filename, lineno, file, line)
        return
    text = warnings.formatwarning(message, category, filename, lineno, line)
    capture.write("warnings", category.__name__, text)


def _install() -> None:
    global _previous_showwarning
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        if _DIVERTER not in logger.handlers:
            logger.addHandler(_DIVERTER)
        _guard_other_handlers(name)
    if warnings.showwarning is not _showwarning:
        _previous_showwarning = warnings.showwarning
        warnings.showwarning = _showwarning


def _uninstall() -> None:
    for name in LIBRARIES:
        logging.getLogger(name).removeHandler(_DIVERTER)
    if warnings.showwarning is _showwarning:
        warnings.showwarning = _previous_showwarning
