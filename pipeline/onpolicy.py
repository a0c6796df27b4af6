"""On-policy distillation: the student samples, the teacher scores every token it sampled, and the
student learns from the per-token reverse KL, through any endpoint that can score a given text.

    distill onpolicy --prompts prompts/demo/train.jsonl --student data/models/SmolLM2-135M-Instruct \
        --base-url http://127.0.0.1:8000/v1 --model teacher --out data/demo/onpolicy --steps 40

SFT trains the student on the teacher's text, which is not what the student will say. Here the
student writes (HF `generate`), the teacher returns log p_teacher of each of the student's own
tokens (token-id prompts, so nothing is re-tokenized), and the loss is the reverse KL
log p_student(x) - log p_teacher(x) on the sampled tokens x, used as a per-token advantage in a
policy-gradient step (Thinking Machines' "On-Policy Distillation", Oct 2025; TRL's experimental
server_distillation trainer). With `kd_alpha` > 0 and a vLLM teacher, the teacher's top-k at each
position adds a forward-KL term (pipeline/kd.py's `topk_kd_loss`); `reverse_kl: 0` leaves that term
alone (GKD's on-policy forward KL, Agarwal et al. 2024). `teacher_temperature` below 1 sharpens
the teacher's top-k before either term: toward 0 the target at each of the student's own
prefixes is the teacher's greedy next token (DAgger's expert label), which is what a student
judged by its greedy answers needs when the teacher's own distribution is flat; the demo's task is
such a case (docs in README, "On-policy distillation").

Reading top to bottom: the config; `onpolicy()`: the prompts, the probe (which scoring protocol:
vLLM `prompt_logprobs` or `echo` + `logprobs`; an endpoint that cannot score is refused), the
tokenizer check, the student with its LoRA adapter (or the last checkpoint), then per step the
rollouts (stored ones reused, the rest sampled, scored and committed), the loss and the update;
checkpoints; the report.

The guarantees of the harvest carry over: every scoring request goes through the teacher's
limiter and the one retry policy (ratelimit.py), and the cost cap; every rollout (prompt, student
tokens, teacher scores, cost) is committed to OUT/store.sqlite (table `rollouts`, migration 3)
before a step uses it. A run killed at any point resumes from its last checkpoint; the steps after
it reuse their stored rollouts (sampled from the same adapter), so nothing scored is paid twice.

OUT is a normal fine-tune run (`distill eval --finetuned OUT`, `distill merge` read it):

    adapter/            the LoRA adapter + tokenizer
    train_report.json   student, steps, reverse KL per step, held-out reverse KL, spend
    reverse_kl.png      reverse KL per step (train rollouts, held-out prompts)
    config.yaml         the config used (no secrets);  onpolicy.log  one line per step
    store.sqlite        every scored rollout;  probe.json  what the teacher can do
    checkpoint/         adapter + optimizer + per-step history of the last checkpoint
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.artifacts import read_dataset, student_path
from pipeline.chat import render, stop_ids
from pipeline.config import dump_config
from pipeline.errors import (
    EXIT_OK,
    EXIT_PARTIAL,
    ConfigError,
    InputError,
    PromptRejected,
    TeacherError,
)
from pipeline.hardware import lora_config
from pipeline.prompts import PromptRow, load_prompts, read_text_arg
from pipeline.ratelimit import retrying
from pipeline.record import content_hash, utcnow
from pipeline.store import Store, open_run
from pipeline.teacher import (
    Scores,
    Teacher,
    TeacherConfig,
    cost,
    parse_scores,
    post_score,
    score_body,
)

log = logging.getLogger("distill.onpolicy")

CHECK_TEXT = "The capital of France is Paris. 12 + 7 = 19."  # scored once: same tokenizer?


class OnpolicyConfig(TeacherConfig):
    """`onpolicy:` section. The teacher fields (base_url, model, api_key_env, rpm, prices, ...)
    sit at the top level, as in `harvest:`."""

    prompts: list[Path] = Field(
        default_factory=list,
        description="Prompt files the student answers (.jsonl/.json/.csv/.parquet/.txt); or use data.",
    )
    data: str | None = Field(
        None,
        description="A dataset built by `distill build`: its train split's prompts (the answers are ignored).",
    )
    student: str | None = Field(
        None, description="Student model folder (must share the teacher's tokenizer)."
    )
    out: Path = Field(
        Path("data/runs/onpolicy"),
        description="Run folder: adapter/, train_report.json, store.sqlite (rollouts), checkpoint/.",
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N unique prompts.")
    teacher_system_prompt: str | None = Field(
        None,
        description="Context only the teacher sees (context distillation): a system message put before the student's prompt when scoring.",
    )
    teacher_system_prompt_file: Path | None = Field(
        None, description="File whose text is teacher_system_prompt (overrides it)."
    )
    eval_prompts: int = Field(
        4,
        ge=0,
        description="The last N prompts are held out: never trained on, their reverse KL measured at step 0, every eval_every steps and at the end.",
    )
    eval_every: int = Field(10, ge=1, description="Measure held-out reverse KL every N steps.")
    steps: int = Field(20, ge=1, description="Optimizer steps (one batch of fresh rollouts each).")
    prompts_per_step: int = Field(4, ge=1, description="Prompts sampled per step.")
    samples: int = Field(2, ge=1, le=64, description="Student samples per prompt per step.")
    max_new_tokens: int = Field(
        128, ge=1, description="Most tokens the student samples per answer."
    )
    temperature: float = Field(
        1.0, gt=0, le=2, description="Student sampling temperature (1: its own distribution)."
    )
    lr: float = Field(1e-4, gt=0, description="Learning rate (AdamW, constant).")
    lora_r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(32, gt=0, description="LoRA alpha (the update is scaled by alpha/r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: str | list[str] = Field(
        "all-linear", description="Modules that get adapters: 'all-linear' or a list of names."
    )
    top_k: int = Field(
        0,
        ge=0,
        le=20,
        description="Teacher's top-k per token to store (prompt_logprobs protocol only); needed for kd_alpha.",
    )
    kd_alpha: float = Field(
        0.0,
        ge=0,
        description="Weight of the top-k forward-KL term added to the reverse-KL loss (0: reverse KL only).",
    )
    reverse_kl: float = Field(
        1.0,
        ge=0,
        description="Weight of the per-token reverse-KL (policy-gradient) term; 0 with kd_alpha > 0 leaves only the top-k forward KL on the student's own samples (GKD's on-policy forward KL).",
    )
    teacher_temperature: float = Field(
        1.0,
        gt=0,
        le=2,
        description="Distil toward the teacher's distribution at this temperature, renormalized over its top-k (needs top_k > 0): below 1 sharpens it toward the teacher's greedy answer (what a harvest at temperature 0 trains on), 1 takes it as it is.",
    )
    max_cost: float | None = Field(
        None,
        ge=0,
        description="Stop before scoring spend (USD, at the teacher's prices) would pass this; exit 3, rerun continues.",
    )
    save_steps: int = Field(5, ge=1, description="Checkpoint every N steps (and at the end).")
    seed: int = Field(42, description="Seed for prompt order, sampling and adapter init.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the student runs; auto: CUDA when a GPU is visible."
    )
    progress_every: float = Field(
        10.0, gt=0, description="Seconds between progress lines (one per step at most)."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the student (only for students you trust)."
    )

    @model_validator(mode="after")
    def _check(self) -> OnpolicyConfig:
        if self.reverse_kl == 0 and self.kd_alpha == 0:
            raise ValueError(
                "reverse_kl 0 and kd_alpha 0 leave nothing to learn from: set one above 0"
            )
        if self.top_k == 0 and top_k_users(self):
            raise ValueError(
                f"{' and '.join(top_k_users(self))}: these read the teacher's top-k; set "
                "top_k > 0 (with a teacher that returns prompt_logprobs)"
            )
        return self


def top_k_users(cfg: OnpolicyConfig) -> list[str]:
    """The settings that read the teacher's top-k, as "name value"."""
    used = (("kd_alpha", cfg.kd_alpha > 0), ("teacher_temperature", cfg.teacher_temperature != 1))
    return [f"{name} {getattr(cfg, name)}" for name, on in used if on]


