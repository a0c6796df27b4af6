"""What an endpoint can do, found with a few cheap requests before paying for a harvest.

    distill probe --base-url http://127.0.0.1:8000/v1 --model Qwen/Qwen3-0.6B

At most `max_requests` small requests (one short prompt, `max_tokens` 16), stopped early when
`max_cost` would be passed:
1. chat with `n=2`, `logprobs`, `top_logprobs=20` (then 5, then 1, then no logprobs when the
   server refuses): is `n` honoured, do logprobs come back and up to which k, where does the
   reasoning arrive, which rate-limit headers are sent, how long an answer takes;
2. /v1/completions scoring a given text: vLLM's `prompt_logprobs`, else `echo` + `logprobs`;
3. GET /v1/batches?limit=1: is there a Batch API.
A bad key, an unknown model or a closed port raise the same one-line errors as harvest
(`raise_for_status` in teacher.py). The result goes to `probe.json` in a run directory, where
harvest can read it back while it is fresh (`read_probe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, Field

from pipeline.errors import PromptRejected, TeacherError, TransientError
from pipeline.redact import redact
from pipeline.teacher import (
    ReasoningShape,
    TeacherConfig,
    chat_body,
    connect_failure,
    cost,
    estimate_tokens,
    http_client,
    parse_completion,
    raise_for_status,
    score_body,
    scores_in,
    usage_cost,
)

PROBE_FILE = "probe.json"
PROMPT = [{"role": "user", "content": "Say OK."}]
SCORED_TEXT = "The capital of France is Paris."
TOP_K_TRIES = (20, 5, 1)


class ProbeResult(BaseModel):
    """What one endpoint answered; None where the probe could not tell (skipped, or refused)."""

    base_url: str = Field(description="API root probed, credentials masked (redact.py).")
    model: str = Field(description="Model name sent.")
    probed_at: float = Field(description="Unix time of the probe.")
    requests: int = Field(0, description="Requests sent by the probe.")
    cost_usd: float = Field(0.0, description="What the probe's answers cost at the given prices.")
    latency_s: float | None = Field(None, description="Median seconds for one short chat answer.")
    n_honoured: bool | None = Field(None, description="`n=2` returned two choices.")
    logprobs: bool | None = Field(None, description="`logprobs: true` returned token logprobs.")
    top_logprobs: int | None = Field(
        None, description="Largest `top_logprobs` (of 20, 5, 1) accepted and returned; 0: none."
    )
    scoring: Literal["prompt_logprobs", "echo"] | None = Field(
        None, description="How /v1/completions scores a given text, if it can."
    )
    reasoning: ReasoningShape | None = Field(
        None, description="Where the reasoning trace arrives (None: none seen)."
    )
    ratelimit_headers: dict[str, str] = Field(
        default_factory=dict, description="x-ratelimit-limit-* headers the server sent."
    )
    batch_api: bool | None = Field(None, description="GET /v1/batches answered 200.")
    notes: list[str] = Field(default_factory=list, description="What was skipped, and why.")


class _Prober:
    def __init__(
        self, t: TeacherConfig, client: httpx.AsyncClient, max_cost: float | None, max_requests: int
    ):
        self.t, self.client = t, client
        self.max_cost, self.max_requests = max_cost, max_requests
        self.result = ProbeResult(
            base_url=redact(t.base_url), model=t.model or "", probed_at=time.time()
        )
        self.latencies: list[float] = []

    def may_send(self, what: str, worst_tokens: tuple[int, int]) -> bool:
        r = self.result
        if r.requests >= self.max_requests:
            r.notes.append(f"{what}: skipped, max_requests {self.max_requests} reached")
            return False
        if self.max_cost is not None and r.cost_usd + cost(self.t, *worst_tokens) > self.max_cost:
            r.notes.append(f"{what}: skipped, max_cost ${self.max_cost:g} would be passed")
            return False
        return True

    async def send(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        """One request; a connection failure or timeout is the whole probe's failure."""
        self.result.requests += 1
        url = f"{self.t.base_url}{path}"
        started = time.monotonic()
        try:
            resp = await self.client.request(method, url, json=body)
        # `from e` on what may pass (no answer, 429/5xx): harvest's own probe goes on without it.
        except httpx.TimeoutException as e:
            raise TeacherError(
                f"{url}: no answer in {self.t.timeout:g}s; is the server up (and the model loaded)?"
            ) from e
        except httpx.TransportError as e:
            raise TeacherError(
                f"{connect_failure(e, url)}; is the server running, "
                "and is the base URL right (it usually ends in /v1)?"
            ) from e
        resp.extensions["latency_s"] = time.monotonic() - started
        with contextlib.suppress(ValueError):  # an unreadable body: nothing to count
            self.result.cost_usd += usage_cost(self.t, resp.json())
        for k, v in resp.headers.items():
            if k.lower().startswith("x-ratelimit-limit-"):
                self.result.ratelimit_headers[k.lower()] = v
        return resp

    async def chat(self, max_tokens: int, top_k_tries: tuple[int, ...]) -> None:
        r = self.result
        prompt = estimate_tokens(PROMPT)
        for k in (*top_k_tries, 0):
            if not self.may_send("chat", (prompt, 2 * max_tokens)):
                return
            params: dict[str, Any] = {"logprobs": True, "top_logprobs": k} if k else {}
            body = chat_body(self.t, PROMPT, params, n=2, max_tokens=max_tokens)
            resp = await self.send("POST", "/chat/completions", body)
            if resp.status_code in (400, 422):
                r.notes.append(
                    f"top_logprobs={k} refused: HTTP {resp.status_code}" if k else "chat refused"
                )
                continue
            if resp.status_code != 200:
                try:
                    raise_for_status(resp, self.t)
                except (TransientError, PromptRejected) as e:
                    raise TeacherError(f"{e}; try the probe again when the server answers") from e
            self.latencies.append(resp.extensions["latency_s"])
            try:
                choices = parse_completion(resp.json(), None).choices
            except (ValueError, TransientError):  # no usable choice: nothing honoured
                choices = []
            r.n_honoured = len(choices) >= 2
            r.reasoning = choices[0].reasoning_shape if choices else None
            rows = (choices[0].logprobs if choices else None) or []
            # Accepted but ignored: a smaller k would not do better.
            r.logprobs = bool(rows)
            r.top_logprobs = min(k, max(len(alts) for *_, alts in rows)) if rows else 0
            if not rows and k:
                r.notes.append(f"logprobs asked (top_logprobs={k}) but none came back")
            return

    async def scoring(self) -> None:
        names: tuple[Literal["prompt_logprobs", "echo"], ...] = ("prompt_logprobs", "echo")
        tokens = (estimate_tokens(SCORED_TEXT), 1)
        for name in names:
            if not self.may_send(f"scoring ({name})", tokens):
                return
            body = score_body(self.t, SCORED_TEXT, name, top_k=1)
            resp = await self.send("POST", "/completions", body)
            if resp.status_code == 404:
                return  # no /v1/completions at all
            if resp.status_code != 200:
                continue
            try:
                scores_in(resp.json(), name)
            except (ValueError, TransientError):
                continue
            self.result.scoring = name
            return

    async def batches(self) -> None:
        if self.may_send("batch API", (0, 0)):
            resp = await self.send("GET", "/batches?limit=1")
            self.result.batch_api = resp.status_code == 200


