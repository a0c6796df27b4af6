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
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config import dump_config
from pipeline.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    ConfigError,
    DistillError,
    InputError,
    PromptRejected,
    StoreError,
    TeacherError,
    TransientError,
    Unreachable,
)
from pipeline.probe import ProbeResult, probe, read_probe
from pipeline.prompts import CHUNK, PromptReader, PromptRow, chunks, read_text_arg
from pipeline.ratelimit import retrying
from pipeline.record import content_hash
from pipeline.store import (
    STORE_FILE,
    Store,
    log_early_failure,
    open_run,
    request_key,
    request_keys,
)
from pipeline.teacher import (
    Completion,
    Teacher,
    TeacherConfig,
    chat_body,
    cost,
    estimate_tokens,
    to_response,
)

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
        None,
        description="Sampling seed. Each prompt's requests carry their own seed, a hash of this seed and the prompt id (+ i for sample i sent alone): reproducible, and not one random stream for every prompt.",
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
    replace_changed_prompts: bool = Field(
        False,
        description="When a prompt id now has other text than was harvested under it before: harvest the new text and make build use only it (without this, the run stops and names the id).",
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
        return {k: v for k, v in p.items() if v is not None} | self.generation_extra


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
    status: str = "done"  # done | partial | interrupted | failed
    prompts: int = 0
    duplicates_dropped: int = 0
    prompt_conflicts: int = 0  # same text under other ids or references (warned, sent once)
    teachers: list[str] = field(default_factory=list)
    total: int = 0  # prompt x sample x teacher keys wanted
    already_done: int = 0
    completed: int = 0  # committed this run
    failed: int = 0  # keys whose last attempt failed this run
    requests_sent: int = 0
    retries: int = 0
    request_errors: int = 0  # requests that failed this run, retried or not (progress shows them)
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
        if self.prompt_conflicts:
            text += f"; {self.prompt_conflicts} prompt conflicts (warnings above)"
        if self.stopped:
            text += f"; stopped: {self.stopped}"
        if self.in_open_batches:
            text += f"; {self.in_open_batches} wait in open batches (distill batch collect)"
        if todo > 0:
            text += f"; {todo} left: rerun the same command to continue"
        return text


def routes_to(cfg: HarvestConfig, teachers: list[TeacherConfig], row: PromptRow) -> set[str]:
    """Labels of the teachers that answer this prompt under `cfg.routing`."""
    labels = [t.label for t in teachers]
    if cfg.routing == "all":
        return set(labels)
    if cfg.routing == "share":
        # A hash of the prompt id, not a random draw: a prompt goes to the same teacher on every
        # run, and prompts added to a growing file never move the old ones.
        u = int(content_hash(row.id, length=15), 16) / 16**15
        bounds = itertools.accumulate(cfg.shares())
        return {next((label for label, b in zip(labels, bounds) if u < b), labels[-1])}
    value = row.meta.get(cfg.route_field or "")
    if not isinstance(value, str) or value not in labels:
        raise InputError(
            f"{row.source}: route_field {cfg.route_field!r} is {value!r}, which names no teacher "
            f"(teachers: {', '.join(labels)}); fix the row or the teachers' name:"
        )
    return {value}


def store_key(t: TeacherConfig, row: PromptRow, params: dict[str, Any], sample: int) -> str:
    """The store key of one sample of a prompt at a teacher (online and batch alike)."""
    return request_key(t.base_url, t.model or "", row.messages, params, sample, row.messages_json)


@dataclass
class Plan:
    """What a run still has to ask: per teacher, the jobs for the keys missing from the store."""

    jobs: list[tuple[TeacherConfig, list[Job]]]
    total: int = 0  # prompt x sample x teacher keys wanted
    already_done: int = 0
    in_open_batches: int = 0  # missing, but waiting in an open Batch API batch: not planned


def plan(
    cfg: HarvestConfig,
    rows: list[PromptRow],
    done: set[str] | Store,
    in_batch: Collection[str] = frozenset(),
    teachers: Iterable[TeacherConfig] | None = None,
) -> Plan:
    """Which (prompt, sample, teacher) keys are missing, as jobs; `routing` applies. Keys waiting
    in an open Batch API batch are not paid for twice. `teachers` defaults to all of them. `done`
    is a set of stored keys, or the store itself, asked about these rows' keys only (a harvest
    plans a chunk of rows at a time)."""
    params = cfg.generation_params()
    everyone = cfg.all_teachers()
    result = Plan(jobs=[])
    for t in everyone if teachers is None else teachers:
        jobs = []
        routed = [
            row for row in rows if cfg.routing == "all" or t.label in routes_to(cfg, everyone, row)
        ]
        key = request_keys(t.base_url, t.model or "", params)
        wanted = [
            [key(row.messages, i, row.messages_json) for i in range(cfg.samples)] for row in routed
        ]
        found = done if isinstance(done, set) else done.done_among(list(itertools.chain(*wanted)))
        for row, keys in zip(routed, wanted):
            missing = [i for i, k in enumerate(keys) if k not in found]
            waiting = [i for i in missing if keys[i] in in_batch]
            result.total += cfg.samples
            result.already_done += cfg.samples - len(missing)
            result.in_open_batches += len(waiting)
            missing = [i for i in missing if i not in waiting]
            if missing:
                jobs.append(Job(row, missing))
        result.jobs.append((t, jobs))
    return result


def sample_seed(cfg: HarvestConfig, row: PromptRow, sample: int) -> int | None:
    """The seed a request for `sample` (and, with n, the samples after it) carries: a stable hash
    of the configured seed and the prompt id, + the sample index. One seed for every prompt would
    make a sampling server draw the same random stream for each: answers phrased alike across
    prompts. The store key keeps the configured seed (`generation_params`): runs harvested before
    are not asked again. Below 2**28 + 128: fits the 32-bit seeds of some servers."""
    if cfg.seed is None:
        return None
    return int(content_hash([cfg.seed, row.id], length=7), 16) + sample


class Harvest:
    """The worker pool of one run: a pool per teacher, each request within the run's limits."""

    def __init__(self, cfg: HarvestConfig, store: Store, summary: Summary, pretty: bool):
        self.cfg = cfg
        self.store = store
        self.summary = summary
        self.pretty = pretty
        self.params = cfg.generation_params()
        self.stopping: str | None = None
        self.signals = 0  # SIGINT/SIGTERM received: the run ends `interrupted` (exit 130)
        self.reserved_cost = 0.0
        self.fatal: DistillError | None = None
        self.started = time.monotonic()
        self.teachers: list[Teacher] = []
        self.probes: dict[str, ProbeResult] = {}  # what each teacher supports (learn_endpoints)

    # -- what each endpoint supports ------------------------------------------------------------------

    def learn_endpoints(self, jobs: list[tuple[TeacherConfig, bool]]) -> None:
        """What each teacher with work to do supports: a fresh `distill probe` result in the run
        directory, else, when logprobs are asked, one cheap request (max_tokens 1). Decides `n`
        vs separate requests, and stops the run before it pays for answers without the logprobs
        asked for. `jobs`: each teacher, and whether it has work to do."""
        for t, todo in jobs:
            found = read_probe(Path(self.cfg.out), base_url=t.base_url, model=t.model)
            if found is None and todo and self.cfg.logprobs:
                found = self.probe_once(t)
            if found is None:
                continue
            self.probes[t.label] = found
            if todo and self.cfg.logprobs and found.logprobs is False:
                raise TeacherError(
                    f"{t.base_url} ({t.model}) ignores `logprobs`: a probe at "
                    f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(found.probed_at))} got none "
                    "back; drop --logprobs, or harvest from a server that returns them "
                    "(`distill probe` shows what one supports)"
                )

    def probe_once(self, t: TeacherConfig) -> ProbeResult | None:
        """One chat request (n=2, the top_logprobs the run asks); None if it got no answer: a
        server that is down or busy is the retry policy's business, not a reason to stop."""
        try:
            found = probe(
                t.base_url,
                t.model or "",
                t.api_key_env,
                self.cfg.max_cost,
                teacher=t,
                max_requests=1,
                max_tokens=1,
                timeout=t.timeout,
                top_k_tries=(self.cfg.top_logprobs or 1,),
            )
        except TeacherError as e:
            if e.__cause__ is None:  # a bad key or model: harvest would stop on it too
                raise
            log.info("probe of %s got no answer (%s); going on without it", t.base_url, e)
            return None
        self.summary.requests_sent += found.requests
        self.summary.cost_usd += found.cost_usd
        log.info(
            "probe of %s: n honoured %s, logprobs %s", t.base_url, found.n_honoured, found.logprobs
        )
        return found

    # -- one request --------------------------------------------------------------------------------

    async def send(self, teacher: Teacher, job: Job, n: int) -> tuple[Completion, int]:
        """One logical request through the limiter and the retry policy. Returns (completion, attempts)."""
        seed = sample_seed(self.cfg, job.row, job.samples[0])
        body = chat_body(
            teacher.cfg, job.row.messages, self.params, n=n, max_tokens=job.max_tokens, seed=seed
        )
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
                except Exception:
                    self.summary.request_errors += 1
                    raise
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
        request_cost = completion.cost_usd(t)  # with n > 1, usage is split evenly
        params = dict(self.params)
        if job.max_tokens is not None:
            params["max_tokens"] = job.max_tokens
        for i, (sample, choice) in enumerate(zip(job.samples, got)):
            self.store.add_response(
                to_response(
                    t,
                    job.row,
                    sample,
                    store_key(t, job.row, self.params, sample),
                    params,
                    completion,
                    choice,
                    split=k,
                    cost=request_cost / k + (job.cost_so_far if i == 0 else 0.0),
                    attempts=attempts,
                    source="online",
                )
            )
            self.summary.completed += 1
        self.summary.prompt_tokens += completion.prompt_tokens or 0
        self.summary.completion_tokens += completion.completion_tokens or 0
        self.summary.reasoning_tokens += completion.reasoning_tokens or 0
        self.summary.cost_usd += request_cost
        return job.samples[len(got) :]

    # -- the worker pool ----------------------------------------------------------------------------

    async def run_teacher(self, teacher: Teacher, feed: Iterable[list[Job]]) -> None:
        """The teacher's workers, fed chunk by chunk: the queue holds a few chunks' jobs, never
        the whole run's."""
        queue: asyncio.Queue[Job] = asyncio.Queue()
        pending = [1]  # jobs not finished (a job may requeue a remainder), + 1 while fed

        async def fill() -> None:
            try:
                for jobs in feed:  # planning a chunk of rows: milliseconds, on the event loop
                    if self.stopping or self.fatal:
                        return
                    for job in jobs:
                        pending[0] += 1
                        queue.put_nowait(job)
                    await asyncio.sleep(0)
                    while queue.qsize() > 2 * teacher.cfg.concurrency:
                        if self.stopping or self.fatal:
                            return
                        await asyncio.sleep(0.05)
            except DistillError as e:  # the store cannot be read: stop all
                self.fatal = self.fatal or e
            finally:
                pending[0] -= 1

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

        await asyncio.gather(fill(), *(worker() for _ in range(teacher.cfg.concurrency)))

    async def do_job(
        self, teacher: Teacher, job: Job, queue: asyncio.Queue[Job], pending: list[int]
    ) -> None:
        """Send one job, store what came back, and queue what is still to ask."""

        def requeue(j: Job) -> None:
            pending[0] += 1
            queue.put_nowait(j)

        limit = self.cfg.max_duration
        if limit is not None and time.monotonic() - self.started > limit:
            self.stop(f"max_duration of {limit:g}s reached")
            return
        if len(job.samples) > 1 and teacher.supports_n is False:  # one request per sample
            for s in job.samples[1:]:
                requeue(Job(job.row, [s], job.max_tokens))
            job = Job(job.row, job.samples[:1], job.max_tokens, job.cost_so_far)
        sent = await self.attempt(teacher, job)
        if sent is None:
            return
        completion, attempts = sent
        if self.cfg.logprobs and not all(c.has_logprobs for c in completion.choices):
            # Whatever a probe said: the first answer without them stops the run, unstored
            # (its key promises logprobs), before thousands more are paid for.
            t = teacher.cfg
            self.summary.cost_usd += completion.cost_usd(t)
            self.fatal = self.fatal or TeacherError(
                f"{t.base_url} ({t.model}) answered prompt {job.row.id} without the logprobs "
                "asked for; stopped before paying for more (that answer is not stored): drop "
                "--logprobs, or harvest from a server that returns them (`distill probe`)"
            )
            return
        longer = self.retry_longer(teacher.cfg, job, completion)
        if longer is not None:
            requeue(longer)
            return
        missing = self.commit(teacher, job, completion, attempts)
        if len(job.samples) > 1:  # did the server honour n?
            if missing and teacher.supports_n is None:
                teacher.supports_n = False
                log.info("%s ignores n; sending one request per sample", teacher.cfg.base_url)
            else:
                teacher.supports_n = True
        for s in missing:
            requeue(Job(job.row, [s], job.max_tokens))

    async def attempt(self, teacher: Teacher, job: Job) -> tuple[Completion, int] | None:
        """`send` within the cost cap; a failure is recorded (or, for the whole run, kept in
        `fatal`) and gives None."""
        t = teacher.cfg
        n = len(job.samples)
        out = (job.max_tokens or self.cfg.max_tokens or 1024) * n
        worst = cost(t, estimate_tokens(job.row.messages), out)
        cap = self.cfg.max_cost
        if cap is not None and self.summary.cost_usd + self.reserved_cost + worst > cap:
            self.stop(f"max_cost ${cap:g} would be passed")
            return None
        self.reserved_cost += worst
        try:
            return await self.send(teacher, job, n)
        except Unreachable as e:  # never reached: a wrong URL, not this prompt's failure
            self.fatal = self.fatal or e
        except TransientError as e:
            if not self.stopping:  # else not the prompt's failure: the run stops; rerun resumes
                why = f"gave up after {t.max_retries + 1} attempts: {e}"
                self.fail(t, job, e.status, why, t.max_retries + 1)
        except PromptRejected as e:
            self.fail(t, job, e.status, str(e), 1)
        except TeacherError as e:
            self.fatal = self.fatal or e
        finally:
            self.reserved_cost -= worst
        return None

    def retry_longer(self, t: TeacherConfig, job: Job, completion: Completion) -> Job | None:
        """'length' answers are kept, unless retry_length_max_tokens asks for one retry with a
        larger max_tokens: then the spend so far is counted and the retry returned."""
        retry_len = self.cfg.retry_length_max_tokens
        current = job.max_tokens or self.cfg.max_tokens
        if (
            not retry_len
            or len(job.samples) > 1
            or completion.choices[0].finish_reason != "length"
            or (current or 0) >= retry_len
        ):
            return None
        spent = completion.cost_usd(t)
        self.summary.cost_usd += spent
        log.info(
            "prompt %s: finish_reason length; retrying with max_tokens=%d", job.row.id, retry_len
        )
        return Job(job.row, job.samples, retry_len, job.cost_so_far + spent)

    def fail(
        self, t: TeacherConfig, job: Job, status: int | None, error: str, attempts: int
    ) -> None:
        for s in job.samples:
            key = store_key(t, job.row, self.params, s)
            self.store.add_failure(key, job.row.id, s, t.label, status, error, attempts)
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

    async def run(self, jobs: list[tuple[TeacherConfig, Iterable[list[Job]]]]) -> None:
        """Every teacher's jobs (chunks of them, planned as the workers need them) through its
        worker pool, until done, stopped or fatal."""
        plans = []
        for tc, todo in jobs:
            teacher = Teacher(tc)
            known = self.probes.get(tc.label)
            if tc.use_n and known is not None and known.n_honoured is not None:
                teacher.supports_n = known.n_honoured
            self.teachers.append(teacher)
            plans.append((teacher, todo))
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
                        cut = sum(t.limiter.in_flight for t in self.teachers)
                        log.warning("grace period over; abandoning %d requests in flight", cut)
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
            f"${s.cost_usd:.4f} errors {s.request_errors} failed {s.failed} retries {s.retries}"
        )


