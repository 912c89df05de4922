"""Named chat templates, for tokenizers that have no chat template of their own (`data.chat_template`).

A template renders a conversation (a list of {role, content} messages) as text pieces, each marked trained or
not: an assistant turn's content and its end token are trained, the role headers and other turns are not. Only
formats stated exactly here are offered; a tokenizer's own template is used through nbtune/formats.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Piece = tuple[str, bool]  # (text, trained)


def chatml(messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> list[Piece]:
    """ChatML (Qwen, OpenHermes, ...): `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message; the assistant's
    content and its `<|im_end|>` are trained, the newline after it is not."""
    pieces: list[Piece] = []
    for message in messages:
        role, content = message["role"], message["content"]
        pieces.append((f"<|im_start|>{role}\n", False))
        if role == "assistant":
            pieces += [(f"{content}<|im_end|>", True), ("\n", False)]
        else:
            pieces.append((f"{content}<|im_end|>\n", False))
    if add_generation_prompt:
        pieces.append(("<|im_start|>assistant\n", False))
    return pieces


# The same templates in Jinja, for a saved tokenizer's `chat_template` (an artifact chats as its run trained);
# `{% generation %}` marks what `chatml` trains. tests/test_artifacts.py checks both render the same text.
JINJA: dict[str, str] = {"chatml": (
    "{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}{%- generation -%}{{- message['content'] + '<|im_end|>' -}}"
    "{%- endgeneration -%}{{- '\\n' -}}{%- else -%}{{- message['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")}

TEMPLATES: dict[str, Callable[..., list[Piece]]] = {"chatml": chatml}
NAMES = tuple(TEMPLATES)
