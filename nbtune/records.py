"""The typed records of a run folder: its summary (summary.json) and its cache key (in meta.json).

Documented dataclasses that save and load themselves as JSON, in the manner of transformers' `TrainerState`.
Every summary field is optional: a run stopped before its first step or a failed run knows only some of them,
and a summary written by an older nbtune may lack newer ones. Keys this version does not know are kept in
`extra` (and written back), so reading and rewriting a newer summary loses nothing. Reading checks every
known field's type (and `check_meta` checks a meta.json): a damaged or forged file is a ValueError naming the
file, the field and the bad value, never a crash later in a listing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CacheKey:
    """What identifies a result: the config's content hash, the data actually used and the base weights.

    meta.json and the summary hold it under these same names; `key` (a hash of the other three) is what the
    store finds finished runs by.
    """

    key: str
    config_hash: str
    data_id: str
    model_id: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheKey:
        """The cache key in `data` (a meta.json or a summary's "cache"); other keys are ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"the cache key must be a JSON object (got {type(data).__name__})")
        for f in dataclasses.fields(cls):
            if not isinstance(data.get(f.name), str) or not data[f.name]:
                raise ValueError(f"cache key field {f.name!r} must be a non-empty string (got {data.get(f.name)!r})")
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


STATES = ("queued", "running", "finished", "stopped", "failed")
# meta.json's fields besides the cache key, with the JSON types each may hold (null is always allowed).
META_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,), "created": (int, float), "state": (str,), "pid": (int,), "pid_start": (str,), "host": (str,),
    "method": (str,), "started": (int, float), "ended": (int, float), "resumed_from": (str,), "imported": (dict,),
}


def check_meta(meta: Any) -> dict[str, Any]:
    """`meta` (a parsed meta.json) if it is one: an object with a cache key and fields of the right types."""
    if not isinstance(meta, dict):
        raise ValueError(f"meta.json must hold a JSON object (got {type(meta).__name__})")
    try:
        CacheKey.from_dict(meta)
    except ValueError as err:
        raise ValueError(f"meta.json: {err}") from None
    for name, types in META_TYPES.items():
        _check_type("meta.json", name, meta.get(name), types)
    if meta.get("state") is not None and meta["state"] not in STATES:
        raise ValueError(f"meta.json: 'state' must be one of {', '.join(STATES)} (got {meta['state']!r})")
    return meta


def _check_type(file: str, name: str, value: Any, types: tuple[type, ...]) -> None:
    """A ValueError naming the file and field unless `value` is null or one of `types` (a bool is no number)."""
    if value is None or (isinstance(value, types) and not (isinstance(value, bool) and bool not in types)):
        return
    wanted = " or ".join(_JSON_NAMES.get(t, t.__name__) for t in types)
    raise ValueError(f"{file}: {name!r} must be {wanted} (got {value!r:.80})")


_JSON_NAMES = {str: "text", int: "an integer", float: "a number", dict: "an object", list: "a list", bool: "true/false"}


@dataclass
class RunSummary:
    """How a run ended ("finished", "stopped" or "failed") and what it measured."""

    state: str = "failed"  # what a summary without a state has always been read as
    method: str | None = None
    step: int | None = None  # the optimizer steps done
    total_steps: int | None = None
    epoch: float | None = None
    learning_rate: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_percent: float | None = None
    final_train_loss: float | None = None
    final_eval_loss: float | None = None  # the last evaluation after training started
    best_eval_loss: float | None = None
    base_eval_loss: float | None = None  # the untuned model, evaluated at step 0
    final_eval_accuracy: float | None = None  # classification tasks
    base_eval_accuracy: float | None = None
    final_perplexity: float | None = None
    wall_time_s: float | None = None  # loading, training, evaluating and saving
    train_time_s: float | None = None
    tokens_seen: int | None = None
    tokens_per_s: float | None = None
    peak_memory: dict[str, float] = field(default_factory=dict)  # bytes: CUDA allocated/reserved, or CPU RSS
    device: str | None = None  # "cuda" or "cpu"
    cpu_threads: int | None = None
    precision: str | None = None  # what training.precision became here, and why
    precision_reason: str | None = None
    dtype: str | None = None  # what model.dtype became here, and why
    dtype_reason: str | None = None
    micro_batch_size: int | None = None  # what the run trained with at the end (training.on_oom shrink lowers it)
    gradient_accumulation_steps: int | None = None
    recoveries: list[Any] = field(default_factory=list)  # failures it went on from (nbtune/recovery.py Recovery)
    checkpoint: str | None = None  # a resumable checkpoint (stopped runs, failed runs that kept one)
    artifact_path: str | None = None
    artifact_bytes: int | None = None
    data: dict[str, Any] = field(default_factory=dict)  # fingerprint, truncated rows, row statistics, labels
    versions: dict[str, str] = field(default_factory=dict)  # library versions the run trained with
    estimated_peak_bytes: float | None = None  # the memory estimator's peak for this config
    measured_peak_bytes: float | None = None  # GPU runs only: CPU RSS is no match for a GPU estimate
    estimate_error_percent: float | None = None
    estimate_note: str | None = None
    reason: str | None = None  # why the run ended, in plain words (stopped, or the error)
    error: str | None = None  # failed runs: the error in plain words
    error_type: str | None = None
    traceback: str | None = None
    suggestions: list[Any] = field(default_factory=list)  # out of memory: the cheapest changes that would fit
    note: str | None = None
    cache: CacheKey | None = None  # what identifies the result (the run folder's meta.json holds the same)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this nbtune does not know, kept as read

    def to_dict(self) -> dict[str, Any]:
        """The summary as summary.json holds it: every field by name, then the unknown keys."""
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        """The summary in `data`; a known field of the wrong type is a ValueError naming it."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        for name, value in values.items():
            if name != "cache":
                _check_type("summary.json", name, value, _SUMMARY_TYPES[name])
        if values.get("cache") is not None:
            try:
                values["cache"] = CacheKey.from_dict(values["cache"])
            except ValueError as err:
                raise ValueError(f"summary.json: {err}") from None
        if values.get("state") not in (None, *STATES):
            raise ValueError(f"summary.json: 'state' must be finished, stopped or failed (got {values['state']!r})")
        for name in ("peak_memory", "data", "versions", "suggestions", "recoveries"):
            if values.get(name) is None:
                values.pop(name, None)  # absent or null in an older summary: the empty default
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_json(cls, text: str) -> RunSummary:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"summary.json must hold a JSON object (got {type(data).__name__})")
        return cls.from_dict(data)

    @property
    def labels(self) -> list[str]:
        """The class labels a classification run trained with (empty for other tasks)."""
        return list(self.data.get("labels") or [])


def _json_types(annotation: str) -> tuple[type, ...]:
    """The JSON types a summary field may hold, from its annotation ("int | None" -> int)."""
    head = annotation.split("[")[0].split("|")[0].strip()
    return {"str": (str,), "int": (int,), "float": (int, float), "dict": (dict,), "list": (list,)}.get(head, (object,))


_SUMMARY_TYPES = {f.name: _json_types(str(f.type)) for f in dataclasses.fields(RunSummary)}


def _plain(value: Any) -> Any:
    """JSON-ready: dataclasses (a cache key, suggestions) as dicts, lists item by item."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
