"""Evaluate: the base student and the fine-tuned student, side by side, on held-out prompts.

    distill eval --data data/datasets/demo --finetuned data/finetune/demo --out data/eval/demo
    distill eval --data DS --finetuned data/ft/kd --against data/ft/sft --out data/eval/kd-vs-sft

With `against`, a second fine-tuned student (KD vs SFT, on-policy vs SFT) takes the base's column.
Both students answer every prompt of the dataset's `eval` split (held out by prompt id in
`distill build`) with their own chat template, greedy by default. Each is scored on:

- accuracy: the answer verified against the prompt's reference (pipeline/verify.py, the same
  check `distill build` applies to the teacher), on prompts that carry one;
- agreement with the teacher: the final answers match (`extract_answer` + `answers_match`), and
  ROUGE-L F1 between the texts on word tokens;
- the teacher's answers' negative log-likelihood per token under the student (teacher-forced,
  loss on the assistant tokens only, same chat template and messages as at generation), and
  its perplexity exp(NLL): the quantity fine-tuning lowers directly;
- format compliance (`re.search(format_regex, answer)`) when a format is declared;
- answer length in tokens and the share of answers cut at `max_new_tokens` (no end-of-turn);
- optionally an LLM judge through the teacher client (off by default: it costs money).

For context distillation the student is evaluated WITHOUT the teacher's system prompt: the
dataset's system message is dropped unless `keep_system: true`, and `system_prompt` gives the
students one of their own. A prompt with several teacher samples is answered once; teacher
agreement and NLL average over its samples.

Writes OUT/report.md, OUT/report.json (every number and every answer), OUT/metrics.png and
OUT/loss_curves.png (from the fine-tune run's log_history.json, when there is one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipeline.artifacts import (
    FinetuneRun,
    read_build_report,
    read_dataset,
    read_finetune_run,
    read_json,
    trained_prompt_ids,
)
from pipeline.chat import render, renders_reasoning, stop_ids, tokenize_split, training_template
from pipeline.config import StageConfig, dump_config
from pipeline.errors import ConfigError, InputError
from pipeline.hardware import native_bf16
from pipeline.outdir import claim
from pipeline.reasoning import split_think
from pipeline.redact import redact
from pipeline.verify import answers_match, check_mode, check_prompt, extract_answer


class EvalConfig(StageConfig):
    """What to evaluate, and how the students generate."""

    data: Path = Field(
        ...,
        description="Dataset folder written by `distill build` (needs an `eval` split with `messages`).",
    )
    split: str = Field(
        "eval", description="Which split of the dataset to evaluate on (held out by prompt id)."
    )
    base: Path | None = Field(
        None,
        description="Base student: a local model folder. Default: the `student` named in the fine-tune run's train_report.json.",
    )
    finetuned: Path = Field(
        ...,
        description="Fine-tuned student: a `distill finetune` OUT folder, its adapter/ folder, or a merged model folder.",
    )
    against: Path | None = Field(
        None,
        description="Compare the fine-tuned student against this one instead of the base: another `distill finetune` OUT folder of the same student, or a merged model folder. Differences and intervals are then fine-tuned - against (KD vs SFT, on-policy vs SFT).",
    )
    out: Path = Field(
        Path("data/eval"), description="Folder for report.md, report.json and the PNGs."
    )
    max_new_tokens: int = Field(
        256, ge=1, description="Most tokens a student may generate per answer."
    )
    batch_size: int = Field(8, ge=1, description="Prompts per generation / NLL batch.")
    greedy: bool = Field(
        True,
        description="Greedy decoding (reproducible); false samples with `temperature` and `top_p`.",
    )
    temperature: float = Field(0.7, gt=0, description="Sampling temperature when greedy is false.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling when greedy is false.")
    limit: int | None = Field(
        None, ge=1, description="Evaluate only the first N prompts of the split."
    )
    answer_patterns: list[str] | None = Field(
        None,
        description="Regexes that extract the final answer (first group, else the match); default: the build's (its build_report.json), else verify.py's.",
    )
    verify: str | None = Field(
        None,
        description="How answers are checked against references: auto, math, text, regex or 'module:function'; default: the build's `verify` (its build_report.json), else auto. Students and teacher are checked alike.",
    )
    rel_tol: float | None = Field(
        None, ge=0, description="Relative tolerance of numeric answers; default: the build's."
    )
    abs_tol: float | None = Field(
        None, ge=0, description="Absolute tolerance of numeric answers; default: the build's."
    )
    bootstrap: int = Field(
        2000,
        ge=100,
        description="Paired bootstrap resamples over prompts for the 95% interval of each base -> fine-tuned difference (seeded by `seed`).",
    )
    format_regex: str | None = Field(
        None,
        description="The declared answer format: an answer complies when re.search(format_regex, answer) matches.",
    )
    system_prompt: str | None = Field(
        None,
        description="System prompt the students see at eval, replacing the dataset's (default: the dataset's, see keep_system).",
    )
    keep_system: bool = Field(
        True,
        description="Keep the dataset's system message for the students: they see what the fine-tune trained on (for context distillation build with drop_system: true). false: drop it.",
    )
    nll: bool = Field(
        True,
        description="Compute the NLL / perplexity of the teacher's answers under each student.",
    )
    examples: int = Field(5, ge=0, description="Side-by-side examples shown in report.md.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Where the students run (auto: CUDA when visible, else CPU)."
    )
    load_in_4bit: bool = Field(
        False,
        description="Load the students in 4-bit NF4 (CUDA + bitsandbytes), e.g. a QLoRA student on the card it trained on.",
    )
    seed: int = Field(0, description="Random seed (matters only when greedy is false).")
    judge: bool = Field(
        False,
        description="Ask an LLM judge to grade each answer 1-10 against the teacher's (costs money; off by default).",
    )
    judge_model: str | None = Field(
        None, description="Judge model name (required when judge is true)."
    )
    judge_base_url: str | None = Field(
        None, description="Judge API root (default: $OPENAI_BASE_URL, else OpenAI)."
    )
    judge_api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable holding the judge's API key."
    )
    judge_concurrency: int = Field(8, ge=1, description="Judge requests in flight at once.")


# How each metric reads: (key, label, which way is better, format of its value).
METRICS: list[tuple[str, str, str, str]] = [
    ("accuracy", "accuracy vs reference", "higher", "{:.1%}"),
    ("teacher_match", "final answer = teacher's", "higher", "{:.1%}"),
    ("rouge_l", "ROUGE-L F1 vs teacher (0-1)", "higher", "{:.3f}"),
    ("nll", "NLL of teacher answers (nats/token)", "lower", "{:.3f}"),
    ("perplexity", "perplexity of teacher answers", "lower", "{:.2f}"),
    ("teacher_kl", "KL teacher top-k -> student (nats/token)", "lower", "{:.3f}"),
    ("format_compliance", "format compliance", "higher", "{:.1%}"),
    ("judge_score", "LLM judge score (0-1)", "higher", "{:.3f}"),
    ("answer_tokens", "mean answer length (tokens)", "closer to teacher", "{:.1f}"),
    ("hit_max_tokens", "answers cut at max_new_tokens", "lower", "{:.1%}"),
    ("reasoning_share", "answers with a <think> trace", "-", "{:.1%}"),
    ("trace_chars", "mean trace length (characters)", "-", "{:.0f}"),
]
STUDENTS = ("base", "finetuned")
LABELS = {"base": "base", "finetuned": "fine-tuned", "teacher": "teacher"}


# -- inputs ----------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """One held-out prompt: what the students see, and what the teacher answered (1+ samples)."""

    prompt_id: str
    messages: list[dict[str, Any]]  # what the students see (system message handled per config)
    teacher: list[dict[str, Any]] = field(default_factory=list)  # the teacher's assistant turns
    reference: str | None = None
    dataset_system: bool = False  # the dataset's row carries a system message


def check_config(cfg: EvalConfig) -> None:
    """Refuse a bad regex or an incomplete judge before loading anything, naming the key."""
    if cfg.verify is not None:
        try:
            check_mode(cfg.verify)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.judge and not cfg.judge_model:
        raise ConfigError(
            "judge is on but no judge_model is set; set judge_model (--judge-model) or turn judge off"
        )
    patterns = [("format_regex", cfg.format_regex)] if cfg.format_regex is not None else []
    for key, p in patterns + [("answer_patterns", p) for p in cfg.answer_patterns or []]:
        try:
            re.compile(p)
        except re.error as e:
            raise ConfigError(
                f"{key}: {p!r} is not a valid regex ({e}); fix or remove it"
            ) from None


def load_prompts(cfg: EvalConfig) -> list[Prompt]:
    """The split's rows grouped by prompt id (first-seen order), `limit` prompts at most."""
    import datasets

    datasets.disable_progress_bars()
    rows = read_dataset(cfg.data, cfg.split)[cfg.split]
    has = set(rows.column_names)
    by_id: dict[str, Prompt] = {}
    for i, row in enumerate(rows):
        msgs = [{k: v for k, v in m.items() if v is not None} for m in row["messages"]]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise InputError(
                f"{cfg.data} [{cfg.split}] row {i}: `messages` must end with the teacher's assistant turn"
            )
        pid = str(row["prompt_id"]) if "prompt_id" in has else str(i)
        if pid not in by_id:
            if cfg.limit is not None and len(by_id) >= cfg.limit:
                continue
            system = any(m.get("role") == "system" for m in msgs)
            by_id[pid] = Prompt(pid, student_messages(msgs[:-1], cfg), dataset_system=system)
        p = by_id[pid]
        p.teacher.append(msgs[-1])
        if p.reference is None and "reference" in has and row["reference"] is not None:
            p.reference = str(row["reference"])
    return list(by_id.values())


