"""`nbtune export CONFIG --to script DIR`: a standalone, readable training script for one config.

The script (`train.py`) imports torch, transformers and peft (TRL for dpo, kto and grpo), never nbtune. It reads
the rows nbtune would train on from `data/*.jsonl`, renders and tokenizes them as nbtune/data.py does, loads
the base (the embedded one is copied into `model/`), applies the method with the peft config nbtune's registry
resolves (or trains exactly the parameters a selective method chooses), trains with the TrainingArguments
nbtune sets (training._shared_arguments) and writes a run folder of nbtune's store with the artifact nbtune
would save, plus a `.tar.gz` of it for `nbtune import`. Methods whose model or loss only nbtune builds
(bottleneck adapters, distillation) are refused, naming method.name.
"""

from __future__ import annotations

import inspect
import pprint
import textwrap
from pathlib import Path
from typing import Any

from nbtune import export as ex
from nbtune.config import TuneConfig
from nbtune.tasks import TASKS, TEXT_TASKS

SCRIPT = "train.py"
PAIR = ("prompt", "chosen", "rejected")


def check_expressible(config: TuneConfig) -> None:
    """Refuse, before anything loads, a config whose training needs nbtune's own code."""
    from nbtune import rewards
    from nbtune.methods import registry

    method = registry.get(config.method.name)
    if TASKS[config.model.task].inputs != "text":
        raise ex.ExportRefused("model.task", (
            f"model.task {config.model.task}: the script export writes text tasks only "
            f"({', '.join(TEXT_TASKS)}); image tasks train with nbtune, and their artifacts load without it "
            "(nbtune_run.json says how)"))
    if method.compute_loss is not None:
        raise ex.ExportRefused("method.name", (
            f"method.name {method.name}: the method computes its own training loss inside nbtune (e.g. against a "
            "teacher model), which a plain transformers script cannot express; export another method"))
    if method.save is not None or method.load_trained is not None:
        raise ex.ExportRefused("method.name", (
            f"method.name {method.name}: its layers are nbtune's own (no peft or transformers class builds them), "
            "so a script without nbtune cannot train or save them; export a peft method (lora, ia3, ...) or "
            "train it with nbtune and `nbtune export RUN --merged DIR`"))
    if config.training.stage == "grpo":
        own = [name for name in config.training.rewards if name not in rewards.BUILT_IN]
        if own:
            raise ex.ExportRefused("training.rewards", (
                f"training.rewards names {', '.join(own)}, reward(s) registered in Python in this session; the "
                f"script carries only nbtune's built-in rewards ({', '.join(rewards.BUILT_IN)})"))


def not_carried(config: TuneConfig) -> list[tuple[str, str]]:
    """What nbtune does for this config that the script does not, in words (README.txt and the command say it)."""
    t, out = config.training, []
    if t.packing and config.training.stage == "sft":
        out.append(("training.packing", "the script pads each batch instead of packing it: the same loss, "
                                        "more padding computed"))
    if t.loss_implementation == "chunked" and config.training.stage == "sft":
        out.append(("training.loss_implementation", "the script computes the standard loss (the same values; the "
                                                    "full logits take memory)"))
    if t.loss_implementation == "liger" and config.training.stage == "sft":
        out.append(("training.loss_implementation", "liger through TrainingArguments.use_liger_kernel where "
                                                    "liger-kernel and CUDA are present, else the standard loss"))
    if t.on_oom == "shrink":
        out.append(("training.on_oom", "a CUDA out-of-memory ends the script; nbtune would halve the micro-batch, "
                                       "double the accumulation and go on"))
    if t.stage in ("dpo", "kto"):
        out.append(("training.stage", "evaluations log TRL's reward metrics, not nbtune's held-out preference "
                                      "accuracy (chosen scored above rejected by the model)"))
    if t.stage == "grpo":
        out.append(("training.stage", "evaluations are TRL's (sampled completions scored by the rewards), not "
                                      "nbtune's greedy exact match"))
    if config.method_params.get("init") == "text" and config.method.name == "prompt-tuning":
        out.append(("method.init", "text: peft's own TEXT init (init_text's token embeddings, repeated), which "
                                   "tokenizes init_text with the tokenizer's special tokens where it adds any"))
    if t.precision == "auto" or config.model.dtype == "auto":
        out.append(("training.precision", "auto is resolved as on a GPU (bf16 where native, else fp16) or fp32 on "
                                          "any CPU; nbtune also picks bf16 on CPUs with AMX or AVX512-BF16 for "
                                          "models of 3M+ parameters"))
    return out


def write(resolved: ex.Resolved, directory: Path) -> ex.Exported:
    """Write train.py, its data, model (embedded), config, accelerate config and README.txt into `directory`."""
    from nbtune import store

    r = resolved
    _check_method_hooks(r)
    files = [ex.write_jsonl(directory / "data" / "train.jsonl", _rows(r, r.train_rows)),
             ex.write_jsonl(directory / "data" / "eval.jsonl", _rows(r, r.eval_rows))]
    if r.embedded_model:
        ex.copy_embedded_model(directory)
        files.append(directory / "model")
    (directory / "config.yaml").write_text(r.config.to_yaml())
    files.append(directory / "config.yaml")
    key = store.cache_key(r.config)
    files += _artifact_record(r, directory)
    script = directory / SCRIPT
    script.write_text(script_text(r, key))
    script.chmod(0o755)
    files.append(script)
    files.append(ex.write_accelerate_config(r, directory))
    commands = [ex.launch_command(r.config, SCRIPT)]
    notes = not_carried(r.config)
    (directory / "README.txt").write_text(_readme(r, commands, notes))
    files.append(directory / "README.txt")
    run = f"python {SCRIPT}" if r.config.distributed.strategy == "none" else commands[0]
    return ex.Exported(directory, "script", files, f"cd {directory.name} && {run}", notes)


