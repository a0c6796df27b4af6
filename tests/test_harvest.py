"""The harvester over real HTTP against the test server, with a real SQLite store."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import datasets
import pytest

from pipeline.export import EXPORT_COLUMNS, export
from pipeline.harvest import HarvestConfig, harvest
from pipeline.record import canonical_json, content_hash, unpack_logprobs
from pipeline.store import Store, request_key
from tests.conftest import (
    arithmetic_rows,
    assert_one_line_error,
    harvest_args,
    run_cli,
    write_jsonl,
)
from tests.openai_server import OpenAIServer


def cfg(srv: OpenAIServer, prompts: Path, out: Path, **kw: object) -> HarvestConfig:
    return HarvestConfig(prompts=[prompts], out=out, base_url=srv.url, model="teacher-x", **kw)  # type: ignore[arg-type]


def rows_of(run: Path) -> list[dict]:
    with Store(run, readonly=True) as s:
        return [asdict(r) for r in s.iter_responses()]


@pytest.mark.parametrize("shape", ["reasoning_content", "reasoning", "think"])
def test_reasoning_lands_in_one_column_whatever_the_shape(
    server: OpenAIServer, tmp_path: Path, shape: str
) -> None:
    server.reasoning = shape
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(3))
    s = harvest(cfg(server, p, tmp_path / "run"), pretty=False)
    assert s.completed == 3 and s.exit_code == 0
    for r in rows_of(tmp_path / "run"):
        assert r["reasoning"].startswith("Let me think about sample 0")
        assert "<think>" not in r["response"] and r["response"].endswith(".")
        assert "The answer is" in r["response"]


def test_row_schema_and_provenance(server: OpenAIServer, tmp_path: Path) -> None:
    server.reasoning = "reasoning_content"
    p = write_jsonl(
        tmp_path / "p.jsonl",
        [{"id": "q1", "prompt": "What is 2 + 3?", "reference": "5", "meta": {"src": "t"}}],
    )
    harvest(
        cfg(
            server,
            p,
            tmp_path / "run",
            temperature=0.7,
            max_tokens=64,
            seed=1,
            logprobs=True,
            top_logprobs=2,
            price_input=1.0,
            price_output=2.0,
        ),
        pretty=False,
    )
    (r,) = rows_of(tmp_path / "run")
    assert r["prompt_id"] == "q1" and r["sample_index"] == 0
    assert r["messages"] == [{"role": "user", "content": "What is 2 + 3?"}]
    assert r["response"] == "2 + 3 = 5. The answer is 5." and r["finish_reason"] == "stop"
    assert r["model"] == "teacher-x" and r["response_model"] == "teacher-x-2026-01-01"
    assert r["base_url"] == server.url and r["teacher"] == "teacher-x"
    assert r["system_fingerprint"] == "fp_test" and r["response_id"].startswith("chatcmpl-")
    assert r["prompt_tokens"] >= 1 and r["completion_tokens"] >= 1 and r["reasoning_tokens"] >= 1
    assert r["params"] == {
        "temperature": 0.7,
        "max_tokens": 64,
        "seed": 1,
        "logprobs": True,
        "top_logprobs": 2,
    }
    assert r["cost_usd"] == pytest.approx(
        (r["prompt_tokens"] * 1.0 + r["completion_tokens"] * 2.0) / 1e6
    )
    assert (
        r["latency_s"] > 0
        and r["created_at"].endswith("Z")
        and r["reference"] == "5"
        and r["meta"] == {"src": "t"}
    )
    lp = unpack_logprobs(r["logprobs"])
    assert lp[0][0] == "2" and len(lp[0][2]) == 2
    # what was sent (after the one-token probe that logprobs runs start with)
    assert server.bodies[0]["max_tokens"] == 1 and len(server.bodies) == 2
    body = server.bodies[1]
    assert (
        body["temperature"] == 0.7
        and body["max_tokens"] == 64
        and body["logprobs"] is True
        and body["top_logprobs"] == 2
    )


def test_rerun_sends_nothing_new_prompts_only_and_new_params_new_keys(
    server: OpenAIServer, tmp_path: Path
) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(10))
    run = tmp_path / "run"
    first = run_cli(
        *harvest_args(server, p, run),
        "--json",
    )
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["completed"] == 10 and server.requests == 10
    again = run_cli(
        *harvest_args(server, p, run),
        "--json",
    )
    assert again.returncode == 0 and server.requests == 10
    assert json.loads(again.stdout)["already_done"] == 10
    # a growing prompt file: only the new prompts are paid for
    write_jsonl(p, arithmetic_rows(15))
    more = run_cli(*harvest_args(server, p, run))
    assert more.returncode == 0 and server.requests == 15
    # another temperature is another question: new keys, old rows untouched
    before = {r["key"]: r for r in rows_of(run)}
    t = run_cli(
        *harvest_args(server, p, run),
        "--temperature",
        "0.5",
    )
    assert t.returncode == 0 and server.requests == 30
    after = {r["key"]: r for r in rows_of(run)}
    assert len(after) == 30 and all(after[k] == v for k, v in before.items())


def test_seed_is_per_prompt_stable_and_keys_keep_the_configured_seed(
    server: OpenAIServer, tmp_path: Path
) -> None:
    # One seed in every request would make a sampling server draw the same stream for each
    # prompt; each (prompt, sample) gets its own, the same on every run, and keys are unchanged.
    server.supports_n = False
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(6))

    def seeds_sent() -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], list[int]] = {}
        for b in server.bodies:
            out.setdefault(b["messages"][-1]["content"], []).append(b["seed"])
        server.bodies.clear()
        return {(text, i): s for text, got in out.items() for i, s in enumerate(sorted(got))}

    c = cfg(server, p, tmp_path / "a", samples=2, seed=7, concurrency=1)
    assert harvest(c, pretty=False).completed == 12
    first = seeds_sent()
    assert len(first) == 12 and len(set(first.values())) == 12
    for text in {t for t, _ in first}:  # sample i at the prompt's base seed + i
        assert first[(text, 1)] == first[(text, 0)] + 1
    assert harvest(cfg(server, p, tmp_path / "b", samples=2, seed=7), pretty=False).completed == 12
    assert seeds_sent() == first  # another run, the same seeds
    params = c.generation_params()
    assert params["seed"] == 7
    for r in rows_of(tmp_path / "a"):
        assert r["params"]["seed"] == 7
        assert r["key"] == request_key(
            server.url, "teacher-x", r["messages"], params, r["sample_index"]
        )
    # the key written out is content_hash of the dict, as runs harvested before were keyed
    msgs = [{"role": "user", "content": 'Ünïcode "quoted" \u2028 {x}', "extra": [1, 2.5, None]}]
    for mj in (None, canonical_json(msgs)):
        assert request_key(server.url + "/", "m", msgs, {"b": 1, "a": [True]}, 3, mj) == (
            content_hash(
                {
                    "endpoint": server.url,
                    "model": "m",
                    "messages": msgs,
                    "params": {"b": 1, "a": [True]},
                    "sample": 3,
                },
                length=40,
            )
        )


def test_chunked_planning_sends_exactly_the_missing_keys(
    server: OpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prompts are checked and planned 3 at a time: half of them stored already, the rest (and
    # only the rest) is asked, across chunk boundaries, and a rerun sends nothing.
    monkeypatch.setattr("pipeline.harvest.CHUNK", 3)
    monkeypatch.setattr("pipeline.prompts.CHUNK", 3)
    rows = arithmetic_rows(10)
    first = write_jsonl(tmp_path / "a.jsonl", rows[::2])
    run = tmp_path / "run"
    assert harvest(cfg(server, first, run, samples=2), pretty=False).completed == 10
    sent = server.requests
    p = write_jsonl(tmp_path / "p.jsonl", rows)
    s = harvest(cfg(server, p, run, samples=2, concurrency=2), pretty=False)
    assert (s.total, s.already_done, s.completed, s.exit_code) == (20, 10, 10, 0)
    assert server.requests - sent == 5  # n=2: one request per new prompt
    stored = sorted((r["prompt_id"], r["sample_index"]) for r in rows_of(run))
    assert stored == sorted((f"q{i}", k) for i in range(10) for k in range(2))
    again = harvest(cfg(server, p, run, samples=2), pretty=False)
    assert again.already_done == 20 and again.completed == 0 and server.requests - sent == 5


@pytest.mark.parametrize("supports_n", [True, False])
def test_samples_use_n_or_fall_back_to_separate_requests(
    server: OpenAIServer, tmp_path: Path, supports_n: bool
) -> None:
    server.supports_n = supports_n
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(4))
    s = harvest(cfg(server, p, tmp_path / "run", samples=3, concurrency=1), pretty=False)
    rows = rows_of(tmp_path / "run")
    assert s.completed == 12 and len(rows) == 12
    assert sorted((r["prompt_id"], r["sample_index"]) for r in rows) == sorted(
        (f"q{i}", k) for i in range(4) for k in range(3)
    )
    if supports_n:
        assert server.requests == 4 and server.bodies[0]["n"] == 3
    else:  # the first request asks for n=3, gets one answer, and the rest go one by one
        assert server.requests == 12
        assert sum(1 for b in server.bodies if b.get("n")) == 1


def test_rejected_prompt_is_recorded_and_retried_on_rerun(
    server: OpenAIServer, tmp_path: Path
) -> None:
    server.reject = lambda body: (
        "This model's maximum context length is 10 tokens"
        if "3 + 6" in body["messages"][-1]["content"]
        else None
    )
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(5))
    run = tmp_path / "run"
    proc = run_cli(*harvest_args(server, p, run))
    assert proc.returncode == 3, proc.stderr  # partial: rerun later
    assert "1 failed" in proc.stderr and "rerun" in proc.stderr
    with Store(run, readonly=True) as s:
        (f,) = s.failures()
        assert (
            f["prompt_id"] == "q3" and f["status"] == 400 and "maximum context length" in f["error"]
        )
        assert s.count() == 4
    server.reject = None
    proc = run_cli(*harvest_args(server, p, run))
    assert proc.returncode == 0
    with Store(run, readonly=True) as s:
        assert s.failures() == [] and s.count() == 5


def test_length_is_kept_unless_retry_is_configured(server: OpenAIServer, tmp_path: Path) -> None:
    server.responder = lambda body, i: {
        "content": "cut",
        "finish_reason": "length" if body.get("max_tokens", 0) < 100 else "stop",
    }
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(2))
    harvest(cfg(server, p, tmp_path / "a", max_tokens=10), pretty=False)
    assert {r["finish_reason"] for r in rows_of(tmp_path / "a")} == {
        "length"
    } and server.requests == 2
    harvest(
        cfg(server, p, tmp_path / "b", max_tokens=10, retry_length_max_tokens=200), pretty=False
    )
    rows = rows_of(tmp_path / "b")
    assert {r["finish_reason"] for r in rows} == {"stop"} and {
        r["params"]["max_tokens"] for r in rows
    } == {200}
    assert server.requests == 6


def test_api_key_is_sent_but_never_written(server: OpenAIServer, tmp_path: Path) -> None:
    secret = "sk-test-" + hashlib.sha256(b"x").hexdigest()
    server.api_key = secret
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(3))
    run = tmp_path / "run"
    proc = run_cli(
        *harvest_args(server, p, run),
        "--json",
        env={"OPENAI_API_KEY": secret},
    )
    assert proc.returncode == 0, proc.stderr
    assert server.headers_seen[0]["authorization"] == f"Bearer {secret}"
    exp = run_cli("export", str(run), "--to", str(tmp_path / "exp"))
    assert exp.returncode == 0
    assert secret not in proc.stdout + proc.stderr
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.name == "store.sqlite" for f in files) and any(
        f.name == "harvest.log" for f in files
    )
    for f in files:
        assert secret.encode() not in f.read_bytes(), f
    # a wrong key stops the run with what to do, and names the variable, not the key
    bad = run_cli(
        *harvest_args(server, p, tmp_path / "run2"),
        env={"OPENAI_API_KEY": "sk-wrong-123"},
    )
    assert_one_line_error(bad, "HTTP 401", "OPENAI_API_KEY")
    assert "sk-wrong-123" not in bad.stderr


def test_bad_input_one_line_error_and_store_untouched(server: OpenAIServer, tmp_path: Path) -> None:
    server.models = {"good-model"}
    good = write_jsonl(tmp_path / "good.jsonl", arithmetic_rows(2))
    run = tmp_path / "run"

    def args(prompts: Path, *more: str, url: str = server.url, model: str = "good-model") -> list:
        return harvest_args(url, prompts, run, *more, model=model)

    assert run_cli(*args(good)).returncode == 0
    store = run / "store.sqlite"
    snapshot = store.read_bytes()

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a"}\n{"prompt": \n')
    no_prompt = write_jsonl(tmp_path / "np.jsonl", [{"question": "x"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    (tmp_path / "unknown.yaml").write_text("harvest:\n  modle: x\n")
    (tmp_path / "wrongtype.yaml").write_text("harvest:\n  rpm: lots\n")
    cases = [
        (args(tmp_path / "missing.jsonl"), ["missing.jsonl", "not found"]),
        (args(bad_json), ["bad.jsonl:2", "invalid JSON"]),
        (args(no_prompt), ["np.jsonl:1", "neither 'prompt' nor 'messages'"]),
        (args(empty), ["empty.jsonl", "no prompts"]),
        (
            args(good, "--config", str(tmp_path / "unknown.yaml")),
            ["unknown.yaml", "unknown key 'modle'"],
        ),
        (
            args(good, "--config", str(tmp_path / "wrongtype.yaml")),
            ["wrongtype.yaml", "rpm", "lots"],
        ),
        (args(good, url="localhost:8000"), ["base_url", "localhost:8000"]),
        (
            args(write_jsonl(tmp_path / "new.jsonl", arithmetic_rows(3, start=50)), model="nope"),
            ["HTTP 404", "'nope'", "base URL"],
        ),
    ]
    for argv, needles in cases:
        assert_one_line_error(run_cli(*argv), *needles)
        assert store.read_bytes() == snapshot


def test_dry_run_sends_nothing_and_max_cost_stops_before_the_cap(
    server: OpenAIServer, tmp_path: Path
) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(20))
    proc = run_cli(
        *harvest_args(server, p, tmp_path / "run"),
        "--dry-run",
        "--json",
        "--max-tokens",
        "100",
    )
    assert proc.returncode == 0 and server.requests == 0
    s = json.loads(proc.stdout)
    assert (
        s["dry_run"]
        and s["estimated_tokens"] >= 20 * 100
        and "would send 20 requests" in proc.stderr
    )
    assert not (tmp_path / "run").exists()
    # $1 per million output tokens, 100-token answers -> $0.0001 each; the cap allows 5
    server.responder = lambda body, i: {"content": "x" * 400}
    c = cfg(
        server,
        p,
        tmp_path / "run",
        max_tokens=100,
        price_output=1.0,
        max_cost=0.0005,
        concurrency=1,
    )
    s2 = harvest(c, pretty=False)
    assert s2.exit_code == 3 and s2.cost_usd <= 0.0005 and s2.completed == 5
    assert "max_cost" in (s2.stopped or "")


@pytest.mark.parametrize("fmt", ["hf", "parquet", "jsonl"])
def test_export_formats_and_columns(server: OpenAIServer, tmp_path: Path, fmt: str) -> None:
    server.reasoning = "reasoning"
    p = write_jsonl(tmp_path / "p.jsonl", [{**r, "meta": {"k": 1}} for r in arithmetic_rows(4)])
    harvest(cfg(server, p, tmp_path / "run", samples=2), pretty=False)
    path = export(tmp_path / "run", tmp_path / "exp", fmt)  # type: ignore[arg-type]
    if fmt == "hf":
        ds = datasets.load_from_disk(str(path))
    elif fmt == "parquet":
        ds = datasets.Dataset.from_parquet(str(path))
    else:
        ds = datasets.Dataset.from_json(str(path))
    assert set(ds.column_names) == set(EXPORT_COLUMNS)
    assert len(ds) == 8 and len(set(ds["key"])) == 8
    row = ds[0]
    assert row["messages"][-1] == {"role": "assistant", "content": row["response"]}
    assert row["reasoning"] and row["reference"] == "0" and json.loads(row["meta"]) == {"k": 1}
