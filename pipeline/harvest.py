"""Harvest: send prompts to an OpenAI-compatible teacher and keep every answer, exactly once.

    distill harvest --prompts prompts/demo/train.jsonl --out data/runs/demo \
        --base-url http://127.0.0.1:8000/v1 --model my-teacher --samples 2 --max-tokens 256

Reading top to bottom: the config; planning (which (prompt, teacher, sample) keys are still
missing from the store); the async loop (one worker pool per teacher, every request through
the teacher's limiter and the retry policy, each response committed the moment it arrives);
progress and the summary. Rerunning the same command finds every key done and sends nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config import dump_config
from pipeline.errors import (
    EXIT_OK,
    EXIT_PARTIAL,
    ConfigError,
    DistillError,
    InputError,
    PromptRejected,
    StoreError,
    TeacherError,
    TransientError,
)
from pipeline.prompts import PromptRow, load_prompts, read_text_arg
from pipeline.ratelimit import retrying
from pipeline.record import Response, pack_logprobs
from pipeline.store import RunLock, Store, content_hash, request_key, utcnow
from pipeline.teacher import Choice, Completion, Teacher, TeacherConfig

log = logging.getLogger("distill.harvest")


class HarvestConfig(TeacherConfig):
    """`harvest:` section. The teacher fields (base_url, model, rpm, ...) sit at the top level for
    one teacher; `teachers:` lists several (each with the same fields)."""

    prompts: list[Path] = Field(
        default_factory=list,
        description="Prompt files (.jsonl/.json/.csv/.parquet/.txt or a saved dataset folder).",
    )
    out: Path = Field(
        Path("data/runs/default"),
        description="Run directory: holds store.sqlite, harvest.log, config.yaml.",
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N unique prompts.")
    system_prompt: str | None = Field(
        None, description="System message prepended to every prompt row without one."
    )
    system_prompt_file: Path | None = Field(
        None, description="File whose text is the system prompt (overrides system_prompt)."
    )
    user_template: str | None = Field(
        None,
        description="Python format string for the user message, e.g. 'Solve: {question}'; fields come from the row (and its meta).",
    )
    user_template_file: Path | None = Field(
        None, description="File holding the user template (overrides user_template)."
    )
    samples: int = Field(1, ge=1, le=128, description="Answers per prompt (one row each).")
    temperature: float | None = Field(
        None, ge=0, le=2, description="Sampling temperature (server default if unset)."
    )
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling.")
    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens per answer (reasoning included on most APIs)."
    )
    stop: list[str] | None = Field(None, description="Stop sequences.")
    seed: int | None = Field(
        None, description="Sampling seed; sample i of a prompt sent alone gets seed + i."
    )
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = Field(
        None, description="For reasoning models that take it (OpenAI o-series, gpt-5)."
    )
    logprobs: bool = Field(False, description="Ask for token logprobs (stored compressed).")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="Alternatives per token with logprobs."
    )
    generation_extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra body fields for every request, part of the store key (e.g. {'top_k': 20}).",
    )
    retry_length_max_tokens: int | None = Field(
        None,
        ge=1,
        description="Retry answers cut off by max_tokens (finish_reason 'length') once with this larger max_tokens. Off by default: they are kept as 'length'.",
    )
    max_cost: float | None = Field(
        None,
        ge=0,
        description="Stop sending before this run's spend (USD, worst case of requests in flight) would pass this cap.",
    )
    max_duration: float | None = Field(
        None,
        gt=0,
        description="Stop sending after this many seconds (cron windows); rerun continues.",
    )
    grace_period: float = Field(
        30.0,
        ge=0,
        description="On the first SIGINT/SIGTERM, seconds to wait for requests in flight before giving up on them.",
    )
    dry_run: bool = Field(
        False,
        description="Print what would be sent (requests, estimated tokens and cost) and send nothing.",
    )
    json_summary: bool = Field(
        False, description="Print the final summary as JSON on stdout (--json)."
    )
    progress_every: float = Field(
        10.0, gt=0, description="Seconds between progress lines when stderr is not a terminal."
    )
    teachers: list[TeacherConfig] = Field(
        default_factory=list,
        description="Several teachers, each {name, base_url, model, api_key_env, rpm, tpm, concurrency, price_input, price_output, share, ...}, each with its own rate limiter; `routing` decides which prompts each answers.",
    )
    routing: Literal["all", "share", "field"] = Field(
        "all",
        description="Which teachers answer a prompt: all (each one: comparisons, ensembles), share (one teacher, picked by a hash of the prompt id in proportion to each teacher's `share`), field (the teacher named by the prompt row's `route_field`).",
    )
    route_field: str | None = Field(
        None,
        description="With routing: field, the prompt-row field (a column, or a key of meta) whose value is the name of the teacher to ask.",
    )

    @model_validator(mode="after")
    def _check(self) -> HarvestConfig:
        if self.teachers and self.model_fields_set & {"model", "base_url"}:
            raise ValueError(
                "with teachers: listed, set model and base_url inside each entry, not at the top level"
            )
        names = [t.label for t in self.all_teachers()]
        if len(set(names)) != len(names):
            raise ValueError(f"teachers must have distinct names (got {names}); set name: on each")
        if self.routing == "field" and not self.route_field:
            raise ValueError(
                "routing: field needs route_field: the prompt field naming the teacher"
            )
        if self.routing == "share":
            self.shares()  # raises on shares that do not add up
        return self

    def shares(self) -> list[float]:
        """Each teacher's fraction of prompts: given shares, the rest split among the others."""
        teachers = self.all_teachers()
        given = sum(t.share or 0.0 for t in teachers)
        unset = [t for t in teachers if t.share is None]
        if given > 1 + 1e-9 or (unset and given >= 1 - 1e-9):
            raise ValueError(
                f"teacher shares add up to {given:g}; they must leave room for every teacher "
                "(at most 1, below 1 if some teachers have no share)"
            )
        rest = (1 - given) / len(unset) if unset else 0.0
        raw = [t.share if t.share is not None else rest for t in teachers]
        return [r / sum(raw) for r in raw]  # given shares below 1 in total are scaled up

    def all_teachers(self) -> list[TeacherConfig]:
        if self.teachers:
            return self.teachers
        fields = set(TeacherConfig.model_fields)
        return [TeacherConfig.model_validate(self.model_dump(include=fields))]

    def generation_params(self) -> dict[str, Any]:
        """What is asked, besides the messages: part of every store key."""
        p: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "stop": self.stop,
            "seed": self.seed,
            "reasoning_effort": self.reasoning_effort,
            "logprobs": True if self.logprobs else None,
            "top_logprobs": self.top_logprobs if self.logprobs else None,
        }
        p = {k: v for k, v in p.items() if v is not None}
        p.update(self.generation_extra)
        return p