@dataclass
class Summary:
    """What a run did; `line()` is its last line on stderr."""

    out: Path
    steps_done: int = 0
    steps: int = 0
    scored: int = 0  # rollouts scored (paid for) by this invocation
    reused: int = 0  # rollouts read back from the store
    teacher_tokens: int = 0  # tokens scored over the whole run
    spend: float = 0.0
    stopped: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_PARTIAL if self.stopped else EXIT_OK

    def line(self) -> str:
        last = next((h["reverse_kl"] for h in reversed(self.history) if "reverse_kl" in h), None)
        rkl = f", reverse KL {last:.3f}" if last is not None else ""
        end = f"; stopped: {self.stopped} (rerun to continue)" if self.stopped else ""
        return (
            f"onpolicy: {self.steps_done}/{self.steps} steps{rkl}, {self.scored} rollouts scored "
            f"({self.reused} reused), {self.teacher_tokens} teacher tokens, ${self.spend:.4f}; "
            f"adapter in {self.out / 'adapter'}{end}"
        )


class CostCap(Exception):
    """Scoring one more rollout would pass max_cost."""


# -- inputs --------------------------------------------------------------------------------------


def load_rows(cfg: OnpolicyConfig) -> list[PromptRow]:
    """The prompts: files, or a built dataset's train split (its last assistant turn dropped)."""
    if cfg.data and not cfg.prompts:
        split = read_dataset(cfg.data)["train"]
        rows, seen = [], set()
        for i, r in enumerate(split):
            msgs = list(r["messages"])
            while msgs and msgs[-1]["role"] == "assistant":
                msgs.pop()
            msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
            pid = str(r.get("prompt_id") or i)
            if msgs and pid not in seen:
                seen.add(pid)
                rows.append(PromptRow(id=pid, messages=msgs, source=f"{cfg.data}[train][{i}]"))
        return rows[: cfg.limit]
    return load_prompts(cfg.prompts, limit=cfg.limit)[0]


