"""Evaluate: the base student and the fine-tuned student, side by side, on held-out prompts.

    distill eval --data data/datasets/demo --finetuned data/finetune/demo --out data/eval/demo

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

import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipeline.artifacts import read_dataset, read_finetune_run
from pipeline.config import StageConfig, dump_config
from pipeline.errors import ConfigError, InputError
from pipeline.reasoning import final_answer


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
        description="Regexes that extract the final answer (first group, else the match), as in `distill build`; default: verify.py's.",
    )
    format_regex: str | None = Field(
        None,
        description="The declared answer format: an answer complies when re.search(format_regex, answer) matches.",
    )
    system_prompt: str | None = Field(
        None, description="System prompt the students see at eval (default: none)."
    )
    keep_system: bool = Field(
        False,
        description="Keep the dataset's system message for the students (default: drop it, context distillation).",
    )
    nll: bool = Field(
        True,
        description="Compute the NLL / perplexity of the teacher's answers under each student.",
    )
    examples: int = Field(5, ge=0, description="Side-by-side examples shown in report.md.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Where the students run (auto: CUDA when visible, else CPU)."
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


def check_config(cfg: EvalConfig) -> None:
    """Refuse a bad regex or an incomplete judge before loading anything, naming the key."""
    if cfg.judge and not cfg.judge_model:
        raise ConfigError(
            "judge is on but no judge_model is set; set judge_model (--judge-model) or turn judge off"
        )
    for key, patterns in (
        ("format_regex", [cfg.format_regex]),
        ("answer_patterns", cfg.answer_patterns or []),
    ):
        for p in patterns:
            if p is None:
                continue
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
    path = Path(cfg.data)
    rows = read_dataset(path, cfg.split)[cfg.split]
    has = set(rows.column_names)
    by_id: dict[str, Prompt] = {}
    for i, row in enumerate(rows):
        msgs = [{k: v for k, v in m.items() if v is not None} for m in row["messages"]]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise InputError(
                f"{path} [{cfg.split}] row {i}: `messages` must end with the teacher's assistant turn"
            )
        pid = str(row["prompt_id"]) if "prompt_id" in has else str(i)
        if pid not in by_id:
            if cfg.limit is not None and len(by_id) >= cfg.limit:
                continue
            by_id[pid] = Prompt(pid, student_messages(msgs[:-1], cfg))
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
    run_dir: Path | None  # the fine-tune OUT folder, when known (for log_history.json)


RUN_FILES = ("train_report.json", "log_history.json")  # what a fine-tune run folder holds


def _is_model(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve_students(cfg: EvalConfig) -> Students:
    """Tell a fine-tune run (or its adapter folder) from a merged model folder; find the base."""
    ft = Path(cfg.finetuned)
    if not ft.exists():
        raise InputError(
            f"{ft}: fine-tuned student not found (key `finetuned`); pass the OUT folder of `distill finetune`"
        )
    if (ft / "adapter" / "adapter_config.json").is_file() or (ft / "adapter_config.json").is_file():
        run = read_finetune_run(ft, str(cfg.base) if cfg.base else None)
        where = "key `base`" if cfg.base else f"the fine-tune run {run.out}"
        return _checked(Students(Path(run.student), run.adapter, True, run.out), where)
    if not _is_model(ft):
        raise InputError(
            f"{ft}: neither a fine-tune OUT folder (adapter/), a PEFT adapter (adapter_config.json) "
            "nor a model folder (config.json); fix the key `finetuned`"
        )
    # A merged model: the run it came from (base student, loss curves) is its folder or the parent.
    run_dir = next((d for d in (ft, ft.parent) if any((d / f).is_file() for f in RUN_FILES)), None)
    base, where = cfg.base, "key `base`"
    if base is None and run_dir is not None:
        try:
            student = json.loads((run_dir / "train_report.json").read_text(encoding="utf-8"))
            student = student.get("student")
        except (OSError, ValueError, AttributeError):
            student = None
        if student:
            base, where = Path(student), f"`student` in {run_dir / 'train_report.json'}"
    if base is None:
        raise ConfigError(
            f"{ft}: cannot tell the base student; set `base` (--base) to its local model folder"
        )
    return _checked(Students(Path(base), ft, False, run_dir), where)


def _checked(students: Students, where: str) -> Students:
    if not _is_model(students.base):
        raise InputError(
            f"{students.base} (from {where}): not a local model folder (no config.json); set `base` (--base) to one"
        )
    return students


# -- the students ----------------------------------------------------------------------------------


def pick_device(cfg: EvalConfig) -> str:
    import torch

    if cfg.device != "auto":
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_student(which: str, students: Students, device: str):  # type: ignore[no-untyped-def]
    """(model, tokenizer) in eval mode; an adapter is merged into its base for speed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar per phase is ours; no "Loading weights"
    # bf16 where the GPU has it; fp32 elsewhere (CPU half precision is slow, fp16 can overflow).
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    path = students.base if which == "base" or students.adapter else students.finetuned
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    tok_path = path
    if which == "finetuned" and students.adapter:
        from peft import PeftModel

        with warnings.catch_warnings():  # peft trips a transformers deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, str(students.finetuned)).merge_and_unload()
        # The fine-tune stage saves its tokenizer (and chat template) next to the adapter.
        if (students.finetuned / "tokenizer_config.json").is_file():
            tok_path = students.finetuned
    tok = AutoTokenizer.from_pretrained(str(tok_path), local_files_only=True)
    if tok.chat_template is None:
        raise InputError(
            f"{tok_path}: the tokenizer has no chat template; eval needs a chat (instruct) model"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, tok


def stop_ids(students: Students) -> set[int]:
    """End-of-answer ids from both students' generation configs, so both stop at the same tokens.

    The fine-tune stage adds the template's end-of-turn token to the adapter's generation config
    when the base's lacks it; without the union the base would be scored as "never stops" for a
    config quirk rather than for what its weights do.
    """
    out: set[int] = set()
    for folder in (students.base, students.finetuned):
        try:
            ids = json.loads((folder / "generation_config.json").read_text(encoding="utf-8")).get(
                "eos_token_id"
            )
        except (OSError, ValueError):
            continue
        out.update(i for i in (ids if isinstance(ids, list) else [ids]) if isinstance(i, int))
    return out


def eos_ids(model, tok, extra: set[int]) -> set[int]:  # type: ignore[no-untyped-def]
    """Every token id that ends an answer (the generation config may list several)."""
    ids = model.generation_config.eos_token_id
    out = set(ids if isinstance(ids, list) else [ids] if ids is not None else []) | extra
    if tok.eos_token_id is not None:
        out.add(tok.eos_token_id)
    return out


def render(tok, messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:  # type: ignore[no-untyped-def]
    text = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    # The template already writes any BOS it wants; don't let the tokenizer add a second one.
    return list(tok(text, add_special_tokens=False)["input_ids"])


@dataclass
class Answer:
    text: str
    tokens: int
    hit_max: bool


def _progress(label: str):  # type: ignore[no-untyped-def]
    """A progress bar on stderr that disappears when done."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    return bar


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
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding: every prompt ends where generation starts
                ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]) :] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen
            )
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                end = next((k for k, t in enumerate(new) if t in stops), None)
                kept = new if end is None else new[:end]
                text = tok.decode(kept, skip_special_tokens=True)
                # Score the answer, not a <think> trace before it.
                answers[i] = Answer(
                    final_answer(text), len(kept), end is None and len(new) >= cfg.max_new_tokens
                )
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
            width = max(len(ids) for _, ids, _ in batch)
            ids_t = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            # Left padding: every answer ends at the right edge, where the kept logits are.
            for row, (_, ids, _) in enumerate(batch):
                ids_t[row, width - len(ids) :] = torch.tensor(ids)
                mask[row, width - len(ids) :] = 1
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


def heldout_teacher_kl(model, tok, prompts: list[Prompt], cfg: EvalConfig) -> float | None:  # type: ignore[no-untyped-def]
    """Mean per-token KL(teacher top-k + tail || student) over the split's teacher answers, on the
    rows as `distill finetune` renders them (the positions the targets were aligned to); None when
    the split has no kd_targets or this student's tokens differ from those aligned to."""
    import torch

    from pipeline import kd
    from pipeline.finetune import (
        prepare_messages,
        renders_reasoning,
        tokenize_row,
        training_template,
    )

    rows = read_dataset(cfg.data, cfg.split)[cfg.split]
    if not set(kd.KD_COLUMNS) <= set(rows.column_names):
        return None
    keep = {p.prompt_id for p in prompts}
    rows = rows.filter(lambda ex: str(ex["prompt_id"]) in keep)
    template, how = training_template(tok)
    native = renders_reasoning(tok, template)
    tokenized = [
        tokenize_row(tok, template, how, *prepare_messages(ex["messages"], native)) for ex in rows
    ]
    try:
        table = kd.attach_targets(
            tokenized, rows.select_columns(list(kd.KD_COLUMNS)), rows["prompt_id"], "-"
        )
    except InputError:  # another tokenizer or template than the targets': no comparable KL
        return None
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(tokenized), cfg.batch_size):
            batch = tokenized[start : start + cfg.batch_size]
            width = max(len(r["input_ids"]) for r in batch)

            def padded(key: str, fill: int) -> torch.Tensor:
                return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in batch])  # noqa: B023

            ids, labels, index = (
                padded("input_ids", 0),
                padded("labels", -100),
                padded("kd_index", -1),
            )
            lengths = torch.tensor([[len(r["input_ids"])] for r in batch])
            mask = torch.arange(width) < lengths  # right padding, masked out
            logits = model(input_ids=ids.to(device), attention_mask=mask.long().to(device)).logits
            s, n = kd.teacher_kl(logits.float(), *table.gather(index.to(device), labels.to(device)))
            total, count = total + s, count + n
    return total / count if count else None


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


