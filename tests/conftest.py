"""Shared fixtures: an OpenAI-compatible test server on loopback, and state redirected to tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.openai_server import OpenAIServer

# Nothing in the suite may reach the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def server() -> Iterator[OpenAIServer]:
    """A fresh OpenAI-compatible server per test (configure its attributes in the test)."""
    with OpenAIServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _no_real_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never see the developer's key or base URL, and write under tmp_path."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `distill ARGS` in a real subprocess (exit codes, stderr, signals as a user sees them)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=Path(__file__).resolve().parent.parent,
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def arithmetic_rows(n: int, start: int = 0) -> list[dict]:
    """Prompts the test server answers correctly ('What is a + b?')."""
    return [
        {"id": f"q{i}", "prompt": f"What is {i} + {2 * i}?", "reference": str(3 * i)}
        for i in range(start, start + n)
    ]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A user error: non-zero exit, one `error:` line naming the problem, no traceback."""
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def harvest_args(
    srv: OpenAIServer | str, prompts: Path, run: Path, *more: str, model: str = "m"
) -> list[str]:
    """`distill harvest` arguments for a test server (or a base URL); bench/ uses these too."""
    url = srv if isinstance(srv, str) else srv.url
    where = ["--prompts", str(prompts), "--out", str(run), "--base-url", url, "--model", model]
    return ["harvest", *where, *more]
