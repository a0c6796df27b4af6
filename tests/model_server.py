"""An OpenAI-compatible server on 127.0.0.1 backed by a real tiny model, with real logprobs.

The teacher for distillation tests: `make_teacher_model` builds a tiny model (tests/tinymodels.py)
and trains it a few steps on arithmetic text, so it differs from a fresh student that shares its
tokenizer. The server answers as vLLM does:

- `/v1/chat/completions`: `n`, `max_tokens`, `temperature` (0: greedy), `seed`, `logprobs` +
  `top_logprobs` (each token as its decoded text, like vLLM's chat API; the end-of-turn token is
  not part of the content and carries no row, like OpenAI);
- `/v1/completions`: `prompt` as text or token ids (or a list of either), `echo`, `logprobs` (the
  legacy tokens/token_logprobs/top_logprobs/text_offset form) and vLLM's `prompt_logprobs`: per
  prompt token {token_id: {logprob, rank, decoded_token}} holding the actual token and the top-k,
  None for the first token. `max_tokens: 0` scores a text without generating.

Logprobs are the model's raw log-softmax (vLLM's default `raw_logprobs`), before temperature.

    with ModelServer(make_teacher_model(tmp_path / "teacher")) as srv:
        httpx.post(srv.url + "/chat/completions", json={...})
    python -m tests.model_server --model DIR --port 8124
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from aiohttp import web

from tests.openai_server import ThreadedServer
from tests.tinymodels import make_tiny_model

TEACHER_TEXT = [
    "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\nThe answer is 19.<|im_end|>",
    "<|im_start|>user\nWhat is 3 * 4?<|im_end|>\n<|im_start|>assistant\nThe answer is 12.<|im_end|>",
    "Let me think step by step. First, second, third. So the result is 100.",
]


def make_teacher_model(
    path: Path,
    arch: str = "qwen2",
    steps: int = 30,
    pairs: list[tuple[str, str]] | None = None,
    attention_heads: int | None = None,
) -> Path:
    """A tiny model trained `steps` AdamW steps, saved at `path` (reused if there).

    Default: a few steps on TEACHER_TEXT, so it differs from a fresh student. With `pairs`
    (question, answer): on those chats, rendered with the model's chat template, for a teacher
    that masters a small task and is confident as real teachers are (bench/kd.py: 300 steps on
    its counting task give 100% greedy accuracy and a top-20 mass of 0.99 per answer token).
       attention_heads: fewer, wider heads (1: head_dim 32), for vLLM's CPU attention, which has no
    kernel for the tiny model's head_dim of 8.
    """
    path = Path(path)
    if (path / "teacher.done").exists():
        return path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_tiny_model(path, arch=arch, template="known")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    if attention_heads is not None:
        config = model.config
        config.num_attention_heads = config.num_key_value_heads = attention_heads
        config.head_dim = config.hidden_size // attention_heads
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    texts = TEACHER_TEXT
    if pairs is not None:
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                tokenize=False,
            )
            for q, a in pairs
        ]
    torch.manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(steps):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        opt.step()
    model.save_pretrained(str(path), safe_serialization=True)
    (path / "teacher.done").write_text("ok")
    return path


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": "invalid_request_error"}}, status=status
    )


@dataclass
class ModelServer(ThreadedServer):
    """Serves one model folder. Requests run one at a time (a lock), on CPU."""

    model_path: Path
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path).eval()
        self.model_name = Path(self.model_path).name
        self.stop_ids = {self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>")}
        self.requests = 0
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # -- the model -------------------------------------------------------------------------------

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), V) log-softmax; row t is the distribution of the token after ids[:t+1]."""
        out = self.model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(out, -1)

    @torch.no_grad()
    def generate(
        self, ids: list[int], max_tokens: int, temperature: float, gen: torch.Generator
    ) -> tuple[list[int], list[torch.Tensor], str]:
        """(new ids, the raw log-softmax each was drawn from, finish_reason); stop ids excluded."""
        new: list[int] = []
        dists: list[torch.Tensor] = []
        for _ in range(max_tokens):
            lp = self.logprobs(ids + new)[-1]
            if temperature <= 0:
                nxt = int(lp.argmax())
            else:
                nxt = int(torch.multinomial(torch.softmax(lp / temperature, -1), 1, generator=gen))
            if nxt in self.stop_ids:
                return new, dists, "stop"
            new.append(nxt)
            dists.append(lp)
        return new, dists, "length"

    def _top(self, lp: torch.Tensor, k: int) -> list[tuple[int, float]]:
        vals, idx = lp.topk(k) if k else (lp[:0], lp[:0].long())
        return [(int(i), float(v)) for i, v in zip(idx, vals)]

    def _decode(self, i: int) -> str:
        return self.tok.decode([i])  # vLLM decodes each logprob token on its own

    def _generator(self, body: dict[str, Any], i: int) -> torch.Generator:
        gen = torch.Generator()
        seed = body.get("seed")
        gen.manual_seed(int(seed) * 1000 + i if seed is not None else int(time.time_ns()) + i)
        return gen

    # -- handlers --------------------------------------------------------------------------------

    def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = self.tok.apply_chat_template(
            body["messages"], add_generation_prompt=True, tokenize=False
        )
        ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        k = int(body.get("top_logprobs") or 0)
        choices, completion_tokens = [], 0
        for i in range(int(body.get("n") or 1)):
            new, dists, finish = self.generate(
                ids,
                int(body.get("max_tokens") or body.get("max_completion_tokens") or 16),
                float(body.get("temperature", 1.0)),
                self._generator(body, i),
            )
            completion_tokens += len(new)
            logprobs = None
            if body.get("logprobs"):
                logprobs = {
                    "content": [
                        {
                            "token": self._decode(t),
                            "logprob": float(lp[t]),
                            "bytes": list(self._decode(t).encode("utf-8")),
                            "top_logprobs": [
                                {
                                    "token": self._decode(a),
                                    "logprob": v,
                                    "bytes": list(self._decode(a).encode("utf-8")),
                                }
                                for a, v in self._top(lp, k)
                            ],
                        }
                        for t, lp in zip(new, dists)
                    ]
                }
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": self.tok.decode(new)},
                    "finish_reason": finish,
                    "logprobs": logprobs,
                }
            )
        return {
            "id": f"chatcmpl-{self.requests}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model_name),
            "choices": choices,
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": completion_tokens,
                "total_tokens": len(ids) + completion_tokens,
            },
        }

    def _completion_choice(self, body: dict[str, Any], prompt: Any, index: int) -> dict[str, Any]:
        ids = list(prompt) if isinstance(prompt, list) else self.tok(prompt)["input_ids"]
        new, _, finish = self.generate(
            ids,
            int(body.get("max_tokens", 16)),
            float(body.get("temperature", 1.0)),
            self._generator(body, index),
        )
        full = ids + new
        lp = self.logprobs(full) if full else torch.zeros(0, 1)
        choice: dict[str, Any] = {
            "index": index,
            "text": self.tok.decode(full if body.get("echo") else new),
            "finish_reason": finish,
            "logprobs": None,
            "prompt_logprobs": None,
        }
        k = body.get("prompt_logprobs")
        if k is not None:
            rows: list[dict[str, Any] | None] = [None]
            for t in range(1, len(ids)):
                dist = lp[t - 1]
                rank = int((dist > dist[ids[t]]).sum()) + 1
                entry = {ids[t]: float(dist[ids[t]])} | dict(self._top(dist, int(k)))
                rows.append(
                    {
                        str(a): {
                            "logprob": v,
                            "rank": rank if a == ids[t] else int((dist > v).sum()) + 1,
                            "decoded_token": self._decode(a),
                        }
                        for a, v in entry.items()
                    }
                )
            choice["prompt_logprobs"] = rows
        if body.get("logprobs") is not None:
            k2 = int(body["logprobs"])
            start = 0 if body.get("echo") else len(ids)
            toks = [self._decode(t) for t in full[start:]]
            choice["logprobs"] = {
                "tokens": toks,
                "token_logprobs": [
                    None if t == 0 else float(lp[t - 1][full[t]]) for t in range(start, len(full))
                ],
                "top_logprobs": [
                    None if t == 0 else {self._decode(a): v for a, v in self._top(lp[t - 1], k2)}
                    for t in range(start, len(full))
                ],
                "text_offset": [sum(len(x) for x in toks[:j]) for j in range(len(toks))],
            }
        return choice

    def _completions(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body.get("prompt", "")
        prompts = (
            prompt
            if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
            else [prompt]
        )
        n = int(body.get("n") or 1)
        choices = [
            self._completion_choice(body, p, pi * n + i)
            for pi, p in enumerate(prompts)
            for i in range(n)
        ]
        return {
            "id": f"cmpl-{self.requests}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.get("model", self.model_name),
            "choices": choices,
        }

    async def _handle(self, request: web.Request, fn: Any) -> web.Response:
        self.requests += 1
        try:
            body = await request.json()
        except ValueError:
            return _json_error(400, "We could not parse the JSON body of your request.")
        self.bodies.append(body)

        def locked() -> dict[str, Any]:  # one request on the model at a time, off the event loop
            with self._lock:
                return fn(body)

        try:
            out = await asyncio.get_running_loop().run_in_executor(None, locked)
        except (KeyError, TypeError, ValueError) as e:
            return _json_error(400, f"bad request: {e}")
        return web.json_response(out)

    async def chat(self, request: web.Request) -> web.Response:
        return await self._handle(request, self._chat)

    async def completions(self, request: web.Request) -> web.Response:
        return await self._handle(request, self._completions)

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model_name, "object": "model"}]}
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.list_models)
        return app


def main() -> None:
    ap = argparse.ArgumentParser(description="OpenAI-compatible server backed by a tiny model")
    ap.add_argument("--model", type=Path, required=True, help="model folder (built if missing)")
    ap.add_argument("--port", type=int, default=8124)
    a = ap.parse_args()
    srv = ModelServer(make_teacher_model(a.model), port=a.port)

    async def serve() -> None:
        await srv.start_async()
        print(f"listening {srv.url}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
