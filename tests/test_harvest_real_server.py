"""`distill harvest` against a real OpenAI-compatible server: `transformers serve` on a tiny local
model (offline). The harvester talks to it over HTTP exactly as it would to a provider."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from pipeline.demo.serve import serve_teacher, served_model_name
from pipeline.store import Store
from tests.conftest import arithmetic_rows, harvest_args, run_cli, write_jsonl
from tests.tinymodels import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("real") / "tiny", arch="qwen2", template="known")


def test_harvest_collects_every_prompt_and_a_rerun_sends_nothing(
    tiny: Path, tmp_path: Path
) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(6))
    run = tmp_path / "run"
    with serve_teacher(tiny, log_path=tmp_path / "serve.log") as url:
        more = ("--max-tokens", "8", "--concurrency", "4", "--json")
        args = harvest_args(url, prompts, run, *more, model=served_model_name(tiny))
        first = run_cli(*args)
        assert first.returncode == 0, first.stderr
        s1 = json.loads(first.stdout)
        assert s1["completed"] == 6 and s1["failed"] == 0 and s1["requests_sent"] == 6
        second = run_cli(*args)
        assert second.returncode == 0, second.stderr
        s2 = json.loads(second.stdout)
        assert s2["requests_sent"] == 0 and s2["already_done"] == 6
    with Store(run, readonly=True) as st:
        rows = [asdict(r) for r in st.iter_responses()]
    assert sorted(r["prompt_id"] for r in rows) == [f"q{i}" for i in range(6)]
    for r in rows:
        assert r["finish_reason"] in ("stop", "length")
        assert r["completion_tokens"] and r["prompt_tokens"]
        assert isinstance(r["response"], str)
