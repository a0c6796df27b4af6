"""The OpenAI chat-completions wire format, and a client for one teacher endpoint.

Everything that knows the API's shape lives here: the request body (`chat_body`, used by harvest,
batch, the probe and the eval judge; `score_body` for /completions scoring), the reply
(`parse_completion`, `batch_result` for a Batch API output line, `parse_scores`), what it costs
(`cost`, `usage_cost`, `estimate_tokens`), the stored record it becomes (`to_response`), and what
an HTTP status means (`raise_for_status`, for the chat endpoint and the Batch API's /files and
/batches calls):
- `TransientError` (timeout, dropped connection, 408/409/429/5xx, unparseable body, empty
  `choices`): the retry policy in ratelimit.py tries again;
- `PromptRejected` (400/422 on a chat request): this prompt's failure, recorded; the run goes on;
- `TeacherError` (401/403 key, 404 model or URL, a refused Batch API call): the run stops with
  what to fix;
- `Unreachable` (connection refused, unknown host, TLS failure before the server ever answered):
  retried for a few seconds, then the run stops naming the URL and the cause (`connect_failure`).

The reasoning trace lands in one field whichever way the server sends it: `reasoning_content`
(DeepSeek, vLLM), `reasoning` (OpenRouter), or inline `<think>...</think>` at the start of the
content (then split off the answer by pipeline/reasoning.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypeVar
from urllib.parse import urlparse

import certifi
import httpx
from pydantic import Field, field_validator

from pipeline.config import StageConfig
from pipeline.errors import ConfigError, PromptRejected, TeacherError, TransientError, Unreachable
from pipeline.prompts import PromptRow
from pipeline.ratelimit import Limiter, parse_retry_after
from pipeline.reasoning import content_text, has_think, split_think
from pipeline.record import Response, content_hash, pack_logprobs, utcnow
from pipeline.redact import redact, remember_secret

T = TypeVar("T")

POOL_SIZE = 4  # connections per httpx pool (see Teacher.__init__)


class TeacherConfig(StageConfig):
    """Who answers, and how hard we may push it."""

    name: str | None = Field(
        None, description="Label recorded in every row as `teacher` (default: the model name)."
    )
    base_url: str = Field(
        default_factory=lambda: os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1",
        validate_default=True,
        description="OpenAI-compatible API root, e.g. https://api.deepseek.com/v1 or http://127.0.0.1:8000/v1 "
        "(default: $OPENAI_BASE_URL, else OpenAI).",
    )
    model: str | None = Field(None, description="Model name sent to the API (required).")
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="Name of the environment variable holding the API key. The key itself never goes in config, "
        "logs or the store. Unset: no Authorization header (local servers).",
    )
    rpm: float | None = Field(
        None,
        gt=0,
        description="Requests per minute to stay under (default: learned from x-ratelimit-* headers, else unlimited).",
    )
    tpm: float | None = Field(
        None,
        gt=0,
        description="Tokens per minute to stay under (prompt estimate + max_tokens reserved per request).",
    )
    concurrency: int = Field(
        16,
        ge=1,
        le=4096,
        description="Most requests in flight at once (adaptive below this on 429/503/timeouts).",
    )
    adaptive_concurrency: bool = Field(
        True,
        description="Adapt the in-flight limit (AIMD): cut to 0.9x on a refusal (503, header-less 429), halve on a timeout, grow by one per round trip while latency holds (one per 16 next to the level last refused).",
    )
    timeout: float = Field(
        600.0,
        gt=0,
        description="Seconds to wait for one response (reasoning models are slow: keep it long).",
    )
    max_retries: int = Field(
        8,
        ge=0,
        description="Retries of a transient failure (timeout, dropped connection, 408/409/429/5xx, garbage body).",
    )
    price_input: float = Field(
        0.0, ge=0, description="USD per million prompt tokens (for spend and --max-cost)."
    )
    price_output: float = Field(
        0.0, ge=0, description="USD per million completion tokens (reasoning tokens included)."
    )
    use_n: bool = Field(
        True,
        description="Ask for several samples in one request with the API's `n`; falls back to separate requests if the server ignores it.",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra JSON fields sent in every request to this teacher: transport options such as OpenRouter's include_reasoning. Not part of the store key (use generation_extra for anything that changes the answer).",
    )
    stream: bool = Field(
        False,
        description="Stream each answer (server-sent events, with stream_options.include_usage) instead of waiting for the whole body: for teachers that think for minutes (DeepSeek-R1), where a silent connection gets cut. The same rows are stored; `timeout` then bounds the wait between two chunks; a stream cut off is retried like a dropped connection.",
    )
    share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="With `routing: share`, the fraction of prompts this teacher answers (picked by a hash of the prompt id, so stable across runs); teachers without one split what is left.",
    )

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        v = v.strip()  # a pasted URL often ends in a space or newline
        u = urlparse(v)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ValueError(f"base_url {v!r} is not an http(s) URL like https://api.openai.com/v1")
        return v.rstrip("/")

    @property
    def label(self) -> str:
        return self.name or self.model or "teacher"

    def api_key(self) -> str | None:
        """The key from the environment, remembered by redact.py so no output ever shows it."""
        key = os.environ.get(self.api_key_env) or None
        remember_secret(key)
        return key


ReasoningShape = Literal["reasoning_content", "reasoning", "think"]
REASONING_FIELDS: tuple[ReasoningShape, ...] = ("reasoning_content", "reasoning")


@dataclass
class Choice:
    """One parsed answer."""

    index: int
    content: str
    reasoning: str | None
    finish_reason: str | None
    logprobs: list | None  # [[token, logprob, [[alt, logprob], ...]], ...] (token_logprobs)
    reasoning_shape: ReasoningShape | None = None  # where the trace arrived (reasoning_shape)

    @property
    def has_logprobs(self) -> bool:
        """Token logprobs came back for this answer (an empty answer has none to give)."""
        return not self.content or bool(self.logprobs)


@dataclass
class Completion:
    choices: list[Choice]
    model: str | None
    response_id: str | None
    system_fingerprint: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    reasoning_tokens: int | None
    latency_s: float | None  # None for Batch API answers

    def cost_usd(self, t: TeacherConfig) -> float:
        """What the request cost at the teacher's prices (all its choices together)."""
        return cost(t, self.prompt_tokens or 0, self.completion_tokens or 0)


