"""The run store: one directory per run under a root, and the cache that never trains the same config twice.

Layout of a run directory (its name is the run id):
    meta.json      id, cache key, identities of config, data and base model, state, pid   (atomic writes)
    config.yaml    the config                                                           (atomic)
    events.jsonl   every event, one JSON line each, flushed per record
    summary.json   final/best metrics, parameters, time, speed, memory                  (atomic, at the end)
    artifact/      the trained adapter or weights (renamed into place when complete)
    checksum.json  the artifact's sha256, written with it: a cache hit needs it to match
    checkpoints/   resumable Trainer checkpoints (never exported)
    log.txt        what transformers, peft and accelerate logged or warned while it trained (nbtune/noise.py)
Beside the runs, `claims/<cache key>.lock` (nbtune/claims.py) is held with flock by the process training that
key, so a launch of the same config in another process attaches to its run instead of training it again.
Run directories are created with an atomic mkdir and files are replaced atomically, so several kernels can
share one store; a damaged entry is skipped with a warning naming it (and can still be deleted).

A finished run is served from the cache only when the key recomputed from its own config.yaml is the key
looked up and its artifact matches its checksum, so a damaged, edited or forged (imported) run never is.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbtune.config import TuneConfig
from nbtune.records import CacheKey, RunSummary, check_meta

log = logging.getLogger("nbtune")

EXPORTED = ("meta.json", "config.yaml", "events.jsonl", "summary.json", "checksum.json", "artifact")
ENDED = ("finished", "stopped", "failed")
# What an archive may carry: data, never code or pickles (.bin, .pt, .pkl are refused).
SAFE_SUFFIXES = (".json", ".jsonl", ".yaml", ".safetensors", ".txt", ".model", ".md")
# what an archive carries: the data files, and a tokenizer's chat template (transformers 5 saves it as
# chat_template.jinja: text, rendered in a sandbox). The artifact's checksum reads SAFE_SUFFIXES only, so runs
# recorded before templates travelled keep theirs.
ARCHIVED_SUFFIXES = (*SAFE_SUFFIXES, ".jinja")
# Import limits (overridable by RunStore.import_'s arguments): a 7B full fine-tune's weights fit, a zip bomb
# does not. Weights compress by ~1.1x and JSON by ~10x, so more than 200x past the first 64 MiB is a bomb.
MAX_IMPORT_BYTES = 64 * 2**30  # all files of one archive, uncompressed
MAX_IMPORT_FILES = 100_000
MAX_IMPORT_FILE_BYTES = 32 * 2**30
MAX_IMPORT_EXPANSION = 200.0  # uncompressed bytes per archive byte, beyond the first 64 MiB
STALE_TEMPORARY_S = 3600.0  # a hidden .import-/.deleting- folder this old was left by a killed process
# A run directory this young without its meta.json is being created by another kernel, not damaged.
CREATING_GRACE_S = 30.0
# A run "running" on another machine sharing the store counts as live while its folder changed this recently
# (events are written every step); after that, and always for an imported run, it is "interrupted".
OTHER_HOST_STALE_S = 600.0


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


def _load_json(path: Path) -> Any:
    """A JSON file of the store; a torn or non-UTF-8 one is a ValueError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path.name} is not valid JSON ({err})") from None
    if path.name == "summary.json" and not isinstance(data, dict):
        raise ValueError(f"summary.json must hold a JSON object (got {type(data).__name__})")
    return data


def process_start(pid: int) -> str | None:
    """When process `pid` started (Linux clock ticks since boot), so a reused pid is not taken for the same
    process; None where /proc is not available."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int | None, host: str | None, started: str | None = None) -> bool:
    if not pid or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started is None or process_start(pid) in (None, started)


class RemoteCodeRefused(PermissionError):
    """Loading an imported run would run code named by its model (trust_remote_code) without an opt-in."""


def check_remote_code(record: RunRecord, config: TuneConfig, trust_remote_code: bool = False) -> None:
    """Refuse to load an imported run whose config sets model.trust_remote_code unless the caller opts in:
    its archive chose the model folder (and any `auto_map` in it), so honouring it would run a stranger's code."""
    if record.meta.get("imported") and config.model.trust_remote_code and not trust_remote_code:
        raise RemoteCodeRefused(
            f"run {record.id} was imported and its config sets model.trust_remote_code for "
            f"{config.model.name_or_path!r}: loading it would run code from that model. If you trust that code, "
            f"load it with run.load_model(trust_remote_code=True)")