def _check_method_hooks(r: ex.Resolved) -> None:
    """Callbacks during training: AdaLoRA's budget step is written into the script; others are nbtune's own."""
    if r.method.callbacks is not None and (r.peft or {}).get("peft_type") != "ADALORA":
        raise ex.ExportRefused("method.name", (
            f"method.name {r.method.name}: it changes the model during training through nbtune's callbacks, "
            "which the script cannot carry; export another method"))


def _rows(r: ex.Resolved, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows as the script reads them: as loaded for supervised and preference stages, as GRPO reads them
    (prompt, reference, the other plain columns) for grpo."""
    if r.stage.name == "grpo":
        from nbtune.stage_grpo import example

        return [example(r.fmt, row) for row in rows]
    return rows


def _artifact_record(r: ex.Resolved, directory: Path) -> list[Path]:
    """artifact_record/nbtune_run.json and README.md: what nbtune writes beside a run's artifact, which the
    script copies into the artifact it saves."""
    from types import SimpleNamespace

    from nbtune.methods import artifacts
    from nbtune.methods.registry import MethodContext

    model_config = SimpleNamespace(id2label=dict(enumerate(r.labels))) if r.labels else None
    ctx = MethodContext(task=r.config.model.task, model_config=model_config, dtype="fp32")
    chat = (r.chat_template_name, r.chat_template) if r.chat_template else None
    record = artifacts.describe(r.config, r.method, ctx, artifacts.artifact_format(r.method), chat)
    record["trained_by"] = f"{SCRIPT}, exported by nbtune (nbtune export --to script)"
    folder = directory / "artifact_record"
    folder.mkdir()
    artifacts.write_record(folder, record)
    return [folder / artifacts.RUN_FILE, folder / "README.md"]


def _readme(r: ex.Resolved, commands: list[str], notes: list[tuple[str, str]]) -> str:
    lines = [
        f"{r.method.name} on {r.config.model.name_or_path} ({r.stage.name}), exported by nbtune",
        "",
        f"{SCRIPT}       the training script (torch, transformers, peft{', trl' if r.stage.name != 'sft' else ''};"
        " no nbtune)",
        "config.yaml    the nbtune config it was written from",
        "data/          the rows it trains on (train.jsonl) and evaluates on (eval.jsonl)",
    ]
    if r.embedded_model:
        lines.append("model/         the embedded base model (nbtune:tiny)")
    lines += ["accelerate_config.yaml  accelerate's settings for the config's distributed section", "",
              "Run it on one machine:", f"  python {SCRIPT}", "", "Launch it as the distributed section says:"]
    lines += [f"  {c}" for c in commands]
    if r.config.distributed.nodes > 1:
        lines.append(f"on each of the {r.config.distributed.nodes} nodes, with NODE_RANK (0 to "
                     f"{r.config.distributed.nodes - 1}) and MAIN_NODE_ADDRESS (node 0's address) set.")
    lines += ["", "It writes output/runs/<run id>/ (a run folder of nbtune's store) and output/<run id>.tar.gz;",
              "  nbtune import output/<run id>.tar.gz", "adds the run to a store. Its artifact/ folder loads "
              "without nbtune (artifact/README.md says how)."]
    if notes:
        lines += ["", "What nbtune does for this config that the script does not:"]
        lines += [f"- {name}: {why}" for name, why in notes]
    return "\n".join(lines) + "\n"


# ----- the script ------------------------------------------------------------------------------------------

def script_text(r: ex.Resolved, key: Any) -> str:
    """The whole of train.py for a resolved config."""
    blocks = [_header(r), _imports(r), _constants(r, key), _data_block(r), _model_block(r), _method_block(r),
              _arguments_block(r), _trainer_block(r), _RUN_FOLDER, _main_block(r)]
    text = "\n\n\n".join(textwrap.dedent(b).strip("\n") for b in blocks if b) + "\n"
    compile(text, SCRIPT, "exec")  # a generated script that does not parse is a bug here, not the user's
    return text


def _lit(value: Any, indent: int = 0) -> str:
    """A Python literal of a JSON-like value, wrapped at 100 columns, continuation lines indented."""
    text = pprint.pformat(value, width=100 - indent, sort_dicts=False)
    return text.replace("\n", "\n" + " " * indent)


def _header(r: ex.Resolved) -> str:
    c = r.config
    commands = [ex.launch_command(c, SCRIPT)]
    trl = ", trl" if r.stage.name != "sft" else ""
    lines = [
        "#!/usr/bin/env python3",
        f'"""{r.method.name} on {c.model.name_or_path} ({r.stage.name}), exported by nbtune from config.yaml.',
        "",
        f"A standalone training script: torch, transformers, peft{trl}, accelerate; not nbtune. Run it with",
        f"    python {SCRIPT}",
        "or launch it as the config's distributed section says (accelerate_config.yaml beside it):",
        *[f"    {cmd}" for cmd in commands],
        "",
        "It trains on data/train.jsonl, evaluates on data/eval.jsonl and writes output/runs/<run id>/, a run",
        "folder of nbtune's store, and output/<run id>.tar.gz, which `nbtune import` adds to a store. The",
        "artifact/ folder in it loads without nbtune (its README.md says how).",
    ]
    notes = not_carried(c)
    if notes:
        lines += ["", "What nbtune does for this config that this script does not:"]
        lines += [line for name, why in notes for line in textwrap.wrap(f"- {name}: {why}", 110,
                                                                         subsequent_indent="  ")]
    lines.append('"""')
    return "\n".join(lines)


