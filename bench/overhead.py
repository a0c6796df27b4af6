"""Harvester overhead: `distill harvest` (committing every response to SQLite) against a plain
`openai.AsyncOpenAI` + semaphore client that stores nothing, same zero-latency server, same run.

    .venv/bin/python -m bench.overhead [--n 3000] [--concurrency 64]

Goal: ratio >= 0.8 and >= 500 completions/s.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
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


def main(n: int = 3000, concurrency: int = 64) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    try:
        prompts = prompt_file(tmp / "p.jsonl", n)
        with server_process() as url:
            asyncio.run(plain_openai(url, 200, concurrency))  # warm up the server
            base = asyncio.run(plain_openai(url, n, concurrency))
            mine = ours(url, prompts, tmp / "run", concurrency)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = mine / base
    print(
        f"overhead: distill harvest {mine:.0f} completions/s vs plain openai client {base:.0f}/s -> ratio {ratio:.2f} (goal >= 0.8 and >= 500/s)"
    )
    return {
        "distill_per_s": round(mine, 1),
        "baseline_per_s": round(base, 1),
        "ratio": round(ratio, 3),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=64)
    a = ap.parse_args()
    main(a.n, a.concurrency)
