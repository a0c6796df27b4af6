"""The model-backed test server returns the tiny model's real logprobs, in vLLM's shapes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.model_server import ModelServer, make_teacher_model
from tests.tinymodels import make_tiny_model

QUESTION = [{"role": "user", "content": "What is 12 + 7?"}]


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_teacher_model(tmp_path_factory.mktemp("teacher") / "qwen2")


@pytest.fixture(scope="module")
def srv(teacher_path: Path) -> Iterator[ModelServer]:
    with ModelServer(teacher_path) as s:
        yield s


def post(srv: ModelServer, path: str, body: dict) -> dict:
    r = httpx.post(srv.url + path, json={"model": "teacher", **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_logprobs_are_the_models_own(srv: ModelServer) -> None:
    body = {"messages": QUESTION, "max_tokens": 8, "temperature": 1.0, "seed": 3, "n": 2}
    out = post(srv, "/chat/completions", body | {"logprobs": True, "top_logprobs": 5})
    prompt = srv.tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    prompt_ids = srv.tok(prompt)["input_ids"]
    assert len(out["choices"]) == 2
    for choice in out["choices"]:
        rows = choice["logprobs"]["content"]
        assert "".join(r["token"] for r in rows) == choice["message"]["content"]
        ids = srv.tok(choice["message"]["content"])["input_ids"]
        forced = srv.logprobs(prompt_ids + ids)[len(prompt_ids) - 1 : -1]
        for r, t, dist in zip(rows, ids, forced):
            assert r["logprob"] == pytest.approx(float(dist[t]), abs=1e-4)
            tops = [a["logprob"] for a in r["top_logprobs"]]
            assert len(tops) == 5 and tops == sorted(tops, reverse=True)
            assert tops[0] == pytest.approx(float(dist.max()), abs=1e-4)
    again = post(srv, "/chat/completions", body)
    assert [c["message"] for c in again["choices"]] == [c["message"] for c in out["choices"]]
    assert out["usage"]["prompt_tokens"] == len(prompt_ids)


def test_prompt_logprobs_equal_teacher_forced(srv: ModelServer) -> None:
    text = "What is 12 + 7? The answer is 19."
    ids = srv.tok(text)["input_ids"]
    forced = srv.logprobs(ids)
    out = post(srv, "/completions", {"prompt": text, "max_tokens": 0, "prompt_logprobs": 3})
    rows = out["choices"][0]["prompt_logprobs"]
    assert rows[0] is None and len(rows) == len(ids)
    for t in range(1, len(ids)):
        entry = rows[t][str(ids[t])]
        assert entry["logprob"] == pytest.approx(float(forced[t - 1][ids[t]]), abs=1e-4)
        assert entry["rank"] == int((forced[t - 1] > forced[t - 1][ids[t]]).sum()) + 1
        assert entry["decoded_token"] == srv.tok.decode([ids[t]])
        best = max(rows[t].values(), key=lambda e: e["logprob"])
        assert best["rank"] == 1

    # The same text as token ids, and echo + logprobs: the same numbers.
    by_ids = post(srv, "/completions", {"prompt": ids, "max_tokens": 0, "prompt_logprobs": 3})
    assert by_ids["choices"][0]["prompt_logprobs"] == rows
    echo = post(srv, "/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2})
    lp = echo["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and echo["choices"][0]["text"] == text
    assert lp["token_logprobs"][1:] == [rows[t][str(ids[t])]["logprob"] for t in range(1, len(ids))]


def test_completion_generates_and_scores_its_tokens(srv: ModelServer) -> None:
    out = post(srv, "/completions", {"prompt": "What is", "max_tokens": 4, "logprobs": 1})
    c = out["choices"][0]
    assert "".join(c["logprobs"]["tokens"]) == c["text"]
    assert all(v <= 0 for v in c["logprobs"]["token_logprobs"])


def test_teacher_differs_from_a_fresh_student(srv: ModelServer, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "s"))
    ids = srv.tok("The answer is 19.")["input_ids"]
    with torch.no_grad():
        s = torch.log_softmax(student(torch.tensor([ids])).logits[0].float(), -1)
    t = srv.logprobs(ids)
    kl = (t.exp() * (t - s)).sum(-1).mean()
    assert kl > 0.1