def student_messages(msgs: list[dict[str, Any]], cfg: EvalConfig) -> list[dict[str, Any]]:
    """The conversation a student sees: without the teacher's system prompt unless asked."""
    if not cfg.keep_system or cfg.system_prompt is not None:
        msgs = [m for m in msgs if m.get("role") != "system"]
    if cfg.system_prompt is not None:
        msgs = [{"role": "system", "content": cfg.system_prompt}, *msgs]
    return msgs


@dataclass
class Students:
    """Where the two students live, resolved from the config."""

    base: Path
    finetuned: Path  # a merged model folder, or a PEFT adapter folder when `adapter` is true
    adapter: bool
    run: FinetuneRun  # its fine-tune run: loss curves, the prompts it trained on
    # `against`: the student in the base's place (a PEFT adapter on `base` when against_adapter)
    against: Path | None = None
    against_adapter: bool = False
    against_run: FinetuneRun | None = None  # its fine-tune run, when an adapter (held-out check)

    def labels(self) -> dict[str, str]:
        """How the report names each column."""
        return {**LABELS, "base": "against"} if self.against is not None else dict(LABELS)


def resolve_students(cfg: EvalConfig) -> Students:
    """Tell a fine-tune run (or its adapter folder) from a merged model folder; find the base."""
    ft = cfg.finetuned
    if not ft.exists():
        raise InputError(
            f"{ft}: fine-tuned student not found (key `finetuned`); pass the OUT folder of `distill finetune`"
        )
    run = _read_run("finetuned", ft, str(cfg.base) if cfg.base else None, merged=True)
    base = Path(run.student)
    if not (base / "config.json").is_file():
        where = "key `base`" if cfg.base else f"the fine-tune run {run.out or ft}"
        raise InputError(
            f"{base} (from {where}): not a local model folder (no config.json); set `base` (--base) to one"
        )
    return _against(cfg, Students(base, run.adapter or ft, run.adapter is not None, run))


def _read_run(
    key: str, path: Path, student: str | None = None, merged: bool = False
) -> FinetuneRun:
    """`read_finetune_run`, its errors naming the config key the folder came from."""
    try:
        return read_finetune_run(path, student, merged=merged)
    except InputError as e:
        raise InputError(f"{e} (key `{key}`)") from None


