"""Harvest under fire: rate limits, faults, signals, kill -9, locks, a full or read-only disk.

Everything goes over real HTTP on loopback to the test server, into a real SQLite file; the
crash tests kill a real `distill harvest` process.
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import EXIT_FAILED, EXIT_INTERRUPTED, StoreError, TransientError, Unreachable
from pipeline.export import export_rows
from pipeline.harvest import HarvestConfig, harvest
from pipeline.ratelimit import Limiter, parse_duration, parse_retry_after
from pipeline.store import Store
from pipeline.teacher import Teacher, TeacherConfig, chat_body
from tests.conftest import (
    arithmetic_rows,
    assert_one_line_error,
    harvest_args,
    run_cli,
    write_jsonl,
)
from tests.openai_server import Faults, OpenAIServer
from tests.tinymodels import make_chat_dataset, tiny_model  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def cfg(srv: OpenAIServer, prompts: Path, out: Path, **kw: object) -> HarvestConfig:
    return HarvestConfig(prompts=[prompts], out=out, base_url=srv.url, model="m", **kw)  # type: ignore[arg-type]


def start_harvest(prompts: Path, run: Path, url: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *harvest_args(url, prompts, run, *extra)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def store_state(run: Path) -> tuple[int, int]:
    """(rows, distinct prompt ids) of a store, checking the file is sound."""
    db = sqlite3.connect(run / "store.sqlite")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        n, distinct = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT prompt_id) FROM responses"
        ).fetchone()
        return int(n), int(distinct)
    finally:
        db.close()


def wait_rows(run: Path, at_least: int, timeout: float = 30) -> None:
    """Poll until the store has `at_least` rows (the subprocess may start slowly on a busy box)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (run / "store.sqlite").exists():
            try:
                if store_state(run)[0] >= at_least:
                    return
            except sqlite3.Error:
                pass
        time.sleep(0.05)
    raise AssertionError(f"{run}: fewer than {at_least} rows after {timeout}s")


# -- rate limits --------------------------------------------------------------------------------


def test_header_parsing() -> None:
    assert parse_duration("6m0s") == 360 and parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1h2m3.5s") == pytest.approx(3723.5) and parse_duration("0.5") == 0.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == pytest.approx(0.25)
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({}) is None


def test_limiter_learns_limits_from_headers() -> None:
    lim = Limiter(concurrency=64)
    assert lim.requests is None and lim.limit == 1  # slow start while the budget is unknown
    lim.observe_headers({"x-ratelimit-limit-requests": "1200", "x-ratelimit-limit-tokens": "60000"})
    assert lim.requests is not None and lim.requests.rate == pytest.approx(20)
    assert lim.tokens is not None and lim.tokens.rate == pytest.approx(1000)
    assert lim.limit == 64
    given = Limiter(rpm=600, concurrency=8)
    given.observe_headers({"x-ratelimit-limit-requests": "1200"})
    assert given.requests is not None and given.requests.rate == pytest.approx(10)  # config wins


def test_token_reservation_is_corrected_from_usage() -> None:
    lim = Limiter(tpm=6000)
    assert lim.tokens is not None
    start = lim.tokens.level
    lim.tokens.level -= 40  # reserved 40 (prompt estimate + max_tokens) ...
    lim.correct_tokens(reserved=40, used=15)  # ... but usage said 15
    assert lim.tokens.level == pytest.approx(start - 15)


def test_limiter_holds_the_server_budget(server: OpenAIServer, tmp_path: Path) -> None:
    """A server allowing 20 req/s with a one-second bucket: at concurrency 32 we learn its limit
    from the headers and stay under it."""
    server.rps, server.burst = 20, 20
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(50))
    s = harvest(cfg(server, p, tmp_path / "run", concurrency=32), pretty=False)
    assert s.completed == 50 and s.failed == 0
    assert server.status_counts.get(429, 0) <= 1, server.status_counts


