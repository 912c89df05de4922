"""Saving a trained model as its method's artifact, loading it back, and exporting it as one merged model.

An artifact travels: PEFT methods save a peft adapter folder (plain `peft.PeftModel.from_pretrained`) whose
adapter_config.json names the base as the config did ("nbtune:tiny", a hub id with its revision, or a folder),
not this machine's path; full fine-tuning, freezing, BitFit and distillation save the whole (student) model
(plain `AutoModelFor*.from_pretrained`); bottleneck adapters save their own weights (`save` /
`load_trained` hooks in the registry). Every artifact also holds the tokenizer the run trained with, carrying the
chat template its chat rows were rendered with (the tokenizer's own, or a named template written as Jinja), so
`apply_chat_template` gives what training saw; and `nbtune_run.json` (base, task, method, labels, chat template,
how to load and chat with it) and a README.md saying the same. `export_merged` writes one plain transformers folder:
adapters folded into the weights (LoRA, DoRA, IA3, AdaLoRA; QLoRA onto the full-precision base), the whole model
for full-model methods, or the model with its bottleneck adapters and their modeling file.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

from nbtune import chat_templates, formats
from nbtune.methods.registry import Method, MethodContext
from nbtune.tasks import TASKS

RUN_FILE = "nbtune_run.json"


def embedded_base_hint(name: str) -> str:
    """The command that prints the folder of the embedded base `name` (nbtune:tiny, nbtune:tiny-vit, ...)."""
    return f'python -c "import nbtune.embedded as e; print(e.MODELS[{name!r}])"'


def save_trained(model: Any, method: Method, directory: str | Path, ctx: MethodContext,
                 config: Any = None) -> Path:
    """Write the artifact of `model`, trained with `method`, into `directory`.

    With the run's `config` (a TuneConfig) the artifact also records where it came from and how to load it;
    `ctx.extras["data_format"]` (set by training) says whether its rows were chat, rendered with a chat template.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fmt = artifact_format(method)
    if TASKS[ctx.task].draws:
        from nbtune import diffusion

        fmt = diffusion.save_artifact(model, method.is_peft, directory)
    elif method.save is not None:
        method.save(model, directory, ctx)
    else:
        model.save_pretrained(str(directory))
    chat = None
    if ctx.tokenizer is not None and not TASKS[ctx.task].draws:  # a pipeline keeps its tokenizer in its folder
        chat = chat_template_of_run(config, ctx.tokenizer, ctx.extras.get("data_format"),
                                    ctx.extras.get("conversational", False))
        save_tokenizer(ctx.tokenizer, directory, chat)
    if config is not None:
        record = describe(config, method, ctx, fmt, chat)
        if method.is_peft:
            _name_the_base(directory, record)
        write_record(directory, record)
    return directory


def artifact_format(method: Method) -> str:
    if method.is_peft:
        return "peft-adapter"
    return "nbtune-adapters" if method.save is not None else "transformers-model"


def chat_template_of_run(config: Any, tokenizer: Any, data_format: str | None,
                         conversational: bool = False) -> tuple[str, str] | None:
    """(name, Jinja) of the chat template a run's rows were rendered with; None unless they were chat (or
    `conversational` preference / prompt-reference rows, which TRL's stages render with the same template).

    The tokenizer's own, or the named one (`data.chat_template`; auto without an own template is the first
    name, as in formats.chat_pieces) led by the BOS token that training's encoder gave the first piece."""
    if config is None or not (data_format == "chat" or conversational):
        return None
    if formats.uses_own_template(tokenizer, config.data.chat_template):
        return "the tokenizer's own", tokenizer.chat_template
    name = chat_templates.NAMES[0] if config.data.chat_template == "auto" else config.data.chat_template
    plain, marked = (tokenizer("x", add_special_tokens=add)["input_ids"] for add in (False, True))
    starts_with_bos = tokenizer.bos_token_id is not None and marked == [tokenizer.bos_token_id, *plain]
    return name, ("{{- bos_token -}}" if starts_with_bos else "") + chat_templates.JINJA[name]


