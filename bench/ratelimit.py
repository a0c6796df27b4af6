"""Rate-limit figure: against a server enforcing 1,200 requests/min (20/s, a bucket one second
deep), at --concurrency 64: completions/s / 20 (goal >= 0.95), the 429 share (goal <= 2%),
failed prompts (goal 0). Baseline in the same run: a plain `openai.AsyncOpenAI` client with a
semaphore of 64 and the SDK's retries (max_retries=5), as a new user would write it.

    .venv/bin/python -m bench.ratelimit [--n 600]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import plain_openai, prompt_file, server_process

LIMIT = 20.0


def run_ours(url: str, prompts: Path, out: Path, **kw: object) -> tuple[float, int]:
    from pipeline.harvest import HarvestConfig, harvest

    s = harvest(
        HarvestConfig(
            prompts=[prompts],
            out=out,
            base_url=url,
            model="m",
            concurrency=64,
            progress_every=3600,
            **kw,
        ),
        pretty=False,
    )  # type: ignore[arg-type]
    return s.completed / s.elapsed_s, s.failed


def main(n: int = 600) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-rl-"))
    results = {}
    try:
        prompts = prompt_file(tmp / "p.jsonl", n)
        cases = [
            ("plain openai client + semaphore (baseline)", [], None),
            ("distill, limit learned from headers", [], {}),
            ("distill, --rpm 1200 given", [], {"rpm": 1200}),
            ("distill, server sends no headers", ["--no-ratelimit-headers"], {}),
        ]
        for i, (name, server_args, kw) in enumerate(cases):
            stats = tmp / f"stats{i}.json"
            with server_process(
                "--rps", str(LIMIT), "--burst", str(LIMIT), *server_args, stats=stats
            ) as url:
                if kw is None:
                    rate, failed = asyncio.run(plain_openai(url, n, 64))
                else:
                    rate, failed = run_ours(url, prompts, tmp / f"run{i}", **kw)
            time.sleep(0.3)
            st = json.loads(stats.read_text())
            share = st["status"].get("429", 0) / max(1, st["requests"])
            results[name] = {
                "completions_per_s": round(rate, 2),
                "ratio_to_limit": round(rate / LIMIT, 3),
                "share_429": round(share, 4),
                "failed": failed,
            }
            print(
                f"rate limit: {name}: {rate:.2f}/s = {rate / LIMIT:.3f} x limit, 429 share {share:.1%}, failed {failed}/{n}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("rate limit goal: >= 0.95 x limit, <= 2% 429s, 0 failed")
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    main(ap.parse_args().n)