def probe(
    base_url: str,
    model: str,
    api_key_env: str = "OPENAI_API_KEY",
    max_cost: float | None = None,
    *,
    teacher: TeacherConfig | None = None,
    max_requests: int = 8,
    max_tokens: int = 16,
    timeout: float = 60.0,
    top_k_tries: tuple[int, ...] = TOP_K_TRIES,
) -> ProbeResult:
    """Probe one endpoint (see the module docstring). `teacher` supplies prices and extra_body
    (from a harvest config); `base_url`, `model` and `api_key_env` override its fields. Harvest
    probes with `max_requests=1` and the one `top_logprobs` it will ask (`top_k_tries=(k,)`)."""
    fields = teacher.model_dump() if teacher is not None else {}
    fields.update(base_url=base_url, model=model, api_key_env=api_key_env, timeout=timeout)
    t = TeacherConfig(**fields)

    async def run() -> ProbeResult:
        async with http_client(t) as client:
            p = _Prober(t, client, max_cost, max_requests)
            await p.chat(max_tokens, top_k_tries)
            await p.scoring()
            await p.batches()
        if p.latencies:
            p.result.latency_s = round(statistics.median(p.latencies), 4)
        return p.result

    return asyncio.run(run())


def write_probe(run_dir: Path, result: ProbeResult) -> Path:
    """Store the result as `probe.json` in the run directory (written whole, then renamed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / PROBE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_probe(
    run_dir: Path,
    max_age_s: float = 86400.0,
    *,
    base_url: str | None = None,
    model: str | None = None,
) -> ProbeResult | None:
    """The stored probe result if there is one younger than `max_age_s` (and, when given, of the
    same base_url and model); None otherwise, or when the file cannot be read. URLs are compared
    redacted: the stored one has its credentials masked."""
    path = run_dir / PROBE_FILE
    try:
        result = ProbeResult.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None
    if time.time() - result.probed_at > max_age_s:
        return None
    if base_url is not None and redact(result.base_url) != redact(base_url.rstrip("/")):
        return None
    if model is not None and result.model != model:
        return None
    return result


def _yes_no(v: bool | None) -> str:
    return "?" if v is None else "yes" if v else "no"


def table(result: ProbeResult) -> str:
    """The result as aligned `what  answer` lines, for the terminal."""
    r = result
    headers = ", ".join(sorted(r.ratelimit_headers)) or "none"
    rows = [
        ("endpoint", f"{r.base_url} ({r.model})"),
        ("n honoured", _yes_no(r.n_honoured)),
        ("logprobs", _yes_no(r.logprobs)),
        ("top_logprobs", "?" if r.top_logprobs is None else str(r.top_logprobs)),
        ("text scoring", r.scoring or "none"),
        ("reasoning", r.reasoning or "none seen"),
        ("rate-limit headers", headers),
        ("batch API", _yes_no(r.batch_api)),
        ("latency", "?" if r.latency_s is None else f"{r.latency_s:.3f}s"),
        ("probe cost", f"{r.requests} requests, ${r.cost_usd:.6f}"),
    ]
    rows += [("note", n) for n in r.notes]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