def teacher_messages(messages: list[dict[str, Any]], context: str | None) -> list[dict[str, Any]]:
    """The prompt as the teacher sees it: the teacher-only context as (or before) the system
    message."""
    if not context:
        return messages
    if messages and messages[0]["role"] == "system":
        first = {"role": "system", "content": f"{context}\n\n{messages[0]['content']}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": context}, *messages]


# -- the teacher ---------------------------------------------------------------------------------


def require_scoring(cfg: OnpolicyConfig) -> str:
    """The scoring protocol from the probe (a fresh probe.json in OUT, else probe now); an
    endpoint that cannot score a given text is refused with what to do instead."""
    from pipeline.probe import probe, read_probe, write_probe

    result = read_probe(cfg.out, base_url=cfg.base_url, model=cfg.model)
    if result is None:
        assert cfg.model is not None
        teacher = TeacherConfig(**{k: getattr(cfg, k) for k in TeacherConfig.model_fields})
        result = probe(
            cfg.base_url, cfg.model, cfg.api_key_env, teacher=teacher, timeout=min(cfg.timeout, 60)
        )
        write_probe(cfg.out, result)
    if result.scoring is None:
        raise TeacherError(
            f"{cfg.base_url} (model {cfg.model!r}) cannot score a given text (no prompt_logprobs, "
            "no echo + logprobs on /v1/completions; OpenAI, DeepSeek and `transformers serve` "
            "cannot): on-policy distillation needs vLLM, SGLang or Together; with this teacher, "
            "harvest with --logprobs and train with `distill finetune --loss kd` instead"
        )
    if top_k_users(cfg) and result.scoring != "prompt_logprobs":
        raise ConfigError(
            f"{' and '.join(top_k_users(cfg))}: these read the teacher's top-k, which only a "
            f"teacher returning prompt_logprobs gives (this one scores with {result.scoring}); "
            "leave them at their defaults with this teacher"
        )
    return result.scoring


async def score(
    teacher: Teacher, ids: list[int], protocol: str, top_k: int, budget: Budget
) -> tuple[Scores, int]:
    """Score one token sequence through the limiter, the retry policy and the cost cap.
    Returns (scores, attempts)."""
    body = score_body(teacher.cfg, ids, protocol, top_k)
    worst = cost(teacher.cfg, len(ids), 1)
    budget.reserve(worst)
    try:
        async for attempt in retrying(teacher.cfg.max_retries):
            with attempt:
                await teacher.limiter.acquire(len(ids) + 1)
                try:
                    data = await post_score(teacher, body)
                finally:
                    await teacher.limiter.release()
                return parse_scores(data, protocol, ids), attempt.retry_state.attempt_number
    except PromptRejected as e:
        raise TeacherError(
            f"{e}; the teacher refused a scoring request (token ids out of its vocabulary, or "
            "longer than its context?): check that teacher and student share a tokenizer"
        ) from None
    finally:
        budget.release(worst)
    raise AssertionError("unreachable")


