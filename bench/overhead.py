"""Harvester overhead: `distill harvest` (committing every response to SQLite) against a plain
`openai.AsyncOpenAI` + semaphore client that stores nothing, same zero-latency server, same run.

    .venv/bin/python -m bench.overhead [--n 3000] [--concurrency 64]

Goal: ratio >= 0.8 and >= 500 completions/s.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import prompt_file, server_process


async def plain_openai(url: str, n: int, concurrency: int) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=5)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"What is {i} + {i + 1}?"}]
            )

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - t
    await client.close()
    return n / elapsed


def ours(url: str, prompts: Path, out: Path, concurrency: int) -> float:
    from pipeline.harvest import HarvestConfig, harvest

    cfg = HarvestConfig(
        prompts=[prompts],
        out=out,
        base_url=url,
        model="m",
        concurrency=concurrency,
        progress_every=3600,
    )
    s = harvest(cfg, pretty=False)
    assert s.failed == 0 and s.completed > 0, s.line()
    return s.completed / s.elapsed_s


def main(n: int = 3000, concurrency: int = 64, rounds: int = 3) -> dict:
    """Alternate baseline and distill `rounds` times against one server; report the medians."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    base: list[float] = []
    mine: list[float] = []
    try:
        prompts = prompt_file(tmp / "p.jsonl", n)
        with server_process() as url:
            asyncio.run(plain_openai(url, 200, concurrency))  # warm up the server
            for r in range(rounds):
                base.append(asyncio.run(plain_openai(url, n, concurrency)))
                mine.append(ours(url, prompts, tmp / f"run{r}", concurrency))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    b, m = statistics.median(base), statistics.median(mine)
    print(
        f"overhead: distill harvest {m:.0f} completions/s vs plain openai client {b:.0f}/s "
        f"(medians of {rounds}: {[round(x) for x in mine]} vs {[round(x) for x in base]}) "
        f"-> ratio {m / b:.2f} (goal >= 0.8 and >= 500/s)"
    )
    return {
        "distill_per_s": round(m, 1),
        "baseline_per_s": round(b, 1),
        "ratio": round(m / b, 3),
        "rounds": rounds,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    main(a.n, a.concurrency, a.rounds)
