"""Resume cost: kill -9 a running harvest several times, rerun to completion, and count the
requests the server answered more than once (paid twice) per kill. Bound: those in flight.

    .venv/bin/python -m bench.resume [--n 400] [--kills 6] [--concurrency 16]
    .venv/bin/python -m bench.resume --n 1000000 --kills 1 --every 500000 --latency 0 --concurrency 64

`--every K`: each kill comes once K more answers are stored (default: soon after the first), so a
kill can land deep in a large run, where the rerun has a million prompts to plan against the store.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, harvest_args, prompt_file, server_process


def rows(run: Path) -> int:
    try:
        db = sqlite3.connect(run / "store.sqlite")
        n = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        db.close()
        return int(n)
    except sqlite3.Error:
        return 0


def main(
    n: int = 400, kills: int = 6, concurrency: int = 16, every: int = 1, latency: float = 0.1
) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    rng = random.Random(0)
    stats = tmp / "stats.json"
    try:
        prompts = prompt_file(tmp / "p.jsonl", n)
        run = tmp / "run"
        with server_process("--latency", str(latency), stats=stats) as url:
            args = harvest_args(url, prompts, run, "--concurrency", str(concurrency))
            cmd = [sys.executable, "-m", "pipeline", *args]
            done_kills = 0
            for _ in range(kills):
                before = rows(run)
                proc = subprocess.Popen(
                    cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                while rows(run) < before + every and proc.poll() is None:
                    time.sleep(0.02 if every == 1 else 0.5)
                time.sleep(rng.uniform(0.1, 0.6))
                if proc.poll() is None:
                    proc.kill()
                    done_kills += 1
                proc.wait()
            subprocess.run(
                cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        time.sleep(0.3)
        answered = json.loads(stats.read_text())["completed"]
        stored = rows(run)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    twice = answered - stored
    per_kill = twice / max(1, done_kills)
    print(
        f"resume: {done_kills} kill -9s, {stored}/{n} stored once each, {twice} answers paid twice = {per_kill:.1f} per kill (bound: {concurrency} in flight)"
    )
    return {
        "kills": done_kills,
        "stored": stored,
        "paid_twice": twice,
        "paid_twice_per_kill": round(per_kill, 2),
        "in_flight_bound": concurrency,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--kills", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--every", type=int, default=1, help="answers stored before each kill")
    ap.add_argument(
        "--latency", type=float, default=0.1, help="the test server's seconds per answer"
    )
    a = ap.parse_args()
    main(a.n, a.kills, a.concurrency, a.every, a.latency)
