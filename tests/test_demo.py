"""The demo's steps end to end with a tiny random model instead of SmolLM2 (fast), including the
teacher server's start and guaranteed stop; and, marked slow, the real `make demo` job."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.demo import demo
from pipeline.store import Store
from tests.tinymodels import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def write_config(tmp: Path, student: Path, port: int) -> Path:
    prompts = tmp / "prompts.jsonl"
    rows = [
        {
            "id": f"r{i}",
            "prompt": f"Review: item {i} is {'good' if i % 2 else 'bad'}.",
            "reference": "positive" if i % 2 else "negative",
            "split": "eval" if i < 4 else "train",
        }
        for i in range(12)
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "system.md").write_text("Reply with `Sentiment: positive` or `Sentiment: negative`.")
    cfg = {
        "harvest": {
            "prompts": [str(prompts)],
            "out": str(tmp / "run"),
            "base_url": f"http://127.0.0.1:{port}/v1",
            "model": str(student),
            "system_prompt_file": str(tmp / "system.md"),
            "max_tokens": 6,
            "concurrency": 4,
            "timeout": 120,
        },
        # a random model's answers are never right: keep them all, only the split matters here
        "build": {
            "run": str(tmp / "run"),
            "to": str(tmp / "dataset"),
            "drop_system": True,
            "split_field": "split",
            "eval_size": 0,
            "filter_eval": False,
            "filters": {
                "unfinished": False,
                "verify": False,
                "duplicate": False,
                "near_duplicate": False,
                "empty": False,
            },
        },
        "finetune": {
            "data": str(tmp / "dataset"),
            "student": str(student),
            "out": str(tmp / "ft"),
            "max_steps": 2,
            "batch_size": 4,
            "max_length": 128,
            "eval_steps": 2,
            "save_steps": 2,
            "logging_steps": 1,
        },
        "eval": {
            "data": str(tmp / "dataset"),
            "finetuned": str(tmp / "ft"),
            "out": str(tmp / "eval"),
            "max_new_tokens": 4,
            "batch_size": 8,
            "format_regex": r"\ASentiment: (positive|negative)\s*\Z",
            "answer_patterns": ["Sentiment: (positive|negative)"],
        },
    }
    path = tmp / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_demo_steps_with_a_tiny_model_and_a_rerun_that_sends_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    student = make_tiny_model(tmp_path / "tiny", arch="qwen2", template="known")
    port = free_port()
    config = write_config(tmp_path, student, port)

    out = demo(config)
    printed = capsys.readouterr().out
    assert "harvesting 12 answers" in printed and "6/6 result" in printed
    assert port_is_closed(port)  # the teacher server is gone
    for name in ("report.md", "report.json", "metrics.png", "loss_curves.png", "demo_summary.json"):
        assert (tmp_path / "eval" / name).is_file(), name
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["prompts"] == 4  # the split: eval rows of the prompt file
    assert set(out["timings_s"]) >= {"harvest", "build", "finetune", "eval", "total"}
    with Store(tmp_path / "run", readonly=True) as st:
        assert st.count() == 12

    again = demo(config)
    printed = capsys.readouterr().out
    assert "server not started, nothing sent" in printed and "finetune: already done" in printed
    assert again["metrics"] == out["metrics"]
    with Store(tmp_path / "run", readonly=True) as st:
        assert st.count() == 12


def test_demo_stops_the_teacher_when_a_stage_fails(tmp_path: Path) -> None:
    student = make_tiny_model(tmp_path / "tiny", arch="qwen2", template="known")
    port = free_port()
    config = write_config(tmp_path, student, port)
    cfg = yaml.safe_load(config.read_text())
    cfg["harvest"]["model"] = "not-the-served-folder"
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert (
        proc.returncode == 2
        and "harvest.model must be" in proc.stderr
        and "Traceback" not in proc.stderr
    )
    assert port_is_closed(port)


@pytest.mark.slow
def test_the_real_demo() -> None:
    """`make demo`'s job on SmolLM2-135M: minutes on 2 cores (run with `make test-all`)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((ROOT / "data/demo/eval/demo_summary.json").read_text())
    m = summary["metrics"]
    assert m["finetuned"]["format_compliance"] > m["base"]["format_compliance"] + 0.5
    assert m["finetuned"]["nll"] < m["base"]["nll"]