def reasoning_shape(message: dict[str, Any]) -> ReasoningShape | None:
    """Where a chat message carries its reasoning trace: a field, inline `<think>`, or None."""
    for key in REASONING_FIELDS:
        if isinstance(message.get(key), str) and message[key]:
            return key
    return "think" if has_think(content_text(message.get("content"))) else None


def split_reasoning(message: dict[str, Any]) -> tuple[str, str | None, ReasoningShape | None]:
    """(answer, reasoning, where it arrived) from a chat message, whichever shape the server used."""
    content = content_text(message.get("content"))
    shape = reasoning_shape(message)
    if shape in REASONING_FIELDS:
        return content, message[shape], shape
    return (*split_think(content), shape)


def token_logprobs(logprobs: Any) -> list | None:
    """OpenAI `choice.logprobs` -> [[token, logprob, [[alt, logprob], ...]], ...] (what the store
    packs, record.pack_logprobs), or None when there are none."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not content:
        return None
    return [
        [
            t.get("token"),
            t.get("logprob"),
            [[a.get("token"), a.get("logprob")] for a in t.get("top_logprobs") or []],
        ]
        for t in content
    ]


def chat_body(
    t: TeacherConfig,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    *,
    n: int = 1,
    max_tokens: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The JSON body of one chat-completions request: `params` (generation settings), then the
    overrides for this request, then the teacher's transport-only `extra_body`."""
    body: dict[str, Any] = {"model": t.model, "messages": messages, **params}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if n > 1:
        body["n"] = n
    if seed is not None:
        body["seed"] = seed
    body.update(t.extra_body)
    return body


