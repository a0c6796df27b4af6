"""The reasoning format: one home for splitting a `<think>` trace off an answer and joining it back.

Teachers send their trace in a field (`reasoning_content`, `reasoning`) or inline as
`<think>...</think>` before the answer; the store keeps answer and trace apart. Training data puts
the trace back inline (`join_think`), and scoring looks at the final answer only (`final_answer`).
Harvest, build, finetune and eval all go through these functions, so the format is defined once.

    answer, trace = split_think("<think>\\n2+2 is 4\\n</think>\\n\\nThe answer is 4.")
    join_think(trace, answer)  # "<think>\\n2+2 is 4\\n</think>\\n\\nThe answer is 4."
"""

from __future__ import annotations

import re
from typing import Any

OPEN, CLOSE = "<think>", "</think>"

_LEADING_BLOCK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)
EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")
"""An empty trace that the templates of reasoning models add to answers without reasoning."""


def content_text(content: Any) -> str:
    """The text of a chat message's `content`: a string, OpenAI content parts, or nothing."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def split_think(text: str) -> tuple[str, str | None]:
    """(answer, trace) from text that may carry an inline `<think>` block; trace None if none.

    Handles a full block at the start, an answer cut off inside the trace (no `</think>`: the
    answer is empty), and a `</think>` without its opening tag (the chat template opened it in
    the prompt, as Qwen3 and DeepSeek-R1 templates do).
    """
    m = _LEADING_BLOCK.match(text)
    if m:
        return text[m.end() :], m.group(1).strip("\n")
    stripped = text.lstrip()
    if stripped.startswith(OPEN):  # cut off inside the trace (finish_reason "length")
        return "", stripped[len(OPEN) :].strip("\n")
    if CLOSE in text and OPEN not in text:
        head, _, tail = text.partition(CLOSE)
        return tail.lstrip(), head.strip("\n")
    return text, None


def join_think(trace: str | None, answer: str) -> str:
    """The answer with its trace inline before it; no block at all when there is no trace.
    The trace is kept as given (datasets built before this module must rebuild byte-identical)."""
    return f"{OPEN}\n{trace}\n{CLOSE}\n\n{answer}" if trace else answer


def final_answer(text: str) -> str:
    """What gets scored: the text after any `<think>` trace, stripped."""
    return split_think(text)[0].strip()


def has_think(text: str | None) -> bool:
    """Whether the text carries an inline trace (an opening or closing tag)."""
    return bool(text) and (OPEN in text or CLOSE in text)  # type: ignore[operator]
