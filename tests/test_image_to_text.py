"""Image-to-text (model.task image-to-text): caption rows, methods, held-out exact match, the artifact and
captions side by side, on the embedded `nbtune:tiny-captioner` and `nbtune:shape-captions` (0.72 M parameters:
a run of 150 steps takes seconds on CPU). The captioner itself is checked in tests/test_embedded.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nbtune.config import ConfigError, TuneConfig
from nbtune.events import EventStream

MODEL = {"name_or_path": "nbtune:tiny-captioner", "task": "image-to-text"}
IMAGE = str(Path(__file__).parents[1] / "nbtune/embedded/data/shapes/train/circle/0000.png")


def caption_config(method: str = "lora", steps: int = 3, source: object = "nbtune:shape-captions", **data) -> TuneConfig:
    return TuneConfig(model=MODEL, method=method, data={"source": source, **data},
                      training={"max_steps": steps, "micro_batch_size": 16, "log_every": 1, "eval_every": steps})


def prepared(config: TuneConfig):
    from nbtune import data, models

    return data.prepare(config, models.load_tokenizer(config))


@pytest.fixture(scope="module")
def eval_rows():
    from nbtune.embedded import load_rows

    return load_rows("shape-captions", "eval")


def test_caption_rows_become_pixels_and_the_captions_tokens_ending_in_eos(offline):
    from nbtune import models
    from nbtune.embedded import load_rows

    out = prepared(caption_config(max_samples=8, max_eval_samples=4))
    tokenizer = models.load_tokenizer(caption_config()).tokenizer
    assert len(out.train) == 8 and len(out.eval) == 4 and out.stats["format"] == "image"
    first, caption = out.train[0], load_rows("shape-captions", "train")[0]["caption"]
    assert tuple(first["pixel_values"].shape) == (3, 32, 32)
    assert first["labels"][-1] == tokenizer.eos_token_id and tokenizer.bos_token_id not in first["labels"]
    assert tokenizer.decode(first["labels"], skip_special_tokens=True) == caption
    assert len(first["labels"]) == len(caption.split()) + 1  # a word a token, and the end of text
    assert out.stats["truncated"] == 0


def test_a_caption_over_max_length_is_cut_keeping_its_end_of_text_and_counted(offline, tmp_path):
    from nbtune import models

    long = "a red circle in the top left and a blue square in the bottom right"  # 16 words
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"image": IMAGE, "caption": c}) + "\n" for c in [long, "a red circle"] * 2))
    cut = prepared(caption_config(source=str(rows), eval_split=0.5, max_length=8))
    eos = models.load_tokenizer(caption_config()).tokenizer.eos_token_id
    assert sorted(len(x["labels"]) for x in cut.train + cut.eval) == [4, 4, 8, 8]
    assert all(x["labels"][-1] == eos for x in cut.train + cut.eval) and cut.stats["truncated"] == 2


def test_the_collator_pads_labels_with_minus_100_and_masks_the_decoder_to_each_caption():
    from nbtune.captions import Collator

    torch = pytest.importorskip("torch")
    batch = Collator()([{"pixel_values": torch.zeros(3, 4, 4), "labels": [5, 6, 2]},
                        {"pixel_values": torch.ones(3, 4, 4), "labels": [7, 2]}])
    assert batch["labels"].tolist() == [[5, 6, 2], [7, 2, -100]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["pixel_values"].shape == (2, 3, 4, 4)


def test_bad_caption_input_names_the_field_the_value_and_what_is_allowed(offline, tmp_path):
    with pytest.raises(ConfigError, match=r"data.target_column must be one of the data's columns .*'text'"):
        prepared(caption_config(target_column="text"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"image": IMAGE, "caption": c}) + "\n" for c in ["a circle", "", "x", "y"]))
    with pytest.raises(ConfigError, match=r"data.target_column: every caption must be text, not empty \(got ''\)"):
        prepared(caption_config(source=str(rows), eval_split=0.25))
    with pytest.raises(ConfigError, match=r"data.augment must be none for model.task image-to-text: a mirrored"):
        caption_config(augment="flip")
    with pytest.raises(ConfigError, match=r"data.format must be auto or image for model.task image-to-text"):
        caption_config(format="chat")
    for method in ("prompt-tuning", "prefix-tuning", "p-tuning", "p-tuning-v2", "distillation"):
        with pytest.raises(ConfigError, match=rf"model.task 'image-to-text' is not supported by {method}"):
            caption_config(method)


def test_a_decoder_without_sdpa_attention_is_refused_naming_model_attn_implementation(offline, tmp_path):
    from transformers import TrOCRConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    from nbtune import models

    vit = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64)
    trocr = TrOCRConfig(vocab_size=30, d_model=32, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, trocr)
    config.decoder_start_token_id, config.pad_token_id = 0, 1
    VisionEncoderDecoderModel(config=config).save_pretrained(tmp_path / "trocr")
    tune = TuneConfig(model={"name_or_path": str(tmp_path / "trocr"), "task": "image-to-text"})
    with pytest.raises(ConfigError, match=r"model.attn_implementation must be eager for .*\(got 'sdpa'\)"):
        models.load_model(tune)
    eager = tune.replace(**{"model.attn_implementation": "eager"})
    assert type(models.load_model(eager)).__name__ == "VisionEncoderDecoderModel"


def test_lora_adapts_the_text_decoder_by_default_not_the_image_encoder(offline):
    from nbtune import models

    config = caption_config("lora")
    built = models.build(config, tokenizer=models.load_tokenizer(config))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in built.model.named_parameters() if ".lora_A" in n}
    assert adapted and all(".decoder." in n and n.endswith("c_attn") for n in adapted)
    assert len(adapted) == 4  # self- and cross-attention of both GPT-2 layers


@pytest.mark.parametrize("method", ["full", "freeze", "bitfit", "lora", "qlora", "ia3", "adalora", "adapter"])
def test_each_method_trains_a_captioner_and_evaluations_score_its_captions(offline, tmp_path, method):
    from nbtune.training import execute

    events = EventStream()
    config = caption_config(method, max_samples=32, max_eval_samples=16)
    if method == "adalora":  # its rank schedule needs room within the 3 steps
        config = config.replace(**{"method.tinit": 0, "method.tfinal": 1})
    summary = execute(config, tmp_path / "run", events)
    assert summary.state == "finished", summary
    evals = [e.data for e in events.history if e.kind == "eval"]
    assert [e["step"] for e in evals] == [0, 3]
    assert all(0.0 <= e["accuracy"] <= 1.0 and 0.0 < e["token_f1"] <= 1.0 for e in evals)
    assert evals[0]["accuracy"] == 0.0  # the base captions in its pre-training forms only
    assert summary.trainable_params > 0


def test_lora_learns_the_datasets_caption_form_on_held_out_combinations(offline, tmp_path):
    """The acceptance on the embedded defaults: held-out exact match from the base's 0.0 to >= 0.9."""
    from nbtune.training import execute

    events = EventStream()
    config = caption_config("lora", steps=150).replace(**{"training.eval_every": 150})
    summary = execute(config, tmp_path / "run", events)
    evals = [e.data for e in events.history if e.kind == "eval"]
    assert evals[0]["accuracy"] == 0.0 and evals[0]["token_f1"] < 0.7
    assert summary.final_eval_accuracy == evals[-1]["accuracy"] >= 0.9


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """A LoRA run on the embedded defaults (150 steps, in a store of its own), and its store's root."""
    import nbtune

    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NBTUNE_HOME", str(root))
        patch.setenv("HF_HUB_OFFLINE", "1")
        run = nbtune.launch(caption_config("lora", steps=150).replace(**{"training.eval_every": 150}))
        run.wait()
        assert run.status == "finished", run.error
        yield run, root


