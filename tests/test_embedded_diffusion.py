"""The embedded text-to-image default: the tiny diffusion pipeline, its shape judge and `nbtune:sks-star`
(nbtune/embedded/build_diffusion.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

EMBEDDED = Path(__file__).parents[1] / "nbtune" / "embedded"
DIFFUSION_DIR = EMBEDDED / "diffusion"
JUDGE_DIR = EMBEDDED / "shape_judge"
CONCEPT_DIR = EMBEDDED / "data" / "sks-star"
BASE_KNOWN_RATE = 0.75  # the shipped base draws 0.87-0.90 of them (diffusion/build_info.json, base_known_shapes)
BASE_CONCEPT_RATE = 0.25  # at most (measured 0-0.125): the base does not draw the concept before a fine-tune


@pytest.fixture(scope="module")
def pipe():
    import torch

    from nbtune.embedded import build_diffusion

    torch.set_num_threads(1)
    return build_diffusion.load_pipeline(DIFFUSION_DIR)


@pytest.fixture(scope="module")
def judge():
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(JUDGE_DIR)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_the_pipeline_loads_with_diffusers_and_draws_32x32_images(offline):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(DIFFUSION_DIR, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a red circle in the top left", "a blue sks in the bottom right"], height=32, width=32,
                  num_inference_steps=25, guidance_scale=3.0, generator=torch.Generator().manual_seed(0)).images
    assert [im.size for im in images] == [(32, 32)] * 2 and {im.mode for im in images} == {"RGB"}
    assert "sks" in pipe.tokenizer.get_vocab() and pipe.tokenizer.unk_token_id not in pipe.tokenizer(
        "a yellow sks in the top right")["input_ids"]
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert sum(p.numel() for m in (pipe.vae, pipe.text_encoder, pipe.unet) for p in m.parameters()) < 2_000_000
    assert _size(DIFFUSION_DIR) < 10_000_000 and _size(JUDGE_DIR) < 5_000_000


def test_the_concept_shape_is_new_and_drawn_deterministically():
    import random

    from nbtune.embedded import shapes

    assert shapes.CONCEPT not in shapes.SHAPES
    a = shapes.make_concept("all", 1, 5)
    b = shapes.make_concept("all", 1, 5)
    assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b] and {s.shape for s in a} == {"star"}
    assert shapes.make_concept("all", 1, 6)[0].image.tobytes() != a[0].image.tobytes()
    train, held = set(shapes.concept_combos("train")), set(shapes.concept_combos("eval"))
    assert not train & held and len(train | held) == len(shapes.COLOURS) * len(shapes.POSITIONS)
    assert {p for _, p in train} == set(shapes.POSITIONS) == {p for _, p in held}
    with pytest.raises(ValueError, match="colour"):
        shapes.draw_concept("pink", "top-left", random.Random(0))


def test_the_shipped_concept_images_are_the_generators():
    import numpy as np
    from PIL import Image

    from nbtune.embedded import build_diffusion, shapes

    train = [json.loads(line) for line in (CONCEPT_DIR / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (CONCEPT_DIR / "eval.jsonl").read_text().splitlines()]
    made = build_diffusion.concept_rows("train")
    assert 16 <= len(train) == len(made) <= 24
    for row, (rel, s) in zip(train, made, strict=True):
        assert row == {"image": rel, "prompt": build_diffusion.prompt("sks", s.colour, s.position)}
        with Image.open(CONCEPT_DIR / rel) as png:
            assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(s.image))
    assert sorted(p.relative_to(CONCEPT_DIR).as_posix() for p in CONCEPT_DIR.rglob("*.png")) == [r for r, _ in made]
    assert held == [{"prompt": p, "concept": shapes.CONCEPT} for p in build_diffusion.eval_prompts() * 4]
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in train}


def test_the_judge_names_the_shape_of_held_out_generator_images(judge):
    from nbtune.embedded import build_diffusion, shapes

    assert [judge.config.id2label[i] for i in range(judge.config.num_labels)] == [*shapes.SHAPES, shapes.CONCEPT]
    samples = build_diffusion.judge_set(seed=403, per_combo=1)  # a seed neither the build nor the judge used
    named = build_diffusion.judge_names(judge, [s.image for s in samples])
    assert sum(n == s.shape for n, s in zip(named, samples, strict=True)) / len(samples) >= 0.9


def test_the_base_draws_the_shapes_it_knows_and_not_the_concept(pipe, judge):
    from nbtune.embedded import build_diffusion

    known, wanted = build_diffusion.known_prompts()  # every shape x colour x position, once
    base = build_diffusion.drawing_rate(pipe, judge, known, wanted, seed=1000)
    held = build_diffusion.eval_prompts() * 2
    concept = build_diffusion.drawing_rate(pipe, judge, held, ["star"] * len(held), seed=1000)
    assert base["rate"] >= BASE_KNOWN_RATE and concept["rate"] <= BASE_CONCEPT_RATE, (base, concept)


@pytest.mark.parametrize("folder", [DIFFUSION_DIR, JUDGE_DIR, CONCEPT_DIR])
def test_each_embedded_folder_says_how_it_was_built(folder):
    info = json.loads((folder / "build_info.json").read_text())
    assert info
    if folder != CONCEPT_DIR:
        assert info["cpu"] and info["threads"] >= 1


def test_another_judge_is_another_result_in_the_store(tmp_path, monkeypatch):
    """The judge's verdicts are sks-star's eval accuracy: a changed judge (rebuilt by --judge-only) changes the
    cache key, so a run judged by the old one is not served as this one's."""
    import dataclasses
    import shutil

    from nbtune import TuneConfig, embedded
    from nbtune.store import cache_key

    config = TuneConfig(model={"name_or_path": "nbtune:tiny-diffusion", "task": "text-to-image"},
                        data={"source": "nbtune:sks-star"})
    before = cache_key(config)
    assert "|judge:" in before.data_id and cache_key(config) == before
    judge = shutil.copytree(JUDGE_DIR, tmp_path / "judge")
    spec = dataclasses.replace(embedded.DATASETS["sks-star"], judge=judge)
    monkeypatch.setitem(embedded.DATASETS, "sks-star", spec)
    assert cache_key(config) == before  # the same files elsewhere: the same judge
    config_file = judge / "config.json"
    config_file.write_text(config_file.read_text().replace('"circle"', '"ring"', 1))
    assert cache_key(config).key != before.key
