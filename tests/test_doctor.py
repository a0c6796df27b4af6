"""`distill doctor`: a damaged store is recovered row by row; intact rows come back unchanged."""

from __future__ import annotations

import random
import shutil
import sqlite3
import traceback
from pathlib import Path

from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.doctor import RECOVERED, doctor, integrity_problems
from pipeline.record import Response
from pipeline.store import STORE_FILE, Store
from tests.conftest import arithmetic_rows, harvest_args, run_cli, write_jsonl
from tests.openai_server import OpenAIServer


def make_store(run: Path, n: int) -> None:
    with Store(run) as s:
        for i in range(n):
            s.add_response(
                Response(
                    key=f"k{i:05d}",
                    prompt_id=f"p{i:05d}",
                    sample_index=0,
                    teacher="t",
                    base_url="http://127.0.0.1:1/v1",
                    model="m",
                    params_hash="h",
                    params={"temperature": 0.0},
                    messages=[{"role": "user", "content": f"question {i} " + "x" * 300}],
                    response=f"answer {i} " + "y" * 300,
                    created_at="2026-01-01T00:00:00.000Z",
                )
            )


def keys(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT key FROM responses")}
    finally:
        db.close()


def test_healthy_store_is_left_alone(tmp_path: Path) -> None:
    make_store(tmp_path / "run", 20)
    before = (tmp_path / "run" / STORE_FILE).read_bytes()
    report = doctor(tmp_path / "run", replace=True)
    assert report.healthy and report.written is None
    assert (tmp_path / "run" / STORE_FILE).read_bytes() == before


def test_damaged_page_loses_only_its_rows(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_store(run, 400)
    path = run / STORE_FILE
    data = bytearray(path.read_bytes())
    page = 4096
    pages = len(data) // page
    victim = pages // 3  # a page inside the table's data
    data[victim * page + 8 : victim * page + 600] = b"\xa5" * 592
    path.write_bytes(bytes(data))
    assert integrity_problems(path)

    report = doctor(run)
    assert not report.healthy and report.written == run / RECOVERED
    got = keys(run / RECOVERED)
    total = report.recovered["responses"]
    assert total == len(got) and 300 < total < 400  # one page holds a handful of ~700-byte rows
    assert got <= {f"k{i:05d}" for i in range(400)}
    assert report.lost["responses"]  # it says what was lost

    report = doctor(run, replace=True)
    assert report.replaced_damaged is not None and report.replaced_damaged.exists()
    with Store(run, readonly=True) as s:  # the recovered store opens and reads back unchanged rows
        rows = list(s.iter_responses())
        texts = s.prompt_hashes()  # each prompt's text too: an edited prompt is still caught
    assert set(texts) >= {r.prompt_id for r in rows}
    assert len(rows) == total and all(r.response.startswith("answer ") for r in rows)
    assert not integrity_problems(path)


def rows(path: Path, table: str) -> dict[str, tuple]:
    """Every row of `table` with its rowid, by its first column (the key)."""
    db = sqlite3.connect(path)
    try:
        return {r[1]: tuple(r) for r in db.execute(f"SELECT rowid, * FROM {table}")}
    finally:
        db.close()


def pages(path: Path, table: str, kind: str) -> list[int]:
    """The pages of `table`'s b-tree of one kind (leaf, internal), in tree order (SQLite's dbstat)."""
    db = sqlite3.connect(path)
    try:
        return [
            r[0]
            for r in db.execute(
                "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = ? ORDER BY path",
                (table, kind),
            )
        ]
    finally:
        db.close()


def keys_on_leaf(path: Path, table: str, page: int) -> set[str]:
    """The keys stored on one leaf page: leaves hold consecutive rowid runs in tree order, so the
    page's rows are those ranked between the cell counts of the leaves before it and its own."""
    db = sqlite3.connect(path)
    try:
        counts = db.execute(
            "SELECT pageno, ncell FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY path",
            (table,),
        ).fetchall()
        ordered = [r[0] for r in db.execute(f"SELECT key FROM {table} ORDER BY rowid")]
    finally:
        db.close()
    start = 0
    for pageno, ncell in counts:
        if pageno == page:
            return set(ordered[start : start + ncell])
        start += ncell
    raise AssertionError(f"page {page} is not a leaf of {table}")


def test_recovery_keeps_every_row_of_every_intact_page(tmp_path: Path) -> None:
    """One leaf page and the interior (root) page of `responses` damaged, and the root of
    `prompts`: the leaves under a damaged interior page are orphans that a b-tree walk cannot
    reach. Exactly the rows of the damaged leaf are lost; every other row comes back unchanged."""
    run = tmp_path / "run"
    make_store(run, 500)
    path = run / STORE_FILE
    responses, prompts = rows(path, "responses"), rows(path, "prompts")
    leaves = pages(path, "responses", "leaf")
    leaf = leaves[len(leaves) // 2]
    lost = keys_on_leaf(path, "responses", leaf)
    interiors = pages(path, "responses", "internal") + pages(path, "prompts", "internal")
    assert lost and len(interiors) == 2
    data = bytearray(path.read_bytes())
    for page, kind in [(leaf, 0x0D), *((p, 0x05) for p in interiors)]:
        at = (page - 1) * 4096
        assert data[at] == kind  # the b-tree page header says: table leaf, table interior
        data[at + 8 : at + 600] = b"\xa5" * 592
    path.write_bytes(bytes(data))
    assert integrity_problems(path)

    report = doctor(run)
    got = rows(run / RECOVERED, "responses")
    assert set(got) == set(responses) - lost
    assert all(got[k] == responses[k] for k in got)  # unchanged, rowid included
    assert rows(run / RECOVERED, "prompts") == prompts  # all of its leaves were orphans
    assert report.recovered["responses"] == 500 - len(lost)
    assert report.claimed["responses"] == 500  # the key index was intact: it lists them all
    assert report.lost["responses"] == sorted(lost)
    text = "\n".join(report.lines())
    assert f"responses: {500 - len(lost)} of 500 rows recovered; lost {len(lost)}:" in text


def test_random_garbage_never_gives_a_traceback_nor_a_harvest_success(
    server: OpenAIServer, tmp_path: Path
) -> None:
    """Property: garbage written at random offsets of a real store (20 seeded trials). Every
    command ends with an exit code (no traceback), and harvest never exits 0 on a store that
    SQLite's integrity check finds damaged."""
    prompts = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(80))
    good = tmp_path / "good"
    assert run_cli(*harvest_args(server, prompts, good)).returncode == 0
    rng = random.Random(12)
    runner = CliRunner()
    damaged_trials = 0
    for trial in range(20):
        run = tmp_path / f"t{trial}"
        shutil.copytree(good, run)
        path = run / STORE_FILE
        data = bytearray(path.read_bytes())
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data))
            n = rng.randint(1, 32)
            data[at : at + n] = rng.randbytes(n)
        path.write_bytes(bytes(data[: len(path.read_bytes())]))
        is_damaged = bool(integrity_problems(path))
        damaged_trials += is_damaged
        out = tmp_path / f"o{trial}"
        commands = [
            harvest_args(server, prompts, run),
            ["export", str(run), "--to", str(out / "e"), "--format", "jsonl"],
            ["build", str(run), "--to", str(out / "ds")],
            ["batch", "status", str(run)],
            ["doctor", str(run)],
        ]
        for args in commands:
            result = runner.invoke(cli, args)
            assert isinstance(result.exception, SystemExit | None), (
                trial,
                args[0],
                "".join(traceback.format_exception(result.exception)),
            )
            if args[0] == "harvest" and is_damaged:
                assert result.exit_code != 0, (trial, result.output)
    assert damaged_trials >= 5  # the trials do reach damage SQLite can see, not only row text