def _against(cfg: EvalConfig, students: Students) -> Students:
    """`students` with the `against` student in the base's place, when one is set."""
    if cfg.against is None:
        return students
    a = cfg.against
    if (a / "config.json").is_file():  # a merged model: compared as it is, its record checked
        run = _read_run("against", a, str(students.base), merged=True)
        return dataclasses.replace(students, against=a, against_run=run)
    run = _read_run("against", a)
    if Path(run.student).resolve() != students.base.resolve():
        raise InputError(
            f"{a} (key `against`): trained on {run.student}, but the fine-tuned student's base "
            f"is {students.base}; compare runs of the same student, or pass a merged model"
        )
    return dataclasses.replace(students, against=run.adapter, against_adapter=True, against_run=run)


# -- the students ----------------------------------------------------------------------------------


def pick_device(cfg: EvalConfig) -> str:
    """Where the students run; with load_in_4bit, checks CUDA and bitsandbytes are there."""
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.load_in_4bit:
        if device != "cuda":
            raise ConfigError(
                f"load_in_4bit needs a CUDA GPU (device is {device}); turn load_in_4bit off"
            )
        try:
            import bitsandbytes  # noqa: F401
        except Exception:  # not installed, or installed without a CUDA build
            raise ConfigError(
                "load_in_4bit needs bitsandbytes: pip install 'distill[qlora]', or turn "
                "load_in_4bit off"
            ) from None
    return device


def eval_dtype(device: str, capability: Callable[[], tuple[int, int]] | None = None) -> str:
    """bf16 on GPUs with bf16 in hardware, fp16 on older ones (T4, V100), fp32 elsewhere (CPU
    half precision is slow). `capability` is torch.cuda.get_device_capability by default."""
    if device != "cuda":
        return "fp32"
    import torch

    return "bf16" if native_bf16((capability or torch.cuda.get_device_capability)()) else "fp16"


