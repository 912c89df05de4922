"""`nbtune export CONFIG --to script|axolotl|llamafactory DIR`: exports that run without nbtune.

The exported script, run on CPU in a subprocess that cannot import nbtune, trains the embedded default to the
eval losses nbtune reaches, and its run archive imports into a store whose run loads (and whose adapter loads
with plain peft). The script's rows, encodings, peft configs and trained parameters are nbtune's own; the YAML
exports validate against the tools' schemas and list what the tools cannot express; refused methods and
stages name their field.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from nbtune import export as ex
from nbtune import export_schemas
from nbtune.cli import main
from nbtune.config import ConfigError, TuneConfig

SHORT = {"max_steps": 3, "eval_every": 2, "micro_batch_size": 4}
FEW = {"max_samples": 16, "max_eval_samples": 8}


def short(method: Any = "lora", data: dict[str, Any] | None = None, **sections: Any) -> TuneConfig:
    """A config that trains 3 steps on a few rows of the embedded default (or `data`)."""
    training = {**SHORT, **sections.pop("training", {})}
    return TuneConfig(method=method, training=training, data={**FEW, **(data or {})}, **sections)


def write_config(path: Path, config: TuneConfig) -> Path:
    path.write_text(config.to_yaml())
    return path


def run_script(folder: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the exported train.py on CPU where `import nbtune` fails, so it cannot lean on nbtune."""
    blocker = tmp_path / "no_nbtune" / "nbtune"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('the exported script imported nbtune')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "train.py"], cwd=folder, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def script_module(folder: Path) -> ModuleType:
    """The exported train.py imported as a module (its main() not run)."""
    spec = importlib.util.spec_from_file_location(f"exported_{folder.name}", folder / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----- the script runs anywhere and its run comes back -------------------------------------------------------

@pytest.mark.slow
def test_exported_script_trains_as_nbtune_does_and_its_run_imports(tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import nbtune
    from nbtune.runner import open_run
    from nbtune.store import RunStore, cache_key

    config = short()
    path = write_config(tmp_path / "config.yaml", config)
    assert main(["export", str(path), "--to", "script", str(tmp_path / "job")]) == 0
    result = run_script(tmp_path / "job", tmp_path)
    archives = list((tmp_path / "job" / "output").glob("*.tar.gz"))
    assert len(archives) == 1 and str(archives[0]) in result.stdout

    store = RunStore(tmp_path / "store")
    assert main(["import", "--store", str(store.root), str(archives[0])]) == 0
    [record] = store.list()
    run = open_run(record)
    assert run.status == "finished" and run.summary.step == 3
    trained = run.model  # loaded by nbtune: the config's base with the artifact applied
    assert isinstance(trained, PeftModel)
    # another program trained it: filed under its own key, never served for the config
    assert store.find_finished(cache_key(config)) is None

    reference = nbtune.train(config, store=tmp_path / "nbtune_store", progress=False).summary
    assert run.summary.base_eval_loss == pytest.approx(reference.base_eval_loss, rel=1e-6)
    assert run.summary.final_eval_loss == pytest.approx(reference.final_eval_loss, rel=1e-4)
    assert run.summary.trainable_params == reference.trainable_params

    # the artifact alone, with plain transformers + peft: the trained LoRA update is in it
    artifact = record.path / "artifact"
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "job" / "model"), artifact)
    weights = load_file(artifact / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and any(bool(w.abs().sum() > 0) for w in lora_b)  # peft starts B at zero: it trained
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(plain(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5)


@pytest.mark.slow
def test_exported_dpo_script_trains_with_trl_and_its_run_loads(tmp_path: Path) -> None:
    from nbtune.runner import open_run
    from nbtune.store import RunStore

    config = short(data={"source": "nbtune:prefs"}, training={"stage": "dpo"})
    ex.export(config, "script", tmp_path / "job")
    assert "from trl import DPOConfig, DPOTrainer" in (tmp_path / "job" / "train.py").read_text()
    run_script(tmp_path / "job", tmp_path)
    [archive] = (tmp_path / "job" / "output").glob("*.tar.gz")
    store = RunStore(tmp_path / "store")
    store.import_(archive)
    [record] = store.list()
    run = open_run(record)
    assert (run.status, run.summary.step, run.summary.method) == ("finished", 3, "lora")
    assert run.model is not None
    events = [json.loads(line)["kind"] for line in record.events_path.read_text().splitlines()]
    assert events[0] == "started" and "eval" in events and events[-1] == "finished"


# ----- the script is nbtune's training, written out ---------------------------------------------------------

ROWS = [{"instruction": f"Say {word}.", "input": "loudly" if i % 2 else "", "output": word.upper()}
        for i, word in enumerate(["yes", "no", "maybe", "never", "always", "soon", "later", "now"])]


@pytest.mark.parametrize("config", [
    short(),
    short(data={"source": "nbtune:chat"}),
    short(data={"source": "nbtune:chat", "chat_template": "chatml"}),
    short(data={"source": [{"text": f"word {i} " * (i + 1)} for i in range(8)], "eval_split": 0.25,
                "max_samples": None, "max_eval_samples": None}),
    short(data={"train_on": "all"}),
    short(model={"task": "seq-cls"}, data={"source": "nbtune:regions"}),
], ids=["prompt-completion", "chat-own-template", "chat-chatml", "text", "train-on-all", "seq-cls"])
def test_script_encodes_the_rows_as_nbtune_does(config: TuneConfig, tmp_path: Path) -> None:
    from nbtune import data, models

    ex.export(config, "script", tmp_path / "job")
    script = script_module(tmp_path / "job")
    tokenizer = script.load_tokenizer()
    prepared = data.prepare(config, models.load_tokenizer(config))
    assert [script.encode(row, tokenizer) for row in script.read_rows("train")] == prepared.train
    assert [script.encode(row, tokenizer) for row in script.read_rows("eval")] == prepared.eval
    if config.model.task == "seq-cls":
        assert list(prepared.labels) == script.LABELS


def test_script_renders_instructions_as_nbtune_does(tmp_path: Path) -> None:
    from nbtune import data, export_script

    # Alpaca's prompt alone is longer than the embedded model's 128 positions: nbtune refuses to train it (and
    # so does the export); the rendering is still nbtune's
    config = short(data={"source": ROWS, "eval_split": 0.25, "max_samples": None, "max_eval_samples": None})
    with pytest.raises(ConfigError, match="data.max_length"):
        ex.export(config, "script", tmp_path / "refused")
    resolved = ex.resolve(config)
    (tmp_path / "job").mkdir()
    export_script.write(resolved, tmp_path / "job")
    script = script_module(tmp_path / "job")
    tokenizer = script.load_tokenizer()
    rows = script.read_rows("train")
    assert len(rows) == 6
    assert [script.pieces(row, tokenizer) for row in rows] == [
        data.render(config, "instruction", resolved.columns, row, resolved.tokenizer) for row in rows]


@pytest.mark.parametrize("method", ["full", "freeze", {"name": "freeze", "params": {"mode": "bottom-frozen"}},
                                    {"name": "freeze", "params": {"train_head": False}}, "bitfit"],
                         ids=["full", "freeze-top", "freeze-bottom", "freeze-no-head", "bitfit"])
def test_script_trains_exactly_the_parameters_a_selective_method_chooses(method: Any, tmp_path: Path) -> None:
    import torch

    from nbtune import models

    config = short(method)
    ex.export(config, "script", tmp_path / "job")
    script = script_module(tmp_path / "job")
    tokenizer = script.load_tokenizer()
    theirs = script.apply_method(script.load_model(tokenizer, torch.float32))
    ours = models.build(config, tokenizer=models.load_tokenizer(config)).model
    trained = {name for name, p in ours.named_parameters() if p.requires_grad}
    assert len(trained) > 0
    assert {name for name, p in theirs.named_parameters() if p.requires_grad} == trained


@pytest.mark.parametrize("method", ["lora", {"name": "lora", "params": {"r": 4, "use_rslora": True}}, "ia3",
                                    {"name": "prompt-tuning", "params": {"num_virtual_tokens": 4}},
                                    {"name": "adalora", "params": {"tinit": 1, "tfinal": 1}}, "loha"],
                         ids=["lora", "lora-r4-rslora", "ia3", "prompt-tuning", "adalora", "loha-generated"])
def test_script_builds_the_peft_config_nbtune_applies(method: Any, tmp_path: Path) -> None:
    from nbtune import models

    config = short(method)
    ex.export(config, "script", tmp_path / "job")
    script = script_module(tmp_path / "job")
    ours = models.build(config, device="meta", extras={"total_steps": 3}).model.peft_config["default"]

    def plain(peft_config: Any) -> dict[str, Any]:
        return {k: ex._plain(v) for k, v in peft_config.to_dict().items() if k not in ex.PEFT_FILLED}

    theirs = script.peft_config()
    assert type(theirs) is type(ours)
    expected = plain(ours)
    if isinstance(expected.get("target_modules"), list):  # peft resolves its default modules when wrapping
        assert plain(theirs)["target_modules"] == expected["target_modules"]
    assert plain(theirs) == expected


def test_script_carries_the_training_arguments_nbtune_sets(tmp_path: Path) -> None:
    from nbtune.training import _shared_arguments

    config = short(training={"extra_arguments": {"label_smoothing_factor": 0.1}, "scheduler": "linear",
                             "gradient_checkpointing": True, "optimizer": "sgd"})
    ex.export(config, "script", tmp_path / "job")
    script = script_module(tmp_path / "job")
    output = tmp_path / "out"
    theirs = script.training_arguments(output, "fp32")
    ours = {**_shared_arguments(config, output, True, "fp32", False, "standard"), "label_smoothing_factor": 0.1}
    ours["output_dir"] = str(output / "checkpoints")
    assert theirs == ours


@pytest.mark.parametrize(("method", "words"), [("distillation", "its own training loss"),
                                              ("adapter", "nbtune's own")])
def test_script_refuses_methods_only_nbtune_can_train(method: str, words: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ex.ExportRefused) as refused:
        ex.export(TuneConfig(method=method), "script", tmp_path / "job")
    assert refused.value.field == "method.name" and f"method.name {method}" in str(refused.value)
    assert words in str(refused.value)
    assert not (tmp_path / "job").exists()  # nothing written
    path = write_config(tmp_path / "config.yaml", TuneConfig(method=method))
    assert main(["export", str(path), "--to", "script", str(tmp_path / "job")]) == 2
    assert f"method.name {method}" in capsys.readouterr().err


def test_script_refuses_a_reward_registered_in_python(tmp_path: Path) -> None:
    import nbtune

    @nbtune.reward(name="shorter-is-better")
    def shorter(completions, reference, **columns):
        return [-len(c) for c in completions]

    config = short(data={"source": "nbtune:chat"}, training={"stage": "grpo", "num_generations": 2,
                                                             "rewards": ["exact-match", "shorter-is-better"]})
    with pytest.raises(ex.ExportRefused, match="shorter-is-better") as refused:
        ex.export(config, "script", tmp_path / "job")
    assert refused.value.field == "training.rewards"


def test_export_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ex.export(short(), "script", tmp_path / "job")
    assert (tmp_path / "job" / "mine.txt").read_text() == "keep me"


# ----- axolotl and LLaMA-Factory ------------------------------------------------------------------------------

YAML_CONFIGS = {
    "lora": short(),
    "qlora": short("qlora"),
    "full": short("full"),
    "freeze": short("freeze"),
    "chat": short(data={"source": "nbtune:chat"}),
    "dpo": short(data={"source": "nbtune:prefs"}, training={"stage": "dpo"}),
    "kto": short(data={"source": "nbtune:prefs"}, training={"stage": "kto"}),
    "zero3": short(distributed={"strategy": "zero3", "processes": 2, "cpu_offload": True}),
    "fsdp": short(distributed={"strategy": "fsdp", "processes": 4}),
}
GRPO = short(data={"source": "nbtune:chat"}, training={"stage": "grpo", "num_generations": 2})


def exported_yaml(config: TuneConfig, target: str, folder: Path) -> dict[str, Any]:
    exported = ex.export(config, target, folder)
    assert exported.directory == folder
    text = (folder / f"{target}.yaml").read_text()
    assert "&id" not in text  # no YAML anchors: each value written out where it is used
    return yaml.safe_load(text)


@pytest.mark.parametrize("target", ["axolotl", "llamafactory"])
@pytest.mark.parametrize("name", list(YAML_CONFIGS))
def test_yaml_exports_validate_against_the_tools_schemas(target: str, name: str, tmp_path: Path) -> None:
    document = exported_yaml(YAML_CONFIGS[name], target, tmp_path / "job")
    schema = export_schemas.SCHEMAS[target]
    if target == "llamafactory":
        info = json.loads((tmp_path / "job" / "data" / "dataset_info.json").read_text())
        assert export_schemas.validate(info, export_schemas.LLAMAFACTORY_DATASET_INFO) == []
        assert (tmp_path / "job" / "data" / info[document["dataset"]]["file_name"]).is_file()
    else:
        assert (tmp_path / "job" / document["datasets"][0]["path"]).is_file()
    assert export_schemas.validate(document, schema) == []
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema)
    assert [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(document)] == []
    if name == "zero3":
        assert document["deepspeed"] == "deepspeed.json"
        zero = json.loads((tmp_path / "job" / "deepspeed.json").read_text())["zero_optimization"]
        assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"


def test_axolotl_grpo_export_carries_nbtunes_rewards(tmp_path: Path) -> None:
    document = exported_yaml(GRPO, "axolotl", tmp_path / "job")
    assert export_schemas.validate(document, export_schemas.AXOLOTL) == []
    assert document["rl"] == "grpo" and document["trl"]["num_generations"] == 2
    sys.path.insert(0, str(tmp_path / "job"))
    try:
        import nbtune_rewards
    finally:
        sys.path.remove(str(tmp_path / "job"))
        sys.modules.pop("nbtune_rewards", None)
    [name] = [f.split(".")[1] for f in document["trl"]["reward_funcs"]]
    reward = getattr(nbtune_rewards, name)
    assert reward(prompts=["p", "p"], completions=["The capital is X.", "no"], reference=["the capital is x", "yes"]) \
        == [1.0, 0.0]
    transform, _ = getattr(nbtune_rewards, document["datasets"][0]["type"].split(".")[1])(document)
    row = json.loads((tmp_path / "job" / "data" / "train.jsonl").read_text().splitlines()[0])
    assert transform(row) == row and {"prompt", "reference"} <= row.keys()


def test_axolotl_segments_and_llamafactory_turns_are_the_tokens_nbtune_trains(tmp_path: Path) -> None:
    from nbtune import data, models

    config = short(data={"source": "nbtune:chat"})
    tokenizer = models.load_tokenizer(config)
    expected = data.prepare(config, tokenizer).train
    ex.export(config, "axolotl", tmp_path / "axolotl")
    ex.export(config, "llamafactory", tmp_path / "llamafactory")

    def tokens(parts: list[tuple[str, bool]]) -> dict[str, list[int]]:
        ids, labels = [], []
        for text, trained in parts:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [-100] * len(piece)
        return {"input_ids": ids[:config.data.max_length], "labels": labels[:config.data.max_length]}

    def rows(folder: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (tmp_path / folder / "data" / "train.jsonl").read_text().splitlines()]

    segments = [tokens([(s["text"], s["label"]) for s in row["segments"]]) for row in rows("axolotl")]
    turns = [tokens([(m["content"], m["role"] == "assistant") for m in row["messages"]]) for row in rows("llamafactory")]
    trimmed = [{k: v[:len(t["input_ids"])] for k, v in e.items()} for e, t in zip(expected, turns, strict=True)]
    assert segments == expected
    assert turns == trimmed  # LLaMA-Factory's turns leave out the untrained tail after the last answer


def test_unsupported_settings_are_listed_and_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = short(training={"on_oom": "shrink", "dropout": 0.1, "extra_arguments": {"label_smoothing_factor": 0.1}})
    path = write_config(tmp_path / "config.yaml", config)
    assert main(["export", str(path), "--to", "axolotl", str(tmp_path / "axolotl")]) == 0
    printed = capsys.readouterr().out
    listed = (tmp_path / "axolotl" / "unsupported.txt").read_text()
    for field in ("training.on_oom", "training.extra_arguments: label_smoothing_factor"):
        assert f"- {field}" in listed and f"- {field}" in printed
    document = yaml.safe_load((tmp_path / "axolotl" / "axolotl.yaml").read_text())
    assert document["model_config"] == {"attention_dropout": 0.1}  # dropout it can express, it does

    exported = ex.export(config, "llamafactory", tmp_path / "llamafactory")
    fields = [name for name, _ in exported.unsupported]
    assert "training.dropout" in fields and "training.on_oom" in fields
    assert "training.extra_arguments" not in fields  # its training arguments are transformers' own
    document = yaml.safe_load((tmp_path / "llamafactory" / "llamafactory.yaml").read_text())
    assert document["label_smoothing_factor"] == 0.1


@pytest.mark.parametrize(("target", "config", "field"), [
    ("axolotl", short("ia3"), "method.name"),
    ("llamafactory", short("bitfit"), "method.name"),
    ("llamafactory", GRPO, "training.stage"),
    ("axolotl", short(model={"task": "seq-cls"}, data={"source": "nbtune:regions"}), "model.task"),
])
def test_yaml_exports_refuse_what_the_tool_cannot_train(target: str, config: TuneConfig, field: str,
                                                        tmp_path: Path) -> None:
    with pytest.raises(ex.ExportRefused) as refused:
        ex.export(config, target, tmp_path / "job")
    assert refused.value.field == field and str(refused.value).startswith(field)
    assert not (tmp_path / "job").exists()


def test_schema_validator_names_unknown_fields_and_wrong_types() -> None:
    document = {"base_model": "m", "datasets": [{"path": "d", "typ": "input_output"}], "lora_rnk": 8,
                "micro_batch_size": "four", "rl": "ppo"}
    problems = export_schemas.validate(document, export_schemas.AXOLOTL)
    assert any(p.startswith("lora_rnk") for p in problems)
    assert any(p.startswith("micro_batch_size") for p in problems)
    assert any(p.startswith("rl") for p in problems)
    assert any(p.startswith("datasets[0]") for p in problems)
    assert export_schemas.validate({"stage": "sft"}, export_schemas.LLAMAFACTORY) != []


# ----- launching ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["script", "axolotl", "llamafactory"])
def test_exports_carry_the_accelerate_config_and_launch_line_of_the_distributed_section(target: str,
                                                                                         tmp_path: Path) -> None:
    from nbtune import distributed

    config = short(distributed={"strategy": "fsdp", "processes": 4, "nodes": 2, "cpu_offload": True})
    exported = ex.export(config, target, tmp_path / "job")
    written = yaml.safe_load((tmp_path / "job" / "accelerate_config.yaml").read_text())
    assert written == distributed.accelerate_config(config, "LlamaDecoderLayer")
    assert (written["num_processes"], written["num_machines"]) == (8, 2)
    readme = (tmp_path / "job" / "README.txt").read_text()
    assert "$NODE_RANK" in readme and "$MAIN_NODE_ADDRESS" in readme
    if target == "script":
        assert "accelerate launch --config_file accelerate_config.yaml" in exported.command
        assert (tmp_path / "job" / "train.py").read_text().count("$NODE_RANK") == 1  # in its docstring
    if target == "axolotl":
        document = yaml.safe_load((tmp_path / "job" / "axolotl.yaml").read_text())
        assert document["fsdp_config"]["offload_params"] is True


def test_trainable_rule_is_exact_and_short() -> None:
    names = [f"model.layers.{i}.{part}.{kind}" for i in range(3) for part in ("attn", "mlp") for kind in ("weight", "bias")]
    names += ["model.embed.weight", "lm_head.weight"]
    for chosen in ([n for n in names if n.endswith(".bias")], [n for n in names if ".layers.2." in n],
                   [n for n in names if ".layers.2." in n or n == "lm_head.weight"], names[:1]):
        rule = ex.trainable_rule(names, chosen)
        assert [n for n in names if ex.trains(n, rule)] == chosen
    assert ex.trainable_rule(names, [n for n in names if n.endswith(".bias")]) == ([], ["bias"])
    assert ex.trainable_rule(names, [n for n in names if ".layers.2." in n]) == (["model.layers.2"], [])
    assert ex.trainable_rule(names, names) is None