def cache_key(config: TuneConfig) -> CacheKey:
    """What identifies a result: the config's content hash, the data actually used (and a built-in dataset's
    judge) and the base weights.

    Computing it reads the data rows (JSON) and hashes local model files, but imports no torch.
    """
    from nbtune import data, models
    from nbtune.config import in_memory_fingerprint

    d = config.data
    rows = in_memory_fingerprint(d.source)
    if rows is not None:  # the split and sampling of in-memory rows are fields of the config, in its hash
        data_id = f"rows:{rows}"
    elif isinstance(d.source, str) and not d.source.startswith("nbtune:") and not Path(d.source).expanduser().exists():
        data_id = f"hub:{d.source}@{d.revision or 'main'}:{d.split}:{d.eval_split}:{d.max_samples}:{d.max_eval_samples}"
    else:
        train, evaluation = data.load_rows(config)
        data_id = data.fingerprint(train, evaluation)
    judge = getattr(data.builtin_dataset(d.source), "judge", None)
    if judge is not None:  # its verdicts are the eval accuracy: another judge, another result
        data_id += f"|judge:{models.folder_identity(judge)}"
    model_id = models.model_identity(config)
    return CacheKey(key=_key_hash(config.content_hash, data_id, model_id), config_hash=config.content_hash,
                    data_id=data_id, model_id=model_id)


def _key_hash(config_hash: str, data_id: str, model_id: str) -> str:
    return hashlib.sha256(f"{config_hash}|{data_id}|{model_id}".encode()).hexdigest()[:16]