@dataclass
class Job:
    """Samples still missing for one prompt at one teacher."""

    row: PromptRow
    samples: list[int]
    max_tokens: int | None = None  # a larger max_tokens for a 'length' retry
    cost_so_far: float = 0.0


@dataclass
class Summary:
    run_dir: str
    status: str = "done"  # done | partial | failed
    prompts: int = 0
    duplicates_dropped: int = 0
    teachers: list[str] = field(default_factory=list)
    total: int = 0  # prompt x sample x teacher keys wanted
    already_done: int = 0
    completed: int = 0  # committed this run
    failed: int = 0  # keys whose last attempt failed this run
    requests_sent: int = 0
    retries: int = 0
    throttled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    elapsed_s: float = 0.0
    completions_per_s: float = 0.0
    tokens_per_s: float = 0.0
    stopped: str | None = None
    exit_code: int = EXIT_OK
    dry_run: bool = False
    in_open_batches: int = 0  # keys left to a Batch API batch still open: not sent online
    estimated_tokens: int = 0
    estimated_cost_usd: float = 0.0

    def line(self) -> str:
        if self.dry_run:
            return (
                f"dry run: would send {self.total - self.already_done} requests for {self.prompts} prompts "
                f"({self.already_done} already stored), ~{self.estimated_tokens} tokens, "
                f"at most ${self.estimated_cost_usd:.4f}; nothing sent"
            )
        todo = self.total - self.already_done - self.completed
        text = (
            f"harvest {self.status}: {self.already_done + self.completed}/{self.total} answers stored "
            f"({self.completed} new, {self.failed} failed, {self.duplicates_dropped} duplicate prompts dropped) "
            f"in {self.elapsed_s:.1f}s, {self.completions_per_s:.1f}/s, "
            f"{self.prompt_tokens + self.completion_tokens} tokens, ${self.cost_usd:.4f} -> {self.run_dir}"
        )
        if self.stopped:
            text += f"; stopped: {self.stopped}"
        if self.in_open_batches:
            text += f"; {self.in_open_batches} wait in open batches (distill batch collect)"
        if todo > 0:
            text += f"; {todo} left: rerun the same command to continue"
        return text


