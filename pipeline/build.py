"""Build: curate a run's harvested answers into a training dataset you can trust.

    distill build data/runs/demo --to data/datasets/demo
    distill build --config configs/build.example.yaml --reasoning separate --eval-size 50

Reading top to bottom: the config; the filters, applied to every stored answer in one fixed order
(FILTERS: a row is counted by the first filter that removes it, so the report adds up); selection
of the first or best k answers per prompt; the split by prompt id; the training messages; the
writers (Hugging Face DatasetDict, Parquet, JSONL, ShareGPT, OpenAI) and the dataset card; last the
stage: `curate` decides (which rows, which split), `make_report` counts, `build` writes.

The store is opened read-only. Nothing time-dependent is written, so rebuilding from the same
store with the same config gives byte-identical files (see docs/build.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import heapq
import json
import math
import re
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from pipeline.artifacts import DatasetWriter
from pipeline.chat import encode, prepare_messages, renders_reasoning, training_template
from pipeline.config import StageConfig
from pipeline.errors import ConfigError, InputError, StoreError
from pipeline.outdir import staged
from pipeline.reasoning import content_text, join_think
from pipeline.record import Response, content_hash
from pipeline.store import Store
from pipeline.verify import MODES, check_mode, check_prompt, load_function

# The order filters run in, and the order of every count in the report and the card, each with
# what it removes (as the dataset card says it). Verification and the custom hook come before
# deduplication, so that of two near-identical answers the one kept is never the wrong one.
EXPLAIN = {
    "failed": "the request failed (the store's `failures` table); no answer",  # always counted
    "replaced_prompt": "an answer to a prompt's old text (harvest --replace-changed-prompts)",
    "unfinished": "finish_reason not in {finish_reasons} (cut off or filtered)",
    "empty": "blank answer",
    "refusal": "matches a refusal pattern",
    "length": "answer or reasoning outside the length bounds",
    "verify": "final answer does not match the reference",
    "custom": "rejected by custom_filter {custom_filter}",
    "duplicate": "same answer as an earlier sample of the prompt",
    "near_duplicate": "word {near_duplicate_ngram}-gram Jaccard >= {near_duplicate_threshold} with an earlier sample",
    "not_selected": "not the preferred teacher (prefer_teachers) or beyond {per_prompt} per prompt (select: {select})",
}
FILTERS = tuple(EXPLAIN)
SWITCHES = ("unfinished", "empty", "refusal", "length", "verify", "duplicate", "near_duplicate")

DEFAULT_REFUSALS = [
    r"\bI(?:'m| am) sorry,? but I (?:can(?:'|no)?t|won't|am unable|'m unable)",
    r"\bI (?:can(?:'|no)?t|won't|will not|am unable to|'m unable to) (?:help|assist|comply|provide|do that|answer)",
    r"\bI(?:'m| am) not able to (?:help|assist|comply|provide)",
    r"\bAs an AI(?: language)? model\b",
    r"\bI must decline\b",
]

Format = Literal["hf", "parquet", "jsonl", "sharegpt", "openai"]


class Filters(StageConfig):
    """Which filters are on (all by default). The order they run in is fixed: see FILTERS."""

    unfinished: bool = Field(
        True,
        description="Drop answers whose finish_reason is not in finish_reasons (e.g. 'length': cut off).",
    )
    empty: bool = Field(True, description="Drop blank answers.")
    refusal: bool = Field(True, description="Drop answers matching one of refusal_patterns.")
    length: bool = Field(
        True,
        description="Drop answers or reasoning outside min/max_answer_length and min/max_reasoning_length.",
    )
    verify: bool = Field(
        True,
        description="Drop answers whose final answer does not match the prompt's reference. Off: keep them, with verified=false.",
    )
    duplicate: bool = Field(
        True,
        description="Drop an answer identical (up to whitespace) to an earlier sample of the same prompt.",
    )
    near_duplicate: bool = Field(
        True,
        description="Drop an answer whose word n-gram Jaccard similarity with an earlier kept sample of the prompt is >= near_duplicate_threshold.",
    )


class BuildConfig(StageConfig):
    """`build:` section."""

    run: Path | None = Field(None, description="Run directory to build from (the harvest's --out).")
    to: Path | None = Field(
        None, description="Output folder (replaced if it holds an earlier build)."
    )
    format: Format = Field(
        "hf",
        description="hf: a DatasetDict for datasets.load_from_disk; parquet/jsonl: train.* and eval.* files with the same columns; sharegpt: {conversations: [{from, value}]} JSONL (LLaMA-Factory, axolotl); openai: {messages} JSONL.",
    )
    reasoning: Literal["inline", "separate", "drop"] = Field(
        "inline",
        description="inline: assistant content is '<think>\\n...\\n</think>\\n\\n' + answer (rows without reasoning get no think block); separate: a reasoning_content key on every message; drop: the answer only.",
    )
    drop_system: bool = Field(
        False,
        description="Leave the system prompt out of the training messages (context distillation: the teacher saw it, the student learns without it).",
    )
    filters: Filters = Field(
        default_factory=Filters, description="Switch filters on or off, e.g. {refusal: false}."
    )
    finish_reasons: list[str | None] = Field(
        default_factory=lambda: ["stop"],  # type: ignore[arg-type]
        description="finish_reason values that count as a finished answer (add null for servers that send none).",
    )
    refusal_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFUSALS),
        description="Regexes (case-insensitive, searched anywhere in the answer) that mark a refusal.",
    )
    tokenizer: Path | None = Field(
        None,
        description="Local folder of the student's tokenizer: lengths are counted in its tokens (else in characters); when the run has logprobs, the teacher's top-k for every answer token are aligned to it (kd_targets, for `distill finetune --loss kd`).",
    )
    min_answer_length: int | None = Field(
        None, ge=0, description="Drop answers shorter than this (tokens or characters)."
    )
    max_answer_length: int | None = Field(None, ge=1, description="Drop answers longer than this.")
    min_reasoning_length: int | None = Field(
        None,
        ge=0,
        description="Drop answers whose reasoning is shorter than this (0 when there is none).",
    )
    max_reasoning_length: int | None = Field(
        None, ge=1, description="Drop answers whose reasoning is longer than this."
    )
    answer_patterns: list[str] = Field(
        default_factory=list,
        description="Regexes tried first to find the answer in the final answer (group 1, else the whole match; the last match wins); then the last \\boxed{}, 'The answer is ...', else the whole final answer (the <think> trace never counts).",
    )
    verify: Annotated[str, AfterValidator(check_mode)] = Field(
        "auto",
        description="How a final answer is checked against the prompt's reference (the switch is filters.verify): auto (math when the reference reads as math, else text), math, text, regex (answer_patterns only), or your own 'module:function' / 'path/to/file.py:function' returning True, False or None. `distill eval` uses the same setting.",
    )
    rel_tol: float = Field(
        1e-6,
        ge=0,
        description="Relative tolerance of numeric answer comparison (integers always compare exactly).",
    )
    abs_tol: float = Field(
        1e-9, ge=0, description="Absolute tolerance of numeric answer comparison."
    )
    custom_filter: str | None = Field(
        None,
        description="Your own filter, 'module:function' or 'path/to/file.py:function'. Called with each row (a dict); returns True to keep, False or a reason string to drop.",
    )
    near_duplicate_threshold: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Jaccard similarity at or above which two answers of a prompt are near-duplicates.",
    )
    near_duplicate_ngram: int = Field(
        3, ge=1, description="Word n-gram size for near-duplicate similarity."
    )
    select: Literal["all", "first", "best"] = Field(
        "all",
        description="all: keep every passing answer; first: the first per_prompt samples; best: verified first, then the shortest.",
    )
    per_prompt: int = Field(
        1, ge=1, description="k, the answers kept per prompt when select is first or best."
    )
    prefer_teachers: list[str] | None = Field(
        None,
        description="Several teachers: keep one teacher's answers per prompt, the first in this list with a verified answer, else the first with any passing answer (teachers not listed come after, in name order).",
    )
    seed: int = Field(0, description="Seed of the train/eval split (a hash of seed and prompt id).")
    eval_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Share of prompts (not rows) held out for eval: a prompt is eval when sha256(seed:prompt id), read as a number in [0, 1), is below it, so adding, removing or filtering prompts never moves another one.",
    )
    eval_size: int | None = Field(
        None,
        ge=0,
        description="Exactly this many prompts held out for eval (overrides eval_fraction): the lowest hashes, a rank, so the split moves when the prompts change; prefer eval_fraction for splits that stay put.",
    )
    split_field: str | None = Field(
        None,
        description="A prompt field (from the prompt row or its meta) that fixes the split: 'eval'/'test'/'validation' or 'train'. Prompts without it are split by hash (eval_fraction/eval_size count only those).",
    )
    filter_eval: bool = Field(
        True,
        description="Apply the filters to the eval split too. false: every answered eval prompt is kept as answered (verified still marks it), so eval measures on all held-out prompts, not only those the teacher got right; the split is then made over every prompt in the store.",
    )
    json_report: bool = Field(False, description="Print build_report.json on stdout (--json).")

    @model_validator(mode="before")
    @classmethod
    def _known_filters(cls, data: Any) -> Any:
        # A friendlier message than "unknown key" for the commonest typo.
        if isinstance(data, dict) and isinstance(data.get("filters"), dict):
            for name in data["filters"]:
                if name not in SWITCHES:
                    raise ValueError(
                        f"unknown filter {name!r} in filters; filters are: {', '.join(SWITCHES)}"
                    )
        return data

    @model_validator(mode="after")
    def _regex_needs_patterns(self) -> BuildConfig:
        if self.verify == "regex" and not self.answer_patterns:
            raise ValueError("verify: regex needs answer_patterns; add at least one regex")
        return self

    @field_validator("refusal_patterns", "answer_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"regex {p!r} does not compile ({e}); fix it") from None
        return patterns


# -- rows --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One stored answer on its way through the filters."""

    store: Response
    answer_len: int = 0
    reasoning_len: int = 0
    verified: bool | None = None
    verdict: str = ""  # why the verifier said no (the verify filter's reason)
    removed_by: str | None = None
    reason: str = ""

    @property
    def prompt_id(self) -> str:
        return str(self.store.prompt_id)

    @property
    def answer(self) -> str:
        return (self.store.response or "").strip()

    @property
    def reasoning(self) -> str:
        return (self.store.reasoning or "").strip()