def score(
    prompts: list[Prompt],
    answers: list[Answer],
    nll: list[tuple[float, int]] | None,
    cfg: EvalConfig,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary metrics, one record per prompt) for one student."""
    from pipeline.verify import answers_match, extract_answer, verify

    patterns = cfg.answer_patterns
    per: list[dict[str, Any]] = []
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        pred = extract_answer(a.text, patterns)
        teacher_final = [extract_answer(t.get("content") or "", patterns) for t in p.teacher]
        known = [t for t in teacher_final if t is not None]
        rec: dict[str, Any] = {
            "answer": a.text,
            "extracted": pred,
            "tokens": a.tokens,
            "hit_max_tokens": a.hit_max,
            "correct": verify(a.text, p.reference, patterns) if p.reference is not None else None,
            # Share of the teacher's samples whose final answer this one matches.
            "teacher_match": (
                sum(pred is not None and answers_match(pred, t) for t in known) / len(known)
            )
            if known
            else None,
            "rouge_l": sum(rouge_l(a.text, t.get("content") or "") for t in p.teacher)
            / len(p.teacher),
            "format_ok": bool(re.search(cfg.format_regex, a.text)) if cfg.format_regex else None,
            "nll": None,
            "nll_tokens": 0,
        }
        if nll is not None and nll[i][1] > 0:
            rec["nll"] = nll[i][0] / nll[i][1]
            rec["nll_tokens"] = nll[i][1]
        per.append(rec)

    def share(key: str) -> float | None:
        return _mean([float(r[key]) for r in per if r[key] is not None])

    total_tokens = sum(n for _, n in nll) if nll is not None else 0
    mean_nll = sum(s for s, _ in nll) / total_tokens if nll is not None and total_tokens else None
    metrics = {
        "accuracy": share("correct"),
        "n_reference": sum(r["correct"] is not None for r in per),
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
    }
    return metrics, per


def teacher_metrics(prompts: list[Prompt], tok, cfg: EvalConfig) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The same scores for the teacher's own answers: the ceiling the students are chasing."""
    from pipeline.verify import verify

    answers = [(p, t.get("content") or "") for p in prompts for t in p.teacher]
    return {
        "accuracy": _mean(
            [
                float(verify(a, p.reference, cfg.answer_patterns))
                for p, a in answers
                if p.reference is not None
            ]
        ),
        "format_compliance": _mean(
            [float(bool(re.search(cfg.format_regex, a))) for _, a in answers]
        )
        if cfg.format_regex
        else None,
        # In the base student's tokens, so the lengths compare.
        "answer_tokens": _mean(
            [float(len(tok(a, add_special_tokens=False)["input_ids"])) for _, a in answers]
        ),
        "samples": len(answers),
    }


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
    from pipeline.teacher import Teacher, TeacherConfig, chat_body

    tcfg = TeacherConfig(
        model=cfg.judge_model,
        api_key_env=cfg.judge_api_key_env,
        concurrency=cfg.judge_concurrency,
        **({"base_url": cfg.judge_base_url} if cfg.judge_base_url else {}),
    )

    async def grade(teacher: Teacher, p: Prompt, rec: dict[str, Any]) -> None:
        question = next((m["content"] for m in reversed(p.messages) if m.get("role") == "user"), "")
        content = JUDGE_PROMPT.format(
            question=question, reference=p.teacher[0].get("content") or "", answer=rec["answer"]
        )
        messages = [{"role": "user", "content": content}]
        body = chat_body(tcfg, messages, {"temperature": 0}, max_tokens=8)
        await teacher.limiter.acquire(len(content) / 4 + 8)
        try:
            async for attempt in retrying(tcfg.max_retries):
                with attempt:
                    done = await teacher.complete(body)
        except PromptRejected:
            return
        finally:
            await teacher.limiter.release()
        m = re.search(r"\d+", done.choices[0].content)
        rec["judge"] = min(10, max(1, int(m.group()))) / 10 if m else None

    async def main() -> None:
        teacher = Teacher(tcfg)
        try:
            await asyncio.gather(
                *(
                    grade(teacher, p, recs[i])
                    for recs in per.values()
                    for i, p in enumerate(prompts)
                )
            )
        finally:
            await teacher.aclose()

    asyncio.run(main())


