"""A prompt id means one text: an edited prompt is stopped or replaced, never mixed with the old."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.store import STORE_FILE
from tests.conftest import assert_one_line_error, harvest_args, run_cli, write_jsonl
from tests.openai_server import OpenAIServer

ROWS = [
    {"id": "a", "prompt": "What is 1 + 2?", "reference": "3"},
    {"id": "b", "prompt": "What is 2 + 4?", "reference": "6"},
]


def _dataset_prompts(ds: Path) -> dict[str, list[str]]:
    import datasets

    out: dict[str, list[str]] = {}
    for split in datasets.load_from_disk(str(ds)).values():
        for row in split:
            out.setdefault(row["prompt_id"], []).append(row["messages"][0]["content"])
    return out


def test_an_edited_prompt_stops_before_sending(server: OpenAIServer, tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS)
    run = tmp_path / "run"
    assert run_cli(*harvest_args(server, prompts, run)).returncode == 0
    edited = [ROWS[0], {**ROWS[1], "prompt": "What is 2 + 5?", "reference": "7"}]
    write_jsonl(prompts, edited)
    sent, before = server.requests, (run / STORE_FILE).read_bytes()
    config = (run / "config.yaml").read_bytes()
    # --concurrency: a config.yaml of other text, which exit 2 must not have written
    proc = run_cli(*harvest_args(server, prompts, run, "--concurrency", "3"))
    assert_one_line_error(proc, f"{prompts}:2", "'b'", "new id", "--replace-changed-prompts")
    assert proc.returncode == 2 and server.requests == sent  # was: both texts kept under id b
    assert (run / STORE_FILE).read_bytes() == before
    assert (run / "config.yaml").read_bytes() == config
    last = (run / "harvest.log").read_text().splitlines()[-1]
    assert "harvest failed" in last and "'b'" in last and "(exit 2)" in last
    dry = run_cli(*harvest_args(server, prompts, run, "--dry-run"))
    assert_one_line_error(dry, "'b'")


def test_replace_changed_prompts_harvests_the_new_text_and_build_uses_only_it(
    server: OpenAIServer, tmp_path: Path
) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS)
    run = tmp_path / "run"
    assert run_cli(*harvest_args(server, prompts, run)).returncode == 0
    write_jsonl(prompts, [ROWS[0], {**ROWS[1], "prompt": "What is 2 + 5?", "reference": "7"}])
    sent = server.requests
    proc = run_cli(*harvest_args(server, prompts, run, "--replace-changed-prompts"))
    assert proc.returncode == 0, proc.stderr
    assert server.requests == sent + 1  # only the new text is asked
    proc = run_cli("build", str(run), "--to", str(tmp_path / "ds"), "--eval-size", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["removed"]["replaced_prompt"] == 1  # counted, not "duplicate"
    card = (tmp_path / "ds" / "README.md").read_text()
    assert "| replaced_prompt | 1 | an answer to a prompt's old text" in card  # not "off"
    got = _dataset_prompts(tmp_path / "ds")
    assert got == {"a": ["What is 1 + 2?"], "b": ["What is 2 + 5?"]}

    # Back to the first text: it becomes current again, though nothing needs asking.
    write_jsonl(prompts, ROWS)
    proc = run_cli(*harvest_args(server, prompts, run, "--replace-changed-prompts"))
    assert proc.returncode == 0 and server.requests == sent + 1, proc.stderr
    assert (
        run_cli("build", str(run), "--to", str(tmp_path / "ds"), "--eval-size", "1").returncode == 0
    )
    assert _dataset_prompts(tmp_path / "ds")["b"] == ["What is 2 + 4?"]


def test_same_text_under_other_ids_or_references_is_a_counted_warning(
    server: OpenAIServer, tmp_path: Path
) -> None:
    rows = [
        ROWS[0],
        {"id": "a2", "prompt": "What is 1 + 2?", "reference": "3"},  # same text, other id
        ROWS[1],
        {"id": "b", "prompt": "What is 2 + 4?", "reference": "7"},  # same id and text, other ref
        ROWS[1],  # an exact repeat: a plain duplicate, no warning
    ]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    proc = run_cli(*harvest_args(server, prompts, tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: prompt conflict")]
    assert len(warnings) == 2, proc.stderr
    assert f"{prompts}:2" in warnings[0] and f"{prompts}:1" in warnings[0]
    assert "'a'" in warnings[0] and "'a2'" in warnings[0]
    assert f"{prompts}:4" in warnings[1] and "'6'" in warnings[1] and "'7'" in warnings[1]
    assert "2 prompt conflicts" in proc.stderr.splitlines()[-1]
    assert server.requests == 2