def estimate_tokens(messages: list[dict[str, Any]] | str) -> int:
    """~4 characters a token, plus a few per message: good enough to reserve budget. A plain text
    (a /completions prompt) has no message overhead."""
    if isinstance(messages, str):
        return len(messages) // 4 + 1
    chars = sum(
        len(m["content"]) if isinstance(m["content"], str) else len(json.dumps(m["content"]))
        for m in messages
    )
    return chars // 4 + 4 * len(messages) + 3


def cost(t: TeacherConfig, prompt_tokens: float, completion_tokens: float) -> float:
    """USD at the teacher's prices (per million tokens)."""
    return (prompt_tokens * t.price_input + completion_tokens * t.price_output) / 1e6


def _usage(data: Any) -> dict[str, Any]:
    usage = data.get("usage") if isinstance(data, dict) else None
    return usage if isinstance(usage, dict) else {}


def usage_cost(t: TeacherConfig, data: Any) -> float:
    """What a reply body (chat or /completions) cost by its `usage`; 0 when it has none."""
    usage = _usage(data)
    return cost(t, usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)


def parse_completion(data: Any, latency_s: float | None) -> Completion:
    """A chat-completion body (online, or one line of a Batch API output file) -> Completion.
    A body without usable choices raises TransientError: asking again may well work."""
    if not (isinstance(data, dict) and isinstance(data.get("choices"), list) and data["choices"]):
        if isinstance(data, dict) and data.get("error"):
            raise TransientError(
                f"HTTP 200 with an error body: {str(data['error'])[:200]}", status=200
            )
        raise TransientError("HTTP 200 with empty or missing choices", status=200)
    choices = []
    for i, c in enumerate(data["choices"]):
        if not isinstance(c, dict) or not isinstance(c.get("message"), dict):
            raise TransientError("HTTP 200 with a malformed choice", status=200)
        answer, reasoning, shape = split_reasoning(c["message"])
        choices.append(
            Choice(
                index=int(c.get("index", i)),
                content=answer,
                reasoning=reasoning,
                finish_reason=c.get("finish_reason"),
                logprobs=token_logprobs(c.get("logprobs")),
                reasoning_shape=shape,
            )
        )
    choices.sort(key=lambda c: c.index)
    usage = _usage(data)
    details = usage.get("completion_tokens_details") or {}
    return Completion(
        choices=choices,
        model=data.get("model"),
        response_id=data.get("id"),
        system_fingerprint=data.get("system_fingerprint"),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        reasoning_tokens=details.get("reasoning_tokens") if isinstance(details, dict) else None,
        latency_s=latency_s,
    )


def batch_result(line: dict[str, Any]) -> tuple[int | None, Completion | str]:
    """One line of a Batch API output or error file -> (the HTTP status its request got, None if
    it never ran; the Completion, or what went wrong as "code: message")."""
    resp = line.get("response") or {}
    status, error = resp.get("status_code"), line.get("error")
    if status == 200 and not error:
        try:
            return status, parse_completion(resp.get("body"), None)
        except TransientError as e:
            return status, str(e)
    if not error:
        body = resp.get("body") or {}
        error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return status, str(error)
    code = error.get("code")
    return status, f"{code + ': ' if code else ''}{error.get('message')}"