@dataclass
class BuildReport:
    """What the build did; written as build_report.json and summarised in the card."""

    run: str
    to: str
    format: str
    rows_in: int = 0  # stored answers + failed requests
    responses: int = 0
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    reasons: dict[str, dict[str, int]] = field(default_factory=dict)
    kept: int = 0
    verified: dict[str, int] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    prompts: dict[str, int] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    teachers: list[dict[str, Any]] = field(default_factory=list)
    harvested: dict[str, str | None] = field(default_factory=dict)
    lengths: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    kd: dict[str, Any] = field(default_factory=dict)  # teacher targets (kd_targets), if built

    def to_json(self) -> str:
        d = dict(self.__dict__)
        d.pop("to")  # the output path is not part of the dataset: a copy elsewhere stays identical
        if not d["kd"]:
            d.pop("kd")
        return json.dumps(d, indent=2, ensure_ascii=False) + "\n"

    def line(self) -> str:
        removed = ", ".join(f"{k} {v}" for k, v in self.removed.items() if v) or "nothing"
        s = self.split
        return (
            f"build: {self.kept}/{self.rows_in} rows kept (removed: {removed}); "
            f"train {s['train_rows']} rows / {s['train_prompts']} prompts, "
            f"eval {s['eval_rows']} rows / {s['eval_prompts']} prompts -> {self.to}"
        )


# -- filters -----------------------------------------------------------------------------------------


def _lengths(rows: list[Row], tok: Any) -> None:
    """Fill each row's answer and reasoning length, in the tokenizer's tokens or in characters."""
    if tok is None or not rows:
        for r in rows:
            r.answer_len, r.reasoning_len = len(r.answer), len(r.reasoning)
        return
    answers = tok([r.answer for r in rows], add_special_tokens=False)["input_ids"]
    reasonings = tok([r.reasoning for r in rows], add_special_tokens=False)["input_ids"]
    for r, a, b in zip(rows, answers, reasonings):
        r.answer_len, r.reasoning_len = len(a), (len(b) if r.reasoning else 0)


