"""Image classification (model.task image-cls): image sources, methods, the estimate and the artifact.

A tiny random ViT and a two-colour image folder are made here; the embedded ViT and `nbtune:shapes` are
checked in tests/test_embedded.py and bench/vision_methods.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from nbtune.config import ConfigError, TuneConfig
from nbtune.events import EventStream

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def draw(colour: tuple[int, int, int], rng: random.Random):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (32, 32), (240, 240, 240))
    x, y = rng.randint(0, 18), rng.randint(0, 18)
    ImageDraw.Draw(image).rectangle([x, y, x + 12, y + 12], fill=colour)
    return image


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random ViT folder and an image folder with train/ and eval/ split folders."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    root = tmp_path_factory.mktemp("images")
    rng = random.Random(0)
    for split, n in (("train", 12), ("eval", 4)):
        for label, colour in COLOURS.items():
            folder = root / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                draw(colour, rng).save(folder / f"{i}.png")
    vit = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=3)
    ViTForImageClassification(vit).save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        root / "vit")
    return root


def image_config(world: Path, method: str = "lora", source=None, **data) -> TuneConfig:
    return TuneConfig(model={"name_or_path": str(world / "vit"), "task": "image-cls"}, method=method,
                      data={"source": source if source is not None else str(world / "data"), **data},
                      training={"max_steps": 3, "micro_batch_size": 8, "log_every": 1, "eval_every": 3})


def prepared(config: TuneConfig):
    from nbtune import data, models

    return data.prepare(config, models.load_tokenizer(config))


def test_an_image_folder_gives_pixels_and_labels_by_folder_name(world):
    out = prepared(image_config(world))
    assert out.labels == ("blue", "red")  # sorted folder names
    assert len(out.train) == 24 and len(out.eval) == 8
    assert tuple(out.train[0]["pixel_values"].shape) == (3, 32, 32)
    assert out.stats["format"] == "image" and out.stats["image_size"] == [3, 32, 32]
    red = next(x for x in out.train if x["labels"] == 1)["pixel_values"]
    assert red[0].mean() > red[2].mean()  # the red channel is brighter than the blue one in a red image


def test_a_file_of_relative_paths_and_a_datasets_image_column_give_the_same_examples(world, tmp_path):
    import datasets

    rows = [{"path": str(p.relative_to(world / "data" / "train")), "kind": p.parent.name}
            for p in sorted((world / "data" / "train").rglob("*.png"))]
    listing = world / "data" / "train" / "listing.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_file = prepared(image_config(world, source=str(listing), image_column="path", label_column="kind",
                                      eval_split=0.25))
    table = datasets.Dataset.from_dict({"image": [str(world / "data" / "train" / r["path"]) for r in rows],
                                        "label": [r["kind"] for r in rows]}).cast_column("image", datasets.Image())
    from_dataset = prepared(image_config(world, source=table, eval_split=0.25))
    assert from_file.labels == from_dataset.labels == ("blue", "red")
    assert len(from_file.train) == len(from_dataset.train) == 18
    assert from_file.fingerprint == from_dataset.fingerprint  # the same images and labels, in the same order
    saved = tmp_path / "saved"
    table.save_to_disk(str(saved))
    assert prepared(image_config(world, source=str(saved), eval_split=0.25)).fingerprint == from_file.fingerprint


def test_a_changed_image_changes_the_fingerprint(world, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(world / "data", copy)
    before = prepared(image_config(world, source=str(copy))).fingerprint
    draw(COLOURS["blue"], random.Random(7)).save(copy / "train" / "blue" / "0.png")
    assert prepared(image_config(world, source=str(copy))).fingerprint != before


def test_bad_image_input_names_the_field_the_value_and_what_is_allowed(world, tmp_path):
    with pytest.raises(ConfigError, match=r"data.image_column must be one of the data's columns .*'picture'"):
        prepared(image_config(world, image_column="picture"))
    listing = tmp_path / "rows.jsonl"
    listing.write_text("".join(json.dumps({"image": "missing.png", "label": c}) + "\n" for c in [*COLOURS] * 2))
    with pytest.raises(ConfigError, match=r"data.image_column: no such image file .*missing.png"):
        prepared(image_config(world, source=str(listing), eval_split=0.25))
    (tmp_path / "broken.png").write_text("not an image")
    listing.write_text("".join(json.dumps({"image": "broken.png", "label": c}) + "\n" for c in [*COLOURS] * 2))
    with pytest.raises(ConfigError, match=r"data.image_column: .*broken.png.* is not a readable image"):
        prepared(image_config(world, source=str(listing), eval_split=0.25))
    with pytest.raises(ConfigError, match=r"data.format must be auto or image for model.task image-cls \(got 'chat'\)"):
        image_config(world, format="chat")
    with pytest.raises(ConfigError, match=r"data.eval_split must be one of eval, train .*\(got 'validation'\)"):
        prepared(image_config(world, eval_split="validation"))


def test_prompt_methods_are_refused_for_image_classification_before_anything_loads(world):
    for method in ("prompt-tuning", "prefix-tuning", "p-tuning", "p-tuning-v2"):
        with pytest.raises(ConfigError, match=rf"model.task 'image-cls' is not supported by {method}"):
            image_config(world, method)


@pytest.mark.parametrize("method", ["full", "freeze", "bitfit", "lora", "qlora", "ia3", "adapter", "loha"])
def test_each_method_trains_a_vit_and_its_head(world, tmp_path, method):
    from nbtune.training import execute

    events = EventStream()
    summary = execute(image_config(world, method), tmp_path / "run", events)
    assert summary.state == "finished", summary
    evals = [e.data for e in events.history if e.kind == "eval"]
    assert evals and 0.0 <= evals[-1]["accuracy"] <= 1.0
    assert summary.trainable_params > 0


def test_a_lora_artifact_loads_with_plain_peft_and_classifies_as_the_run_does(world, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from nbtune.training import execute

    summary = execute(image_config(world, "lora"), tmp_path / "run", EventStream())
    artifact = Path(summary.artifact_path)
    adapter = json.loads((artifact / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["classifier"]
    record = json.loads((artifact / "nbtune_run.json").read_text())
    assert record["labels"] == ["blue", "red"] and record["auto_class"] == "AutoModelForImageClassification"
    base = AutoModelForImageClassification.from_pretrained(str(world / "vit"), num_labels=2,
                                                           ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, str(artifact)).eval()
    processor = AutoImageProcessor.from_pretrained(str(artifact))
    from PIL import Image

    image = Image.open(world / "data" / "eval" / "red" / "0.png")
    with torch.no_grad():
        logits = model(**processor(images=image, return_tensors="pt")).logits
    assert logits.shape == (1, 2)
    from nbtune import models

    config = image_config(world, "lora")
    trained = models.build(config, tokenizer=models.load_tokenizer(config), labels=("blue", "red"),
                           trained=artifact).model.eval()
    with torch.no_grad():
        again = trained(**processor(images=image, return_tensors="pt")).logits
    assert torch.allclose(logits, again, atol=1e-5)


@pytest.mark.parametrize("method", ["full", "freeze", "bitfit", "lora", "ia3", "adapter"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_estimate_of_a_vit_step_matches_a_real_one(method, precision):
    """Weights, gradients and optimizer state exactly; saved activations within 25 % (measured on a 2-core
    AMD EPYC, torch 2.13: 0.85-1.25 of the real step's, the widest adapters in fp32, full in bf16)."""
    from transformers import ViTConfig

    from nbtune.estimator.estimate import terms
    from nbtune.estimator.measure import measure_step
    from nbtune.estimator.skeleton import facts

    vit = ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                    intermediate_size=128, num_labels=5)
    config = TuneConfig(model={"name_or_path": "tiny-vit", "task": "image-cls", "dtype": "fp32"}, method=method,
                        training={"micro_batch_size": 4, "precision": precision})
    f = facts(config, vit)
    t = terms(config, f, device="cpu")
    real = measure_step(config, vit)
    assert t.shape.tokens == 4 * (8 * 8 + 1)  # 64 patches and the class token per image
    w = t.weights
    assert w.frozen + w.trainable + w.constants == real["weights"]
    assert (w.trainable, t.optimizer.gradients, t.optimizer.state) == (
        real["trainable_weights"], real["gradients"], real["optimizer_state"])
    assert abs(t.activations.saved - real["saved_activations"]) <= 0.25 * real["saved_activations"]