def assemble_stream(chunks: list[Any]) -> dict[str, Any]:
    """The `data:` chunks of one streamed answer -> the body the same request returns unstreamed:
    each choice's content, reasoning_content / reasoning and logprobs joined from its deltas
    (inline <think> stays in the content, as unstreamed), the last chunk's usage."""
    body: dict[str, Any] = {"choices": []}
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        if not isinstance(chunk, dict):
            raise TransientError(f"stream chunk is not an object: {str(chunk)[:80]!r}", status=200)
        if chunk.get("error"):
            raise TransientError(f"error in stream: {str(chunk['error'])[:200]}", status=200)
        for key in ("id", "model", "system_fingerprint", "usage"):
            if chunk.get(key):
                body[key] = chunk[key]
        for d in chunk.get("choices") or []:
            i = int(d.get("index", 0))
            c = choices.setdefault(i, {"index": i, "parts": {}, "finish_reason": None, "lp": None})
            for key, text in (d.get("delta") or {}).items():
                if key in ("content", "reasoning_content", "reasoning") and isinstance(text, str):
                    c["parts"].setdefault(key, []).append(text)
            c["finish_reason"] = d.get("finish_reason") or c["finish_reason"]
            entries = (d.get("logprobs") or {}).get("content")
            if isinstance(entries, list):
                c["lp"] = c["lp"] or []
                c["lp"] += entries  # in place: a copy per chunk made long streams quadratic
    for i, c in sorted(choices.items()):
        message = {"role": "assistant", "content": ""}
        message.update({k: "".join(v) for k, v in c["parts"].items()})
        body["choices"].append(
            {
                "index": i,
                "message": message,
                "finish_reason": c["finish_reason"],
                "logprobs": None if c["lp"] is None else {"content": c["lp"]},
            }
        )
    return body


async def read_stream(resp: httpx.Response) -> dict[str, Any]:
    """Read an SSE chat-completions stream to its `data: [DONE]` and assemble it. A stream that
    ends before [DONE] (a proxy cut it, the server died) is transient: asked again, it may finish."""
    chunks: list[Any] = []
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, `: keep-alive` comments, `event:` lines
        data = line[5:].strip()
        if data == "[DONE]":
            return assemble_stream(chunks)
        try:
            chunks.append(json.loads(data))
        except ValueError:
            raise TransientError(f"unparseable stream chunk: {data[:80]!r}", status=200) from None
    raise TransientError(f"stream ended before [DONE] after {len(chunks)} chunks", status=200)


def _server_message(resp: httpx.Response) -> str:
    with contextlib.suppress(ValueError):  # not JSON
        data = resp.json()
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
        if isinstance(data, dict) and data.get("detail"):
            return str(data["detail"])[:300]
    return resp.text[:200].replace("\n", " ") or resp.reason_phrase


def transport_error(e: httpx.TransportError, url: str, reached: bool) -> TransientError:
    """A connection error, classified: `Unreachable` when the server never answered yet (a wrong
    URL stays wrong: the run stops in seconds), else transient (a dropped connection is retried).
    """
    if isinstance(e, httpx.ConnectError) and not reached:
        return Unreachable(f"{connect_failure(e, url)}; check --base-url and that the server is up")
    return TransientError(f"connection error: {type(e).__name__}: {e}")


def connect_failure(e: httpx.TransportError, url: str) -> str:
    """Why a connection could not be made, in a few words: "connection refused", "unknown host",
    "TLS: ..." (from the exception chain; the text is the fallback)."""
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    text = " ".join(str(x) for x in chain).lower()
    if any(isinstance(x, ssl.SSLError) for x in chain) or "ssl" in text or "tls" in text:
        reason = next((x for x in chain if isinstance(x, ssl.SSLError)), None)
        detail = getattr(reason, "reason", None) or str(reason or e)
        cause = f"TLS: {str(detail).lower().replace('_', ' ')}"
    elif any(isinstance(x, ConnectionRefusedError) for x in chain) or "refused" in text:
        cause = "connection refused"
    elif (
        any(isinstance(x, socket.gaierror) for x in chain)
        or "name" in text
        and ("resolution" in text or "not known" in text or "nodename" in text)
    ):
        cause = "unknown host"
    else:
        cause = f"cannot connect ({type(e).__name__}: {e})"
    return redact(f"cannot reach {url}: {cause}")


