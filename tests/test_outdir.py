"""Folder ownership: a stage writes only into a new folder, an empty one, or its own earlier output."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.outdir import MARKER, claim, owner, record, replace_own


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
