"""Pace and retry: the one place that decides when a request may go and whether to try again.

The `Limiter` holds three things every request passes through:
- a requests/min bucket and a tokens/min bucket (given in config, or learned from the server's
  `x-ratelimit-limit-*` headers). Tokens are reserved before a request (prompt estimate plus
  `max_tokens`) and the reservation is corrected from `usage` afterwards;
- a global pause: a 429's `Retry-After`/`retry-after-ms`, or `x-ratelimit-remaining-* == 0` with
  its `x-ratelimit-reset-*`, holds back every request, not only the one that was refused; a 429
  also lowers the pace for a while (multiplicative decrease, additive recovery);
- an adaptive concurrency limit (in-flight requests) for servers that send no headers (vLLM, TGI,
  Ollama, proxies): AIMD with a latency gradient, as TCP Vegas and Netflix's concurrency-limits
  (Gradient2) do. It doubles per round trip until the first overload signal, then grows by one
  per round trip while answers succeed and latency holds (short-term latency average within 2x
  the long-term one), one per 16 round trips when the next step is the level last refused, and
  cuts to 0.9x on a refusal; a timeout halves it.

Releasing a slot waits (at most WIRE_WAIT) until the requests given slots are on the wire before
the finished answer is committed: answers that arrive together (a server whose requests started
together) otherwise keep the freed slots empty while they are committed one by one. Against a
server refusing past 8 in flight (bench/concurrency.py) this took the turnaround from a wave's
first answer to the next request on the wire from ~6 ms to ~3 ms (a traced run). `Teacher`
reports "on the wire" through httpcore's trace hook, and frees a 200's slot as its headers come.

Two kinds of refusal need opposite answers. "Too many in flight" (a 503, or a 429 without
Retry-After or rate-limit headers that comes while other requests are in flight: TGI's
`max_concurrent_requests`, Ollama, proxies) is answered by fewer requests in flight, never by a
request pace: the server takes the next request as soon as one finishes. A per-minute budget
(rate-limit headers, a 429 with Retry-After, or a 429 that comes with nothing else in flight,
which no concurrency limit explains) is answered by pacing: a request bucket at the known or
inferred rate, and a pause for everyone until the Retry-After.

Each request remembers (in a context variable set by `acquire`, and by `on_wire` when it is sent)
how many requests were on the wire when it went and when it went, so a refusal cuts the limit
once, and only if the request was sent under the current limit: stragglers sent before a cut do
not cut again.

`retrying(...)` is the retry policy (tenacity): only `TransientError` is retried, with
exponential backoff and jitter, never shorter than the server's Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections import deque
from collections.abc import Mapping
from contextvars import ContextVar
from email.utils import parsedate_to_datetime

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_exponential_jitter

from pipeline.errors import TransientError, Unreachable


class Bucket:
    """A token bucket that may go into debt, so one request larger than the bucket still goes."""

    def __init__(self, per_second: float, capacity: float):
        self.rate = per_second
        self.capacity = max(1.0, capacity)
        self.level = self.capacity
        self.stamp = time.monotonic()

    @classmethod
    def per_minute(cls, budget: float) -> Bucket:
        """A bucket for a per-minute budget, with half a second of burst: enough to catch up after
        a stall, small enough not to trip a server whose own bucket is one second deep."""
        return cls(budget / 60.0, budget / 120.0)

    def wait_time(self, amount: float, now: float, factor: float = 1.0) -> float:
        """Seconds until `amount` (capped at capacity) is available at `factor` of the rate."""
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)  # refill
        self.stamp = now
        need = min(amount, self.capacity) - self.level
        return 0.0 if need <= 0 else need / (self.rate * factor)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: str | None) -> float | None:
    """OpenAI reset headers: '1s', '6m0s', '20ms', '1h2m3.5s', or a plain number of seconds."""
    if not value:
        return None
    with contextlib.suppress(ValueError):  # float() strips the spaces a header may carry
        return max(0.0, float(value))
    parts = _DURATION.findall(value)
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts) if parts else None


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000)
    ra = headers.get("retry-after")
    if not ra:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(ra))
    try:
        return max(0.0, parsedate_to_datetime(ra).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


# (send sequence number, requests on the wire when it went, itself included) of the request this
# asyncio task is sending: set by Limiter.acquire and on_wire, read when its answer comes back.
_SENT: ContextVar[tuple[int, int] | None] = ContextVar("distill_sent", default=None)

GROWTH_TOLERANCE = 2.0  # grow only while recent latency is within this factor of the long-run one
CUT = 0.9  # limit *= CUT on a refusal (Netflix AIMD's backoff ratio)
NEAR_CEILING = 16  # round trips per step up when the next step is the level last refused
WIRE_WAIT = 0.02  # seconds a released slot's task waits for the requests given slots to go out


class Limiter:
    """Shared by every request to one teacher. Not thread-safe: one asyncio loop."""

    def __init__(
        self,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        concurrency: int = 16,
        adaptive: bool = True,
    ):
        self.max_concurrency = max(1, concurrency)
        self.adaptive = adaptive
        self.in_flight = 0
        self.requests = Bucket.per_minute(rpm) if rpm else None
        self.tokens = Bucket.per_minute(tpm) if tpm else None
        self.rpm_given = rpm is not None
        self.rate_known = rpm is not None  # a request budget given in config or sent in headers
        self.tpm_given = tpm is not None
        # Unknown budget: start with one request in flight and add one per success (doubling
        # each round trip) until the limit, a throttle, or headers tell us the budget. Without
        # this, the first wave of `concurrency` requests overruns a small server bucket.
        self.slow_start = not self.rpm_given
        self.limit = 1.0 if self.slow_start else float(self.max_concurrency)
        self.rate_inferred = False  # a 429 came without limit headers: pace at what got through
        self.paused_until = 0.0
        self.factor = 1.0  # share of the known rate we pace at; lowered by 429s
        self.latency_ema: float | None = None  # short-term: the last ~10 answers
        self.latency_long: float | None = None  # long-term: the last ~100 answers
        self.successes_since_change = 0
        self.last_decrease = 0.0
        self.recent: deque[float] = deque(maxlen=1024)  # times of recent successes
        self.throttled = 0  # 429s seen
        self.last_cut = 0.0
        self.refused = 0  # 503s and in-flight 429s seen
        self.sent = 0  # requests let through (a sequence number)
        self.cut_seq = 0  # `sent` at the last cut: refusals of earlier requests do not cut again
        self.ceiling = math.inf  # in-flight count at the last refusal: probe slowly near it
        self.peak = 0.0  # highest limit reached (for reports)
        self.holders: set[int] = set()  # sequence numbers of the requests holding a slot
        self.unsent: set[int] = set()  # ... of those not yet sent
        self._all_sent = asyncio.Event()
        self._cond = asyncio.Condition()

    # -- the gate ----------------------------------------------------------------------------------

    async def acquire(self, est_tokens: float) -> None:
        """Wait until a request of `est_tokens` may be sent; then it counts as in flight."""
        async with self._cond:
            while True:
                if self.in_flight >= int(self.limit):
                    await self._cond.wait()
                    continue
                now = time.monotonic()
                wait = self.paused_until - now
                if wait <= 0 and self.requests is not None:
                    wait = self.requests.wait_time(1, now, self.factor)
                if wait <= 0 and self.tokens is not None:
                    wait = self.tokens.wait_time(est_tokens, now, self.factor)
                if wait <= 0:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._cond.wait(), timeout=wait)
            if self.requests is not None:
                self.requests.level -= 1
            if self.tokens is not None:
                self.tokens.level -= est_tokens
            self.in_flight += 1
            self.sent += 1
            _SENT.set((self.sent, self.in_flight))
            self.holders.add(self.sent)
            self.unsent.add(self.sent)
            self._all_sent.clear()
            # Pass the baton: the next waiter checks whether it may go too. Waking one at a time
            # (not notify_all) keeps a release O(1) with many workers waiting; at the limit, no
            # one may go until a release, which wakes one itself.
            if self.in_flight < int(self.limit):
                self._cond.notify(1)

    def on_wire(self) -> None:
        """The request this task holds a slot for has been sent (its answer is awaited)."""
        sent = _SENT.get()
        if sent is not None and sent[0] in self.unsent:
            self.unsent.discard(sent[0])
            if not self.unsent:
                self._all_sent.set()
            # What the server may hold as this one arrives: the requests sent and not answered.
            # (Counted at `acquire`, requests given slots later but sent first were missed: a
            # refusal in slow start then cut the limit to 0.9 x 5 with 12 on the wire.)
            _SENT.set((sent[0], max(1, self.in_flight - len(self.unsent))))

    def holding(self) -> bool:
        """Whether this task's request holds a slot (acquired, not yet released)."""
        sent = _SENT.get()
        return sent is not None and sent[0] in self.holders

    async def free(self) -> None:
        """Give back the slot this task's request holds; again (its answer came) is a no-op."""
        sent = _SENT.get()
        if sent is not None:  # (None: acquired in another task; tests drive the gate that way)
            if sent[0] not in self.holders:
                return
            self.holders.discard(sent[0])
        self.on_wire()  # a request that failed before it was sent
        async with self._cond:
            self.in_flight -= 1
            self._cond.notify(1)

    async def release(self) -> None:
        """`free`, then wait (what the module docstring says) before the answer is committed.
        `Teacher` frees a 200's slot as its headers come, without waiting: the task still holds
        its connection then, which the request woken for the slot may need."""
        await self.free()
        await asyncio.sleep(0)  # the request woken for the freed slot takes it
        if self.unsent:  # and goes out before this task goes on to commit its answer
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._all_sent.wait(), WIRE_WAIT)

    # -- feedback ----------------------------------------------------------------------------------

    def correct_tokens(self, reserved: float, used: float) -> None:
        """Give back (or charge) the difference between the reservation and the real usage."""
        if self.tokens is not None:
            self.tokens.level = min(self.tokens.capacity, self.tokens.level + reserved - used)

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Learn limits and steer the pace from x-ratelimit-* headers (any response)."""
        for kind, given in (("requests", self.rpm_given), ("tokens", self.tpm_given)):
            try:  # a limit given in config is never overridden
                per_min = 0.0 if given else float(headers.get(f"x-ratelimit-limit-{kind}") or 0)
            except ValueError:
                per_min = 0.0
            bucket = self.requests if kind == "requests" else self.tokens
            # An inferred request pace gives way to a request limit in headers; tokens keep theirs.
            inferred = self.rate_inferred and kind == "requests"
            if per_min > 0 and (
                bucket is None or abs(bucket.rate * 60 - per_min) > 1e-6 or inferred
            ):
                if kind == "requests":
                    self.requests = Bucket.per_minute(per_min)
                    self.rate_known = True
                    self.rate_inferred = False
                    # the bucket paces from here: no need to creep up on concurrency
                    self.slow_start = False
                    self.limit = max(self.limit, float(self.max_concurrency))
                else:
                    self.tokens = Bucket.per_minute(per_min)
            try:
                left = float(headers.get(f"x-ratelimit-remaining-{kind}", 1))  # absent: not out
            except ValueError:
                continue
            if left <= 0:
                reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}")) or 1.0
                self.paused_until = max(self.paused_until, time.monotonic() + min(reset, 600.0))

    def on_success(self, latency: float) -> None:
        now = time.monotonic()
        self.recent.append(now)
        ema, long = self.latency_ema, self.latency_long
        self.latency_ema = latency if ema is None else 0.9 * ema + 0.1 * latency
        self.latency_long = latency if long is None else 0.99 * long + 0.01 * latency
        if self.rate_inferred and self.requests is not None:
            self.requests.rate *= 1.001  # probe upwards slowly; the next 429 cuts back
        self.factor = min(1.0, self.factor + 0.01)
        if self.slow_start:
            self.limit = min(float(self.max_concurrency), self.limit + 1)
            self.slow_start = self.limit < self.max_concurrency
        elif self.adaptive and self.limit < self.max_concurrency:
            self.successes_since_change += 1
            # Gradient: a queue building at the server shows as recent latency above the long-run
            # average; then hold. Latency alone never cuts: a queueing server's throughput does
            # not fall with load, and timeouts cut on their own.
            latency_holds = self.latency_ema <= GROWTH_TOLERANCE * self.latency_long + 0.01
            # One step per round trip; near the level that was refused, one per NEAR_CEILING: each
            # probe there costs a refusal and throughput (against a server refusing past 8 in
            # flight, one per 4 round trips: 57 refusals in 2,000 requests; one per 16: 22).
            near = abs(self.limit + 1 - self.ceiling) <= max(1.0, 0.1 * self.ceiling) < math.inf
            every = NEAR_CEILING if near else 1
            if latency_holds and self.successes_since_change >= self.limit * every:
                self.limit = min(float(self.max_concurrency), self.limit + 1)
                self.successes_since_change = 0
        self.peak = max(self.peak, self.limit)

    def on_throttle(self, retry_after: float | None, status: int | None = 429) -> None:
        """A 429 or 503: too many in flight (shrink concurrency), or over budget (pause, slow the
        pace, shrink concurrency); see the module docstring for which is which."""
        now = time.monotonic()
        self.peak = max(self.peak, self.limit)
        self.slow_start = False
        seq, in_flight = _SENT.get() or (self.sent + 1, self.in_flight)
        budget = status == 429 and (
            retry_after is not None or self.rate_known or in_flight <= 1 or self.rate_inferred
        )
        if not budget:
            self.refused += 1
            self.throttled += status == 429
            if self.adaptive and seq > self.cut_seq:
                self.limit = max(1.0, CUT * min(self.limit, in_flight))
                self.ceiling = in_flight
                self.cut_seq = self.sent
                self.successes_since_change = 0
            if retry_after is not None or in_flight <= 1:
                # Refused with nothing else in flight, or told when to come back: wait a little.
                pause = retry_after if retry_after is not None else 0.5
                self.paused_until = max(self.paused_until, now + min(pause, 600.0))
            return
        self.throttled += 1  # (a budget refusal is always a 429)
        if self.requests is None:
            # No budget known: pace at the rate that was getting through, then probe up.
            self.requests = Bucket(max(0.5, 0.9 * self.recent_rate(now)), 1.0)
            self.rate_inferred = True
            self.last_cut = now
        elif self.rate_inferred:
            # The estimate itself was too high; cut it once per burst of 429s.
            if now - self.last_cut > 0.5:
                self.requests.rate = max(0.5, self.requests.rate * 0.85)
                self.last_cut = now
        else:
            self.factor = max(0.2, self.factor * 0.85)
        pause = retry_after if retry_after is not None else 1.0
        self.paused_until = max(self.paused_until, now + min(pause, 600.0))
        self._decrease(now)

    def on_timeout(self) -> None:
        self.slow_start = False
        self._decrease(time.monotonic())

    def recent_rate(self, now: float) -> float:
        """Successes per second over the last two seconds."""
        while self.recent and now - self.recent[0] > 2.0:
            self.recent.popleft()
        if not self.recent:
            return 0.0
        return len(self.recent) / max(1.0, min(2.0, now - self.recent[0]))

    def _decrease(self, now: float) -> None:
        # At most one decrease per typical latency, so a burst of failures from one overload
        # counts once.
        window = max(0.5, self.latency_ema or 0.5)
        if self.adaptive and now - self.last_decrease > window:
            self.limit = max(1.0, math.floor(self.limit * 0.5))
            self.successes_since_change = 0
            self.last_decrease = now


UNREACHABLE_TRIES = 3  # a server never reached: 3 tries, 1.5 s then 3 s apart, then stop the run
UNREACHABLE_WAIT = 1.5


def _wait(base: wait_exponential_jitter):
    """Exponential backoff with jitter, but never less than the server's Retry-After."""

    def wait(state: RetryCallState) -> float:
        backoff = base(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, Unreachable):  # seconds, not minutes: a wrong URL stays wrong
            return UNREACHABLE_WAIT * state.attempt_number
        if isinstance(exc, TransientError) and exc.retry_after is not None:
            # The limiter already pauses everyone until Retry-After; add a little jitter.
            return max(exc.retry_after, 0.05) + 0.05 * backoff
        if isinstance(exc, TransientError) and exc.status in (429, 503):
            # Refused for load: the limiter's in-flight limit already holds the retry back until
            # a slot frees (or pauses everyone if the server refuses even one request); a long
            # wait here only leaves the prompt at the end of the run.
            return 0.1 * backoff
        return backoff

    return wait


def _stop(max_retries: int):
    """Stop after `max_retries` failures, not counting 429s (the server said "later", not "no")
    unless they pile up: a 429 costs nothing, but a run must not spin on it forever. A server
    never reached (`Unreachable`) gets UNREACHABLE_TRIES tries whatever `max_retries` says."""
    counts = {"failures": 0, "throttles": 0}

    def stop(state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, Unreachable):
            return state.attempt_number >= UNREACHABLE_TRIES
        if isinstance(exc, TransientError) and exc.status == 429:
            counts["throttles"] += 1
        else:
            counts["failures"] += 1
        return counts["failures"] > max_retries or counts["throttles"] > max(50, 5 * max_retries)

    return stop


def retrying(max_retries: int, *, initial: float = 0.5, max_wait: float = 60.0) -> AsyncRetrying:
    """The retry policy: TransientError only, up to `max_retries` (429s apart), then re-raise."""
    return AsyncRetrying(
        retry=retry_if_exception_type(TransientError),
        stop=_stop(max_retries),
        wait=_wait(wait_exponential_jitter(initial=initial, max=max_wait, jitter=initial)),
        reraise=True,
    )