def save_tokenizer(tokenizer: Any, directory: Path, chat: tuple[str, str] | None) -> None:
    """The run's tokenizer, carrying the chat template its chat rows were rendered with (the run's own copy
    of the tokenizer keeps its template)."""
    if chat is not None and tokenizer.chat_template != chat[1]:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = chat[1]
    tokenizer.save_pretrained(str(directory))


def describe(config: Any, method: Method, ctx: MethodContext, fmt: str,
             chat: tuple[str, str] | None = None) -> dict[str, Any]:
    """What an artifact records about itself: base, task, method, labels, chat template, and how to load it."""
    model_config = ctx.model_config
    labels = []
    if TASKS[config.model.task].classifies and getattr(model_config, "id2label", None):
        labels = [model_config.id2label[i] for i in sorted(model_config.id2label)]
    record: dict[str, Any] = {
        "format": fmt, "base_model": config.model.name_or_path, "revision": config.model.revision,
        "task": config.model.task, "auto_class": TASKS[config.model.task].auto_class,
        "method": method.name, "method_params": config.method_params,
    }
    if labels:
        record.update(labels=labels, id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)})
    load_kwargs = method.load_kwargs(config.method_params, ctx) if method.load_kwargs else {}
    if fmt == "peft-adapter" and "quantization_config" in load_kwargs:  # QLoRA: how the base was quantized under the adapter
        record["base_quantization"] = load_kwargs["quantization_config"].to_dict()
    if chat is not None:
        record["chat_template"] = chat[0]
    record["how_to_load"] = how_to_load(record)
    return record


def how_to_load(record: dict[str, Any]) -> str:
    """Python that loads the artifact with transformers (and peft) alone, and for a run trained on chat, answers
    a conversation with its chat template; ARTIFACT stands for its folder."""
    code = _loading_code(record)
    if record.get("chat_template") and record["format"] != "nbtune-adapters":
        code += ("\n# chat as it trained: the tokenizer carries its chat template\n"
                 'messages = [{"role": "user", "content": "Hello!"}]\n'
                 "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, "
                 'return_tensors="pt")\n'
                 "output = model.generate(**inputs, max_new_tokens=32, do_sample=False)\n"
                 'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))')
    return code


def _loading_code(record: dict[str, Any]) -> str:
    auto = record["auto_class"]
    if record["format"].startswith("diffusers-"):
        from nbtune import diffusion

        base = record["base_model"]
        hint = (f"# BASE: the folder of the embedded base {base}, printed by {embedded_base_hint(base)}\n"
                if base.startswith("nbtune:") else "")
        return hint + diffusion.how_to_load(record, "BASE" if hint else repr(base))
    classes, preprocess = _preprocessors(record)
    if record["format"] == "transformers-model":
        return f'from transformers import {auto}, {classes}\nmodel = {auto}.from_pretrained("ARTIFACT")\n{preprocess}'
    if record["format"] == "transformers-model-with-code":
        return (f"from transformers import {auto}, {classes}\n"
                f'model = {auto}.from_pretrained("ARTIFACT", trust_remote_code=True)  # builds the adapters\n'
                f"{preprocess}")
    if record["format"] == "nbtune-adapters":
        return ("nbtune's own format (bottleneck adapters have no peft or transformers layer): load it with\n"
                "nbtune (`run.model`), or export it once with `nbtune export RUN --merged DIR` (or\n"
                "`run.merge(DIR)`) and load DIR without nbtune:\n"
                f'{auto}.from_pretrained("DIR", trust_remote_code=True)')
    base = record["base_model"]
    lines = [f"from peft import PeftModel\nfrom transformers import {auto}, {classes}"]
    if base.startswith("nbtune:"):
        lines.append(f"# BASE: the folder of the embedded base {base}, printed by {embedded_base_hint(base)}\n"
                     "# (or skip the base: `nbtune export RUN --merged DIR` writes one folder that carries it)")
        where = "BASE"
    else:
        where = repr(base) + (f", revision={record['revision']!r}" if record.get("revision") else "")
    options = ""
    if record.get("labels"):
        options += f", num_labels={len(record['labels'])}, id2label={record['id2label']}, " \
                   f"label2id={record['label2id']}"
    if record.get("base_quantization"):
        lines.append("import json\nfrom transformers import BitsAndBytesConfig\n"
                     f'nbtune_run = json.load(open("ARTIFACT/{RUN_FILE}"))\n'
                     "quantization = BitsAndBytesConfig.from_dict(nbtune_run['base_quantization'])")
        options += ", quantization_config=quantization"
    lines.append(f"base = {auto}.from_pretrained({where}{options})\n"
                 'model = PeftModel.from_pretrained(base, "ARTIFACT")\n' + preprocess)
    return "\n".join(lines)