def _imports(r: ex.Resolved) -> str:
    """The script's imports, grouped and sorted as isort does: the standard library, then torch and friends."""
    stage = r.stage.name
    standard = ["argparse", "hashlib", "json", "math", "random" if stage == "kto" else None,
                "re" if stage == "grpo" else None, "shutil", "sys", "tarfile", "time"]
    typing = []
    if stage == "grpo":
        typing.append("from collections.abc import Sequence")
    typing.append("from pathlib import Path")
    if stage == "grpo" or (r.peft or {}).get("prompt_learning"):
        typing.append("from typing import Any")
    names = [_auto_class(r), "AutoTokenizer", "set_seed"]
    if (r.peft or {}).get("peft_type") == "ADALORA":
        names.append("TrainerCallback")
    if r.quantization:
        names.append("BitsAndBytesConfig")
    if stage == "sft":
        names += ["Trainer", "TrainingArguments"]
    third = ["from datasets import Dataset"] if stage != "sft" else []
    if r.peft:
        extra = ", prepare_model_for_kbit_training" if r.quantization else ""
        third.append(f"from peft import {r.peft['class']}, get_peft_model{extra}")
    third.append(f"from transformers import {', '.join(sorted(names))}")
    if stage != "sft":
        trl = {"dpo": "DPOConfig, DPOTrainer", "kto": "KTOConfig, KTOTrainer", "grpo": "GRPOConfig, GRPOTrainer"}
        third.append(f"from trl import {trl[stage]}")
        if stage == "kto":
            third.append("from trl.data_utils import unpair_preference_dataset")
    lines = ["from __future__ import annotations", "", *[f"import {m}" for m in standard if m], *typing, "",
             "import torch", "import transformers", *third]
    return "\n".join(lines)


def _auto_class(r: ex.Resolved) -> str:
    return TASKS[r.config.model.task].auto_class


def _constants(r: ex.Resolved, key: Any) -> str:
    from nbtune import data, models, precision

    c, m, t = r.config, r.config.model, r.config.training
    if r.embedded_model:
        model = 'str(HERE / "model")  # model.name_or_path nbtune:tiny: the embedded base, copied beside this file'
        stored = "fp32"
    else:
        model = f"{m.name_or_path!r}  # model.name_or_path"
        stored = precision.checkpoint_dtype(r.model_config)
    dropout = models._dropout_kwargs(c, t.dropout) if t.dropout is not None else {}
    train_key = {**key.to_dict(), "key": _script_key(key.key)}
    lines = [
        "HERE = Path(__file__).resolve().parent",
        "",
        "# ----- what the config chose (config.yaml) -----",
        f"MODEL = {model}",
        f"BASE_NAME = {m.name_or_path!r}  # as the artifact names its base",
        f"REVISION = {m.revision!r}",
        f"TRUST_REMOTE_CODE = {m.trust_remote_code!r}",
        f"ATTN_IMPLEMENTATION = {m.attn_implementation!r}  # model.attn_implementation",
        f"DTYPE = {m.dtype!r}  # model.dtype (auto: see weights_dtype)",
        f"STORED_DTYPE = {stored!r}  # the dtype the checkpoint is stored in",
        f"PRECISION = {t.precision!r}  # training.precision (auto: see precision)",
        f"TRAINS_BASE = {not r.method.is_peft!r}  # the method trains the model's own weights",
        f"METHOD = {r.method.name!r}",
        f"STAGE = {r.stage.name!r}",
        f"TASK = {m.task!r}",
        f"SEED = {t.seed!r}",
        f"MAX_LENGTH = {c.data.max_length!r}  # data.max_length: tokens per example",
        f"LEARNING_RATE = {c.learning_rate!r}  # training.learning_rate ({'set' if t.learning_rate else 'the method' + chr(39) + 's recommended rate'})",
        f"EVAL_EVERY = {t.eval_every!r}  # training.eval_every",
        f"LOAD_KWARGS = {_lit(dropout)}  # training.dropout, under the names this architecture uses",
    ]
    lines.append(f"LABELS = {_lit(list(r.labels), 10)}  # the class labels of a classifier, in its head's order")
    if r.chat_template:
        lines.append(f"CHAT_TEMPLATE = {r.chat_template!r}  # the chat template the run's rows are rendered with "
                     f"({r.chat_template_name})")
    else:
        lines.append("CHAT_TEMPLATE = None")
    lines += [
        "",
        "# what nbtune's store needs to file the run (config.yaml beside this script is its config)",
        f"CACHE = {_lit(train_key, 8)}",
        f"DATA = {_lit({'fingerprint': data.fingerprint(r.train_rows, r.eval_rows), 'format': r.fmt}, 7)}",
    ]
    return "\n".join(lines)


def _script_key(key: str) -> str:
    """The cache key a script-trained run is filed under: its own, so nbtune never serves it for the config
    (another program trained it; it is listed, loaded and compared like any run)."""
    import hashlib

    return hashlib.sha256(f"{key}|exported-script".encode()).hexdigest()[:16]


# ----- data ------------------------------------------------------------------------------------------------

_READ_ROWS = '''
    def read_rows(split):
        """data/<split>.jsonl: the config's rows after its split and sample caps (data.*), as nbtune read them."""
        path = HERE / "data" / f"{split}.jsonl"
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
'''


def _data_block(r: ex.Resolved) -> str:
    if r.stage.name in ("dpo", "kto"):
        return _READ_ROWS + _preference_data(r)
    if r.stage.name == "grpo":
        return _READ_ROWS + _grpo_data(r)
    return _READ_ROWS + _render_block(r) + _encode_block(r) + _COLLATOR