def run_loop(coro: Any) -> Any:
    """asyncio.run, on uvloop where it is installed (Linux/macOS): the harvester's own work per
    request is small, so the event loop's speed shows in completions/s (bench/overhead.py)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def prompt_reader(cfg: HarvestConfig) -> PromptReader:
    """The reader of the run's prompts, after the checks that need no prompt: a teacher without a
    model, a system prompt or template file that cannot be read."""
    if not all(t.model for t in cfg.all_teachers()):
        raise ConfigError("no teacher model: pass --model NAME or set model: in the harvest config")
    return PromptReader(
        cfg.prompts,
        system_prompt=read_text_arg(cfg.system_prompt, cfg.system_prompt_file, "system prompt"),
        user_template=read_text_arg(cfg.user_template, cfg.user_template_file, "user template"),
        limit=cfg.limit,
    )


def warn_conflicts(conflicts: list[str]) -> None:
    for i, text in enumerate(conflicts, start=1):
        print(f"warning: prompt conflict {i}/{len(conflicts)}: {text}", file=sys.stderr)


def checked_rows(cfg: HarvestConfig) -> list[PromptRow]:
    """The prompt rows in a list (the Batch API's harvest), the conflicts among them warned on
    stderr, with every input error raised before the store is touched: a teacher without a
    model, a bad file, a row naming no teacher."""
    reader = prompt_reader(cfg)
    rows = list(reader)
    teachers = cfg.all_teachers()
    for row in rows:
        routes_to(cfg, teachers, row)
    warn_conflicts(reader.conflicts)
    return rows


def changed_prompts(store: Store, rows: list[PromptRow]) -> list[tuple[str, str, str]]:
    """(id, content hash, source) of the rows whose id was harvested with other text."""
    known = store.prompt_hashes([r.id for r in rows])
    return [(r.id, r.digest, r.source) for r in rows if known.get(r.id, r.digest) != r.digest]


def settle_changed_prompts(
    cfg: HarvestConfig, store: Store | None, changed: list[tuple[str, str, str]]
) -> None:
    """Stop before sending anything when a prompt id now has other text than was harvested under
    it (build would mix the two); with replace_changed_prompts, the new text wins at once. A
    prompt's text is otherwise recorded with its first answer (the store's add_response). `store`
    None or read-only (a dry run): only the check."""
    if changed and not cfg.replace_changed_prompts:
        pid, _, src = changed[0]
        more = f" (and {len(changed) - 1} more ids)" if len(changed) > 1 else ""
        raise InputError(
            f"{src}: prompt id {pid!r} has other text than was harvested under it before{more}; "
            "give the new text a new id, or pass --replace-changed-prompts to harvest it and make "
            "`distill build` use only the new text"
        )
    if changed and store is not None and not store.readonly:
        store.replace_prompts(changed)
        for pid, _, src in changed:
            log.info("prompt %s: its text is now the one at %s", pid, src)


def check_prompt_identity(cfg: HarvestConfig, store: Store, rows: list[PromptRow]) -> None:
    """settle_changed_prompts for rows in a list (the Batch API's harvest)."""
    settle_changed_prompts(cfg, store, changed_prompts(store, rows))
    store.prompt_sources = {r.id: r.source for r in rows}


def survey(
    cfg: HarvestConfig, reader: PromptReader, store: Store | None, summary: Summary
) -> tuple[list[tuple[str, str, str]], set[str]]:
    """One pass over every prompt, a chunk at a time: every input error (a bad file, a row naming
    no teacher) and the counts in `summary` (prompts, keys wanted and stored, estimates for a dry
    run). Returns the prompts whose text changed (see settle_changed_prompts) and the teachers
    with work left. `store` None: nothing is stored yet."""
    in_batch = store.keys_in_open_batches() if store is not None else set()
    changed: list[tuple[str, str, str]] = []
    work: set[str] = set()
    summary.total = summary.already_done = summary.in_open_batches = 0
    for rows in chunks(reader, CHUNK):
        if store is not None:
            changed += changed_prompts(store, rows)
        todo = plan(cfg, rows, store if store is not None else set(), in_batch)
        summary.total += todo.total
        summary.already_done += todo.already_done
        summary.in_open_batches += todo.in_open_batches
        for t, jobs in todo.jobs:
            work |= {t.label} if jobs else set()
            for job in jobs if cfg.dry_run else []:
                p = estimate_tokens(job.row.messages) * len(job.samples)
                out = (cfg.max_tokens or 1024) * len(job.samples)
                summary.estimated_tokens += p + out
                summary.estimated_cost_usd += cost(t, p, out)
    summary.prompts, summary.duplicates_dropped = reader.count, reader.dropped
    summary.prompt_conflicts = len(reader.conflicts)
    summary.estimated_cost_usd = round(summary.estimated_cost_usd, 6)
    return changed, work


def feed(
    cfg: HarvestConfig, reader: PromptReader, store: Store, t: TeacherConfig
) -> Iterator[list[Job]]:
    """Teacher `t`'s jobs, a chunk of prompts at a time, planned against the store as they are
    needed: what a harvest holds does not grow with the number of prompts."""
    in_batch = store.keys_in_open_batches()
    for rows in chunks(reader.again(), CHUNK):
        jobs = plan(cfg, rows, store, in_batch, [t]).jobs[0][1]
        # Only prompts still to be answered: an answer removes its entry (Store.add_response).
        store.prompt_sources.update((j.row.id, j.row.source) for j in jobs)
        yield jobs


def harvest(cfg: HarvestConfig, *, pretty: bool | None = None) -> Summary:
    """Run a harvest (or a dry run) and return its summary. Raises DistillError on a user error.

    The prompts are read in chunks, twice: a first pass checks them all (input errors, prompt
    ids whose text changed, what is stored) before anything is sent or the store is written; the
    second plans and sends, chunk by chunk. A rerun of a finished run stops after the first."""
    reader = prompt_reader(cfg)
    summary = Summary(run_dir=str(cfg.out), dry_run=cfg.dry_run)
    summary.teachers = [t.label for t in cfg.all_teachers()]
    surveyed = False
    path = Path(cfg.out) / STORE_FILE
    if path.is_file() and path.stat().st_size > 0:
        try:
            with Store(cfg.out, readonly=True) as seen:
                if cfg.dry_run or seen.is_current():  # else: migrated first, surveyed after
                    changed, work = survey(cfg, reader, seen, summary)
                    surveyed = True
        except StoreError:  # a damaged store: opening it to write says what to do
            if cfg.dry_run:
                raise
    if not surveyed:
        changed, work = survey(cfg, reader, None, summary)
    warn_conflicts(reader.conflicts)
    if cfg.dry_run:
        settle_changed_prompts(cfg, None, changed)  # stops like the real run would
        return summary
    # reloadable as it is: with teachers listed, the top-level teacher fields are not used
    unused = set(TeacherConfig.model_fields) if cfg.teachers else None
    try:
        if surveyed:  # before open_run rewrites config.yaml: exit 2 leaves the run as it was
            settle_changed_prompts(cfg, None, changed)
        with open_run(Path(cfg.out), log, dump_config(cfg, exclude=unused)) as store:
            return run_harvest(cfg, reader, store, summary, surveyed, changed, work, pretty)
    except DistillError as e:
        if summary.status != "failed":  # raised before harvest.log was open (else logged there)
            log_early_failure(Path(cfg.out), "harvest", e)
        raise


def run_harvest(
    cfg: HarvestConfig,
    reader: PromptReader,
    store: Store,
    summary: Summary,
    surveyed: bool,
    changed: list[tuple[str, str, str]],
    work: set[str],
    pretty: bool | None,
) -> Summary:
    """The part of `harvest` with the run directory open: every fatal error, the exit code and
    the summary go to harvest.log too."""
    log.info(
        "harvest start: %d prompts (%d duplicates dropped), teachers %s",
        summary.prompts,
        summary.duplicates_dropped,
        summary.teachers,
    )
    for text in reader.conflicts:
        log.warning("prompt conflict: %s", text)
    h = Harvest(cfg, store, summary, sys.stderr.isatty() if pretty is None else pretty)
    teachers = cfg.all_teachers()
    try:
        if not surveyed and store.count():  # a store of an older schema, now migrated
            changed, work = survey(cfg, reader, store, summary)
        settle_changed_prompts(cfg, store, changed)
        h.learn_endpoints([(t, t.label in work) for t in teachers])
        run_loop(
            h.run([(t, feed(cfg, reader, store, t) if t.label in work else []) for t in teachers])
        )
    except DistillError as e:  # the log tells the whole story, fatal errors included
        summary.status, summary.exit_code = "failed", e.exit_code
        log.error("harvest failed: %s", e)
        raise
    finally:
        summary.elapsed_s = round(time.monotonic() - h.started, 3)
        summary.throttled = sum(t.limiter.throttled for t in h.teachers)
        if summary.status == "failed":
            log.info("%s (exit %d)", summary.line(), summary.exit_code)
    elapsed = max(summary.elapsed_s, 1e-9)
    summary.completions_per_s = round(summary.completed / elapsed, 2)
    summary.tokens_per_s = round((summary.prompt_tokens + summary.completion_tokens) / elapsed, 1)
    summary.cost_usd = round(summary.cost_usd, 6)
    summary.stopped = h.stopping
    if summary.total - summary.already_done - summary.completed > 0:
        summary.status, summary.exit_code = "partial", EXIT_PARTIAL
        if h.signals:  # not a cap, not a failure: the user stopped it
            summary.status, summary.exit_code = "interrupted", EXIT_INTERRUPTED
    log.info("%s (exit %d)", summary.line(), summary.exit_code)
    return summary


def summary_json(summary: Summary) -> str:
    return json.dumps(asdict(summary), sort_keys=True)