def _length_reason(cfg: BuildConfig, r: Row) -> str | None:
    if cfg.min_answer_length is not None and r.answer_len < cfg.min_answer_length:
        return f"answer shorter than {cfg.min_answer_length}"
    if cfg.max_answer_length is not None and r.answer_len > cfg.max_answer_length:
        return f"answer longer than {cfg.max_answer_length}"
    if cfg.min_reasoning_length is not None and r.reasoning_len < cfg.min_reasoning_length:
        return f"reasoning shorter than {cfg.min_reasoning_length}"
    if cfg.max_reasoning_length is not None and r.reasoning_len > cfg.max_reasoning_length:
        return f"reasoning longer than {cfg.max_reasoning_length}"
    return None


def _custom_reason(fn: Callable[[dict[str, Any]], Any], spec: str, r: Row) -> str | None:
    try:
        got = fn({**dataclasses.asdict(r.store), "verified": r.verified})
    except Exception as e:  # a bug in the user's hook: say which row, and stop
        raise ConfigError(
            f"custom_filter {spec!r} raised {type(e).__name__}: {e} on row {r.store.key} "
            f"(prompt {r.prompt_id}); fix the function"
        ) from None
    if got is True:
        return None
    if got is False or isinstance(got, str):
        return got or "rejected"
    raise ConfigError(
        f"custom_filter {spec!r} returned {got!r} for row {r.store.key}; "
        "return True to keep the row, False or a reason string to drop it"
    )


def _dedupe_text(r: Row) -> str:
    # The whole training target: two samples with the same short final answer but different
    # reasoning are not duplicates.
    return " ".join(f"{r.reasoning}\n{r.answer}".split())