def test_a_429_pauses_every_request_for_retry_after(server: OpenAIServer, tmp_path: Path) -> None:
    """The first of four concurrent requests gets a 429 (retry-after-ms 400) while the other
    three are in flight: when they finish, their workers must not send anything new until the
    Retry-After has passed."""
    server.throttle_first, server.throttle_ms, server.latency = 1, 400, 0.1
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(12))
    s = harvest(cfg(server, p, tmp_path / "run", concurrency=4, rpm=60000), pretty=False)
    assert s.completed == 12 and s.throttled == 1
    (t429,) = server.throttled_at
    first_wave = [t for t in server.arrivals if t <= t429 + 0.05]
    assert len(first_wave) == 4  # the 429'd request and the three in flight with it
    later = [t for t in server.arrivals if t > t429 + 0.05]
    assert later and min(later) - t429 >= 0.4 - 0.02


# -- faults -------------------------------------------------------------------------------------


def test_every_prompt_survives_the_fault_mix(server: OpenAIServer, tmp_path: Path) -> None:
    """10% 5xx, 5% dropped connections, 2% hangs past the timeout, 3% garbage bodies."""
    server.faults = Faults(server_error=0.10, drop=0.05, hang=0.02, garbage=0.03)
    server.seed = 7
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(120))
    s = harvest(cfg(server, p, tmp_path / "run", concurrency=16, timeout=0.5), pretty=False)
    assert s.completed == 120 and s.failed == 0 and s.exit_code == 0
    assert s.retries >= 10  # the faults really happened
    assert s.request_errors >= s.retries  # counted as they happened, though all were retried
    faults_seen = {k for k in server.status_counts if k != 200}
    assert {0, -1} <= faults_seen and faults_seen & {500, 502, 503}
    assert store_state(tmp_path / "run") == (120, 120)


def test_empty_choices_are_retried_and_give_up_is_recorded(
    server: OpenAIServer, tmp_path: Path
) -> None:
    server.faults = Faults(empty_choices=1.0)
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(2))
    s = harvest(cfg(server, p, tmp_path / "run", max_retries=2), pretty=False)
    assert s.failed == 2 and s.exit_code == 3 and server.requests == 6
    with Store(tmp_path / "run", readonly=True) as st:
        assert {f["attempts"] for f in st.failures()} == {3}
        assert all("empty or missing choices" in f["error"] for f in st.failures())


# -- a server never reached -------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("case", ["refused", "unknown host", "tls"])
def test_a_server_never_reached_stops_in_seconds_naming_url_and_cause(
    server: OpenAIServer, tmp_path: Path, case: str
) -> None:
    """A closed port, an unknown host, TLS to a plain-HTTP port: a short retry, then one line
    naming the URL and the cause, exit 1 (a configuration mistake, not 'rerun later'), and the
    same in harvest.log. Before, these were retried as transient for minutes and exited 3."""
    url, cause = {
        "refused": (f"http://127.0.0.1:{closed_port()}/v1", "connection refused"),
        "unknown host": ("http://distill-no-such-host.invalid/v1", "unknown host"),
        "tls": (f"https://127.0.0.1:{server.port}/v1", "TLS: "),
    }[case]
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(20))
    run = tmp_path / "run"
    proc = run_cli(*harvest_args(url, p, run), timeout=60)
    assert proc.returncode == EXIT_FAILED
    assert_one_line_error(proc, url, cause)
    log = (run / "harvest.log").read_text()
    assert cause in log and f"(exit {EXIT_FAILED})" in log
    assert server.requests == 0 and store_state(run) == (0, 0)


def test_progress_counts_connection_errors_as_they_happen(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(4))
    url = f"http://127.0.0.1:{closed_port()}/v1"
    c = HarvestConfig(
        prompts=[p], out=tmp_path / "run", base_url=url, model="m", progress_every=0.2
    )
    with pytest.raises(Unreachable, match="connection refused"):
        harvest(c, pretty=False)
    counts = re.findall(
        r"progress: .* errors (\d+)", (tmp_path / "run" / "harvest.log").read_text()
    )
    assert counts and int(counts[-1]) >= 4  # every prompt's first try at least, not 'errors 0'


