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


def vllm_sized_model(path: Path) -> Path:
    """tests.tinymodels' tiny Qwen2 (float32), widened to head_dim 64: vLLM's CPU attention has
    no kernel for its head_dim of 8 ("Unsupported CPU attention configuration: head_dim=8")."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.tinymodels import make_tiny_model

    make_tiny_model(path, arch="qwen2")
    config = AutoConfig.from_pretrained(path)
    config.hidden_size, config.intermediate_size = 128, 256
    config.num_attention_heads, config.num_key_value_heads = 2, 1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def vllm_teacher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """vLLM's CPU build serving a tiny model for the whole session (it starts in 2-3 minutes):
    (base_url, model name to send, model folder). Skips only when vLLM cannot be installed."""
    from pipeline.demo.serve import ensure_vllm, serve_teacher, served_model_name
    from pipeline.errors import TeacherError

    try:
        ensure_vllm()
    except TeacherError as e:
        pytest.skip(f"vLLM's CPU build cannot be installed here: {e}")
    root = tmp_path_factory.mktemp("vllm")
    model_dir = vllm_sized_model(root / "tiny")
    with serve_teacher(model_dir, log_path=root / "vllm.log", engine="vllm") as url:
        yield url, served_model_name(model_dir), model_dir


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