# -- the report ------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else spec.format(value)


def headline(report: dict[str, Any]) -> str:
    """A compact table of the headline numbers, base vs fine-tuned (and the teacher where it applies)."""
    m = report["metrics"]
    n = report["prompts"]
    lines = [
        f"eval: {n} held-out prompts ({report['prompts_with_reference']} with a reference), "
        f"{'greedy' if report['config']['greedy'] else 'sampled'}, max_new_tokens {report['config']['max_new_tokens']}",
        f"{'metric':<38} {'base':>9} {'fine-tuned':>11} {'teacher':>9}   better",
    ]
    for key, label, better, spec in METRICS:
        if m["base"].get(key) is None and m["finetuned"].get(key) is None:
            continue
        lines.append(
            f"{label:<38} {_fmt(m['base'][key], spec):>9} {_fmt(m['finetuned'][key], spec):>11} "
            f"{_fmt(m['teacher'].get(key), spec):>9}   {better}"
        )
    return "\n".join(lines)


def _cell(text: str | None, limit: int = 400) -> str:
    text = "" if text is None else str(text)
    if len(text) > limit:
        text = text[:limit] + " …"
    return text.replace("\n", " ⏎ ").replace("|", "\\|") or "(empty)"


def write_markdown(report: dict[str, Any], path: Path, loss_plot: bool) -> None:
    m = report["metrics"]
    cfg = report["config"]
    decoding = (
        "greedy" if cfg["greedy"] else f"temperature {cfg['temperature']}, top_p {cfg['top_p']}"
    )
    system = (
        repr(cfg["system_prompt"])
        if cfg["system_prompt"]
        else "the dataset's"
        if cfg["keep_system"]
        else "none"
    )
    out = [
        "# distill eval report",
        "",
        f"- dataset: `{cfg['data']}` split `{cfg['split']}`: {report['prompts']} prompts, {report['prompts_with_reference']} with a reference, "
        f"{m['teacher']['samples']} teacher answers",
        f"- base student: `{report['students']['base']}`",
        f"- fine-tuned student: `{report['students']['finetuned']}` ({'LoRA adapter' if report['students']['adapter'] else 'merged model'})",
        f"- generation: {decoding}, max_new_tokens {cfg['max_new_tokens']}, system prompt: {system}",
        f"- took {report['seconds']:.1f} s on {report['device']}",
        "",
        "## Results",
        "",
        "| metric | base | fine-tuned | teacher | better |",
        "|---|---:|---:|---:|---|",
    ]
    for key, label, better, spec in METRICS:
        if m["base"].get(key) is None and m["finetuned"].get(key) is None:
            continue
        out.append(
            f"| {label} | {_fmt(m['base'][key], spec)} | {_fmt(m['finetuned'][key], spec)} | {_fmt(m['teacher'].get(key), spec)} | {better} |"
        )
    out += ["", "![base vs fine-tuned](metrics.png)", ""]
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
        question = next(
            (mm["content"] for mm in reversed(ex["messages"]) if mm.get("role") == "user"), ""
        )
        out += [
            f"### {ex['prompt_id']}",
            "",
            "| | answer |",
            "|---|---|",
            f"| prompt | {_cell(question)} |",
        ]
        if ex["reference"] is not None:
            out.append(f"| reference | {_cell(ex['reference'])} |")
        out.append(f"| teacher | {_cell(ex['teacher'][0])} |")
        for s in STUDENTS:
            r = ex[s]
            mark = "" if r["correct"] is None else " ✓" if r["correct"] else " ✗"
            out.append(f"| {LABELS[s]} student{mark} | {_cell(r['answer'])} |")
        out.append("")
    path.write_text("\n".join(out), encoding="utf-8")


