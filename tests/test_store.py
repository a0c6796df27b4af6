"""The store's schema and the export columns come from the one record, `Response`."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pipeline.export import EXPORT_COLUMNS
from pipeline.record import Response
from pipeline.store import MIGRATIONS, STORE_FILE, Store


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
