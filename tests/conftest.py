"""Fixtures the test files share: a run store per test module and a model hub that is never asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbtune.store import RunStore


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> RunStore:
    """An empty run store of this test module (its runs are shared by the module's tests)."""
    return RunStore(tmp_path_factory.mktemp("store"))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No request to the model hub: what needs one fails instead of waiting on the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading any model (base or trained) fails the test."""
    from nbtune import models, training

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(training, "load_trained_model", refuse)


# the words of the tiny pipeline's tokenizer (tests/test_text_to_image.py, test_estimator_text_to_image.py)
PIPELINE_WORDS = ["<pad>", "<s>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "sks", "in", "the", "top",
         "left", "right", "bottom"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A random tiny Stable Diffusion pipeline folder (word-level tokenizer, 32x32 images, 16x16 latents), for
    the text-to-image tests: a step takes milliseconds."""
    pytest.importorskip("diffusers")
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(PIPELINE_WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=12)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(16, 32), latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        sample_size=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(PIPELINE_WORDS), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=12,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0))
    folder = tmp_path_factory.mktemp("pipeline") / "tiny-sd"
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=DDPMScheduler(steps_offset=1, clip_sample=False),
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(folder)
    return folder
