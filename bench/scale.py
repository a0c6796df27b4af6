"""Scale: harvest, rerun, build and export at growing N against the zero-latency test server,
each stage in its own process; time, answers/s and peak RSS per stage, and the growth ratios.

    .venv/bin/python -m bench.scale [--sizes 10000 100000] [--million] [--runs DIR] [--harvest-only]

Goals (issue 13): build and export peak RSS at the largest N <= 1.3 x at the smallest (and < 1 GB
at 1M); harvest answers/s at the largest >= 0.8 x at the smallest; a rerun of a finished run sends
nothing (0 requests) and returns in < 10 s. `--runs DIR` reuses harvested runs (DIR/run-N) to
measure build and export alone (e.g. another branch's code against the same stores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, harvest_args, prompt_file, server_process


def _rss_mb(usage) -> float | None:  # type: ignore[no-untyped-def]
    return None if usage is None else round(usage.ru_maxrss / 1024, 1)  # Linux: KiB


def _run(args: list[str]) -> dict:
    """`python -m pipeline ARGS` in its own process: seconds, its own peak RSS (MB), stdout.
    Reaped with wait4: RUSAGE_CHILDREN would give the max over every stage so far."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    # Read both pipes to the end (the child may write more than a pipe buffer), then reap.
    out = proc.stdout.read()  # type: ignore[union-attr]
    err = proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"distill {args[0]} failed ({proc.returncode}): {err[-2000:]!r}")
    return {"s": round(seconds, 2), "rss_mb": _rss_mb(usage), "stdout": out.decode()}


def one_size(n: int, url: str, root: Path, reuse: bool, stages: tuple[str, ...]) -> dict:
    prompts = root / f"p-{n}.jsonl"
    run = root / f"run-{n}"
    res: dict = {"n": n}
    if not reuse:
        prompt_file(prompts, n)
        shutil.rmtree(run, ignore_errors=True)
        h = _run([*harvest_args(url, prompts, run, "--concurrency", "64", "--json")])
        got = json.loads(h["stdout"])
        assert got["completed"] == n and got["failed"] == 0, got
        res["harvest"] = {
            "s": h["s"],
            "rss_mb": h["rss_mb"],
            "answers_per_s": round(got["completions_per_s"], 1),
        }
        again = _run([*harvest_args(url, prompts, run, "--concurrency", "64", "--json")])
        got = json.loads(again["stdout"])
        res["rerun"] = {
            "s": again["s"],
            "rss_mb": again["rss_mb"],
            "requests": got["requests_sent"],
            "new": got["completed"],
        }
    for name, args in {
        "build": ["build", str(run), "--to", str(root / f"ds-{n}")],
        "export": ["export", str(run), "--to", str(root / f"ex-{n}"), "--format", "parquet"],
    }.items():
        if name not in stages:
            continue
        r = _run(args)
        res[name] = {"s": r["s"], "rss_mb": r["rss_mb"], "rows_per_s": round(n / r["s"], 1)}
        shutil.rmtree(root / f"ds-{n}" if name == "build" else root / f"ex-{n}", ignore_errors=True)
    print(f"  N={n}: " + json.dumps({k: v for k, v in res.items() if k != "n"}), flush=True)
    return res


def main(
    sizes: list[int] | None = None,
    runs: Path | None = None,
    stages: tuple[str, ...] = ("build", "export"),
) -> dict:
    sizes = sorted(sizes or [10_000, 100_000])
    root = runs or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    reuse = runs is not None and all((root / f"run-{n}").is_dir() for n in sizes)
    results = []
    try:
        with server_process() as url:
            for n in sizes:
                results.append(one_size(n, url, root, reuse, stages))
    finally:
        if runs is None:
            shutil.rmtree(root, ignore_errors=True)
    lo, hi = results[0], results[-1]
    ratios = {
        f"{name}_rss_{hi['n']}/{lo['n']}": round(hi[name]["rss_mb"] / lo[name]["rss_mb"], 2)
        for name in ("build", "export", "harvest")
        if name in hi and name in lo
    }
    if "harvest" in hi:
        ratios[f"harvest_per_s_{hi['n']}/{lo['n']}"] = round(
            hi["harvest"]["answers_per_s"] / lo["harvest"]["answers_per_s"], 2
        )
    print(
        f"scale: {json.dumps(ratios)} (goals: build/export rss <= 1.3, harvest per_s >= 0.8; "
        "rerun: 0 requests, < 10 s)"
    )
    return {"sizes": results, "ratios": ratios}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--million", action="store_true", help="add N = 1,000,000 (tens of minutes)")
    ap.add_argument("--runs", type=Path, help="keep the runs here (reused when present)")
    ap.add_argument(
        "--harvest-only", action="store_true", help="harvest and rerun; no build or export"
    )
    a = ap.parse_args()
    stages = () if a.harvest_only else ("build", "export")
    main([*a.sizes, *([1_000_000] if a.million else [])], a.runs, stages)