def raise_for_status(resp: httpx.Response, t: TeacherConfig, what: str | None = None) -> NoReturn:
    """Raise what an unsuccessful response means (see the module docstring). `what` names a Batch
    API call ("upload", "create", ...); None means a chat-completions request."""
    status = resp.status_code
    where = f"HTTP {status} from {resp.request.url}" + (f" ({what})" if what else "")
    msg = _server_message(resp)
    if status in (408, 409, 429) or status >= 500:
        retry_after = parse_retry_after(resp.headers)
        raise TransientError(f"{where}: {msg}", status=status, retry_after=retry_after)
    if status in (401, 403):
        raise TeacherError(
            f"{where}: {msg}; the server refused the API key: set {t.api_key_env} "
            "(or name another variable with api_key_env)"
        )
    if status == 404 and what is None:
        raise TeacherError(
            f"{where}: {msg}; check the model name ({t.model!r}) and the base URL "
            "(it usually ends in /v1)"
        )
    if status == 404 and what in ("upload", "create"):
        raise TeacherError(
            f"{where}: {msg}; {t.base_url} has no Batch API: harvest teacher "
            f"{t.label!r} online with `distill harvest`, or leave it out of batch.teachers"
        )
    if what is not None:  # a Batch API call refused: asking again will not help
        raise TeacherError(f"{where}: {msg}")
    raise PromptRejected(f"{where}: {msg}", status=status)


def to_response(
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
    """The stored record of one answer, online and batch alike: what was asked, of whom, and what
    came back. `split` is how many answers shared the request (n > 1): its token counts are divided."""
    ct = completion.completion_tokens
    rt = completion.reasoning_tokens
    return Response(
        key=key,
        prompt_id=row.id,
        sample_index=sample,
        teacher=t.label,
        base_url=redact(t.base_url),
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


def http_client(
    t: TeacherConfig,
    *,
    base_url: str = "",
    connections: int | None = None,
    tls: ssl.SSLContext | None = None,
) -> httpx.AsyncClient:
    """The HTTP client every call to a teacher goes through (chat, scoring, probe, Batch API):
    its key as a bearer token, its timeout (connecting: at most 30 s), certifi's CA bundle."""
    key = t.api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}  # json= sets the Content-Type
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        verify=tls or ssl.create_default_context(cafile=certifi.where()),
        timeout=httpx.Timeout(t.timeout, connect=min(30.0, t.timeout)),
        limits=limits if connections else httpx.Limits(),
    )