def test_the_memory_estimate_suggests_nothing_an_image_model_cannot_do(world):
    from transformers import ViTConfig

    from nbtune.estimator import estimate_memory

    vit_base = ViTConfig(image_size=224, patch_size=16, num_labels=2)  # ViT-B/16: 197 tokens an image
    config = image_config(world, "full").replace(**{"training.micro_batch_size": 1024})
    estimate = estimate_memory(config, model_config=vit_base, gpu="T4")
    assert not estimate.fits("T4")
    kinds = {part for s in estimate.suggestions for part in s.changes}
    assert "training.micro_batch_size" in kinds
    assert "data.max_length" not in kinds and "training.loss_implementation" not in kinds


def test_the_builder_is_ready_for_an_image_folder_and_names_a_wrong_image_column(world):
    from nbtune import preflight

    assert preflight.readiness(image_config(world), "T4", None) == []
    blockers = preflight.readiness(image_config(world, image_column="picture"), "T4", None)
    assert [b.field for b in blockers] == ["data.image_column"]


def test_an_identical_image_run_is_served_from_the_store_and_compares_with_others(world, tmp_path, monkeypatch):
    import nbtune

    monkeypatch.setenv("NBTUNE_HOME", str(tmp_path / "store"))
    config = image_config(world, "lora")
    first = nbtune.launch(config)
    first.wait()
    again = nbtune.launch(config)
    assert again.id == first.id and again.status == "finished"
    comparison = nbtune.compare(config, methods=["lora", "bitfit"], seeds=1)
    rows = {row["variant"]: row for row in comparison.rows()}
    assert rows.keys() == {"lora", "bitfit"} and rows["lora"]["served_from_store"]
    assert all(0.0 <= row["eval_accuracy"] <= 1.0 for row in rows.values())
    assert "accuracy" in comparison.recommendation()