@dataclass
class Budget:
    """Spend so far (from the store) plus requests in flight, against max_cost."""

    spent: float
    cap: float | None
    pending: float = 0.0

    def reserve(self, worst: float) -> None:
        if self.cap is not None and self.spent + self.pending + worst > self.cap:
            raise CostCap(f"max_cost ${self.cap:g} reached (spent ${self.spent:.4f})")
        self.pending += worst

    def release(self, worst: float) -> None:
        self.pending -= worst


async def same_tokenizer(cfg: OnpolicyConfig, tokenizer: Any, protocol: str) -> None:
    """Score CHECK_TEXT as the student's token ids (one request of a few tokens, on a client of
    its own, not in the spend); the teacher must decode each id to the same text as the student
    does, else the two tokenizers differ and the scores would be nonsense."""
    ids = list(tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"])
    teacher = Teacher(cfg)
    try:
        scores, _ = await score(teacher, ids, protocol, 0, Budget(spent=0.0, cap=None))
    except TeacherError as e:
        if "re-tokenized" in str(e) or "refused a scoring request" in str(e):
            raise ConfigError(
                f"the teacher at {cfg.base_url} does not take the student's token ids "
                f"({str(e)[:120]}): teacher and student must share a tokenizer"
            ) from None
        raise
    finally:
        await teacher.aclose()
    ours = [tokenizer.decode([i]) for i in ids]
    for pos, (mine, theirs) in enumerate(zip(ours, scores.tokens)):
        if pos == 0 and not theirs:
            continue  # prompt_logprobs has no row (and no text) for the first token
        if mine != theirs:
            raise ConfigError(
                f"the teacher {cfg.model!r} at {cfg.base_url} does not share the "
                f"student's tokenizer (token {pos} of a probe text: student {mine!r}, teacher "
                f"{theirs!r}); on-policy distillation needs the same tokenizer family: pick a "
                "student of the teacher's family, or harvest and use `distill finetune` instead"
            )


# -- the student ---------------------------------------------------------------------------------


@dataclass
class Student:
    model: Any  # the PEFT model
    tokenizer: Any
    optimizer: Any
    device: str
    stops: list[int]


def load_tokenizer(cfg: OnpolicyConfig) -> Any:
    """The student's tokenizer; it must have a chat template."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.student, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(
            f"student {cfg.student}: cannot load its tokenizer ({str(e).splitlines()[0][:160]}); "
            "pass a model folder"
        ) from None
    if not tok.chat_template:
        raise InputError(f"student {cfg.student}: its tokenizer has no chat template")
    return tok


def load_student(cfg: OnpolicyConfig, ckpt: Path | None) -> Student:
    """The student with a fresh LoRA adapter, or the checkpoint's adapter and optimizer."""
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    assert cfg.student is not None
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(cfg)
    try:
        base = AutoModelForCausalLM.from_pretrained(
            cfg.student, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise InputError(
            f"student {cfg.student}: cannot load ({str(e).splitlines()[0][:160]}); pass a model folder"
        ) from None
    torch.manual_seed(cfg.seed)
    if ckpt is not None:
        model = PeftModel.from_pretrained(base, str(ckpt / "adapter"), is_trainable=True)
    else:
        lora = lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
        model = get_peft_model(base, lora)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    if ckpt is not None and (ckpt / "optimizer.pt").is_file():
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device))
    return Student(model, tok, opt, device, stop_ids(base, tok))


def sample(
    st: Student, prompt_ids: list[int], n: int, cfg: OnpolicyConfig, seed: int
) -> list[list[int]]:
    """n completions of one prompt (token ids, ending with the stop token when it stopped)."""
    import torch

    torch.manual_seed(seed)
    st.model.eval()
    with torch.no_grad():
        out = st.model.generate(
            input_ids=torch.tensor([prompt_ids], device=st.device),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=st.device),
            do_sample=True,
            temperature=cfg.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=cfg.max_new_tokens,
            num_return_sequences=n,
            eos_token_id=st.stops,
            pad_token_id=st.tokenizer.pad_token_id or st.stops[0],
        )
    completions = []
    for row in out[:, len(prompt_ids) :].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in st.stops), len(row))
        completions.append(row[:cut])
    return completions