def _render_block(r: ex.Resolved) -> str:
    from nbtune import formats

    cols = r.columns
    if r.fmt in ("prompt-completion", "text") or r.config.model.task != "causal-lm":
        head = f'''
    PROMPT_TEMPLATE = {cols.template!r}  # data.prompt_template (or the built-in dataset's)
    TEXT_COLUMN = {cols.text!r}  # data.text_column
    TARGET_COLUMN = {cols.target!r}  # data.target_column
    LABEL_COLUMN = {cols.label!r}  # data.label_column


    def prompt_text(row):
        """The input text of a row: the prompt template filled with its columns, or its text column."""
        return PROMPT_TEMPLATE.format(**row) if PROMPT_TEMPLATE else str(row[TEXT_COLUMN])


    def target_text(row):
        """The text trained on after the prompt: the target column, or the label word as the answer."""
        if TARGET_COLUMN is not None:
            return str(row[TARGET_COLUMN])
        if LABEL_COLUMN is not None:
            return " " + str(row[LABEL_COLUMN])
        return None
'''
        if r.config.model.task != "causal-lm":
            return head
        if r.fmt == "text":
            return head + '''

    def pieces(row, tokenizer):
        """Plain text, all of it trained (continued pre-training)."""
        return [(prompt_text(row) + (target_text(row) or ""), True)]
'''
        return head + '''

    def pieces(row, tokenizer):
        """A row as (text, trained) pieces: the prompt, not trained, then its target, trained."""
        target = target_text(row)
        if target is None:
            return [(prompt_text(row), True)]
        return [(prompt_text(row), False), (target, True)]
'''
    if r.fmt == "instruction":
        return f'''
    ALPACA_WITH_INPUT = {formats.ALPACA_WITH_INPUT!r}
    ALPACA = {formats.ALPACA!r}


    def pieces(row, tokenizer):
        """An Alpaca instruction: the prompt (with its input section only when the input is not empty), not
        trained, then the output, trained."""
        given = str(row.get("input") or "").strip()
        template = ALPACA_WITH_INPUT if given else ALPACA
        prompt = template.format(instruction=str(row["instruction"]).strip(), input=given)
        return [(prompt, False), (str(row["output"]), True)]
'''
    if formats.uses_own_template(r.tokenizer, r.config.data.chat_template):
        return '''
    def pieces(row, tokenizer):
        """A conversation rendered with the tokenizer's own chat template, cut where each assistant turn starts
        and ends: the text up to turn i with the generation prompt is where its trained part starts, the text
        through it (trailing whitespace excepted) where it ends."""
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]]

        def render(upto, prompt=False):
            return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt)

        full, out, done = render(len(messages)), [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start, through = render(i, prompt=True), render(i + 1)
            end = max(len(through.rstrip()), len(start))
            out += [(full[done:len(start)], False), (full[len(start):end], True)]
            done = end
        out.append((full[done:], False))
        return [p for p in out if p[0]]
'''
    return '''
    def pieces(row, tokenizer):
        """A conversation in ChatML (data.chat_template chatml): <|im_start|>role, the content, <|im_end|>; each
        assistant turn's content and its <|im_end|> are trained, the headers and other turns are not."""
        out = []
        for message in row["messages"]:
            role, content = str(message["role"]), str(message["content"])
            out.append((f"<|im_start|>{role}\\n", False))
            if role == "assistant":
                out += [(f"{content}<|im_end|>", True), ("\\n", False)]
            else:
                out.append((f"{content}<|im_end|>\\n", False))
        return out
'''


def _encode_block(r: ex.Resolved) -> str:
    from nbtune import formats

    task = r.config.model.task
    if task == "seq-cls":
        return '''

    def encode(row, tokenizer):
        """A classification row: its input's token ids (cut to MAX_LENGTH) and its label's index."""
        ids = tokenizer(prompt_text(row))["input_ids"][:MAX_LENGTH]
        value = row[LABEL_COLUMN]
        if isinstance(value, int) and not isinstance(value, bool) and str(value) not in LABELS:
            return {"input_ids": ids, "labels": value}
        return {"input_ids": ids, "labels": LABELS.index(str(value))}
'''
    if task == "seq2seq":
        return '''

    def encode(row, tokenizer):
        """An encoder-decoder row: the input's token ids and the target's, each cut to MAX_LENGTH."""
        ids = tokenizer(prompt_text(row))["input_ids"][:MAX_LENGTH]
        labels = tokenizer(text_target=(target_text(row) or "").strip())["input_ids"][:MAX_LENGTH]
        return {"input_ids": ids, "labels": labels}
'''
    own = r.fmt == "chat" and formats.uses_own_template(r.tokenizer, r.config.data.chat_template)
    return f'''

    TRAIN_ON = {r.config.data.train_on!r}  # data.train_on: assistant (the trained pieces) or all
    OWN_TEMPLATE = {own!r}  # the tokenizer's own chat template writes its special tokens itself
    APPEND_EOS = {r.fmt != "chat"!r}  # rows other than chat end with EOS (trained)


    def encode(row, tokenizer):
        """Token ids and labels of a row: each piece tokenized on its own (so a trained piece's tokens are
        exactly its own), labels -100 on untrained pieces unless TRAIN_ON is all; cut to MAX_LENGTH."""
        ids, labels = [], []
        for i, (text, trained) in enumerate(pieces(row, tokenizer)):
            piece = tokenizer(text, add_special_tokens=i == 0 and not OWN_TEMPLATE)["input_ids"]
            ids += piece
            labels += piece if trained or TRAIN_ON == "all" else [-100] * len(piece)
        if APPEND_EOS and tokenizer.eos_token_id is not None:
            ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
        return {{"input_ids": ids[:MAX_LENGTH], "labels": labels[:MAX_LENGTH]}}
'''


