"""The Batch API flow over real HTTP against a test server with /v1/files and /v1/batches."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from pipeline.batch import CRASH_ENV, BatchConfig, harvest_config, run_batch, status
from pipeline.harvest import HarvestConfig, harvest
from pipeline.store import Store
from pipeline.teacher import cost
from tests.batch_server import BatchServer
from tests.conftest import arithmetic_rows, assert_one_line_error, run_cli, write_jsonl

# What may differ between a batch and an online answer to the same request.
PROVENANCE = {"response_id", "cost_usd", "latency_s", "attempts", "created_at", "source"}


@pytest.fixture
def bserver() -> Iterator[BatchServer]:
    with BatchServer() as srv:
        yield srv


def hcfg(srv: BatchServer, prompts: Path, out: Path, **kw: object) -> HarvestConfig:
    return HarvestConfig(
        prompts=[prompts],
        out=out,
        base_url=srv.url,
        model="m",
        price_input=1.0,
        price_output=2.0,
        **kw,
    )  # type: ignore[arg-type]


def fast(**kw: object) -> BatchConfig:
    return BatchConfig(poll_interval=0.01, **kw)  # type: ignore[arg-type]


def rows_of(run: Path) -> list[dict]:
    with Store(run, readonly=True) as s:
        return [asdict(r) for r in s.iter_responses()]


def write_config(path: Path, srv: BatchServer, prompts: Path, **batch: object) -> Path:
    harvest_section = {
        "prompts": [str(prompts)],
        "base_url": srv.url,
        "model": "m",
        "price_input": 1.0,
        "price_output": 2.0,
    }
    path.write_text(
        yaml.safe_dump({"harvest": harvest_section, "batch": {"poll_interval": 0.01, **batch}})
    )
    return path


def test_batch_and_online_harvests_make_the_same_rows(bserver: BatchServer, tmp_path: Path) -> None:
    # The answer depends on the seed the request carries: online sends n=2 with seed 10 (answers
    # 10, 11), batch one request per sample with seeds 10 and 11; the rows must agree.
    bserver.responder = lambda body, i: {
        "content": f"{body['messages'][-1]['content']} -> seed {body.get('seed', 0) + i}"
    }
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(5))
    online = harvest(
        hcfg(bserver, p, tmp_path / "online", samples=2, seed=10, temperature=0.8), pretty=False
    )
    assert online.exit_code == 0 and bserver.requests == 5  # n=2: one request per prompt
    s = run_batch(
        "run",
        tmp_path / "batch",
        fast(wait=True),
        hcfg(bserver, p, tmp_path / "batch", samples=2, seed=10, temperature=0.8),
    )
    assert (
        s.exit_code == 0 and s.status == "done" and s.answers == 10 and s.stored == s.wanted == 10
    )
    assert bserver.creates == 1 and bserver.batch_lines == 10
    a, b = rows_of(tmp_path / "online"), rows_of(tmp_path / "batch")
    assert [r["key"] for r in a] == [r["key"] for r in b]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in PROVENANCE} == {
            k: v for k, v in rb.items() if k not in PROVENANCE
        }
        assert ra["source"] == "online" and rb["source"] == "batch" and rb["latency_s"] is None
        # the batch price: half of the list price of the tokens this row used
        t = hcfg(bserver, p, tmp_path).all_teachers()[0]
        assert rb["cost_usd"] == pytest.approx(
            0.5 * cost(t, rb["prompt_tokens"], rb["completion_tokens"])
        )
    # each prompt's own seeds (a hash of seed 10 and its id), sample i at base + i
    seeds: dict[str, set[int]] = {}
    for r in b:
        seeds.setdefault(r["prompt_id"], set()).add(int(r["response"].rsplit(" ", 1)[1]))
    assert all(len(s) == 2 and max(s) - min(s) == 1 for s in seeds.values())
    assert len({min(s) for s in seeds.values()}) == 5
    # what went out: the online body, one sample per line, custom_id = store key
    assert all(
        line["url"] == "/v1/chat/completions" for lines in bserver.lines.values() for line in lines
    )
    assert {line["custom_id"] for lines in bserver.lines.values() for line in lines} == {
        r["key"] for r in b
    }


def test_requests_split_at_the_file_limits(bserver: BatchServer, tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(7))
    s = run_batch(
        "submit",
        tmp_path / "run",
        fast(max_requests_per_file=3),
        hcfg(bserver, p, tmp_path / "run"),
    )
    assert s.exit_code == 0 and s.submitted_batches == 3 and s.submitted_requests == 7
    assert sorted(len(v) for v in bserver.lines.values()) == [1, 3, 3]
    # bytes: each line is ~200 bytes, so a 1 KiB cap holds a few lines per file
    one_line = len(next(iter(bserver.contents.values())).splitlines()[0]) + 1
    s2 = run_batch(
        "submit",
        tmp_path / "run2",
        fast(max_bytes_per_file=1024),
        hcfg(bserver, p, tmp_path / "run2"),
    )
    per_file = 1024 // one_line
    assert s2.submitted_batches == -(-7 // per_file) and s2.submitted_requests == 7
    assert all(
        f["bytes"] <= 1024 for f in bserver.files.values() if f["filename"].startswith("distill-")
    )
    # a single request over the cap: a one-line error naming the prompt, nothing submitted
    big = write_jsonl(tmp_path / "big.jsonl", [{"id": "huge", "prompt": "x" * 5000}])
    cfg = write_config(tmp_path / "c.yaml", bserver, big, max_bytes_per_file=2048)
    creates = bserver.creates
    assert_one_line_error(
        run_cli("batch", "submit", str(tmp_path / "run3"), "--config", str(cfg)),
        "big.jsonl:1",
        "max_bytes_per_file",
    )
    assert bserver.creates == creates


def test_expired_part_is_resubmitted_and_only_that(bserver: BatchServer, tmp_path: Path) -> None:
    bserver.outcomes = ["expire"]
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(6))
    c = hcfg(bserver, p, tmp_path / "run")
    first = run_batch("run", tmp_path / "run", fast(), c)
    assert first.exit_code == 3 and first.open_batches == 1 and first.submitted_requests == 6
    s = run_batch("run", tmp_path / "run", fast(wait=True), c)
    assert s.exit_code == 0 and s.stored == 6 and s.errors == 3  # 3 batch_expired lines
    assert bserver.creates == 2
    first_keys, second_keys = (
        {ln["custom_id"] for ln in lines} for lines in bserver.lines.values()
    )
    rows = {r["key"]: r for r in rows_of(tmp_path / "run")}
    assert len(second_keys) == 3 and second_keys < first_keys and set(rows) == first_keys
    assert all(rows[k]["attempts"] == 2 for k in second_keys)
    assert all(rows[k]["attempts"] == 1 for k in first_keys - second_keys)
    with Store(tmp_path / "run", readonly=True) as st:
        assert st.failures() == []  # the later answers cleared the expiry records
    assert bserver.batch_lines == 6  # no request was answered twice


def test_failed_batch_exits_1_then_a_rerun_resubmits(bserver: BatchServer, tmp_path: Path) -> None:
    bserver.outcomes = ["fail"]
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(4))
    cfg = write_config(tmp_path / "c.yaml", bserver, p)
    run = tmp_path / "run"
    proc = run_cli("batch", "run", str(run), "--config", str(cfg), "--wait", "--json")
    assert proc.returncode == 1, proc.stderr
    s = json.loads(proc.stdout)
    assert (
        s["status"] == "failed"
        and "token_limit_exceeded" in s["failed_batches"][0]
        and s["left"] == 4
    )
    assert bserver.creates == 1  # not resubmitted in the same command
    # no --config: the harvest section comes from RUN/config.yaml, written by the first command
    again = run_cli("batch", "run", str(run), "--wait", "--poll-interval", "0.01", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["stored"] == 4 and bserver.creates == 2
    assert "failed" in (run / "harvest.log").read_text()


def test_a_batch_stopped_before_it_starts_ends_its_log_with_why(
    bserver: BatchServer, tmp_path: Path
) -> None:
    """From cron, a log that ends in the last run's summary reads as a hang: an edited prompt
    (found with the store open) and a prompt file that is not JSON (found before) each end
    harvest.log with the failure and its exit code."""
    rows = arithmetic_rows(2)
    p = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = write_config(tmp_path / "c.yaml", bserver, p)
    run = tmp_path / "run"
    assert run_cli("batch", "run", str(run), "--config", str(cfg), "--wait").returncode == 0
    write_jsonl(p, [rows[0], {**rows[1], "prompt": "What is 9 + 9?"}])
    assert_one_line_error(run_cli("batch", "submit", str(run), "--config", str(cfg)), "'q1'")
    last = (run / "harvest.log").read_text().splitlines()[-1]
    assert "batch submit failed" in last and "'q1'" in last and "(exit 2)" in last
    p.write_text('{"id": "q0", "prompt": \n')
    assert_one_line_error(run_cli("batch", "submit", str(run), "--config", str(cfg)), f"{p}:1")
    last = (run / "harvest.log").read_text().splitlines()[-1]
    assert "batch submit failed" in last and f"{p}:1" in last and "(exit 2)" in last


def test_rejected_requests_are_recorded_as_failures(bserver: BatchServer, tmp_path: Path) -> None:
    bserver.reject = lambda body: "Invalid prompt" if "What is 2 + 4?" in json.dumps(body) else None
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(4))
    s = run_batch("run", tmp_path / "run", fast(wait=True), hcfg(bserver, p, tmp_path / "run"))
    assert s.exit_code == 3 and s.stored == 3 and s.left == 1 and s.errors == 1
    with Store(tmp_path / "run", readonly=True) as st:
        (f,) = st.failures()
    assert f["prompt_id"] == "q2" and f["status"] == 400 and "Invalid prompt" in f["error"]


def test_cancel_keeps_what_was_answered(bserver: BatchServer, tmp_path: Path) -> None:
    bserver.outcomes = ["stall"]
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(6))
    c = hcfg(bserver, p, tmp_path / "run")
    run_batch("submit", tmp_path / "run", fast(), c)
    assert run_batch("collect", tmp_path / "run", fast(), None).open_batches == 1
    cancelled = run_batch("cancel", tmp_path / "run", fast(), None)
    assert cancelled.exit_code == 0 and bserver.cancels == 1
    s = run_batch("collect", tmp_path / "run", fast(wait=True), None)
    assert s.exit_code == 3 and s.stored == 3 and s.open_batches == 0 and s.left == 3
    assert [b["remote_status"] for b in status(tmp_path / "run").batches] == ["cancelled"]


def test_status_reads_without_the_lock_and_prints_json(
    bserver: BatchServer, tmp_path: Path
) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(3))
    cfg = write_config(tmp_path / "c.yaml", bserver, p)
    assert run_cli("batch", "submit", str(tmp_path / "run"), "--config", str(cfg)).returncode == 0
    from pipeline.store import RunLock

    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        proc = run_cli("batch", "status", str(tmp_path / "run"), "--json")
        locked = run_cli("batch", "collect", str(tmp_path / "run"))
    finally:
        lock.release()
    assert proc.returncode == 0, proc.stderr
    (b,) = json.loads(proc.stdout)["batches"]
    assert (
        b["state"] == "submitted" and b["request_count"] == 3 and b["request_counts"]["total"] == 3
    )
    assert_one_line_error(locked, "another harvest is running")


@pytest.mark.parametrize(
    "step",
    ["prepared", "written", "uploaded", "file_recorded", "created", "downloaded", "ingested"],
)
def test_a_crash_at_each_step_is_recovered_without_submitting_twice(
    bserver: BatchServer, tmp_path: Path, step: str
) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(5))
    cfg = write_config(tmp_path / "c.yaml", bserver, p)
    run = tmp_path / "run"
    crashed = run_cli(
        "batch", "run", str(run), "--config", str(cfg), "--wait", env={CRASH_ENV: step}
    )
    assert crashed.returncode == -9, crashed.stderr  # killed at the step (kill -9)
    uploads, creates = bserver.uploads, bserver.creates
    s = run_batch("run", run, fast(wait=True), hcfg(bserver, p, run))
    assert s.exit_code == 0 and s.stored == 5, s.line()
    assert bserver.creates == 1, f"created {bserver.creates} batches"
    assert bserver.uploads == 1 and bserver.batch_lines == 5
    assert (uploads, creates) == {
        "prepared": (0, 0),
        "written": (0, 0),
        "uploaded": (1, 0),
        "file_recorded": (1, 0),
    }.get(step, (1, 1))
    rows = rows_of(run)
    assert len(rows) == len({r["key"] for r in rows}) == 5
    with Store(run, readonly=True) as st:
        assert [b["state"] for b in st.batches()] == ["collected"]
    assert not list((run / "batches").glob("*.jsonl"))  # transient files cleaned up


def test_batch_teachers_subset_and_unknown_name(bserver: BatchServer, tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(3))
    c = HarvestConfig(
        prompts=[p],
        out=tmp_path / "run",
        teachers=[
            {"name": "api", "base_url": bserver.url, "model": "big"},
            {"name": "local", "base_url": bserver.url, "model": "small"},
        ],  # type: ignore[list-item]
    )
    run_batch("submit", tmp_path / "run", fast(teachers=["api"]), c)
    # a later command may reload what to ask from RUN/config.yaml, teachers and all
    again = harvest_config(tmp_path / "run", None, {})
    assert [t.label for t in again.all_teachers()] == ["api", "local"]
    s = run_batch("run", tmp_path / "run", fast(wait=True, teachers=["api"]), again)
    assert (
        s.exit_code == 0
        and s.wanted == 3
        and {r["teacher"] for r in rows_of(tmp_path / "run")} == {"api"}
    )
    assert {line["body"]["model"] for lines in bserver.lines.values() for line in lines} == {"big"}
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="'nope'"):
        run_batch("submit", tmp_path / "run", fast(teachers=["nope"]), c)


def test_a_create_that_times_out_is_found_not_repeated(
    bserver: BatchServer, tmp_path: Path
) -> None:
    bserver.create_latency = 2.0  # the batch exists, but the answer comes after our 0.5 s timeout
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(3))
    s = run_batch(
        "run", tmp_path / "run", fast(wait=True), hcfg(bserver, p, tmp_path / "run", timeout=0.5)
    )
    assert s.exit_code == 0 and s.stored == 3
    assert bserver.creates == 1 and bserver.uploads == 1


def test_one_waiting_run_resubmits_expired_requests_but_not_refused_ones(
    bserver: BatchServer, tmp_path: Path
) -> None:
    bserver.outcomes = ["expire"]
    bserver.reject = lambda body: "Invalid prompt" if "What is 0 + 0?" in json.dumps(body) else None
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(6))
    s = run_batch("run", tmp_path / "run", fast(wait=True), hcfg(bserver, p, tmp_path / "run"))
    # q0 is refused (400) in the first batch's answered half: it waits for the next run;
    # the expired half goes out again in the same command and is answered.
    assert s.exit_code == 3 and s.stored == 5 and s.left == 1 and bserver.creates == 2
    assert len(list(bserver.lines.values())[1]) == 3


def test_online_harvest_does_not_pay_again_for_keys_in_an_open_batch(
    bserver: BatchServer, tmp_path: Path
) -> None:
    bserver.outcomes = ["stall"]
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(4))
    run_batch("submit", tmp_path / "run", fast(), hcfg(bserver, p, tmp_path / "run"))
    write_jsonl(p, arithmetic_rows(6))  # two new prompts since the batch went out
    before = bserver.requests
    s = harvest(hcfg(bserver, p, tmp_path / "run"), pretty=False)
    assert bserver.requests - before == 2  # only the new prompts went online
    assert s.completed == 2 and s.in_open_batches == 4 and s.exit_code == 3
    assert "wait in open batches" in s.line()