def load_student(which: str, students: Students, device: str, load_in_4bit: bool = False):  # type: ignore[no-untyped-def]
    """(model, tokenizer) in eval mode; an adapter is merged into its base for speed (kept apart
    on a 4-bit base, as in QLoRA training)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar per phase is ours; no "Loading weights"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        eval_dtype(device)
    ]
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    # (its folder, whether that is an adapter on `base`) of the student in this column
    if which == "finetuned":
        path, adapter = students.finetuned, students.adapter
    elif students.against is not None:
        path, adapter = students.against, students.against_adapter
    else:
        path, adapter = students.base, False
    weights = students.base if adapter else path
    model = AutoModelForCausalLM.from_pretrained(str(weights), **kwargs)
    tok_path = weights
    if adapter:
        from peft import PeftModel

        with warnings.catch_warnings():  # peft trips a transformers deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            peft = PeftModel.from_pretrained(model, str(path))
        model = peft if load_in_4bit else peft.merge_and_unload()  # type: ignore[assignment]
        # The fine-tune stage saves its tokenizer (and chat template) next to the adapter.
        if (path / "tokenizer_config.json").is_file():
            tok_path = path
    tok = AutoTokenizer.from_pretrained(str(tok_path), local_files_only=True)
    if tok.chat_template is None:
        raise InputError(
            f"{tok_path}: the tokenizer has no chat template; eval needs a chat (instruct) model"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not load_in_4bit:  # a 4-bit model is placed on the GPU as it loads
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, tok


def generation_stops(students: Students) -> set[int]:
    """End-of-answer ids from both students' generation configs, so both stop at the same tokens.

    The fine-tune stage adds the template's end-of-turn token to the adapter's generation config
    when the base's lacks it; without the union the base would be scored as "never stops" for a
    config quirk rather than for what its weights do.
    """
    out: set[int] = set()
    for folder in [f for f in (students.base, students.finetuned, students.against) if f]:
        ids = read_json(folder / "generation_config.json").get("eos_token_id")
        out.update(i for i in (ids if isinstance(ids, list) else [ids]) if isinstance(i, int))
    return out


@dataclass
class Answer:
    text: str  # the final answer: what is scored
    tokens: int  # every generated token, trace included
    hit_max: bool
    trace: str | None = None  # the <think> trace before it, reported apart


def _progress(label: str):  # type: ignore[no-untyped-def]
    """A progress bar on stderr that disappears when done."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def _left_padded(seqs: list[list[int]], pad_id: int):  # type: ignore[no-untyped-def]
    """(input ids, attention mask) of a batch, left-padded: every sequence ends at the right edge,
    where generation starts and where the kept logits are."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


def generate(  # type: ignore[no-untyped-def]
    model, tok, prompts: list[Prompt], cfg: EvalConfig, label: str, stops: set[int]
) -> list[Answer]:
    """Each prompt's answer: batched, left-padded, shortest prompts batched together."""
    import torch
    from transformers import GenerationConfig, set_seed

    set_seed(cfg.seed)
    gen = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=not cfg.greedy,
        eos_token_id=sorted(stops),
        pad_token_id=tok.pad_token_id,
        **({} if cfg.greedy else {"temperature": cfg.temperature, "top_p": cfg.top_p}),
    )
    encoded = [render(tok, p.messages, generation_prompt=True) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: list[Answer | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    bar = _progress(f"generate {label}")
    with bar, torch.inference_mode():
        task = bar.add_task(label, total=len(prompts))
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            ids, mask = _left_padded([encoded[i] for i in idx], tok.pad_token_id)
            width = ids.shape[1]
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen
            )
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                end = next((k for k, t in enumerate(new) if t in stops), None)
                kept = new if end is None else new[:end]
                # Score the answer, not a <think> trace before it; keep the trace for its own stats.
                final, trace = split_think(tok.decode(kept, skip_special_tokens=True))
                hit = end is None and len(new) >= cfg.max_new_tokens
                answers[i] = Answer(final.strip(), len(kept), hit, trace)
            bar.update(task, advance=len(idx))
    return [a for a in answers if a is not None]


def teacher_nll(  # type: ignore[no-untyped-def]
    model, tok, prompts: list[Prompt], cfg: EvalConfig, label: str, stops: set[int]
) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each prompt's teacher answers, teacher-forced.

    Only the assistant's tokens count, up to and including the end-of-turn token; they are what
    follows the common prefix of the conversation rendered with and without the answer.
    """
    import torch
    import torch.nn.functional as F

    limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    items: list[tuple[int, list[int], int]] = []  # (prompt index, ids, number of target tokens)
    for pi, p in enumerate(prompts):
        prefix = render(tok, p.messages, generation_prompt=True)
        for answer in p.teacher:
            full = render(tok, [*p.messages, answer], generation_prompt=False)
            k = 0
            while k < min(len(prefix), len(full)) and prefix[k] == full[k]:
                k += 1
            target = full[k:]
            end = next((j for j, t in enumerate(target) if t in stops), None)
            if end is not None:  # drop what the template writes after the end-of-turn token
                target = target[: end + 1]
            ids = (full[:k] + target)[-limit:]
            n = min(len(target), len(ids) - 1)
            if n > 0:
                items.append((pi, ids, n))
    sums = [0.0] * len(prompts)
    counts = [0] * len(prompts)
    order = sorted(range(len(items)), key=lambda j: len(items[j][1]))
    device = next(model.parameters()).device
    bar = _progress(f"NLL {label}")
    with bar, torch.inference_mode():
        task = bar.add_task(label, total=len(items))
        for start in range(0, len(order), cfg.batch_size):
            batch = [items[j] for j in order[start : start + cfg.batch_size]]
            ids_t, mask = _left_padded([ids for _, ids, _ in batch], tok.pad_token_id)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            keep = max(n for _, _, n in batch) + 1
            # Only the logits of the answer tokens: the full vocabulary x sequence would not fit.
            logits = model(
                input_ids=ids_t.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                logits_to_keep=keep,
            ).logits.float()
            for row, (pi, _ids, n) in enumerate(batch):
                pred = logits[row, -n - 1 : -1]
                gold = ids_t[row, -n:].to(device)
                sums[pi] += float(F.cross_entropy(pred, gold, reduction="sum"))
                counts[pi] += n
            bar.update(task, advance=len(batch))
    return list(zip(sums, counts, strict=True))


def heldout_teacher_kl(
    model, tok, prompts: list[Prompt], cfg: EvalConfig
) -> dict[str, tuple[float, int]] | None:  # type: ignore[no-untyped-def]
    """Per prompt id: (sum of per-token KL(teacher top-k + tail || student), tokens) over its
    teacher answers in the split, on the rows as `distill finetune` renders them (the positions
    the targets were aligned to); None when the split has no kd_targets or this student's tokens
    differ from those aligned to."""
    import torch

    from pipeline import kd

    rows = read_dataset(cfg.data, cfg.split)[cfg.split]
    if not set(kd.KD_COLUMNS) <= set(rows.column_names):
        return None
    keep = {p.prompt_id for p in prompts}
    rows = rows.filter(lambda ex: str(ex["prompt_id"]) in keep)
    template, how = training_template(tok)
    native = renders_reasoning(tok, template)
    tokenized, pids = tokenize_split(rows, tok, template, how, native)
    try:
        table = kd.attach_targets(tokenized, rows.select_columns(list(kd.KD_COLUMNS)), pids, "-")
    except InputError:  # another tokenizer or template than the targets': no comparable KL
        return None
    device = next(model.parameters()).device
    per: dict[str, tuple[float, int]] = {}
    with torch.inference_mode():
        for start in range(0, len(tokenized), cfg.batch_size):
            batch = tokenized[start : start + cfg.batch_size]
            width = max(len(r["input_ids"]) for r in batch)

            def padded(key: str, fill: int) -> torch.Tensor:
                return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in batch])  # noqa: B023

            ids, labels = padded("input_ids", 0), padded("labels", -100)
            index = padded("kd_index", -1)
            lengths = torch.tensor([[len(r["input_ids"])] for r in batch])
            mask = torch.arange(width) < lengths  # right padding, masked out
            logits = model(input_ids=ids.to(device), attention_mask=mask.long().to(device)).logits
            sums, counts = kd.teacher_kl(
                logits.float(), *table.gather(index.to(device), labels.to(device))
            )
            for pid, s, n in zip(pids[start : start + len(batch)], sums, counts, strict=True):
                if n:
                    before = per.get(pid, (0.0, 0))
                    per[pid] = (before[0] + s, before[1] + n)
    return per or None


# -- scores ----------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased word tokens: the longest common subsequence, one DP row at a time."""
    a, b = words(candidate), words(reference)
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


@dataclass(frozen=True)
class Verification:
    """How answers are checked, the same for students and teacher: the build's settings unless
    the eval config overrides them (`source` says which)."""

    mode: str
    rel_tol: float
    abs_tol: float
    patterns: list[str] | None
    source: str

    def check(self, text: str, reference: str | None, prompt_id: str) -> bool | None:
        """Is the final answer of `text` the reference? None when there is no reference."""
        if reference is None:
            return None
        v = check_prompt(
            prompt_id,
            text,
            reference,
            mode=self.mode,
            rel_tol=self.rel_tol,
            abs_tol=self.abs_tol,
            patterns=self.patterns,
        )
        return v.verified is True


def verification(cfg: EvalConfig) -> Verification:
    """The eval config's verify settings, each falling back to the build's, then the defaults."""
    built = read_build_report(cfg.data).get("config") or {}
    own = cfg.model_dump(include={"verify", "rel_tol", "abs_tol", "answer_patterns"})
    defaults: dict[str, Any] = {"verify": "auto", "rel_tol": 1e-6, "abs_tol": 1e-9}
    got: dict[str, Any] = {
        k: v if v is not None else built.get(k, defaults.get(k)) for k, v in own.items()
    }
    if all(v is not None for v in own.values()):
        source = "eval config"
    else:
        source = "the build's build_report.json" if built else "defaults (no build_report.json)"
        if any(v is not None for v in own.values()):
            source += " and the eval config"
    return Verification(
        str(got["verify"]),
        float(got["rel_tol"]),
        float(got["abs_tol"]),
        list(got["answer_patterns"] or []) or None,
        source,
    )


def teacher_text(turn: dict[str, Any]) -> tuple[str, str | None]:
    """(final answer, trace) of one teacher turn: inline <think> or a reasoning_content field."""
    answer, trace = split_think(turn.get("content") or "")
    return answer.strip(), turn.get("reasoning_content") or trace


def score(
    prompts: list[Prompt],
    answers: list[Answer],
    nll: list[tuple[float, int]] | None,
    cfg: EvalConfig,
    ver: Verification,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary metrics, one record per prompt) for one student. Every comparison reads final
    answers on both sides: the student's and the teacher's traces are cut off first."""
    per: list[dict[str, Any]] = []
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        nll_sum, nll_tokens = nll[i] if nll is not None else (0.0, 0)
        pred = extract_answer(a.text, ver.patterns)
        teacher = [teacher_text(t)[0] for t in p.teacher]
        known = [t for t in (extract_answer(t, ver.patterns) for t in teacher) if t is not None]
        matches = [
            pred is not None and answers_match(pred, t, rel_tol=ver.rel_tol, abs_tol=ver.abs_tol)
            for t in known
        ]
        rec: dict[str, Any] = {
            "answer": a.text,
            "trace": a.trace,
            "extracted": pred,
            "tokens": a.tokens,
            "hit_max_tokens": a.hit_max,
            "correct": ver.check(a.text, p.reference, p.prompt_id),
            # Share of the teacher's samples whose final answer this one matches.
            "teacher_match": _mean([float(m) for m in matches]),
            "rouge_l": sum(rouge_l(a.text, t) for t in teacher) / len(teacher),
            "format_ok": bool(re.search(cfg.format_regex, a.text)) if cfg.format_regex else None,
            "nll": nll_sum / nll_tokens if nll_tokens > 0 else None,
            "nll_tokens": nll_tokens,
        }
        per.append(rec)

    def share(key: str) -> float | None:
        return _mean([float(r[key]) for r in per if r[key] is not None])

    total_tokens = sum(n for _, n in nll) if nll is not None else 0
    mean_nll = sum(s for s, _ in nll) / total_tokens if nll is not None and total_tokens else None
    correct = [r["correct"] for r in per if r["correct"] is not None]
    metrics = {
        "accuracy": share("correct"),
        "accuracy_ci": wilson(sum(correct), len(correct)),
        "n_reference": len(correct),
        "teacher_match": share("teacher_match"),
        "n_teacher_answers": sum(r["teacher_match"] is not None for r in per),
        "rouge_l": share("rouge_l"),
        "nll": mean_nll,  # token-weighted over every teacher answer
        "perplexity": math.exp(mean_nll) if mean_nll is not None and mean_nll < 700 else None,
        "nll_tokens": total_tokens,
        "format_compliance": share("format_ok"),
        "answer_tokens": _mean([float(r["tokens"]) for r in per]),
        "hit_max_tokens": share("hit_max_tokens"),
        "judge_score": None,
        **trace_stats([r["trace"] for r in per]),
    }
    return metrics, per


def trace_stats(traces: list[str | None]) -> dict[str, float | None]:
    """The reasoning apart from the answer: the share of answers with a trace, its mean length."""
    with_trace = [t for t in traces if t]
    return {
        "reasoning_share": len(with_trace) / len(traces) if traces else None,
        "trace_chars": _mean([float(len(t)) for t in with_trace]),
    }


def teacher_metrics(
    prompts: list[Prompt], tok, cfg: EvalConfig, ver: Verification
) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The same scores for the teacher's own final answers (trace cut off, as for the students):
    the ceiling the students are chasing."""
    samples = [(p, *teacher_text(t)) for p in prompts for t in p.teacher]
    correct = [
        bool(ver.check(a, p.reference, p.prompt_id))
        for p, a, _ in samples
        if p.reference is not None
    ]
    return {
        "accuracy": _mean([float(c) for c in correct]),
        "accuracy_ci": wilson(sum(correct), len(correct)),
        "n_reference": len(correct),
        "format_compliance": _mean(
            [float(bool(re.search(cfg.format_regex, a))) for _, a, _ in samples]
        )
        if cfg.format_regex
        else None,
        # In the base student's tokens, so the lengths compare (the final answer only: a
        # student's generated tokens include its trace, see trace_chars).
        "answer_tokens": _mean(
            [float(len(tok(a, add_special_tokens=False)["input_ids"])) for _, a, _ in samples]
        ),
        "samples": len(samples),
        **trace_stats([t for _, _, t in samples]),
    }


# -- intervals -------------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """The 95% Wilson score interval of k successes in n (None when n is 0)."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


# Per-prompt values whose base -> fine-tuned difference gets an interval, and which way is better.
PAIRED = {  # metric -> (per-prompt field, which way is better, weight field or None)
    "accuracy": ("correct", "higher", None),
    "teacher_match": ("teacher_match", "higher", None),
    "rouge_l": ("rouge_l", "higher", None),
    # NLL is shown token-weighted over all teacher answers: its difference is weighted the same
    # way, so the interval is about the very difference of the two numbers in the table.
    "nll": ("nll", "lower", "nll_tokens"),
    "teacher_kl": ("teacher_kl", "lower", "teacher_kl_tokens"),  # the same, per token
    "format_compliance": ("format_ok", "higher", None),
    "judge_score": ("judge", "higher", None),
    "hit_max_tokens": ("hit_max_tokens", "lower", None),
}


def paired_difference(
    base: list[float],
    tuned: list[float],
    better: str,
    resamples: int,
    seed: int,
    weights: list[float] | None = None,
) -> dict[str, Any]:
    """fine-tuned - base, averaged over prompts (weighted by `weights` when given), with a 95%
    paired bootstrap interval (prompts resampled with replacement, `resamples` times, seeded).
    "better" or "worse" only when the interval excludes zero; otherwise "no clear difference"."""
    import numpy as np

    d = np.asarray(tuned, dtype=float) - np.asarray(base, dtype=float)
    w = np.ones_like(d) if weights is None else np.asarray(weights, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(resamples, len(d)))
    means = (d[idx] * w[idx]).sum(axis=1) / np.maximum(w[idx].sum(axis=1), 1e-12)
    low, high = (float(x) for x in np.percentile(means, [2.5, 97.5]))
    sign = 1 if better == "higher" else -1
    if low > 0 or high < 0:  # the interval excludes zero
        verdict = "better" if sign * low > 0 else "worse"
    else:
        verdict = "no clear difference"
    diff = float((d * w).sum() / max(float(w.sum()), 1e-12))
    return {"diff": diff, "ci": [low, high], "n": len(d), "verdict": verdict}


def differences(per: dict[str, list[dict[str, Any]]], cfg: EvalConfig) -> dict[str, Any]:
    """Each paired metric's base -> fine-tuned difference over the prompts both have a value for."""
    out: dict[str, Any] = {}
    for key, (field_name, better, weight) in PAIRED.items():
        pairs = [
            (float(b[field_name]), float(f[field_name]), float(b[weight]) if weight else 1.0)
            for b, f in zip(per["base"], per["finetuned"], strict=True)
            if b.get(field_name) is not None and f.get(field_name) is not None
        ]
        if pairs:
            base, tuned, w = zip(*pairs, strict=True)
            out[key] = paired_difference(
                list(base), list(tuned), better, cfg.bootstrap, cfg.seed, list(w)
            )
    return out


# -- the judge (optional, costs money) -------------------------------------------------------------

JUDGE_PROMPT = """You grade a student's answer against a reference answer written by a stronger model.

Question:
{question}

Reference answer:
{reference}

Student answer:
{answer}

How well does the student's answer match the reference in correctness and content? Reply with one integer from 1 (wrong or unrelated) to 10 (as good as the reference), and nothing else."""


def run_judge(cfg: EvalConfig, prompts: list[Prompt], per: dict[str, list[dict[str, Any]]]) -> None:
    """Score every student answer 1-10 with an LLM through the teacher client; store it as 0-1."""
    import asyncio

    from pipeline.errors import PromptRejected
    from pipeline.ratelimit import retrying
    from pipeline.teacher import Teacher, TeacherConfig, chat_body, estimate_tokens

    tcfg = TeacherConfig(
        model=cfg.judge_model,
        api_key_env=cfg.judge_api_key_env,
        concurrency=cfg.judge_concurrency,
        **({"base_url": cfg.judge_base_url} if cfg.judge_base_url else {}),
    )

    async def grade(teacher: Teacher, p: Prompt, rec: dict[str, Any]) -> None:
        reference = teacher_text(p.teacher[0])[0]
        content = JUDGE_PROMPT.format(
            question=_question(p.messages), reference=reference, answer=rec["answer"]
        )
        messages = [{"role": "user", "content": content}]
        body = chat_body(tcfg, messages, {"temperature": 0}, max_tokens=8)
        try:
            async for attempt in retrying(tcfg.max_retries):
                with attempt:  # a slot per try: a 200 gives its slot back as its headers come
                    await teacher.limiter.acquire(estimate_tokens(messages) + 8)  # + max_tokens
                    try:
                        done = await teacher.complete(body)
                    finally:
                        await teacher.limiter.release()
        except PromptRejected:
            return
        m = re.search(r"\d+", done.choices[0].content)
        rec["judge"] = min(10, max(1, int(m.group()))) / 10 if m else None

    async def main() -> None:
        async with contextlib.aclosing(Teacher(tcfg)) as teacher:
            await asyncio.gather(
                *(
                    grade(teacher, p, recs[i])
                    for recs in per.values()
                    for i, p in enumerate(prompts)
                )
            )

    asyncio.run(main())


# -- the report ------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else spec.format(value)


def _diff(d: dict[str, Any] | None, spec: str) -> str:
    """'+5.0 pts [-2.1, +12.0]' for a share, '+0.012 [-0.010, +0.030]' otherwise; '–' for none."""
    if d is None:
        return "–"
    if "%" in spec:
        return "{:+.1f} pts [{:+.1f}, {:+.1f}]".format(*(100 * x for x in (d["diff"], *d["ci"])))
    return "{:+.3f} [{:+.3f}, {:+.3f}]".format(d["diff"], *d["ci"])


def _rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str, str, str]]:
    """(label, base, fine-tuned, teacher, better when, difference [95% CI], verdict) per metric."""
    m, diffs = report["metrics"], report.get("differences", {})
    rows = []
    for key, label, better, spec in METRICS:
        if m["base"].get(key) is None and m["finetuned"].get(key) is None:
            continue
        d = diffs.get(key)
        rows.append(
            (
                label,
                _fmt(m["base"][key], spec),
                _fmt(m["finetuned"][key], spec),
                _fmt(m["teacher"].get(key), spec),
                better,
                _diff(d, spec),
                d["verdict"] if d else "–",
            )
        )
    return rows