_COLLATOR = '''

    class Collator:
        """Right-pads a batch; the labels of padding are -100 (ignored by the loss)."""

        def __init__(self, pad_token_id):
            self.pad_token_id = pad_token_id

        def __call__(self, features):
            width = max(len(f["input_ids"]) for f in features)
            input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(features), width), dtype=torch.long)
            for i, f in enumerate(features):
                input_ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
                attention[i, : len(f["input_ids"])] = 1
            batch = {"input_ids": input_ids, "attention_mask": attention}
            if isinstance(features[0]["labels"], int):  # classification
                batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
                return batch
            labels = torch.full((len(features), max(len(f["labels"]) for f in features)), -100, dtype=torch.long)
            for i, f in enumerate(features):
                labels[i, : len(f["labels"])] = torch.tensor(f["labels"])
            batch["labels"] = labels
            return batch
'''


def _preference_data(r: ex.Resolved) -> str:
    text = f'''

    PAIR = {PAIR!r}
    BETA = {r.config.training.beta!r}  # training.beta: how strongly training stays near the reference


    def pairs(split):
        """The preference pairs of a split as TRL reads them: prompt, chosen, rejected (chat or plain)."""
        return [{{k: row[k] for k in PAIR}} for row in read_rows(split)]
'''
    if r.stage.name == "kto":
        text += '''

    def unpaired(rows):
        """KTO's rows: each pair's chosen answer marked desirable and its rejected one not, shuffled by the
        seed (unpairing puts every desirable row first)."""
        out = unpair_preference_dataset(Dataset.from_list(rows)).to_list()
        random.Random(SEED).shuffle(out)
        return out
'''
    return text


def _grpo_data(r: ex.Resolved) -> str:
    t = r.config.training
    return f'''

    NUM_GENERATIONS = {t.num_generations!r}  # training.num_generations: completions sampled per prompt
    MAX_COMPLETION_LENGTH = {t.max_completion_length!r}  # training.max_completion_length
    TEMPERATURE = {t.temperature!r}  # training.temperature
    BETA = {t.beta!r}  # training.beta: the KL weight (0: no reference model)
    REWARDS = {_lit(list(t.rewards), 14)}  # training.rewards: their sum scores each completion


''' + reward_source() + '''


    def completion_text(completion):
        """A completion as text: TRL gives chat completions as a list of messages."""
        if isinstance(completion, list):
            return "".join(str(m.get("content", "")) for m in completion)
        return str(completion)


    def reward_functions():
        """Each reward of REWARDS as TRL calls it (keyword arguments: the rows' columns, reference included)."""
        def wrap(name):
            function = BUILT_IN[name]

            def call(prompts, completions, reference, **kwargs):
                return function([completion_text(c) for c in completions], reference)
            call.__name__ = name
            return call
        return [wrap(name) for name in REWARDS]
'''


def reward_source() -> str:
    """nbtune's built-in rewards as plain Python (the same functions, their answer forms as patterns)."""
    from nbtune import rewards

    functions = [rewards.normalise, rewards.exact_match, rewards.answer_form, rewards.contains_answer]
    patterns = [p.pattern for p in rewards.ANSWER_FORMS]
    parts = [f"ANSWER_FORMS = tuple(re.compile(p) for p in {patterns!r})"]
    parts += [inspect.getsource(f).strip() for f in functions]
    table = ", ".join(f"{name!r}: {fn.__name__}" for name, fn in rewards._BUILT_IN.items())
    parts.append(f"BUILT_IN = {{{table}}}  # by nbtune's names")
    return textwrap.indent("\n\n\n".join(parts), "    ")


# ----- model and method ------------------------------------------------------------------------------------

def _model_block(r: ex.Resolved) -> str:
    auto = _auto_class(r)
    labels = '''
        kwargs.update(num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                      label2id={name: i for i, name in enumerate(LABELS)})''' if r.labels else ""
    quantized = '''
        kwargs["quantization_config"] = quantization_config(dtype)''' if r.quantization else ""
    text = f'''
    ON_GPU = torch.cuda.is_available()
    TORCH_DTYPES = {{"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}}


    def precision():
        """training.precision as nbtune resolves it: auto is bf16 on a GPU that computes it natively, fp16 with
        loss scaling on older GPUs, fp32 on a CPU; fp16 on a CPU trains in fp32."""
        if PRECISION == "auto":
            if not ON_GPU:
                return "fp32"
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32" if PRECISION == "fp16" and not ON_GPU else PRECISION


    def weights_dtype(chosen_precision):
        """model.dtype as nbtune resolves it: auto keeps the checkpoint's 16-bit dtype on a GPU that computes it,
        else fp32 (and fp32 master weights where fp16 loss scaling would update fp16 weights)."""
        if DTYPE != "auto":
            return TORCH_DTYPES[DTYPE]
        if STORED_DTYPE in (None, "fp32") or not ON_GPU:
            return torch.float32
        if STORED_DTYPE == "bf16" and not torch.cuda.is_bf16_supported():
            return torch.float32
        if chosen_precision == "fp16" and STORED_DTYPE == "fp16" and TRAINS_BASE:
            return torch.float32
        return TORCH_DTYPES[STORED_DTYPE]


    def load_tokenizer():
        """The base's tokenizer, padding on the right (with EOS where it has no pad token)."""
        tokenizer = AutoTokenizer.from_pretrained(MODEL, revision=REVISION, trust_remote_code=TRUST_REMOTE_CODE)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "right"
        if CHAT_TEMPLATE is not None:
            tokenizer.chat_template = CHAT_TEMPLATE
        return tokenizer


    def load_model(tokenizer, dtype):
        """The base model for the task, in `dtype`, with the config's attention and dropout."""
        kwargs = dict(revision=REVISION, trust_remote_code=TRUST_REMOTE_CODE, dtype=dtype,
                      attn_implementation=ATTN_IMPLEMENTATION, **LOAD_KWARGS){labels}{quantized}
        model = {auto}.from_pretrained(MODEL, **kwargs)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model
'''
    if r.quantization:
        q = r.quantization
        compute = "dtype" if q["compute_dtype"] == "auto" else f"TORCH_DTYPES[{q['compute_dtype']!r}]"
        text += f'''

    def quantization_config(dtype):
        """The base in 4 bits with bitsandbytes (method.quant_type, method.double_quant, method.compute_dtype)."""
        return BitsAndBytesConfig(load_in_4bit={q["load_in_4bit"]!r}, bnb_4bit_quant_type={q["bnb_4bit_quant_type"]!r},
                                  bnb_4bit_use_double_quant={q["bnb_4bit_use_double_quant"]!r},
                                  bnb_4bit_compute_dtype={compute})
'''
    return text


