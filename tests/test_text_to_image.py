"""Text-to-image (model.task text-to-image): rows, methods, evaluations that draw, diffusers' own artifacts and
images side by side, on a random tiny Stable Diffusion pipeline made here (a 32x32 pipeline of 1 M parameters:
a step takes milliseconds). The embedded pipeline, its judge and the DreamBooth acceptance are checked in
tests/test_embedded_diffusion.py and bench/results.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from nbtune.config import ConfigError, TuneConfig
from nbtune.events import EventStream

pytest.importorskip("diffusers")
SHAPES = Path(__file__).parents[1] / "nbtune" / "embedded" / "data" / "shapes" / "train"


def rows() -> dict[str, list[dict]]:
    """Eight training rows (circles, one prompt), four eval rows: two with an image, two prompts only."""
    images = sorted((SHAPES / "circle").glob("*.png"))
    train = [{"image": str(p), "prompt": "a red circle in the top left"} for p in images[:8]]
    evaluation = [{"image": str(p), "prompt": "a blue circle"} for p in images[8:10]]
    evaluation += [{"prompt": "a red circle in the bottom right"}, {"prompt": "a blue square"}]
    return {"train": train, "eval": evaluation}


def draw_config(pipeline: Path, method: str = "lora", source=None, steps: int = 4, **data) -> TuneConfig:
    return TuneConfig(model={"name_or_path": str(pipeline), "task": "text-to-image"}, method=method,
                      data={"source": source if source is not None else rows(), "eval_split": "eval", **data},
                      training={"max_steps": steps, "micro_batch_size": 4, "log_every": 1, "eval_every": steps})


def prepared(config: TuneConfig):
    from nbtune import data, models

    return data.prepare(config, models.load_tokenizer(config))


def decoded(png: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(png)))


def test_rows_become_pixels_in_minus_one_to_one_and_padded_prompt_ids(pipeline):
    from nbtune import models

    out = prepared(draw_config(pipeline))
    assert len(out.train) == 8 and len(out.eval) == 4 and out.stats["image_size"] == [3, 32, 32]
    first = out.train[0]
    assert tuple(first["pixel_values"].shape) == (3, 32, 32)
    assert -1.0 <= float(first["pixel_values"].min()) < 0.0 < float(first["pixel_values"].max()) <= 1.0
    tokenizer = models.load_tokenizer(draw_config(pipeline))
    assert len(first["input_ids"]) == 12 and first["input_ids"][:2] == tokenizer.convert_tokens_to_ids(["a", "red"])
    assert ["pixel_values" in r for r in out.eval] == [True, True, False, False]


def test_bad_rows_and_settings_name_the_field_the_value_and_what_is_allowed(pipeline):
    with pytest.raises(ConfigError, match=r"data.text_column must be one of the data's columns .*'caption'"):
        prepared(draw_config(pipeline, text_column="caption"))
    broken = rows()
    broken["train"][3] = {"prompt": "a blue square"}
    with pytest.raises(ConfigError, match=r"data.image_column: every training row needs an image; the row "
                                          r"prompted 'a blue square' has none"):
        prepared(draw_config(pipeline, source=broken))
    with pytest.raises(ConfigError, match=r"data.augment must be none for model.task text-to-image"):
        draw_config(pipeline, augment="flip")
    for method in ("bitfit", "ia3", "prompt-tuning", "adapter", "qlora"):
        with pytest.raises(ConfigError, match=rf"model.task 'text-to-image' is not supported by {method}"):
            draw_config(pipeline, method)


def test_lora_adapts_the_unets_attention_only(pipeline):
    from nbtune import models

    config = draw_config(pipeline)
    built = models.build(config, tokenizer=models.load_tokenizer(config))
    trainable = [n for n, p in built.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("unet.") and "lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted <= {"to_q", "to_k", "to_v", "0"}  # to_out.0 ends in 0


def test_lora_on_chosen_unet_layers_is_checked_against_their_sizes_before_loading(pipeline):
    """method.target_modules may name other UNet layers (the feed-forward); a rank above the smallest of them
    is refused naming method.r, as for text models."""
    from nbtune import models, preflight

    chosen = draw_config(pipeline).replace(**{"method.params": {"target_modules": ["to_k", "ff.net.2"], "r": 4}})
    preflight.check(chosen)
    built = models.build(chosen, tokenizer=models.load_tokenizer(chosen))
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in built.model.named_parameters() if p.requires_grad}
    assert adapted == {"to_k", "2"}  # ff.net.2 ends in 2
    with pytest.raises(ConfigError, match=r"method.r must be <= 32, .* \(down_blocks.0.attentions.0.*\.to_k\) "
                                          r"\(got 64\)"):
        preflight.check(chosen.replace(**{"method.params": {"target_modules": ["to_k", "ff.net.2"], "r": 64}}))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_each_method_trains_and_every_evaluation_draws_the_eval_prompts(pipeline, tmp_path, method):
    from nbtune.training import execute

    events = EventStream()
    summary = execute(draw_config(pipeline, method), tmp_path / "run", events)
    assert summary.state == "finished", summary
    evals = [e.data for e in events.history if e.kind == "eval"]
    assert [e["step"] for e in evals] == [0, 4]
    for e in evals:
        assert len(e["samples"]) == 4 and e["sample_prompts"][2] == "a red circle in the bottom right"
        assert decoded(e["samples"][0]).size == (32, 32)
        assert e["loss"] > 0 and "perplexity" not in e  # an MSE is no token loss
    trainable = summary.trainable_params / summary.total_params
    assert (trainable < 0.1) if method == "lora" else (0.5 < trainable < 1.0)  # full: the UNet, not VAE/text


def test_the_eval_loss_uses_fixed_noise_so_the_same_model_scores_the_same(pipeline):
    from nbtune import diffusion

    model = diffusion.load_model(pipeline).eval()
    batch = diffusion.Collator()([r for r in prepared(draw_config(pipeline)).eval if "pixel_values" in r])
    first, again = (float(model(**batch)["loss"]) for _ in range(2))
    model.train()
    assert first == again != float(model(**batch)["loss"])  # training draws its noise afresh


def test_a_judge_scores_the_share_of_drawn_images_it_recognises_as_the_concept(pipeline, tmp_path):
    """A judge that names everything a circle: every drawn image of a circle prompt counts, none of a square's."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from nbtune import diffusion

    judge = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32, num_labels=2,
                                                id2label={0: "circle", 1: "square"}))
    with torch.no_grad():
        judge.classifier.weight.zero_()
        judge.classifier.bias.copy_(torch.tensor([1.0, 0.0]))
    judge.save_pretrained(tmp_path / "judge")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "judge")
    model = diffusion.load_model(pipeline)
    concept = [{"input_ids": [4] + [0] * 11, "prompt": "a circle", "concept": c} for c in ("circle", "circle",
                                                                                          "square", "circle")]
    assert diffusion.evaluation(model, concept, tmp_path / "judge")["accuracy"] == 0.75