def _ci(ci: list[float] | None) -> str:
    return "–" if ci is None else f"[{100 * ci[0]:.1f}%, {100 * ci[1]:.1f}%]"


def labels(report: dict[str, Any]) -> dict[str, str]:
    """Column names: "base", or "against" when the fine-tuned student is compared to another."""
    return {**LABELS, **report.get("labels", {})}


def accuracy_intervals(report: dict[str, Any]) -> str:
    m, lab = report["metrics"], labels(report)
    return "accuracy 95% interval (Wilson): " + ", ".join(
        f"{lab[w]} {_ci(m[w].get('accuracy_ci'))}" for w in (*STUDENTS, "teacher")
    )


def headline(report: dict[str, Any]) -> str:
    """A compact table of the headline numbers, base vs fine-tuned (and the teacher where it
    applies), with each difference's 95% interval and what it means."""
    n, b = report["prompts"], labels(report)["base"]
    lines = [
        f"eval: {n} held-out prompts ({report['prompts_with_reference']} with a reference), "
        f"{'greedy' if report['config']['greedy'] else 'sampled'}, max_new_tokens {report['config']['max_new_tokens']}",
        f"eval set: {report['eval_set']}",
        f"{'metric':<38} {b:>9} {'fine-tuned':>11} {'teacher':>9}  {'fine-tuned - ' + b + ' [95% CI]':<30} verdict",
    ]
    for label, b, f, t, _, d, v in _rows(report):
        lines.append(f"{label:<38} {b:>9} {f:>11} {t:>9}  {d:<30} {v}")
    lines.append(accuracy_intervals(report))
    return "\n".join(lines)


