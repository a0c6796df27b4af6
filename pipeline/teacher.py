"""A teacher: one OpenAI-compatible chat-completions endpoint, its key, limits and price.

`Teacher.complete(body)` sends one request and returns the parsed choices, or raises:
- `TransientError` (timeout, dropped connection, 408/409/429/5xx, unparseable body, empty
  `choices`): the retry policy in ratelimit.py tries again;
- `PromptRejected` (400/422): this prompt's failure, recorded; the run goes on;
- `TeacherError` (401/403 key, 404 model or URL): the whole run stops with what to fix.

The reasoning trace lands in one field whichever way the server sends it: `reasoning_content`
(DeepSeek, vLLM), `reasoning` (OpenRouter), or inline `<think>...</think>` at the start of the
content (then stripped from the answer).
"""

from __future__ import annotations

import math
import os
import re
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import certifi
import httpx
from pydantic import Field, field_validator

from pipeline.config import StageConfig
from pipeline.errors import ConfigError, PromptRejected, TeacherError, TransientError
from pipeline.ratelimit import Limiter, parse_retry_after

POOL_SIZE = 4  # connections per httpx pool (see Teacher.__init__)


def default_base_url() -> str:
    return os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"


class TeacherConfig(StageConfig):
    """Who answers, and how hard we may push it."""

    name: str | None = Field(
        None, description="Label recorded in every row as `teacher` (default: the model name)."
    )
    base_url: str = Field(
        default_factory=default_base_url,
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
        description="Halve concurrency on 429/503/timeouts and grow it back while latency holds.",
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
    share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="With `routing: share`, the fraction of prompts this teacher answers (picked by a hash of the prompt id, so stable across runs); teachers without one split what is left.",
    )

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        u = urlparse(v)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ValueError(f"base_url {v!r} is not an http(s) URL like https://api.openai.com/v1")
        return v.rstrip("/")

    @property
    def label(self) -> str:
        return self.name or self.model or "teacher"

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None


@dataclass
class Choice:
    """One parsed answer."""

    index: int
    content: str
    reasoning: str | None
    finish_reason: str | None
    logprobs: Any


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


_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)


def split_reasoning(message: dict[str, Any]) -> tuple[str, str | None]:
    """(answer, reasoning) from a chat message, whichever shape the server used."""
    content = message.get("content")
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    content = content or ""
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        return content, reasoning
    m = _THINK.match(content)
    if m:
        return content[m.end() :], m.group(1).strip("\n")
    stripped = content.lstrip()
    if stripped.startswith("<think>"):  # cut off inside the trace (finish_reason "length")
        return "", stripped[len("<think>") :].strip("\n")
    if "</think>" in content and "<think>" not in content:  # template opened <think> in the prompt
        head, _, tail = content.partition("</think>")
        return tail.lstrip(), head.strip("\n")
    return content, None


def parse_completion(data: Any, latency_s: float | None) -> Completion:
    """A chat-completion body (online, or one line of a Batch API output file) -> Completion.
    A body without usable choices raises TransientError: asking again may well work."""
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("choices"), list)
        or not data["choices"]
    ):
        if isinstance(data, dict) and data.get("error"):
            raise TransientError(
                f"HTTP 200 with an error body: {str(data['error'])[:200]}", status=200
            )
        raise TransientError("HTTP 200 with empty or missing choices", status=200)
    choices = []
    for i, c in enumerate(data["choices"]):
        if not isinstance(c, dict) or not isinstance(c.get("message"), dict):
            raise TransientError("HTTP 200 with a malformed choice", status=200)
        answer, reasoning = split_reasoning(c["message"])
        choices.append(
            Choice(
                index=int(c.get("index", i)),
                content=answer,
                reasoning=reasoning,
                finish_reason=c.get("finish_reason"),
                logprobs=c.get("logprobs"),
            )
        )
    choices.sort(key=lambda c: c.index)
    usage: dict[str, Any] = data["usage"] if isinstance(data.get("usage"), dict) else {}
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