def student_logprobs(st: Student, rollout: dict[str, Any]) -> tuple[Any, Any]:
    """(log p_student of each completion token (T,), the logits over the whole sequence)."""
    import torch

    p, c = rollout["prompt_ids"], rollout["completion_ids"]
    ids = torch.tensor([p + c], device=st.device)
    logits = st.model(input_ids=ids).logits.float()
    lp = torch.log_softmax(logits[0, len(p) - 1 : -1], -1)
    return lp.gather(-1, ids[0, len(p) :, None])[:, 0], logits


# -- rollouts ------------------------------------------------------------------------------------


def teacher_view(r: dict[str, Any], temperature: float) -> tuple[Any, Any]:
    """The teacher's log-probability of each sampled token (float32 array), and its top-k
    (ids, logprobs, mask; pipeline/kd.py's dense layout) or None when none was stored. At a
    temperature other than 1 both are the teacher's top-k rescaled by 1/temperature and
    renormalized over those k (the sampled token is always among them: it is stored first)."""
    import numpy as np

    from pipeline.kd import unpack_targets

    t_lp = np.asarray(r["teacher_logprobs"], dtype=np.float32)
    if r.get("teacher_topk") is None:
        return t_lp, None
    ids, lps, mask = unpack_targets(r["teacher_topk"], len(r["completion_ids"]))
    if temperature != 1:
        scaled = np.where(mask[:, None], lps / temperature, -np.inf)
        top = np.where(mask, scaled.max(-1), 0.0)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            logz = top + np.log(np.exp(scaled - top).sum(-1, keepdims=True))
        lps = np.where(mask[:, None], scaled - logz, -np.inf).astype(np.float32)
        t_lp = np.where(mask, lps[:, 0], t_lp).astype(np.float32)
    return t_lp, (ids, lps, mask)


def rollout_key(
    kind: str, step: int, row: PromptRow, sample_index: int, cfg: OnpolicyConfig
) -> str:
    """A rollout's store key: which step and prompt, of which teacher, with what context."""
    return content_hash(
        {
            "kind": kind,
            "step": step,
            "prompt": row.id,
            "messages": row.messages,
            "sample": sample_index,
            "endpoint": cfg.base_url,
            "model": cfg.model,
            "context": cfg.teacher_system_prompt,
            "seed": cfg.seed,
        },
        length=40,
    )


