"""Per-GPU memory under DDP, FSDP and ZeRO 2/3 (nbtune/estimator/sharding.py), the CPU figure of offloading, and
"use N GPUs with FSDP" when one GPU cannot fit (issue 16)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest

from nbtune import TuneConfig

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "bench" / "data" / "vram_calibration_points.csv"  # the copy bench/calibration.py reads
GIB = 2**30
# The estimator's accuracy on the published rows of the same file, as bench/calibration.py measures
# it (24 of 26 within 25 %, bench/results/calibration-2026-12-02.md; against real CPU steps tests/test_estimator.py asks 15 %)
PUBLISHED_ACCURACY = 0.25
TORCHTUNE_LORA = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # q, v, output_proj + MLP


def llama(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    values = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512)
    return LlamaConfig(**{**values, **overrides})


def config(method: str = "full", dtype: str = "bf16", precision: str = "bf16", **distributed: Any) -> TuneConfig:
    return TuneConfig(model={"name_or_path": "tiny-llama", "dtype": dtype}, method=method,
                      data={"max_length": 128}, training={"micro_batch_size": 2, "precision": precision},
                      distributed=distributed)


def step(c: TuneConfig, mc: Any) -> Any:
    from nbtune.estimator.estimate import terms
    from nbtune.estimator.skeleton import facts

    return terms(c, facts(c, mc))


def shard(total: int, n: int) -> int:
    return math.ceil(total / n)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_fsdp_divides_weights_gradients_and_optimizer_state_by_the_processes(method, precision):
    """Full sharding over N processes holds 1/N of every sharded term of one process (frozen base weights too,
    4-bit ones at their packed size), gathers the same units whatever N, and leaves the activations and logits
    of the process's own micro-batch as they are without a strategy."""
    mc = llama()
    one, alone = step(config(method, precision=precision, strategy="fsdp"), mc), step(config(method, precision=precision), mc)
    assert one.activations == alone.activations and one.logits == alone.logits
    assert one.shard.gathered > 0 and one.weights.constants == alone.weights.constants
    for n in (2, 4, 8):
        t = step(config(method, precision=precision, strategy="fsdp", processes=n), mc)
        assert t.weights.frozen == shard(one.weights.frozen, n) and t.weights.trainable == shard(one.weights.trainable, n)
        assert t.weights.quantized == shard(one.weights.quantized, n)
        assert t.optimizer.gradients == shard(one.optimizer.gradients, n)
        assert t.optimizer.state == shard(one.optimizer.state, n)
        assert t.optimizer.step_temp == shard(one.optimizer.step_temp, n)
        assert t.shard.gathered == one.shard.gathered and t.activations == one.activations
        assert t.weights.constants == one.weights.constants  # quant_state stays whole on every process


def test_fsdp_upcasts_16_bit_trainable_parameters_under_mixed_precision_as_accelerate_does():
    """accelerate keeps FSDP's trainable shards in fp32 under bf16 mixed precision: a bf16 full fine-tune holds
    fp32 weights, gradients and AdamW moments per shard (16 bytes a parameter), gathered in bf16; LoRA's adapters
    are fp32 already, and pure bf16 (precision fp32 on bf16 weights) is not cast."""
    mc = llama()
    bf16 = step(config("full"), mc).weights.trainable  # 2 bytes a parameter
    full = step(config("full", strategy="fsdp", processes=2), mc)
    assert full.weights.trainable == shard(2 * bf16, 2) == full.optimizer.gradients
    assert full.optimizer.state == 2 * full.weights.trainable
    pure = step(config("full", precision="fp32", strategy="fsdp", processes=2), mc)
    assert pure.weights.trainable == shard(bf16, 2)
    lora, lora_alone = step(config("lora", strategy="fsdp", processes=2), mc), step(config("lora"), mc)
    assert lora.weights.trainable == shard(lora_alone.weights.trainable, 2)


def test_hybrid_sharding_divides_by_a_node_and_gradients_and_optimizer_keeps_the_weights_gathered():
    mc = llama()
    one = step(config("full", strategy="fsdp"), mc)
    hybrid = step(config("full", strategy="fsdp", processes=2, nodes=2, sharding="hybrid"), mc)
    assert hybrid.shard.processes == 4 and hybrid.optimizer.state == shard(one.optimizer.state, 2)
    assert hybrid.weights.trainable == shard(one.weights.trainable, 2)
    grad_op = step(config("full", strategy="fsdp", processes=4, sharding="gradients-and-optimizer"), mc)
    assert grad_op.optimizer.state == shard(one.optimizer.state, 4)
    # every weight stays gathered (in bf16) from the forward to the end of the backward: whole at the peak
    assert grad_op.shard.gathered == step(config("full"), mc).weights.trainable > one.shard.gathered


