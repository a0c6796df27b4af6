"""Helpers shared by the harvest benchmarks: a test server in its own process, prompt files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import harvest_args  # noqa: F401 (the tests' `distill harvest` arguments)

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server_process(*args: str, stats: Path | None = None) -> Iterator[str]:
    """`python -m tests.openai_server ARGS` on a free port, in its own process (its own core)."""
    port = free_port()
    cmd = [sys.executable, "-m", "tests.openai_server", "--port", str(port), *args]
    if stats is not None:
        cmd += ["--stats-file", str(stats)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"test server did not start: {line!r}")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def prompt_file(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "id": f"b{i}",
                        "prompt": f"What is {i} + {i + 1}?",
                        "reference": str(2 * i + 1),
                    }
                )
                + "\n"
            )
    return path


def timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def env_note() -> str:
    return f"{os.cpu_count()} cores, python {sys.version.split()[0]}"


async def plain_openai(url: str, n: int, concurrency: int) -> tuple[float, int]:
    """(answers/s, failed) for the plain client with a semaphore."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=5)
    sem = asyncio.Semaphore(concurrency)
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        async with sem:
            try:
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"What is {i} + {i + 1}?"}]
                )
            except openai.APIError:
                failed += 1

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - t
    await client.close()
    return (n - failed) / elapsed, failed