def _question(messages: list[dict[str, Any]]) -> str:
    """The last user turn: what a prompt asks."""
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")


def _cell(text: str | None, limit: int = 400) -> str:
    text = "" if text is None else str(text)
    if len(text) > limit:
        text = text[:limit] + " …"
    return text.replace("\n", " ⏎ ").replace("|", "\\|") or "(empty)"


def write_markdown(report: dict[str, Any], path: Path, loss_plot: bool) -> None:
    cfg = report["config"]
    decoding = (
        "greedy" if cfg["greedy"] else f"temperature {cfg['temperature']}, top_p {cfg['top_p']}"
    )
    sp = report["system_prompts"]
    ver = report["verification"]
    lab = labels(report)
    b = lab["base"]
    against = report["students"].get("against")
    out = [
        "# distill eval report",
        "",
        f"- dataset: `{cfg['data']}` split `{cfg['split']}`: {report['prompts']} prompts, {report['prompts_with_reference']} with a reference, "
        f"{report['metrics']['teacher']['samples']} teacher answers",
        f"- eval set: {report['eval_set']}",
        f"- held out from training: {report['held_out_check']}",
        f"- base student: `{report['students']['base']}`",
        *([f"- against (in the base's column): `{against}`"] if against else []),
        f"- fine-tuned student: `{report['students']['finetuned']}` ({'LoRA adapter' if report['students']['adapter'] else 'merged model'})",
        f"- system prompt: the teacher saw {sp['teacher']}; the students saw {sp['students']}",
        f"- generation: {decoding}, max_new_tokens {cfg['max_new_tokens']}",
        f"- answers checked with verify: {ver['mode']} (rel_tol {ver['rel_tol']:g}, abs_tol {ver['abs_tol']:g}; from {ver['source']}), "
        "on final answers only: every `<think>` trace, the teacher's included, is cut off before any comparison",
        f"- took {report['seconds']:.1f} s on {report['device']}",
        "",
        "## Results",
        "",
        f"| metric | {b} | fine-tuned | teacher | better when | fine-tuned − {b} [95% CI] | verdict |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    out += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    out += [
        "",
        f"{accuracy_intervals(report)}. A difference's interval is a paired bootstrap over prompts "
        f'({cfg["bootstrap"]} resamples, seed {cfg["seed"]}); "better" or "worse" only when it excludes zero.',
    ]
    out += ["", f"![{b} vs fine-tuned](metrics.png)", ""]
    if loss_plot:
        out += ["## Training", "", "![loss curves](loss_curves.png)", ""]
    else:
        out += ["No loss curves: the fine-tuned student has no log_history.json next to it.", ""]
    out += [
        "Accuracy checks the final answer against the prompt's reference; \"final answer = teacher's\" compares the extracted "
        "final answers; ROUGE-L is word-level overlap with the teacher's text; NLL/perplexity is how likely each student finds "
        "the teacher's answers (the quantity fine-tuning minimises).",
        "",
        "## Examples",
        "",
    ]
    for ex in report["examples"][: cfg["examples"]]:
        out += [
            f"### {ex['prompt_id']}",
            "",
            "| | answer |",
            "|---|---|",
            f"| prompt | {_cell(_question(ex['messages']))} |",
        ]
        if ex["reference"] is not None:
            out.append(f"| reference | {_cell(ex['reference'])} |")
        out.append(f"| teacher (final answer) | {_cell(split_think(ex['teacher'][0])[0])} |")
        for s in STUDENTS:
            r = ex[s]
            mark = "" if r["correct"] is None else " ✓" if r["correct"] else " ✗"
            out.append(f"| {lab[s]} student{mark} | {_cell(r['answer'])} |")
        out.append("")
    path.write_text("\n".join(out), encoding="utf-8")


