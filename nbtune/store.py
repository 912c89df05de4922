"""The run store: one directory per run under a root, and the cache that never trains the same config twice.

Layout of a run directory (its name is the run id):
    meta.json      id, cache key, identities of config, data and base model, state, pid   (atomic writes)
    config.yaml    the config                                                           (atomic)
    events.jsonl   every event, one JSON line each, flushed per record
    summary.json   final/best metrics, parameters, time, speed, memory                  (atomic, at the end)
    artifact/      the trained adapter or weights (renamed into place when complete)
    checkpoints/   resumable Trainer checkpoints (never exported)
Run directories are created with an atomic mkdir and files are replaced atomically, so several kernels can
share one store; a damaged entry is skipped with a warning naming it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbtune.config import TuneConfig

log = logging.getLogger("nbtune")

EXPORTED = ("meta.json", "config.yaml", "events.jsonl", "summary.json", "artifact")
ENDED = ("finished", "stopped", "failed")


def default_root() -> Path:
    """`$NBTUNE_HOME`, else `.nbtune/` in the current directory (beside the notebook)."""
    return Path(os.environ.get("NBTUNE_HOME") or Path.cwd() / ".nbtune")


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary file in the same folder, then a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pid_alive(pid: int | None, host: str | None) -> bool:
    if not pid or host != socket.gethostname():
        return host is not None and host != socket.gethostname()  # another machine's run: assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cache_key(config: TuneConfig) -> dict[str, str]:
    """What identifies a result: the config's content hash, the data actually used and the base weights.

    Computing it reads the data rows (JSON) and hashes local model files, but imports no torch.
    """
    from nbtune import data, models

    d = config.data
    if isinstance(d.source, str) and not d.source.startswith("nbtune:") and not Path(d.source).expanduser().exists():
        data_id = f"hub:{d.source}@{d.revision or 'main'}:{d.split}:{d.eval_split}:{d.max_samples}:{d.max_eval_samples}"
    else:
        train, evaluation = data.load_rows(config)
        data_id = data.fingerprint(train, evaluation)
    model_id = models.model_identity(config)
    import hashlib

    key = hashlib.sha256(f"{config.content_hash}|{data_id}|{model_id}".encode()).hexdigest()[:16]
    return {"key": key, "config_hash": config.content_hash, "data": data_id, "model": model_id}


@dataclass
class RunRecord:
    """A run directory as read from disk."""

    id: str
    path: Path
    meta: dict[str, Any]

    @property
    def state(self) -> str:
        """finished / stopped / failed / running / queued / interrupted (a dead process left it running)."""
        summary = self.summary
        if summary is not None:
            return summary.get("state", "failed")
        state = self.meta.get("state", "queued")
        if state in ("running", "queued") and not _pid_alive(self.meta.get("pid"), self.meta.get("host")):
            return "interrupted"
        return state

    @property
    def config(self) -> TuneConfig:
        return TuneConfig.from_yaml((self.path / "config.yaml").read_text())

    @property
    def summary(self) -> dict[str, Any] | None:
        path = self.path / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def artifact_path(self) -> Path:
        return self.path / "artifact"

    def latest_checkpoint(self) -> Path | None:
        folder = self.path / "checkpoints"
        checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) if folder.exists() else []
        return checkpoints[-1] if checkpoints else None

    def update_meta(self, **changes: Any) -> None:
        self.meta.update(changes)
        write_atomic(self.path / "meta.json", json.dumps(self.meta, indent=2))


class RunStore:
    """All runs under one root folder."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.runs_dir = self.root / "runs"

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    def create(self, config: TuneConfig, key: dict[str, str] | None = None) -> RunRecord:
        """A new, empty run directory for `config` (atomic mkdir: concurrent creators never collide)."""
        key = key or cache_key(config)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{config.method.name}-{key['key'][:8]}"
        for n in range(1000):
            run_id = base if n == 0 else f"{base}-{n}"
            try:
                (self.runs_dir / run_id).mkdir()
                break
            except FileExistsError:
                continue
        path = self.runs_dir / run_id
        meta = {"id": run_id, "created": time.time(), "state": "queued", "pid": os.getpid(),
                "host": socket.gethostname(), "method": config.method.name, **{f"{k}_id" if k in ("data", "model") else k: v for k, v in key.items()}}
        write_atomic(path / "config.yaml", config.to_yaml())
        write_atomic(path / "meta.json", json.dumps(meta, indent=2))
        return RunRecord(run_id, path, meta)

    def _read(self, path: Path) -> RunRecord | None:
        try:
            meta = json.loads((path / "meta.json").read_text())
            if not isinstance(meta, dict) or "key" not in meta:
                raise ValueError("meta.json lacks the cache key")
            record = RunRecord(path.name, path, meta)
            _ = record.summary  # a torn summary.json makes the entry unreadable, not the listing
            return record
        except (OSError, ValueError) as err:
            log.warning("nbtune: skipping damaged run %s (%s)", path.name, err)
            return None

    def list(self) -> list[RunRecord]:
        """Every readable run, oldest first; damaged entries are skipped with a warning naming them."""
        if not self.runs_dir.exists():
            return []
        records = [self._read(p) for p in sorted(self.runs_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        return sorted((r for r in records if r is not None), key=lambda r: r.meta.get("created", 0))

    def get(self, run_id: str) -> RunRecord:
        path = self.runs_dir / run_id
        record = self._read(path) if path.is_dir() else None
        if record is None:
            raise KeyError(f"no run {run_id!r} in {self.root}")
        return record

    def find_finished(self, key: str) -> RunRecord | None:
        """The newest finished run with this cache key (stopped or failed runs are never served)."""
        if not self.runs_dir.exists():
            return None
        matches = []
        for path in self.runs_dir.iterdir():
            if path.is_dir() and key[:8] in path.name:
                record = self._read(path)
                if record and record.meta.get("key") == key and record.state == "finished":
                    matches.append(record)
        return max(matches, key=lambda r: r.meta.get("created", 0)) if matches else None

    def delete(self, run_id: str) -> None:
        shutil.rmtree(self.get(run_id).path)

    def export(self, run_ids: list[str], archive: str | Path) -> Path:
        """Write runs (config, events, summary, artifact; no checkpoints) to one .tar.gz archive."""
        archive = Path(archive)
        with tarfile.open(archive, "w:gz") as tar:
            for run_id in run_ids:
                record = self.get(run_id)
                for name in EXPORTED:
                    if (record.path / name).exists():
                        tar.add(record.path / name, arcname=f"{run_id}/{name}")
        return archive

    def import_(self, archive: str | Path) -> list[str]:
        """Add the runs of an archive. Only JSON, YAML and safetensors/tokenizer files are taken, never code
        or pickles; an archive with links or paths escaping the store is refused whole."""
        allowed = (".json", ".jsonl", ".yaml", ".safetensors", ".txt", ".model", ".md")
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                parts = Path(m.name).parts
                if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                    raise ValueError(f"archive {archive} refused: unsafe entry {m.name!r}")
                if m.isfile() and not m.name.endswith(allowed):
                    raise ValueError(f"archive {archive} refused: {m.name!r} is not JSON, YAML or safetensors")
            run_ids = sorted({Path(m.name).parts[0] for m in members})
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            imported = []
            for run_id in run_ids:
                target = self.runs_dir / run_id
                if target.exists():
                    continue
                staging = Path(tempfile.mkdtemp(dir=self.runs_dir, prefix=f".import-{run_id}-"))
                for m in members:
                    if Path(m.name).parts[0] == run_id and m.isfile():
                        dest = staging / Path(*Path(m.name).parts[1:])
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(m) as src, open(dest, "wb") as out:  # type: ignore[union-attr]
                            shutil.copyfileobj(src, out)
                try:
                    staging.rename(target)
                    imported.append(run_id)
                except OSError:
                    shutil.rmtree(staging, ignore_errors=True)
        return imported