def test_a_server_lost_after_answering_is_transient(server: OpenAIServer) -> None:
    """Once the server has answered, a refused connection is a passing fault (it restarts)."""

    async def go() -> None:
        teacher = Teacher(TeacherConfig(base_url=server.url, model="m"))
        body = chat_body(teacher.cfg, [{"role": "user", "content": "What is 1 + 2?"}], {})
        try:
            await teacher.complete(body)
            server.stop()
            with pytest.raises(TransientError) as err:
                await teacher.complete(body)
            assert not isinstance(err.value, Unreachable)
        finally:
            await teacher.aclose()

    asyncio.run(go())


def test_batch_against_a_closed_port_exits_1_naming_the_cause(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(3))
    url = f"http://127.0.0.1:{closed_port()}/v1"
    run = tmp_path / "run"
    where = ["--prompts", str(p), "--base-url", url, "--model", "m"]
    proc = run_cli("batch", "submit", str(run), *where, timeout=60)
    assert proc.returncode == EXIT_FAILED
    assert_one_line_error(proc, url, "connection refused")
    assert "connection refused" in (run / "harvest.log").read_text()


# -- signals, crashes, locks --------------------------------------------------------------------


def test_sigterm_stops_sending_waits_for_in_flight_and_says_how_to_resume(
    server: OpenAIServer, tmp_path: Path
) -> None:
    server.latency = 0.3
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(200))
    run = tmp_path / "run"
    proc = start_harvest(p, run, server.url, "--concurrency", "4")
    wait_rows(run, 8)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_INTERRUPTED, err  # not 3: nothing went wrong, it was stopped
    assert "interrupted" in err and "SIGTERM" in err and "rerun the same command" in err
    assert "Traceback" not in err and "(exit 130)" in (run / "harvest.log").read_text()
    rows, distinct = store_state(run)
    assert 0 < rows < 200 and rows == distinct
    # the requests in flight at the signal were waited for, not thrown away
    assert server.completed == rows
    again = start_harvest(p, run, server.url, "--concurrency", "16")
    again.communicate(timeout=60)
    assert again.returncode == 0 and store_state(run) == (200, 200)
    assert server.completed == 200


def test_second_signal_exits_at_once_without_corruption(
    server: OpenAIServer, tmp_path: Path
) -> None:
    server.latency = 0.2
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(100))
    run = tmp_path / "run"
    proc = start_harvest(p, run, server.url, "--concurrency", "2")
    wait_rows(run, 4)
    server.faults = Faults(hang=1.0)  # whatever is in flight now never answers
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130 and "again: exiting now" in err
    rows, distinct = store_state(run)
    assert rows == distinct and rows > 0


def start_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen[str], what: str) -> None:
    """Poll until `path` exists (a glob pattern: any match): the sign that the command is busy
    (a hang guard, not a timing)."""
    end = time.monotonic() + 300

    def found() -> bool:
        return any(path.parent.glob(path.name)) if "*" in path.name else path.exists()

    while not found():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{what} never started (exit {proc.returncode}): {err[-2000:]}")
        time.sleep(0.1)


def assert_interrupted(proc: subprocess.Popen[str], sig: signal.Signals) -> str:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert len(lines) == 1 and "rerun" in lines[0], err
    return err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_build_with_130_and_leaves_no_half_dataset(
    server: OpenAIServer, tmp_path: Path, sig: signal.Signals
) -> None:
    """The build is stopped inside its custom filter, which marks that it is running and waits:
    the signal always lands mid-build, whatever the machine's speed."""
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(20))
    run, ds, busy = tmp_path / "run", tmp_path / "ds", tmp_path / "busy"
    assert run_cli(*harvest_args(server, p, run)).returncode == 0
    hook = tmp_path / "hook.py"
    hook.write_text(
        "import pathlib, time\n\n"
        "def keep(row):\n"
        f"    pathlib.Path({str(busy)!r}).touch()\n"
        "    time.sleep(3600)\n"
        "    return True\n",
        encoding="utf-8",
    )
    proc = start_cli("build", str(run), "--to", str(ds), "--custom-filter", f"{hook}:keep")
    wait_for(busy, proc, "build")
    assert_interrupted(proc, sig)
    assert not ds.exists() and not (tmp_path / ".ds.build-staging").exists()  # no half dataset


