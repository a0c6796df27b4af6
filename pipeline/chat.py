"""How a row becomes the student's tokens and loss mask: one rendering for build, finetune, eval.

    template, how = training_template(tok)
    msgs = prepare_messages(row["messages"], renders_reasoning(tok, template))
    tokenize_row(tok, template, how, msgs)  # {"input_ids": [...], "labels": [-100, ..., id, ...]}

Loss only on assistant tokens, the end-of-turn token included, for any chat template: TRL's
training variant of the template where it has one (it adds `{% generation %}` markers), the
template itself if it has markers, else the spans found by rendering the conversation with and
without each assistant turn. `distill build` aligns the teacher's top-k to these tokens, `distill
finetune` trains on them, `distill eval` scores teacher-KL on them: all three render here.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from pipeline.errors import InputError, TrainingError
from pipeline.reasoning import EMPTY_THINK, content_text, has_think, join_think


def training_template(tokenizer) -> tuple[str, str]:
    """(template to render training rows with, how assistant tokens are found).

    "markers": the template has `{% generation %}` markers (TRL's training variant or its own).
    "rendering": spans found by rendering each conversation prefix (any template).
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise InputError(
            "the student's tokenizer has no chat template; use an instruct/chat model, or add a "
            "chat_template to its tokenizer_config.json"
        )
    try:
        patched = get_training_chat_template(tokenizer)
    except Exception:  # no training variant of this template, or one that breaks TRL's probes
        patched = None
    if patched is not None:
        return patched, "markers"
    return template, "markers" if has_generation_markers(template) else "rendering"


def renders_reasoning(tokenizer, template: str) -> bool:
    """Does the template render an assistant turn's `reasoning_content`?"""
    probe = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning_content": "zq7reasoningprobe"},
    ]
    try:
        text = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    except Exception:
        return False
    return "zq7reasoningprobe" in text


def prepare_messages(messages: list[dict], native_reasoning: bool) -> list[dict]:
    """Clean one row's messages for the template.

    Arrow gives every message every key (None where absent), so None keys are dropped. Reasoning in
    `reasoning_content` stays there if the template renders it, else becomes an inline `<think>`.
    """
    out: list[dict] = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = m.pop("reasoning_content", "") or ""
        if m.get("role") == "assistant" and reasoning.strip():
            if native_reasoning:
                m["reasoning_content"] = reasoning
            else:
                m["content"] = join_think(reasoning.strip(), m.get("content", ""))
        out.append(m)
    return out