def test_the_lora_artifact_captions_with_plain_transformers_and_peft_as_the_run_does(captioned, eval_rows):
    """The artifact's own loading code (nbtune_run.json how_to_load), run as written, captions an image as
    `Run.generate` does."""
    from nbtune.embedded import MODELS

    run, _ = captioned
    artifact = Path(run.artifact_path)
    how = json.loads((artifact / "nbtune_run.json").read_text())["how_to_load"]
    assert "AutoImageProcessor" in how and "AutoModelForImageTextToText" in how
    code = how.replace("ARTIFACT", str(artifact)).replace("PATH", repr(eval_rows[0]["image"]))
    code = code.replace("from_pretrained(BASE)", f"from_pretrained({str(MODELS['nbtune:tiny-captioner'])!r})")
    code = "\n".join(line[2:] if line.startswith("# from PIL") or line.startswith("# print") else line
                     for line in code.splitlines())
    namespace: dict = {}
    exec(compile(code.replace("print(", "made = ("), "how_to_load", "exec"), namespace)  # noqa: S102
    assert namespace["made"] == run.generate(eval_rows[0]["image"])[0] == eval_rows[0]["caption"]


def test_captions_side_by_side_score_exact_match_show_thumbnails_and_are_kept(captioned, eval_rows):
    from nbtune.generation import side_by_side

    run, _ = captioned
    rows = eval_rows[:6]
    table = side_by_side({"lora": run}, [r["image"] for r in rows], expected=[r["caption"] for r in rows])
    assert table.columns == ["base", "lora"]
    assert table.accuracy["base"] == 0.0 and table.accuracy["lora"] >= 0.8
    page = table.to_html()
    assert page.count('src="data:image/png;base64,') == len(rows) and "accuracy" in page
    again = side_by_side({"lora": run}, [r["image"] for r in rows], expected=[r["caption"] for r in rows])
    assert again.served_from_store and again.answers == table.answers
    with pytest.raises(ValueError, match="a classifier"):
        from nbtune.generation import _refuse_classifier

        _refuse_classifier(type("R", (), {"id": "x", "config": TuneConfig(model={"task": "image-cls"})})())


def test_an_identical_captioning_run_is_served_from_the_store_and_compared_by_exact_match(captioned, monkeypatch):
    import nbtune

    run, root = captioned
    monkeypatch.setenv("NBTUNE_HOME", str(root))
    config = caption_config("lora", steps=150).replace(**{"training.eval_every": 150})
    assert nbtune.launch(config).id == run.id
    comparison = nbtune.compare(config, methods=["lora", "bitfit"], seeds=1)
    rows = {row["variant"]: row for row in comparison.rows()}
    assert rows["lora"]["served_from_store"] and rows["lora"]["eval_accuracy"] >= 0.9
    assert comparison.metric == "eval_accuracy"
    assert "exact match of greedy captions" in comparison._repr_html_()


def test_the_builder_is_ready_for_caption_rows_and_names_a_wrong_caption_column(offline):
    from nbtune import preflight

    assert [b.field for b in preflight.readiness(caption_config(), "T4", None)] == []
    blockers = preflight.readiness(caption_config(target_column="words"), "T4", None)
    assert [b.field for b in blockers] == ["data.target_column"]


def test_the_script_and_yaml_exports_refuse_an_image_task_saying_what_to_do_instead(tmp_path):
    from nbtune import export

    for to in ("script", "axolotl"):
        with pytest.raises(export.ExportRefused, match=r"model.task image-to-text: .*image tasks train with "
                                                       r"nbtune, and their artifacts load without it"):
            export.export(caption_config(), to, tmp_path / to)
        assert not (tmp_path / to).exists()
