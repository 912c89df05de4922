"""The memory estimate of text-to-image models (a Stable Diffusion UNet trained on a frozen VAE's latents, given a
frozen text encoder's states: nbtune/diffusion.py), against real CPU steps (estimator/measure.py), as
tests/test_estimator_image_to_text.py checks captioners.

Random pipelines are made here: tests/test_text_to_image.py's tiny one (32x32 images, 16x16 latents, UNet (32, 64)),
a larger UNet (32, 64, 64) with two cross-attention down blocks at 16x16 and 32x32 latents, and one in Stable
Diffusion 2's layout (Linear projections, two transformer layers and two ResNets a block, 20 prompt tokens).
Stable Diffusion 1.5 is estimated from the built-in catalogue's configs alone (nothing is downloaded).
"""

from __future__ import annotations

import pytest

from nbtune.config import TuneConfig

pytest.importorskip("diffusers")
BATCH = 2
ROWS = {"train": [{"image": "unused.png", "prompt": "a red circle"}]}  # the estimate reads no rows


def pipeline_configs(sample: int, sd2: bool = False):
    """The configs of a larger random pipeline: UNet (32, 64, 64) with two cross-attention down blocks at
    `sample`² latents (a 3-level VAE: images 4 times the side), cross-attention over a 48-wide text encoder; `sd2`:
    Linear projections, two transformer layers and two ResNets a block, 2/4/4 heads, 20 prompt tokens."""
    from transformers import CLIPTextConfig

    from nbtune.diffusion import PipelineConfig

    unet = {"sample_size": sample, "in_channels": 4, "out_channels": 4, "layers_per_block": 2 if sd2 else 1,
            "block_out_channels": [32, 64, 64], "cross_attention_dim": 48, "norm_num_groups": 8,
            "attention_head_dim": [2, 4, 4] if sd2 else 8, "use_linear_projection": sd2,
            "transformer_layers_per_block": 2 if sd2 else 1,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
    vae = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8,
           "block_out_channels": [16, 32, 32], "down_block_types": ["DownEncoderBlock2D"] * 3,
           "up_block_types": ["UpDecoderBlock2D"] * 3, "sample_size": 4 * sample}
    text = CLIPTextConfig(vocab_size=16, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=20 if sd2 else 12, bos_token_id=1,
                          eos_token_id=2, pad_token_id=0)
    return PipelineConfig(unet=unet, vae=vae, text_encoder=text,
                          scheduler={"num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False})


def draw_config(path: str, method: str, precision: str, dtype: str = "fp32", batch: int = BATCH) -> TuneConfig:
    return TuneConfig(model={"name_or_path": str(path), "task": "text-to-image", "dtype": dtype}, method=method,
                      data={"source": ROWS}, training={"micro_batch_size": batch, "precision": precision})


def compare(config: TuneConfig, model_config) -> tuple[float, dict[str, int]]:
    """Weights (UNet, VAE and text encoder), trainable weights, gradients and optimizer state must equal the real
    step's; returns the estimate's saved activations over the real step's."""
    from nbtune.estimator.estimate import terms
    from nbtune.estimator.measure import measure_step
    from nbtune.estimator.skeleton import facts

    t = terms(config, facts(config, model_config), device="cpu")
    real = measure_step(config, model_config)
    w = t.weights
    assert w.frozen + w.trainable + w.constants == real["weights"]
    assert (w.trainable, t.optimizer.gradients, t.optimizer.state) == (
        real["trainable_weights"], real["gradients"], real["optimizer_state"])
    assert t.shape.tokens == real["tokens"]  # micro-batch x latent positions
    return t.activations.saved / real["saved_activations"], real


def step_peak_estimate(t) -> int:
    """What the estimate says a step's forward and backward hold above the weights and optimizer state."""
    return max(t.phases[p].dynamic for p in ("encoding", "forward end", "backward"))


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize(("precision", "dtype"), [("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16")])
def test_the_estimate_of_a_text_to_image_step_matches_a_real_one(pipeline, method, precision, dtype):
    """Weights, gradients and optimizer state exactly; saved activations within 25 % (measured on a 2-core CPU,
    torch 2.13, diffusers 0.42.1, peft 0.21.2: the real step's to the byte for each method, in fp32, bf16 autocast
    over fp32 weights and bf16 weights)."""
    from nbtune import models
    from nbtune.estimator.skeleton import DIFFUSION, facts

    config = draw_config(pipeline, method, precision, dtype)
    mc = models.load_model_config(config)
    f = facts(config, mc)
    assert f.family == DIFFUSION and (f.dims["latent"], f.dims["image"], f.dims["text_tokens"]) == (16, 32, 12)
    ratio, real = compare(config, mc)
    assert real["tokens"] == BATCH * 16 * 16
    assert 0.75 <= ratio <= 1.25, ratio


@pytest.mark.parametrize(("sample", "sd2"), [(16, False), (32, False), (16, True)], ids=["16", "32", "sd2-layout"])
@pytest.mark.parametrize(("method", "precision"), [("full", "bf16"), ("lora", "fp32"), ("lora", "bf16")])
def test_a_larger_unet_and_sd2s_layout_are_estimated_against_real_steps(sample, sd2, method, precision):
    """Three levels with two cross-attention down blocks (and Linear projections, two transformer layers a block):
    measured equal to the real step's saved activations, to the byte (full and LoRA, fp32 and bf16)."""
    ratio, _ = compare(draw_config("larger-sd", method, precision), pipeline_configs(sample, sd2))
    assert 0.75 <= ratio <= 1.25, ratio


@pytest.mark.parametrize(("method", "precision"), [("full", "fp32"), ("lora", "bf16")])
def test_the_estimate_follows_the_latent_size_as_a_real_step_does(method, precision):
    """Four times the latent positions: about four times the activations (measured: 3.98 for full fp32, 3.21 for
    LoRA under bf16 autocast, whose saved 16-bit weight copies do not grow with the image), estimate and real step
    alike."""
    from nbtune.estimator.estimate import terms
    from nbtune.estimator.measure import measure_step
    from nbtune.estimator.skeleton import facts

    config = draw_config("larger-sd", method, precision)
    small, large = pipeline_configs(16), pipeline_configs(32)
    estimated = [terms(config, facts(config, mc), device="cpu").activations.saved for mc in (small, large)]
    real = [measure_step(config, mc)["saved_activations"] for mc in (small, large)]
    assert estimated[1] / estimated[0] == pytest.approx(real[1] / real[0], rel=0.05)
    assert estimated[1] > 3 * estimated[0]


@pytest.mark.parametrize(("method", "precision"), [("full", "fp32"), ("full", "bf16"), ("lora", "fp32"),
                                                   ("lora", "bf16")])
def test_the_estimate_of_a_real_steps_peak(method, precision):
    """What a real step's forward and backward hold at their peak, beyond the weights and optimizer state, within
    25 % (measured 0.98-1.00 at 32x32 latents: the saved activations and, at the start of the backward, the top
    blocks' gradients)."""
    from nbtune.estimator.estimate import terms
    from nbtune.estimator.measure import measure_step
    from nbtune.estimator.skeleton import facts

    mc = pipeline_configs(32)
    config = draw_config("larger-sd", method, precision)
    t = terms(config, facts(config, mc), device="cpu")
    real = measure_step(config, mc)["step_peak"]
    assert 0.75 * real <= step_peak_estimate(t) <= 1.25 * real, (step_peak_estimate(t), real)
    assert t.phases["encoding"].activations > 0  # the frozen VAE's no-grad forward, before the UNet


def test_stable_diffusion_1_5_is_estimated_from_its_configs_with_a_breakdown():
    """860 M UNet + 123 M text encoder + 84 M VAE parameters; LoRA in bf16 weights fits a T4 with ~1 GiB of
    activations at one 512x512 image, full fine-tuning in fp32 does not; activations grow with the micro-batch."""
    from nbtune.estimator import estimate_memory
    from nbtune.estimator.catalogue import from_catalogue
    from nbtune.estimator.gpus import GIB

    mc = from_catalogue("runwayml/stable-diffusion-v1-5")  # the built-in catalogue's: no weights, no hub
    full = estimate_memory(draw_config("runwayml/stable-diffusion-v1-5", "full", "fp32", batch=1), gpu="T4")
    assert full.trainable_params == 859_520_964  # the UNet's
    assert full.total_params - full.trainable_params == 123_060_480 + 83_653_863  # CLIP ViT-L/14's text, the VAE
    assert full.breakdown["weights"] + full.breakdown["trainable_weights"] == 4 * full.total_params
    assert not full.fits("T4") and full.breakdown["optimizer_state"] == 8 * full.trainable_params
    lora = estimate_memory(draw_config("runwayml/stable-diffusion-v1-5", "lora", "bf16", "bf16", batch=1), mc,
                           gpu="T4")
    assert 0 < lora.trainable_params < 0.01 * lora.total_params and lora.fits("T4")
    b = lora.breakdown
    assert 0.5 * GIB < b["activations"] < 3 * GIB and b["logits_loss"] == 0 and sum(b.values()) == lora.total_bytes
    assert lora.peak_phase == "backward" and lora.phases["encoding"] < lora.phases["backward"]
    assert any("64x64 latents (512x512 images) and 77 prompt tokens" in n for n in lora.notes), lora.notes
    four = estimate_memory(draw_config("runwayml/stable-diffusion-v1-5", "lora", "bf16", "bf16", batch=4), mc)
    assert 3.5 * b["activations"] < four.breakdown["activations"] < 4.1 * b["activations"]
    assert "activations & temporaries" in lora.table()


def test_the_memory_estimate_suggests_no_text_only_changes(pipeline):
    """A prompt is padded to the text encoder's positions whatever data.max_length says, there are no logits to
    chunk, and nbtune's DiffusionModel cannot turn gradient checkpointing on (the Trainer's train() fails): none
    of those is suggested, nor FSDP (its units are transformer blocks); smaller micro-batches, 16-bit weights,
    an 8-bit optimizer and LoRA are."""
    from nbtune.estimator import estimate_memory

    config = draw_config(pipeline, "full", "bf16", batch=4096)
    estimate = estimate_memory(config, gpu="T4")
    assert not estimate.fits("T4")
    kinds = {part for s in estimate._candidates() for part in s.changes}
    assert {"training.micro_batch_size", "model.dtype", "training.optimizer", "method.name"} <= kinds, kinds
    assert not kinds & {"data.max_length", "training.loss_implementation", "training.gradient_checkpointing",
                        "distributed.strategy"}, kinds


def test_gradient_checkpointing_is_neither_suggested_nor_accepted(pipeline):
    """A UNet is not checkpointed yet: the config refuses it (tests/test_text_to_image.py), so the estimate
    never suggests it."""
    from nbtune.config import ConfigError
    from nbtune.estimator import estimate_memory

    plain = estimate_memory(draw_config(pipeline, "lora", "bf16"), gpu="T4")
    assert not any("training.gradient_checkpointing" in s.changes for s in plain.suggestions)
    with pytest.raises(ConfigError, match="training.gradient_checkpointing cannot be true"):
        draw_config(pipeline, "lora", "bf16").replace(**{"training.gradient_checkpointing": True})


def test_the_simulated_estimate_says_it_runs_text_models_only(pipeline):
    from nbtune.estimator import simulate_memory

    with pytest.raises(ValueError, match="the simulated tier runs text models; model.task text-to-image"):
        simulate_memory(draw_config(pipeline, "lora", "bf16"))