def _method_block(r: ex.Resolved) -> str:
    params = ", ".join(f"method.{k} {v!r}" for k, v in r.config.method_params.items()) or "no parameters"
    if r.peft:
        return _peft_block(r, params)
    rule = ex.trainable_rule(r.all_parameters, r.trainable or [])
    if rule is None:
        return f'''
    def apply_method(model):
        """method {r.method.name}: every weight of the model trains."""
        for p in model.parameters():
            p.requires_grad_(True)
        return model
'''
    modules, endings = rule
    return f'''
    # method {r.method.name} ({params}): the parameters nbtune's registry chose on this model
    TRAINABLE_MODULES = {_lit(modules, 20)}
    TRAINABLE_ENDINGS = {_lit(endings, 20)}


    def apply_method(model):
        """Train only the parameters in TRAINABLE_MODULES or named ..<one of TRAINABLE_ENDINGS>; freeze the rest."""
        for name, p in model.named_parameters():
            under = any(name == m or name.startswith(m + ".") for m in TRAINABLE_MODULES)
            p.requires_grad_(under or name.rsplit(".", 1)[-1] in TRAINABLE_ENDINGS)
        return model
'''


def _peft_block(r: ex.Resolved, params: str) -> str:
    peft = r.peft
    assert peft is not None
    kwargs = dict(peft["kwargs"])
    if kwargs.get("prompt_tuning_init") == "TEXT":
        kwargs["tokenizer_name_or_path"] = "MODEL"
    arguments = "\n".join(f"            {k}={'MODEL' if v == 'MODEL' else _lit(v, 12 + len(k) + 1)},"
                          for k, v in kwargs.items())
    described = "\n".join(textwrap.wrap(f"method {r.method.name} ({params}): peft's {peft['class']} with the values "
                                         "nbtune's registry resolved for this model", 106,
                                         initial_indent="    # ", subsequent_indent="    # "))
    text = f'''
{described}
    def peft_config():
        """The method's adapter config (peft fills in what it reads from the model when it wraps it)."""
        return {peft["class"]}(
{arguments}
        )


    def apply_method(model):
        """The base wrapped with the method's adapter; only the adapter trains."""
'''
    if r.quantization:
        text += '''        if getattr(model, "is_loaded_in_4bit", False):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            for module in model.modules():  # bitsandbytes must not repack 4-bit weights for CPU inference in evals
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
'''
    if peft["prompt_learning"]:
        text += '''        return accept_past_key_values(get_peft_model(model, peft_config()))


''' + _prompt_learning_adaptation()
    else:
        text += "        return get_peft_model(model, peft_config())\n"
    if peft["peft_type"] == "ADALORA":
        text += '''

    class AdaLoraBudget(TrainerCallback):
        """AdaLoRA reallocates its rank budget after each optimizer step (before the gradients are zeroed)."""

        def __init__(self, model):
            self.model = model

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.model.base_model.update_and_allocate(state.global_step)
'''
    return text


def _prompt_learning_adaptation() -> str:
    """nbtune's adaptation of peft's prompt-learning models to this transformers (see peft_methods.py)."""
    from nbtune.methods import peft_methods

    source = "\n\n\n".join(inspect.getsource(f).strip() for f in (
        peft_methods.accept_past_key_values, peft_methods._cache_under_its_old_name))
    return textwrap.indent(source, "    ") + "\n"


# ----- training arguments and the trainer ------------------------------------------------------------------

_RUNTIME_ARGUMENTS = {  # what depends on the machine the script runs on
    "output_dir": 'str(output / "checkpoints")', "bf16": 'chosen_precision == "bf16"',
    "fp16": 'chosen_precision == "fp16"', "use_cpu": "not ON_GPU", "dataloader_pin_memory": "ON_GPU",
}


def _arguments_block(r: ex.Resolved) -> str:
    lines = []
    for name, value in r.arguments.items():
        code = _RUNTIME_ARGUMENTS.get(name) or _argument_code(value, 12 + len(name) + 1)
        lines.append(f"            {name}={code},")
    liger = r.config.training.loss_implementation == "liger" and r.stage.name == "sft"
    extra = dict(r.config.training.extra_arguments)
    text = f'''
    EXTRA_ARGUMENTS = {_lit(extra, 18)}  # training.extra_arguments


    def training_arguments(output, chosen_precision):
        """The TrainingArguments nbtune sets from the config's fields (the same for every stage), then
        training.extra_arguments."""
        arguments = dict(
{chr(10).join(lines)}
        )
'''
    if liger:
        text += '''    try:
            import liger_kernel  # noqa: F401  (training.loss_implementation liger)
            arguments["use_liger_kernel"] = ON_GPU
        except ImportError:
            pass
'''
    return text + "        return {**arguments, **EXTRA_ARGUMENTS}\n"


