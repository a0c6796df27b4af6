"""Batch: harvest through an OpenAI-compatible Batch API, at its discount, resumable at every step.

    distill batch run data/runs/nightly --config configs/nightly.yaml    # cron: collect, then submit
    distill batch status data/runs/nightly

`submit` writes the run's pending requests as batch JSONL (custom_id = the store key), split at the
provider's limits, uploads the files and creates the batches; `collect` polls them and commits the
answers of ended ones; `run` does both (with --wait, until every batch has ended); `cancel` stops
them. Keys are those of online harvesting (pipeline/harvest.py) and answers go through the same
`Store.add_response` with source="batch": a key stored either way is never asked again, and build
and finetune see no difference. Cost is recorded at the batch discount.

Each step with a remote effect is recorded in the store before and after it, so a crash anywhere is
recovered by the next command and nothing is submitted twice:
  1. prepare: a `batches` row (state prepared) and its requests, in one transaction;
  2. write RUN/batches/<id>.input.jsonl, upload it as distill-<id>.jsonl, record the file id
     (state uploaded); a crash before that record is recovered by finding the file by name;
  3. create the batch with metadata {distill_batch: <id>}, record its id (state submitted); a crash
     before that record is recovered by listing the server's batches;
  4. when the batch has ended (completed, expired, cancelled, failed), download its output and
     error files, commit every answer, then mark it collected. Committing twice changes nothing.
Keys of a collected batch left without an answer (expired, failed, cancelled, errored) are
pending again: the next submit sends those, and only those.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field, ValidationError

from pipeline.config import (
    StageConfig,
    dump_config,
    format_validation_error,
    load_config,
    read_yaml,
)
from pipeline.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARTIAL,
    ConfigError,
    DistillError,
    InputError,
    TeacherError,
    TransientError,
)
from pipeline.harvest import (
    HarvestConfig,
    check_prompt_identity,
    checked_rows,
    plan,
    sample_seed,
    store_key,
)
from pipeline.prompts import PromptRow
from pipeline.ratelimit import retrying
from pipeline.redact import redact
from pipeline.store import BATCH_OPEN_STATES, STORE_FILE, Store, log_early_failure, open_run
from pipeline.teacher import (
    Completion,
    TeacherConfig,
    batch_result,
    chat_body,
    http_client,
    raise_for_status,
    to_response,
    transport_error,
)

log = logging.getLogger("distill.batch")

ENDPOINT = "/v1/chat/completions"
ENDED = ("completed", "failed", "expired", "cancelled")

# Test hook: the tests set this to a step name to kill the process there (kill -9), then check
# that the next command recovers. Steps: prepared, written, uploaded, file_recorded, created,
# downloaded, ingested.
CRASH_ENV = "DISTILL_BATCH_CRASH_AT"


class BatchConfig(StageConfig):
    """`batch:` section. What to ask (prompts, teachers, generation settings) comes from the
    `harvest:` section of the same file, so a batch and an online harvest make the same keys."""

    teachers: list[str] | None = Field(
        None,
        description="Names of the teachers to ask through their Batch API (default: all). The others are left to online `distill harvest` (e.g. a local vLLM).",
    )
    discount: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Batch price as a fraction of each teacher's price_input/price_output (OpenAI: 0.5). Recorded per batch at submit.",
    )
    completion_window: str = Field(
        "24h", description="How long the provider may take (sent as completion_window)."
    )
    max_requests_per_file: int = Field(
        50_000, ge=1, description="Most requests in one batch file (OpenAI: 50,000)."
    )
    max_bytes_per_file: int = Field(
        200_000_000, ge=1024, description="Most bytes in one batch file (OpenAI: 200 MB)."
    )
    wait: bool = Field(
        False,
        description="collect/run: keep polling (and resubmitting expired requests) until every batch has ended, instead of returning at once.",
    )
    poll_interval: float = Field(60.0, gt=0, description="Seconds between polls with wait.")
    max_duration: float | None = Field(
        None,
        gt=0,
        description="With wait: stop after this many seconds (exit 3); a rerun picks up where it stopped.",
    )
    json_summary: bool = Field(
        False, description="Print the final summary as JSON on stdout (--json)."
    )


@dataclass
class BatchSummary:
    run_dir: str
    command: str
    status: str = "done"  # done | partial | failed
    wanted: int | None = None  # keys the config asks of batch teachers (submit, run)
    stored: int = 0  # of those (or, without a config, in the store) with an answer
    submitted_batches: int = 0  # created by this command
    submitted_requests: int = 0
    open_batches: int = 0  # not collected yet
    open_requests: int = 0
    collected_batches: int = 0  # by this command
    answers: int = 0  # committed by this command
    errors: int = 0  # request errors recorded by this command
    left: int = 0  # keys neither stored nor in an open batch: the next submit sends them
    cost_usd: float = 0.0
    failed_batches: list[str] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)  # `status` only
    elapsed_s: float = 0.0
    stopped: str | None = None
    exit_code: int = EXIT_OK

    def line(self) -> str:
        have = f"{self.stored}/{self.wanted}" if self.wanted is not None else f"{self.stored}"
        text = (
            f"batch {self.command} {self.status}: {have} answers stored ({self.answers} new, "
            f"{self.errors} errors, ${self.cost_usd:.4f}); {self.submitted_batches} batches "
            f"submitted ({self.submitted_requests} requests), {self.collected_batches} collected, "
            f"{self.open_batches} open ({self.open_requests} requests), {self.left} to submit "
            f"-> {self.run_dir}"
        )
        if self.failed_batches:
            text += f"; failed: {', '.join(self.failed_batches)}"
        if self.stopped:
            text += f"; stopped: {self.stopped}"
        if self.status == "partial":
            text += "; rerun later to continue"
        return text


def summary_json(summary: BatchSummary) -> str:
    return json.dumps(asdict(summary), sort_keys=True)


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


# -- the Files and Batches endpoints ----------------------------------------------------------------


class BatchAPI:
    """/files and /batches of one OpenAI-compatible server, with the harvester's retry policy."""

    def __init__(self, t: TeacherConfig):
        self.t = t
        self.client = http_client(t, base_url=t.base_url + "/")
        self.reached = False  # any HTTP answer yet: after one, a lost connection is transient

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _once(self, method: str, path: str, what: str, **kw: Any) -> Any:
        """One request, its failure classified: TransientError is retried, the rest is not."""
        try:
            resp = await self.client.request(method, path, **kw)
        except httpx.TimeoutException:
            raise TransientError(f"{what}: timed out after {self.t.timeout:g}s") from None
        except httpx.TransportError as e:
            raise transport_error(e, f"{self.t.base_url}/{path}", self.reached) from None
        self.reached = True
        if resp.status_code >= 400:
            raise_for_status(resp, self.t, what)
        try:
            return resp.json()
        except ValueError:
            raise TransientError(f"{what}: unparseable body {resp.text[:80]!r}") from None

    async def _call(self, method: str, path: str, what: str, **kw: Any) -> Any:
        """A read (or a cancel): safe to repeat, so simply retried."""
        async for attempt in retrying(self.t.max_retries):
            with attempt:
                return await self._once(method, path, what, **kw)
        raise AssertionError("unreachable")

    async def upload(self, path: Path, filename: str) -> str:
        # A try that timed out may still have stored the file: look for it before sending again.
        async for attempt in retrying(self.t.max_retries):
            with attempt:
                if attempt.retry_state.attempt_number > 1 and self.reached:  # else none stored
                    found = await self.find_file(filename)
                    if found is not None:
                        return found
                with path.open("rb") as fh:
                    files = {"file": (filename, fh, "application/jsonl")}
                    data = await self._once(
                        "POST", "files", "upload", files=files, data={"purpose": "batch"}
                    )
                return str(data["id"])
        raise AssertionError("unreachable")

    async def listed(self, path: str, what: str, **params: Any) -> AsyncIterator[dict[str, Any]]:
        """The items of a paginated list, page by page (`after`: the last id of the page before)."""
        while True:
            data = await self._call("GET", path, what, params=params)
            items = data.get("data") or []
            for item in items:
                yield item
            if not data.get("has_more") or not items:
                return
            params["after"] = items[-1]["id"]

    async def find_file(self, filename: str) -> str | None:
        """The id of an uploaded batch file by name (a crash may have hidden it from us)."""
        async for f in self.listed("files", "list files", purpose="batch", limit=10000):
            if f.get("filename") == filename:
                return str(f["id"])
        return None

    async def create(
        self, file_id: str, local_id: str, window: str, since: float
    ) -> dict[str, Any]:
        body = {
            "input_file_id": file_id,
            "endpoint": ENDPOINT,
            "completion_window": window,
            "metadata": {"distill_batch": local_id},
        }
        # A try that timed out may still have created the batch: never create it twice.
        async for attempt in retrying(self.t.max_retries):
            with attempt:
                if attempt.retry_state.attempt_number > 1 and self.reached:
                    found = await self.find_batch(local_id, since)
                    if found is not None:
                        return found
                return dict(await self._once("POST", "batches", "create", json=body))
        raise AssertionError("unreachable")

    async def find_batch(self, local_id: str, since: float) -> dict[str, Any] | None:
        """A batch we created but may not have recorded; the list is newest first."""
        async for b in self.listed("batches", "list batches", limit=100):
            if (b.get("metadata") or {}).get("distill_batch") == local_id:
                return dict(b)
            if (b.get("created_at") or since) < since:
                return None
        return None

    async def get(self, batch_id: str) -> dict[str, Any]:
        return dict(await self._call("GET", f"batches/{batch_id}", "status"))

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return dict(await self._call("POST", f"batches/{batch_id}/cancel", "cancel"))

    async def download(self, file_id: str, dest: Path) -> None:
        """Stream a file to `dest` (written whole or not at all)."""
        tmp = dest.with_suffix(".part")
        async for attempt in retrying(self.t.max_retries):
            with attempt:
                try:
                    async with self.client.stream("GET", f"files/{file_id}/content") as resp:
                        self.reached = True
                        if resp.status_code >= 400:
                            await resp.aread()
                            raise_for_status(resp, self.t, "download")
                        with tmp.open("wb") as out:
                            async for chunk in resp.aiter_bytes():
                                out.write(chunk)
                except httpx.TimeoutException:
                    raise TransientError(f"download: timed out after {self.t.timeout:g}s") from None
                except httpx.TransportError as e:
                    url = f"{self.t.base_url}/files/{file_id}/content"
                    raise transport_error(e, url, self.reached) from None
        os.replace(tmp, dest)