def check_held_out(cfg: EvalConfig, prompts: list[Prompt], students: Students) -> str:
    """Refuse to score a fine-tuned student (or the one it is compared against) on prompts it
    was trained on (train_report.json records the train prompt ids); returns what was checked,
    for the report."""
    runs = [(students.run, "student")]
    if students.against_run is not None:
        runs.append((students.against_run, "`against` student"))
    said = []
    for run, who in runs:
        trained = trained_prompt_ids(run.report)
        if trained is None:
            said.append(
                f"not checked: the {who}'s fine-tune run records no training prompt ids (trained "
                "before this check)"
            )
            continue
        shared = sorted(trained & {p.prompt_id for p in prompts})
        if shared:
            raise InputError(
                f"{cfg.data} [{cfg.split}]: {len(shared)} of its {len(prompts)} prompts (e.g. "
                f"{shared[0]!r}) are in the data {run.out} was trained on; evaluate on a split "
                "held out from that training data (the same build), or fine-tune on this build's train split"
            )
        said.append(
            f"none of the {len(prompts)} prompts is among the {len(trained)} the {who} was trained on"
        )
    return "; ".join(said)


def eval_set(cfg: EvalConfig) -> str:
    """What the eval prompts are, from the build's report: the teacher's accuracy means nothing
    when the build kept only the prompts it got right."""
    built = read_build_report(cfg.data)
    split, config = built.get("split") or {}, built.get("config") or {}
    if not built:
        return f"the `{cfg.split}` split (no build_report.json: how it was chosen is unknown)"
    what = "held-out prompts (by prompt id)" if cfg.split == "eval" else f"the `{cfg.split}` split"
    if not split.get("eval_filtered", True):
        return (
            f"all {what} the teacher answered, right or wrong (filter_eval: false): the teacher's "
            "accuracy is measured, not given"
        )
    if (config.get("filters") or {}).get("verify", True):
        return (
            f"only {what} whose teacher answer passed the build's filters, verification included "
            "(filter_eval: true, the build default): on prompts with a reference the teacher is "
            "100% correct by construction; build with filter_eval: false to measure it"
        )
    return f"{what} whose teacher answer passed the build's filters (verification off)"


