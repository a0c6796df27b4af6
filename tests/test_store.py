"""The store's schema and the export columns come from the one record, `Response`."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pipeline.errors import StoreError
from pipeline.export import EXPORT_COLUMNS
from pipeline.record import Response, content_hash
from pipeline.store import MIGRATIONS, STORE_FILE, RunLock, Store
from tests.conftest import (
    arithmetic_rows,
    assert_one_line_error,
    harvest_args,
    run_cli,
    write_jsonl,
)
from tests.openai_server import OpenAIServer


def _columns(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [r[1] for r in db.execute("PRAGMA table_info(responses)")]
    finally:
        db.close()


def test_responses_table_has_exactly_the_record_fields(tmp_path: Path) -> None:
    Store(tmp_path).close()
    columns = _columns(tmp_path / STORE_FILE)  # the order may differ: the store names columns
    assert sorted(columns) == sorted(Response.columns()) and len(columns) == len(set(columns))


def test_export_columns_are_the_record_fields_with_their_docs() -> None:
    docs = Response.docs()
    # response_model is folded into `model`; the model sent becomes `requested_model`
    assert set(EXPORT_COLUMNS) == set(docs) - {"response_model"} | {"requested_model"}
    reshaped = {"messages", "model", "requested_model", "meta", "params", "logprobs"}
    for name, (_, doc) in EXPORT_COLUMNS.items():
        if name not in reshaped:
            assert doc == docs[name], name
    assert EXPORT_COLUMNS["requested_model"][1] == docs["model"]
    assert EXPORT_COLUMNS["sample_index"][0] == "int64"
    assert EXPORT_COLUMNS["cost_usd"][0] == "float64"


def test_a_store_of_the_first_schema_opens_and_keeps_its_rows(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / STORE_FILE)
    db.executescript(MIGRATIONS[0] + "; PRAGMA user_version=1;")
    row = {c: None for c in Response.columns()}
    row.update(
        key="k",
        prompt_id="p",
        sample_index=0,
        teacher="t",
        base_url="http://x/v1",
        model="m",
        params_hash="h",
        params="{}",
        messages='[{"role":"user","content":"hi"}]',
        response="hello",
        cost_usd=0.0,
        attempts=1,
        created_at="2026-01-01T00:00:00.000Z",
        source="online",
    )
    db.execute(
        f"INSERT INTO responses ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
        list(row.values()),
    )
    db.commit()
    db.close()
    with Store(tmp_path, readonly=True) as st:  # read as it is, no migration
        assert [r.response for r in st.iter_responses()] == ["hello"]
        assert st.batches() == []
    with Store(tmp_path) as st:  # opened for a harvest: migrated, rows kept
        assert [(r.key, r.messages) for r in st.iter_responses()] == [
            ("k", [{"role": "user", "content": "hi"}])
        ]
        assert st.batches() == [] and st.keys_in_open_batches() == set()
        # migration 4 backfills each prompt id's text from its rows
        assert st.prompt_hashes() == {"p": content_hash([{"role": "user", "content": "hi"}])}


# -- a store that is not what it should be is refused, untouched, in one line -----------------


def _harvested(server: OpenAIServer, tmp_path: Path, n: int = 60) -> tuple[Path, Path]:
    prompts = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(n))
    run = tmp_path / "run"
    proc = run_cli(*harvest_args(server, prompts, run))
    assert proc.returncode == 0, proc.stderr
    return prompts, run


def test_a_foreign_sqlite_file_is_refused_untouched(server: OpenAIServer, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    db = sqlite3.connect(run / STORE_FILE)
    db.executescript(
        "CREATE TABLE contacts (name TEXT, phone TEXT); INSERT INTO contacts VALUES ('a', '1');"
    )
    db.close()
    before = (run / STORE_FILE).read_bytes()
    prompts = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(3))
    proc = run_cli(*harvest_args(server, prompts, run))
    assert_one_line_error(proc, str(run / STORE_FILE), "another application", "contacts")
    assert (run / STORE_FILE).read_bytes() == before and server.requests == 0
    assert not (run / "harvest.log").exists()  # not harvest's folder: no log written into it
    proc = run_cli("export", str(run), "--to", str(tmp_path / "out"), "--format", "jsonl")
    assert_one_line_error(proc, "another application", "pass a distill run directory")


def test_a_responses_table_of_another_shape_is_refused_untouched(
    server: OpenAIServer, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    db = sqlite3.connect(run / STORE_FILE)
    db.executescript("CREATE TABLE responses (key TEXT, answer TEXT); PRAGMA user_version=1;")
    db.close()
    before = (run / STORE_FILE).read_bytes()
    prompts = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(3))
    assert_one_line_error(run_cli(*harvest_args(server, prompts, run)), "not distill's")
    build = run_cli("build", str(run), "--to", str(tmp_path / "ds"))  # build has no --out
    assert_one_line_error(build, "not distill's", "pass a distill run directory")
    assert (run / STORE_FILE).read_bytes() == before and server.requests == 0


def test_an_emptied_or_lost_store_is_not_silently_a_new_one(
    server: OpenAIServer, tmp_path: Path
) -> None:
    prompts, run = _harvested(server, tmp_path, 5)
    (run / STORE_FILE).write_bytes(b"")  # a disk that lost the file's content
    sent = server.requests
    proc = run_cli(*harvest_args(server, prompts, run))
    assert_one_line_error(proc, str(run / STORE_FILE), "empty", "harvest.log", "new --out")
    (run / STORE_FILE).unlink()
    assert_one_line_error(run_cli(*harvest_args(server, prompts, run)), "missing")
    assert server.requests == sent and not (run / STORE_FILE).exists()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / STORE_FILE).write_bytes(b"")  # no history: a new store
    assert run_cli(*harvest_args(server, prompts, fresh)).returncode == 0


def _damage_a_response_page(path: Path) -> None:
    db = sqlite3.connect(path)
    pages = [
        r[0]
        for r in db.execute(
            "SELECT pageno FROM dbstat WHERE name = 'responses' AND pagetype = 'leaf'"
        )
    ]
    db.close()
    data = bytearray(path.read_bytes())
    start = (pages[len(pages) // 2] - 1) * 4096
    data[start + 8 : start + 600] = b"\xa5" * 592
    path.write_bytes(bytes(data))


def test_a_damaged_store_is_never_reported_done_and_doctor_recovers_it(
    server: OpenAIServer, tmp_path: Path
) -> None:
    prompts, run = _harvested(server, tmp_path)
    _damage_a_response_page(run / STORE_FILE)
    sent = server.requests
    proc = run_cli(*harvest_args(server, prompts, run))  # was: "60/60 done", exit 0
    assert_one_line_error(proc, str(run / STORE_FILE), f"distill doctor {run}")
    assert proc.returncode == 1 and server.requests == sent
    last = (run / "harvest.log").read_text().splitlines()[-1]  # from cron: not a hang
    assert "harvest failed" in last and "distill doctor" in last and "(exit 1)" in last
    for cmd in (
        ["export", str(run), "--to", str(tmp_path / "e"), "--format", "jsonl"],
        ["build", str(run), "--to", str(tmp_path / "ds")],
        ["batch", "status", str(run)],  # reads only the batches table: was exit 0
    ):
        assert_one_line_error(run_cli(*cmd), "damaged", f"distill doctor {run}")

    proc = run_cli("doctor", str(run))
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    assert "--replace" in proc.stderr and (run / "store.recovered.sqlite").is_file()
    proc = run_cli("doctor", str(run), "--replace")
    assert proc.returncode == 0 and "damaged file is kept" in proc.stderr, proc.stderr
    proc = run_cli(*harvest_args(server, prompts, run))  # re-asks only what was lost
    assert proc.returncode == 0, proc.stderr
    lost = server.requests - sent
    assert 0 < lost < 60
    assert run_cli("doctor", str(run)).returncode == 0


def test_a_path_with_full_in_its_name_is_not_a_full_disk(tmp_path: Path) -> None:
    """An OSError's text carries its file name: only its errno says what went wrong."""
    with pytest.raises(StoreError) as e:
        RunLock(tmp_path / "fullrun").acquire()  # no such folder
    assert "disk full" not in str(e.value) and "No such file" in str(e.value)


def test_rollout_reads_fail_in_one_line_like_every_read(tmp_path: Path) -> None:
    with Store(tmp_path / "run") as st:
        st.db.execute("DROP TABLE rollouts")  # what a damaged page can look like to a query
        for read in (lambda: st.rollouts("train"), st.rollout_totals):
            with pytest.raises(StoreError, match="distill doctor"):
                read()