# -- one command on one run directory -----------------------------------------------------------------


class BatchRun:
    """The store of a run, its batches, and a client per teacher endpoint."""

    def __init__(self, run_dir: Path, bcfg: BatchConfig, store: Store, summary: BatchSummary):
        self.files = run_dir / "batches"
        self.bcfg = bcfg
        self.store = store
        self.summary = summary
        self.apis: dict[tuple[str, str], BatchAPI] = {}
        self.wanted: set[str] | None = None  # keys the config asks for (set by pending)
        self.done: set[str] = set()
        # Keys the server refused in this command (an HTTP error, an unusable body): not sent
        # again by the same command, so they cannot loop under --wait; the next run retries them.
        # Expired or cancelled keys are sent again at once.
        self.refused: set[str] = set()

    def api(self, t: TeacherConfig) -> BatchAPI:
        k = (t.base_url, t.api_key_env)
        if k not in self.apis:
            self.apis[k] = BatchAPI(t)
        return self.apis[k]

    async def aclose(self) -> None:
        for api in self.apis.values():
            await api.aclose()

    # -- submit -------------------------------------------------------------------------------------

    def pending(self, hcfg: HarvestConfig, rows: list[PromptRow]) -> dict[str, list[dict]]:
        """Per batch teacher: the requests whose key is neither stored nor out in a batch."""
        done = self.store.done_keys()
        out = self.store.keys_in_open_batches()
        params = hcfg.generation_params()
        wanted: set[str] = set()
        todo: dict[str, list[dict]] = {}
        # Planned against no done keys: every wanted key is counted, routing applies.
        for t, jobs in plan(hcfg, rows, set(), teachers=batch_teachers(hcfg, self.bcfg)).jobs:
            todo[t.label] = []
            for row, sample in ((j.row, i) for j in jobs for i in j.samples):
                key = store_key(t, row, params, sample)
                wanted.add(key)
                if key in done or key in out or key in self.refused:
                    continue
                request = {  # one request per key (custom_id = key), shaped as online
                    "body": chat_body(t, row.messages, params, seed=sample_seed(hcfg, row, sample)),
                    "params": params,
                    "source": row.source,
                    "messages": row.messages,
                    "reference": row.reference,
                    "meta": row.meta,
                }
                todo[t.label].append(
                    {
                        "key": key,
                        "prompt_id": row.id,
                        "sample_index": sample,
                        "request": request,
                    }
                )
        self.wanted = wanted
        return todo

    def chunks(self, requests: list[dict]) -> Iterator[list[dict]]:
        """Split at the provider's limits on requests and bytes per file."""
        chunk: list[dict] = []
        size = 0
        for r in requests:
            n = len(_line(r).encode("utf-8"))
            if n > self.bcfg.max_bytes_per_file:
                raise InputError(
                    f"{r['request']['source']}: one request is {n} bytes, more than "
                    f"max_bytes_per_file ({self.bcfg.max_bytes_per_file}); shorten the prompt "
                    "or harvest it online"
                )
            full = len(chunk) >= self.bcfg.max_requests_per_file
            if chunk and (full or size + n > self.bcfg.max_bytes_per_file):
                yield chunk
                chunk, size = [], 0
            chunk.append(r)
            size += n
        if chunk:
            yield chunk

    async def submit(self, hcfg: HarvestConfig, rows: list[PromptRow]) -> None:
        await self.resume()
        teachers = {t.label: t for t in batch_teachers(hcfg, self.bcfg)}
        for label, requests in self.pending(hcfg, rows).items():
            for chunk in self.chunks(requests):
                local_id = self.prepare(teachers[label], chunk)
                _crash_point("prepared")
                batch = next(b for b in self.store.batches() if b["id"] == local_id)
                await self.advance(batch, recovering=False)

    def prepare(self, t: TeacherConfig, requests: list[dict]) -> str:
        local_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)
        # The prices recorded are the batch prices: cost at ingest needs no config.
        priced = t.model_copy(
            update={
                "price_input": t.price_input * self.bcfg.discount,
                "price_output": t.price_output * self.bcfg.discount,
            }
        )
        self.store.add_batch(
            {
                "id": local_id,
                "teacher": t.label,
                "teacher_config": redact(priced.model_dump_json()),  # no URL credentials on disk
                "state": "prepared",
                "request_count": len(requests),
            },
            requests,
        )
        log.info("batch %s: prepared %d requests for %s", local_id, len(requests), t.label)
        return local_id

    async def resume(self, *, create: bool = True) -> None:
        """Finish submissions a crash interrupted (or, for cancel, forget those never created)."""
        for b in self.store.batches(("prepared", "uploaded")):
            log.info("batch %s: resuming from state %s", b["id"], b["state"])
            await self.advance(b, recovering=True, create=create)

    async def advance(self, b: dict[str, Any], *, recovering: bool, create: bool = True) -> None:
        """prepared -> uploaded -> submitted, each step recorded as soon as it is done."""
        t = TeacherConfig.model_validate_json(b["teacher_config"])
        api = self.api(t)
        local_id = b["id"]
        filename = f"distill-{local_id}.jsonl"
        if b["state"] == "prepared":
            file_id = await api.find_file(filename) if recovering else None
            if file_id is None and not create:
                self.store.update_batch(local_id, state="abandoned")
                return
            path = self.files / f"{local_id}.input.jsonl"
            if file_id is None:
                self.write_input(local_id, path)
                _crash_point("written")
                file_id = await api.upload(path, filename)
                _crash_point("uploaded")
            self.store.update_batch(local_id, state="uploaded", input_file_id=file_id)
            b = {**b, "state": "uploaded", "input_file_id": file_id}
            path.unlink(missing_ok=True)
            _crash_point("file_recorded")
        if b["state"] == "uploaded":
            since = _epoch(b["created_at"]) - 3600  # allow for clock skew
            remote = await api.find_batch(local_id, since) if recovering else None
            if remote is None:
                if not create:
                    self.store.update_batch(local_id, state="abandoned")
                    return
                window = self.bcfg.completion_window
                remote = await api.create(b["input_file_id"], local_id, window, since)
                _crash_point("created")
                self.summary.submitted_batches += 1
                self.summary.submitted_requests += b["request_count"]
            self.record(local_id, remote, state="submitted")
            log.info("batch %s: submitted as %s", local_id, remote.get("id"))

    def write_input(self, local_id: str, path: Path) -> None:
        self.files.mkdir(exist_ok=True)
        tmp = path.with_suffix(".part")
        with tmp.open("w", encoding="utf-8") as f:
            for r in self.store.batch_requests(local_id):
                f.write(_line(r))
        os.replace(tmp, path)  # a file on disk is always whole

    def record(self, local_id: str, remote: dict[str, Any], **extra: Any) -> None:
        counts = remote.get("request_counts") or {}
        errors = (remote.get("errors") or {}).get("data") or []
        self.store.update_batch(
            local_id,
            batch_id=remote.get("id"),
            remote_status=remote.get("status"),
            output_file_id=remote.get("output_file_id"),
            error_file_id=remote.get("error_file_id"),
            completed=counts.get("completed"),
            failed=counts.get("failed"),
            error="; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or None,
            **extra,
        )

    # -- collect ------------------------------------------------------------------------------------

    async def collect(self) -> None:
        await self.resume()
        self.done = self.store.done_keys()
        for b in self.store.batches(("submitted",)):
            t = TeacherConfig.model_validate_json(b["teacher_config"])
            remote = await self.api(t).get(b["batch_id"])
            self.record(b["id"], remote)
            if remote.get("status") in ENDED:
                await self.ingest(b, t, remote)

    async def ingest(self, b: dict[str, Any], t: TeacherConfig, remote: dict[str, Any]) -> None:
        requests = {r["key"]: r for r in self.store.batch_requests(b["id"])}
        self.files.mkdir(exist_ok=True)
        for kind in ("output", "error"):
            file_id = remote.get(f"{kind}_file_id")
            if not file_id:
                continue
            path = self.files / f"{b['id']}.{kind}.jsonl"
            if not path.exists():  # downloaded before a crash: whole (written via rename)
                await self.api(t).download(file_id, path)
            _crash_point("downloaded")
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, start=1):
                    if line.strip():
                        self.ingest_line(b, t, requests, line, f"{path}:{n}")
        _crash_point("ingested")
        self.store.update_batch(b["id"], state="collected")
        for kind in ("output", "error"):
            (self.files / f"{b['id']}.{kind}.jsonl").unlink(missing_ok=True)
        self.summary.collected_batches += 1
        status = remote.get("status")
        if status == "failed":
            why = "; ".join(
                f"{e.get('code')}: {e.get('message')}"
                for e in (remote.get("errors") or {}).get("data") or []
            )
            self.summary.failed_batches.append(f"{b['id']} ({why or 'no reason given'})")
            log.warning("batch %s (%s) failed: %s", b["id"], b["batch_id"], why)
        log.info("batch %s: %s, collected", b["id"], status)

    def ingest_line(
        self, b: dict[str, Any], t: TeacherConfig, requests: dict[str, dict], line: str, src: str
    ) -> None:
        try:
            rec = json.loads(line)
            key = rec.get("custom_id")
        except (json.JSONDecodeError, AttributeError):
            log.warning("%s: not a batch result line; skipped", src)
            return
        req = requests.get(key)
        if req is None:
            log.warning("%s: custom_id %r is not a request of batch %s; skipped", src, key, b["id"])
            return
        if key in self.done:
            return
        status, got = batch_result(rec)
        if isinstance(got, Completion):
            self.commit(t, req, got)
            return
        if status is not None:  # the server answered this request, with a refusal
            self.refused.add(key)
        self.store.add_failure(
            key,
            req["prompt_id"],
            req["sample_index"],
            t.label,
            status,
            f"batch {b['id']}: {got}",
            1,
        )
        self.summary.errors += 1

    def commit(self, t: TeacherConfig, req: dict[str, Any], completion: Completion) -> None:
        """Store the answer to one batch request (a key already stored changes nothing)."""
        key = req["key"]
        r = req["request"]
        row = PromptRow(
            id=req["prompt_id"],
            messages=r["messages"],
            source=r["source"],
            reference=r["reference"],
            meta=r["meta"] or {},
        )
        spent = completion.cost_usd(t)
        added = self.store.add_response(
            to_response(
                t,
                row,
                req["sample_index"],
                key,
                r["params"],
                completion,
                completion.choices[0],
                split=1,
                cost=spent,
                attempts=self.store.batch_attempts(key),
                source="batch",
            )
        )
        if added:
            self.done.add(key)
            self.summary.answers += 1
            self.summary.cost_usd += spent

    # -- cancel -------------------------------------------------------------------------------------

    async def cancel(self) -> None:
        await self.resume(create=False)
        for b in self.store.batches(("submitted",)):
            if b["remote_status"] in ENDED or b["remote_status"] == "cancelling":
                continue
            t = TeacherConfig.model_validate_json(b["teacher_config"])
            remote = await self.api(t).cancel(b["batch_id"])
            self.record(b["id"], remote)
            log.info("batch %s (%s): %s", b["id"], b["batch_id"], remote.get("status"))

    # -- the tally ----------------------------------------------------------------------------------

    def tally(self) -> None:
        s = self.summary
        self.count(self.wanted)
        s.cost_usd = round(s.cost_usd, 6)
        # Done means this command's job is done: submit, that nothing is left unsubmitted;
        # cancel, that cancelling was asked; collect and run, that every answer is in.
        if s.failed_batches:
            s.status, s.exit_code = "failed", EXIT_FAILED
        elif s.command != "cancel" and (s.left or (s.open_batches and s.command != "submit")):
            s.status, s.exit_code = "partial", EXIT_PARTIAL

    def count(self, wanted: set[str] | None) -> None:
        """The summary's answers stored, keys left to submit and open batches (`status` too)."""
        s = self.summary
        done = self.store.done_keys()
        out = self.store.keys_in_open_batches()
        if wanted is None:  # without a config: the keys batches have asked for
            wanted = self.store.batch_keys()
        else:
            s.wanted = len(wanted)
        s.stored = len(wanted & done) if s.wanted is not None else len(done)
        s.left = len(wanted - done - out)
        open_batches = self.store.batches(BATCH_OPEN_STATES)
        s.open_batches = len(open_batches)
        s.open_requests = sum(b["request_count"] for b in open_batches)