def estimate_tokens(messages: list[dict[str, Any]]) -> int:
    """~4 characters a token, plus a few per message: good enough to reserve budget."""
    chars = sum(
        len(m["content"]) if isinstance(m["content"], str) else len(json.dumps(m["content"]))
        for m in messages
    )
    return chars // 4 + 4 * len(messages) + 3


def _cost(t: TeacherConfig, prompt_tokens: float, completion_tokens: float) -> float:
    return (prompt_tokens * t.price_input + completion_tokens * t.price_output) / 1e6


def routes_to(cfg: HarvestConfig, teachers: list[TeacherConfig], row: PromptRow) -> set[str]:
    """Labels of the teachers that answer this prompt under `cfg.routing`."""
    labels = [t.label for t in teachers]
    if cfg.routing == "all":
        return set(labels)
    if cfg.routing == "share":
        # A hash of the prompt id, not a random draw: a prompt goes to the same teacher on every
        # run, and prompts added to a growing file never move the old ones.
        u = int(content_hash(row.id, length=15), 16) / 16**15
        acc = 0.0
        for label, share in zip(labels, cfg.shares()):
            acc += share
            if u < acc:
                return {label}
        return {labels[-1]}
    value = row.meta.get(cfg.route_field or "")
    if not isinstance(value, str) or value not in labels:
        raise InputError(
            f"{row.source}: route_field {cfg.route_field!r} is {value!r}, which names no teacher "
            f"(teachers: {', '.join(labels)}); fix the row or the teachers' name:"
        )
    return {value}


def response_row(
    t: TeacherConfig,
    row: PromptRow,
    sample: int,
    key: str,
    params: dict[str, Any],
    completion: Completion,
    choice: Choice,
    *,
    split: int,
    cost: float,
    attempts: int,
    source: str,
) -> Response:
    """One stored row, online and batch alike: what was asked, of whom, and what came back.
    `split` is how many answers shared the request (n > 1): its token counts are divided."""
    ct = completion.completion_tokens
    rt = completion.reasoning_tokens
    return Response(
        key=key,
        prompt_id=row.id,
        sample_index=sample,
        teacher=t.label,
        base_url=t.base_url,
        model=t.model or "",
        params_hash=content_hash(params, length=16),
        params=params,
        messages=row.messages,
        reference=row.reference,
        meta=row.meta or None,
        response=choice.content,
        reasoning=choice.reasoning,
        finish_reason=choice.finish_reason,
        response_model=completion.model,
        system_fingerprint=completion.system_fingerprint,
        response_id=completion.response_id,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=None if ct is None else round(ct / split),
        reasoning_tokens=None if rt is None else round(rt / split),
        cost_usd=cost,
        latency_s=None if completion.latency_s is None else round(completion.latency_s, 4),
        attempts=attempts,
        created_at=utcnow(),
        logprobs=pack_logprobs(choice.logprobs),
        source=source,
    )


