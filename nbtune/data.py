"""Examples for training: load the config's data source, split it, render its rows and tokenize.

Sources: a built-in dataset ("nbtune:capitals"), a local csv/jsonl/json/parquet file or `save_to_disk` folder,
in-memory rows (a list, or {split: rows} from a DatasetDict), or a datasets hub id. For causal LM a row renders
by its format (nbtune/formats.py) as text pieces marked trained or not: a prompt formatted by `prompt_template`
and its target, a chat conversation, an Alpaca instruction, or plain text; with `data.train_on: assistant` only
the trained pieces' tokens are trained on. Classification rows carry a label name or index.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbtune import formats, stages
from nbtune.chat_templates import Piece
from nbtune.config import EMBEDDED_PREFIX, IN_MEMORY, ConfigError, TuneConfig
from nbtune.tasks import TASKS

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
    packing: PackingCollator | None = None  # how batches are made under training.packing; None: padded


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
        if text is None and template is None and target is None and {"prompt", "completion"} <= example.keys():
            text, target = "prompt", "completion"
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
    if isinstance(source, dict):
        return _named_split(source, split, d, "the in-memory DatasetDict")
    if source.startswith(IN_MEMORY):
        raise ConfigError([("data.source", f"data.source {source} names in-memory rows that config.yaml does not "
                                           "keep; pass the rows (a list, DataFrame or Dataset) as data.source")])
    spec = builtin_dataset(source)
    if spec is not None:
        from nbtune import embedded

        if split not in spec.splits:
            field = "data.split" if split == d.split else "data.eval_split"
            raise ConfigError([(field, f"{field} must be one of {', '.join(spec.splits)} for {source} (got {split!r})")])
        return embedded.load_rows(spec.name, split)
    from nbtune import images

    if images.is_image_folder(source):
        return images.image_folder_split(config, split)
    path = local_file(source)
    if path is not None:
        _check_unsplit(d, split, "a single file")
        return _read_file(path)
    if _is_saved_dataset(source):
        from datasets import load_from_disk

        saved = load_from_disk(str(Path(source).expanduser()))
        if hasattr(saved, "to_list"):  # one Dataset: like a single file, no named splits
            _check_unsplit(d, split, "a saved Dataset (not a DatasetDict)")
            return saved.to_list()
        return _named_split({name: part for name, part in saved.items()}, split, d, source).to_list()
    from datasets import load_dataset

    try:
        dataset = load_dataset(source, split=split, revision=d.revision)
    except ValueError as err:  # datasets: 'Unknown split "validation". Should be one of ['train'].'
        if "split" not in str(err).lower():
            raise
        field = "data.split" if split == d.split else "data.eval_split"
        raise ConfigError([(field, f"{field} {split!r} is not a split of {source}: {err}")]) from None
    return dataset.to_list()


def _check_unsplit(d: Any, split: str, what: str) -> None:
    if split != d.split:
        raise ConfigError([("data.eval_split", f"data.eval_split {split!r}: {what} has no named splits; "
                                               "use a fraction like 0.1")])


def _named_split(splits: dict[str, Any], split: str, d: Any, where: str) -> Any:
    if split not in splits:
        field = "data.split" if split == d.split else "data.eval_split"
        raise ConfigError([(field, f"{field} must be one of {', '.join(splits)} for {where} (got {split!r})")])
    rows = splits[split]
    return list(rows) if isinstance(rows, list) else rows


def _is_saved_dataset(source: str) -> bool:
    """A folder written by datasets' `save_to_disk` (a Dataset's state.json or a DatasetDict's dataset_dict.json)."""
    folder = Path(source).expanduser()
    return folder.is_dir() and any((folder / name).is_file() for name in ("state.json", "dataset_dict.json"))


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
    if columns.template:
        names = {name for _, name, _, _ in string.Formatter().parse(columns.template) if name}
        for name in names & row.keys():
            _text(row, name)
        return columns.template.format(**row)
    return _text(row, columns.text)


def target_text(columns: Columns, row: dict[str, Any]) -> str | None:
    if columns.target is not None:
        return _text(row, columns.target)
    if columns.label is not None:  # classification as generation: the label word is the answer
        return " " + str(row[columns.label])
    return None


def _text(row: dict[str, Any], column: str | None) -> str:
    """A column's value as text; a list or mapping (a conversation) is refused, never trained on as its repr."""
    value = row[column]
    if isinstance(value, (list, dict)):
        raise ConfigError([("data.format", f"data.format: column {column!r} holds a {type(value).__name__} "
                                           f"({str(value)[:60]}...), not text; for a messages column use "
                                           "data.format chat (or auto), else name a text column")])
    return str(value)


def resolve_format(config: TuneConfig, row: dict[str, Any]) -> tuple[str, Columns]:
    """The rows' format (`data.format`, or detected from `row`) and the columns it reads, checked on `row`."""
    d = config.data
    spec = builtin_dataset(d.source)
    configured = any((d.text_column, d.target_column, d.label_column, d.prompt_template)) or bool(
        spec and (spec.target_column or spec.label_column or spec.prompt_template))
    fmt = d.format if d.format != "auto" else formats.detect(row, configured)
    formats.check_row(fmt, row)
    if fmt not in ("prompt-completion", "text"):
        return fmt, Columns(text=None, target=None, label=None, template=None)
    columns = resolve_columns(config, row)
    if fmt == "prompt-completion" and columns.target is None and columns.label is None and d.format == "auto":
        fmt = "text"
    return fmt, columns


def render(config: TuneConfig, fmt: str, columns: Columns, row: dict[str, Any], tokenizer: Any) -> list[Piece]:
    """A row as text pieces, each (text, trained by default): what the model sees and what its loss is on."""
    if fmt == "chat":
        return formats.chat_pieces(row["messages"], tokenizer, config.data.chat_template)
    if fmt == "instruction":
        return formats.instruction_pieces(row)
    if fmt in formats.SUPERVISED:  # prompt-completion, or text: all of it trained
        target = target_text(columns, row)
        if fmt == "text" or target is None:
            return [(format_prompt(columns, row) + (target or ""), True)]
        return [(format_prompt(columns, row), False), (target, True)]
    return formats.preview_pieces(fmt, row, tokenizer, config.data.chat_template)


def prepare(config: TuneConfig, tokenizer: Any) -> PreparedData:
    """Tokenize train and eval rows for the config's task and format (refused before any training when the
    supervised stage cannot train the format)."""
    task = config.model.task
    if TASKS[task].inputs == "image":
        return image_rows(task).prepare(config, tokenizer)
    train_rows, eval_rows = load_rows(config)
    fmt, columns = resolve_format(config, train_rows[0])
    stages.check_format(stages.STAGES["sft"], fmt)
    if task != "causal-lm" and fmt not in ("prompt-completion", "text"):
        raise ConfigError([("data.format", f"data.format {fmt} needs model.task causal-lm (got {task})")])
    labels: tuple[str, ...] = ()
    if TASKS[task].classifies:
        if columns.label is None:
            raise ValueError("data.label_column must name the class column for task seq-cls")
        labels = columns.labels or tuple(sorted({str(r[columns.label]) for r in train_rows + eval_rows}))
    counter = {"truncated": 0}
    max_length = config.data.max_length
    if task == "causal-lm":
        def encode(row: dict[str, Any]) -> dict[str, Any]:
            return encode_causal(config, fmt, columns, row, tokenizer, counter, max_length)
    else:
        encoder = {"seq2seq": _encode_seq2seq, "seq-cls": _encode_cls}[task]

        def encode(row: dict[str, Any]) -> dict[str, Any]:
            return encoder(tokenizer, columns, row, max_length, labels, counter)

    train, evaluation = [encode(r) for r in train_rows], [encode(r) for r in eval_rows]
    _check_targets_kept(config, counter, len(train) + len(evaluation))
    lengths = [len(x["input_ids"]) for x in train]
    return PreparedData(
        train=train, eval=evaluation, columns=columns, labels=labels,
        fingerprint=fingerprint(train_rows, eval_rows), truncated=counter["truncated"],
        stats={"format": fmt, "train_rows": len(train), "eval_rows": len(evaluation),
               "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths)},
        packing=packing_collator(config, tokenizer.pad_token_id) if config.training.packing else None,
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


def encode_causal(config: TuneConfig, fmt: str, columns: Columns, row: dict[str, Any], tok: Any,
                  counter: dict[str, int], max_length: int) -> dict[str, Any]:
    """Token ids and labels of a causal-LM row: each piece tokenized in turn (so a trained piece's tokens are
    exactly its own), labels -100 on untrained pieces unless `data.train_on: all`. A tokenizer's own chat template
    writes its special tokens itself; otherwise the first piece gets the tokenizer's (BOS), and prompt-completion,
    text and instruction rows end with EOS (trained), as a chat turn ends with its template's end token."""
    pieces = render(config, fmt, columns, row, tok)
    if not any(trained for _, trained in pieces):
        raise ConfigError([("data.format", f"data.format {fmt}: a row has nothing to train on (no assistant "
                                           f"turn): {str(row)[:100]}")])
    own = fmt == "chat" and formats.uses_own_template(tok, config.data.chat_template)
    train_all = config.data.train_on == "all"
    ids: list[int] = []
    labels: list[int] = []
    for i, (text, trained) in enumerate(pieces):
        piece = tok(text, add_special_tokens=i == 0 and not own)["input_ids"]
        ids += piece
        labels += piece if trained or train_all else [-100] * len(piece)
    if fmt != "chat" and tok.eos_token_id is not None:
        ids, labels = ids + [tok.eos_token_id], labels + [tok.eos_token_id]
    kept = _truncate(ids, max_length, counter)
    if all(label == -100 for label in labels[: len(kept)]):  # the whole target was cut off
        counter["no_target"] = counter.get("no_target", 0) + 1
        first = next(i for i, label in enumerate(labels) if label != -100)
        counter["longest_prompt"] = max(counter.get("longest_prompt", 0), first)
    return {"input_ids": kept, "labels": labels[: len(kept)]}


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


def image_rows(task: str) -> Any:
    """The module that reads and encodes an image task's rows: images (classification), captions
    (image-to-text) or diffusion (text-to-image)."""
    import importlib

    t = TASKS[task]
    return importlib.import_module("nbtune." + ("diffusion" if t.draws else "captions" if t.captions else "images"))


def collator(task: str, tokenizer: Any) -> Any:
    """The supervised collator of a task: padded token rows, or stacked images."""
    if TASKS[task].inputs == "image":
        return image_rows(task).Collator()
    return Collator(tokenizer.pad_token_id, task)


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


class PackingCollator:
    """Packs a batch's examples end to end, with no padding between them (`training.packing`): into rows as long
    as the batch's longest example, each example into the first row with room, longest first; or, with
    `one_row`, the whole batch into one row (attention computed per example: nbtune/packed_attention.py under
    sdpa, flash-attention varlen on GPU; its cost does not grow with the row).

    Each example's position ids restart at 0: with no attention mask, transformers (masking_utils
    find_packed_sequence_indices; flash-attention varlen on GPU) reads those restarts as the boundaries no token
    attends across. The first label of each example is -100, so nothing is trained to predict across a
    boundary. `use_cache: False` rides along, as a model that builds a cache ignores the restarts. Rows shorter
    than the longest end in filler tokens (pad id, position 0 each, label -100): each attends only to itself,
    and `real_tokens` leaves them out. Rows no longer than the longest example mean no row computes more
    attention than the padded batch would (eager computes each row's full square, masked).
    """

    def __init__(self, pad_token_id: int, one_row: bool = False):
        self.pad_token_id = pad_token_id
        self.one_row = one_row

    def rows(self, features: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """The batch's examples grouped into rows, longest first into the first row with room."""
        longest = max(len(f["input_ids"]) for f in features)
        rows: list[list[dict[str, Any]]] = []
        room: list[int] = []
        for f in sorted(features, key=lambda f: -len(f["input_ids"])):
            n = len(f["input_ids"])
            i = next((i for i, left in enumerate(room) if self.one_row or left >= n), None)
            if i is None:
                i = len(rows)
                rows.append([])
                room.append(longest)
            rows[i].append(f)
            room[i] -= n
        return rows

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows = self.rows(features)
        width = max(sum(len(f["input_ids"]) for f in row) for row in rows)
        ids, positions, labels = [], [], []
        for row in rows:
            row_ids, row_positions, row_labels = [], [], []
            for f in row:
                row_ids += f["input_ids"]
                row_positions += range(len(f["input_ids"]))
                row_labels += [-100, *f["labels"][1:]]
            filler = width - len(row_ids)
            ids.append(row_ids + [self.pad_token_id] * filler)
            positions.append(row_positions + [0] * filler)
            labels.append(row_labels + [-100] * filler)
        return {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(positions),
                "labels": torch.tensor(labels), "use_cache": False}

    def real_tokens(self, batch: dict[str, Any]) -> int:
        """Tokens of the examples in a packed batch: all but the fillers (the pad id at position 0; no example
        starts with the pad token)."""
        ids = batch["input_ids"]
        return int(ids.numel() - ((ids == self.pad_token_id) & (batch["position_ids"] == 0)).sum())


def packing_collator(config: TuneConfig, pad_token_id: int) -> PackingCollator:
    """The collator of `training.packing`: the whole batch in one row where attention runs per example (sdpa,
    flash-attention varlen), else rows as long as the batch's longest example (eager); see
    nbtune/packed_attention.py PACKED."""
    from nbtune.packed_attention import PACKED

    return PackingCollator(pad_token_id, one_row=PACKED[config.model.attn_implementation].one_row)


def preview(config: TuneConfig, tokenizer: Any = None, rows: int = 5) -> dict[str, Any]:
    """What the builder's data preview shows: the format, the first rows as the model sees them (`pieces`: text
    marked trained or not), row counts, token lengths and truncation."""
    if TASKS[config.model.task].inputs == "image":
        from nbtune import images

        return images.preview(config, rows)
    train_rows, eval_rows = load_rows(config)
    fmt, columns = resolve_format(config, train_rows[0])
    shown = [_shown_row(config, fmt, columns, r, tokenizer) for r in train_rows[:rows]]
    result: dict[str, Any] = {"format": fmt, "trainable": fmt in stages.for_config(config).formats, "rows": shown,
                              "train_rows": len(train_rows), "eval_rows": len(eval_rows)}
    if tokenizer is not None:
        lengths = [_token_length(config, fmt, columns, r, tokenizer) for r in train_rows]
        result["token_lengths"] = lengths
        result["truncated"] = sum(n > config.data.max_length for n in lengths)
    return result


def _shown_row(config: TuneConfig, fmt: str, columns: Columns, row: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    pieces = render(config, fmt, columns, row, tokenizer)
    if config.data.train_on == "all" and fmt in formats.SUPERVISED:
        pieces = [(text, True) for text, _ in pieces]
    if fmt not in ("prompt-completion", "text"):
        return {"input": "".join(text for text, _ in pieces), "target": None, "label": None, "pieces": pieces}
    target = target_text(columns, row) if columns.target or config.model.task != "seq-cls" else None
    return {"input": format_prompt(columns, row), "target": target, "pieces": pieces,
            "label": row.get(columns.label) if columns.label else None}


def _token_length(config: TuneConfig, fmt: str, columns: Columns, row: dict[str, Any], tokenizer: Any) -> int:
    if config.model.task == "causal-lm" and fmt in formats.SUPERVISED:
        return len(encode_causal(config, fmt, columns, row, tokenizer, {"truncated": 0}, 2**31)["input_ids"])
    return len(tokenizer("".join(text for text, _ in render(config, fmt, columns, row, tokenizer)))["input_ids"])


def _describe(source: Any) -> str:
    return f"<{len(source)} in-memory rows>" if isinstance(source, (list, dict)) else repr(source)