@dataclass
class Run:
    """What the loop needs at hand: config, store, teacher, student, protocol, budget."""

    cfg: OnpolicyConfig
    store: Store
    teacher: Teacher
    student: Student
    protocol: str
    budget: Budget
    loop: asyncio.AbstractEventLoop
    summary: Summary

    def rollouts(self, kind: str, step: int, rows: list[PromptRow]) -> list[dict[str, Any]]:
        """This step's rollouts: stored ones read back, the others sampled, scored and committed
        as each score arrives. Raises CostCap (after committing what was scored) at the cap."""
        cfg, tok = self.cfg, self.student.tokenizer
        stored = self.store.rollouts(kind, step)
        out: list[dict[str, Any]] = []
        todo: list[dict[str, Any]] = []
        for row in rows:
            keys = [rollout_key(kind, step, row, s, cfg) for s in range(cfg.samples)]
            if all(k in stored for k in keys):
                out += [stored[k] for k in keys]
                self.summary.reused += len(keys)
                continue
            prompt_ids = render(tok, row.messages)
            t_prompt = render(tok, teacher_messages(row.messages, cfg.teacher_system_prompt))
            seed = int(content_hash([cfg.seed, kind, step, row.id], length=8), 16)
            for s, completion in enumerate(
                sample(self.student, prompt_ids, cfg.samples, cfg, seed)
            ):
                if keys[s] in stored:
                    out.append(stored[keys[s]])
                    self.summary.reused += 1
                    continue
                todo.append(
                    {
                        "key": keys[s],
                        "kind": kind,
                        "step": step,
                        "prompt_id": row.id,
                        "sample_index": s,
                        "teacher": cfg.label,
                        "prompt_ids": prompt_ids,
                        "completion_ids": completion,
                        "t_prompt": t_prompt,
                    }
                )
        if todo:
            for r in self.loop.run_until_complete(self.score_all(todo)):
                if isinstance(r, BaseException):
                    raise r
            out += todo
        return out

    async def score_all(self, todo: list[dict[str, Any]]) -> list[Any]:
        """Score every rollout concurrently (the limiter paces them); each commits on arrival."""
        return await asyncio.gather(
            *(self.score_and_commit(r) for r in todo), return_exceptions=True
        )

    async def score_and_commit(self, r: dict[str, Any]) -> None:
        cfg = self.cfg
        t_prompt = r.pop("t_prompt")
        ids = t_prompt + r["completion_ids"]
        scores, attempts = await score(self.teacher, ids, self.protocol, cfg.top_k, self.budget)
        n = len(t_prompt)
        spent = cost(cfg, scores.prompt_tokens, scores.completion_tokens)
        r["teacher_logprobs"] = [float(x) if x is not None else 0.0 for x in scores.logprobs[n:]]
        r["teacher_topk"] = None
        if cfg.top_k and self.protocol == "prompt_logprobs":
            from pipeline.kd import pack_targets

            top = scores.top[n:]
            # The sampled token first (as kd.align_topk stores it), then the other candidates.
            ids_k = [[t, *[a for a in alts if a != t]] for t, alts in zip(r["completion_ids"], top)]
            lps_k = [[alts[a] for a in row] for row, alts in zip(ids_k, top)]
            r["teacher_topk"] = pack_targets(list(range(len(ids_k))), ids_k, lps_k)
        r.update(
            prompt_tokens=scores.prompt_tokens,
            completion_tokens=scores.completion_tokens,
            cost_usd=spent,
            attempts=attempts,
            created_at=utcnow(),
        )
        self.store.add_rollout(r)  # committed before any step uses it
        self.budget.spent += spent
        self.summary.scored += 1
        self.summary.teacher_tokens += scores.prompt_tokens

    def train_step(self, rollouts: list[dict[str, Any]]) -> dict[str, float]:
        """One step on the reverse KL (a policy gradient) plus the top-k forward KL if asked."""
        import torch

        from pipeline.kd import reverse_kl_per_token

        st, cfg = self.student, self.cfg
        st.model.train()
        st.optimizer.zero_grad()
        tokens = sum(len(r["completion_ids"]) for r in rollouts)
        rkl_sum, kd_sum = 0.0, 0.0
        for r in rollouts:
            if not r["completion_ids"]:
                continue
            s_lp, logits = student_logprobs(st, r)
            t_np, top = teacher_view(r, cfg.teacher_temperature)
            rkl = reverse_kl_per_token(s_lp, torch.from_numpy(t_np).to(st.device))
            # d/dθ KL(s || t) = E_s[(log s - log t) ∇ log s]: the detached reverse KL is the
            # per-token penalty (a zero-discount advantage, as Thinking Machines use).
            loss = cfg.reverse_kl * (rkl.detach() * s_lp).sum() / tokens
            rkl_sum += float(rkl.detach().sum())
            if cfg.kd_alpha > 0 and top is not None:
                c = len(r["completion_ids"])
                kd = forward_kl(logits, len(r["prompt_ids"]), top)
                loss = loss + cfg.kd_alpha * kd * c / tokens
                kd_sum += float(kd.detach()) * c
            loss.backward()
        st.optimizer.step()
        out = {"reverse_kl": rkl_sum / max(tokens, 1), "tokens": float(tokens)}
        if cfg.kd_alpha > 0:
            out["kd_loss"] = kd_sum / max(tokens, 1)
        return out

    def held_out(self, step: int, rows: list[PromptRow]) -> dict[str, float]:
        """Mean reverse KL per token on the held-out prompts' rollouts at this step (eval_reverse_kl)
        and, when the loss has the top-k term, the forward KL there (eval_kd_loss)."""
        import torch

        if not rows:
            return {}
        cfg = self.cfg
        rollouts = self.rollouts("eval", step, rows)
        rkl = kd = 0.0
        n = sum(len(r["completion_ids"]) for r in rollouts)
        self.student.model.eval()
        with torch.no_grad():
            for r in rollouts:
                if r["completion_ids"]:
                    s_lp, logits = student_logprobs(self.student, r)
                    t_lp, top = teacher_view(r, cfg.teacher_temperature)
                    rkl += float((s_lp.cpu() - torch.from_numpy(t_lp)).sum())
                    if cfg.kd_alpha > 0 and top is not None:
                        c = len(r["completion_ids"])
                        kd += float(forward_kl(logits, len(r["prompt_ids"]), top)) * c
        out = {"eval_reverse_kl": rkl / max(n, 1)}
        if cfg.kd_alpha > 0:
            out["eval_kd_loss"] = kd / max(n, 1)
        return out


