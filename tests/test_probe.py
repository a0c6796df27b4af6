"""The probe against the test server in the shapes real servers take: vLLM-like (n, logprobs,
prompt_logprobs), llama.cpp-like (ignores n and logprobs), SGLang-like (echo scoring, small k),
OpenAI-like (headers, Batch API); and the errors harvest gives for a bad key, model or port."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.common import free_port
from pipeline.errors import EXIT_FAILED, TeacherError
from pipeline.probe import ProbeResult, probe, read_probe, write_probe
from pipeline.store import Store
from pipeline.teacher import TeacherConfig
from tests.conftest import (
    arithmetic_rows,
    assert_one_line_error,
    harvest_args,
    run_cli,
    write_jsonl,
)
from tests.openai_server import OpenAIServer


def test_a_vllm_like_server(server: OpenAIServer) -> None:
    server.reasoning, server.scoring = "reasoning_content", "prompt_logprobs"
    r = probe(server.url, "m")
    assert r.n_honoured is True
    assert r.logprobs is True and r.top_logprobs == 20
    assert r.scoring == "prompt_logprobs"
    assert r.reasoning == "reasoning_content"
    assert r.batch_api is False and r.ratelimit_headers == {}
    assert r.latency_s is not None and 1 <= r.requests <= 8
    assert server.bodies[0]["n"] == 2 and server.bodies[0]["top_logprobs"] == 20


def test_a_server_that_ignores_n_and_logprobs(server: OpenAIServer) -> None:
    server.supports_n, server.supports_logprobs, server.reasoning = False, False, "think"
    r = probe(server.url, "m")
    assert r.n_honoured is False
    assert r.logprobs is False and r.top_logprobs == 0
    assert r.scoring is None
    assert r.reasoning == "think"
    assert any("none came back" in n for n in r.notes)


def test_a_small_top_logprobs_cap_and_echo_scoring(server: OpenAIServer) -> None:
    server.max_top_logprobs, server.scoring, server.reasoning = 5, "echo", "reasoning"
    r = probe(server.url, "m")
    assert r.top_logprobs == 5 and r.logprobs is True
    assert r.scoring == "echo"
    assert r.reasoning == "reasoning"
    assert [b.get("top_logprobs") for b in server.bodies] == [20, 5]


def test_an_openai_like_server(server: OpenAIServer) -> None:
    server.rps, server.batches = 100, True
    r = probe(server.url, "m")
    assert r.ratelimit_headers["x-ratelimit-limit-requests"] == "6000"
    assert r.batch_api is True and r.reasoning is None


def test_max_cost_stops_before_paying(server: OpenAIServer) -> None:
    t = TeacherConfig(base_url=server.url, model="m", price_input=1e6, price_output=1e6)
    r = probe(server.url, "m", max_cost=0.5, teacher=t)
    assert r.requests == 1  # only the free GET /v1/batches
    assert server.requests == 0 and r.cost_usd == 0
    assert any("max_cost" in n for n in r.notes)


def test_a_wrong_key_is_the_same_error_as_harvest(
    server: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.api_key = "sk-right"
    monkeypatch.setenv("MY_KEY", "sk-wrong")
    with pytest.raises(TeacherError) as e:
        probe(server.url, "m", api_key_env="MY_KEY")
    assert "HTTP 401" in str(e.value) and "MY_KEY" in str(e.value)
    assert "sk-wrong" not in str(e.value)
    assert e.value.exit_code == EXIT_FAILED


def test_an_unknown_model(server: OpenAIServer) -> None:
    server.models = {"real-model"}
    with pytest.raises(TeacherError, match=r"HTTP 404.*'nope'"):
        probe(server.url, "nope")


def test_a_closed_port() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(TeacherError, match="cannot reach"):
        probe(url, "m", timeout=5)


def test_the_result_is_stored_in_the_run_directory_and_read_back_while_fresh(
    server: OpenAIServer, tmp_path: Path
) -> None:
    r = probe(server.url, "m")
    path = write_probe(tmp_path / "run", r)
    assert json.loads(path.read_text())["n_honoured"] is True
    assert read_probe(tmp_path / "run", 3600, base_url=server.url, model="m") == r
    assert read_probe(tmp_path / "run", -1) is None  # stale
    assert read_probe(tmp_path / "run", 3600, model="other") is None
    assert read_probe(tmp_path / "empty") is None
    assert isinstance(ProbeResult.model_validate_json(path.read_text()), ProbeResult)


# -- `distill probe` as a user runs it ------------------------------------------------------------


def test_the_command_prints_a_table_or_json_and_writes_the_run_directory(
    server: OpenAIServer, tmp_path: Path
) -> None:
    server.reasoning, server.scoring = "reasoning_content", "prompt_logprobs"
    proc = run_cli("probe", "--base-url", server.url, "--model", "m")
    assert proc.returncode == 0, proc.stderr
    assert "n honoured          yes" in proc.stdout
    assert "text scoring        prompt_logprobs" in proc.stdout
    assert "reasoning           reasoning_content" in proc.stdout
    run = tmp_path / "run"
    proc = run_cli("probe", "--base-url", server.url, "--model", "m", "--json", "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    printed = ProbeResult.model_validate_json(proc.stdout)
    assert printed.top_logprobs == 20 and printed.scoring == "prompt_logprobs"
    assert read_probe(run, base_url=server.url, model="m") == printed


def test_the_command_takes_the_teacher_from_a_config(server: OpenAIServer, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"harvest:\n  base_url: {server.url}\n  model: from-config\n"
        "  price_input: 1000000\n  price_output: 1000000\n"
    )
    proc = run_cli("probe", "--config", str(cfg), "--max-cost", "0.5", "--json")
    assert proc.returncode == 0, proc.stderr
    r = ProbeResult.model_validate_json(proc.stdout)
    assert r.model == "from-config" and server.requests == 0
    assert any("max_cost" in n for n in r.notes)


def test_the_command_errors_like_harvest(server: OpenAIServer, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"
    proc = run_cli("probe", "--base-url", closed, "--model", "m")
    assert_one_line_error(proc, "cannot reach", closed)
    assert proc.returncode == EXIT_FAILED

    server.api_key = "sk-right"
    proc = run_cli(
        "probe", "--base-url", server.url, "--model", "m", env={"OPENAI_API_KEY": "sk-wrong-9"}
    )
    assert_one_line_error(proc, "HTTP 401", "OPENAI_API_KEY")
    assert proc.returncode == EXIT_FAILED and "sk-wrong-9" not in proc.stderr

    server.api_key, server.models = None, {"real"}
    proc = run_cli("probe", "--base-url", server.url, "--model", "nope", "--out", str(tmp_path))
    assert_one_line_error(proc, "HTTP 404", "'nope'", "base URL")
    assert proc.returncode == EXIT_FAILED and not (tmp_path / "probe.json").exists()

    # harvest says the same of the same model
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(1))
    harvested = run_cli(*harvest_args(server, p, tmp_path / "run", model="nope"))
    assert harvested.returncode == proc.returncode
    # "HTTP 404 from <url>: <server's message>": the same status, URL and message in both
    assert harvested.stderr.split(";")[0] == proc.stderr.split(";")[0]
    assert server.url in proc.stderr


# -- harvest uses what the probe found ------------------------------------------------------------


def stored(run: Path) -> int:
    if not (run / "store.sqlite").exists():
        return 0
    with Store(run, readonly=True) as s:
        return s.count()


def test_harvest_with_logprobs_stops_after_one_cheap_request_to_a_server_that_ignores_them(
    server: OpenAIServer, tmp_path: Path
) -> None:
    server.supports_logprobs = False
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(50))
    run = tmp_path / "run"
    proc = run_cli(*harvest_args(server, p, run), "--logprobs", "--top-logprobs", "5")
    assert_one_line_error(proc, "ignores `logprobs`", server.url, "--logprobs")
    assert proc.returncode == EXIT_FAILED
    assert server.requests == 1  # the probe: n=2, max_tokens 1, the run's top_logprobs
    assert server.bodies[0]["max_tokens"] == 1 and server.bodies[0]["top_logprobs"] == 5
    assert stored(run) == 0
    # without --logprobs the same server is harvested as usual, and not probed
    assert run_cli(*harvest_args(server, p, run, "--limit", "3")).returncode == 0
    assert server.requests == 4 and stored(run) == 3


def test_harvest_reads_a_fresh_probe_from_the_run_directory(
    server: OpenAIServer, tmp_path: Path
) -> None:
    server.supports_n, server.supports_logprobs = False, False
    run = tmp_path / "run"
    assert (
        run_cli("probe", "--base-url", server.url, "--model", "m", "--out", str(run)).returncode
        == 0
    )
    probed = server.requests
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(4))
    proc = run_cli(*harvest_args(server, p, run), "--logprobs")
    assert_one_line_error(proc, "ignores `logprobs`", "a probe at")
    assert server.requests == probed  # nothing sent: probe.json said so
    # n: the probe found it ignored, so each sample is its own request from the start
    server.bodies.clear()
    assert run_cli(*harvest_args(server, p, run), "--samples", "3").returncode == 0
    assert len(server.bodies) == 12 and all("n" not in b for b in server.bodies)
    assert stored(run) == 12


def test_harvest_stops_at_the_first_answer_without_logprobs_whatever_the_probe_said(
    server: OpenAIServer, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert (
        run_cli("probe", "--base-url", server.url, "--model", "m", "--out", str(run)).returncode
        == 0
    )
    server.supports_logprobs = False  # e.g. a proxy routed the run elsewhere
    before = server.requests
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(50))
    proc = run_cli(*harvest_args(server, p, run), "--logprobs", "--concurrency", "1")
    assert_one_line_error(proc, "prompt q0", "without the logprobs", "not stored")
    assert proc.returncode == EXIT_FAILED
    assert server.requests - before == 1 and stored(run) == 0