def _spans_by_rendering(tokenizer, template: str, messages: list[dict], full: str) -> list:
    """(message index, start, end) character spans of each assistant turn: render the turn's
    prefix with a generation prompt, then through the turn; what the turn adds (its text and
    end-of-turn markup) is its span."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(
            messages[:i], chat_template=template, tokenize=False, add_generation_prompt=True
        )
        through = tokenizer.apply_chat_template(
            messages[: i + 1], chat_template=template, tokenize=False
        )
        # A template that renders earlier turns differently once later ones exist (some drop
        # old reasoning) breaks the prefix property; that turn is then not trained on.
        if through.startswith(before) and full.startswith(through):
            spans.append((i, len(before), len(through)))
    return spans


def _marked_turns(mask: list[bool], messages: list[dict]) -> list[tuple[int, int, int]]:
    """(message index, first token, end token) of each run of `{% generation %}`-marked tokens,
    matched to the assistant turns in order (a marked block is one assistant turn)."""
    runs: list[list[int]] = []
    for k, on in enumerate(mask):
        if on and (not runs or runs[-1][1] != k):
            runs.append([k, k + 1])
        elif on:
            runs[-1][1] = k + 1
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    # More or fewer runs than turns (a template that splits or skips a block): the last run is
    # still the last turn, the earlier ones count as earlier turns.
    turns = turns[-len(runs) :] if len(runs) <= len(turns) else [-1] * (len(runs) - 1) + turns[-1:]
    return [(i, a, b) for i, (a, b) in zip(turns, runs)]


def turn_has_reasoning(message: dict) -> bool:
    """Did the dataset give this assistant turn a trace (as reasoning_content or inline)?"""
    return bool((message.get("reasoning_content") or "").strip()) or has_think(
        content_text(message.get("content"))
    )


def encode(tokenizer, template: str, messages: list[dict]) -> tuple[str, list[int], Any]:
    """(rendered text, token ids, character offsets of each token) of one conversation; the
    template writes any BOS it wants, so the tokenizer adds none."""
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return text, list(enc["input_ids"]), enc["offset_mapping"]


def tokenize_row(
    tokenizer, template: str, how: str, messages: list[dict], train_on: str = "last"
) -> dict[str, list[int]]:
    """input_ids and labels (-100 where no loss) for one conversation.

    train_on "last": only the final assistant turn (the teacher's answer) carries loss; earlier
    assistant turns are part of the prompt, written by whoever wrote the prompt. "all": every
    assistant turn.
    """
    text, ids, offsets = encode(tokenizer, template, messages)
    # Each trained assistant turn as (message index, first token, end token).
    if how == "markers":
        out = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        if list(out["input_ids"]) != ids:  # cannot happen with a fast tokenizer; be sure
            raise TrainingError("chat template tokenization is not reproducible; report this bug")
        turns = _marked_turns([bool(x) for x in out["assistant_masks"]], messages)
    else:
        turns = []
        for i, a, b in _spans_by_rendering(tokenizer, template, messages, text):
            inside = [k for k, (s, e) in enumerate(offsets) if s < b and e > a]
            if inside:
                turns.append((i, inside[0], inside[-1] + 1))
    if train_on == "last":
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        turns = [t for t in turns if t[0] == last]
    mask = [False] * len(ids)
    for i, a, b in turns:
        mask[a:b] = [True] * (b - a)
        if i >= 0 and turn_has_reasoning(messages[i]):
            continue
        # Templates of reasoning models add an empty <think></think> to a turn without
        # reasoning; training on it would teach the student to skip thinking, so it carries no
        # loss. Decided per turn: another turn's trace does not make this one's empty block real.
        start, end = offsets[a][0], offsets[b - 1][1]
        for m in EMPTY_THINK.finditer(text, start, end):
            for k in range(a, b):
                if m.start() <= offsets[k][0] < m.end():
                    mask[k] = False
    labels = [t if k else -100 for t, k in zip(ids, mask)]
    return {"input_ids": ids, "labels": labels}


def check_masks(rows: list[dict], tokenizer, prompt_ids: list[str], student: str) -> int:
    """Stop before training if a row trains on nothing or its trained span does not end on an
    end-of-turn token (the student would never learn to stop). Returns the end-of-turn token id."""
    # Tokens that can end a turn: the added (special) vocabulary and EOS (None is never a token).
    eot = set(tokenizer.get_added_vocab().values()) | {tokenizer.eos_token_id}
    seen: dict[int, int] = {}
    for row, pid in zip(rows, prompt_ids):
        trained = [t for t in row["labels"] if t != -100]
        if not trained:
            raise TrainingError(
                f"chat template of {student} gives prompt {pid} no assistant tokens to train on "
                "(empty loss mask); add {% generation %}...{% endgeneration %} around the "
                "assistant turn in its chat_template"
            )
        last = next((t for t in reversed(trained) if tokenizer.decode([t]).strip()), trained[-1])
        if last not in eot:
            raise TrainingError(
                f"chat template of {student}: the trained span of prompt {pid} ends on "
                f"{tokenizer.decode([last])!r}, not on an end-of-turn token, so the student would "
                "never learn to stop; fix the template so the assistant turn ends with its "
                "end-of-turn token"
            )
        seen[last] = seen.get(last, 0) + 1
    return max(seen, key=lambda k: seen[k])


def tokenize_split(
    split, tokenizer, template: str, how: str, native_reasoning: bool, train_on: str = "last"
):
    """(rows of input_ids and labels, their prompt ids) for a dataset split, each row as
    tokenize_row makes it; a template that refuses a row names its prompt id."""
    rows, pids = [], []
    for i, ex in enumerate(split):
        pid = str(ex.get("prompt_id") or f"row {i}")
        msgs = prepare_messages(ex["messages"], native_reasoning)
        try:
            rows.append(tokenize_row(tokenizer, template, how, msgs, train_on))
        except TemplateError as e:  # e.g. a template that refuses a system turn
            raise InputError(
                f"the student's chat template rejects prompt {pid}: {e}; rebuild the dataset "
                "to fit it (e.g. `distill build --drop-system`) or use another student"
            ) from None
        pids.append(pid)
    return rows, pids


def render(tokenizer, messages: list[dict[str, Any]], generation_prompt: bool = True) -> list[int]:
    """A chat prompt's token ids with the tokenizer's own template (what the student sees when it
    answers); the template writes any BOS it wants, so the tokenizer adds none."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end the student's turn: generation_config's EOS (one or several) and the
    tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
