"""A full disk, said in the user's words: every write of a run (events, checkpoint, artifact, summary) that
meets one raises `NoSpaceLeft` naming what it was writing, and the run fails with "no space left on <path>".

Libraries report a full disk in their own ways: an OSError with errno ENOSPC from Python, "No space left on
device (os error 28)" from safetensors' Rust, and from torch's writer only "unexpected pos 576 vs 534" (seen on
a full tmpfs, torch 2.13), so a write error where under `NEARLY_FULL_BYTES` are free counts as a full disk too.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_WORDS = ("no space left on device", "storagefull", "disk quota exceeded")
NEARLY_FULL_BYTES = 1 << 20


class NoSpaceLeft(OSError):
    """A write failed because the disk (or the quota) is full."""

    def __init__(self, path: str | Path):
        super().__init__(errno.ENOSPC, f"no space left on {path}", str(path))

    def __str__(self) -> str:
        return f"no space left on {self.filename}"


def is_disk_full(err: BaseException | None, path: str | Path | None = None) -> bool:
    """Whether `err`, or an error it was raised from, says the disk is full, or (given the `path` written)
    whether an I/O error left under `NEARLY_FULL_BYTES` free there."""
    if path is not None and isinstance(err, (OSError, RuntimeError)) and _free_bytes(Path(path)) < NEARLY_FULL_BYTES:
        return True
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
            return True
        if any(words in str(err).lower() for words in FULL_WORDS):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _free_bytes(path: Path) -> float:
    """Free bytes on the filesystem of `path` (or of its nearest existing parent); infinite when unknown."""
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return float("inf")


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a full disk met inside the block into `NoSpaceLeft(path)`; other errors pass unchanged."""
    try:
        yield
    except NoSpaceLeft:
        raise
    except Exception as err:
        if is_disk_full(err, path):
            raise NoSpaceLeft(path) from err
        raise
