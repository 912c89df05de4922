"""Examples for training: load the config's data source, split it, apply the template and tokenize.

Sources: a built-in dataset ("nbtune:capitals"), a local csv/jsonl/json/parquet file, in-memory rows, or a
datasets hub id. For causal LM the prompt is formatted from the row by `prompt_template` and the target is
appended; only the target's tokens are trained on. Classification rows carry a label name or index.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbtune.config import EMBEDDED_PREFIX, ConfigError, TuneConfig

FILE_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MIN_TRAIN_ROWS = 2  # what a held-out fraction must leave for training, and no fewer than it holds out


class DataFileError(ValueError):
    """A data file that cannot be read as its format says: names the file and, where known, the line."""

    def __init__(self, path: Path, message: str, line: int | None = None):
        self.path, self.line, self.message = path, line, message
        super().__init__(f"{path}:{line}: {message}" if line is not None else f"{path}: {message}")


@dataclass
class Columns:
    """Which columns a source uses, after the built-in dataset's defaults are applied."""

    text: str | None
    target: str | None
    label: str | None
    template: str | None
    labels: tuple[str, ...] = ()


@dataclass
class PreparedData:
    """Tokenized train and eval examples plus what the run records about them."""

    train: list[dict[str, list[int] | int]]
    eval: list[dict[str, list[int] | int]]
    columns: Columns
    labels: tuple[str, ...]
    fingerprint: str
    truncated: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


def builtin_dataset(source: Any) -> Any:
    if isinstance(source, str) and source.startswith(EMBEDDED_PREFIX):
        from nbtune import embedded

        name = source[len(EMBEDDED_PREFIX):]
        if name not in embedded.DATASETS:
            allowed = ", ".join(EMBEDDED_PREFIX + n for n in embedded.DATASETS)
            raise ConfigError([("data.source", f"data.source must be one of the built-in datasets {allowed} "
                                               f"(got {source!r})")])
        return embedded.DATASETS[name]
    return None


def resolve_columns(config: TuneConfig, example: dict[str, Any] | None = None) -> Columns:
    """The columns and template to use, taking defaults from a built-in dataset and checking they exist."""
    d = config.data
    spec = builtin_dataset(d.source)
    text = d.text_column or (spec.text_column if spec else None)
    target = d.target_column or (spec.target_column if spec else None)
    label = d.label_column or (spec.label_column if spec else None)
    template = d.prompt_template or (spec.prompt_template if spec else None)
    labels = tuple(spec.labels) if spec else ()
    if example is not None:
        if text is None and template is None:
            text = "text" if "text" in example else None
        if text is None and template is None:
            raise ValueError(f"data.text_column must name the input column; the data has {sorted(example)}")
        for name, column in (("text_column", text), ("target_column", target), ("label_column", label)):
            if column is not None and column not in example:
                raise ValueError(f"data.{name} must be one of the data's columns {sorted(example)} (got {column!r})")
        if template is not None:
            try:
                template.format(**example)
            except (KeyError, IndexError) as err:
                raise ValueError(
                    f"data.prompt_template names a column the data lacks: {err} (columns: {sorted(example)})"
                ) from None
    return Columns(text=text, target=target, label=label, template=template, labels=labels)


def load_split(config: TuneConfig, split: str) -> list[dict[str, Any]]:
    """Raw rows of one split of the config's source."""
    d = config.data
    source = d.source
    if isinstance(source, list):
        return list(source)
    spec = builtin_dataset(source)
    if spec is not None:
        from nbtune import embedded

        if split not in spec.splits:
            field = "data.split" if split == d.split else "data.eval_split"
            raise ConfigError([(field, f"{field} must be one of {', '.join(spec.splits)} for {source} (got {split!r})")])
        return embedded.load_rows(spec.name, split)
    path = local_file(source)
    if path is not None:
        if split != d.split:
            raise ConfigError([("data.eval_split", f"data.eval_split {split!r}: a single file has no named splits; "
                                                   "use a fraction like 0.1")])
        return _read_file(path)
    from datasets import load_dataset

    try:
        dataset = load_dataset(source, split=split, revision=d.revision)
    except ValueError as err:  # datasets: 'Unknown split "validation". Should be one of ['train'].'
        if "split" not in str(err).lower():
            raise
        field = "data.split" if split == d.split else "data.eval_split"
        raise ConfigError([(field, f"{field} {split!r} is not a split of {source}: {err}")]) from None
    return dataset.to_list()


def local_file(source: Any) -> Path | None:
    """The local data file a source names (by its csv/jsonl/json/parquet suffix), or None for other sources.

    Raises FileNotFoundError naming the file when it does not exist.
    """
    if not isinstance(source, str) or Path(source).suffix not in FILE_FORMATS:
        return None
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no such data file (data.source)", source)
    return path