@pytest.fixture(scope="module")
def drawn(pipeline, tmp_path_factory):
    """A LoRA run and a full one in a store of their own."""
    import nbtune

    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NBTUNE_HOME", str(root))
        runs = {}
        for method in ("lora", "full"):
            runs[method] = nbtune.launch(draw_config(pipeline, method))
            runs[method].wait()
            assert runs[method].status == "finished", runs[method].error
        yield runs, root


def test_the_lora_artifact_draws_with_diffusers_alone_as_the_run_does(drawn, pipeline):
    """The artifact's own loading code (nbtune_run.json how_to_load), run as written, loads diffusers' LoRA
    file; with the same scheduler and seed it draws what `Run.draw` draws, and not what the base draws."""
    import numpy as np
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from nbtune import diffusion, generation

    run = drawn[0]["lora"]
    artifact = Path(run.artifact_path)
    assert (artifact / diffusion.LORA_FILE).exists() and (artifact / "adapter_config.json").exists()
    how = json.loads((artifact / "nbtune_run.json").read_text())["how_to_load"]
    namespace: dict = {}
    code = how.replace("ARTIFACT", str(artifact)).replace('pipe("PROMPT", ', 'pipe("a red circle", height=32, '
                                                                             'width=32, ')
    exec(compile(code.replace("image = pipe", "_ = pipe"), "how_to_load", "exec"), namespace)  # noqa: S102
    pipe = namespace["pipe"]
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    sampling = generation.SAMPLING
    plain = pipe("a red circle", height=32, width=32, num_inference_steps=sampling.steps,
                 guidance_scale=sampling.guidance_scale, generator=[torch.Generator().manual_seed(0)]).images[0]
    ours = run.draw("a red circle")[0]
    base = diffusion.load_model(pipeline).draw(["a red circle"])[0]
    difference = np.abs(np.asarray(plain, float) - np.asarray(ours, float))
    assert difference.max() <= 1.0  # rounding to 8 bits at most
    assert np.abs(np.asarray(base, float) - np.asarray(ours, float)).max() > 1.0


