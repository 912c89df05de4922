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
from nbtune.records import CacheKey, RunSummary

log = logging.getLogger("nbtune")

EXPORTED = ("meta.json", "config.yaml", "events.jsonl", "summary.json", "artifact")
ENDED = ("finished", "stopped", "failed")
# What an archive may carry: data, never code or pickles (.bin, .pt, .pkl are refused).
SAFE_SUFFIXES = (".json", ".jsonl", ".yaml", ".safetensors", ".txt", ".model", ".md")
# A run directory this young without its meta.json is being created by another kernel, not damaged.
CREATING_GRACE_S = 30.0


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


def process_start(pid: int) -> str | None:
    """When process `pid` started (Linux clock ticks since boot), so a reused pid is not taken for the same
    process; None where /proc is not available."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int | None, host: str | None, started: str | None = None) -> bool:
    if not pid or host != socket.gethostname():
        return host is not None and host != socket.gethostname()  # another machine's run: assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started is None or process_start(pid) in (None, started)


def cache_key(config: TuneConfig) -> CacheKey:
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
    return CacheKey(key=key, config_hash=config.content_hash, data_id=data_id, model_id=model_id)


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
            return summary.state
        state = self.meta.get("state", "queued")
        if state in ("running", "queued") and not _pid_alive(self.meta.get("pid"), self.meta.get("host"),
                                                             self.meta.get("pid_start")):
            return "interrupted"
        return state

    @property
    def config(self) -> TuneConfig:
        return TuneConfig.from_yaml((self.path / "config.yaml").read_text())

    @property
    def summary(self) -> RunSummary | None:
        path = self.path / "summary.json"
        return RunSummary.from_json(path.read_text()) if path.exists() else None

    @property
    def cache_key(self) -> CacheKey:
        return CacheKey.from_dict(self.meta)

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def artifact_path(self) -> Path:
        return self.path / "artifact"

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (the Trainer writes trainer_state.json last), or None."""
        folder = self.path / "checkpoints"
        if not folder.exists():
            return None
        complete = [p for p in folder.glob("checkpoint-*")
                    if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").exists()]
        return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)

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

    def create(self, config: TuneConfig, key: CacheKey | None = None) -> RunRecord:
        """A new, empty run directory for `config` (atomic mkdir: concurrent creators never collide)."""
        key = key or cache_key(config)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{config.method.name}-{key.key[:8]}"
        for n in range(1000):
            run_id = base if n == 0 else f"{base}-{n}"
            try:
                (self.runs_dir / run_id).mkdir()
                break
            except FileExistsError:
                continue
        path = self.runs_dir / run_id
        meta = {"id": run_id, "created": time.time(), "state": "queued", "pid": os.getpid(),
                "pid_start": process_start(os.getpid()), "host": socket.gethostname(), "method": config.method.name,
                **key.to_dict()}
        write_atomic(path / "config.yaml", config.to_yaml())
        write_atomic(path / "meta.json", json.dumps(meta, indent=2))
        return RunRecord(run_id, path, meta)

    def _read(self, path: Path) -> RunRecord | None:
        try:
            if not (path / "meta.json").exists() and time.time() - path.stat().st_mtime < CREATING_GRACE_S:
                return None  # another kernel is creating it right now
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
        """Remove a run and its files; a run still queued or training is refused (stop it first)."""
        record = self.get(run_id)
        if record.state in ("running", "queued"):
            raise ValueError(f"run {run_id} is {record.state}; stop it before deleting it")
        # Rename first so that no reader ever sees a half-deleted run.
        doomed = self.runs_dir / f".deleting-{run_id}-{os.getpid()}"
        record.path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def export(self, run_ids: list[str], archive: str | Path) -> Path:
        """Write ended runs (config, events, summary, artifact; no checkpoints) to one .tar.gz archive.

        Files an import would refuse (pickles, code) are left out with a warning naming them.
        """
        records = [self.get(run_id) for run_id in run_ids]
        for record in records:
            if record.state in ("running", "queued"):
                raise ValueError(f"run {record.id} is {record.state}; export it once it has ended")
        archive = Path(archive)

        def only_data(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            if info.isfile() and not info.name.endswith(SAFE_SUFFIXES):
                log.warning("nbtune: export leaves out %s (not JSON, YAML or safetensors)", info.name)
                return None
            return info if info.isfile() or info.isdir() else None

        partial = archive.with_name(f".{archive.name}.partial")
        with tarfile.open(partial, "w:gz") as tar:
            for record in records:
                for name in EXPORTED:
                    if (record.path / name).exists():
                        tar.add(record.path / name, arcname=f"{record.id}/{name}", filter=only_data)
        os.replace(partial, archive)
        return archive

    def import_(self, archive: str | Path) -> list[str]:
        """Add the runs of an archive. Only JSON, YAML and safetensors/tokenizer files are taken, never code
        or pickles; an archive with links or paths escaping the store is refused whole."""
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                parts = Path(m.name).parts
                if (m.name.startswith(("/", "\\")) or ".." in parts or not parts or parts[0] in (".", "")
                        or parts[0].startswith(".") or ":" in m.name or not (m.isfile() or m.isdir())):
                    raise ValueError(f"archive {archive} refused: unsafe entry {m.name!r}")
                if m.isfile() and not m.name.endswith(SAFE_SUFFIXES):
                    raise ValueError(f"archive {archive} refused: {m.name!r} is not JSON, YAML or safetensors")
            run_ids = sorted({Path(m.name).parts[0] for m in members})
            for run_id in run_ids:
                if f"{run_id}/meta.json" not in {m.name.removeprefix("./") for m in members}:
                    raise ValueError(f"archive {archive} refused: run {run_id!r} has no meta.json")
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
                if self._read(staging) is None:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise ValueError(f"archive {archive} refused: run {run_id!r} is damaged")
                try:
                    staging.rename(target)
                    imported.append(run_id)
                except OSError:  # another kernel imported it at the same moment
                    shutil.rmtree(staging, ignore_errors=True)
        return imported
