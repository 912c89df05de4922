"""Issue 14's acceptance on the embedded default (CPU): SFT on nbtune:chat with every built-in causal-LM method,
then DPO after SFT on nbtune:prefs.

1. SFT: each method trains its defaults (150 steps) on nbtune:chat; held-out exact match of greedy answers to
   the eval conversations (rendered with the tokenizer's chat template, the last assistant turn removed) against
   the reference answer, beside the untuned base's.
2. DPO after SFT: the SFT LoRA run is merged into its base (`run.merge`), and DPO starts from that folder with
   several methods; held-out preference accuracy (`nbtune.preference.score_pairs`: the chosen answer scored above
   the rejected one by the model itself) at step 0 and at the end, from the run's eval events.

    python bench/chat_and_preferences.py --out bench/results/chat-and-preferences-2026-12-02.md

Runs in a fresh temporary store, so it measures training, not the cache.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread is fastest for this tiny model (training.cpu_threads)

import nbtune  # noqa: E402
from nbtune import TuneConfig, models  # noqa: E402
from nbtune.data import load_rows  # noqa: E402
from nbtune.methods import registry  # noqa: E402

DPO_METHODS = ("lora", "ia3", "prompt-tuning", "full")


def exact_match(run_or_base: nbtune.Run | TuneConfig, config: TuneConfig) -> float:
    """Held-out exact match of greedy answers to nbtune:chat's eval conversations."""
    from nbtune import generation

    tokenizer = models.load_tokenizer(config)
    _, rows = load_rows(config)
    prompts = [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=False)
               for r in rows]
    if isinstance(run_or_base, TuneConfig):
        answers = generation._base_answers(run_or_base, prompts, generation.GenerationSettings(
            max_new_tokens=24, chat_template=False))
    else:
        answers = run_or_base.generate(prompts, chat_template=False, max_new_tokens=24)
    return sum(a.strip() == r["answer"].strip() for a, r in zip(answers, rows, strict=True)) / len(rows)


def sft_table(store: str) -> tuple[list[str], nbtune.Run]:
    chat = TuneConfig(data={"source": "nbtune:chat"}, training={"eval_every": None})
    lines = ["| method | exact match | train s |", "|---|---|---|",
             f"| untuned base | {exact_match(chat, chat):.2f} | - |"]
    lora = None
    for method in registry.all_methods(include_generated=False):
        if "causal-lm" not in method.tasks or method.name == "qlora":  # QLoRA needs a CUDA GPU (bitsandbytes)
            continue
        config = chat.replace(method=method.name)
        started = time.perf_counter()
        run = nbtune.train(config, store=store, progress=False)
        took = time.perf_counter() - started
        score = exact_match(run, config) if run.summary.state == "finished" else float("nan")
        lines.append(f"| {method.name} | {score:.2f} | {took:.0f} |")
        print(lines[-1], flush=True)
        lora = run if method.name == "lora" else lora
    return lines, lora


def dpo_table(store: str, sft: nbtune.Run, folder: Path) -> list[str]:
    merged = sft.merge(folder / "sft-lora-merged")
    lines = ["| DPO method (after SFT LoRA) | preference accuracy at step 0 | at the end | steps | train s |",
             "|---|---|---|---|---|"]
    for method in DPO_METHODS:
        config = TuneConfig(model={"name_or_path": str(merged)}, method=method, data={"source": "nbtune:prefs"},
                            training={"stage": "dpo", "max_steps": 100, "eval_every": 100, "micro_batch_size": 8})
        started = time.perf_counter()
        run = nbtune.train(config, store=store, progress=False)
        took = time.perf_counter() - started
        s = run.summary
        lines.append(f"| {method} | {s.base_eval_accuracy} | {s.final_eval_accuracy} | {s.step} | {took:.0f} |"
                     if s.state == "finished" else f"| {method} | failed: {s.error} | | | |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    head = [f"# Chat and preferences on the embedded default ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)", "",
            f"CPU: {cpu.split(':', 1)[-1].strip()}; {os.cpu_count()} cores; load average at start "
            f"{os.getloadavg()[0]:.2f}; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        sft_lines, lora = sft_table(store)
        dpo_lines = dpo_table(store, lora, Path(tmp))
    text = "\n".join([*head, "## SFT on nbtune:chat (held-out exact match, greedy)", "", *sft_lines, "",
                      "## DPO after SFT on nbtune:prefs (held-out preference accuracy)", "", *dpo_lines,
                      "", f"Load average at the end {os.getloadavg()[0]:.2f}.", ""])
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