def _server_message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
        if isinstance(data, dict) and data.get("detail"):
            return str(data["detail"])[:300]
    except ValueError:
        pass
    return resp.text[:200].replace("\n", " ") or resp.reason_phrase


class Teacher:
    """HTTP client for one teacher; shares one connection pool and one limiter across requests."""

    def __init__(self, cfg: TeacherConfig, limiter: Limiter | None = None):
        if not cfg.model:
            raise ConfigError(
                "no teacher model: pass --model NAME or set model: in the harvest config"
            )
        self.cfg = cfg
        self.url = f"{cfg.base_url}/chat/completions"
        self.limiter = limiter or Limiter(
            rpm=cfg.rpm, tpm=cfg.tpm, concurrency=cfg.concurrency, adaptive=cfg.adaptive_concurrency
        )
        headers = {"Content-Type": "application/json"}
        key = cfg.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        # Several small connection pools instead of one big one: httpx's pool does work in
        # proportion to its size on every request, so one pool of 64 connections caps a run at
        # ~200 requests/s on a fast server, where 16 pools of 4 reach ~650 (bench/overhead.py).
        shards = math.ceil(cfg.concurrency / POOL_SIZE)
        per_pool = math.ceil(cfg.concurrency / shards)
        tls = ssl.create_default_context(cafile=certifi.where())  # loaded once, not per pool
        self.pools = [
            httpx.AsyncClient(
                headers=headers,
                verify=tls,
                timeout=httpx.Timeout(cfg.timeout, connect=min(30.0, cfg.timeout)),
                limits=httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool),
            )
            for _ in range(shards)
        ]
        self.pool_load = [0] * shards
        self.supports_n: bool | None = None if cfg.use_n else False

    async def aclose(self) -> None:
        for pool in self.pools:
            await pool.aclose()

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        """POST on the least busy pool."""
        i = min(range(len(self.pools)), key=self.pool_load.__getitem__)
        self.pool_load[i] += 1
        try:
            return await self.pools[i].post(self.url, json=body)
        finally:
            self.pool_load[i] -= 1

    async def complete(self, body: dict[str, Any]) -> Completion:
        """Send one chat-completions request; classify every failure (see the module docstring)."""
        started = time.monotonic()
        try:
            resp = await self._post(body)
        except httpx.TimeoutException:
            self.limiter.on_timeout()
            raise TransientError(f"timed out after {self.cfg.timeout:g}s") from None
        except httpx.TransportError as e:  # connection refused/reset/dropped, protocol errors
            raise TransientError(f"connection error: {type(e).__name__}: {e}") from None
        latency = time.monotonic() - started
        self.limiter.observe_headers(resp.headers)
        status = resp.status_code
        if status != 200:
            self._raise_for_status(resp)
        try:
            data = resp.json()
        except ValueError:
            raise TransientError(
                f"HTTP 200 with an unparseable body: {resp.text[:80]!r}", status=200
            ) from None
        completion = parse_completion(data, latency)
        self.limiter.on_success(latency)
        return completion

    def _raise_for_status(self, resp: httpx.Response) -> None:
        status = resp.status_code
        msg = _server_message(resp)
        where = f"HTTP {status} from {self.url}"
        if status in (401, 403):
            raise TeacherError(
                f"{where}: {msg}; the server refused the API key: set {self.cfg.api_key_env} "
                "(or name another variable with api_key_env)"
            )
        if status == 404:
            raise TeacherError(
                f"{where}: {msg}; check the model name ({self.cfg.model!r}) and the base URL "
                "(it usually ends in /v1)"
            )
        if status in (429, 503):
            retry_after = parse_retry_after(resp.headers)
            self.limiter.on_throttle(retry_after, status)
            raise TransientError(f"{where}: {msg}", status=status, retry_after=retry_after)
        if status in (408, 409) or status >= 500:
            raise TransientError(
                f"{where}: {msg}", status=status, retry_after=parse_retry_after(resp.headers)
            )
        raise PromptRejected(f"{where}: {msg}", status=status)