def _argument_code(value: Any, indent: int) -> str:
    """A TrainingArguments value as code: a literal, or accelerate's ParallelismConfig (hybrid FSDP's mesh)."""
    if type(value).__name__ == "ParallelismConfig":
        return (f"__import__('accelerate').parallelism_config.ParallelismConfig("
                f"dp_replicate_size={value.dp_replicate_size!r}, dp_shard_size={value.dp_shard_size!r})")
    return _lit(value, indent)


def _trainer_block(r: ex.Resolved) -> str:
    callbacks = "[AdaLoraBudget(model)]" if (r.peft or {}).get("peft_type") == "ADALORA" else "[]"
    stage = r.stage.name
    if stage == "sft":
        metric = '''

    def accuracy(prediction):
        """Held-out accuracy of a classifier: the argmax of its logits against the labels."""
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return {"accuracy": float((logits.argmax(axis=-1) == prediction.label_ids).mean())}
''' if r.config.model.task == "seq-cls" else ""
        return metric + f'''

    def build_trainer(model, tokenizer, output, chosen_precision):
        """transformers' Trainer over the encoded rows, right-padded batches."""
        train = [encode(row, tokenizer) for row in read_rows("train")]
        evaluation = [encode(row, tokenizer) for row in read_rows("eval")]
        return Trainer(model=model, args=TrainingArguments(**training_arguments(output, chosen_precision)),
                       train_dataset=train, eval_dataset=evaluation or None,
                       data_collator=Collator(tokenizer.pad_token_id),
                       compute_metrics={"accuracy" if r.config.model.task == "seq-cls" else "None"},
                       callbacks={callbacks})
'''
    if stage in ("dpo", "kto"):
        config_class, trainer_class = ("DPOConfig", "DPOTrainer") if stage == "dpo" else ("KTOConfig", "KTOTrainer")
        train = 'unpaired(pairs("train"))' if stage == "kto" else 'pairs("train")'
        return f'''
    def build_trainer(model, tokenizer, output, chosen_precision):
        """TRL's {trainer_class} over the rows; the reference is TRL's: the base with the adapter disabled for a
        peft model, a frozen copy otherwise."""
        args = {config_class}(**training_arguments(output, chosen_precision), beta=BETA, max_length=MAX_LENGTH)
        evaluation = pairs("eval")
        return {trainer_class}(model=model, args=args, train_dataset=Dataset.from_list({train}),
                          eval_dataset=Dataset.from_list(evaluation) if evaluation else None,
                          processing_class=tokenizer, callbacks={callbacks})
'''
    return f'''
    def build_trainer(model, tokenizer, output, chosen_precision):
        """TRL's GRPOTrainer over the prompts, scored by the sum of REWARDS. The eval batch is rounded up to
        whole groups of completions, which TRL requires; TRL counts the tokens seen itself."""
        arguments = training_arguments(output, chosen_precision)
        groups = math.ceil(arguments["per_device_eval_batch_size"] / NUM_GENERATIONS)
        arguments.update(per_device_eval_batch_size=groups * NUM_GENERATIONS, include_num_input_tokens_seen="no")
        args = GRPOConfig(**arguments, num_generations=NUM_GENERATIONS, max_completion_length=MAX_COMPLETION_LENGTH,
                          temperature=TEMPERATURE, beta=BETA, log_completions=False)
        if not getattr(model.generation_config, "use_cache", True):  # prefix methods
            args.generation_kwargs = {{**(args.generation_kwargs or {{}}), "use_cache": False}}
        evaluation = read_rows("eval")
        return GRPOTrainer(model=model, reward_funcs=reward_functions(), args=args,
                           train_dataset=Dataset.from_list(read_rows("train")),
                           eval_dataset=Dataset.from_list(evaluation) if evaluation else None,
                           processing_class=tokenizer, callbacks={callbacks})
'''


