"""A test server that speaks the OpenAI chat-completions API on 127.0.0.1, with faults on demand.

Used by the tests (in a thread: `with OpenAIServer() as srv: srv.url`) and by the benchmarks (in
its own process: `python -m tests.openai_server --port 8123 --rps 20`). It answers
deterministically from the last user message unless `responder` is set, and can:
- return reasoning as `reasoning_content`, `reasoning`, or inline `<think>` (`reasoning=`);
- honour `n`, return logprobs, report usage with reasoning tokens;
- demand an API key (401), know only some models (404), reject chosen prompts (400);
- enforce a requests/s token bucket (429 with Retry-After / retry-after-ms and x-ratelimit-* headers);
- inject faults at given rates: 5xx, dropped connections, hangs, garbage bodies, empty choices;
- behave like a self-hosted server under load: refuse past `max_in_flight` requests at once
  (503 like TGI, or a header-less 429), or queue past `queue_slots` (latency grows with load);
- ignore `logprobs`, cap `top_logprobs`, score text on /v1/completions (vLLM's `prompt_logprobs`
  or `echo` + `logprobs`), and list batches (GET /v1/batches) for the probe.
- play a leaky proxy (`echo_status`): answer every request with that status (400/401/500), quoting
  the request's Authorization header and URL in the body, as some servers do.
- stream answers as server-sent events when asked (`stream: true`, usage last with
  `stream_options.include_usage`), and cut the first `stream_cuts` streams half way.
Every request is counted, so tests can assert "the second run sent nothing".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

# Dropped connections are on purpose here: keep aiohttp from logging each one.
logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


@dataclass
class Faults:
    """Rates (0..1) of each fault, drawn per request in this order."""

    server_error: float = 0.0  # 500/502/503
    drop: float = 0.0  # close the connection without answering
    hang: float = 0.0  # never answer (until the client times out)
    garbage: float = 0.0  # 200 with a body that is not JSON
    empty_choices: float = 0.0  # 200 with "choices": []
    too_many: float = 0.0  # 429 regardless of the bucket


def default_answer(messages: list[dict[str, Any]], index: int) -> str:
    """Echo-ish and deterministic; solves 'What is A + B?' so verifiers have something to check."""
    last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    if not isinstance(last, str):
        last = json.dumps(last)
    m = re.search(r"(-?\d+)\s*([+*-])\s*(-?\d+)", last)
    if m:
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        val = a + b if op == "+" else a - b if op == "-" else a * b
        return f"{a} {op} {b} = {val}. The answer is {val}."
    return f"Answer {index}: {last[:200]}"


S = TypeVar("S", bound="ThreadedServer")


class ThreadedServer:
    """An aiohttp app served from a background thread with its own event loop, as a with-block.
    Subclasses provide `app()`, `host`, `port` and set `_loop`, `_thread`, `_runner` to None."""

    host: str
    port: int
    _loop: asyncio.AbstractEventLoop | None
    _thread: threading.Thread | None
    _runner: web.AppRunner | None

    def app(self) -> web.Application:
        raise NotImplementedError

    async def start_async(self) -> None:
        self._runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=0.1
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def start(self: S) -> S:
        """Serve from a background thread with its own event loop."""
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self.start_async())
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    async def _shutdown(self) -> None:
        # Cancel handlers still hanging on purpose, then close the listener.
        me = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not me]
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        asyncio.get_running_loop().stop()

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class OpenAIServer(ThreadedServer):
    """Configure the attributes at any time; they are read per request."""

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = None  # require "Authorization: Bearer <api_key>"
    models: set[str] | None = None  # None: every model exists
    reasoning: str | None = None  # None | "reasoning_content" | "reasoning" | "think"
    supports_n: bool = True
    latency: float = 0.0  # seconds before answering
    rps: float | None = None  # token bucket: requests per second
    burst: float | None = None  # bucket depth (default: one second of rps)
    ratelimit_headers: bool = True  # send x-ratelimit-* when rps is set
    faults: Faults = field(default_factory=Faults)
    seed: int = 0
    finish_reason: str = "stop"
    responder: Callable[[dict[str, Any], int], dict[str, Any]] | None = (
        None  # -> {content, reasoning?, shape?, finish_reason?, tokens?}
    )
    reject: Callable[[dict[str, Any]], str | None] | None = None  # -> message for a 400, or None
    hang_seconds: float = 3600.0
    throttle_first: int = 0  # answer the first N requests 429 ...
    throttle_ms: int = 500  # ... with retry-after-ms of this
    max_in_flight: int | None = None  # refuse at once past this many requests in flight ...
    overload_status: int = 503  # ... with this status (429: a header-less 429)
    queue_slots: int | None = None  # serve this many at a time, queue the rest (FIFO)
    supports_logprobs: bool = True  # False: ignore `logprobs` (as llama.cpp, `transformers serve`)
    max_top_logprobs: int = 20  # 400 when a request asks for more
    scoring: str | None = None  # /v1/completions scores prompts: None | "prompt_logprobs" | "echo"
    batches: bool = False  # answer GET /v1/batches
    echo_status: int | None = None  # answer everything with this status, echoing Authorization
    stream_cuts: int = 0  # close the connection half way through this many streams

    def __post_init__(self) -> None:
        self.requests = 0  # chat completion requests received
        self.completed = 0  # 200s with choices
        self.status_counts: dict[int, int] = {}
        self.bodies: list[dict[str, Any]] = []
        self.keep_bodies = True
        self.headers_seen: list[dict[str, str]] = []
        self.arrivals: list[float] = []  # monotonic time of each request
        self.throttled_at: list[float] = []  # monotonic time of each 429 sent
        self._rng = random.Random(self.seed)
        self._tokens = -1.0  # bucket starts full on first use
        self._stamp = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._lock = threading.Lock()
        self.active = 0  # chat requests in flight now
        self.peak_active = 0
        self.busy_s = 0.0  # seconds admitted chat requests held a slot (`active`), summed
        self.served = 0  # chat requests admitted (not refused for load)
        self._slots: asyncio.Semaphore | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _count(self, status: int) -> None:
        self.status_counts[status] = self.status_counts.get(status, 0) + 1

    # -- rate limit ----------------------------------------------------------------------------

    def _take(self) -> tuple[bool, float, dict[str, str]]:
        if not self.rps:
            return True, 0.0, {}
        depth = self.burst or self.rps
        now = time.monotonic()
        if self._tokens < 0:
            self._tokens = depth
        self._tokens = min(depth, self._tokens + (now - self._stamp) * self.rps)
        self._stamp = now
        ok = self._tokens >= 1
        if ok:
            self._tokens -= 1
        wait = 0.0 if ok else (1 - self._tokens) / self.rps
        headers = {}
        if self.ratelimit_headers:
            headers = {
                "x-ratelimit-limit-requests": str(int(self.rps * 60)),
                "x-ratelimit-remaining-requests": str(max(0, math.floor(self._tokens))),
                "x-ratelimit-reset-requests": f"{max(0.0, (depth - self._tokens) / self.rps):.3f}s",
            }
        return ok, wait, headers

    # -- handlers --------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.arrivals.append(time.monotonic())
        if self.requests <= self.throttle_first:
            self._count(429)
            self.throttled_at.append(time.monotonic())
            return web.json_response(
                {"error": {"message": "Rate limit reached", "type": "requests"}},
                status=429,
                headers={
                    "retry-after-ms": str(self.throttle_ms),
                    "Retry-After": str(math.ceil(self.throttle_ms / 1000)),
                },
            )
        self.headers_seen.append({"authorization": request.headers.get("Authorization", "")})
        if self.echo_status is not None:
            self._count(self.echo_status)
            auth = request.headers.get("Authorization", "")
            quoted = f"request {request.method} {request.url} with Authorization: {auth}"
            return web.json_response(
                {"error": {"message": f"refused {quoted}", "headers": dict(request.headers)}},
                status=self.echo_status,
            )
        if (
            self.api_key is not None
            and request.headers.get("Authorization") != f"Bearer {self.api_key}"
        ):
            self._count(401)
            return web.json_response(
                {
                    "error": {
                        "message": "Incorrect API key provided.",
                        "type": "invalid_request_error",
                        "code": "invalid_api_key",
                    }
                },
                status=401,
            )
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._count(400)
            return web.json_response(
                {"error": {"message": "We could not parse the JSON body of your request."}},
                status=400,
            )
        if self.keep_bodies:
            self.bodies.append(body)
        model = body.get("model")
        if self.models is not None and model not in self.models:
            self._count(404)
            return web.json_response(
                {
                    "error": {
                        "message": f"The model `{model}` does not exist or you do not have access to it.",
                        "code": "model_not_found",
                    }
                },
                status=404,
            )
        ok, wait, rl_headers = self._take()
        if not ok:
            self._count(429)
            headers = dict(rl_headers)
            headers["retry-after-ms"] = str(max(1, int(wait * 1000)))
            headers["Retry-After"] = str(max(1, math.ceil(wait)))
            return web.json_response(
                {"error": {"message": "Rate limit reached for requests", "type": "requests"}},
                status=429,
                headers=headers,
            )
        if body.get("logprobs") and self.supports_logprobs:
            k = int(body.get("top_logprobs") or 0)
            if k > self.max_top_logprobs:
                self._count(400)
                return web.json_response(
                    {"error": {"message": f"top_logprobs must be <= {self.max_top_logprobs}"}},
                    status=400,
                )
        if self.reject is not None:
            msg = self.reject(body)
            if msg:
                self._count(400)
                return web.json_response(
                    {"error": {"message": msg, "type": "invalid_request_error"}}, status=400
                )
        f = self.faults
        r = self._rng.random()
        edges = [f.server_error, f.drop, f.hang, f.garbage, f.empty_choices, f.too_many]
        kinds = ["server_error", "drop", "hang", "garbage", "empty", "429"]
        acc = 0.0
        fault = None
        for k, p in zip(kinds, edges):
            acc += p
            if r < acc:
                fault = k
                break
        if self.latency:
            await asyncio.sleep(self.latency)
        if fault == "server_error":
            status = self._rng.choice([500, 502, 503])
            self._count(status)
            return web.json_response(
                {"error": {"message": "The server had an error while processing your request."}},
                status=status,
            )
        if fault == "drop":
            self._count(0)
            assert request.transport is not None
            request.transport.close()
            raise ConnectionResetError("dropped on purpose")
        if fault == "hang":
            self._count(-1)
            await asyncio.sleep(self.hang_seconds)
        if fault == "garbage":
            self._count(200)
            return web.Response(
                text='<html><body>502 Bad Gateway</body></html>{"choices": [',
                content_type="text/html",
            )
        if fault == "empty":
            self._count(200)
            return web.json_response({"id": "x", "object": "chat.completion", "choices": []})
        if fault == "429":
            self._count(429)
            return web.json_response(
                {"error": {"message": "Rate limit reached"}},
                status=429,
                headers={"Retry-After": "0"},
            )
        n = int(body.get("n") or 1) if self.supports_n else 1
        choices = [self._choice(body, i) for i in range(n)]
        prompt_chars = sum(
            len(m.get("content") or "")
            for m in body.get("messages", [])
            if isinstance(m.get("content"), str)
        )
        completion_tokens = sum(max(1, len(c["message"]["content"] or "") // 4) for c in choices)
        reasoning_tokens = sum(
            len(c["message"].get("reasoning_content") or c["message"].get("reasoning") or "") // 4
            for c in choices
        )
        completion_tokens += reasoning_tokens
        self.completed += 1
        self._count(200)
        if body.get("stream"):
            usage = {
                "prompt_tokens": max(1, prompt_chars // 4),
                "completion_tokens": completion_tokens,
                "total_tokens": max(1, prompt_chars // 4) + completion_tokens,
                "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
            }
            return await self._sse(request, body, choices, usage, rl_headers)
        return web.json_response(
            {
                "id": f"chatcmpl-{self.requests}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": f"{model}-2026-01-01",
                "system_fingerprint": "fp_test",
                "choices": choices,
                "usage": {
                    "prompt_tokens": max(1, prompt_chars // 4),
                    "completion_tokens": completion_tokens,
                    "total_tokens": max(1, prompt_chars // 4) + completion_tokens,
                    "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
                },
            },
            headers=rl_headers,
        )

    def _choice(self, body: dict[str, Any], i: int) -> dict[str, Any]:
        if self.responder is not None:
            spec = self.responder(body, i)
        else:
            spec = {"content": default_answer(body.get("messages", []), i)}
        content = spec.get("content", "")
        reasoning = spec.get("reasoning")
        if reasoning is None and self.reasoning:
            reasoning = f"Let me think about sample {i}. Step by step."
        message: dict[str, Any] = {"role": "assistant", "content": content}
        shape = spec.get("shape", self.reasoning)
        if reasoning and shape == "reasoning_content":
            message["reasoning_content"] = reasoning
        elif reasoning and shape == "reasoning":
            message["reasoning"] = reasoning
        elif reasoning and shape == "think":
            message["content"] = f"<think>\n{reasoning}\n</think>\n\n{content}"
        choice: dict[str, Any] = {
            "index": i,
            "message": message,
            "finish_reason": spec.get("finish_reason", self.finish_reason),
        }
        if body.get("logprobs") and self.supports_logprobs:
            k = int(body.get("top_logprobs") or 0)
            # the generated tokens: a responder's own (a trace's tokens too, as vLLM sends them)
            toks = spec.get("tokens") or (content or "x").split()[:50]
            choice["logprobs"] = {
                "content": [
                    {
                        "token": t,
                        "logprob": -0.1 * j,
                        "bytes": None,
                        "top_logprobs": [{"token": t + "_", "logprob": -1.0 - a} for a in range(k)],
                    }
                    for j, t in enumerate(toks)
                ]
            }
        else:
            choice["logprobs"] = None
        return choice

    async def _sse(
        self,
        request: web.Request,
        body: dict[str, Any],
        choices: list[dict[str, Any]],
        usage: dict[str, Any],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """The same answer as server-sent chunks: role, reasoning deltas, content deltas (a few
        characters each, with their share of the logprobs), finish_reason, usage, [DONE]."""

        def pieces(text: str) -> list[str]:
            return [text[i : i + 7] for i in range(0, len(text), 7)] or [""]

        deltas: list[dict[str, Any]] = []
        for c in choices:
            i, msg = c["index"], c["message"]
            deltas.append({"index": i, "delta": {"role": "assistant", "content": ""}})
            for key in ("reasoning_content", "reasoning"):
                deltas += [{"index": i, "delta": {key: p}} for p in pieces(msg.get(key) or "")]
            parts = pieces(msg["content"] or "")
            entries = (c.get("logprobs") or {}).get("content")
            for j, p in enumerate(parts):
                d: dict[str, Any] = {"index": i, "delta": {"content": p}}
                if entries is not None:
                    share = entries[
                        j * len(entries) // len(parts) : (j + 1) * len(entries) // len(parts)
                    ]
                    d["logprobs"] = {"content": share}
                deltas.append(d)
            deltas.append({"index": i, "delta": {}, "finish_reason": c["finish_reason"]})
        head = {
            "id": f"chatcmpl-{self.requests}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": f"{body.get('model')}-2026-01-01",
            "system_fingerprint": "fp_test",
        }
        chunks = [{**head, "choices": [d]} for d in deltas]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({**head, "choices": [], "usage": usage})
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await resp.prepare(request)
        cut = self.stream_cuts > 0
        for k, chunk in enumerate(chunks):
            if cut and k == len(chunks) // 2:
                self.stream_cuts -= 1
                self.completed -= 1
                self._count(0)
                assert request.transport is not None
                request.transport.close()
                raise ConnectionResetError("stream cut on purpose")
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def list_models(self, request: web.Request) -> web.Response:
        names = sorted(self.models or {"test-model"})
        return web.json_response(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in names]}
        )

    @web.middleware
    async def load(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Server load: refuse past `max_in_flight`, queue past `queue_slots` (chat only)."""
        if request.path != "/v1/chat/completions":
            return await handler(request)  # type: ignore[no-any-return]
        if self.max_in_flight is not None and self.active >= self.max_in_flight:
            self.requests += 1
            self._count(self.overload_status)
            return web.json_response(
                {"error": {"message": "Model is overloaded", "type": "overloaded"}},
                status=self.overload_status,
            )
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        admitted = time.monotonic()
        try:
            if self.queue_slots:
                if self._slots is None:
                    self._slots = asyncio.Semaphore(self.queue_slots)
                async with self._slots:
                    return await handler(request)  # type: ignore[no-any-return]
            return await handler(request)  # type: ignore[no-any-return]
        finally:
            self.active -= 1
            self.busy_s += time.monotonic() - admitted
            self.served += 1

    async def completions(self, request: web.Request) -> web.Response:
        """Legacy /v1/completions, for text scoring: vLLM's `prompt_logprobs`, or `echo` with
        `logprobs`; without `scoring` it answers like a server that cannot score (400)."""
        body = await request.json()
        prompt = str(body.get("prompt") or "")
        toks = prompt.split() or ["x"]
        k = int(body.get("prompt_logprobs") or body.get("logprobs") or 0)
        choice: dict[str, Any] = {"index": 0, "text": "", "finish_reason": "length"}
        if self.scoring == "prompt_logprobs" and body.get("prompt_logprobs") is not None:
            choice["prompt_logprobs"] = [None] + [
                {str(j): {"logprob": -0.5, "rank": 1, "decoded_token": t}}
                for j, t in enumerate(toks[1:])
            ]
        elif self.scoring == "echo" and body.get("echo"):
            choice["text"] = prompt
            choice["logprobs"] = {
                "tokens": toks,
                "token_logprobs": [None] + [-0.5] * (len(toks) - 1),
                "top_logprobs": [None] + [{t: -0.5} for t in toks[1:]] if k else None,
                "text_offset": list(range(len(toks))),
            }
        elif body.get("prompt_logprobs") is not None or body.get("echo"):
            return web.json_response(
                {"error": {"message": "echo / prompt_logprobs are not supported"}}, status=400
            )
        usage = {"prompt_tokens": len(toks), "completion_tokens": 0}
        return web.json_response(
            {"id": "cmpl-1", "object": "text_completion", "choices": [choice], "usage": usage}
        )

    async def list_batches(self, request: web.Request) -> web.Response:
        if not self.batches:
            return web.json_response({"error": {"message": "Not Found"}}, status=404)
        return web.json_response({"object": "list", "data": [], "has_more": False})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self.load])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/batches", self.list_batches)
        return app

    # -- lifecycle --------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description="OpenAI-compatible test server")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--rps", type=float)
    ap.add_argument("--burst", type=float)
    ap.add_argument("--no-ratelimit-headers", action="store_true")
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--reasoning")
    ap.add_argument("--server-error", type=float, default=0.0)
    ap.add_argument("--drop", type=float, default=0.0)
    ap.add_argument("--hang", type=float, default=0.0)
    ap.add_argument("--garbage", type=float, default=0.0)
    ap.add_argument("--max-in-flight", type=int)
    ap.add_argument("--overload-status", type=int, default=503)
    ap.add_argument("--queue-slots", type=int)
    ap.add_argument("--stats-file", help="write request counts here as JSON on SIGTERM/exit")
    a = ap.parse_args()
    srv = OpenAIServer(
        port=a.port,
        rps=a.rps,
        burst=a.burst,
        ratelimit_headers=not a.no_ratelimit_headers,
        latency=a.latency,
        reasoning=a.reasoning,
        faults=Faults(server_error=a.server_error, drop=a.drop, hang=a.hang, garbage=a.garbage),
        max_in_flight=a.max_in_flight,
        overload_status=a.overload_status,
        queue_slots=a.queue_slots,
    )
    srv.keep_bodies = False

    async def serve() -> None:
        await srv.start_async()
        print(f"listening {srv.url}", flush=True)
        stop = asyncio.Event()
        import signal

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        if a.stats_file:
            with open(a.stats_file, "w") as f:
                json.dump(
                    {
                        "requests": srv.requests,
                        "completed": srv.completed,
                        "status": srv.status_counts,
                        "peak_active": srv.peak_active,
                        "busy_s": srv.busy_s,
                        "served": srv.served,
                    },
                    f,
                )

    asyncio.run(serve())


if __name__ == "__main__":
    main()