class Teacher:
    """HTTP client for one teacher; shares its connection pools and one limiter across requests."""

    def __init__(self, cfg: TeacherConfig):
        if not cfg.model:
            raise ConfigError(
                "no teacher model: pass --model NAME or set model: in the harvest config"
            )
        self.cfg = cfg
        self.url = f"{cfg.base_url}/chat/completions"
        self.limiter = Limiter(
            rpm=cfg.rpm, tpm=cfg.tpm, concurrency=cfg.concurrency, adaptive=cfg.adaptive_concurrency
        )
        # Several small connection pools instead of one big one: httpx's pool does work in
        # proportion to its size on every request, so one pool of 64 connections caps a run at
        # ~200 requests/s on a fast server, where 16 pools of 4 reach ~650 (bench/overhead.py).
        shards = math.ceil(cfg.concurrency / POOL_SIZE)
        per_pool = math.ceil(cfg.concurrency / shards)
        tls = ssl.create_default_context(cafile=certifi.where())  # loaded once, not per pool
        self.pools = [http_client(cfg, connections=per_pool, tls=tls) for _ in range(shards)]
        self.pool_load = [0] * shards
        self.supports_n: bool | None = None if cfg.use_n else False
        self.reached = False  # any HTTP answer yet: after one, a lost connection is transient

    async def aclose(self) -> None:
        for pool in self.pools:
            await pool.aclose()

    async def _post(self, body: dict[str, Any], url: str) -> tuple[httpx.Response, Any]:
        """POST on the least busy pool: (response, its JSON body, or None when unreadable; with
        `stream` on chat requests, the body assembled from the stream, or None when the status is
        not 200)."""
        i = min(range(len(self.pools)), key=self.pool_load.__getitem__)
        self.pool_load[i] += 1
        try:
            streamed = self.cfg.stream and url == self.url
            hook: dict[str, Any] = {"trace": self._trace_stream if streamed else self._trace_whole}
            if not streamed:
                resp = await self.pools[i].post(url, json=body, extensions=hook)
                try:
                    return resp, resp.json()
                except ValueError:
                    return resp, None
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
            request = self.pools[i].build_request("POST", self.url, json=body, extensions=hook)
            resp = await self.pools[i].send(request, stream=True)
            try:
                if resp.status_code != 200:
                    await resp.aread()  # the error body, for raise_for_status
                    return resp, None
                return resp, await read_stream(resp)
            finally:
                await resp.aclose()
        finally:
            self.pool_load[i] -= 1

    async def _trace_stream(self, event: str, _info: dict[str, Any]) -> None:
        """httpcore's trace hook: once the request is sent, the limiter need not wait for it."""
        if event.endswith("receive_response_headers.started"):
            self.limiter.on_wire()

    async def _trace_whole(self, event: str, info: dict[str, Any]) -> None:
        """... and a whole (not streamed) answer frees the server's slot when its headers come:
        the body follows at once, and reading it need not keep the next request waiting. (Not a
        refusal: the limit is cut first, or the request woken for its slot is refused too.)"""
        await self._trace_stream(event, info)
        if event.endswith("receive_response_headers.complete"):
            status = info["return_value"][1]  # (http version, status, reason, headers, rest)
            if status == 200 and self.limiter.holding():  # (a probe sends without a slot)
                await self.limiter.free()

    async def complete(self, body: dict[str, Any]) -> Completion:
        """Send one chat-completions request; classify every failure (see the module docstring)."""
        return await self.post(body, parse_completion)

    async def post(
        self,
        body: dict[str, Any],
        parse: Callable[[Any, float], T],
        path: str = "/chat/completions",
    ) -> T:
        """POST `body` to base_url + `path` and `parse(JSON body, latency)`; every failure
        classified as the module docstring says, so `retrying` and the limiter treat a chat
        request and a scoring request (`post_score`) alike."""
        url = f"{self.cfg.base_url}{path}"
        started = time.monotonic()
        try:
            resp, data = await self._post(body, url)
        except httpx.TimeoutException:
            self.limiter.on_timeout()
            raise TransientError(f"timed out after {self.cfg.timeout:g}s") from None
        except httpx.TransportError as e:  # connection refused/reset/dropped, protocol errors
            raise transport_error(e, url, self.reached) from None
        self.reached = True
        latency = time.monotonic() - started
        self.limiter.observe_headers(resp.headers)
        if resp.status_code != 200:
            try:
                raise_for_status(resp, self.cfg)
            except TransientError as e:
                if e.status in (429, 503):
                    self.limiter.on_throttle(e.retry_after, e.status)
                raise
        if data is None:
            raise TransientError(
                f"HTTP 200 with an unparseable body: {resp.text[:80]!r}", status=200
            )
        parsed = parse(data, latency)
        self.limiter.on_success(latency)
        return parsed


# -- scoring a given text (on-policy distillation) -------------------------------------------------


@dataclass
class Scores:
    """A teacher's log-probabilities for each token of a text it was given, not one it wrote."""

    logprobs: list[float | None]  # per token: log p(token | tokens before it); None for the first
    top: list[dict[int, float]]  # per token: the teacher's top-k {token id: logprob} (ids only)
    tokens: list[str]  # per token: the text the server decoded it to (for the tokenizer check)
    prompt_tokens: int  # what the server counted (usage), else the tokens sent
    completion_tokens: int  # the one token it generated to answer the request


