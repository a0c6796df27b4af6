"""Shared fixtures: an OpenAI-compatible test server on loopback, and state redirected to tmp_path."""

from __future__ import annotations

import os
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