_RUN_FOLDER = '''
    SAFE_SUFFIXES = (".json", ".jsonl", ".yaml", ".safetensors", ".txt", ".model", ".md")  # what a store archive holds
    VERSIONED = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes")


    def artifact_checksum(folder):
        """sha256 over the artifact's data files (names, sizes, contents), as nbtune's store checks it."""
        digest = hashlib.sha256()
        for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(SAFE_SUFFIXES)):
            digest.update(f"{file.relative_to(folder).as_posix()}\\0{file.stat().st_size}\\0".encode())
            digest.update(file.read_bytes())
        return digest.hexdigest()


    def save_artifact(trainer, tokenizer, artifact):
        """The trained model as nbtune saves it: the adapter (or the weights), the tokenizer with the chat
        template the rows were rendered with, nbtune_run.json and README.md (how to load it without nbtune)."""
        trainer.save_model(str(artifact))
        if not trainer.is_world_process_zero():
            return
        (artifact / "training_args.bin").unlink(missing_ok=True)  # a pickle: no store takes it
        tokenizer.save_pretrained(str(artifact))
        for name in ("nbtune_run.json", "README.md"):
            shutil.copy(HERE / "artifact_record" / name, artifact / name)
        adapter_config = artifact / "adapter_config.json"
        if adapter_config.exists():  # name the base as the config does, not the folder it loaded from
            values = json.loads(adapter_config.read_text())
            values.update(base_model_name_or_path=BASE_NAME, revision=REVISION)
            adapter_config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\\n")


    def summary(trainer, started, train_seconds, chosen_precision, dtype, artifact):
        """What the run measured, as nbtune's summary.json holds it (losses from the Trainer's log)."""
        history = trainer.state.log_history
        steps = [h for h in history if "loss" in h]
        evals = [h for h in history if "eval_loss" in h]
        base = evals[0] if evals and evals[0].get("step") == 0 else {}
        final = evals[-1] if len(evals) > 1 else {}
        model = trainer.model
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        final_loss = final.get("eval_loss")
        return {
            "state": "finished", "method": METHOD, "step": trainer.state.global_step,
            "total_steps": trainer.state.max_steps, "epoch": trainer.state.epoch, "learning_rate": LEARNING_RATE,
            "trainable_params": trainable, "total_params": total, "trainable_percent": 100.0 * trainable / total,
            "final_train_loss": steps[-1]["loss"] if steps else None, "final_eval_loss": final_loss,
            "best_eval_loss": min((e["eval_loss"] for e in evals[1:]), default=None),
            "base_eval_loss": base.get("eval_loss"), "final_eval_accuracy": final.get("eval_accuracy"),
            "base_eval_accuracy": base.get("eval_accuracy"),
            "final_perplexity": math.exp(min(final_loss, 50.0)) if final_loss is not None and STAGE == "sft" else None,
            "wall_time_s": time.time() - started, "train_time_s": train_seconds,
            "tokens_seen": trainer.state.num_input_tokens_seen or None, "device": "cuda" if ON_GPU else "cpu",
            "precision": chosen_precision, "dtype": next(k for k, v in TORCH_DTYPES.items() if v == dtype),
            "micro_batch_size": trainer.args.per_device_train_batch_size,
            "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps, "artifact_path": "artifact",
            "artifact_bytes": sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file()),
            "data": {**DATA, "train_rows": len(read_rows("train")), "eval_rows": len(read_rows("eval")),
                     "labels": LABELS},
            "versions": {name: sys.modules[name].__version__ for name in VERSIONED if name in sys.modules},
            "note": "trained by train.py, exported by nbtune: filed under its own cache key, never served for the config",
            "cache": CACHE,
        }


    def events(trainer, started):
        """The run's events as nbtune's store keeps them (events.jsonl): started, each logged step and eval, finished."""
        out = [{"kind": "started", "time": started, "data": {"total_steps": trainer.state.max_steps, "method": METHOD}}]
        for entry in trainer.state.log_history:
            if "loss" in entry:
                out.append({"kind": "step", "time": started, "data": {
                    "step": entry["step"], "total_steps": trainer.state.max_steps, "epoch": entry.get("epoch"),
                    "loss": entry["loss"], "learning_rate": entry.get("learning_rate"),
                    "grad_norm": entry.get("grad_norm")}})
            elif "eval_loss" in entry:
                metrics = {k.removeprefix("eval_"): v for k, v in entry.items() if k.startswith("eval_")
                           and not k.endswith(("_runtime", "_per_second"))}
                out.append({"kind": "eval", "time": started, "data": {"step": entry["step"], **metrics}})
        out.append({"kind": "finished", "time": time.time(), "data": {"step": trainer.state.global_step}})
        return out


    def save_run(trainer, tokenizer, output, started, train_seconds, chosen_precision, dtype):
        """output/runs/<run id>/ as a run folder of nbtune's store (config.yaml, meta.json, summary.json,
        events.jsonl, checksum.json, artifact/) and output/<run id>.tar.gz of its data files, which
        `nbtune import` adds to a store. Returns the archive (None on the processes other than the first)."""
        run_id = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}-{METHOD}-{CACHE['key'][:8]}"
        run_dir = output / "runs" / run_id
        artifact = run_dir / "artifact"
        save_artifact(trainer, tokenizer, artifact)
        if not trainer.is_world_process_zero():
            return None
        shutil.copy(HERE / "config.yaml", run_dir / "config.yaml")
        meta = {"id": run_id, "created": started, "state": "finished", "method": METHOD, "started": started,
                "ended": time.time(), **CACHE}
        (run_dir / "meta.json").write_text(json.dumps(meta, indent=2))
        record = summary(trainer, started, train_seconds, chosen_precision, dtype, artifact)
        (run_dir / "summary.json").write_text(json.dumps(record, indent=2, default=str))
        (run_dir / "events.jsonl").write_text("".join(json.dumps(e, default=str) + "\\n" for e in events(trainer, started)))
        (run_dir / "checksum.json").write_text(json.dumps({"artifact_sha256": artifact_checksum(artifact)}))
        archive = output / f"{run_id}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name.endswith(SAFE_SUFFIXES)):
                tar.add(path, arcname=f"{run_id}/{path.relative_to(run_dir).as_posix()}", recursive=False)
        return archive
'''


def _main_block(r: ex.Resolved) -> str:
    return '''
    def main():
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--output", type=Path, default=HERE / "output",
                            help="where the run folder and its archive go (default: output/ beside this script)")
        args = parser.parse_args()
        started = time.time()
        transformers.utils.logging.disable_progress_bar()
        set_seed(SEED)
        chosen_precision = precision()
        dtype = weights_dtype(chosen_precision)
        tokenizer = load_tokenizer()
        model = apply_method(load_model(tokenizer, dtype))
        trainer = build_trainer(model, tokenizer, args.output, chosen_precision)
        began = time.time()
        trainer.train()
        train_seconds = time.time() - began
        if trainer.eval_dataset is not None and (not EVAL_EVERY or trainer.state.global_step % EVAL_EVERY):
            trainer.evaluate()  # the final evaluation, unless the last step just evaluated
        archive = save_run(trainer, tokenizer, args.output, started, train_seconds, chosen_precision, dtype)
        if archive is not None:
            print(f"trained {METHOD} for {trainer.state.global_step} steps; run folder and archive: {archive}")
            print(f"add it to nbtune's store with: nbtune import {archive}")


    if __name__ == "__main__":
        main()
'''