@pytest.mark.parametrize("method", ["full", "lora"])
def test_ddp_is_the_single_gpu_estimate_plus_the_reducers_buckets(method):
    """Each DDP process holds the whole model; the reducer's buckets are one more copy of the gradients, held
    through the whole step, so every phase grows by exactly that."""
    from nbtune.estimator import estimate_memory

    mc = llama()
    alone, ddp = estimate_memory(config(method), mc), estimate_memory(config(method, strategy="ddp", processes=4), mc)
    buckets = step(config(method), mc).optimizer.gradients
    assert ddp.total_bytes == alone.total_bytes + buckets
    assert ddp.breakdown["communication"] == buckets and ddp.peak_phase == alone.peak_phase
    assert {p: v - alone.phases[p] for p, v in ddp.phases.items()} == dict.fromkeys(alone.phases, buckets)
    assert ddp.processes == 4 and "4 × " in ddp.verdict_for("t4") and "per GPU" in ddp.verdict_for("t4")


def test_zero_stages_keep_deepspeeds_fp32_master_copy_and_buckets():
    """ZeRO-2 divides gradients and optimizer state (AdamW's fp32 moments plus DeepSpeed's fp32 master copy: 12
    bytes a parameter) and keeps 16-bit weights whole; ZeRO-3 divides the weights too and gathers parameters
    for the forward and backward; both hold reduce_bucket_size (5e8) 16-bit elements of bucket."""
    from nbtune.estimator import sharding

    mc = llama()
    n_params = step(config("full"), mc).weights.trainable // 2  # bf16 weights
    zero2 = step(config("full", dtype="fp32", strategy="zero2", processes=4), mc)
    assert zero2.weights.trainable == 2 * n_params  # DeepSpeed casts the fp32 model to bf16
    assert zero2.optimizer.state == shard(12 * n_params, 4) and zero2.optimizer.gradients == shard(2 * n_params, 4)
    assert zero2.shard.backward_buckets == 2 * sharding.ZERO_REDUCE_BUCKET and zero2.shard.gathered == 0
    zero3 = step(config("full", strategy="zero3", processes=4), mc)
    assert zero3.weights.trainable == shard(2 * n_params, 4) and zero3.shard.buckets == zero2.shard.backward_buckets
    assert zero3.shard.gathered == step(config("full"), mc).weights.trainable  # a small model: all of it is live


@pytest.mark.parametrize(("strategy", "moves_weights"), [("fsdp", True), ("zero2", False), ("zero3", True)])
def test_cpu_offload_moves_the_shards_to_the_cpu_figure(strategy, moves_weights):
    from nbtune.estimator import estimate_memory

    mc = llama()
    on = estimate_memory(config("full", strategy=strategy, processes=2), mc)
    off = estimate_memory(config("full", strategy=strategy, processes=2, cpu_offload=True), mc)
    assert on.cpu_bytes == 0 and off.cpu_breakdown["optimizer_state"] == on.breakdown["optimizer_state"] > 0
    assert off.breakdown["optimizer_state"] == off.breakdown["optimizer_step"] == off.breakdown["gradients"] == 0
    moved = ("trainable_weights" in off.cpu_breakdown, off.breakdown["trainable_weights"] == 0)
    assert moved == (moves_weights, moves_weights)
    if moves_weights:
        assert off.cpu_breakdown["trainable_weights"] == on.breakdown["trainable_weights"]
    assert off.total_bytes < on.total_bytes and off.cpu_bytes == sum(off.cpu_breakdown.values())
    assert "CPU memory" in str(off) and off.to_dict()["cpu_bytes"] == off.cpu_bytes
    from nbtune.widgets.memory_panel import estimate_html

    assert "of CPU memory" in estimate_html(off, "t4") and "of CPU memory" not in estimate_html(on, "t4")


