"""Scoring preference pairs: how much more likely a model finds the chosen answer than the rejected one.

This is what a preference stage's held-out "preference accuracy" reports: for each prompt/chosen/rejected row,
the summed log-probability of each answer's tokens given the prompt, rendered as training renders it (a
conversation through nbtune/formats.py with the tokenizer's own or a named chat template, so an answer is its
assistant turn with the end token; plain text otherwise, the answer followed by EOS). Importing this module
imports neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nbtune import formats


@dataclass(frozen=True)
class PairScores:
    """Preference scores of rows: `margins[i]` is log p(chosen) - log p(rejected) of row i."""

    accuracy: float  # share of rows whose chosen answer scores strictly above the rejected one (ties are wrong)
    mean_margin: float
    n: int
    margins: tuple[float, ...]


def score_pairs(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], chat_template: str = "auto",
                max_length: int | None = None, batch_size: int = 16) -> PairScores:
    """Score each row's chosen answer against its rejected one under `model` (a transformers model or a PEFT
    model, prompt tuning included). Sequences longer than `max_length` lose prompt tokens from the start, so
    both answers are scored whole. A batch holds `batch_size` pairs, a pair's answers always in the same one."""
    sequences = [_answer_ids(tokenizer, row["prompt"], row[side], chat_template)
                 for row in rows for side in ("chosen", "rejected")]
    if max_length is not None:
        sequences = [(ids[-max_length:], scored[-max_length:]) for ids, scored in sequences]
    step = 2 * batch_size
    logps = [lp for i in range(0, len(sequences), step)
             for lp in _answer_logps(model, sequences[i:i + step], _pad_id(tokenizer))]
    margins = tuple(logps[i] - logps[i + 1] for i in range(0, len(logps), 2))
    n = len(margins)
    return PairScores(accuracy=sum(m > 0 for m in margins) / n if n else 0.0,
                      mean_margin=sum(margins) / n if n else 0.0, n=n, margins=margins)


def _answer_ids(tokenizer: Any, prompt: Any, answer: Any, template: str) -> tuple[list[int], list[bool]]:
    """Token ids of the prompt followed by the answer, and which of them are the answer's (scored). Each piece
    is tokenized on its own, as nbtune/data.py does for training, so the answer's tokens are exactly its own."""
    if formats.is_conversation(prompt):
        messages = answer if formats.is_conversation(answer) else [{"role": "assistant", "content": str(answer)}]
        pieces = formats.chat_pieces([*prompt, *messages], tokenizer, template)
        in_prompt = sum(m["role"] == "assistant" for m in prompt)  # the prompt's own assistant turns
        own = formats.uses_own_template(tokenizer, template)
    else:
        pieces, in_prompt, own = [(str(prompt), False), (str(answer), True)], 0, False
    ids: list[int] = []
    scored: list[bool] = []
    trained_seen = 0
    for i, (text, trained) in enumerate(pieces):
        piece = tokenizer(text, add_special_tokens=i == 0 and not own)["input_ids"]
        trained_seen += trained
        ids += piece
        scored += [trained and trained_seen > in_prompt] * len(piece)
    if not formats.is_conversation(prompt) and tokenizer.eos_token_id is not None:
        ids, scored = ids + [tokenizer.eos_token_id], scored + [True]
    return ids, scored


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad if pad is not None else 0


def _answer_logps(model: Any, batch: list[tuple[list[int], list[bool]]], pad_id: int) -> list[float]:
    """Summed log-probability of the scored tokens of each sequence in `batch` (right-padded, no grad)."""
    import torch

    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    scored = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, (seq, mask) in enumerate(batch):
        ids[row, : len(seq)], attention[row, : len(seq)] = torch.tensor(seq), 1
        scored[row, : len(seq)] = torch.tensor(mask)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
    finally:
        model.train(was_training)
    logits = logits[:, -width:].float()  # prompt tuning prepends virtual tokens' positions
    token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
    return (token_logps * scored[:, 1:].to(device)).sum(dim=-1).tolist()