def forward_kl(logits: Any, prompt_len: int, top: tuple[Any, Any, Any]) -> Any:
    """Mean forward KL(teacher's top-k || student) over a rollout's completion tokens
    (pipeline/kd.py's loss; the targets sit at the completion's positions, like labels)."""
    import torch

    from pipeline.kd import topk_kd_loss

    ids, lps, mask = (torch.from_numpy(x) for x in top)
    full, k = prompt_len + len(mask), ids.shape[1]
    t_ids = torch.zeros(1, full, k, dtype=torch.long)
    t_lps = torch.full((1, full, k), -torch.inf)
    t_mask = torch.zeros(1, full, dtype=torch.bool)
    t_ids[0, prompt_len:], t_lps[0, prompt_len:], t_mask[0, prompt_len:] = ids, lps, mask
    dev = logits.device
    return topk_kd_loss(logits, t_ids.to(dev), t_lps.to(dev), t_mask.to(dev))[0]


# -- checkpoints and the report ------------------------------------------------------------------


def save_checkpoint(run: Run, step: int, history: list[dict[str, Any]]) -> None:
    """OUT/checkpoint: adapter, optimizer and history at `step`; written aside, then swapped in."""
    import torch

    out = run.cfg.out
    tmp = out / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    run.student.model.save_pretrained(str(tmp / "adapter"))
    torch.save(run.student.optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "history": history}))
    old = out / "checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if (out / "checkpoint").exists():
        (out / "checkpoint").rename(old)
    tmp.rename(out / "checkpoint")
    shutil.rmtree(old, ignore_errors=True)


def last_checkpoint(out: Path) -> tuple[Path | None, int, list[dict[str, Any]]]:
    """(checkpoint folder, its step, its history); (None, 0, []) when there is none."""
    for name in ("checkpoint", "checkpoint.old"):  # .old: a kill between the two renames
        p = out / name
        try:
            state = json.loads((p / "state.json").read_text())
            return p, int(state["step"]), list(state["history"])
        except (OSError, ValueError, KeyError):
            continue
    return None, 0, []


def write_outputs(run: Run, started: float) -> None:
    """adapter/ and train_report.json in finetune's layout, and the reverse-KL plot."""
    from pipeline.plots import plot_step_curves

    cfg, s = run.cfg, run.summary
    run.student.model.save_pretrained(str(cfg.out / "adapter"))
    run.student.tokenizer.save_pretrained(str(cfg.out / "adapter"))
    held = [(h["step"], h["eval_reverse_kl"]) for h in s.history if "eval_reverse_kl" in h]
    train = [h for h in s.history if "reverse_kl" in h]
    report = {
        "student": student_path(cfg.student or ""),
        "data": cfg.data or [str(p) for p in cfg.prompts],
        "method": "onpolicy",
        "steps": s.steps_done,
        "teacher": cfg.label,
        "scoring": run.protocol,
        "teacher_tokens_scored": s.teacher_tokens,
        "spend_usd": round(s.spend, 6),
        "final_train_loss": train[-1]["reverse_kl"] if train else None,
        "final_eval_loss": held[-1][1] if held else None,
        "eval_reverse_kl": held,
        "history": s.history,
        "stopped": s.stopped,
        "wall_time_s": round(time.time() - started, 3),
        "settings": {
            "device": run.student.device,
            "samples": cfg.samples,
            "prompts_per_step": cfg.prompts_per_step,
            "max_new_tokens": cfg.max_new_tokens,
            "lr": cfg.lr,
            "lora_r": cfg.lora_r,
            "top_k": cfg.top_k,
            "kd_alpha": cfg.kd_alpha,
            "reverse_kl": cfg.reverse_kl,
            "teacher_temperature": cfg.teacher_temperature,
            "loss": " + ".join(
                ["per-token reverse KL (policy gradient)"] * (cfg.reverse_kl > 0)
                + ["top-k forward KL"] * (cfg.kd_alpha > 0)
            ),
        },
    }
    (cfg.out / "train_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    plot_step_curves(
        s.history,
        cfg.out / "reverse_kl.png",
        ("reverse_kl", "student's own samples"),
        ("eval_reverse_kl", "held-out prompts"),
        terms=(("kd_loss", "top-k forward KL (own samples)"),) if cfg.kd_alpha else (),
        title="On-policy distillation: reverse KL to the teacher (lower is better)",
        ylabel="KL(student || teacher), nats per sampled token",
    )


# -- the stage -----------------------------------------------------------------------------------