def _preprocessors(record: dict[str, Any]) -> tuple[str, str]:
    """(the classes to import, the lines that load what turns inputs into the model's): the tokenizer for text,
    the image processor for images, both for image-to-text, with a caption made."""
    task = TASKS.get(record.get("task", ""))
    if task is None or task.inputs == "text":
        return "AutoTokenizer", 'tokenizer = AutoTokenizer.from_pretrained("ARTIFACT")  # the one it trained with'
    images = 'image_processor = AutoImageProcessor.from_pretrained("ARTIFACT")'
    if not task.captions:
        return "AutoImageProcessor", images
    return "AutoImageProcessor, AutoTokenizer", (
        f'{images}\ntokenizer = AutoTokenizer.from_pretrained("ARTIFACT")\n'
        "# from PIL import Image; pixels = image_processor(images=Image.open(PATH).convert(\"RGB\"), "
        'return_tensors="pt").pixel_values\n'
        "# print(tokenizer.batch_decode(model.generate(pixel_values=pixels), skip_special_tokens=True)[0])")


def _name_the_base(directory: Path, record: dict[str, Any]) -> None:
    """Put the base as the config named it into adapter_config.json (peft wrote the local path it loaded)."""
    path = directory / "adapter_config.json"
    if not path.exists():  # a peft method that saves another layout: nothing to correct
        return
    adapter_config = json.loads(path.read_text())
    adapter_config["base_model_name_or_path"] = record["base_model"]
    adapter_config["revision"] = record["revision"]
    path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def write_record(directory: Path, record: dict[str, Any]) -> None:
    """nbtune_run.json, and a README.md saying the same for people (it replaces peft's empty model card)."""
    (directory / RUN_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    rows = [("base model", record["base_model"] + (f" @ {record['revision']}" if record.get("revision") else "")),
            ("task", record["task"]), ("method", record["method"]), ("format", record["format"])]
    if record.get("labels"):
        rows.append(("labels", ", ".join(record["labels"])))
    if record.get("chat_template"):
        rows.append(("chat template", record["chat_template"]))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    (directory / "README.md").write_text(
        f"# {record['method']} on {record['base_model']}, trained with nbtune\n\n| | |\n| --- | --- |\n{table}\n\n"
        f"## Loading it without nbtune\n\n```python\n{record['how_to_load']}\n```\n\n"
        f"`{RUN_FILE}` holds the same in JSON.\n")


def load_trained(method: Method, base_model: Any, directory: str | Path, ctx: MethodContext) -> Any:
    """The trained model, in eval mode, from an artifact directory and a freshly loaded base model."""
    if method.load_trained is not None:
        return method.load_trained(base_model, directory)
    if TASKS[ctx.task].draws and not method.is_peft:
        from nbtune import diffusion

        return diffusion.load_unet(directory, base_model)
    if method.is_peft:
        from peft import PeftModel

        from nbtune.methods.peft_methods import accept_past_key_values

        return accept_past_key_values(PeftModel.from_pretrained(base_model, str(directory))).eval()
    device = next(base_model.parameters()).device
    return type(base_model).from_pretrained(str(directory), dtype=base_model.dtype).to(device).eval()


def export_merged(run: Any, directory: str | Path) -> Path:
    """Write a run's trained model as one folder that `AutoModelFor*.from_pretrained` loads, with its tokenizer.

    Adapters that are weight updates (LoRA, DoRA, IA3, AdaLoRA, QLoRA) are folded into the base weights, QLoRA's
    onto the full-precision base; full-model methods are written as they are; bottleneck adapters keep their
    layers and carry the modeling file that builds them (load with `trust_remote_code=True`). Prompt-learning
    methods have nothing to fold into weights and are refused: their adapter folder is the portable form.
    """
    from nbtune import models
    from nbtune.methods import registry

    config = run.config
    method = registry.get(config.method.name)
    artifact = Path(run.artifact_path)
    if not artifact.exists():
        raise ValueError(f"run {run.id} has no artifact to merge (state {run.status})")
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"merged export folder {directory} already exists and is not empty; choose a new folder")
    if method.is_peft:
        _refuse_prompt_learning(method, artifact)
    if TASKS[config.model.task].draws:
        return _export_pipeline(run, method, directory)
    labels = run.summary.labels if run.summary is not None else []
    data_format = (run.summary.data or {}).get("format") if run.summary is not None else None
    tokenizer = models.load_tokenizer(config)
    ctx = MethodContext(task=config.model.task, tokenizer=tokenizer, num_labels=len(labels) or None,
                        dtype=config.model.dtype)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        model, fmt = _write_model(run, method, artifact, ctx, partial)
        chat = chat_template_of_run(config, tokenizer, data_format)
        save_tokenizer(tokenizer, partial, chat)
        ctx.model_config = model.config
        write_record(partial, {**describe(config, method, ctx, fmt, chat), "merged_from_run": run.id})
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if directory.exists():
        directory.rmdir()  # empty (checked above): the complete folder takes its place
    partial.rename(directory)
    return directory