def test_one_gpu_that_cannot_fit_is_told_the_fewest_gpus_with_fsdp_that_fit(offline):
    """A Llama-2-7B full fine-tune does not fit an A100 40 GB: the suggestions name the smallest N of 2, 4, 8
    whose per-GPU peak fits, keeping the effective batch where the accumulation steps divide; a run already on
    several GPUs gets no such suggestion."""
    from nbtune.estimator import estimate_memory
    from nbtune.estimator.estimate import GPU_COUNTS, apply_changes
    from nbtune.estimator.gpus import gpu_bytes

    c = TuneConfig(model={"name_or_path": "meta-llama/Llama-2-7b-hf", "dtype": "bf16"}, method="full",
                   data={"max_length": 1024}, training={"micro_batch_size": 1, "gradient_accumulation_steps": 8,
                                                        "precision": "bf16", "gradient_checkpointing": True})
    est = estimate_memory(c, gpu="a100-40gb")
    gpus = [s for s in est.suggestions if "distributed.processes" in s.changes]
    assert not est.fits() and len(gpus) == 1 and gpus[0].fits
    n = gpus[0].changes["distributed.processes"]
    assert gpus[0].changes == {"distributed.strategy": "fsdp", "distributed.processes": n,
                               "training.gradient_accumulation_steps": 8 // n}
    assert f"use {n} GPUs with FSDP" in gpus[0].description and f"needs {n} GPUs" in gpus[0].cost
    applied = estimate_memory(apply_changes(c, gpus[0].changes), gpu="a100-40gb")
    assert applied.total_bytes == gpus[0].total_bytes <= gpu_bytes("a100-40gb")[1]
    for fewer in (m for m in GPU_COUNTS if m < n):  # fewer GPUs do not fit
        assert not estimate_memory(c.replace(**{"distributed.strategy": "fsdp", "distributed.processes": fewer}),
                                   gpu="a100-40gb").fits()
    on_two = estimate_memory(apply_changes(c, {"distributed.strategy": "ddp", "distributed.processes": 2}),
                             gpu="a100-40gb")
    assert not on_two.fits() and not any("distributed.processes" in s.changes for s in on_two.suggestions)


def test_the_cli_estimates_one_gpu_of_a_distributed_run(capsys, offline):
    from nbtune.estimator.cli import main

    assert main(["meta-llama/Llama-2-7b-hf", "--method", "full", "--dtype", "bf16", "--precision", "bf16",
                 "--strategy", "zero3", "--processes", "4", "--cpu-offload", "--gpu", "a100-40gb"]) == 0
    out = capsys.readouterr().out
    assert "zero3 on 4 GPUs, CPU offload" in out and "per GPU" in out and "CPU memory (offloaded)" in out
    assert main(["meta-llama/Llama-2-7b-hf", "--strategy", "ddp", "--cpu-offload"]) == 2  # named by the config


# ----- the published multi-GPU rows (torchtune, 8 × A100 80 GB, per-GPU peak reserved) -----------------------

def published(row: int) -> float:
    """A row's per-GPU figure in bytes: GB, or GiB where the source's table is in GiB and the row kept its number
    (bench/calibration.py reads the rows the same way)."""
    r = list(csv.DictReader(PUBLISHED.open()))[row - 1]
    value = float(r["peak_gb"])
    return value * GIB if "unit GiB" in r["notes"] and f"{value:g} GB" in r["notes"] else value * 1e9


def torchtune_fsdp(model: str, method: Any, batch: int, seq: int, **training: Any) -> TuneConfig:
    """A torchtune FSDP recipe as nbtune expresses it: bf16 weights, activation checkpointing, 8 processes."""
    return TuneConfig(model={"name_or_path": model, "dtype": "bf16"}, method=method, data={"max_length": seq},
                      training={"micro_batch_size": batch, "gradient_checkpointing": True, **training},
                      distributed={"strategy": "fsdp", "processes": 8})


@pytest.mark.parametrize("row", [17, 23])
def test_published_fsdp_rows_are_estimated_per_gpu_within_the_single_gpu_accuracy(row, offline):
    """Row 17: Llama-2-70B full fine-tune, batch 4 × 4096, bnb PagedAdamW; torchtune trains pure bf16 (no
    autocast: precision fp32 on bf16 weights) and its paged optimizer state lives in CUDA unified memory,
    outside the torch counters the figure reads. Row 23: Llama-3.1-70B LoRA (rank 16, no dropout, torchtune's
    targets), batch 2 × 2048, CEWithChunkedOutputLoss (nbtune's chunked loss)."""
    from nbtune.estimator import estimate_memory

    if row == 17:
        c = torchtune_fsdp("meta-llama/Llama-2-70b-hf", "full", 4, 4096, precision="fp32", optimizer="paged-adamw")
    else:
        c = torchtune_fsdp("meta-llama/Llama-3.1-70B-Instruct",
                           {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TORCHTUNE_LORA},
                           2, 2048, precision="bf16", loss_implementation="chunked")
    est = estimate_memory(c, gpu="a100-80gb")
    outside_torch = est.breakdown["optimizer_state"] if row == 17 else 0
    estimated, measured = est.reserved_bytes - outside_torch, published(row)
    assert est.processes == 8
    assert abs(estimated / measured - 1) <= PUBLISHED_ACCURACY, (row, estimated / GIB, measured / GIB)


def test_the_published_70b_lora_row_is_below_what_its_stated_setup_must_hold(offline):
    """Row 16 (Llama-2-70B LoRA, FSDP over 8, batch 4 × 4096, checkpointing) cannot be matched from first
    principles: one GPU's weight shard and the block inputs checkpointing keeps already exceed the figure
    (torchtune's alpaca batches were presumably far shorter than 4096 tokens). bench/calibration.py excludes it
    for the same reason."""
    from nbtune.estimator.catalogue import model_config_for
    from nbtune.estimator.estimate import terms
    from nbtune.estimator.skeleton import facts

    c = torchtune_fsdp("meta-llama/Llama-2-70b-hf",
                       {"name": "lora", "r": 8, "alpha": 16, "target_modules": TORCHTUNE_LORA}, 4, 4096,
                       precision="bf16")
    t = terms(c, facts(c, model_config_for(c)))
    assert t.weights.frozen + t.activations.stored > published(16)
