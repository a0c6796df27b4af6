"""Cron-safety of `distill harvest` and `distill batch`: the run lock, exit codes, caps, summaries,
the log file, and incremental runs, all through the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import EXIT_OK, EXIT_PARTIAL, RunLockedError, StoreError
from pipeline.harvest import HarvestConfig, harvest
from pipeline.store import STORE_FILE, RunLock, Store
from tests.conftest import (
    arithmetic_rows,
    assert_one_line_error,
    harvest_args,
    run_cli,
    write_jsonl,
)
from tests.openai_server import OpenAIServer


def test_a_second_run_on_a_locked_directory_refuses(server: OpenAIServer, tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(3))
    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock(run)
    lock.acquire()  # as a harvest in progress holds it
    try:
        proc = run_cli(*harvest_args(server, p, run))
        batch = run_cli(
            "batch",
            "submit",
            str(run),
            "--prompts",
            str(p),
            "--base-url",
            server.url,
            "--model",
            "m",
        )
    finally:
        lock.release()
    for r in (proc, batch):
        assert r.returncode == RunLockedError.exit_code and r.returncode not in (
            EXIT_OK,
            EXIT_PARTIAL,
        )
        assert_one_line_error(r, str(run), "another harvest is running", f"pid {os.getpid()}")
    assert server.requests == 0
    assert run_cli(*harvest_args(server, p, run)).returncode == EXIT_OK  # free again


def test_a_lock_left_by_a_killed_run_does_not_block(server: OpenAIServer, tmp_path: Path) -> None:
    server.latency = 0.2
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(20))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline", *harvest_args(server, p, run, "--concurrency", "1")]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        wait_for_store(run, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with Store(run, readonly=True) as st:
                    if st.count() >= 2:
                        break
            except StoreError:  # created, schema not committed yet
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (run / "lock").exists()  # the file stays; the kernel dropped the flock
    server.latency = 0.0
    s = harvest(HarvestConfig(prompts=[p], out=run, base_url=server.url, model="m"), pretty=False)
    assert s.exit_code == EXIT_OK and s.already_done >= 2 and s.already_done + s.completed == 20


def test_max_duration_exits_3_with_a_json_summary_and_a_rerun_completes(
    server: OpenAIServer, tmp_path: Path
) -> None:
    server.latency = 0.1
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(30))
    run = tmp_path / "run"
    first = run_cli(
        *harvest_args(server, p, run, "--concurrency", "1", "--max-duration", "0.5", "--json")
    )
    assert first.returncode == EXIT_PARTIAL, first.stderr
    s = json.loads(first.stdout)
    assert s["status"] == "partial" and "max_duration" in s["stopped"] and 0 < s["completed"] < 30
    (line,) = [ln for ln in first.stderr.splitlines() if ln.startswith("harvest ")]
    assert "harvest partial" in line and "rerun the same command" in line
    server.latency = 0.0
    second = run_cli(*harvest_args(server, p, run, "--json"))
    assert second.returncode == EXIT_OK
    s2 = json.loads(second.stdout)
    assert (
        s2["status"] == "done"
        and s2["already_done"] == s["completed"]
        and s2["already_done"] + s2["completed"] == 30
    )
    assert server.requests == 30  # nothing asked twice
    log = (run / "harvest.log").read_text()
    assert log.count("harvest start") == 2 and "harvest partial" in log and "harvest done" in log


def test_max_cost_exits_3_and_a_rerun_with_a_higher_cap_completes(
    server: OpenAIServer, tmp_path: Path
) -> None:
    server.responder = lambda body, i: {"content": "x" * 400}  # 100 tokens at $1/M = $0.0001
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(10))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"harvest:\n  price_output: 1.0\n  max_tokens: 100\n  concurrency: 1\n  base_url: {server.url}\n"
    )
    run = tmp_path / "run"
    args = ["harvest", "--config", str(cfg), "--prompts", str(p), "--out", str(run), "--model", "m"]
    first = run_cli(*args, "--max-cost", "0.0004")
    assert first.returncode == EXIT_PARTIAL and "max_cost" in first.stderr
    assert run_cli(*args, "--max-cost", "1").returncode == EXIT_OK
    with Store(run, readonly=True) as st:
        assert st.count() == 10
    assert server.requests == 10


def test_a_growing_prompt_file_pays_only_for_new_prompts(
    server: OpenAIServer, tmp_path: Path
) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(5))
    run = tmp_path / "run"
    assert run_cli(*harvest_args(server, p, run)).returncode == EXIT_OK and server.requests == 5
    write_jsonl(p, arithmetic_rows(8))  # the nightly file grew by 3
    proc = run_cli(*harvest_args(server, p, run, "--json"))
    s = json.loads(proc.stdout)
    assert s["completed"] == 3 and s["already_done"] == 5 and server.requests == 8


def test_batch_runs_are_incremental_too(tmp_path: Path) -> None:
    from tests.batch_server import BatchServer

    with BatchServer() as srv:
        p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(4))
        run = tmp_path / "run"
        args = [
            "batch",
            "run",
            str(run),
            "--prompts",
            str(p),
            "--base-url",
            srv.url,
            "--model",
            "m",
            "--wait",
            "--poll-interval",
            "0.01",
            "--json",
        ]
        first = run_cli(*args)
        assert first.returncode == EXIT_OK, first.stderr
        write_jsonl(p, arithmetic_rows(6))
        second = run_cli(*args)
        assert second.returncode == EXIT_OK and json.loads(second.stdout)["answers"] == 2
        assert srv.batch_lines == 6 and [len(v) for v in srv.lines.values()] == [4, 2]
        assert "batch run done" in (run / "harvest.log").read_text()


def test_max_duration_holds_even_when_every_request_hangs(
    server: OpenAIServer, tmp_path: Path
) -> None:
    # A cron window must close on time even if the teacher never answers (timeout 600 s here):
    # after max_duration, requests in flight get grace_period, then the run stops with exit 3.
    server.faults.hang = 1.0
    server.hang_seconds = 60
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(4))
    cfg = tmp_path / "c.yaml"
    # rpm given: no slow start, so all 4 go out at once
    cfg.write_text("harvest:\n  grace_period: 0.5\n  timeout: 600\n  rpm: 6000\n")
    started = time.monotonic()
    proc = run_cli(
        "harvest",
        "--config",
        str(cfg),
        *harvest_args(server, p, tmp_path / "run", "--max-duration", "1", "--json")[1:],
        timeout=60,
    )
    took = time.monotonic() - started
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    assert "max_duration" in json.loads(proc.stdout)["stopped"] and took < 15, took
    log = (tmp_path / "run" / "harvest.log").read_text()
    assert "abandoning 4 requests in flight" in log  # requests, not worker pools (1 here)


def test_a_fatal_error_and_the_exit_code_are_in_the_log(
    server: OpenAIServer, tmp_path: Path
) -> None:
    """From cron, a 401 stop must not look like a hang: the log says what stopped the run."""
    server.api_key = "right-key-123456"
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(5))
    run = tmp_path / "run"
    proc = run_cli(*harvest_args(server, p, run), env={"OPENAI_API_KEY": "wrong-key-654321"})
    assert_one_line_error(proc, "HTTP 401")
    log = (run / "harvest.log").read_text()
    assert "harvest failed: HTTP 401" in log and "OPENAI_API_KEY" in log and "(exit 1)" in log
    assert "wrong-key-654321" not in log
    ok = run_cli(*harvest_args(server, p, run), env={"OPENAI_API_KEY": "right-key-123456"})
    assert ok.returncode == EXIT_OK and "harvest done" in (run / "harvest.log").read_text()
    assert "(exit 0)" in (run / "harvest.log").read_text()


def test_a_base_url_with_surrounding_whitespace_works(server: OpenAIServer, tmp_path: Path) -> None:
    """A URL pasted with a trailing space or newline is not a 404."""
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(3))
    proc = run_cli(*harvest_args(f" {server.url} \n", p, tmp_path / "run"))
    assert proc.returncode == EXIT_OK, proc.stderr
    assert server.completed == 3


def wait_for_store(run_dir: Path, timeout: float = 5.0) -> None:
    """Poll until a run directory has a non-empty store (a harvest started in a subprocess got
    going). SQLite creates the file empty and writes the first page later: a readonly Store
    refuses an empty file as "no store here", so wait for bytes, not just for the name."""
    end = time.monotonic() + timeout
    path = run_dir / STORE_FILE
    while not (path.exists() and path.stat().st_size > 0):
        assert time.monotonic() < end, f"{run_dir}: no store appeared within {timeout}s"
        time.sleep(0.05)
