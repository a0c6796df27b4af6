"""The limiter's concurrency control: real HTTP against servers that refuse past N in flight, a
budget server without headers, and the controller's state machine driven directly."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from pipeline import ratelimit
from pipeline.errors import TransientError
from pipeline.harvest import HarvestConfig, harvest
from pipeline.ratelimit import Limiter, retrying
from pipeline.teacher import Teacher, TeacherConfig
from tests.conftest import arithmetic_rows, write_jsonl
from tests.openai_server import OpenAIServer


def drive(srv: OpenAIServer, n: int, concurrency: int) -> Limiter:
    """Send `n` requests through one Teacher and the retry policy, as harvest does; return its
    limiter to look at."""

    async def run() -> Limiter:
        t = Teacher(TeacherConfig(base_url=srv.url, model="m", concurrency=concurrency))

        async def one(i: int) -> None:
            body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
            async for attempt in retrying(8):
                with attempt:
                    await t.limiter.acquire(10)
                    try:
                        await t.complete(body)
                    finally:
                        await t.limiter.release()

        await asyncio.gather(*(one(i) for i in range(n)))
        await t.aclose()
        return t.limiter

    return asyncio.run(run())


@pytest.mark.parametrize("status", [503, 429])
def test_a_server_refusing_past_n_in_flight_is_held_near_n_not_paced(
    server: OpenAIServer, status: int
) -> None:
    """TGI-like: refuse at once past 4 in flight, without headers. The limit climbs past 4, is cut
    back near it, and no request pace is ever inferred (that pace is what collapsed runs)."""
    server.max_in_flight, server.overload_status, server.latency = 4, status, 0.02
    lim = drive(server, 150, 32)
    assert server.completed == 150
    assert lim.requests is None and not lim.rate_inferred  # concurrency control, not a pace
    assert server.peak_active == 4  # the server was kept full ...
    assert lim.peak > 4 and lim.refused > 0  # ... the limit probed past it ...
    assert lim.limit < 6  # ... and came back down
    refused = server.status_counts.get(status, 0)
    assert refused <= 0.3 * server.requests, server.status_counts


def test_harvest_stores_every_prompt_from_a_refusing_server(
    server: OpenAIServer, tmp_path: Path
) -> None:
    server.max_in_flight, server.latency = 4, 0.02
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(120))
    s = harvest(
        HarvestConfig(
            prompts=[p], out=tmp_path / "run", base_url=server.url, model="m", concurrency=32
        ),
        pretty=False,
    )
    assert s.completed == 120 and s.failed == 0
    assert server.status_counts.get(503, 0) <= 0.3 * server.requests, server.status_counts


def test_a_budget_without_rate_limit_headers_is_still_paced(server: OpenAIServer) -> None:
    """429s with Retry-After but no x-ratelimit-* headers (a per-second budget): pace.

    The requests already in flight when the budget runs out are refused whatever the client does
    (up to one window of 32); beyond them, pacing keeps refusals under 10% of the prompts. Without
    pacing this run draws ~345 refusals (measured by disabling `on_throttle`)."""
    server.rps, server.burst, server.ratelimit_headers = 40, 40, False
    lim = drive(server, 120, 32)
    assert server.completed == 120
    assert lim.requests is not None and lim.rate_inferred
    assert server.status_counts.get(429, 0) <= 32 + 0.1 * 120, server.status_counts


# -- the state machine, driven directly ------------------------------------------------------------


def sent(lim: Limiter, k: int) -> list[asyncio.Task[None]]:
    """`k` requests acquired, each in its own task (each remembers its own send)."""
    return [asyncio.ensure_future(lim.acquire(1)) for _ in range(k)]


def test_a_refusal_cuts_once_and_stragglers_do_not_cut_again() -> None:
    async def run() -> None:
        lim = Limiter(concurrency=64)
        lim.slow_start, lim.limit = False, 10.0

        async def request(outcome: str | None) -> None:
            await lim.acquire(1)
            await asyncio.sleep(0)  # all ten in flight before any answer
            if outcome == "503":
                lim.on_throttle(None, 503)
            await asyncio.sleep(0.01)
            await lim.release()

        await asyncio.gather(*(request("503" if i >= 7 else None) for i in range(10)))
        # Three refusals of requests sent before any cut: one cut, to 0.9 x the in-flight count
        # the first refused one went out with (8), not three.
        assert lim.refused == 3
        assert lim.limit == pytest.approx(7.2)
        assert lim.requests is None and lim.paused_until == 0.0

    asyncio.run(run())


def test_the_limit_grows_one_per_round_trip_while_latency_holds_and_holds_when_it_rises() -> None:
    lim = Limiter(concurrency=64)
    lim.slow_start, lim.limit = False, 10.0
    for _ in range(10):
        lim.on_success(0.1)
    assert lim.limit == 11.0
    for _ in range(11):
        lim.on_success(0.1)
    assert lim.limit == 12.0
    for _ in range(40):  # latency jumps 10x: a queue is building, stop growing
        lim.on_success(1.0)
    assert lim.limit == 12.0


def refused_alone(status: int) -> Limiter:
    """A fresh limiter after one request, alone in flight, was refused with `status` (no headers)."""

    async def run() -> Limiter:
        lim = Limiter(concurrency=64)
        await lim.acquire(1)
        lim.on_throttle(None, status)
        await lim.release()
        return lim

    return asyncio.run(run())


def test_a_header_less_429_with_nothing_else_in_flight_is_a_budget() -> None:
    lim = refused_alone(429)
    assert lim.requests is not None and lim.rate_inferred  # paced: no concurrency explains it
    assert lim.paused_until > 0


def test_token_headers_after_an_inferred_pace_keep_the_tokens_spent() -> None:
    """A header-less 429 infers a request pace; later answers carry only token headers. The
    token bucket is built once, not rebuilt full on every answer (which undid all token pacing)."""
    lim = refused_alone(429)
    assert lim.rate_inferred
    lim.observe_headers({"x-ratelimit-limit-tokens": "60000"})
    assert lim.tokens is not None
    lim.tokens.level -= 400  # a reservation
    spent = lim.tokens.level
    lim.observe_headers({"x-ratelimit-limit-tokens": "60000"})
    assert lim.tokens.level == spent and lim.rate_inferred  # the request pace is still inferred


def test_a_503_refused_alone_pauses_but_never_paces() -> None:
    async def run() -> Limiter:
        lim = Limiter(concurrency=64)
        for _ in range(3):
            await lim.acquire(1)
            lim.on_throttle(None, 503)
            lim.paused_until = 0.0
            await lim.release()
        return lim

    lim = asyncio.run(run())
    assert lim.requests is None and lim.limit == 1.0


def test_a_refusal_counts_what_was_on_the_wire_when_the_request_went() -> None:
    """Given the 5th slot, but sent after 11 later requests: the server held 11 when it came, so a
    refusal cuts to 0.9 x 12, not to 0.9 x 5 (what a slow start's overshoot did, for seconds)."""

    async def run() -> Limiter:
        lim = Limiter(concurrency=64)
        lim.slow_start, lim.limit = False, 16.0
        go = asyncio.Event()

        async def other() -> None:
            await lim.acquire(1)
            lim.on_wire()
            await go.wait()

        async def late() -> None:
            await lim.acquire(1)
            await go.wait()
            lim.on_wire()
            lim.on_throttle(None, 503)

        tasks = [asyncio.ensure_future(other()) for _ in range(4)]
        tasks.append(asyncio.ensure_future(late()))
        tasks += [asyncio.ensure_future(other()) for _ in range(7)]
        await asyncio.sleep(0.01)
        assert lim.in_flight == 12 and len(lim.unsent) == 1
        go.set()
        await asyncio.gather(*tasks)
        return lim

    lim = asyncio.run(run())
    assert lim.refused == 1
    assert lim.limit == pytest.approx(0.9 * 12)


def test_an_answer_is_committed_after_the_request_given_its_slot_is_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Answers that come together must not keep the slots they free empty while each is
    committed: `release` returns once the request woken for the slot is on the wire."""
    monkeypatch.setattr(ratelimit, "WIRE_WAIT", 5.0)  # no wall-clock race on a loaded box

    async def run() -> list[str]:
        lim = Limiter(concurrency=1)
        order: list[str] = []

        async def first() -> None:
            await lim.acquire(1)
            lim.on_wire()
            await lim.release()
            order.append("committed")

        async def second() -> None:
            await lim.acquire(1)
            for _ in range(5):  # building and writing the request takes the loop a few turns
                await asyncio.sleep(0)
            order.append("sent")
            lim.on_wire()
            await lim.release()

        await asyncio.gather(first(), second())
        # a request that never goes out holds a commit back only so long
        monkeypatch.setattr(ratelimit, "WIRE_WAIT", 0.01)
        await lim.acquire(1)
        await asyncio.wait_for(asyncio.gather(lim.release(), lim.acquire(1)), 5)
        return order

    assert asyncio.run(run()) == ["sent", "committed"]


@pytest.mark.parametrize("case", ["answer", "refusal", "stream"])
def test_a_whole_answer_frees_its_slot_when_its_headers_come(
    server: OpenAIServer, case: str
) -> None:
    """The server's slot is free once it answers: the limiter's slot is given back as the headers
    of a 200 arrive (so reading the body keeps no request waiting), and once only. A refusal
    keeps its slot until the limit is cut; a stream holds it while it streams."""
    if case == "refusal":
        server.max_in_flight = 0  # refuse everything
    body = {"model": "m", "messages": [{"role": "user", "content": "q"}]}

    async def run() -> tuple[int, int]:
        t = Teacher(TeacherConfig(base_url=server.url, model="m", stream=case == "stream"))
        await t.limiter.acquire(10)
        with contextlib.suppress(TransientError):  # the refusal
            await t.complete(body)
        held = t.limiter.in_flight
        await t.limiter.release()
        await t.aclose()
        return held, t.limiter.in_flight

    held, after = asyncio.run(run())
    assert held == (0 if case == "answer" else 1)
    assert after == 0


def test_overload_refusals_retry_sooner_than_other_failures() -> None:
    def first_wait(exc: Exception) -> float:
        r = retrying(3, initial=1.0)
        state = type("S", (), {})()
        state.attempt_number = 1
        state.outcome = type("O", (), {"exception": lambda self: exc})()
        return r.wait(state)  # type: ignore[arg-type]

    assert first_wait(TransientError("503", status=503)) < first_wait(
        TransientError("500", status=500)
    )