def score_body(
    t: TeacherConfig, prompt: list[int] | str, protocol: str, top_k: int = 0
) -> dict[str, Any]:
    """The JSON body of one /v1/completions request that scores `prompt`, given as token ids so
    nothing is re-tokenized (or as text, to probe a server). protocol "prompt_logprobs" (vLLM):
    per prompt token the actual token's logprob and the top `top_k`; "echo" (SGLang, Together):
    `echo` + `logprobs`, whose top-k come keyed by token text, so only the actual token is used.
    max_tokens is 1, not 0: several servers refuse 0, and the one token is billed as output."""
    body: dict[str, Any] = {"model": t.model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    if protocol == "prompt_logprobs":
        body["prompt_logprobs"] = top_k
    elif protocol == "echo":
        body.update(echo=True, logprobs=1)
    else:
        raise ValueError(f"unknown scoring protocol {protocol!r}")
    body.update(t.extra_body)
    return body


def scores_in(data: Any, protocol: str) -> Any:
    """The scores a /completions reply carries: the `prompt_logprobs` list, or the echoed
    `logprobs` object; TransientError when they are missing (an overloaded proxy may drop them)."""
    choices = data.get("choices") if isinstance(data, dict) else None
    c = choices[0] if isinstance(choices, list) and choices else None
    if not isinstance(c, dict):
        raise TransientError("HTTP 200 with empty or missing choices", status=200)
    if protocol == "prompt_logprobs":
        if not isinstance(c.get("prompt_logprobs"), list):
            raise TransientError("HTTP 200 without prompt_logprobs for every token", status=200)
        return c["prompt_logprobs"]
    lp = c.get("logprobs")
    if not isinstance(lp, dict) or not isinstance(lp.get("token_logprobs"), list):
        raise TransientError("HTTP 200 without echoed token logprobs", status=200)
    return lp


def parse_scores(data: Any, protocol: str, ids: list[int]) -> Scores:
    """A scoring reply for the token ids `ids` -> Scores, one entry per id. A body without the
    scores asked for raises TransientError (an overloaded proxy may drop them; asking again may
    work); a prompt_logprobs row that lacks the id sent means the server re-tokenized: an error."""
    n = len(ids)
    scores = scores_in(data, protocol)
    logprobs: list[float | None] = []
    top: list[dict[int, float]] = []
    tokens: list[str] = []
    if protocol == "prompt_logprobs":
        if len(scores) < n:
            raise TransientError("HTTP 200 without prompt_logprobs for every token", status=200)
        for tid, row in zip(ids, scores):
            if not row:  # the first token has no context, so no logprob
                logprobs.append(None)
                top.append({})
                tokens.append("")
                continue
            own = row.get(str(tid))
            if not isinstance(own, dict):
                raise TeacherError(
                    f"the teacher's prompt_logprobs do not hold the token ids sent (token {tid} "
                    "missing): it re-tokenized the prompt; use a server that takes token-id prompts"
                )
            logprobs.append(float(own["logprob"]))
            top.append({int(i): float(v["logprob"]) for i, v in row.items()})
            tokens.append(str(own.get("decoded_token", "")))
    else:
        if len(scores["token_logprobs"]) < n:
            raise TransientError("HTTP 200 with fewer echoed tokens than sent", status=200)
        logprobs = [None if v is None else float(v) for v in scores["token_logprobs"][:n]]
        tokens = [str(x) for x in (scores.get("tokens") or [])][:n]
        top = [{} for _ in range(n)]
    usage = _usage(data)
    return Scores(
        logprobs=logprobs,
        top=top,
        tokens=tokens,
        prompt_tokens=int(usage.get("prompt_tokens") or n),
        completion_tokens=int(usage.get("completion_tokens") or 1),
    )


async def post_score(teacher: Teacher, body: dict[str, Any]) -> Any:
    """Send one scoring request (`score_body`) on a Teacher's pools and limiter, its failures
    classified as a chat request's; returns the JSON body for `parse_scores`."""
    return await teacher.post(body, lambda data, _latency: data, "/completions")