def artifact_checksum(folder: Path) -> str:
    """A sha256 over the artifact's data files (names and contents; what an export carries), read in chunks."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(SAFE_SUFFIXES)):
        digest.update(f"{file.relative_to(folder).as_posix()}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            while chunk := f.read(2**20):
                digest.update(chunk)
    return digest.hexdigest()


def record_artifact_checksum(run_dir: Path, folder: Path | None = None) -> None:
    """Write checksum.json for the artifact in `folder` (default: the run's artifact/), before it is served."""
    folder = folder or run_dir / "artifact"
    write_atomic(run_dir / "checksum.json", json.dumps({"artifact_sha256": artifact_checksum(folder)}))


def checkpoint_step(checkpoint: Path | None) -> int:
    """The optimizer step a checkpoint folder (checkpoint-<step>) was saved at; 0 for none."""
    tail = checkpoint.name.rsplit("-", 1)[-1] if checkpoint else ""
    return int(tail) if tail.isdigit() else 0


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint in a run folder (the Trainer writes trainer_state.json last), or None."""
    complete = [p for p in (run_dir / "checkpoints").glob("checkpoint-*")
                if p.name.rsplit("-", 1)[-1].isdigit() and (p / "trainer_state.json").exists()]
    return max(complete, key=checkpoint_step, default=None)


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
        state = self.meta.get("state") or "queued"
        if state in ("running", "queued") and not self._alive():
            return "interrupted"
        return state

    def _alive(self) -> bool:
        """Whether the process that owns this unended run still runs (see OTHER_HOST_STALE_S)."""
        host = self.meta.get("host")
        if self.meta.get("imported") or host is None:
            return False  # an archive's pid and host name no process here
        if host != socket.gethostname():
            changed = [p.stat().st_mtime for p in (self.path, self.path / "meta.json", self.events_path) if p.exists()]
            return time.time() - max(changed, default=0.0) < OTHER_HOST_STALE_S
        return _pid_alive(self.meta.get("pid"), host, self.meta.get("pid_start"))

    @property
    def config(self) -> TuneConfig:
        return TuneConfig.from_yaml((self.path / "config.yaml").read_text())

    @property
    def summary(self) -> RunSummary | None:
        path = self.path / "summary.json"
        return RunSummary.from_dict(_load_json(path)) if path.exists() else None

    @property
    def cache_key(self) -> CacheKey:
        return CacheKey.from_dict(self.meta)

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def artifact_path(self) -> Path:
        return self.path / "artifact"

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (the Trainer writes trainer_state.json last), or None."""
        return latest_checkpoint(self.path)

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
        """The run in `path`, or None with a warning naming what is damaged (None, silently, while created)."""
        found = self.inspect(path)
        if isinstance(found, str):
            if found:
                log.warning("nbtune: skipping damaged run %s (%s)", path.name, found)
            return None
        return found

    def inspect(self, path: Path) -> RunRecord | str:
        """The run in `path`, or why it cannot be read ("" while another kernel is creating it)."""
        try:
            if not (path / "meta.json").exists():
                if time.time() - path.stat().st_mtime < CREATING_GRACE_S:
                    return ""  # another kernel is creating it right now
                return "meta.json is missing"
            if not (path / "config.yaml").is_file():
                return "config.yaml is missing"
            meta = check_meta(_load_json(path / "meta.json"))
            record = RunRecord(path.name, path, meta)
            _ = record.summary  # a torn summary.json makes the entry unreadable, not the listing
            return record
        except (OSError, ValueError, TypeError) as err:
            return str(err)

    def ids(self) -> list[str]:
        """The name of every run folder, readable or not (hidden folders are an import or delete under way)."""
        if not self.runs_dir.exists():
            return []
        return sorted(p.name for p in self.runs_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def resolve(self, prefix: str) -> str:
        """The run id that `prefix` names: the exact id, else the one folder it begins (among every run,
        readable or not). A complete id never stands for its sibling `<id>-1` (two launches of one config
        in the same second), so acting on a run that is gone never falls through to another."""
        ids = self.ids()
        if prefix in ids:
            return prefix
        matches = [i for i in ids if i.startswith(prefix) and not re.fullmatch(r"-\d+", i[len(prefix):])]
        if len(matches) == 1 and prefix:
            return matches[0]
        if not matches or not prefix:
            raise KeyError(f"no run {prefix!r} in {self.root}")
        raise KeyError(f"{prefix!r} names {len(matches)} runs ({', '.join(matches[:3])}, ...); give more of the id")

    def list(self) -> list[RunRecord]:
        """Every readable run, oldest first; damaged entries are skipped with a warning naming them."""
        if not self.runs_dir.exists():
            return []
        records = [self._read(self.runs_dir / run_id) for run_id in self.ids()]
        return sorted((r for r in records if r is not None), key=lambda r: r.meta.get("created") or 0)

    def get(self, run_id: str) -> RunRecord:
        """The run with this exact id; KeyError if there is none or it is damaged (saying what is)."""
        path = self.runs_dir / run_id
        if Path(run_id).name != run_id or run_id.startswith(".") or not path.is_dir():
            raise KeyError(f"no run {run_id!r} in {self.root}")
        found = self.inspect(path)
        if isinstance(found, str):
            raise KeyError(f"run {run_id} is damaged ({found or 'being created'}); `nbtune delete {run_id}` removes it")
        return found

    def find_finished(self, key: CacheKey | str) -> RunRecord | None:
        """The newest finished run with this cache key that can be trusted (see `problem_serving`); stopped,
        failed, damaged or forged runs are never served."""
        key = key.key if isinstance(key, CacheKey) else key
        matches = []
        for run_id in self.ids():
            if key[:8] in run_id:
                record = self._read(self.runs_dir / run_id)
                if record and record.meta.get("key") == key and record.state == "finished":
                    matches.append(record)
        for record in sorted(matches, key=lambda r: r.meta.get("created") or 0, reverse=True):
            problem = self.problem_serving(record, key)
            if problem is None:
                return record
            log.warning("nbtune: run %s is not served from the cache: %s", record.id, problem)
        return None

    @staticmethod
    def problem_serving(record: RunRecord, key: str) -> str | None:
        """Why `record` must not be served for cache key `key`, or None: the key recomputed from the run's own
        config.yaml (with the data and base it recorded) must be `key`, and its artifact must match checksum.json.

        The config decides the data and base a lookup hashes, so a run whose config hashes to the looked-up
        config hash answers the lookup; an archive that claims another config's key cannot.
        """
        try:  # the cheap checks first: a store may hold many runs of one key (force=True)
            recorded = _load_json(record.path / "checksum.json")["artifact_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return "it has no readable checksum.json (the checksum of its artifact)"
        try:
            config = record.config
        except Exception as err:  # torn or edited YAML: ConfigError, yaml errors, OSError
            return f"its config.yaml cannot be read ({type(err).__name__}: {str(err)[:200]})"
        if _key_hash(config.content_hash, record.meta["data_id"], record.meta["model_id"]) != key:
            return "its config.yaml does not give its cache key (edited, truncated or forged)"
        if not record.artifact_path.is_dir() or artifact_checksum(record.artifact_path) != recorded:
            return "its artifact does not match its recorded checksum (missing, truncated or changed)"
        return None

    def delete(self, run_id: str) -> None:
        """Remove a run and its files, a damaged one too; a run still queued or training is refused (stop it
        first), and so is a folder another kernel is creating right now."""
        if run_id not in self.ids():
            raise KeyError(f"no run {run_id!r} in {self.root}")
        found = self.inspect(self.runs_dir / run_id)
        if found == "":
            raise ValueError(f"run {run_id} is being created by another kernel; try again in a minute")
        if isinstance(found, RunRecord) and found.state in ("running", "queued"):
            raise ValueError(f"run {run_id} is {found.state}; stop it before deleting it")
        # Rename first so that no reader ever sees a half-deleted run.
        doomed = self.runs_dir / f".deleting-{run_id}-{os.getpid()}"
        (self.runs_dir / run_id).rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def export(self, run_ids: list[str], archive: str | Path, include_private: bool = False) -> Path:
        """Write ended runs (config, events, summary, artifact; no checkpoints) to one .tar.gz archive.

        Files an import would refuse (pickles, code) are left out with a warning naming them. Unless
        `include_private`, what says where and by whom a run trained is left out too: host name, pid,
        tracebacks, this machine's absolute paths, and the values of secret-looking environment variables
        (HF_TOKEN and other *TOKEN*, *SECRET*, *PASSWORD*, *API_KEY*). The config travels as written.
        """
        records = [self.get(run_id) for run_id in run_ids]
        for record in records:
            if record.state in ("running", "queued"):
                raise ValueError(f"run {record.id} is {record.state}; export it once it has ended")
        archive = Path(archive)
        partial = archive.with_name(f".{archive.name}.partial")
        try:
            with tarfile.open(partial, "w:gz") as tar:
                for record in records:
                    _export_run(tar, record, None if include_private else _Scrubber(record))
            os.replace(partial, archive)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return archive

    def import_(self, archive: str | Path, *, max_bytes: int = MAX_IMPORT_BYTES, max_files: int = MAX_IMPORT_FILES,
                max_file_bytes: int = MAX_IMPORT_FILE_BYTES, max_expansion: float = MAX_IMPORT_EXPANSION) -> list[str]:
        """Add the runs of an archive; returns the ids added (runs already here are left as they are).

        Only JSON, YAML and safetensors/tokenizer files are taken, never code or pickles; an archive with
        links, paths escaping the store, a damaged run or more than the limits (total bytes, files, bytes of
        one file, uncompressed bytes per archive byte: see MAX_IMPORT_*) is refused whole. The archive is read
        once, as a stream, into one hidden folder that is removed whatever happens. Imported runs are marked
        `imported` in meta.json: their pids name no process here and their config's trust_remote_code is
        never honoured without an explicit opt-in.
        """
        archive = Path(archive)
        budget = _ImportBudget(archive, max_bytes, max_files, max_file_bytes, max_expansion)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(self.runs_dir)
        staging = Path(tempfile.mkdtemp(dir=self.runs_dir, prefix=".import-"))
        try:
            with tarfile.open(archive, "r|gz") as tar:
                for member in tar:
                    budget.admit(member)
                    if member.isfile():
                        dest = staging.joinpath(*Path(member.name).parts)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(member) as src, open(dest, "wb") as out:  # type: ignore[union-attr]
                            shutil.copyfileobj(src, out)
            return self._place_imported(archive, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _place_imported(self, archive: Path, staging: Path) -> list[str]:
        """Check every run extracted into `staging`, then rename each new one into the store."""
        folders = sorted(staging.iterdir())
        for folder in folders:
            if not folder.is_dir():
                raise ValueError(f"archive {archive} refused: {folder.name!r} is not inside a run folder")
            if not (folder / "meta.json").is_file():
                raise ValueError(f"archive {archive} refused: run {folder.name!r} has no meta.json")
            found = self.inspect(folder)
            if isinstance(found, str):
                raise ValueError(f"archive {archive} refused: run {folder.name!r} is damaged ({found})")
        imported = []
        for folder in folders:
            target = self.runs_dir / folder.name
            if target.exists():
                continue
            meta = check_meta(_load_json(folder / "meta.json"))
            meta["imported"] = {"archive": archive.name, "at": time.time()}
            # A plain write: the staging folder is this import's alone until the rename (an fsync per run was
            # most of the time of a 4,000-run import).
            (folder / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
            try:
                folder.rename(target)
                imported.append(folder.name)
            except OSError:  # another kernel imported it at the same moment
                continue
        return imported


# Run files nbtune writes with private details (rewritten without them); other files go as they are.
_SCRUBBED = {"meta.json", "summary.json", "events.jsonl"}  # the artifact names no local path (and has a checksum)
_PRIVATE_KEYS = {"host", "pid", "pid_start", "traceback"}
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


def _export_run(tar: tarfile.TarFile, record: RunRecord, scrub: _Scrubber | None) -> None:
    """Add one run's exported files; data files only, nbtune's own rewritten by `scrub` when given."""
    for name in EXPORTED:
        top = record.path / name
        files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top] if top.is_file() else []
        for path in files:
            relative = path.relative_to(record.path).as_posix()
            if not path.name.endswith(ARCHIVED_SUFFIXES):
                log.warning("nbtune: export leaves out %s/%s (not JSON, YAML or safetensors)", record.id, relative)
            elif scrub is not None and relative in _SCRUBBED:
                data = scrub.file(relative, path.read_text(encoding="utf-8")).encode()
                info = tarfile.TarInfo(f"{record.id}/{relative}")
                info.size, info.mtime, info.mode = len(data), int(path.stat().st_mtime), 0o644
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.add(path, arcname=f"{record.id}/{relative}", recursive=False)


class _Scrubber:
    """Rewrites a run's own files without host, pid, tracebacks, absolute paths of this machine or secrets."""

    def __init__(self, record: RunRecord):
        secrets = [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 8]
        places = [(str(record.path.resolve()), record.id), (str(record.path), record.id),
                  (str(record.path.parent.parent.resolve()), "<store>"), (str(Path.home()), "~")]
        self.replacements = [(s, "<redacted>") for s in secrets] + [(a, b) for a, b in places if len(a) > 1]

    def file(self, relative: str, text: str) -> str:
        if relative.endswith(".jsonl"):
            return "".join(json.dumps(self.value(event)) + "\n" for event in _json_lines(text))
        value = self.value(json.loads(text))
        if relative == "summary.json" and isinstance(value, dict):
            value.update(artifact_path="artifact" if value.get("artifact_path") else None, checkpoint=None)
        return json.dumps(value, indent=2)

    def value(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items() if k not in _PRIVATE_KEYS}
        if isinstance(value, list):
            return [self.value(v) for v in value]
        return self.text(value) if isinstance(value, str) else value

    def text(self, text: str) -> str:
        for private, public in self.replacements:
            text = text.replace(private, public)
        return text


def _json_lines(text: str) -> list[Any]:
    """The events of an events.jsonl; a torn line (the process died mid-write) is left out."""
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


class _ImportBudget:
    """Admits an archive's members one by one as read: safe names and types, within the limits."""

    def __init__(self, archive: Path, max_bytes: int, max_files: int, max_file_bytes: int, max_expansion: float):
        self.archive = archive
        self.max_bytes = min(max_bytes, 64 * 2**20 + max_expansion * archive.stat().st_size)
        self.max_files, self.max_file_bytes = max_files, max_file_bytes
        self.files = self.bytes = 0

    def admit(self, m: tarfile.TarInfo) -> None:
        parts = Path(m.name).parts
        if (m.name.startswith(("/", "\\")) or ".." in parts or not parts or parts[0].startswith(".")
                or ":" in m.name or not (m.isfile() or m.isdir())):
            self.refuse(f"unsafe entry {m.name!r}")
        if not m.isfile():
            return
        if not m.name.endswith(ARCHIVED_SUFFIXES):
            self.refuse(f"{m.name!r} is not JSON, YAML or safetensors")
        self.files += 1
        self.bytes += m.size
        if m.size > self.max_file_bytes:
            self.refuse(f"{m.name!r} holds {m.size} bytes (at most {self.max_file_bytes}: max_file_bytes)")
        if self.files > self.max_files:
            self.refuse(f"more than {self.max_files} files (max_files)")
        if self.bytes > self.max_bytes:
            self.refuse(f"it expands to more than {int(self.max_bytes)} bytes (max_bytes, or max_expansion "
                        f"times the archive's {self.archive.stat().st_size} bytes)")

    def refuse(self, why: str) -> None:
        raise ValueError(f"archive {self.archive} refused: {why}")


def _remove_stale_temporaries(runs_dir: Path) -> None:
    """Remove the hidden folders of imports and deletes that a killed process left behind."""
    for path in runs_dir.glob(".*-*"):
        try:
            if path.name.startswith((".import-", ".deleting-")) and time.time() - path.stat().st_mtime > STALE_TEMPORARY_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue
