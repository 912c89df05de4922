"""What trained runs answer: `Run.generate` (greedy, sampling, beam search) and `Run.predict` (classification),
`stream` (one answer piece by piece, as it is generated), and `side_by_side`, the same prompts answered by the
untuned base and by every run, kept in the store.

A side-by-side table is saved as `<store root>/generations/<key>.json`, the key hashing the runs (names, ids,
cache keys), the base model, the prompts and the settings, so asking the same question again loads no model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import html
import json
import logging
import queue
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune import disk
from nbtune.config import SEED_MAX, TuneConfig

if TYPE_CHECKING:
    from nbtune.runner import Run

log = logging.getLogger("nbtune")

BATCH = 16  # prompts per generate call: bounds the memory of a long prompt list
RESERVED = ("prompt", "expected", "base")  # column names a run may not take


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated: greedy by default, sampling with `do_sample=True` (temperature, top_k,
    top_p), beam search with `num_beams > 1`. `seed` makes sampling reproducible; `chat_template` None uses the
    tokenizer's chat template when the run was trained on chat data (`for_run`), True requires one, False gives
    the prompts as they are."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    num_beams: int = 1
    seed: int = 0
    chat_template: bool | None = None

    def for_run(self, run: Run) -> GenerationSettings:
        """These settings with `chat_template` None decided for `run`: wrap prompts in the chat template only
        when the run was trained on chat data, or on conversational pairs or prompts (DPO, GRPO); a run trained
        on plain prompts answers them as they are."""
        if self.chat_template is not None:
            return self
        data = (run.summary.data or {}) if run.summary is not None else {}
        chat = data.get("format") == "chat" or bool(data.get("conversational"))
        return dataclasses.replace(self, chat_template=chat)

    @classmethod
    def of(cls, settings: Mapping[str, Any]) -> GenerationSettings:
        """The settings given by keyword, checked: a bad one is a ValueError naming it, its value and what is
        allowed (every problem at once)."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = [name for name in settings if name not in allowed]
        if unknown:
            raise ValueError(f"unknown generation setting {unknown[0]!r}; allowed: {', '.join(allowed)}")
        chosen = cls(**settings)
        problems = chosen.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return chosen

    def problems(self) -> list[str]:
        """What is wrong with these settings, one sentence each; empty when they are valid."""
        checks = [
            ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("do_sample", isinstance(self.do_sample, bool), "True or False"),
            ("num_beams", _is_int(self.num_beams) and self.num_beams >= 1, "an integer >= 1"),
            ("seed", _is_int(self.seed) and 0 <= self.seed <= SEED_MAX, f"an integer from 0 to {SEED_MAX}"),
            ("chat_template", self.chat_template in (None, True, False), "None, True or False"),
        ]
        if self.do_sample is True:
            checks += [
                ("temperature", _is_number(self.temperature) and self.temperature > 0, "> 0 when sampling"),
                ("top_k", self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1), "None or an integer >= 1"),
                ("top_p", self.top_p is None or (_is_number(self.top_p) and 0 < self.top_p <= 1), "None or in (0, 1]"),
            ]
        out = [f"{name} must be {what} (got {getattr(self, name)!r})" for name, ok, what in checks if not ok]
        if self.do_sample is False:  # sampling's settings would be ignored without a word
            out += [f"{name} applies only when sampling: set do_sample=True (got {name}={value!r} with "
                    f"do_sample=False)" for name, value in self._sampling().items() if not _is_default(self, name)]
        return out

    def _sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}

    def generation_config(self, tokenizer: Any, model: Any = None) -> Any:
        """These settings as transformers' GenerationConfig (sampling's settings only when sampling), with the
        model's own choice of KV cache (prefix tuning turns it off: methods/peft_methods.py says why)."""
        from transformers import GenerationConfig

        sampling: dict[str, Any] = {}
        if self.do_sample:  # top_k None: no top-k filtering (transformers would fill in 50; its 0 means none)
            sampling = {"temperature": self.temperature, "top_k": self.top_k or 0, "top_p": self.top_p or 1.0}
        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                num_beams=self.num_beams, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, **sampling,
                                use_cache=getattr(getattr(model, "generation_config", None), "use_cache", True))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """In words, e.g. "sampling (temperature 0.7, top-p 0.9, seed 0), up to 32 new tokens"."""
        if self.do_sample:
            parts = [f"{name.replace('_', '-')} {value}" for name, value in self._sampling().items()
                     if value is not None]
            how = f"sampling ({', '.join([*parts, f'seed {self.seed}'])})"
        else:
            how = "greedy"
        if self.num_beams > 1:
            how = f"beam search ({self.num_beams} beams)" + (f" with {how}" if self.do_sample else "")
        return f"{how}, up to {self.max_new_tokens} new tokens"


@dataclass(frozen=True)
class Sampling:
    """How text-to-image evaluations, `Run.draw` and side-by-side tables draw images (nbtune/diffusion.py): the
    pipeline's DDPM scheduler swapped for DPM-Solver's steps, the i-th prompt from seed `seed + i`."""

    steps: int = 20
    guidance_scale: float = 3.0
    seed: int = 0

    def describe(self) -> str:
        return (f"drawn with DPM-Solver ({self.steps} steps, guidance scale {self.guidance_scale}), the i-th "
                f"prompt from seed {self.seed} + i")


SAMPLING = Sampling()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_default(settings: GenerationSettings, name: str) -> bool:
    return getattr(settings, name) == getattr(GenerationSettings, name)


def prompt_list(prompts: str | Sequence[str], what: str = "prompts") -> list[str]:
    """One prompt or a sequence of them as a list; anything but non-empty text is a ValueError."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise ValueError(f"{what} must hold at least one text (got none)")
    bad = next((p for p in items if not isinstance(p, str)), None)
    if bad is not None:
        raise ValueError(f"{what} must be texts (got {type(bad).__name__} {bad!r})")
    return items


# ----- one model ------------------------------------------------------------------------------------------
def uses_chat_template(tokenizer: Any, chat_template: bool | None) -> bool:
    """Whether prompts go through the tokenizer's chat template; True without one is a ValueError."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is True and not has_template:
        raise ValueError(f"chat_template=True, but the tokenizer of {tokenizer.name_or_path!r} has no chat "
                         f"template; allowed: None or False")
    return has_template and chat_template is not False


def chat_prompts(tokenizer: Any, prompts: Sequence[str], chat_template: bool | None) -> list[str]:
    """The prompts as the model reads them: each a user turn of the chat template, or as given."""
    if not uses_chat_template(tokenizer, chat_template):
        return list(prompts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


def answers(model: Any, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings) -> list[str]:
    """What `model` generates after each prompt (the answer only, special tokens dropped), left-padded in
    batches so every prompt ends where its answer starts."""
    import torch

    from nbtune import captions

    if hasattr(model, "draw"):  # text-to-image (nbtune/diffusion.py): each answer an image, as a base64 PNG
        from nbtune import diffusion

        drawn = model.draw(prompts, dataclasses.replace(SAMPLING, seed=settings.seed))
        return [diffusion.png(image, size=96) for image in drawn]
    if isinstance(tokenizer, captions.ImageTextProcessor):  # image-to-text: the prompts are images
        return captions.describe(model, tokenizer, prompts, settings.generation_config(tokenizer, model),
                                 settings.seed)
    templated = uses_chat_template(tokenizer, settings.chat_template)
    texts = chat_prompts(tokenizer, prompts, settings.chat_template)
    config = settings.generation_config(tokenizer, model)
    tokenizer.padding_side = "left"
    out: list[str] = []
    for start in range(0, len(texts), BATCH):
        batch = tokenizer(texts[start:start + BATCH], return_tensors="pt", padding=True,
                          add_special_tokens=not templated).to(model.device)
        _check_fits(model, batch["input_ids"].shape[1], settings.max_new_tokens)
        devices = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():  # the user's own random state is kept
            torch.manual_seed(settings.seed)
            ids = model.generate(**batch, generation_config=config)
        prompt_length = 0 if model.config.is_encoder_decoder else batch["input_ids"].shape[1]
        out += tokenizer.batch_decode(ids[:, prompt_length:], skip_special_tokens=True)
    return out


def _check_fits(model: Any, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse answers that would run past the positions the model was trained on."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens must be <= {max(limit - prompt_tokens, 0)} for prompts of up to "
                         f"{prompt_tokens} tokens: the model has {limit} positions (got {max_new_tokens})")


def labels_of(model: Any, tokenizer: Any, texts: Sequence[str], names: Sequence[str], max_length: int) -> list[str]:
    """The label name a classifier gives each text (truncated to `max_length` tokens, as in training)."""
    import torch

    tokenizer.padding_side = "right"  # as it trained: the head reads the last token that is not padding
    out: list[str] = []
    for start in range(0, len(texts), BATCH):
        batch = tokenizer(list(texts[start:start + BATCH]), return_tensors="pt", padding=True, truncation=True,
                          max_length=max_length).to(model.device)
        with torch.no_grad():
            classes = model(**batch).logits.argmax(-1).tolist()
        out += [names[i] if i < len(names) else str(i) for i in classes]
    return out


# ----- one run --------------------------------------------------------------------------------------------
_TOKENIZERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()  # each Run's, loaded once


def _tokenizer(run: Run) -> Any:
    """The run's tokenizer, with the chat template its rows were rendered with (a named one included)."""
    if run not in _TOKENIZERS:
        from nbtune import models
        from nbtune.methods.artifacts import chat_template_of_run

        tokenizer = models.load_tokenizer(run.config)
        data = (run.summary.data or {}) if run.summary is not None else {}
        chat = chat_template_of_run(run.config, tokenizer, data.get("format"), bool(data.get("conversational")))
        if chat is not None:
            tokenizer.chat_template = chat[1]
        _TOKENIZERS[run] = tokenizer
    return _TOKENIZERS[run]


def generate(run: Run, prompts: str | Sequence[str], **settings: Any) -> list[str]:
    """`Run.generate`: the run's answers to `prompts` (see GenerationSettings); settings are checked, and the
    chat template looked up, before its model loads."""
    chosen = GenerationSettings.of(settings)
    texts = prompt_list(prompts)
    _refuse_classifier(run)
    chosen = chosen.for_run(run)
    tokenizer = _tokenizer(run)
    uses_chat_template(tokenizer, chosen.chat_template)
    model = run.model
    with _quiet(run):
        return answers(model, tokenizer, texts, chosen)


def draw(run: Run, prompts: str | Sequence[str], seed: int = 0) -> list[Any]:
    """`Run.draw`: a text-to-image run's images of `prompts`."""

    texts = prompt_list(prompts)
    if run.config.model.task != "text-to-image":
        raise ValueError(f"run {run.id} does not draw (model.task {run.config.model.task}); draw is for "
                         "text-to-image runs: use run.generate(prompts)")
    with _quiet(run):
        return run.model.draw(texts, dataclasses.replace(SAMPLING, seed=seed))


def _refuse_classifier(run: Run) -> None:
    task = run.config.model.task
    if task == "text-to-image":
        raise ValueError(f"run {run.id} draws images (model.task text-to-image): use run.draw(prompts)")
    if task in ("seq-cls", "image-cls"):
        use = "use run.predict(texts) for its label names" if task == "seq-cls" else "it has no run.generate"
        raise ValueError(f"run {run.id} is a classifier (model.task {task}): it picks a label, it does not "
                         f"generate text; {use}")


def _quiet(run: Run) -> Any:
    """What the libraries warn while a run's model answers goes to its log.txt, not the cell (peft's
    "Position ids are not supported" once per prompt-tuning batch)."""
    from nbtune import noise

    return noise.captured(run.record.log_path)


def predict(run: Run, texts: str | Sequence[str]) -> list[str]:
    """`Run.predict`: the label name a classification run gives each text (its model input, as
    `data.prompt_template` would format a row)."""
    items = prompt_list(texts, "texts")
    if run.config.model.task != "seq-cls":
        raise ValueError(f"run {run.id} generates text (model.task {run.config.model.task}); predict is for "
                         f"classification runs (seq-cls): use run.generate(prompts)")
    model = run.model
    return labels_of(model, _tokenizer(run), items, _label_names(run, model), run.config.data.max_length)


def _label_names(run: Run, model: Any) -> list[str]:
    """The class names a classification run trained with (its summary, else its model's config)."""
    names = run.summary.labels if run.summary is not None else []
    id2label = getattr(model.config, "id2label", None) or {}
    return names or [str(id2label[i]) for i in sorted(id2label)]


def confusion(run: Run, texts: Sequence[str], labels: Sequence[str]) -> dict[str, dict[str, int]]:
    """How often each true label (outer key) was predicted as each label (inner key) by a classification run."""
    return count_confusion(labels, predict(run, texts), _label_names(run, run.model))


def count_confusion(true: Sequence[str], predicted: Sequence[str], names: Sequence[str] = ()
                    ) -> dict[str, dict[str, int]]:
    """counts[true][predicted] over pairs, every label named in `names` or seen included (zeros too)."""
    if len(true) != len(predicted):
        raise ValueError(f"labels must hold one label per text ({len(predicted)} texts, got {len(true)} labels)")
    order = list(dict.fromkeys([*names, *map(str, true), *predicted]))
    counts = {t: dict.fromkeys(order, 0) for t in order}
    for t, p in zip(true, predicted, strict=True):
        counts[str(t)][p] += 1
    return counts


# ----- streaming ------------------------------------------------------------------------------------------
PIECE_TIMEOUT_S = 300.0  # the longest wait for the next piece: a stuck generate ends the stream, not the kernel


def streaming_settings(prompt: str, **settings: Any) -> GenerationSettings:
    """The settings of `stream`, checked with its prompt as `generate` checks them; beam search is refused (it
    settles on its answer only at the end). A bad one is a ValueError naming it."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty text (got {prompt!r})")
    chosen = GenerationSettings.of(settings)
    if chosen.num_beams > 1:
        raise ValueError(f"num_beams must be 1 when streaming (got {chosen.num_beams}): beam search settles on "
                         f"its answer only at the end; use generate for it")
    return chosen


def stream(answerer: Run | TuneConfig, prompt: str, **settings: Any) -> Iterator[str]:
    """The answer to `prompt` piece by piece as it is generated, by a run or by the untuned base model of a
    TuneConfig. Settings as in `generate` (greedy by default; `chat_template` None follows `for_run`, and for
    a base the config's `data.format` chat); they are checked, and the model loaded once, before this returns.
    An error in generation is raised from the iterator; closing it early stops the generation."""
    chosen = streaming_settings(prompt, **settings)
    if isinstance(answerer, TuneConfig):
        model, tokenizer, chosen, log_path = _base_for_stream(answerer, chosen)
    else:
        model, tokenizer, chosen, log_path = _run_for_stream(answerer, chosen)
    return _pieces(model, tokenizer, prompt, chosen, log_path)


def _run_for_stream(run: Run, settings: GenerationSettings) -> tuple[Any, Any, GenerationSettings, Path]:
    """A run's model (kept by the run, as for `generate`), tokenizer and settings, checked as `generate` does."""
    _refuse_classifier(run)
    chosen = settings.for_run(run)
    tokenizer = _tokenizer(run)
    uses_chat_template(tokenizer, chosen.chat_template)
    return run.model, tokenizer, chosen, run.record.log_path


def _base_for_stream(config: TuneConfig, settings: GenerationSettings) -> tuple[Any, Any, GenerationSettings, None]:
    """The untuned base model of `config` (loaded for this stream, then let go) with its tokenizer."""
    from nbtune import models

    if config.model.task == "seq-cls":
        raise ValueError("the base of a classifier (model.task seq-cls) has an untuned head: it does not "
                         "generate text")
    if settings.chat_template is None:
        settings = dataclasses.replace(settings, chat_template=config.data.format == "chat")
    tokenizer = models.load_tokenizer(config)
    uses_chat_template(tokenizer, settings.chat_template)
    return models.load_model(config, tokenizer=tokenizer).eval(), tokenizer, settings, None


def _pieces(model: Any, tokenizer: Any, prompt: str, settings: GenerationSettings,
            log_path: Path | None) -> Iterator[str]:
    """Run `model.generate` on a thread feeding transformers' TextIteratorStreamer, and yield its pieces; the
    thread is joined, its error re-raised here, and a wait past PIECE_TIMEOUT_S is a TimeoutError."""
    from transformers import TextIteratorStreamer

    templated = uses_chat_template(tokenizer, settings.chat_template)
    text = chat_prompts(tokenizer, [prompt], settings.chat_template)[0]
    inputs = tokenizer([text], return_tensors="pt", add_special_tokens=not templated).to(model.device)
    _check_fits(model, inputs["input_ids"].shape[1], settings.max_new_tokens)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=PIECE_TIMEOUT_S, skip_special_tokens=True)
    cancelled, failure = threading.Event(), []
    worker = threading.Thread(target=_generate_into, name="nbtune-stream", daemon=True,
                              args=(model, inputs, settings, streamer, cancelled, failure, log_path))
    worker.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
    except queue.Empty:
        raise TimeoutError(f"the model gave no new text for {PIECE_TIMEOUT_S:g} s; generation stopped") from None
    finally:
        cancelled.set()  # a consumer that stops early (or timed out) ends the generation at the next token
        worker.join(PIECE_TIMEOUT_S)
    if failure:
        raise failure[0]


def _generate_into(model: Any, inputs: Any, settings: GenerationSettings, streamer: Any,
                   cancelled: threading.Event, failure: list[BaseException], log_path: Path | None) -> None:
    """The stream's thread: generate into `streamer`; an error is kept in `failure` and the stream ended."""
    import torch

    from nbtune import noise

    devices = [model.device] if model.device.type == "cuda" else []
    quiet = noise.captured(log_path) if log_path is not None else contextlib.nullcontext()  # warnings: the run's log
    try:
        with quiet, torch.random.fork_rng(devices=devices), torch.no_grad():  # the user's random state is kept
            torch.manual_seed(settings.seed)
            model.generate(**inputs, generation_config=settings.generation_config(streamer.tokenizer, model),
                           streamer=streamer, stopping_criteria=_until(cancelled))
    except BaseException as err:  # re-raised on the consumer's thread
        failure.append(err)
        streamer.end()


def _until(cancelled: threading.Event) -> Any:
    """transformers' stopping criteria that end generation once `cancelled` is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Cancelled()])


# ----- side by side ---------------------------------------------------------------------------------------
@dataclass
class SideBySide:
    """The same prompts answered by the untuned base (generation only) and by every run: `answers[column]`
    holds one answer (or label name) per prompt. `expected` holds the true labels or answers when given."""

    prompts: list[str]
    answers: dict[str, list[str]]
    task: str
    settings: dict[str, Any]
    expected: list[str] | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # runs without a trained model: why
    key: str = ""
    served_from_store: bool = False  # read back from the store (no model loaded); not saved

    @property
    def columns(self) -> list[str]:
        return list(self.answers)

    @property
    def rows(self) -> list[dict[str, str]]:
        """One dict per prompt: "prompt", "expected" when known, then one answer per column."""
        return [{"prompt": p, **({"expected": self.expected[i]} if self.expected else {}),
                 **{c: a[i] for c, a in self.answers.items()}} for i, p in enumerate(self.prompts)]

    @property
    def classifies(self) -> bool:
        return self.task == "seq-cls"

    @property
    def captions(self) -> bool:
        """The prompts are images (image-to-text) and the answers their captions."""
        return self.task == "image-to-text"

    @property
    def draws(self) -> bool:
        """The answers are images drawn from the prompts (text-to-image), as base64 PNGs."""
        return self.task == "text-to-image"

    @property
    def accuracy(self) -> dict[str, float]:
        """With the true labels (classification) or captions (exact match, as evaluations score them): the
        fraction of prompts each column gets right."""
        if self.captions and self.expected:
            from nbtune import rewards

            return {c: sum(rewards.exact_match(a, self.expected)) / len(self.prompts) for c, a in self.answers.items()}
        if not (self.classifies and self.expected):
            return {}
        n = len(self.prompts)
        return {c: sum(p == t for p, t in zip(a, self.expected, strict=True)) / n for c, a in self.answers.items()}

    @property
    def confusion(self) -> dict[str, dict[str, dict[str, int]]]:
        """Classification with true labels: counts[column][true][predicted]."""
        if not (self.classifies and self.expected):
            return {}
        return {c: count_confusion(self.expected, a) for c, a in self.answers.items()}

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "served_from_store"}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SideBySide:
        known = {f.name for f in dataclasses.fields(cls)} - {"served_from_store"}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_html(self) -> str:
        """A compact table (prompts and answers escaped), what was skipped, and for classification the accuracy
        and confusion counts per column."""
        return side_by_side_html(self)

    def _repr_html_(self) -> str:
        return self.to_html()


def side_by_side(runs: Mapping[str, Run | None], prompts: str | Sequence[str], base: TuneConfig | None = None,
                 *, expected: Sequence[str] | None = None, **settings: Any) -> SideBySide:
    """`prompts` answered by the untuned base (the model of `base`, default: the first run's config, no
    adapter) and by every run with a trained model; for classification runs, their labels (no base column:
    an untuned classification head is random), with accuracy and confusion when `expected` holds the true
    labels. Kept in the store of the first run: the same question again loads no model."""
    asked = GenerationSettings.of(settings)
    texts = prompt_list(prompts)
    answering, skipped = _answering(runs)
    first = next(iter(answering.values()))
    chosen = asked.for_run(first)  # the base answers as the runs were trained: chat-templated or not
    base_config = base or first.config
    truth = [str(value) for value in expected] if expected is not None else None  # label names are text
    if truth is not None and len(truth) != len(texts):
        raise ValueError(f"expected must hold one answer per prompt ({len(texts)} prompts, got {len(truth)})")
    key = _key(answering, base_config, texts, chosen, truth)
    path = first.path.parent.parent / "generations" / f"{key}.json"
    kept = _read(path, key)
    if kept is not None:
        return kept
    task = first.config.model.task
    with _quiet(first):  # what the libraries warn while the base answers goes to the first run's log.txt
        columns = {} if task == "seq-cls" else {"base": _base_answers(base_config, texts, chosen)}
    for name, run in answering.items():  # each run as it was trained (runs of other stages may differ)
        columns[name] = _run_answers(run, texts, asked.for_run(run))
    result = SideBySide(texts, columns, task, chosen.to_dict(), truth, skipped, key)
    _save(path, result)
    return result


def _answering(runs: Mapping[str, Run | None]) -> tuple[dict[str, Run], dict[str, str]]:
    """The runs that have a trained model, and why each other one has no column."""
    taken = [name for name in runs if name in RESERVED]
    if taken:
        raise ValueError(f"a run may not be called {taken[0]!r} in a side-by-side table (its columns "
                         f"{', '.join(RESERVED)} are taken)")
    answering, skipped = {}, {}
    for name, run in runs.items():
        if run is None or not run.artifact_path.exists():
            skipped[name] = "not trained" if run is None else f"{run.status}: {run.error or 'no trained model'}"
        else:
            answering[name] = run
    if not answering:
        raise ValueError(f"no run has a trained model to answer with ({', '.join(skipped) or 'no runs given'})")
    tasks = {run.config.model.task for run in answering.values()}
    if len(tasks) > 1:
        raise ValueError(f"runs of different tasks cannot answer side by side ({', '.join(sorted(tasks))})")
    return answering, skipped


def _key(runs: Mapping[str, Run], base: TuneConfig, prompts: Sequence[str], settings: GenerationSettings,
         expected: Sequence[str] | None) -> str:
    """What identifies a table: each run's name, id and cache key, the base model, the prompts, the settings."""
    from nbtune import models

    m = base.model
    identity = {
        "runs": [[name, run.id, run.record.meta.get("key")] for name, run in runs.items()],
        "base": [m.name_or_path, m.revision, m.dtype, models.model_identity(base)],
        "prompts": list(prompts), "expected": expected,
        "settings": {k: v for k, v in settings.to_dict().items() if k != "seed" or settings.do_sample},
    }  # the seed changes nothing without sampling
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _read(path: Path, key: str) -> SideBySide | None:
    """The table kept at `path` for `key`, or None (absent; a damaged or foreign file is said and answered
    again)."""
    if not path.exists():
        return None
    try:
        kept = SideBySide.from_dict(json.loads(path.read_text(encoding="utf-8")))
        if kept.key != key:
            raise ValueError(f"it holds the table of key {kept.key!r}")
    except (ValueError, TypeError, OSError) as err:
        log.warning("nbtune: %s could not be read (%s); generating again", path, err)
        return None
    kept.served_from_store = True
    return kept


def _save(path: Path, result: SideBySide) -> None:
    """Keep the table atomically; one that cannot be written (a full disk) is said and still returned."""
    from nbtune.store import write_atomic

    try:
        with disk.writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(result.to_dict(), indent=1))
    except OSError as err:
        log.warning("nbtune: the side-by-side table was not kept in the store (%s)", err)


def _base_answers(config: TuneConfig, prompts: Sequence[str], settings: GenerationSettings) -> list[str]:
    """What the untuned base model of `config` answers (loaded for this call, then let go)."""
    from nbtune import models

    tokenizer = models.load_tokenizer(config)
    uses_chat_template(tokenizer, settings.chat_template)
    model = models.load_model(config, tokenizer=tokenizer).eval()
    return answers(model, tokenizer, prompts, settings)


def _run_answers(run: Run, prompts: Sequence[str], settings: GenerationSettings) -> list[str]:
    """A run's answers (or labels). Its model is loaded for this call unless the run holds it already, so a
    table of many runs holds one model at a time."""
    tokenizer = _tokenizer(run)
    uses_chat_template(tokenizer, settings.chat_template)
    with _quiet(run):  # the libraries' load reports and warnings too
        model = run._model
        if model is None:
            from nbtune import training

            model = training.load_trained_model(run)
        if run.config.model.task == "seq-cls":
            return labels_of(model, tokenizer, prompts, _label_names(run, model), run.config.data.max_length)
        return answers(model, tokenizer, prompts, settings)


# ----- html -----------------------------------------------------------------------------------------------
_STYLE = ("border-collapse:collapse;font-size:12px", "border:1px solid #ccc;padding:2px 6px;vertical-align:top;"
          "white-space:pre-wrap;text-align:left")


def _how_answered(table: SideBySide) -> str:
    """How the answers were made, in words: the drawing settings (text-to-image), else the generation's."""
    settings = GenerationSettings(**table.settings)
    return dataclasses.replace(SAMPLING, seed=settings.seed).describe() if table.draws else settings.describe()


def side_by_side_html(table: SideBySide) -> str:
    """The table as HTML: one row per prompt, one column per model; prompts and answers escaped."""
    cell = _STYLE[1]
    head = ["prompt", *(["expected"] if table.expected else []), *table.columns]
    lines = [f"<p>{html.escape(_how_answered(table))}</p>"]
    lines += [f'<table class="nbtune-generations" style="{_STYLE[0]}">', "<thead><tr>"
              + "".join(f'<th style="{cell}">{html.escape(h)}</th>' for h in head) + "</tr></thead><tbody>"]
    for row in table.rows:
        lines.append("<tr>" + "".join(_cell(row, h, cell, table) for h in head) + "</tr>")
    accuracy = table.accuracy
    if accuracy:
        lines.append(f'<tr><th style="{cell}" colspan="{len(head) - len(table.columns)}">accuracy</th>'
                     + "".join(f'<td style="{cell}">{accuracy[c]:.3f}</td>' for c in table.columns) + "</tr>")
    lines.append("</tbody></table>")
    lines += [_confusion_html(name, counts) for name, counts in table.confusion.items()]
    if table.skipped:
        lines.append("<p>No answers from: " + "; ".join(
            f"{html.escape(n)} ({html.escape(why)})" for n, why in table.skipped.items()) + "</p>")
    return "\n".join(lines)


def _cell(row: Mapping[str, str], column: str, style: str, table: SideBySide) -> str:
    """One cell, escaped: a wrong label or caption in red; an image prompt as its thumbnail and file name."""
    if column == "prompt" and table.captions:
        return f'<td style="{style}">{_image_html(row[column])}</td>'
    if column not in ("prompt", "expected") and table.draws:
        return (f'<td style="{style}"><img alt="{html.escape(column)}" src="data:image/png;base64,{row[column]}" '
                'style="width:64px;image-rendering:pixelated"></td>')
    from nbtune.rewards import normalise

    same = (lambda a, b: normalise(a) == normalise(b)) if table.captions else (lambda a, b: a == b)
    checked = table.classifies or table.captions
    wrong = checked and column not in ("prompt", "expected") and "expected" in row and not same(row[column],
                                                                                                row["expected"])
    mark = ";color:#b00" if wrong else ""
    return f'<td style="{style}{mark}">{html.escape(row[column])}</td>'


def _image_html(path: str) -> str:
    """An image prompt: its thumbnail (when the file is still there) and its file name."""
    from nbtune import images
    from nbtune.config import ConfigError

    name = html.escape(Path(path).name)
    try:
        png = images.thumbnail_png(path, size=48)
    except ConfigError:
        return name
    return f'<img alt="{name}" src="data:image/png;base64,{png}" style="width:48px;image-rendering:pixelated"> {name}'


def _confusion_html(name: str, counts: Mapping[str, Mapping[str, int]]) -> str:
    """One column's confusion counts: true labels down, predicted labels across."""
    style = _STYLE[1]
    predicted = list(next(iter(counts.values()), {}))
    head = "".join(f'<th style="{style}">{html.escape(p)}</th>' for p in predicted)
    body = "".join(f'<tr><th style="{style}">{html.escape(t)}</th>'
                   + "".join(f'<td style="{style}">{row[p]}</td>' for p in predicted) + "</tr>"
                   for t, row in counts.items())
    return (f'<table class="nbtune-confusion" style="{_STYLE[0]};display:inline-table;margin:4px">'
            f'<caption>{html.escape(name)}: true ↓ predicted →</caption><tr><th></th>{head}</tr>{body}</table>')
