"""Build nbtune's embedded base model and built-in datasets from the fictional world in `world.py`.

Run `python -m nbtune.embedded.build [--minutes 3] [--out DIR]`: generates the corpus, trains a byte-level BPE
tokenizer, pre-trains a tiny Llama on CPU and writes `base/` and `data/` under DIR (default: this package).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from nbtune.embedded import world as world_gen

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

SEED = 0
VOCAB_SIZE = 2048
SEQ_LEN = 128
CORPUS_BYTES = 6_000_000
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# ChatML's layout with the tokens the tokenizer has (<s> opens a turn, </s> = EOS closes it); the generation
# markers let `return_assistant_tokens_mask` pick the assistant's content and its closing </s>
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<s>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '</s>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- message['content'] + '</s>' -}}{%- endif -%}"
    "{{- '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<s>assistant\n' -}}{%- endif -%}"
)


def train_tokenizer(docs: Iterable[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with pad/bos/eos tokens and a chat template that pads on the right and adds no
    special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="right",
        model_max_length=SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )


def pack(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    """Token ids of all documents, each followed by EOS, cut into rows of SEQ_LEN."""
    import torch

    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids += enc + [tokenizer.eos_token_id]
    n = len(ids) // SEQ_LEN
    return torch.tensor(ids[: n * SEQ_LEN]).view(n, SEQ_LEN)


def make_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """The base architecture: 2 layers, hidden 192, biases everywhere (so BitFit has something to train)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=192,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=3,
        intermediate_size=512,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def corpus_loss(model: LlamaForCausalLM, chunks: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token loss over `chunks`."""
    import torch

    model.eval()
    losses = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(chunks), batch_size):
            batch = chunks[i : i + batch_size]
            losses.append(model(input_ids=batch, labels=batch).loss.float().item() * len(batch))
    model.train()
    return sum(losses) / len(chunks)


def pretrain(
    model: LlamaForCausalLM,
    chunks: torch.Tensor,
    val: torch.Tensor,
    minutes: float,
    steps: int | None,
    batch_size: int = 32,
    lr: float = 2e-3,
) -> dict:
    """Plain AdamW + warmup/cosine loop under bf16 autocast; `steps` or else a wall budget sets its length."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    total = steps or 10**9  # replaced by a timed estimate after the first steps when only minutes are given
    warmup = 40
    order = torch.randperm(len(chunks), generator=gen)
    pos, step, start, probe = 0, 0, time.time(), 20
    model.train()
    while step < total:
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(chunks), generator=gen), 0
        batch = chunks[order[pos : pos + batch_size]]
        pos += batch_size
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if steps is None and step == probe:
            total = max(probe + 1, int(minutes * 60 / ((time.time() - start) / probe)))
            print(
                f"step time {(time.time() - start) / probe:.3f}s -> {total} steps for {minutes} min",
                flush=True,
            )
        if step % 50 == 0 or step == total:
            print(
                f"step {step}/{total}  loss {loss.item():.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{time.time() - start:.0f}s",
                flush=True,
            )
    val_loss = corpus_loss(model, val)
    print(f"held-out corpus loss {val_loss:.3f}", flush=True)
    return {
        "steps": step,
        "seconds": round(time.time() - start, 1),
        "train_loss": round(loss.item(), 4),
        "heldout_loss": round(val_loss, 4),
        "tokens": step * batch_size * SEQ_LEN,
    }


def capital_accuracy(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, countries: tuple[world_gen.Country, ...]
) -> float:
    """Share of countries whose capital the base completes greedily from "The capital of X is"."""
    import torch

    model.eval()
    hits = 0
    with torch.no_grad():
        for c in countries:
            ids = tokenizer(f"The capital of {c.name} is", return_tensors="pt", add_special_tokens=False)
            target = tokenizer(f" {c.capital}", add_special_tokens=False)["input_ids"]
            out = model.generate(
                **ids, max_new_tokens=len(target), do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            hits += out[0, ids["input_ids"].shape[1] :].tolist() == target
    model.train()
    return hits / len(countries)


def write_datasets(rows: dict[str, dict[str, list[dict]]], data_dir: pathlib.Path) -> None:
    for name, splits in rows.items():
        for split, split_rows in splits.items():
            path = data_dir / name / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split_rows))


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=3.0, help="wall budget of pre-training")
    parser.add_argument("--steps", type=int, default=None, help="fixed step count (overrides --minutes)")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path(__file__).parent,
        help="folder that receives base/ and data/",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-only", action="store_true", help="rewrite data/ only, keep the base")
    args = parser.parse_args(argv)
    world = world_gen.make_world(SEED)
    write_datasets(world_gen.dataset_rows(world, SEED), args.out / "data")
    if args.data_only:
        print(f"wrote {args.out / 'data'}")
        return

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    docs = list(world_gen.corpus_documents(world, SEED, CORPUS_BYTES))
    val_docs = list(world_gen.corpus_documents(world, SEED + 1, 100_000))
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB", flush=True)

    tokenizer = train_tokenizer(docs)
    chunks, val = pack(tokenizer, docs), pack(tokenizer, val_docs)
    print(f"tokenizer: {len(tokenizer)} tokens; {chunks.numel() / 1e6:.2f} M training tokens", flush=True)

    model = make_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {n_params / 1e6:.2f} M parameters; random-init held-out loss {corpus_loss(model, val):.3f}",
        flush=True,
    )
    info = pretrain(model, chunks, val, args.minutes, args.steps)
    info["eval_capital_accuracy"] = round(capital_accuracy(model, tokenizer, world.eval_countries), 3)
    print(
        f"greedy capital accuracy on held-out countries (prose prompt): {info['eval_capital_accuracy']:.1%}"
    )

    base_dir = args.out / "base"
    base_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(base_dir)
    # the chat template goes into tokenizer_config.json, whose content models.model_identity hashes
    tokenizer.save_pretrained(base_dir, save_jinja_files=False)
    info.update(seed=SEED, parameters=n_params, build_seconds=round(time.time() - t0, 1))
    (base_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {base_dir} and {args.out / 'data'} in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