def _shingles(text: str, n: int) -> frozenset[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        return frozenset([tuple(words)])
    return frozenset(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _jaccard(a: frozenset[Any], b: frozenset[Any]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _row_filters(
    cfg: BuildConfig, r: Row, refusals: list[re.Pattern[str]]
) -> tuple[str, str] | None:
    """The first per-row filter that removes `r`, and why; None if it passes them all."""
    on, s = cfg.filters, r.store
    if on.unfinished and s.finish_reason not in cfg.finish_reasons:
        return "unfinished", f"finish_reason {s.finish_reason}"
    if on.empty and not r.answer:
        return "empty", "blank answer"
    if on.refusal and (hit := next((p for p in refusals if p.search(r.answer)), None)):
        return "refusal", f"matches {hit.pattern!r}"
    if on.length and (too := _length_reason(cfg, r)):
        return "length", too
    if on.verify and r.verified is False:
        return "verify", r.verdict
    return None


def apply_filters(
    cfg: BuildConfig, rows: list[Row], custom: Callable[[dict[str, Any]], Any] | None
) -> None:
    """Mark each of one prompt's rows with the first filter that removes it."""
    refusals = [re.compile(p, re.IGNORECASE) for p in cfg.refusal_patterns]
    settings = dict(
        mode=cfg.verify, rel_tol=cfg.rel_tol, abs_tol=cfg.abs_tol, patterns=cfg.answer_patterns
    )
    earlier: list[tuple[str, frozenset[Any]]] = []  # the prompt's answers kept so far
    for r in rows:
        if r.store.reference is not None:  # a mode that cannot apply names the prompt
            v = check_prompt(r.prompt_id, r.answer, r.store.reference, **settings)
            r.verified, r.verdict = bool(r.answer) and v.verified is True, v.reason
        removed = _row_filters(cfg, r, refusals)
        if removed is None and custom is not None:
            reason = _custom_reason(custom, cfg.custom_filter or "", r)
            removed = None if reason is None else ("custom", reason)
        if removed is not None:
            r.removed_by, r.reason = removed
            continue
        # Deduplicate against the answers kept so far (the earlier sample wins).
        text = _dedupe_text(r)
        grams = _shingles(text, cfg.near_duplicate_ngram)
        if cfg.filters.duplicate and any(text == t for t, _ in earlier):
            r.removed_by, r.reason = "duplicate", "same answer as an earlier sample"
        elif cfg.filters.near_duplicate and any(
            _jaccard(grams, g) >= cfg.near_duplicate_threshold for _, g in earlier
        ):
            r.removed_by = "near_duplicate"
            r.reason = f"similarity >= {cfg.near_duplicate_threshold:g}"
        else:
            earlier.append((text, grams))


def select(cfg: BuildConfig, rows: list[Row]) -> None:
    """Of one prompt's passing answers, keep one teacher's (prefer_teachers), then the first or
    best k; mark the rest not_selected."""
    group = [r for r in rows if r.removed_by is None]
    rank = {True: 0, None: 1, False: 2}
    if cfg.prefer_teachers and group:
        order = {name: i for i, name in enumerate(cfg.prefer_teachers)}

        def teacher_rank(r: Row) -> tuple[int, int, str]:
            name = str(r.store.teacher)
            return (rank[r.verified], order.get(name, len(order)), name)

        chosen = str(min(group, key=teacher_rank).store.teacher)
        for r in group:
            if r.store.teacher != chosen:
                r.removed_by, r.reason = "not_selected", f"another teacher preferred ({chosen})"
        group = [r for r in group if r.removed_by is None]
    if cfg.select == "all":
        return
    why = f"beyond the {cfg.select} {cfg.per_prompt} per prompt"
    if cfg.select == "best":  # verified first, then the shortest target; ties keep store order
        group = sorted(group, key=lambda r: (rank[r.verified], r.answer_len + r.reasoning_len))
    for r in group[cfg.per_prompt :]:
        r.removed_by, r.reason = "not_selected", why


EVAL_NAMES = {"eval", "test", "validation", "valid", "dev"}


def fixed_splits(rows: list[Row], cfg: BuildConfig) -> dict[str, bool]:
    """prompt id -> True (eval) / False (train) for prompts whose split_field names a split."""
    if not cfg.split_field:
        return {}
    out: dict[str, bool] = {}
    for r in rows:
        value = (r.store.meta or {}).get(cfg.split_field)
        if value is None:
            continue
        name = str(value).strip().lower()
        if name not in EVAL_NAMES | {"train"}:
            raise InputError(
                f"prompt {r.prompt_id}: split_field {cfg.split_field!r} is {value!r}; use train or eval"
            )
        out[r.prompt_id] = name in EVAL_NAMES
    return out


def prompt_hash(seed: int, prompt_id: str) -> float:
    """sha256("seed:prompt id") read as a number in [0, 1): where a prompt falls in the split."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_prompts(prompt_ids: list[str], cfg: BuildConfig) -> set[str]:
    """The eval prompt ids (of prompts without a split_field split): those whose prompt_hash is
    below eval_fraction: a pure function of (seed, prompt id, eval_fraction), so adding, removing
    or filtering prompts never moves another one. eval_size instead takes the n lowest hashes (a
    rank: exact, but it moves when the prompts change)."""
    ids = sorted(set(prompt_ids))
    if cfg.eval_size is None:
        return {p for p in ids if prompt_hash(cfg.seed, p) < cfg.eval_fraction}
    return eval_rank(iter(ids), cfg, lambda: False)


def eval_rank(ids: Iterator[str], cfg: BuildConfig, forced: Callable[[], bool]) -> set[str]:
    """The eval_size distinct `ids` with the lowest prompt_hash (a ConfigError if that would leave
    nothing to train on and no prompt is `forced` to eval): a heap of eval_size ids, so a rank over
    a million prompts holds only the ones it keeps."""
    counted = 0

    def counting() -> Iterator[str]:
        nonlocal counted
        for p in ids:
            counted += 1
            yield p

    n = cfg.eval_size or 0
    low = heapq.nsmallest(n, counting(), key=lambda p: (prompt_hash(cfg.seed, p), p))
    if n and not forced() and n >= counted:  # not silently: it would leave one train prompt
        raise ConfigError(
            f"--eval-size {n} is not below the {counted} prompts to split (after filters): "
            f"nothing would be left to train on; pass --eval-size {max(0, counted - 1)} or less"
        )
    return set(low)


# -- training messages -------------------------------------------------------------------------------


def training_messages(r: Row, reasoning: str, drop_system: bool) -> list[dict[str, Any]]:
    """The request messages (system as `system`), then the teacher's answer as the assistant turn."""
    msgs: list[dict[str, Any]] = []
    for m in r.store.messages:
        role = "system" if m["role"] == "developer" else m["role"]
        if drop_system and role == "system":
            continue
        msgs.append({"role": role, "content": content_text(m.get("content"))})
    inline = r.reasoning if reasoning == "inline" else None
    answer: dict[str, Any] = {"role": "assistant", "content": join_think(inline, r.answer)}
    msgs.append(answer)
    if reasoning == "separate":  # on every message, so the Arrow schema is the same in every row
        for m in msgs:
            m["reasoning_content"] = None
        answer["reasoning_content"] = r.reasoning or None
    return msgs


def output_row(r: Row, cfg: BuildConfig) -> dict[str, Any]:
    s = r.store
    return {
        "messages": training_messages(r, cfg.reasoning, cfg.drop_system),
        "prompt_id": r.prompt_id,
        "sample_index": int(s.sample_index),
        "teacher": s.teacher,
        "verified": r.verified,
        "reference": s.reference,
        "key": s.key,
    }


# -- writers -----------------------------------------------------------------------------------------


def _sharegpt(row: dict[str, Any]) -> dict[str, Any]:
    names = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}
    return {
        "conversations": [
            {"from": names.get(m["role"], m["role"]), "value": m["content"]}
            for m in row["messages"]
        ]
    }


def _openai(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "messages": [
            {k: v for k, v in m.items() if k != "reasoning_content" or v is not None}
            for m in row["messages"]
        ]
    }


SHAPES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "sharegpt": _sharegpt,
    "openai": _openai,
}


def open_writers(cfg: BuildConfig, out: Path, kd_columns: bool) -> dict[str, DatasetWriter]:
    """A streaming writer per split in cfg.format under `out` (a fresh folder): the rows go to disk
    in batches as curation passes them, so the build never holds the dataset."""
    if cfg.format in ("jsonl", "sharegpt", "openai"):
        if cfg.format == "sharegpt":  # LLaMA-Factory reads this file to learn the format
            info = {
                f"distill_{name}": {
                    "file_name": f"{name}.jsonl",
                    "formatting": "sharegpt",
                    "columns": {"messages": "conversations"},
                }
                for name in ("train", "eval")
            }
            (out / "dataset_info.json").write_text(
                json.dumps(info, indent=2) + "\n", encoding="utf-8"
            )
        return {name: DatasetWriter(out / f"{name}.jsonl", "jsonl") for name in ("train", "eval")}
    import datasets

    datasets.disable_progress_bars()
    msg = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    if cfg.reasoning == "separate":
        msg["reasoning_content"] = datasets.Value("string")
    feats = datasets.Features(
        {
            "messages": datasets.List(msg),
            "prompt_id": datasets.Value("string"),
            "sample_index": datasets.Value("int64"),
            "teacher": datasets.Value("string"),
            "verified": datasets.Value("bool"),
            "reference": datasets.Value("string"),
            "key": datasets.Value("string"),
        }
    )
    if kd_columns:
        feats["kd_targets"] = datasets.Value("binary")
        feats["kd_check"] = datasets.Value("string")
        feats["kd_resegment"] = datasets.List(datasets.Value("int32"))
    if cfg.format == "parquet":
        return {n: DatasetWriter(out / f"{n}.parquet", "parquet", feats) for n in ("train", "eval")}
    (out / "dataset_dict.json").write_text('{"splits": ["train", "eval"]}', encoding="utf-8")
    return {n: DatasetWriter(out / n, "arrow", feats) for n in ("train", "eval")}


# -- statistics and the card -------------------------------------------------------------------------


def _stats(values: array[int]) -> dict[str, float | int]:
    """n, min, mean, median, p90, max: sorted with numpy (8 bytes a value, not a Python int each)."""
    import numpy as np

    if not values:
        return {"n": 0}
    v = np.sort(np.frombuffer(values, dtype=np.int64))
    n = len(v)
    return {
        "n": n,
        "min": int(v[0]),
        "mean": round(int(v.sum()) / n, 1),
        "median": int(v[n // 2]) if n % 2 else (int(v[n // 2 - 1]) + int(v[n // 2])) / 2,
        "p90": int(v[max(0, math.ceil(0.9 * n) - 1)]),
        "max": int(v[-1]),
    }


def _add_teachers(out: dict[str, dict[str, Any]], rows: list[Row]) -> None:
    for r in rows:
        s = r.store
        t = out.setdefault(
            s.teacher,
            {
                "teacher": s.teacher,
                "model": s.model,
                "base_url": s.base_url,
                "response_models": set(),
                "params": {},
                "rows": 0,
                "kept": 0,
            },
        )
        t["rows"] += 1
        t["kept"] += r.removed_by is None
        if s.response_model:
            t["response_models"].add(s.response_model)
        t["params"][json.dumps(s.params, sort_keys=True)] = s.params


def _teachers(out: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    for t in out.values():
        t["response_models"] = sorted(t["response_models"])
        t["params"] = [t["params"][k] for k in sorted(t["params"])]
    return [out[name] for name in sorted(out)]


def dataset_card(rep: BuildReport, cfg: BuildConfig) -> str:
    """README.md for the output folder. Nothing in it depends on when or where it was built."""
    lines = [
        # YAML front matter: the Hugging Face hub reads the tags.
        "---\ntags:\n- distillation\n- synthetic\ntask_categories:\n- text-generation\n---",
        "",
        f"# Distilled dataset from `{Path(rep.run).name}`",
        "",
        f"Built by `distill build` from the harvest in `{rep.run}`: {rep.kept} of {rep.rows_in} rows kept "
        f"({rep.prompts['kept']} of {rep.prompts['in_store']} prompts).",
        "",
        "## Terms of use",
        "",
        "These answers were generated by the teacher model(s) below. **The teacher's terms of use govern "
        "what this data may be used to train**: many API providers forbid using outputs to develop "
        "competing models. Check them before training on, sharing or publishing this dataset.",
        "",
        *_card_teachers(rep),
        *_card_curation(rep, cfg),
        *_card_split(rep),
        *_card_format(cfg),
        *_card_kd(rep),
        "",
        "The full counts and the config used are in `build_report.json`.",
        "",
    ]
    return "\n".join(lines)


def _card_teachers(rep: BuildReport) -> list[str]:
    lines = [
        "## Teachers",
        "",
        "| teacher | model | reported as | API | parameters | rows | kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in rep.teachers:
        params = "; ".join(f"`{json.dumps(p, sort_keys=True)}`" for p in t["params"])
        lines.append(
            f"| {t['teacher']} | {t['model']} | {', '.join(t['response_models']) or '-'} | {t['base_url']} "
            f"| {params} | {t['rows']} | {t['kept']} |"
        )
    first, last = rep.harvested.get("first") or "-", rep.harvested.get("last") or "-"
    return [*lines, "", f"Harvested between {first} and {last} (UTC).", ""]


def _card_curation(rep: BuildReport, cfg: BuildConfig) -> list[str]:
    lines = [
        "## Curation",
        "",
        "Each row is counted by the first step that removes it, in this order.",
        "",
        "| step | removed | why |",
        "|---|---|---|",
        f"| rows in | {rep.rows_in} | stored answers + failed requests |",
    ]
    fmt = {**cfg.model_dump(), "custom_filter": f"`{cfg.custom_filter}`"}
    for name in FILTERS:
        on = (
            name in ("failed", "replaced_prompt")  # counted whatever the config
            or (name == "not_selected" and (cfg.select != "all" or cfg.prefer_teachers))
            or (name == "custom" and cfg.custom_filter)
            or getattr(cfg.filters, name, False)
        )
        why = EXPLAIN[name].format(**fmt) if on else "off"
        if detail := rep.reasons.get(name):
            why += " (" + ", ".join(f"{k}: {v}" for k, v in detail.items()) + ")"
        lines.append(f"| {name} | {rep.removed[name]} | {why} |")
    v = rep.verified
    return [
        *lines,
        f"| **kept** | **{rep.kept}** | |",
        "",
        f"Of the rows kept, {v['true']} match their reference answer, {v['false']} do not "
        f"(kept only when the verify filter is off) and {v['none']} have no reference. "
        f"Checked with verify: {rep.verification['mode']} (rel_tol {rep.verification['rel_tol']:g}, "
        f"abs_tol {rep.verification['abs_tol']:g}); {rep.verification['rows_without_reference']} "
        "of the stored answers had no reference to check.",
        "",
    ]


def _card_split(rep: BuildReport) -> list[str]:
    sp = rep.split
    lines = [
        "## Split",
        "",
        f"By prompt id, so no sample of an eval prompt is trained on: a prompt is eval when "
        f'sha256("{sp["seed"]}:<prompt id>") as a number in [0, 1) meets the rule: {sp["rule"]}. '
        "The prompt ids of each split are in `splits.json`.",
        "",
        "| split | rows | prompts |",
        "|---|---|---|",
        f"| train | {sp['train_rows']} | {sp['train_prompts']} |",
        f"| eval | {sp['eval_rows']} | {sp['eval_prompts']} |",
        "",
        f"## Lengths ({rep.lengths['unit']}, kept rows)",
        "",
        "| | n | min | mean | median | p90 | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("answer", "reasoning", "teacher_completion_tokens"):
        cells = " | ".join(
            str(rep.lengths[name].get(k, "-")) for k in ("n", "min", "mean", "median", "p90", "max")
        )
        lines.append(f"| {name.replace('_', ' ')} | {cells} |")
    return lines


LOAD = {
    "hf": 'datasets.load_from_disk("<this folder>")',
    "parquet": 'datasets.load_dataset("parquet", data_files={"train": "train.parquet", "eval": "eval.parquet"})',
    "jsonl": 'datasets.load_dataset("json", data_files={"train": "train.jsonl", "eval": "eval.jsonl"})',
}
SHAPED = {  # the formats SHAPES writes, described in a line each
    "sharegpt": 'ShareGPT JSONL (`train.jsonl`, `eval.jsonl`): `{"conversations": [{"from": "system|human|gpt", "value": ...}]}`; `dataset_info.json` describes them for LLaMA-Factory.',
    "openai": 'OpenAI chat fine-tuning JSONL (`train.jsonl`, `eval.jsonl`): `{"messages": [{"role", "content"}]}`.',
}
REASONING = {
    "inline": "; reasoning inline as `<think>\\n...\\n</think>\\n\\n` before the answer (rows without reasoning have no think block)",
    "separate": "; reasoning in the assistant message's `reasoning_content` (null elsewhere)",
    "drop": "; reasoning dropped",
}


def _card_format(cfg: BuildConfig) -> list[str]:
    lines = ["", "## Format", ""]
    if cfg.format in SHAPED:
        return [*lines, SHAPED[cfg.format]]
    system = "" if cfg.drop_system else "system, "
    doc = Response.docs()  # the stored fields a row carries over, described where they are defined
    return [
        *lines,
        f"Load with `{LOAD[cfg.format]}`. Conversational format (TRL `SFTTrainer` takes it as is):",
        "",
        f"- `messages`: {system}user, assistant{REASONING[cfg.reasoning]}",
        *(f"- `{name}`: {doc[name]}" for name in ("prompt_id", "sample_index", "teacher", "key")),
        "- `verified`: the final answer matched `reference` (null: no reference)",
        f"- `reference`: {doc['reference']}",
    ]


# -- teacher targets for top-k distillation ----------------------------------------------------------

KD_WHY = {
    "no_logprobs": "the answer was harvested without logprobs",
    "text_mismatch": "the teacher's tokens do not spell the answer as stored",
    "edge": "a student token crosses the answer's start or end",
    "no_shared_boundary": "no teacher token covers exactly this student token (different tokenizers)",
    "reasoning_unaligned": "reasoning tokens the teacher's logprobs do not spell (none returned for the trace, or it was reformatted)",
    "not_in_template": "the student's chat template does not render the answer as stored",
}


def _load_tokenizer(tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, ... for a bad folder
        raise InputError(
            f"tokenizer {tokenizer_dir}: cannot load it ({type(e).__name__}); give a local model folder with tokenizer files"
        ) from None


class KDTargets:
    """The teacher's top-k for every answer token, on the student's tokens of the row as
    `distill finetune` renders it (pipeline/kd.py aligns): `add` puts kd.KD_COLUMNS on one output
    row as it is written; `report` is the report's `kd` section ({} when not built): coverage, and
    why the other answer tokens have no target.

    Built when the run has logprobs and `tokenizer` names the student.
    """

    def __init__(self, cfg: BuildConfig, tok: Any, has_logprobs: bool):
        self.cfg, self.tok = cfg, tok
        self.wanted = cfg.tokenizer is not None and has_logprobs
        self.on = self.wanted and cfg.format in ("hf", "parquet")
        self.totals: dict[str, Counter[str]] = {"train": Counter(), "eval": Counter()}
        self.modes: Counter[str] = Counter()
        self.stored = 0
        self.seen_logprobs = False  # a kept row had logprobs (else, as before, no kd section)
        if self.on:
            # The rendering finetune uses (its training template), so positions point at its tokens.
            self.template, _ = training_template(tok)
            self.native = renders_reasoning(tok, self.template)

    def add(self, r: Row, row: dict[str, Any], split: str) -> None:
        from pipeline import kd

        msgs = prepare_messages(row["messages"], self.native)
        text, ids, offsets = encode(self.tok, self.template, msgs)
        al = _align_row(r, msgs[-1], text, ids, offsets, self.tok, self.native)
        row["kd_check"] = kd.ids_check(ids)
        row["kd_targets"] = (
            kd.pack_targets(al.positions, al.ids, al.logprobs) if al.positions else None
        )
        row["kd_resegment"] = (
            [al.resegment[0], al.resegment[1], *al.resegment[2]] if al.resegment else None
        )
        self.stored += len(row["kd_targets"] or b"")
        self.seen_logprobs = self.seen_logprobs or bool(r.store.logprobs)
        self.totals[split].update(al.counts)
        self.modes[al.mode] += 1

    def report(self) -> dict[str, Any]:
        from pipeline import kd

        if not self.wanted or (self.on and not self.seen_logprobs):
            return {}
        if not self.on:
            return {
                "stored": False,
                "why": f"format {self.cfg.format} has no binary column: use hf or parquet",
            }
        total = self.totals["train"] + self.totals["eval"]
        n, stored = _answer_tokens(total), self.stored
        return {
            "tokenizer": str(self.cfg.tokenizer),
            "tokenizer_id": kd.tokenizer_id(self.tok),
            "answer_tokens": n,
            "target_tokens": total["target"],
            "coverage": round(total["target"] / n, 4) if n else 0.0,
            "coverage_by_split": {
                k: round(c["target"] / _answer_tokens(c), 4) if _answer_tokens(c) else None
                for k, c in self.totals.items()
            },
            "no_target": {k: total[k] for k in KD_WHY if total[k]},
            "alts_dropped": total["alts_dropped"],
            "rows_by_alignment": dict(sorted(self.modes.items())),
            "bytes": stored,
            "bytes_per_1000_answer_tokens": round(1000 * stored / n) if n else None,
        }


def _align_row(
    r: Row, turn: dict[str, Any], text: str, ids: list[int], offsets: Any, tok: Any, native: bool
):  # type: ignore[no-untyped-def]
    """The alignment of one row's teacher logprobs: over its reasoning and answer when the
    teacher's tokens spell both, else over the answer alone (the trace then counted unaligned)."""
    from pipeline import kd

    rows = r.store.token_logprobs()
    end = text.rfind(r.answer)
    if end < 0:
        al = kd.Alignment()
        al.counts["not_in_template"] = len(tok(r.answer, add_special_tokens=False)["input_ids"])
        return al
    spans = []  # (start, text the teacher's tokens should spell), widest first
    trace = turn.get("reasoning_content") if native else turn.get("content")
    if trace and trace != r.answer:
        start = text.rfind(trace, 0, end + len(r.answer))
        if start >= 0:
            spans.append((start, text[start : max(end + len(r.answer), start + len(trace))]))
    spans.append((end, r.answer))
    aligned = [
        kd.align_topk(s, rows, tok, answer_start=a, input_ids=ids, offsets=offsets)
        for a, s in spans
    ]
    best = max(aligned, key=lambda al: al.counts["target"])
    if best is not aligned[0]:
        unaligned = _answer_tokens(aligned[0].counts) - _answer_tokens(best.counts)
        best.counts["reasoning_unaligned"] += unaligned
    return best


def _answer_tokens(counts: Counter[str]) -> int:
    """The answer tokens an alignment's counts cover (alts_dropped counts alternatives, not tokens)."""
    return sum(v for k, v in counts.items() if k != "alts_dropped")


def _card_kd(rep: BuildReport) -> list[str]:
    k = rep.kd
    if not k:
        return []
    lines = ["", "## Teacher targets (top-k distillation)", ""]
    if not k.get("stored", True):
        return [*lines, f"Not stored: {k['why']}."]
    why = "; ".join(f"{name} {v} ({KD_WHY[name]})" for name, v in k["no_target"].items())
    return [
        *lines,
        f"`kd_targets` holds the teacher's top-k log-probabilities for {k['target_tokens']} of "
        f"{k['answer_tokens']} answer tokens (coverage {k['coverage']:.1%}), aligned to the "
        f"tokenizer `{k['tokenizer']}` (vocabulary id `{k['tokenizer_id']}`): train with "
        "`distill finetune --loss kd` and a student with that tokenizer.",
        "",
        f"Without a target: {why or 'none'}. Rows by alignment: "
        + ", ".join(f"{m} {v}" for m, v in k["rows_by_alignment"].items())
        + f". {k['bytes']} bytes ({k['bytes_per_1000_answer_tokens']} per 1,000 answer tokens).",
        "",
        "- `kd_targets`: int32 n, int32 k, int32 positions[n], int32 ids[n,k], float16 logprobs[n,k] "
        "(pipeline/kd.py `read_targets`); `kd_check`: length and crc32 of the row's student tokens; "
        "`kd_resegment`: [start, end, teacher ids] where the teacher's segmentation replaces the student's",
    ]


# -- the stage ---------------------------------------------------------------------------------------


class Tally:
    """The report's numbers, summed one prompt at a time as curation passes: counts, a few small
    sets (teachers, failed prompts), the split's prompt ids spooled to files, and the kept rows'
    lengths (8 bytes each, for the median and p90): nothing that holds the rows."""

    def __init__(self, cfg: BuildConfig, failures: list[dict[str, Any]], spool: Path):
        self.cfg = cfg
        self.removed = dict.fromkeys(FILTERS, 0)
        self.removed["failed"] = len(failures)
        why = Counter(f"HTTP {f['status']}" if f["status"] else "no response" for f in failures)
        self.reasons: dict[str, Counter[str]] = {"failed": why} if failures else {}
        self.failed_only = {str(f["prompt_id"]) for f in failures}  # minus prompts with answers
        self.responses = self.kept = self.with_ref = self.prompts = self.kept_prompts = 0
        self.verified: Counter[str] = Counter()
        self.split = {name: {"rows": 0, "prompts": 0} for name in ("train", "eval")}
        # Prompts come in sorted id order, so the fingerprint (sha256 of the sorted ids, one a
        # line) and splits.json are written as they pass.
        self.hashes = {name: hashlib.sha256() for name in ("train", "eval")}
        self.ids = {
            name: (spool / f".{name}_ids").open("w+", encoding="utf-8") for name in self.hashes
        }
        self.teachers: dict[str, dict[str, Any]] = {}
        self.dates: list[str] = []
        self.lengths = {k: array("q") for k in ("answer", "reasoning", "teacher_completion_tokens")}

    def add(self, rows: list[Row], split: str | None) -> None:
        pid = rows[0].prompt_id
        self.failed_only.discard(pid)
        self.prompts += 1
        self.responses += len(rows)
        kept = [r for r in rows if r.removed_by is None]
        for r in rows:
            if r.removed_by is not None:
                self.removed[r.removed_by] += 1
                self.reasons.setdefault(r.removed_by, Counter())[r.reason] += 1
            self.with_ref += r.store.reference is not None
        _add_teachers(self.teachers, rows)
        created = [r.store.created_at for r in rows]
        self.dates = [min(self.dates + created), max(self.dates + created)]
        if not kept or split is None:
            return
        self.kept += len(kept)
        self.kept_prompts += 1
        self.verified.update(str(r.verified).lower() for r in kept)
        self.split[split]["rows"] += len(kept)
        self.split[split]["prompts"] += 1
        first = self.split[split]["prompts"] == 1
        self.hashes[split].update(("" if first else "\n").encode() + pid.encode())
        self.ids[split].write(json.dumps(pid, ensure_ascii=False) + "\n")
        self.lengths["answer"].extend(r.answer_len for r in kept)
        self.lengths["reasoning"].extend(r.reasoning_len for r in kept if r.reasoning)
        self.lengths["teacher_completion_tokens"].extend(
            r.store.completion_tokens for r in kept if r.store.completion_tokens is not None
        )

    def splits_json(self) -> str:
        """splits.json: the prompt ids of each split, sorted (as json.dumps(indent=1) writes it)."""
        parts = []
        for name, f in self.ids.items():
            f.seek(0)
            ids = ",\n".join(f"  {line.rstrip()}" for line in f)
            parts.append(f' "{name}": [\n{ids}\n ]' if ids else f' "{name}": []')
            f.close()
            Path(f.name).unlink()
        return "{\n" + ",\n".join(parts) + "\n}\n"

    def report(self, to: Path, unit: str) -> BuildReport:
        """The report's numbers: what each filter removed and why, the prompts, split and lengths."""
        cfg = self.cfg
        rep = BuildReport(run=str(cfg.run), to=str(to), format=cfg.format)
        rep.responses = self.responses
        rep.rows_in = self.responses + self.removed["failed"]
        rep.removed = self.removed
        rep.reasons = {
            k: dict(sorted(self.reasons[k].items())) for k in FILTERS if k in self.reasons
        }
        rep.kept = self.kept
        rep.verified = {k: self.verified[k] for k in ("true", "false", "none")}
        in_store = self.prompts + len(self.failed_only)
        rep.prompts = {
            "in_store": in_store,
            "kept": self.kept_prompts,
            "lost": in_store - self.kept_prompts,
        }
        rep.verification = {
            "mode": cfg.verify,
            "rel_tol": cfg.rel_tol,
            "abs_tol": cfg.abs_tol,
            "answer_patterns": cfg.answer_patterns,
            "rows_with_reference": self.with_ref,
            "rows_without_reference": self.responses - self.with_ref,  # counted, never checked
        }
        sp = self.split
        rep.split = {
            "by": f"{cfg.split_field}, then prompt_id" if cfg.split_field else "prompt_id",
            "rule": (
                f"the {cfg.eval_size} lowest hashes (eval_size: a rank, moves when prompts change)"
                if cfg.eval_size is not None
                else f"hash < eval_fraction {cfg.eval_fraction:g} (a prompt never moves)"
            ),
            "eval_filtered": cfg.filter_eval,
            "seed": cfg.seed,
            "train_rows": sp["train"]["rows"],
            "eval_rows": sp["eval"]["rows"],
            "train_prompts": sp["train"]["prompts"],
            "eval_prompts": sp["eval"]["prompts"],
            "train_fingerprint": self.hashes["train"].hexdigest(),
            "eval_fingerprint": self.hashes["eval"].hexdigest(),
        }
        rep.teachers = _teachers(self.teachers)
        first, last = self.dates or (None, None)
        rep.harvested = {"first": first, "last": last}
        rep.lengths = {"unit": unit, **{k: _stats(v) for k, v in self.lengths.items()}}
        rep.config = cfg.model_dump(mode="json", exclude={"to", "json_report"})
        return rep


def _check_paths(cfg: BuildConfig) -> tuple[Path, Path]:
    """(run, to), refusing a config that cannot build before anything is read."""
    if cfg.run is None:
        raise ConfigError(
            "no run directory: pass RUN (the harvest's --out) or set run: in the build config"
        )
    if cfg.to is None:
        raise ConfigError("no output folder: pass --to DIR or set to: in the build config")
    if cfg.format == "sharegpt" and cfg.reasoning == "separate":
        raise ConfigError(
            "--format sharegpt has no field for separate reasoning; use --reasoning inline or drop"
        )
    run = Path(cfg.run)
    if not run.is_dir():
        raise InputError(
            f"{run}: run directory not found; pass the folder given to `distill harvest --out`"
        )
    return run, Path(cfg.to)


def prompt_groups(
    cfg: BuildConfig, run: Path, custom: Callable[[dict[str, Any]], Any] | None, tok: Any
) -> Iterator[tuple[list[Row], dict[str, bool]]]:
    """The store's answers one prompt at a time (the store yields them sorted by prompt id), each
    marked by the filters and the selection, with the prompt's split_field split if it has one."""
    with Store(run, readonly=True) as store:
        current = store.prompt_hashes()
        for _, group in groupby(store.iter_responses(), key=lambda s: str(s.prompt_id)):
            rows = [Row(s) for s in group]
            # Only the current text of each prompt id counts: answers to a replaced text are set aside.
            for r in rows:
                if current.get(r.prompt_id, "") not in ("", content_hash(r.store.messages)):
                    r.removed_by, r.reason = "replaced_prompt", "the prompt's text was replaced"
            live = [r for r in rows if r.removed_by is None]
            _lengths(live, tok)  # one prompt's rows: apply_filters and select rely on it
            fixed = fixed_splits(live, cfg)
            apply_filters(cfg, live, custom)
            select(cfg, live)
            yield rows, fixed


def curate(
    cfg: BuildConfig, run: Path, custom: Callable[[dict[str, Any]], Any] | None, tok: Any
) -> Iterator[tuple[list[Row], str | None]]:
    """Each prompt's rows, marked kept or removed, and its split ("train", "eval", or None when
    nothing of it is kept). A prompt's split depends on its id alone (eval_fraction), so one pass
    does; eval_size is a rank over the prompts kept, so it first takes a pass to find them."""
    ranked = _ranked(cfg, run, custom, tok) if cfg.eval_size is not None else set()
    for rows, fixed in prompt_groups(cfg, run, custom, tok):
        pid = rows[0].prompt_id
        if cfg.filter_eval and all(r.removed_by is not None for r in rows):
            yield rows, None
            continue
        if pid in fixed:
            is_eval = fixed[pid]
        elif cfg.eval_size is None:
            is_eval = prompt_hash(cfg.seed, pid) < cfg.eval_fraction
        else:
            is_eval = pid in ranked
        if is_eval and not cfg.filter_eval:
            # Held-out prompts as the teacher answered them: the split is made before filtering.
            for r in rows:
                if r.removed_by != "replaced_prompt":
                    r.removed_by, r.reason = None, ""
        yield rows, ("eval" if is_eval else "train")


def _ranked(
    cfg: BuildConfig, run: Path, custom: Callable[[dict[str, Any]], Any] | None, tok: Any
) -> set[str]:
    """eval_size's prompts: a first pass over the store keeps only a heap of eval_size ids."""
    forced = False

    def candidates() -> Iterator[str]:
        nonlocal forced
        for rows, fixed in prompt_groups(cfg, run, custom, tok):
            pid = rows[0].prompt_id
            if cfg.filter_eval and all(r.removed_by is not None for r in rows):
                continue
            if pid in fixed:
                forced = forced or fixed[pid]
                continue
            yield pid

    return eval_rank(candidates(), cfg, lambda: forced)  # known once the pass is done


def build(cfg: BuildConfig) -> BuildReport:
    """Curate the run's answers and write the dataset, its card and its report to cfg.to.

    One prompt's rows at a time go from the store through the filters to the writers, so memory
    stays flat whatever the run's size (eval_size reads the store twice: see `curate`)."""
    run, to = _check_paths(cfg)
    custom = load_function(cfg.custom_filter, "custom_filter") if cfg.custom_filter else None
    if cfg.verify not in MODES:  # a custom check that cannot load fails before anything is read
        load_function(cfg.verify, "verify")
    with Store(run, readonly=True) as store:
        failures = store.failures()
        if not store.count() and not failures:
            raise StoreError(
                f"{run}: the store holds no responses yet; run `distill harvest` first"
            )
        has_logprobs = store.has_logprobs()
    tok = _load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None
    unit = "characters" if cfg.tokenizer is None else f"tokens ({cfg.tokenizer.name} tokenizer)"
    kd = KDTargets(cfg, tok, has_logprobs)
    shape = SHAPES.get(cfg.format)

    with staged(to, "build", "--to") as tmp:
        tally = Tally(cfg, failures, tmp)
        with contextlib.ExitStack() as files:  # finalized on success, closed on a failure
            writers = {k: files.enter_context(w) for k, w in open_writers(cfg, tmp, kd.on).items()}
            for rows, split in curate(cfg, run, custom, tok):
                tally.add(rows, split)
                for r in rows:
                    if split is None or r.removed_by is not None:
                        continue
                    row = output_row(r, cfg)
                    if kd.on:
                        kd.add(r, row, split)
                    writers[split].write(shape(row) if shape else row)
        rep = tally.report(to, unit)
        rep.kd = kd.report()
        (tmp / "splits.json").write_text(tally.splits_json(), encoding="utf-8")
        if not rep.kept:
            removed = ", ".join(f"{k} {v}" for k, v in rep.removed.items() if v)
            raise InputError(
                f"{run}: every one of {rep.rows_in} rows was removed ({removed}); relax the filters in the build config"
            )
        (tmp / "README.md").write_text(dataset_card(rep, cfg), encoding="utf-8")
        (tmp / "build_report.json").write_text(rep.to_json(), encoding="utf-8")
    return rep