def run_students(
    cfg: EvalConfig, prompts: list[Prompt], students: Students, device: str
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Each student in turn (one in memory at a time): generate, NLL, score.
    Returns (metrics per student and for the teacher, per-prompt records per student)."""
    import gc

    import torch

    shared_stops = stop_ids(students)
    metrics: dict[str, dict[str, Any]] = {}
    per: dict[str, list[dict[str, Any]]] = {}
    teacher: dict[str, Any] = {}
    for which in STUDENTS:
        model, tok = load_student(which, students, device)
        stops = eos_ids(model, tok, shared_stops)
        answers = generate(model, tok, prompts, cfg, LABELS[which], stops)
        nll = teacher_nll(model, tok, prompts, cfg, LABELS[which], stops) if cfg.nll else None
        metrics[which], per[which] = score(prompts, answers, nll, cfg)
        if cfg.nll:  # the split carries the teacher's top-k (build --tokenizer): KL beside NLL
            metrics[which]["teacher_kl"] = heldout_teacher_kl(model, tok, prompts, cfg)
        if which == "base":
            teacher = teacher_metrics(prompts, tok, cfg)
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
    prompts = load_prompts(cfg)
    students = resolve_students(cfg)
    device = pick_device(cfg)
    metrics, per = run_students(cfg, prompts, students, device)

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
        "config": cfg.model_dump(mode="json"),
        "students": {
            "base": str(students.base),
            "finetuned": str(students.finetuned),
            "adapter": students.adapter,
        },
        "device": device,
        "seconds": time.monotonic() - started,
        "prompts": len(prompts),
        "prompts_with_reference": sum(p.reference is not None for p in prompts),
        "metrics": metrics,
        "examples": examples,
    }
    out = Path(cfg.out)
    write_report(report, cfg, students, out)
    return out


def write_report(report: dict[str, Any], cfg: EvalConfig, students: Students, out: Path) -> None:
    """report.json, report.md, config.yaml and the plots, in `out`."""
    from pipeline.plots import plot_loss_curves, plot_metrics

    out.mkdir(parents=True, exist_ok=True)
    history = students.run_dir / "log_history.json" if students.run_dir else None
    loss_plot = (
        history is not None
        and history.is_file()
        and plot_loss_curves(history, out / "loss_curves.png")
    )
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