class Harvest:
    """One run: the prompts, the store, and a worker pool per teacher."""

    def __init__(
        self,
        cfg: HarvestConfig,
        rows: list[PromptRow],
        store: Store,
        summary: Summary,
        pretty: bool,
    ):
        self.cfg = cfg
        self.rows = rows
        self.store = store
        self.summary = summary
        self.pretty = pretty
        self.params = cfg.generation_params()
        self.stopping: str | None = None
        self.signals = 0
        self.reserved_cost = 0.0
        self.fatal: DistillError | None = None
        self.started = time.monotonic()
        self.teachers: list[Teacher] = []

    # -- planning ---------------------------------------------------------------------------------

    def key(self, t: TeacherConfig, row: PromptRow, sample: int) -> str:
        return request_key(t.base_url, t.model or "", row.messages, self.params, sample)

    def plan(
        self, t: TeacherConfig, done: set[str], in_batch: frozenset[str] = frozenset()
    ) -> list[Job]:
        """Jobs for what is missing; keys waiting in an open Batch API batch are not paid twice."""
        jobs = []
        teachers = self.cfg.all_teachers()
        for row in self.rows:
            if self.cfg.routing != "all" and t.label not in routes_to(self.cfg, teachers, row):
                continue
            keys = [self.key(t, row, i) for i in range(self.cfg.samples)]
            missing = [i for i, k in enumerate(keys) if k not in done]
            self.summary.total += self.cfg.samples
            self.summary.already_done += self.cfg.samples - len(missing)
            waiting = [i for i in missing if keys[i] in in_batch]
            self.summary.in_open_batches += len(waiting)
            missing = [i for i in missing if i not in waiting]
            if missing:
                jobs.append(Job(row, missing))
        return jobs

    # -- one request --------------------------------------------------------------------------------

    def body(self, t: TeacherConfig, job: Job, n: int) -> dict[str, Any]:
        b: dict[str, Any] = {"model": t.model, "messages": job.row.messages}
        b.update(self.params)
        if job.max_tokens is not None:
            b["max_tokens"] = job.max_tokens
        if n > 1:
            b["n"] = n
        elif self.cfg.seed is not None and job.samples[0] > 0:
            b["seed"] = self.cfg.seed + job.samples[0]  # separate requests must not repeat sample 0
        b.update(t.extra_body)
        return b

    def worst_cost(self, t: TeacherConfig, job: Job, n: int) -> float:
        out = job.max_tokens or self.cfg.max_tokens or 1024
        return _cost(t, estimate_tokens(job.row.messages), out * n)

    async def send(self, teacher: Teacher, job: Job, n: int) -> tuple[Completion, int]:
        """One logical request through the limiter and the retry policy. Returns (completion, attempts)."""
        body = self.body(teacher.cfg, job, n)
        est = estimate_tokens(job.row.messages) + (job.max_tokens or self.cfg.max_tokens or 256) * n
        attempts = 0
        async for attempt in retrying(teacher.cfg.max_retries):
            with attempt:
                if self.stopping and attempts > 0:
                    raise TransientError(f"not retried: {self.stopping}")
                attempts += 1
                await teacher.limiter.acquire(est)
                self.summary.requests_sent += 1
                if attempts > 1:
                    self.summary.retries += 1
                try:
                    completion = await teacher.complete(body)
                finally:
                    await teacher.limiter.release()
                used = (completion.prompt_tokens or 0) + (completion.completion_tokens or 0)
                teacher.limiter.correct_tokens(est, used or est)
                return completion, attempts
        raise AssertionError("unreachable")

    def commit(
        self, teacher: Teacher, job: Job, completion: Completion, attempts: int
    ) -> list[int]:
        """Store the answers that came back; return the sample indices still missing."""
        t = teacher.cfg
        got = completion.choices[: len(job.samples)]
        k = max(1, len(got))
        pt = completion.prompt_tokens
        ct = completion.completion_tokens
        request_cost = _cost(t, pt or 0, ct or 0)  # with n > 1, usage is split evenly
        params = dict(self.params)
        if job.max_tokens is not None:
            params["max_tokens"] = job.max_tokens
        for i, (sample, choice) in enumerate(zip(job.samples, got)):
            cost = request_cost / k + (job.cost_so_far if i == 0 else 0.0)
            key = self.key(t, job.row, sample)
            self.store.add_response(
                response_row(
                    t,
                    job.row,
                    sample,
                    key,
                    params,
                    completion,
                    choice,
                    split=k,
                    cost=cost,
                    attempts=attempts,
                    source="online",
                )
            )
            self.summary.completed += 1
        self.summary.prompt_tokens += pt or 0
        self.summary.completion_tokens += ct or 0
        self.summary.reasoning_tokens += completion.reasoning_tokens or 0
        self.summary.cost_usd += request_cost
        return job.samples[len(got) :]

    # -- the worker pool ----------------------------------------------------------------------------

    async def run_teacher(self, teacher: Teacher, jobs: list[Job]) -> None:
        queue: asyncio.Queue[Job] = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)
        pending = [len(jobs)]  # jobs not finished (a job may requeue a remainder)

        async def worker() -> None:
            while not self.stopping and not self.fatal:
                try:
                    job = queue.get_nowait()
                except asyncio.QueueEmpty:
                    if pending[0] <= 0:
                        return
                    await asyncio.sleep(0.05)
                    continue
                try:
                    await self.do_job(teacher, job, queue, pending)
                except DistillError as e:  # the store cannot take more (disk full, ...): stop all
                    self.fatal = self.fatal or e
                finally:
                    pending[0] -= 1

        await asyncio.gather(*(worker() for _ in range(teacher.cfg.concurrency)))

    async def do_job(
        self, teacher: Teacher, job: Job, queue: asyncio.Queue[Job], pending: list[int]
    ) -> None:
        t = teacher.cfg
        if (
            self.cfg.max_duration is not None
            and time.monotonic() - self.started > self.cfg.max_duration
        ):
            self.stop(f"max_duration of {self.cfg.max_duration:g}s reached")
            return
        use_n = len(job.samples) > 1 and teacher.supports_n is not False
        if not use_n and len(job.samples) > 1:  # split into one request per sample
            for s in job.samples[1:]:
                pending[0] += 1
                queue.put_nowait(Job(job.row, [s], job.max_tokens))
            job = Job(job.row, job.samples[:1], job.max_tokens, job.cost_so_far)
        n = len(job.samples)
        worst = self.worst_cost(t, job, n)
        if (
            self.cfg.max_cost is not None
            and self.summary.cost_usd + self.reserved_cost + worst > self.cfg.max_cost
        ):
            self.stop(f"max_cost ${self.cfg.max_cost:g} would be passed")
            return
        self.reserved_cost += worst
        try:
            completion, attempts = await self.send(teacher, job, n)
        except TransientError as e:
            if self.stopping:  # not a failure of the prompt: the run is stopping; rerun resumes
                return
            self.fail(
                t,
                job,
                getattr(e, "status", None),
                f"gave up after {t.max_retries + 1} attempts: {e}",
                t.max_retries + 1,
            )
            return
        except PromptRejected as e:
            self.fail(t, job, e.status, str(e), 1)
            return
        except TeacherError as e:
            self.fatal = self.fatal or e
            return
        finally:
            self.reserved_cost -= worst
        # 'length' answers are kept unless a retry with a larger max_tokens is configured.
        retry_len = self.cfg.retry_length_max_tokens
        current = job.max_tokens or self.cfg.max_tokens
        if (
            retry_len
            and n == 1
            and completion.choices[0].finish_reason == "length"
            and (current or 0) < retry_len
        ):
            spent = _cost(t, completion.prompt_tokens or 0, completion.completion_tokens or 0)
            self.summary.cost_usd += spent
            log.info(
                "prompt %s: finish_reason length; retrying with max_tokens=%d",
                job.row.id,
                retry_len,
            )
            pending[0] += 1
            queue.put_nowait(Job(job.row, job.samples, retry_len, job.cost_so_far + spent))
            return
        missing = self.commit(teacher, job, completion, attempts)
        if missing:
            if n > 1 and len(completion.choices) < n and teacher.supports_n is None:
                teacher.supports_n = False
                log.info("%s ignores n; sending one request per sample", t.base_url)
            elif n > 1:
                teacher.supports_n = True
            for s in missing:
                pending[0] += 1
                queue.put_nowait(Job(job.row, [s], job.max_tokens))
        elif n > 1:
            teacher.supports_n = True

    def fail(
        self, t: TeacherConfig, job: Job, status: int | None, error: str, attempts: int
    ) -> None:
        for s in job.samples:
            self.store.add_failure(
                self.key(t, job.row, s), job.row.id, s, t.label, status, error, attempts
            )
            self.summary.failed += 1
        log.warning("prompt %s (%s) failed: %s", job.row.id, job.row.source, error)

    def stop(self, reason: str) -> None:
        if not self.stopping:
            self.stopping = reason
            log.info("stopping: %s", reason)

    # -- signals ----------------------------------------------------------------------------------

    def on_signal(self, signum: int) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals > 1:
            # Every committed response is already durable (WAL): leaving now corrupts nothing.
            print(
                f"\n{name} again: exiting now; rerun the same command to resume",
                file=sys.stderr,
                flush=True,
            )
            os._exit(130)
        in_flight = sum(t.limiter.in_flight for t in self.teachers)
        self.stop(f"{name}")
        print(
            f"\n{name}: no new requests; waiting up to {self.cfg.grace_period:g}s for {in_flight} in flight "
            "(send it again to quit at once)",
            file=sys.stderr,
            flush=True,
        )

    # -- the run -----------------------------------------------------------------------------------

    async def run(self) -> None:
        done = self.store.done_keys()
        in_batch = frozenset(self.store.keys_in_open_batches())
        plans = []
        for tc in self.cfg.all_teachers():
            teacher = Teacher(tc)
            self.teachers.append(teacher)
            plans.append((teacher, self.plan(tc, done, in_batch)))
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.on_signal, sig)
        reporter = asyncio.create_task(self.report_progress())
        tasks = [asyncio.create_task(self.run_teacher(t, jobs)) for t, jobs in plans]
        try:
            while not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=0.2)
                if self.fatal:
                    break
                # Checked here too, not only when a job starts: workers stuck on a hanging
                # teacher or in retry backoff must not hold a cron window open.
                limit = self.cfg.max_duration
                if limit is not None and time.monotonic() - self.started > limit:
                    self.stop(f"max_duration of {limit:g}s reached")
                if self.stopping:
                    # Let requests in flight finish for up to the grace period, then cut them.
                    _, still = await asyncio.wait(tasks, timeout=self.cfg.grace_period)
                    if still:
                        log.warning(
                            "grace period over; abandoning %d requests in flight", len(still)
                        )
                    break
        finally:
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            for teacher in self.teachers:
                await teacher.aclose()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        if self.fatal:
            raise self.fatal
        for r in results:  # a bug in a worker must not pass silently
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r

    async def report_progress(self) -> None:
        s = self.summary
        todo = max(1, s.total - s.already_done)
        if self.pretty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            with Progress(
                TextColumn("harvest"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            ) as bar:
                task = bar.add_task("harvest", total=todo, info="")
                while True:
                    bar.update(task, completed=s.completed + s.failed, info=self.progress_info())
                    await asyncio.sleep(0.25)
        else:
            while True:
                await asyncio.sleep(self.cfg.progress_every)
                line = f"progress: {s.completed + s.failed}/{todo} {self.progress_info()}"
                print(line, file=sys.stderr, flush=True)
                log.info(line)

    def progress_info(self) -> str:
        s = self.summary
        el = max(1e-6, time.monotonic() - self.started)
        return (
            f"{s.completed / el:.1f} req/s {(s.prompt_tokens + s.completion_tokens) / el:.0f} tok/s "
            f"${s.cost_usd:.4f} errors {s.failed} retries {s.retries}"
        )


def run_loop(coro: Any) -> Any:
    """asyncio.run, on uvloop where it is installed (Linux/macOS): the harvester's own work per
    request is small, so the event loop's speed shows in completions/s (bench/overhead.py)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _setup_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "harvest.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handler


def prepare_rows(cfg: HarvestConfig) -> tuple[list[PromptRow], int]:
    system = read_text_arg(cfg.system_prompt, cfg.system_prompt_file, "system prompt")
    template = read_text_arg(cfg.user_template, cfg.user_template_file, "user template")
    return load_prompts(
        list(cfg.prompts), system_prompt=system, user_template=template, limit=cfg.limit
    )


def harvest(cfg: HarvestConfig, *, pretty: bool | None = None) -> Summary:
    """Run a harvest (or a dry run) and return its summary. Raises DistillError on a user error."""
    for t in cfg.all_teachers():
        if not t.model:
            raise ConfigError(
                "no teacher model: pass --model NAME or set model: in the harvest config"
            )
    rows, dropped = prepare_rows(cfg)  # every input error surfaces before the store is touched
    teachers = cfg.all_teachers()
    for row in rows:
        routes_to(cfg, teachers, row)  # a row naming no teacher, too
    summary = Summary(run_dir=str(cfg.out), prompts=len(rows), duplicates_dropped=dropped)
    summary.teachers = [t.label for t in cfg.all_teachers()]
    if pretty is None:
        pretty = sys.stderr.isatty()

    if cfg.dry_run:
        return _dry_run(cfg, rows, summary)

    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(
            f"{out}: cannot create the run directory ({e.strerror}); choose another --out"
        ) from None
    lock = RunLock(out)
    lock.acquire()
    handler = None
    store = None
    try:
        store = Store(out)
        try:
            handler = _setup_log(out)
            # reloadable as it is: with teachers listed, the top-level teacher fields are not used
            unused = set(TeacherConfig.model_fields) if cfg.teachers else None
            (out / "config.yaml").write_text(dump_config(cfg, exclude=unused), encoding="utf-8")
        except OSError as e:
            raise StoreError(f"{out}: cannot write to the run directory ({e.strerror})") from None
        log.info(
            "harvest start: %d prompts (%d duplicates dropped), teachers %s",
            len(rows),
            dropped,
            summary.teachers,
        )
        h = Harvest(cfg, rows, store, summary, pretty)
        try:
            run_loop(h.run())
        finally:
            summary.elapsed_s = round(time.monotonic() - h.started, 3)
            summary.throttled = sum(t.limiter.throttled for t in h.teachers)
        summary.completions_per_s = round(summary.completed / max(summary.elapsed_s, 1e-9), 2)
        summary.tokens_per_s = round(
            (summary.prompt_tokens + summary.completion_tokens) / max(summary.elapsed_s, 1e-9), 1
        )
        summary.cost_usd = round(summary.cost_usd, 6)
        left = summary.total - summary.already_done - summary.completed
        summary.stopped = h.stopping
        if left > 0:
            summary.status = "partial"
            summary.exit_code = EXIT_PARTIAL
        log.info("%s", summary.line())
        return summary
    finally:
        if store is not None:
            store.close()
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        lock.release()


def _dry_run(cfg: HarvestConfig, rows: list[PromptRow], summary: Summary) -> Summary:
    summary.dry_run = True
    done: set[str] = set()
    if (Path(cfg.out) / "store.sqlite").exists():
        with Store(cfg.out, readonly=True) as store:
            done = store.done_keys()
    h = Harvest(cfg, rows, store=None, summary=summary, pretty=False)  # type: ignore[arg-type]
    for t in cfg.all_teachers():
        for job in h.plan(t, done):
            p = estimate_tokens(job.row.messages)
            out = cfg.max_tokens or 1024
            summary.estimated_tokens += (p + out) * len(job.samples)
            summary.estimated_cost_usd += _cost(t, p * len(job.samples), out * len(job.samples))
    summary.estimated_cost_usd = round(summary.estimated_cost_usd, 6)
    return summary


def summary_json(summary: Summary) -> str:
    return json.dumps(asdict(summary), sort_keys=True)