def system_prompts(cfg: EvalConfig, prompts: list[Prompt]) -> dict[str, str]:
    """Which system prompt each side saw, and why."""
    config = read_build_report(cfg.data).get("config") or {}
    dataset_has = any(p.dataset_system for p in prompts)
    if config.get("drop_system"):
        teacher = "its harvest system prompt, which the dataset leaves out (drop_system: true)"
    else:
        teacher = "the dataset's system message" if dataset_has else "none in the dataset"
    if cfg.system_prompt is not None:
        student = f"{cfg.system_prompt!r} (system_prompt), not the dataset's"
    elif cfg.keep_system and dataset_has:
        student = "the dataset's system message, as in fine-tuning (keep_system: true)"
    elif dataset_has:
        student = "none: the dataset's system message is dropped (keep_system: false), unlike in fine-tuning"
    else:
        student = "none (the dataset has no system message; fine-tuning saw none either)"
    return {"teacher": teacher, "students": student}


def run_students(
    cfg: EvalConfig, prompts: list[Prompt], students: Students, device: str, ver: Verification
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Each student in turn (one in memory at a time): generate, NLL, score.
    Returns (metrics per student and for the teacher, per-prompt records per student)."""
    import gc

    import torch

    shared_stops = generation_stops(students)
    label = students.labels()
    metrics: dict[str, dict[str, Any]] = {}
    per: dict[str, list[dict[str, Any]]] = {}
    teacher: dict[str, Any] = {}
    for which in STUDENTS:
        model, tok = load_student(which, students, device, cfg.load_in_4bit)
        stops = set(stop_ids(model, tok)) | shared_stops
        answers = generate(model, tok, prompts, cfg, label[which], stops)
        nll = teacher_nll(model, tok, prompts, cfg, label[which], stops) if cfg.nll else None
        metrics[which], per[which] = score(prompts, answers, nll, cfg, ver)
        if cfg.nll:  # the split carries the teacher's top-k (build --tokenizer): KL beside NLL
            kl = heldout_teacher_kl(model, tok, prompts, cfg) or {}
            for p, rec in zip(prompts, per[which], strict=True):
                s, n = kl.get(p.prompt_id, (None, 0))
                rec["teacher_kl"] = None if s is None else s / n
                rec["teacher_kl_tokens"] = n
            tokens = sum(n for _, n in kl.values())
            metrics[which]["teacher_kl"] = (
                sum(s for s, _ in kl.values()) / tokens if tokens else None
            )
        if which == "base":
            teacher = teacher_metrics(prompts, tok, cfg, ver)
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    if cfg.judge:
        run_judge(cfg, prompts, per)
        for which in STUDENTS:
            metrics[which]["judge_score"] = _mean(
                [r["judge"] for r in per[which] if r.get("judge") is not None]
            )
    return {**metrics, "teacher": teacher}, per


def evaluate(cfg: EvalConfig) -> Path:
    """Generate with both students, score them, write the report; returns the out folder."""
    started = time.monotonic()
    check_config(cfg)
    ver = verification(cfg)
    claim(cfg.out, "eval")
    prompts = load_prompts(cfg)
    students = resolve_students(cfg)
    leak = check_held_out(cfg, prompts, students)
    device = pick_device(cfg)
    metrics, per = run_students(cfg, prompts, students, device, ver)

    examples = [
        {
            "prompt_id": p.prompt_id,
            "messages": p.messages,
            "reference": p.reference,
            "teacher": [t.get("content") or "" for t in p.teacher],
            **{s: per[s][i] for s in STUDENTS},
        }
        for i, p in enumerate(prompts)
    ]
    report: dict[str, Any] = {
        # Redacted as config.yaml is: judge_base_url may carry user:password.
        "config": json.loads(redact(cfg.model_dump_json())),
        "students": {
            "base": str(students.base),
            "finetuned": str(students.finetuned),
            "adapter": students.adapter,
            "against": None if students.against is None else str(students.against),
        },
        "labels": students.labels(),
        "device": device,
        "seconds": time.monotonic() - started,
        "prompts": len(prompts),
        "prompts_with_reference": sum(p.reference is not None for p in prompts),
        "eval_set": eval_set(cfg),
        "held_out_check": leak,
        "system_prompts": system_prompts(cfg, prompts),
        "verification": dataclasses.asdict(ver),
        "metrics": metrics,
        "differences": differences(per, cfg),
        "examples": examples,
    }
    write_report(report, cfg, students, cfg.out)
    return cfg.out


def write_report(report: dict[str, Any], cfg: EvalConfig, students: Students, out: Path) -> None:
    """report.json, report.md, config.yaml and the plots, in `out`."""
    from pipeline.plots import plot_loss_curves, plot_metrics

    # Claimed at the start; if the folder went meanwhile, the answers must still be written.
    out.mkdir(parents=True, exist_ok=True)
    history = students.run.out / "log_history.json" if students.run.out else None
    # plot_loss_curves says False for a file that is missing or unreadable, as for one with no loss
    loss_plot = history is not None and plot_loss_curves(history, out / "loss_curves.png")
    if not loss_plot:  # never leave an earlier run's curves next to this report
        (out / "loss_curves.png").unlink(missing_ok=True)
    plot_metrics(report, out / "metrics.png")
    (out / "report.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    write_markdown(report, out / "report.md", loss_plot)


def read_report(out: Path) -> dict[str, Any]:
    """The report.json an earlier `evaluate` wrote to `out`."""
    return json.loads((Path(out) / "report.json").read_text(encoding="utf-8"))
