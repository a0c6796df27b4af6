"""Folder ownership: a stage writes only into a new folder, an empty one, or its own earlier output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.outdir import MARKER, claim, owner, record, replace_own
from tests.conftest import (
    arithmetic_rows,
    assert_one_line_error,
    harvest_args,
    run_cli,
    write_jsonl,
)
from tests.openai_server import OpenAIServer


def test_new_and_empty_folders_are_claimed(tmp_path: Path) -> None:
    claim(tmp_path / "new" / "deep", "build")
    assert owner(tmp_path / "new" / "deep") == "build"
    (tmp_path / "empty").mkdir()
    claim(tmp_path / "empty", "eval")
    assert owner(tmp_path / "empty") == "eval"


def test_another_stages_folder_is_refused_untouched(tmp_path: Path) -> None:
    run = tmp_path / "run"
    claim(run, "harvest")
    (run / "store.sqlite").write_bytes(b"x")
    with pytest.raises(InputError, match=r"output of `distill harvest`.*choose another --out"):
        claim(run, "finetune")
    assert owner(run) == "harvest" and (run / "store.sqlite").read_bytes() == b"x"


def test_pre_marker_folders_are_known_by_their_files(tmp_path: Path) -> None:
    old_ft = tmp_path / "ft"
    old_ft.mkdir()
    (old_ft / "train_report.json").write_text("{}")
    with pytest.raises(InputError, match="distill finetune"):
        claim(old_ft, "eval", flag="--out")
    claim(old_ft, "finetune")  # its own: accepted


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="did not write; choose an empty or new --to"):
        claim(d, "build", flag="--to")
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        claim(tmp_path / "f", "export")


def test_replacing_own_output_keeps_what_the_user_added(tmp_path: Path) -> None:
    out = claim(tmp_path / "ds", "build")
    first = tmp_path / "tmp1"
    (first / "train").mkdir(parents=True)
    (first / "build_report.json").write_text("1")
    replace_own(out, "build", first)
    (out / "my_notes.md").write_text("keep me")
    second = tmp_path / "tmp2"
    second.mkdir()
    (second / "build_report.json").write_text("2")
    replace_own(out, "build", second)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MARKER, "build_report.json", "my_notes.md"]
    )
    assert (out / "build_report.json").read_text() == "2" and not first.exists()
    record(out, "build", ["card.md"])
    assert owner(out) == "build"


# -- the stages, over the real CLI -----------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _run_and_dataset(server: OpenAIServer, tmp_path: Path) -> tuple[Path, Path, Path]:
    prompts = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(20))
    run, ds = tmp_path / "run", tmp_path / "ds"
    assert run_cli(*harvest_args(server, prompts, run)).returncode == 0
    proc = run_cli("build", str(run), "--to", str(ds))
    assert proc.returncode == 0, proc.stderr
    return prompts, run, ds


def test_no_stage_writes_into_another_stages_folder(server: OpenAIServer, tmp_path: Path) -> None:
    prompts, run, ds = _run_and_dataset(server, tmp_path)
    ft = tmp_path / "ft"  # a fine-tune's folder as it was before markers existed
    ft.mkdir()
    (ft / "train_report.json").write_text('{"student": "x"}')
    (ft / "config.yaml").write_text("finetune: {}\n")
    cases = [
        (
            ["finetune", "--data", str(ds), "--student", str(tmp_path), "--out", str(run)],
            run,
            "harvest",
        ),
        (["eval", "--data", str(ds), "--finetuned", str(ft), "--out", str(ds)], ds, "build"),
        (harvest_args(server, prompts, ft), ft, "finetune"),
        (harvest_args(server, prompts, ds), ds, "build"),
        (["build", str(run), "--to", str(run)], run, "harvest"),
        (["export", str(run), "--to", str(ds), "--format", "jsonl"], ds, "build"),
        (["export", str(run), "--to", str(ft)], ft, "finetune"),
    ]
    sent = server.requests
    for args, folder, owner_stage in cases:
        before = _snapshot(folder)
        proc = run_cli(*args)
        assert_one_line_error(
            proc, str(folder), f"output of `distill {owner_stage}`", "choose another"
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert _snapshot(folder) == before, args  # byte-identical: nothing written, nothing removed
    assert server.requests == sent


def test_a_rebuild_or_reexport_keeps_the_users_files(server: OpenAIServer, tmp_path: Path) -> None:
    _, run, ds = _run_and_dataset(server, tmp_path)
    (ds / "notes.md").write_text("my notes")
    assert run_cli("build", str(run), "--to", str(ds), "--eval-fraction", "0.2").returncode == 0
    assert (ds / "notes.md").read_text() == "my notes" and (ds / "build_report.json").is_file()
    assert json.loads((ds / "build_report.json").read_text())["config"]["eval_fraction"] == 0.2
    exp = tmp_path / "exp"
    assert run_cli("export", str(run), "--to", str(exp)).returncode == 0
    (exp / "notes.md").write_text("mine too")
    assert run_cli("export", str(run), "--to", str(exp)).returncode == 0
    assert (exp / "notes.md").read_text() == "mine too" and (exp / "dataset_info.json").is_file()
    # Another format replaces the earlier export (no stale dataset beside it), the notes stay.
    proc = run_cli("export", str(run), "--to", str(exp), "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in exp.iterdir()) == [".distill.json", "notes.md", "responses.jsonl"]
    assert run_cli("export", str(run), "--to", str(exp), "--format", "parquet").returncode == 0
    assert sorted(p.name for p in exp.iterdir()) == [
        ".distill.json",
        "notes.md",
        "responses.parquet",
    ]


def test_export_to_an_existing_file_is_one_line(server: OpenAIServer, tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(3))
    run = tmp_path / "run"
    assert run_cli(*harvest_args(server, prompts, run)).returncode == 0
    target = tmp_path / "taken.txt"
    target.write_text("keep")
    for fmt in ("hf", "jsonl"):
        proc = run_cli("export", str(run), "--to", str(target), "--format", fmt)
        assert_one_line_error(proc, str(target), "is a file")  # was NotADirectoryError
    assert target.read_text() == "keep"


def test_folders_written_before_markers_are_known_by_what_each_stage_writes(
    server: OpenAIServer, tmp_path: Path
) -> None:
    _, run, ds = _run_and_dataset(server, tmp_path)
    exp, jsonl = tmp_path / "exp", tmp_path / "jsonl"
    assert run_cli("export", str(run), "--to", str(exp)).returncode == 0
    assert run_cli("export", str(run), "--to", str(jsonl), "--format", "jsonl").returncode == 0
    for folder, stage in ((run, "harvest"), (ds, "build"), (exp, "export"), (jsonl, "export")):
        (folder / MARKER).unlink()  # as written by a distill from before markers
        assert owner(folder) == stage, folder