def test_a_sample_of_an_image_folder_holds_every_label(world):
    """An image folder lists its images label by label: the first rows must not all be one label's."""
    out = prepared(image_config(world, max_samples=6, max_eval_samples=4))
    assert {x["labels"] for x in out.train} == {0, 1} and {x["labels"] for x in out.eval} == {0, 1}


def test_a_task_that_is_not_a_name_is_refused_naming_model_task():
    """Found by tests/test_config_properties.py in CI: a list as the task crashed the data checks."""
    with pytest.raises(ConfigError, match=r"model.task"):
        TuneConfig(model={"task": []})


def test_flip_mirrors_training_images_at_random_the_same_way_each_run_and_never_eval_images(world):
    import torch

    plain, flipped = prepared(image_config(world)), prepared(image_config(world, augment="flip"))
    again = prepared(image_config(world, augment="flip"))
    reads = [flipped.train[i % 24]["pixel_values"] for i in range(96)]  # each example read 4 times
    mirrored = [torch.equal(x, plain.train[i % 24]["pixel_values"].flip(-1)) for i, x in enumerate(reads)]
    kept = [torch.equal(x, plain.train[i % 24]["pixel_values"]) for i, x in enumerate(reads)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert 24 <= sum(mirrored) <= 72  # about half of 96 reads
    assert any(mirrored[i] != mirrored[i + 24] for i in range(24))  # a later read of an example may differ
    assert all(torch.equal(x, again.train[i % 24]["pixel_values"]) for i, x in enumerate(reads))
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(plain.eval, flipped.eval, strict=True))
    assert flipped.stats["augment"] == "flip"


def test_a_flipped_image_run_trains_and_is_another_result_than_the_plain_one(world, tmp_path):
    from nbtune.training import execute

    config = image_config(world, "full", augment="flip")
    summary = execute(config, tmp_path / "run", EventStream())
    assert summary.state == "finished", summary
    assert config.content_hash != image_config(world, "full").content_hash


def test_augmenting_a_text_task_or_an_unknown_augmentation_is_refused_naming_data_augment():
    refused = r"data.augment must be none for model.task causal-lm, whose rows hold no images \(got 'flip'\)"
    with pytest.raises(ConfigError, match=refused):
        TuneConfig(data={"augment": "flip"})
    with pytest.raises(ConfigError, match=r"data.augment must be one of .*none.*flip.*\(got 'rotate'\)"):
        TuneConfig(model={"task": "image-cls"}, data={"augment": "rotate"})