def _export_pipeline(run: Any, method: Method, directory: Path) -> Path:
    """A text-to-image run as one pipeline folder: its LoRA folded into the UNet, or its trained UNet."""
    from nbtune.training import load_trained_model

    model = load_trained_model(run)
    if method.is_peft:
        model.unet = model.unet.merge_and_unload()
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.pipeline(sampling=False).save_pretrained(partial)
        ctx = MethodContext(task=run.config.model.task, model_config=model.unet.config)
        write_record(partial, {**describe(run.config, method, ctx, "diffusers-pipeline"), "merged_from_run": run.id})
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if directory.exists():
        directory.rmdir()
    partial.rename(directory)
    return directory


def _write_model(run: Any, method: Method, artifact: Path, ctx: MethodContext, directory: Path) -> tuple[Any, str]:
    """Save the run's model, merged where its method allows, into `directory`; returns it and its format."""
    labels = run.summary.labels if run.summary is not None else []
    if method.is_peft:
        model = _merged_peft_model(run.config, method, artifact, ctx)
    else:
        from nbtune.training import load_trained_model

        model = load_trained_model(run)
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    if method.save is not None:  # bottleneck adapters: the model with its adapters and their code
        from nbtune.methods.adapters import save_adapter_model

        save_adapter_model(model, directory, TASKS[run.config.model.task].auto_class)
        return model, "transformers-model-with-code"
    model.save_pretrained(str(directory))
    return model, "transformers-model"


def _refuse_prompt_learning(method: Method, artifact: Path) -> None:
    from peft import PeftConfig

    if PeftConfig.from_pretrained(str(artifact)).is_prompt_learning:
        raise ValueError(
            f"method {method.name} cannot be merged into the model's weights: it learns virtual tokens that are "
            f"added to every input, not a change of weights. Its artifact folder ({artifact}) is the portable "
            "form: load it with peft.PeftModel.from_pretrained(base_model, folder)")


def _merged_peft_model(config: Any, method: Method, artifact: Path, ctx: MethodContext) -> Any:
    """The base in full precision (never quantized) with the adapter folded into its weights."""
    from peft import PeftModel

    from nbtune import models

    base = models.load_model(config, num_labels=ctx.num_labels, tokenizer=ctx.tokenizer)
    peft_model = PeftModel.from_pretrained(base, str(artifact))
    try:
        return peft_model.merge_and_unload()
    except (AttributeError, ValueError, NotImplementedError) as err:
        raise ValueError(f"method {method.name} cannot be merged into the model's weights ({err}); its artifact "
                         f"folder ({artifact}) is the portable form: peft.PeftModel.from_pretrained") from err