def _line(r: dict[str, Any]) -> str:
    line = {"custom_id": r["key"], "method": "POST", "url": ENDPOINT, "body": r["request"]["body"]}
    return json.dumps(line, ensure_ascii=False) + "\n"


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def batch_teachers(hcfg: HarvestConfig, bcfg: BatchConfig) -> list[TeacherConfig]:
    teachers = hcfg.all_teachers()
    if bcfg.teachers is None:
        return teachers
    labels = [t.label for t in teachers]
    unknown = [n for n in bcfg.teachers if n not in labels]
    if unknown:
        raise ConfigError(
            f"batch.teachers names {unknown[0]!r}, which is no teacher of the harvest config "
            f"(teachers: {', '.join(labels)}); fix the name"
        )
    return [t for t in teachers if t.label in bcfg.teachers]


# -- entry points ----------------------------------------------------------------------------------------


def harvest_config(run_dir: Path, config_path: Path | None, flags: dict[str, Any]) -> HarvestConfig:
    """The `harvest:` section of --config, else the config.yaml a previous submit left in RUN;
    flags override either. `out` is always RUN."""
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    given["out"] = run_dir
    saved = run_dir / "config.yaml"
    if config_path is None and saved.is_file():
        data = read_yaml(saved)
        if data.get("teachers"):  # the dump holds every field; these two belong to each teacher
            data.pop("model", None)
            data.pop("base_url", None)
        try:
            return HarvestConfig.model_validate({**data, **given})
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, str(saved))) from None
    if config_path is None and not given.get("prompts"):
        raise ConfigError(
            f"{run_dir}: no config.yaml from an earlier submit; pass --config FILE (its harvest: "
            "section says what to ask) or --prompts and --model"
        )
    return load_config(HarvestConfig, config_path, "harvest", given)


