"""Who is training a config right now, across processes: one lock file per cache key in the store.

`<store>/claims/<key>.lock` is held with an exclusive `flock` by the process that queued or is training a run
of that key, and names the run. A second launch of the same config, in any process on the same machine's
store, finds the lock taken and attaches to the named run instead of training again. The kernel drops a lock
when its process dies, so the claim of a killed process is taken over by the next launch. Where `fcntl` is
missing (Windows) there are no claims: only launches within one process are deduplicated.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

NAME_WAIT_S = 5.0  # how long an attaching launch waits for the claimant to write its run's id


class Claim:
    """The lock on one cache key, held by this process until `release()`."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self._fd = fd  # None: a claim that locks nothing (no flock on this system)

    def name(self, run_id: str) -> None:
        """Record which run trains the key, for launches that attach to it."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, run_id.encode(), 0)

    def release(self) -> None:
        """Remove the claim (unlinked while still locked, so no launch ever holds a file that is gone)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def claim(root: Path, key: str) -> Claim | None:
    """Take the claim on `key` in the store at `root`; None when a live process holds it."""
    path = root / "claims" / f"{key}.lock"
    if fcntl is None:
        return Claim(path, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if _same_file(fd, path):
            return Claim(path, fd)
        os.close(fd)  # its holder released (unlinked) it between our open and lock: take the new file


def claimant(root: Path, key: str, wait_s: float = NAME_WAIT_S) -> str | None:
    """The id of the run holding the claim on `key`, waiting a moment for its holder to write it."""
    path = root / "claims" / f"{key}.lock"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            run_id = path.read_text().strip()
        except FileNotFoundError:
            return None
        if run_id or time.monotonic() > deadline:
            return run_id or None
        time.sleep(0.05)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
