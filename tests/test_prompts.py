"""Prompt files in every format, ids, templates, duplicates, and the errors for bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.prompts import load_prompts
from tests.conftest import assert_one_line_error, harvest_args, run_cli, write_jsonl
from tests.openai_server import OpenAIServer

ROWS = [
    {"id": "a", "prompt": "What is 1 + 2?", "reference": "3"},
    {"prompt": "What is 2 + 2?", "reference": 4, "meta": {"level": "easy"}},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
]


def _check(rows: list) -> None:
    assert [r.messages[-1]["content"] for r in rows] == ["What is 1 + 2?", "What is 2 + 2?", "Hi"]
    assert rows[0].id == "a" and rows[0].reference == "3"
    assert rows[1].reference == "4"
    assert rows[2].messages[0] == {"role": "system", "content": "Be brief."}


def test_jsonl_json_csv_parquet_txt_and_dataset_folder(tmp_path: Path) -> None:
    _check(load_prompts([write_jsonl(tmp_path / "p.jsonl", ROWS)])[0])
    (tmp_path / "p.json").write_text(json.dumps(ROWS))
    _check(load_prompts([tmp_path / "p.json"])[0])

    (tmp_path / "p.csv").write_text(
        'id,prompt,reference,level\nx,"What is 1, really?",1,easy\ny,Two?,,hard\n'
    )
    rows, _ = load_prompts([tmp_path / "p.csv"])
    assert [r.id for r in rows] == ["x", "y"]
    assert rows[0].messages[-1]["content"] == "What is 1, really?" and rows[0].meta == {
        "level": "easy"
    }
    assert rows[1].reference is None

    pq.write_table(
        pa.Table.from_pylist(
            [{"prompt": "P1", "reference": "1"}, {"prompt": "P2", "reference": "2"}]
        ),
        tmp_path / "p.parquet",
    )
    rows, _ = load_prompts([tmp_path / "p.parquet"])
    assert [r.messages[0]["content"] for r in rows] == ["P1", "P2"]

    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    rows, _ = load_prompts([tmp_path / "p.txt"])
    assert [r.messages[0]["content"] for r in rows] == ["first prompt", "second prompt"]

    datasets.Dataset.from_list([{"prompt": "D1", "reference": "r"}]).save_to_disk(
        str(tmp_path / "ds")
    )
    rows, _ = load_prompts([tmp_path / "ds"])
    assert rows[0].messages[0]["content"] == "D1" and rows[0].reference == "r"


def test_ids_are_stable_content_hashes_and_duplicates_are_dropped(tmp_path: Path) -> None:
    f1 = write_jsonl(
        tmp_path / "a.jsonl", [{"prompt": "same"}, {"prompt": "other"}, {"prompt": "same"}]
    )
    f2 = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "other"}, {"prompt": "new"}])
    rows, dropped = load_prompts([f1, f2])
    assert [r.messages[0]["content"] for r in rows] == ["same", "other", "new"]
    assert dropped == 2
    again, _ = load_prompts([f1, f2])
    assert [r.id for r in rows] == [r.id for r in again]
    assert len({r.id for r in rows}) == 3
    # The id does not depend on the template: the same question keeps its id.
    templated, _ = load_prompts([f1], user_template="Q: {prompt}")
    assert templated[0].id == rows[0].id and templated[0].messages[0]["content"] == "Q: same"


def test_system_prompt_template_and_limit(tmp_path: Path) -> None:
    f = write_jsonl(
        tmp_path / "p.jsonl",
        [{"question": "q1", "meta": {"unit": "cm"}}, {"question": "q2", "meta": {"unit": "m"}}],
    )
    rows, _ = load_prompts(
        [f], system_prompt="SYS", user_template="Solve {question} in {unit}", limit=1
    )
    assert len(rows) == 1
    assert rows[0].messages == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Solve q1 in cm"},
    ]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"prompt": "ok"}\n{"prompt": broken}\n', "p.jsonl:2: invalid JSON"),
        (
            '{"prompt": "ok"}\n{"prompt": "cut off',
            "p.jsonl:2: invalid JSON (Unterminated string starting at column 12)",
        ),
        (
            '{"prompt": "ok"}\n{"text": "no prompt"}\n',
            "p.jsonl:2: row has neither 'prompt' nor 'messages'",
        ),
        ('{"messages": [{"role": "robot", "content": "x"}]}\n', "p.jsonl:1: messages[0]"),
        ("", "no prompts found"),
        ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "prompt id 'a' is also used"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, content: str, needle: str) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(InputError) as e:
        load_prompts([f])
    assert needle in str(e.value)
    assert "\n" not in str(e.value) and "at at" not in str(e.value)


def test_missing_file_and_missing_template_field(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="prompt file not found"):
        load_prompts([tmp_path / "nope.jsonl"])
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    with pytest.raises(InputError, match=r"p.jsonl:1: user template uses \{question\}"):
        load_prompts([f], user_template="{question}")


@pytest.mark.parametrize("name", ["prompts", "prompts.yaml", "prompts.data"])
def test_a_format_the_name_does_not_say_is_read_by_content(tmp_path: Path, name: str) -> None:
    jsonl = write_jsonl(tmp_path / name, ROWS)  # was: each JSON line sent as a text prompt
    _check(load_prompts([jsonl])[0])
    jsonl.write_text(json.dumps(ROWS, indent=2))
    _check(load_prompts([jsonl])[0])
    jsonl.write_text("id,prompt,reference\na,What is 1 + 2?,3\n")
    rows, _ = load_prompts([jsonl])
    assert rows[0].id == "a" and rows[0].messages[-1]["content"] == "What is 1 + 2?"
    pq.write_table(pa.Table.from_pylist([{"prompt": "P1"}, {"prompt": "P2"}]), jsonl)
    rows, _ = load_prompts([jsonl])
    assert [r.messages[-1]["content"] for r in rows] == ["P1", "P2"]


def test_content_that_is_no_prompt_format_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "config.yaml"
    f.write_text("harvest:\n  model: gpt\n")
    with pytest.raises(InputError) as e:
        load_prompts([f])
    assert str(f) in str(e.value) and ".jsonl" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "plain.txt").write_text('{"id": 1}\n')  # a name that says text is read as text
    rows, _ = load_prompts([tmp_path / "plain.txt"])
    assert rows[0].messages[0]["content"] == '{"id": 1}'


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt", ""])
def test_a_utf8_byte_order_mark_is_accepted_everywhere(tmp_path: Path, suffix: str) -> None:
    body = {
        ".jsonl": "".join(json.dumps(r) + "\n" for r in ROWS),
        ".json": json.dumps(ROWS),
        ".csv": "id,prompt,reference\na,What is 1 + 2?,3\n",
        ".txt": "What is 1 + 2?\n",
        "": "".join(json.dumps(r) + "\n" for r in ROWS),
    }[suffix]
    f = tmp_path / f"bom{suffix}"
    f.write_bytes(b"\xef\xbb\xbf" + body.encode())  # was: JSONL with a BOM rejected
    rows, _ = load_prompts([f])
    assert rows[0].messages[-1]["content"] == "What is 1 + 2?"
    if suffix in (".jsonl", ".json", ".csv", ""):
        assert rows[0].id == "a"  # the first column's name is not "\ufeffid"


def test_harvest_refuses_a_file_of_no_prompt_format_before_sending(
    server: OpenAIServer, tmp_path: Path
) -> None:
    f = tmp_path / "harvest.yaml"
    f.write_text("harvest:\n  model: gpt\n")  # passed to --prompts by mistake
    proc = run_cli(*harvest_args(server, f, tmp_path / "run"))
    assert_one_line_error(proc, str(f), "cannot tell its format")
    assert proc.returncode == 2 and server.requests == 0  # was: each line paid for as a prompt


@pytest.mark.parametrize("chunk", [1, 2, 3, 2000])
def test_duplicates_conflicts_and_reused_ids_across_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    # The reader checks rows a chunk at a time against a temporary SQLite file: whatever the
    # chunk size, the same rows, drops, conflicts and errors as one pass over everything.
    monkeypatch.setattr("pipeline.prompts.CHUNK", chunk)
    f = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"id": "x", "prompt": "one"},
            {"id": "y", "prompt": "two"},
            {"id": "x", "prompt": "one"},  # an exact repeat: dropped
            {"id": "z", "prompt": "two"},  # the same text under another id: a conflict
            {"id": "w", "prompt": "three"},
            {"prompt": "three", "reference": "3"},  # same text, another reference
        ],
    )
    conflicts: list[str] = []
    rows, dropped = load_prompts([f], conflicts=conflicts)
    assert [r.id for r in rows] == ["x", "y", "w"] and dropped == 3
    assert len(conflicts) == 2 and "p.jsonl:4" in conflicts[0] and "p.jsonl:2" in conflicts[0]
    assert [r.id for r in load_prompts([f], limit=2)[0]] == ["x", "y"]
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"id": "x", "prompt": "one"}, {"id": "y", "prompt": "two"}, {"id": "x", "prompt": "new"}],
    )
    with pytest.raises(InputError, match=r"bad.jsonl:3: prompt id 'x' .* at .*bad.jsonl:1"):
        load_prompts([bad])
    # a row dropped as a duplicate of another id's text still may not reuse an id
    reuse = write_jsonl(
        tmp_path / "reuse.jsonl",
        [{"id": "x", "prompt": "one"}, {"id": "y", "prompt": "two"}, {"id": "x", "prompt": "two"}],
    )
    with pytest.raises(InputError, match=r"reuse.jsonl:3: prompt id 'x'"):
        load_prompts([reuse])
