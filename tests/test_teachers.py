"""Several teachers in one harvest: routing (all, share, field), separate rate limits, and the
`teacher` of every row."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, InputError
from pipeline.harvest import HarvestConfig, harvest
from pipeline.store import Store
from tests.conftest import arithmetic_rows, assert_one_line_error, run_cli, write_jsonl
from tests.openai_server import OpenAIServer


@pytest.fixture
def second() -> Iterator[OpenAIServer]:
    with OpenAIServer() as srv:
        yield srv


def two(a: OpenAIServer, b: OpenAIServer, prompts: Path, out: Path, **kw: object) -> HarvestConfig:
    teachers = [
        {"name": "big", "base_url": a.url, "model": "big-model", **kw.pop("big", {})},  # type: ignore[dict-item]
        {"name": "small", "base_url": b.url, "model": "small-model", **kw.pop("small", {})},  # type: ignore[dict-item]
    ]
    return HarvestConfig(prompts=[prompts], out=out, teachers=teachers, **kw)  # type: ignore[arg-type]


def rows_of(run: Path) -> list[dict]:
    with Store(run, readonly=True) as s:
        return [asdict(r) for r in s.iter_responses()]


def test_every_prompt_to_each_teacher_and_each_row_says_who(
    server: OpenAIServer, second: OpenAIServer, tmp_path: Path
) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(4))
    s = harvest(two(server, second, p, tmp_path / "run"), pretty=False)
    assert s.exit_code == 0 and s.total == 8 and s.teachers == ["big", "small"]
    assert server.requests == 4 and second.requests == 4
    rows = rows_of(tmp_path / "run")
    by = {(r["prompt_id"], r["teacher"]): r for r in rows}
    assert len(by) == 8
    for (_, teacher), r in by.items():
        srv, model = (server, "big-model") if teacher == "big" else (second, "small-model")
        assert (
            r["base_url"] == srv.url
            and r["model"] == model
            and r["response_model"] == f"{model}-2026-01-01"
        )


def test_separate_rate_limits(server: OpenAIServer, second: OpenAIServer, tmp_path: Path) -> None:
    # big: its server allows 5 requests/s (429 beyond), and its config says rpm 240 (4/s, burst 2).
    # small: no limit. If the limiter were shared, small would be paced at 4/s as well.
    server.rps, server.burst = 5.0, 3.0
    stamps: dict[str, list[float]] = {"big": [], "small": []}
    server.responder = lambda body, i: stamps["big"].append(time.monotonic()) or {"content": "b"}  # type: ignore[func-returns-value]
    second.responder = lambda body, i: stamps["small"].append(time.monotonic()) or {"content": "s"}  # type: ignore[func-returns-value]
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(10))
    cfg = two(
        server,
        second,
        p,
        tmp_path / "run",
        big={"rpm": 240, "concurrency": 2},
        small={"concurrency": 10},
    )
    s = harvest(cfg, pretty=False)
    assert s.exit_code == 0 and s.completed == 20
    assert server.status_counts.get(429, 0) == 0  # big stayed under its limit
    big_span = stamps["big"][-1] - stamps["big"][0]
    small_span = stamps["small"][-1] - stamps["small"][0]
    assert big_span >= 1.5  # 10 requests at 4/s with a 2-request burst
    assert small_span < 0.5 * big_span and stamps["small"][-1] < stamps["big"][-1]


def test_share_routing_is_deterministic_stable_and_proportional(
    server: OpenAIServer, second: OpenAIServer, tmp_path: Path
) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(200))
    cfg = two(
        server, second, p, tmp_path / "run", routing="share", big={"share": 0.25}, concurrency=32
    )
    s = harvest(cfg, pretty=False)
    assert s.exit_code == 0 and s.total == 200  # one teacher per prompt
    rows = rows_of(tmp_path / "run")
    owner = {r["prompt_id"]: r["teacher"] for r in rows}
    assert len(owner) == 200 and server.requests + second.requests == 200
    assert 30 <= server.requests <= 70  # ~25% of 200 (a hash, not exact)
    # the same assignment from scratch, and a grown file keeps the old prompts where they were
    write_jsonl(p, arithmetic_rows(260))
    s2 = harvest(
        two(server, second, p, tmp_path / "run2", routing="share", big={"share": 0.25}),
        pretty=False,
    )
    assert s2.total == 260
    owner2 = {r["prompt_id"]: r["teacher"] for r in rows_of(tmp_path / "run2")}
    assert all(owner2[k] == v for k, v in owner.items())


def test_field_routing_and_a_row_naming_no_teacher(
    server: OpenAIServer, second: OpenAIServer, tmp_path: Path
) -> None:
    rows = [
        {"id": f"q{i}", "prompt": f"What is {i} + 1?", "tier": "big" if i % 3 == 0 else "small"}
        for i in range(9)
    ]
    p = write_jsonl(tmp_path / "p.jsonl", rows)
    s = harvest(
        two(server, second, p, tmp_path / "run", routing="field", route_field="tier"), pretty=False
    )
    assert s.exit_code == 0 and s.total == 9 and server.requests == 3 and second.requests == 6
    assert {r["prompt_id"]: r["teacher"] for r in rows_of(tmp_path / "run")} == {
        f"q{i}": row["tier"] for i, row in enumerate(rows)
    }
    # a row whose field names no teacher: a one-line error naming file:line, before any request
    write_jsonl(p, [*rows, {"id": "bad", "prompt": "hi", "tier": "huge"}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "harvest:\n  routing: field\n  route_field: tier\n  teachers:\n"
        f"    - {{name: big, base_url: '{server.url}', model: b}}\n"
        f"    - {{name: small, base_url: '{second.url}', model: s}}\n"
    )
    proc = run_cli(
        "harvest", "--config", str(cfg), "--prompts", str(p), "--out", str(tmp_path / "run3")
    )
    assert proc.returncode == InputError.exit_code
    assert_one_line_error(proc, "p.jsonl:10", "'huge'", "big, small")
    assert not (tmp_path / "run3").exists() and server.requests == 3
    batch = run_cli(
        "batch", "submit", str(tmp_path / "run4"), "--config", str(cfg), "--prompts", str(p)
    )
    assert batch.returncode == InputError.exit_code and not (tmp_path / "run4").exists()
    assert_one_line_error(batch, "p.jsonl:10", "'huge'")


def test_routing_config_errors(server: OpenAIServer, second: OpenAIServer, tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(1))
    with pytest.raises(ValueError, match="route_field"):
        two(server, second, p, tmp_path / "r", routing="field")
    with pytest.raises(ValueError, match="shares add up to 1.5"):
        two(
            server,
            second,
            p,
            tmp_path / "r",
            routing="share",
            big={"share": 0.9},
            small={"share": 0.6},
        )
    # shares given for all and summing below 1 are scaled: 0.2 / 0.2 -> half each
    cfg = two(
        server, second, p, tmp_path / "r", routing="share", big={"share": 0.2}, small={"share": 0.2}
    )
    assert cfg.shares() == [0.5, 0.5]
    bad = tmp_path / "c.yaml"
    bad.write_text(
        f"harvest:\n  routing: share\n  teachers:\n    - {{name: a, base_url: '{server.url}', model: a, share: 1}}\n    - {{name: b, base_url: '{server.url}', model: b}}\n"
    )
    proc = run_cli(
        "harvest", "--config", str(bad), "--prompts", str(p), "--out", str(tmp_path / "r")
    )
    assert proc.returncode == ConfigError.exit_code
    assert_one_line_error(proc, "c.yaml", "shares add up to 1")


# -- streaming -----------------------------------------------------------------------------------

# What differs between two runs of the same request, streamed or not.
PER_RUN = {"latency_s", "created_at", "response_id", "attempts", "id", "rowid"}


def comparable(run: Path) -> list[dict]:
    rows = [{k: v for k, v in r.items() if k not in PER_RUN} for r in rows_of(run)]
    return sorted(rows, key=lambda r: (r["prompt_id"], r["sample_index"]))


@pytest.mark.parametrize("shape", ["reasoning_content", "reasoning", "think"])
def test_a_streamed_answer_is_stored_as_the_same_row(
    server: OpenAIServer, tmp_path: Path, shape: str
) -> None:
    server.reasoning = shape
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(3))
    kw = dict(samples=2, logprobs=True, top_logprobs=2, price_input=1.0, price_output=2.0)
    plain = HarvestConfig(prompts=[p], out=tmp_path / "plain", model="m", base_url=server.url, **kw)  # type: ignore[arg-type]
    assert harvest(plain, pretty=False).completed == 6
    assert not any(b.get("stream") for b in server.bodies)
    server.bodies.clear()
    streamed = plain.model_copy(update={"out": tmp_path / "streamed", "stream": True})
    s = harvest(streamed, pretty=False)
    assert s.completed == 6 and s.prompt_tokens > 0 and s.cost_usd > 0
    sent = [b for b in server.bodies if b.get("max_tokens") != 1]  # not the logprobs probe
    assert sent and all(
        b["stream"] is True and b["stream_options"] == {"include_usage": True} for b in sent
    )
    a, b = comparable(tmp_path / "plain"), comparable(tmp_path / "streamed")
    assert a == b
    assert all(r["reasoning"] and r["logprobs"] and r["completion_tokens"] for r in b)
    assert all(r["prompt_tokens"] for r in b)  # usage, from the stream's last chunk
    assert all(r["reasoning_tokens"] for r in b) or shape == "think"
    assert "<think>" not in "".join(r["response"] for r in b)


def test_a_stream_cut_half_way_is_retried_and_stored_once(
    server: OpenAIServer, tmp_path: Path
) -> None:
    server.stream_cuts, server.reasoning = 2, "reasoning_content"
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(4))
    cfg = HarvestConfig(
        prompts=[p],
        out=tmp_path / "run",
        model="m",
        base_url=server.url,
        stream=True,
        concurrency=1,
    )
    s = harvest(cfg, pretty=False)
    assert s.completed == 4 and s.failed == 0 and s.retries == 2
    assert server.status_counts[0] == 2 and server.stream_cuts == 0
    rows = rows_of(tmp_path / "run")
    assert sorted(r["prompt_id"] for r in rows) == ["q0", "q1", "q2", "q3"]
    assert [r["attempts"] for r in rows if r["prompt_id"] == "q0"] == [3]
    assert all(r["reasoning"] and r["response"].endswith(".") for r in rows)