def test_the_full_artifact_is_a_pipeline_folder_with_the_trained_unet(drawn):
    import torch
    from diffusers import StableDiffusionPipeline

    run = drawn[0]["full"]
    pipe = StableDiffusionPipeline.from_pretrained(run.artifact_path, safety_checker=None,
                                                   requires_safety_checker=False)
    trained = run.model.unet.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in pipe.unet.state_dict().items())
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"  # the training scheduler, not the sampling one


def test_images_side_by_side_show_the_base_and_every_run_and_are_kept(drawn):
    from nbtune.generation import side_by_side

    runs, _ = drawn
    prompts = ["a red circle", "a blue square in the top left"]
    table = side_by_side(runs, prompts)
    assert table.columns == ["base", "lora", "full"]
    assert all(decoded(png).size == (32, 32) for column in table.answers.values() for png in column)
    assert table.to_html().count("<img ") == 6
    assert "drawn with DPM-Solver (20 steps, guidance scale 3.0), the i-th prompt from seed 0 + i" in table.to_html()
    assert side_by_side(runs, prompts).served_from_store
    with pytest.raises(ValueError, match=r"draws images \(model.task text-to-image\): use run.draw"):
        runs["lora"].generate("a red circle")


def test_an_identical_run_is_served_from_the_store_and_runs_compare(drawn, pipeline, monkeypatch):
    import nbtune

    runs, root = drawn
    monkeypatch.setenv("NBTUNE_HOME", str(root))
    assert nbtune.launch(draw_config(pipeline, "lora")).id == runs["lora"].id
    comparison = nbtune.compare(draw_config(pipeline), methods=["lora", "full"], seeds=1)
    rows_ = {row["variant"]: row for row in comparison.rows()}
    assert rows_["lora"]["served_from_store"] and rows_["full"]["served_from_store"]
    assert rows_["lora"]["trainable_percent"] < rows_["full"]["trainable_percent"]


def test_the_dashboard_of_a_drawing_run_shows_what_each_shown_evaluation_drew(drawn):
    from nbtune.widgets.dashboard import Dashboard, samples_html
    from nbtune.widgets.progress import SAMPLE_ROWS, RunProgress

    board = Dashboard(drawn[0]["lora"], widgets=False)
    page = samples_html(board.progress)
    assert page.count("<img ") == 2 * 4 and "step 0" in page and "step 4" in page  # the base's, the last's
    assert "a blue square" in page
    progress = RunProgress()
    for step in range(0, 10):
        progress.apply("eval", {"step": step, "samples": [f"png{step}"], "sample_prompts": ["p"]})
    assert [s for s, _, _ in progress.samples] == [0, *range(10 - SAMPLE_ROWS + 1, 10)]
    assert samples_html(RunProgress()) == ""


def test_a_merged_lora_export_is_one_pipeline_folder_drawing_as_the_run_does(drawn, tmp_path):
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from nbtune import diffusion

    run = drawn[0]["lora"]
    folder = run.merge(tmp_path / "merged")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    merged = diffusion.DiffusionModel(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    ours, theirs = run.draw("a red circle")[0], merged.draw(["a red circle"])[0]
    assert np.abs(np.asarray(ours, float) - np.asarray(theirs, float)).max() <= 2.0  # merged weights round
    assert json.loads((folder / "nbtune_run.json").read_text())["merged_from_run"] == run.id


def test_gradient_checkpointing_is_refused_before_anything_loads(pipeline):
    with pytest.raises(ConfigError, match=r"training.gradient_checkpointing cannot be true for model.task "
                                          r"text-to-image yet"):
        draw_config(pipeline).replace(**{"training.gradient_checkpointing": True})


def test_estimates_in_two_threads_at_once_both_import_diffusers(tmp_path):
    """The builder estimates on its thread while a cell estimates on the kernel's: in a fresh interpreter, three
    threads estimating a pipeline at once all succeed (diffusers' lazy module is not thread-safe on its own)."""
    import subprocess
    import sys

    script = tmp_path / "race.py"
    script.write_text(
        "import threading\n"
        "from nbtune import TuneConfig\n"
        "from nbtune.estimator import estimate_memory\n"
        "errors = []\n"
        "def estimate():\n"
        "    try:\n"
        "        estimate_memory(TuneConfig(model={'name_or_path': 'nbtune:tiny-diffusion', 'task': 'text-to-image'},\n"
        "                                   data={'source': 'nbtune:sks-star'}), gpu='t4')\n"
        "    except Exception as error:\n"
        "        errors.append(repr(error))\n"
        "threads = [threading.Thread(target=estimate) for _ in range(3)]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
        "print('errors:', errors)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert "errors: []" in done.stdout, (done.stdout, done.stderr[-2000:])
