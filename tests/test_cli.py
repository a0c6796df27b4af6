"""One exit-code table for every command (pipeline/errors.py, README "Exit codes"): the same
mistake, a path that does not exist, is bad input (2) with one `error:` line in each command."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import EXIT_USAGE
from tests.conftest import assert_one_line_error, run_cli

NOPE = "does-not-exist"


@pytest.mark.parametrize(
    "args",
    [
        ["harvest", "--prompts", "{nope}/p.jsonl", "--model", "m", "--out", "{tmp}/run"],
        ["batch", "submit", "{tmp}/run", "--prompts", "{nope}/p.jsonl", "--model", "m"],
        ["batch", "run", "{tmp}/run", "--prompts", "{nope}/p.jsonl", "--model", "m"],
        ["batch", "collect", "{nope}"],
        ["batch", "cancel", "{nope}"],
        ["batch", "status", "{nope}"],
        ["export", "{nope}", "--to", "{tmp}/out"],
        ["build", "{nope}", "--to", "{tmp}/out"],
        ["finetune", "--data", "{nope}", "--student", "{nope}", "--out", "{tmp}/out"],
        ["merge", "{nope}", "--to", "{tmp}/out"],
        ["eval", "--data", "{nope}", "--finetuned", "{nope}", "--out", "{tmp}/out"],
        [
            "onpolicy",
            "--prompts",
            "{nope}/p.jsonl",
            "--student",
            "{nope}",
            "--model",
            "m",
            "--base-url",
            "http://127.0.0.1:9/v1",  # never reached: the prompts are read first
            "--out",
            "{tmp}/out",
        ],
        ["probe", "--config", "{nope}/c.yaml"],
        ["doctor", "{nope}"],
        ["demo", "--config", "{nope}/demo.yaml"],
        ["reference", "--write", "{nope}/README.md"],
    ],
    ids=lambda a: " ".join(a[:2]) if a[0] == "batch" else a[0],
)
def test_a_missing_path_is_bad_input_in_every_command(tmp_path: Path, args: list[str]) -> None:
    nope = str(tmp_path / NOPE)
    proc = run_cli(*(a.format(nope=nope, tmp=tmp_path) for a in args))
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert_one_line_error(proc, NOPE)
    assert not (tmp_path / NOPE).exists()  # nothing was created for it


def test_a_missing_required_flag_names_the_flag(tmp_path: Path) -> None:
    proc = run_cli("eval", "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert proc.returncode == EXIT_USAGE
    assert_one_line_error(proc, "pass --finetuned", "OUT folder")
    assert "Field required" not in proc.stderr