def run_batch(
    command: str,
    run_dir: Path,
    bcfg: BatchConfig,
    hcfg: HarvestConfig | None = None,
) -> BatchSummary:
    """One batch command (submit, collect, run, cancel) on a run directory; returns its summary.
    submit and run need `hcfg` (what to ask); collect and cancel need only the store."""
    run_dir = Path(run_dir)
    summary = BatchSummary(run_dir=str(run_dir), command=command)
    try:
        return _run_batch(command, run_dir, bcfg, hcfg, summary)
    except DistillError as e:
        if summary.status != "failed":  # raised before harvest.log was open (else logged there)
            log_early_failure(run_dir, "harvest", e, f"batch {command}")
        raise


def _run_batch(
    command: str,
    run_dir: Path,
    bcfg: BatchConfig,
    hcfg: HarvestConfig | None,
    summary: BatchSummary,
) -> BatchSummary:
    rows: list[PromptRow] = []
    if hcfg is not None:
        batch_teachers(hcfg, bcfg)
        rows = checked_rows(hcfg)  # input errors surface before the store is touched
    started = time.monotonic()
    if hcfg is None and not (run_dir / STORE_FILE).is_file():  # collect, cancel: nothing to do
        raise InputError(
            f"{run_dir}: no harvest store here ({STORE_FILE} missing); "
            f"run `distill batch submit {run_dir}` first or check the path"
        )
    with open_run(run_dir, log, None if hcfg is None else dump_config(hcfg)) as store:
        log.info("batch %s start", command)
        b = BatchRun(run_dir, bcfg, store, summary)

        async def go() -> None:
            try:
                while True:
                    if command in ("collect", "run"):
                        await b.collect()
                    # A batch that failed is not resubmitted in the same command (it would fail
                    # again at once if its input was refused); the next run tries again.
                    if command in ("submit", "run") and hcfg and not summary.failed_batches:
                        await b.submit(hcfg, rows)
                    if command == "cancel":
                        await b.cancel()
                    if not bcfg.wait or command not in ("collect", "run"):
                        return
                    if summary.failed_batches or not store.batches(BATCH_OPEN_STATES):
                        return
                    elapsed = time.monotonic() - started
                    if bcfg.max_duration is not None and elapsed >= bcfg.max_duration:
                        summary.stopped = f"max_duration of {bcfg.max_duration:g}s reached"
                        return
                    left = (bcfg.max_duration or float("inf")) - elapsed
                    await asyncio.sleep(min(bcfg.poll_interval, left))
            finally:
                await b.aclose()

        try:
            if hcfg is not None:
                check_prompt_identity(hcfg, store, rows)
            try:
                asyncio.run(go())
            except TransientError as e:
                if isinstance(e, DistillError):
                    raise
                raise TeacherError(f"{e}; gave up after retries: rerun later") from None
        except DistillError as e:  # the log tells the whole story, fatal errors included
            log.error("batch %s failed: %s (exit %d)", command, e, e.exit_code)
            summary.status = "failed"
            raise
        b.tally()
        summary.elapsed_s = round(time.monotonic() - started, 3)
        log.info("%s (exit %d)", summary.line(), summary.exit_code)
    return summary


def status(run_dir: Path) -> BatchSummary:
    """What each batch of a run is doing, asked of the server; reads the store, changes nothing
    (so it works while a run holds the lock)."""
    run_dir = Path(run_dir)
    summary = BatchSummary(run_dir=str(run_dir), command="status")
    with Store(run_dir, readonly=True) as store:
        store.check()  # it reads only the batches table: a damaged store must not look fine
        run = BatchRun(run_dir, BatchConfig(), store, summary)

        async def ask() -> None:
            try:
                for b in store.batches():
                    keys = ("id", "teacher", "state", "batch_id", "request_count", "remote_status")
                    info = {k: b[k] for k in keys}
                    if b["state"] == "submitted":
                        t = TeacherConfig.model_validate_json(b["teacher_config"])
                        remote = await run.api(t).get(b["batch_id"])
                        info["remote_status"] = remote.get("status")
                        info["request_counts"] = remote.get("request_counts")
                    summary.batches.append(info)
            finally:
                await run.aclose()

        asyncio.run(ask())
        run.count(None)
    return summary
