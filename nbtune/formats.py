"""Data formats: which kind of rows a source holds (detected from its first row, or `data.format`), and how a
row renders as text pieces marked trained or not, which nbtune/data.py tokenizes and the preview highlights.

Chat rows render with the tokenizer's own chat template when it has one (`data.chat_template: auto`), else with
a named template (nbtune/chat_templates.py). With the tokenizer's own template the assistant turns are located
by rendering prefix by prefix: the text a conversation renders to up to turn i with the generation prompt is
where turn i's trained part starts, and the text up to and including it (trailing whitespace excepted) is
where it ends. This works for any template whose renderings extend each other, without `{% generation %}`
markers (few templates have them); a template that does not is refused with a message saying what to use.
Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import Any

from nbtune import chat_templates
from nbtune.chat_templates import Piece

DESCRIPTIONS = {
    "chat": "conversations: a `messages` column of {role, content} lists",
    "instruction": "Alpaca instructions: instruction, optional input, output",
    "prompt-completion": "a prompt and its completion (prompt_template / target_column, or prompt/completion)",
    "text": "plain text, trained on all of it (continued pre-training)",
    "preference": "preference pairs: prompt, chosen, rejected (chat or plain)",
    "prompt-reference": "prompts with a reference answer, for reward-based RL",
    "image": "images with a class label (image-cls; an image folder, or image and label columns) or a caption "
             "(image-to-text; image and caption columns)",
}
FORMATS = tuple(DESCRIPTIONS)
CHOICES = ("auto", *FORMATS)
SUPERVISED = ("chat", "instruction", "prompt-completion", "text")  # text the supervised stage trains
IMAGE = "image"  # the one format of an image task's rows (nbtune/images.py)
REFERENCE_COLUMNS = ("reference", "answer", "solution")
REQUIRED = {"chat": ("messages",), "instruction": ("instruction", "output"), "preference": ("prompt", "chosen",
            "rejected"), "prompt-reference": ("prompt",)}

ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def _error(field: str, message: str) -> Exception:
    from nbtune.config import ConfigError  # config imports this module

    return ConfigError([(field, message)])


def is_conversation(value: Any) -> bool:
    """A list of {role, content} messages."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def detect(row: dict[str, Any], configured: bool = False) -> str:
    """The format of rows like `row`; `configured`: the config (or built-in dataset) names a target, label or
    prompt template, which means prompt-completion unless the row is a conversation, a pair or an instruction."""
    if is_conversation(row.get("messages")):
        return "chat"
    if {"prompt", "chosen", "rejected"} <= row.keys():
        return "preference"
    if {"instruction", "output"} <= row.keys():
        return "instruction"
    if configured or {"prompt", "completion"} <= row.keys():
        return "prompt-completion"
    if "prompt" in row and any(c in row for c in REFERENCE_COLUMNS):
        return "prompt-reference"
    if "text" in row:
        return "text"
    raise _error("data.format", f"data.format auto cannot tell the data's format from its columns {sorted(row)}; "
                                f"set data.format to one of {', '.join(FORMATS)}, or name the input column "
                                "(data.text_column) and the target (data.target_column)")


def check_row(fmt: str, row: dict[str, Any]) -> None:
    """Refuse a row that lacks what its format needs, naming data.format and the row's columns."""
    missing = [c for c in REQUIRED.get(fmt, ()) if c not in row]
    if fmt == "prompt-reference" and not any(c in row for c in REFERENCE_COLUMNS):
        missing.append(" or ".join(REFERENCE_COLUMNS))
    if missing:
        raise _error("data.format", f"data.format {fmt} needs the column(s) {', '.join(missing)}; "
                                    f"the data has {sorted(row)}")
    if fmt == "chat" and not is_conversation(row["messages"]):
        raise _error("data.format", "data.format chat needs each row's messages to be a list of {role, content} "
                                    f"(got {str(row['messages'])[:80]!r})")


def instruction_pieces(row: dict[str, Any]) -> list[Piece]:
    """Alpaca: the input section only when the row's input is non-empty; the output is trained."""
    given = str(row.get("input") or "").strip()
    template = ALPACA_WITH_INPUT if given else ALPACA
    prompt = template.format(instruction=str(row["instruction"]).strip(), input=given)
    return [(prompt, False), (str(row["output"]), True)]


def chat_pieces(messages: list[dict[str, Any]], tokenizer: Any, template: str = "auto") -> list[Piece]:
    """A conversation as pieces: the tokenizer's own template (`auto` when it has one), else the named one."""
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if template == "auto" and getattr(tokenizer, "chat_template", None):
        return _own_template_pieces(messages, tokenizer)
    name = chat_templates.NAMES[0] if template == "auto" else template
    return chat_templates.TEMPLATES[name](messages)


def uses_own_template(tokenizer: Any, template: str) -> bool:
    """Whether chat rows render with the tokenizer's own template (which writes its own special tokens)."""
    return template == "auto" and bool(getattr(tokenizer, "chat_template", None))


def _own_template_pieces(messages: list[dict[str, Any]], tokenizer: Any) -> list[Piece]:
    """The tokenizer's own rendering, cut where each assistant turn starts and ends (see the module's note)."""
    def render(upto: int, prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt)

    full, pieces, done = render(len(messages)), [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, through = render(i, prompt=True), render(i + 1)
        if not (through.startswith(start) and full.startswith(through)) or len(start) < done:
            raise _error("data.chat_template", "data.chat_template auto: the tokenizer's own chat template does not "
                                               "render a conversation as an extension of its beginning, so the "
                                               "assistant turns cannot be located; set data.chat_template to "
                                               f"one of {', '.join(chat_templates.NAMES)}")
        end = max(len(through.rstrip()), len(start))
        pieces += [(full[done:len(start)], False), (full[len(start):end], True)]
        done = end
    pieces.append((full[done:], False))
    return [p for p in pieces if p[0]]


def preview_pieces(fmt: str, row: dict[str, Any], tokenizer: Any, template: str) -> list[Piece]:
    """What the preview shows of a preference or prompt-reference row (never trained here): the prompt, then
    the chosen answer marked as what a preference stage prefers, or the reference answer."""
    prompt = row["prompt"]
    shown = "".join(t for t, _ in chat_pieces(prompt, tokenizer, template)) if is_conversation(prompt) else str(prompt)
    if fmt == "preference":
        chosen, rejected = (_answer_text(row[c]) for c in ("chosen", "rejected"))
        return [(shown, False), ("\n[chosen] ", False), (chosen, True), ("\n[rejected] ", False), (rejected, False)]
    reference = next(row[c] for c in REFERENCE_COLUMNS if c in row)
    return [(shown, False), ("\n[reference] ", False), (str(reference), True)]


def _answer_text(answer: Any) -> str:
    """A preference answer as text: plain, or its messages' contents (conversational pairs)."""
    return "\n".join(str(m["content"]) for m in answer) if is_conversation(answer) else str(answer)
