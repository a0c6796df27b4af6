"""`make bench`: every benchmark, each a ratio against a baseline run in the same process.

    .venv/bin/python -m bench [overhead ratelimit concurrency resume scale packing kd onpolicy]

Results also go to data/bench/results.json. Run on an idle machine: these are timings.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from bench.common import env_note

ALL = ["overhead", "ratelimit", "concurrency", "resume", "scale", "packing", "kd", "onpolicy"]


def main() -> None:
    names = sys.argv[1:] or ALL
    results = {"machine": env_note()}
    for name in names:
        try:
            mod = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError:
            print(f"{name}: not available")
            continue
        print(f"== {name}", flush=True)
        results[name] = mod.main()
    out = Path("data/bench/results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results -> {out}")


if __name__ == "__main__":
    main()