def test_sigterm_stops_finetune_with_130(tmp_path: Path, tiny_model) -> None:  # noqa: F811
    """A tiny model set for a million steps: stopped once its first checkpoint is written."""
    data = make_chat_dataset(tmp_path / "data", n_train=8, n_eval=2)
    out = tmp_path / "ft"
    proc = start_cli(
        "finetune", "--data", str(data), "--student", str(tiny_model("qwen2", "known")),
        "--out", str(out), "--max-steps", "1000000", "--batch-size", "2", "--grad-accum", "1",
        "--max-length", "128", "--save-steps", "1", "--eval-steps", "1000000",
        "--report-to", "none",
    )  # fmt: skip
    # Any checkpoint: older ones are rotated away (save_total_limit), checkpoint-1 may be gone.
    wait_for(out / "checkpoints" / "checkpoint-*", proc, "finetune")
    assert_interrupted(proc, signal.SIGTERM)
    assert not (out / "adapter").exists()  # it did not pretend to finish


def test_kill_9_repeatedly_loses_nothing_and_duplicates_nothing(
    server: OpenAIServer, tmp_path: Path
) -> None:
    server.latency = 0.1
    n, concurrency, kills = 150, 8, 4
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(n))
    run = tmp_path / "run"
    rng = random.Random(3)
    seen = 0
    for _ in range(kills):
        proc = start_harvest(p, run, server.url, "--concurrency", str(concurrency))
        wait_rows(run, seen + 1)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.wait()
        if (run / "store.sqlite").exists():
            rows, distinct = store_state(run)  # always opens, never a duplicate
            assert rows == distinct and rows >= seen  # nothing committed is ever lost
            seen = rows
    final = start_harvest(p, run, server.url, "--concurrency", str(concurrency))
    final.communicate(timeout=120)
    assert final.returncode == 0
    assert store_state(run) == (n, n)
    with Store(run, readonly=True) as st:
        exported = list(export_rows(st))
    assert sorted(r["prompt_id"] for r in exported) == sorted(f"q{i}" for i in range(n))
    paid_twice = server.completed - n
    assert 0 <= paid_twice <= kills * concurrency


def test_second_harvest_on_the_same_run_refuses_and_a_dead_lock_does_not_stick(
    server: OpenAIServer, tmp_path: Path
) -> None:
    server.latency = 0.2
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(40))
    run = tmp_path / "run"
    first = start_harvest(p, run, server.url, "--concurrency", "2")
    wait_rows(run, 1)
    second = start_harvest(p, run, server.url)
    _, err = second.communicate(timeout=30)
    assert (
        second.returncode == 75
        and "another harvest is running" in err
        and f"pid {first.pid}" in err
    )
    first.kill()
    first.wait()
    server.latency = 0
    third = start_harvest(p, run, server.url)
    third.communicate(timeout=60)
    assert third.returncode == 0 and store_state(run) == (40, 40)


# -- the disk -----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "disk"
    mnt.mkdir()
    ok = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        == 0
    )
    if not ok:
        pytest.skip("needs root to mount a small tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_is_a_clear_error_and_stored_rows_stay_sound(
    server: OpenAIServer, tmp_path: Path, small_disk: Path
) -> None:
    server.responder = lambda body, i: {"content": "y" * 4000}
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(400))
    run = small_disk / "run"
    with pytest.raises(StoreError, match="disk full"):
        harvest(cfg(server, p, run, concurrency=4), pretty=False)
    rows, distinct = store_state(run)
    assert 0 < rows < 400 and rows == distinct


def test_read_only_run_directory_is_a_clear_error(
    server: OpenAIServer, tmp_path: Path, small_disk: Path
) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(5))
    run = small_disk / "run"
    harvest(cfg(server, p, run), pretty=False)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    write_jsonl(p, arithmetic_rows(10))
    with pytest.raises(StoreError, match="read-only"):
        harvest(cfg(server, p, run), pretty=False)
    with Store(run, readonly=True) as st:  # still readable where it is
        assert st.count() == 5