def _read_file(path: Path) -> list[dict[str, Any]]:
    if path.suffix in (".jsonl", ".json", ".csv"):
        text = _utf8_text(path)
        if path.suffix == ".json" and text.lstrip().startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as err:
                raise DataFileError(path, f"not valid JSON: {err.msg} (column {err.colno})", err.lineno) from None
        if path.suffix != ".csv":
            return [_json_row(path, number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        _check_csv(path, text)
    from datasets import load_dataset

    try:  # datasets infers the column types (numbers stay numbers); its errors name neither file nor line
        return load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train").to_list()
    except Exception as err:
        cause = err.__cause__ or err
        raise DataFileError(path, f"not a readable {FILE_FORMATS[path.suffix]} file: "
                                  f"{type(cause).__name__}: {str(cause).strip()[:300]}") from None


def _check_csv(path: Path, text: str) -> None:
    """Refuse a CSV whose rows do not have the header's number of fields, naming the line."""
    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    try:
        header = next(reader, None)
        if not header:
            raise DataFileError(path, "no header row (the first line must name the columns)", 1)
        for row in reader:
            if row and len(row) != len(header):
                raise DataFileError(path, f"{len(row)} fields where the header names {len(header)} columns "
                                          f"({', '.join(header)}); quote fields that contain a comma", reader.line_num)
    except csv.Error as err:
        raise DataFileError(path, f"not valid CSV: {err}", reader.line_num) from None


def _utf8_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataFileError(path, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                                  "save the file as UTF-8", line) from None


def _json_row(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataFileError(path, f"not valid JSON: {err.msg} (column {err.colno})", number) from None
    if not isinstance(row, dict):
        raise DataFileError(path, f"each line must be a JSON object of columns (got {type(row).__name__})", number)
    return row


def load_rows(config: TuneConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and eval rows after the split and the sample caps (deterministic for a seed)."""
    d = config.data
    train = load_split(config, d.split)
    if isinstance(d.eval_split, float):
        rows = list(train)
        random.Random(config.training.seed).shuffle(rows)
        n_eval = max(1, int(len(rows) * d.eval_split))
        eval_rows, train = rows[:n_eval], rows[n_eval:]
        _check_held_out(d, len(eval_rows), len(train))
    else:
        eval_rows = load_split(config, d.eval_split)
    if d.max_samples is not None:
        train = train[: d.max_samples]
    if d.max_eval_samples is not None:
        eval_rows = eval_rows[: d.max_eval_samples]
    if not train:
        raise ConfigError([("data.source", f"data.source {_describe(d.source)} has no training rows")])
    return train, eval_rows


def _check_held_out(d: Any, held_out: int, left: int) -> None:
    """A held-out fraction must leave MIN_TRAIN_ROWS training rows, and no fewer than it holds out."""
    if left >= max(MIN_TRAIN_ROWS, held_out):
        return
    raise ConfigError([("data.eval_split", f"data.eval_split {d.eval_split!r} holds out {held_out} of "
                                           f"{held_out + left} rows and leaves {left} for training; it must leave "
                                           f"at least {MIN_TRAIN_ROWS} and no fewer than it holds out: use a "
                                           "smaller fraction (e.g. 0.1) or more rows")])


def fingerprint(rows: list[dict[str, Any]], *more: list[dict[str, Any]]) -> str:
    """A content hash of the rows actually used."""
    digest = hashlib.sha256()
    for part in (rows, *more):
        for row in part:
            digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def format_prompt(columns: Columns, row: dict[str, Any]) -> str:
    return columns.template.format(**row) if columns.template else str(row[columns.text])


def target_text(columns: Columns, row: dict[str, Any]) -> str | None:
    if columns.target is not None:
        return str(row[columns.target])
    if columns.label is not None:  # classification as generation: the label word is the answer
        return " " + str(row[columns.label])
    return None


def prepare(config: TuneConfig, tokenizer: Any) -> PreparedData:
    """Tokenize train and eval rows for the config's task."""
    train_rows, eval_rows = load_rows(config)
    columns = resolve_columns(config, train_rows[0])
    task = config.model.task
    labels: tuple[str, ...] = ()
    if task == "seq-cls":
        if columns.label is None:
            raise ValueError("data.label_column must name the class column for task seq-cls")
        labels = columns.labels or tuple(sorted({str(r[columns.label]) for r in train_rows + eval_rows}))
    counter = {"truncated": 0}
    encode = {"causal-lm": _encode_causal, "seq2seq": _encode_seq2seq, "seq-cls": _encode_cls}[task]
    max_length = config.data.max_length

    def run(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [encode(tokenizer, columns, row, max_length, labels, counter) for row in rows]

    train, evaluation = run(train_rows), run(eval_rows)
    _check_targets_kept(config, counter, len(train) + len(evaluation))
    lengths = [len(x["input_ids"]) for x in train]
    return PreparedData(
        train=train, eval=evaluation, columns=columns, labels=labels,
        fingerprint=fingerprint(train_rows, eval_rows), truncated=counter["truncated"],
        stats={"train_rows": len(train), "eval_rows": len(evaluation),
               "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths)},
    )


def _check_targets_kept(config: TuneConfig, counter: dict[str, int], rows: int) -> None:
    """Refuse rows whose target was truncated away entirely: nothing to learn there, and a batch of only such
    rows has a loss of 0/0 (it ended as "the training loss became nan")."""
    lost = counter.get("no_target", 0)
    if not lost:
        return
    longest = counter["longest_prompt"]
    raise ConfigError([("data.max_length", (
        f"data.max_length {config.data.max_length} leaves no target tokens in {lost} of {rows} rows: their prompt "
        f"alone is up to {longest} tokens; raise data.max_length above {longest} or shorten "
        "data.prompt_template (or the prompts)"))])


def _truncate(ids: list[int], max_length: int, counter: dict[str, int]) -> list[int]:
    if len(ids) > max_length:
        counter["truncated"] += 1
        return ids[:max_length]
    return ids


def _encode_causal(tok: Any, columns: Columns, row: dict[str, Any], max_length: int, labels: tuple[str, ...],
                   counter: dict[str, int]) -> dict[str, Any]:
    prompt_ids = tok(format_prompt(columns, row), add_special_tokens=True)["input_ids"]
    target = target_text(columns, row)
    if target is None:
        ids = _truncate(prompt_ids + ([tok.eos_token_id] if tok.eos_token_id is not None else []), max_length, counter)
        return {"input_ids": ids, "labels": list(ids)}
    target_ids = tok(target, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        target_ids = target_ids + [tok.eos_token_id]
    ids = _truncate(prompt_ids + target_ids, max_length, counter)
    label_ids = ([-100] * len(prompt_ids) + target_ids)[: len(ids)]
    if len(prompt_ids) >= len(ids):  # the whole target was cut off
        counter["no_target"] = counter.get("no_target", 0) + 1
        counter["longest_prompt"] = max(counter.get("longest_prompt", 0), len(prompt_ids))
    return {"input_ids": ids, "labels": label_ids}


def _encode_seq2seq(tok: Any, columns: Columns, row: dict[str, Any], max_length: int, labels: tuple[str, ...],
                    counter: dict[str, int]) -> dict[str, Any]:
    ids = _truncate(tok(format_prompt(columns, row))["input_ids"], max_length, counter)
    target = target_text(columns, row) or ""
    label_ids = _truncate(tok(text_target=target.strip())["input_ids"], max_length, counter)
    return {"input_ids": ids, "labels": label_ids}


def _encode_cls(tok: Any, columns: Columns, row: dict[str, Any], max_length: int, labels: tuple[str, ...],
                counter: dict[str, int]) -> dict[str, Any]:
    ids = _truncate(tok(format_prompt(columns, row))["input_ids"], max_length, counter)
    value = row[columns.label]
    if isinstance(value, int) and not isinstance(value, bool) and str(value) not in labels:
        index = value
    else:
        if str(value) not in labels:
            raise ValueError(f"data.label_column value {value!r} is not among the labels {labels}")
        index = labels.index(str(value))
    return {"input_ids": ids, "labels": index}


class Collator:
    """Right-pads a batch; labels of padding are -100 (ignored by the loss)."""

    def __init__(self, pad_token_id: int, task: str):
        self.pad_token_id = pad_token_id
        self.task = task

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(f["input_ids"])
            attention[i, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention}
        if self.task == "seq-cls":
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        else:
            label_width = max(len(f["labels"]) for f in features)
            labels = torch.full((len(features), label_width), -100, dtype=torch.long)
            for i, f in enumerate(features):
                labels[i, : len(f["labels"])] = torch.tensor(f["labels"])
            batch["labels"] = labels
        return batch


def preview(config: TuneConfig, tokenizer: Any = None, rows: int = 5) -> dict[str, Any]:
    """What the builder's data preview shows: first formatted rows, row counts, token lengths, truncation."""
    train_rows, eval_rows = load_rows(config)
    columns = resolve_columns(config, train_rows[0])
    shown = [{"input": format_prompt(columns, r), "target": target_text(columns, r) if columns.target or
              config.model.task != "seq-cls" else None, "label": r.get(columns.label) if columns.label else None}
             for r in train_rows[:rows]]
    result: dict[str, Any] = {"rows": shown, "train_rows": len(train_rows), "eval_rows": len(eval_rows)}
    if tokenizer is not None:
        lengths = [len(tokenizer(format_prompt(columns, r) + (target_text(columns, r) or ""))["input_ids"])
                   for r in train_rows]
        result["token_lengths"] = lengths
        result["truncated"] = sum(n > config.data.max_length for n in lengths)
    return result


def _describe(source: Any) -> str:
    return f"<{len(source)} in-memory rows>" if isinstance(source, list) else repr(source)