def onpolicy(cfg: OnpolicyConfig) -> Summary:
    """Run on-policy distillation (see the module docstring); returns what it did."""
    context = read_text_arg(
        cfg.teacher_system_prompt, cfg.teacher_system_prompt_file, "teacher system prompt"
    )
    cfg = cfg.model_copy(update={"teacher_system_prompt": context})
    if not cfg.student:
        raise ConfigError("no student: pass --student MODEL_DIR or set student: in onpolicy:")
    if not cfg.model:
        raise ConfigError("no teacher model: pass --model NAME or set model: in onpolicy:")
    if not cfg.prompts and not cfg.data:
        raise ConfigError(
            "no prompts: pass --prompts FILE or --data DATASET (a `distill build` output)"
        )
    rows = load_rows(cfg)
    held_rows = rows[len(rows) - cfg.eval_prompts :] if cfg.eval_prompts else []
    train_rows = rows[: len(rows) - len(held_rows)]
    if not train_rows:
        raise InputError(
            f"{len(rows)} prompts and eval_prompts {cfg.eval_prompts}: none left to train on; "
            "add prompts or lower eval_prompts"
        )
    protocol = require_scoring(cfg)  # a closed port, 401 or 404 fail here, as in harvest
    asyncio.run(same_tokenizer(cfg, load_tokenizer(cfg), protocol))  # before anything is stored
    started = time.time()
    summary = Summary(out=cfg.out, steps=cfg.steps)
    with open_run(cfg.out, log, dump_config(cfg), stage="onpolicy") as store:
        summary.spend, summary.teacher_tokens = store.rollout_totals()
        budget = Budget(spent=summary.spend, cap=cfg.max_cost)
        ckpt, done, history = last_checkpoint(cfg.out)
        student = load_student(cfg, ckpt)
        loop = asyncio.new_event_loop()
        teacher = Teacher(cfg)
        run = Run(cfg, store, teacher, student, protocol, budget, loop, summary)
        summary.history, summary.steps_done = history, done
        try:
            train(run, train_rows, held_rows, done)
        except CostCap as e:
            summary.stopped = str(e)
        finally:
            summary.spend = budget.spent
            loop.run_until_complete(teacher.aclose())
            loop.close()
        if summary.steps_done > done or not (cfg.out / "adapter").exists() or summary.stopped:
            write_outputs(run, started)
        log.info(summary.line())
    return summary


def train(run: Run, train_rows: list[PromptRow], held_rows: list[PromptRow], done: int) -> None:
    """Steps done+1 .. cfg.steps: rollouts, update, held-out reverse KL, checkpoint, progress."""
    cfg, s = run.cfg, run.summary
    order = list(range(len(train_rows)))
    random.Random(cfg.seed).shuffle(order)
    if done == 0 and not any(h.get("step") == 0 for h in s.history):
        s.history.append({"step": 0, **run.held_out(0, held_rows)})
    last_print, t0 = 0.0, time.monotonic()
    for step in range(done + 1, cfg.steps + 1):
        k = cfg.prompts_per_step
        picked = [train_rows[order[((step - 1) * k + j) % len(order)]] for j in range(k)]
        rollouts = run.rollouts("train", step, picked)
        entry: dict[str, Any] = {"step": step, **run.train_step(rollouts)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            entry.update(run.held_out(step, held_rows))
        entry.update(teacher_tokens=s.teacher_tokens, spend_usd=round(run.budget.spent, 6))
        s.history.append(entry)
        s.steps_done, s.spend = step, run.budget.spent
        log.info(json.dumps(entry))
        if step % cfg.save_steps == 0 or step == cfg.steps:
            save_checkpoint(run, step, s.history)
        now = time.monotonic()
        if now - last_print >= cfg.progress_every or step == cfg.steps:
            last_print = now
            eta = (now - t0) / (step - done) * (cfg.steps - step)
            held = entry.get("eval_reverse_kl")
            kd = entry.get("kd_loss")
            print(
                f"onpolicy: step {step}/{cfg.steps}, reverse KL {entry['reverse_kl']:.3f}"
                + (f" (held-out {held:.3f})" if held is not None else "")
                + (f", forward KL {kd:.3f}" if kd is not None else "")
                + f", {s.teacher_tokens} teacher tokens scored, ${run.budget.spent:.4f}, "
                f"ETA {math.ceil(eta)}s",
                file=sys.stderr,
                flush=True,
            )
