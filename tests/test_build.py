"""`distill build`: curation of real stores written by the harvester against the test server."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pipeline.artifacts import fingerprint
from pipeline.build import FILTERS, BuildConfig, build, split_prompts
from pipeline.cli import cli
from pipeline.errors import ConfigError, InputError, StoreError
from pipeline.harvest import HarvestConfig, harvest
from pipeline.store import Store
from tests.openai_server import OpenAIServer

SYSTEM = "You are a careful calculator."
N_ARITH = 12  # prompts Q0..Q11 with references; Q12 is rejected by the server; two free prompts


def good(n: int, i: int, a: int, b: int) -> str:
    total = f"{a + b:,}"
    return f"Step {i}: I add {a} and {b} carefully, variant {i}, to get {total}. The answer is {total}."


def responder(body: dict[str, Any], i: int) -> dict[str, Any]:
    """Scripted answers: which sample of which prompt is wrong, cut off, refused, duplicated..."""
    user = body["messages"][-1]["content"]
    m = re.match(r"Q(\d+): What is (\d+) \+ (\d+)\?", user)
    if not m:  # the free prompts (no reference)
        return {"content": f"Cats sleep a lot, fact number {i} of many facts about cats."}
    n, a, b = int(m.group(1)), int(m.group(2)), int(m.group(3))
    text = good(n, i, a, b)
    if n == 1 and i == 1:
        text = f"I add {a} and {b} and get {a + b + 1}. The answer is {a + b + 1}."  # wrong
    if n == 2 and i == 0:
        return {"content": f"Step 0: I add {a} and", "finish_reason": "length"}  # cut off
    if n == 3 and i == 2:
        text = "I'm sorry, but I can't help with that."
    if n == 4 and i == 1:
        text = good(n, 0, a, b)  # exact duplicate of sample 0
    if n == 5 and i == 2:
        text = good(n, 0, a, b) + " Indeed."  # near-duplicate of sample 0
    if n == 6 and i == 0:
        text = ""
    if n == 7 and i == 1:
        text = f"{a} + {b}: so the result is \\boxed{{{a + b}}}"
    if n == 7 and i == 2:
        text = "Hmm, I am not sure about this one."  # no final answer at all
    if n == 8:
        return {
            "content": text,
            "reasoning": f"Think {i}: {a} plus {b}.",
            "shape": "reasoning_content",
        }
    if n == 10 and i == 2:
        text = f"That makes {a + b} apples"
    return {"content": text}


def prompt_rows() -> list[dict[str, Any]]:
    rows = []
    for n in range(N_ARITH):
        a, b = (1000 * n + 234, 1000) if n == 9 else (n + 2, 3 * n + 1)
        rows.append(
            {"id": f"q{n:02d}", "prompt": f"Q{n}: What is {a} + {b}?", "reference": str(a + b)}
        )
    rows.append({"id": "q12", "prompt": "Q12: REJECT me", "reference": "0"})
    rows.append({"id": "free0", "prompt": "Tell me a fact about cats."})
    rows.append({"id": "free1", "prompt": "Tell me another fact about cats."})
    return rows


# The counts the script above must produce (3 samples per prompt).
EXPECTED = {
    "failed": 3,  # Q12's three samples
    "replaced_prompt": 0,
    "unfinished": 1,
    "empty": 1,
    "refusal": 1,
    "length": 0,
    "verify": 2,  # Q1 wrong, Q7 no final answer
    "custom": 0,
    "duplicate": 1,
    "near_duplicate": 1,
    "not_selected": 0,
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("build_run")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows()), encoding="utf-8")
    with OpenAIServer() as srv:
        srv.responder = responder
        srv.reject = lambda body: (
            "bad prompt" if "REJECT" in body["messages"][-1]["content"] else None
        )
        summary = harvest(
            HarvestConfig(
                prompts=[prompts],
                out=root / "run",
                base_url=srv.url,
                model="t",
                samples=3,
                system_prompt=SYSTEM,
                max_retries=0,
            ),
            pretty=False,
        )
    assert summary.completed == 42 and summary.failed == 3
    return root / "run"


def do_build(run_dir: Path, to: Path, **kw: Any) -> tuple[dict[str, Any], Any]:
    import datasets

    build(BuildConfig(run=run_dir, to=to, **kw))
    report = json.loads((to / "build_report.json").read_text())
    ds = datasets.load_from_disk(str(to)) if (to / "dataset_dict.json").exists() else None
    return report, ds


def all_rows(ds: Any) -> list[dict[str, Any]]:
    return list(ds["train"]) + list(ds["eval"])


def test_report_accounts_for_every_row(run_dir: Path, tmp_path: Path) -> None:
    report, ds = do_build(run_dir, tmp_path / "out")
    assert report["removed"] == EXPECTED
    assert list(report["removed"]) == list(FILTERS)  # the documented order
    assert report["responses"] == 42 and report["rows_in"] == 45
    assert report["kept"] == 45 - sum(EXPECTED.values()) == 35
    assert report["rows_in"] == sum(report["removed"].values()) + report["kept"]
    assert report["reasons"]["unfinished"] == {"finish_reason length": 1}
    assert report["reasons"]["verify"] == {"no final answer found": 1, "wrong answer": 1}
    assert report["reasons"]["failed"] == {"HTTP 400": 3}
    assert report["prompts"] == {"in_store": 15, "kept": 14, "lost": 1}
    assert report["split"]["train_rows"] + report["split"]["eval_rows"] == 35
    assert report["verified"] == {"true": 29, "false": 0, "none": 6}

    rows = all_rows(ds)
    assert len(rows) == 35
    got = {(r["prompt_id"], r["sample_index"]) for r in rows}
    for gone in [
        ("q01", 1),
        ("q02", 0),
        ("q03", 2),
        ("q04", 1),
        ("q05", 2),
        ("q06", 0),
        ("q07", 2),
    ]:
        assert gone not in got
    assert ("q07", 1) in got  # \boxed{} answer verified
    assert ("q09", 0) in got  # "1,234" style thousands separators verified
    assert ("q10", 2) in got  # trailing unit verified
    with Store(run_dir, readonly=True) as store:
        keys = {s.key: asdict(s) for s in store.iter_responses()}
    for r in rows:
        s = keys[r["key"]]
        assert (s["prompt_id"], s["sample_index"], s["teacher"]) == (
            r["prompt_id"],
            r["sample_index"],
            r["teacher"],
        )
        assert r["verified"] is (None if s["reference"] is None else True)
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        assert r["messages"][0]["content"] == SYSTEM
    card = (tmp_path / "out" / "README.md").read_text()
    assert (
        "terms of use" in card
        and "| near_duplicate | 1 |" in card
        and "| **kept** | **35** |" in card
    )


def test_verify_off_keeps_wrong_answers_flagged(run_dir: Path, tmp_path: Path) -> None:
    report, ds = do_build(run_dir, tmp_path / "out", filters={"verify": False})
    assert report["removed"]["verify"] == 0 and report["kept"] == 37
    flagged = {(r["prompt_id"], r["sample_index"]) for r in all_rows(ds) if r["verified"] is False}
    assert flagged == {("q01", 1), ("q07", 2)}


def test_filters_can_be_switched_off(run_dir: Path, tmp_path: Path) -> None:
    off = dict.fromkeys(["unfinished", "empty", "refusal", "duplicate", "near_duplicate"], False)
    report, _ = do_build(run_dir, tmp_path / "out", filters=off)
    # The cut-off, empty and refused answers and the wrong ones now all fall to verification.
    assert report["removed"]["verify"] == 5 and report["removed"]["refusal"] == 0
    assert report["reasons"]["verify"] == {"no final answer found": 3, "wrong answer": 2}
    assert report["kept"] == 42 - 5

    report, ds = do_build(run_dir, tmp_path / "none", filters={**off, "verify": False})
    assert report["kept"] == 42 and report["removed"] == {**dict.fromkeys(FILTERS, 0), "failed": 3}
    assert any("can't help" in r["messages"][-1]["content"] for r in all_rows(ds))


def test_split_by_prompt_leaks_nothing_and_is_seeded(run_dir: Path, tmp_path: Path) -> None:
    report, ds = do_build(run_dir, tmp_path / "a", eval_size=4, seed=7)
    train_ids = set(ds["train"]["prompt_id"])
    eval_ids = set(ds["eval"]["prompt_id"])
    assert len(eval_ids) == 4 and not train_ids & eval_ids
    assert report["split"]["eval_prompts"] == 4 and report["split"]["train_prompts"] == 10
    # Every sample of an eval prompt is in eval.
    assert sum(1 for r in all_rows(ds) if r["prompt_id"] in eval_ids) == len(ds["eval"])

    ids = [f"p{i}" for i in range(200)]
    cfg = BuildConfig(eval_fraction=0.1, seed=1)
    chosen = split_prompts(ids, cfg)
    assert 10 <= len(chosen) <= 30  # a threshold on the hash: about 10%, not exactly
    assert split_prompts(list(reversed(ids)) + ids[:50], cfg) == chosen  # row order plays no part
    assert split_prompts(ids, BuildConfig(eval_fraction=0.1, seed=2)) != chosen
    assert len(split_prompts(ids, BuildConfig(eval_size=5, seed=1))) == 5  # eval_size: a count
    with pytest.raises(ConfigError, match="nothing would be left to train on"):
        split_prompts(["only"], BuildConfig(eval_size=3))  # refused, not silently one train prompt


def test_split_stays_put_when_prompts_are_added_or_filtered(run_dir: Path, tmp_path: Path) -> None:
    """A prompt's split is a function of (seed, prompt id, eval_fraction) alone."""
    cfg = BuildConfig(eval_fraction=0.1, seed=3)
    first = [f"p{i}" for i in range(200)]
    before = split_prompts(first, cfg)
    # 200 more prompts, then a filter drops every 7th prompt of the lot (a rank-based split
    # moved 3 of the earlier prompts here).
    grown = [p for i, p in enumerate(first + [f"n{i}" for i in range(200)]) if i % 7]
    after = split_prompts(grown, cfg)
    kept_earlier = [p for p in grown if p in set(first)]
    assert len(kept_earlier) == 171 and before & set(kept_earlier)
    assert [p for p in kept_earlier if (p in before) != (p in after)] == []
    # The same through `distill build`: switching filters off brings back prompts, moves none.
    _, ds = do_build(run_dir, tmp_path / "a", eval_fraction=0.3, seed=5)
    _, ds_all = do_build(
        run_dir,
        tmp_path / "b",
        eval_fraction=0.3,
        seed=5,
        filters=dict.fromkeys(
            ["unfinished", "empty", "refusal", "verify", "duplicate", "near_duplicate"], False
        ),
    )
    assert set(ds["eval"]["prompt_id"]) <= set(ds_all["eval"]["prompt_id"])
    assert set(ds["train"]["prompt_id"]) <= set(ds_all["train"]["prompt_id"])
    # Each split's prompt ids are recorded, with a fingerprint in the report.
    recorded = json.loads((tmp_path / "a" / "splits.json").read_text())
    assert recorded == {
        "train": sorted(set(ds["train"]["prompt_id"])),
        "eval": sorted(set(ds["eval"]["prompt_id"])),
    }
    report = json.loads((tmp_path / "a" / "build_report.json").read_text())
    assert report["split"]["eval_fingerprint"] == fingerprint(recorded["eval"])


def _one_answer_run(tmp_path: Path, server: OpenAIServer, rows: list[dict[str, Any]]) -> Path:
    """A run whose teacher answers each prompt with the text in the prompt after 'say: '."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    server.responder = lambda body, i: {
        "content": body["messages"][-1]["content"].split("say: ", 1)[1]
    }
    harvest(
        HarvestConfig(prompts=[prompts], out=tmp_path / "run", base_url=server.url, model="t"),
        pretty=False,
    )
    return tmp_path / "run"


def test_verify_mode_and_tolerances_reach_the_verifier(
    tmp_path: Path, server: OpenAIServer
) -> None:
    rows = [
        {"id": "near", "prompt": "say: The answer is 0.52.", "reference": "0.5"},
        {"id": "city", "prompt": "say: The answer is Paris.", "reference": "Paris"},
        {"id": "letter", "prompt": "say: The answer is (B).", "reference": "B"},
        {"id": "root", "prompt": "say: The answer is $2\\sqrt{2}$.", "reference": "\\sqrt{8}"},
        {"id": "free", "prompt": "say: Cats sleep a lot."},
    ]
    run = _one_answer_run(tmp_path, server, rows)
    report, ds = do_build(run, tmp_path / "strict", eval_size=0)
    assert report["reasons"]["verify"] == {"wrong answer": 1}  # 0.52 is not 0.5
    assert report["verification"]["rows_without_reference"] == 1  # counted, not fatal
    assert report["verification"]["mode"] == "auto"
    report, _ = do_build(run, tmp_path / "loose", eval_size=0, rel_tol=0.05)
    assert report["removed"]["verify"] == 0 and report["verified"]["true"] == 4
    # text: no math-verify, so 2\sqrt{2} is not \sqrt{8}; numbers still compare within rel_tol
    report, _ = do_build(run, tmp_path / "text", eval_size=0, verify="text", rel_tol=0.05)
    assert report["removed"]["verify"] == 1
    # a custom check, from a file
    fn = tmp_path / "check.py"
    fn.write_text("def same(answer, reference):\n    return answer.endswith(reference + '.')\n")
    report, _ = do_build(run, tmp_path / "custom", eval_size=0, verify=f"{fn}:same")
    assert report["removed"]["verify"] == 3  # only "... Paris." ends in its reference + "."
    # math on a text reference: one line naming the prompt, nothing written
    with pytest.raises(ConfigError, match=r"^prompt city: verify 'math'"):
        build(BuildConfig(run=run, to=tmp_path / "math", verify="math"))
    assert not (tmp_path / "math").exists()
    with pytest.raises(ValueError, match="verify 'fuzzy'"):
        BuildConfig(verify="fuzzy")
    with pytest.raises(ValueError, match="needs answer_patterns"):
        BuildConfig(verify="regex")


def test_reasoning_modes(run_dir: Path, tmp_path: Path) -> None:
    _, inline = do_build(run_dir, tmp_path / "inline", eval_fraction=0.0)
    by = {(r["prompt_id"], r["sample_index"]): r for r in all_rows(inline)}
    assert by[("q08", 1)]["messages"][-1]["content"] == (
        "<think>\nThink 1: 10 plus 25.\n</think>\n\n" + good(8, 1, 10, 25)
    )
    without = [r for k, r in by.items() if k[0] != "q08"]
    assert without and all("<think>" not in r["messages"][-1]["content"] for r in without)

    _, sep = do_build(run_dir, tmp_path / "separate", reasoning="separate", eval_fraction=0.0)
    rows = all_rows(sep)
    assert all("reasoning_content" in m for r in rows for m in r["messages"])
    by = {(r["prompt_id"], r["sample_index"]): r for r in rows}
    assistant = by[("q08", 1)]["messages"][-1]
    assert assistant["reasoning_content"] == "Think 1: 10 plus 25." and assistant[
        "content"
    ] == good(8, 1, 10, 25)
    assert by[("q00", 0)]["messages"][-1]["reasoning_content"] is None
    assert by[("q00", 0)]["messages"][0]["reasoning_content"] is None

    _, dropped = do_build(run_dir, tmp_path / "drop", reasoning="drop", eval_fraction=0.0)
    rows = all_rows(dropped)
    assert all(
        "<think>" not in m["content"] and "reasoning_content" not in m
        for r in rows
        for m in r["messages"]
    )
    assert any(r["messages"][-1]["content"] == good(8, 1, 10, 25) for r in rows)


def test_drop_system(run_dir: Path, tmp_path: Path) -> None:
    _, ds = do_build(run_dir, tmp_path / "out", drop_system=True)
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in all_rows(ds))


def test_select_first_and_best(run_dir: Path, tmp_path: Path) -> None:
    report, ds = do_build(run_dir, tmp_path / "first", select="first", per_prompt=1)
    rows = all_rows(ds)
    assert len(rows) == 14 == len({r["prompt_id"] for r in rows})
    assert report["removed"]["not_selected"] == 35 - 14
    assert {r["sample_index"] for r in rows if r["prompt_id"] == "q02"} == {
        1
    }  # sample 0 was cut off

    # best: with verification off, the verified answer wins over the (shorter) wrong one.
    report, ds = do_build(
        run_dir, tmp_path / "best", select="best", per_prompt=1, filters={"verify": False}
    )
    best = {r["prompt_id"]: r for r in all_rows(ds)}
    assert best["q01"]["verified"] is True and best["q07"]["verified"] is True
    assert best["q07"]["sample_index"] == 1  # the \boxed{} answer: verified and shortest
    assert report["rows_in"] == sum(report["removed"].values()) + report["kept"]


def test_length_bounds_in_characters_and_tokens(run_dir: Path, tmp_path: Path) -> None:
    from tests.tinymodels import make_tokenizer

    report, ds = do_build(run_dir, tmp_path / "chars", max_answer_length=60)
    assert report["lengths"]["unit"] == "characters"
    assert report["removed"]["length"] > 0
    assert all(len(r["messages"][-1]["content"]) <= 60 for r in all_rows(ds))
    assert report["lengths"]["answer"]["max"] <= 60

    tok_dir = tmp_path / "tok"
    tok = make_tokenizer(tok_dir)
    report, ds = do_build(
        run_dir, tmp_path / "tokens", tokenizer=tok_dir, max_answer_length=20, eval_fraction=0
    )
    assert report["lengths"]["unit"].startswith("tokens")
    lengths = [
        len(tok(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"])
        for r in all_rows(ds)
    ]
    assert lengths and max(lengths) <= 20
    # Length runs before verification and deduplication: it sees every row the first three pass.
    assert report["removed"]["length"] == 42 - 3 - len(lengths)

    report, _ = do_build(run_dir, tmp_path / "reason", min_reasoning_length=1)
    assert report["kept"] == 3  # only Q8 has reasoning
    assert report["reasons"]["length"] == {"reasoning shorter than 1": 39 - 3}


def test_custom_filter_from_a_file(run_dir: Path, tmp_path: Path) -> None:
    hook = tmp_path / "my_filter.py"
    hook.write_text(
        "def keep(row):\n"
        "    if row['prompt_id'] == 'free0':\n"
        "        return 'off topic'\n"
        "    return row['sample_index'] != 2 or row['verified'] is not True\n",
        encoding="utf-8",
    )
    report, ds = do_build(run_dir, tmp_path / "out", custom_filter=f"{hook}:keep")
    # free0 loses its 3 samples; every other verified sample 2 that reached the hook goes.
    assert report["reasons"]["custom"]["off topic"] == 3
    assert report["removed"]["custom"] == 3 + report["reasons"]["custom"]["rejected"]
    assert not any(r["prompt_id"] == "free0" for r in all_rows(ds))
    assert not any(r["sample_index"] == 2 and r["verified"] for r in all_rows(ds))
    assert report["rows_in"] == sum(report["removed"].values()) + report["kept"]


def test_other_formats(run_dir: Path, tmp_path: Path) -> None:
    import datasets

    build(BuildConfig(run=run_dir, to=tmp_path / "pq", format="parquet", eval_fraction=0.3))
    pq = datasets.load_dataset(
        "parquet", data_files={s: str(tmp_path / "pq" / f"{s}.parquet") for s in ("train", "eval")}
    )
    assert len(pq["train"]) + len(pq["eval"]) == 35 and "messages" in pq["train"].column_names

    build(BuildConfig(run=run_dir, to=tmp_path / "jl", format="jsonl", reasoning="separate"))
    rows = [json.loads(x) for x in (tmp_path / "jl" / "train.jsonl").read_text().splitlines()]
    assert {
        "messages",
        "prompt_id",
        "teacher",
        "verified",
        "key",
        "reference",
        "sample_index",
    } == set(rows[0])

    build(BuildConfig(run=run_dir, to=tmp_path / "sg", format="sharegpt"))
    convs = [
        json.loads(x)["conversations"]
        for x in (tmp_path / "sg" / "train.jsonl").read_text().splitlines()
    ]
    assert all([t["from"] for t in c] == ["system", "human", "gpt"] for c in convs)
    info = json.loads((tmp_path / "sg" / "dataset_info.json").read_text())
    assert info["distill_train"]["formatting"] == "sharegpt"

    build(BuildConfig(run=run_dir, to=tmp_path / "oa", format="openai", drop_system=True))
    lines = (tmp_path / "oa" / "train.jsonl").read_text().splitlines()
    assert all(list(json.loads(x)) == ["messages"] for x in lines)
    assert all(
        [m["role"] for m in json.loads(x)["messages"]] == ["user", "assistant"] for x in lines
    )

    with pytest.raises(ConfigError, match="sharegpt"):
        build(BuildConfig(run=run_dir, to=tmp_path / "x", format="sharegpt", reasoning="separate"))


def _tree(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def test_rebuild_is_byte_identical_and_store_untouched(run_dir: Path, tmp_path: Path) -> None:
    before = _tree(run_dir)
    out = tmp_path / "out"
    do_build(run_dir, out, reasoning="separate")
    first = _tree(out)
    assert {
        "README.md",
        "build_report.json",
        "dataset_dict.json",
        "train/data-00000-of-00001.arrow",
    } <= set(first)
    do_build(run_dir, out, reasoning="separate")  # replaces the earlier build in place
    assert _tree(out) == first
    shutil.copytree(out, tmp_path / "copy")
    do_build(run_dir, tmp_path / "elsewhere", reasoning="separate")
    assert _tree(tmp_path / "elsewhere") == first  # the output path is not written into the files
    assert _tree(run_dir) == before


def test_bad_input_is_one_line_and_no_traceback(run_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    cfgs = {
        "unknown_filter.yaml": "build:\n  filters:\n    spelling: false\n",
        "bad_regex.yaml": "build:\n  answer_patterns: ['(unclosed']\n",
        "bad_refusal.yaml": "build:\n  refusal_patterns: ['[a-']\n",
        "bad_hook.yaml": "build:\n  custom_filter: no_such_module_xyz:keep\n",
        "bad_hook_file.yaml": "build:\n  custom_filter: /nowhere/f.py:keep\n",
    }
    for name, text in cfgs.items():
        (tmp_path / name).write_text(text)
    not_ours = tmp_path / "not_ours"
    not_ours.mkdir()
    (not_ours / "precious.txt").write_text("keep me")

    def with_config(name: str) -> list[str]:
        return [
            "build",
            str(run_dir),
            "--to",
            str(tmp_path / "o"),
            "--config",
            str(tmp_path / name),
        ]

    cases = [
        (
            ["build", str(tmp_path / "missing"), "--to", str(tmp_path / "o")],
            "run directory not found",
        ),
        (["build", str(tmp_path / "empty"), "--to", str(tmp_path / "o")], "no harvest store here"),
        (with_config("unknown_filter.yaml"), "unknown filter 'spelling'"),
        (with_config("bad_regex.yaml"), "does not compile"),
        (with_config("bad_refusal.yaml"), "does not compile"),
        (with_config("bad_hook.yaml"), "cannot import no_such_module_xyz"),
        (with_config("bad_hook_file.yaml"), "not found"),
        (
            ["build", str(run_dir), "--to", str(not_ours)],
            "did not write; choose an empty or new --to",
        ),
        (["build", str(run_dir)], "no output folder"),
        (
            [
                "build",
                str(run_dir),
                "--to",
                str(tmp_path / "o"),
                "--tokenizer",
                str(tmp_path / "empty"),
            ],
            "cannot load it",
        ),
        (
            ["build", str(run_dir), "--to", str(tmp_path / "o"), "--eval-fraction", "1.5"],
            "eval_fraction",
        ),
        (["build", str(run_dir), "--to", str(tmp_path / "o"), "--eval-size", "999"], "999"),
    ]
    for args, needle in cases:
        res = runner.invoke(cli, args)
        assert res.exit_code != 0, args
        err = res.stderr.strip()
        assert err.startswith("error: ") and "\n" not in err and needle in err, (args, err)
        assert "Traceback" not in res.output
    assert (not_ours / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "o").exists()


def test_everything_removed_is_an_error(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(
        InputError,
        match=r"every one of 45 rows was removed \(failed 3, unfinished 1, empty 1, refusal 1, length 39\)",
    ):
        build(BuildConfig(run=run_dir, to=tmp_path / "out", max_answer_length=1))
    with pytest.raises(StoreError, match="no responses yet"):
        empty = tmp_path / "empty_run"
        Store(empty).close()
        build(BuildConfig(run=empty, to=tmp_path / "out"))


def test_cli_build_and_json_report(run_dir: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        cli, ["build", str(run_dir), "--to", str(tmp_path / "out"), "--eval-size", "2", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["split"]["eval_prompts"] == 2
    assert re.search(r"build: 35/45 rows kept .* -> ", res.stderr)


def test_sft_trainer_accepts_the_dataset(run_dir: Path, tmp_path: Path) -> None:
    """The output is TRL's conversational format: SFTTrainer trains on it as is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tests.tinymodels import make_tiny_model

    _, ds = do_build(run_dir, tmp_path / "out", eval_size=2)
    model_dir = make_tiny_model(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=256,
        assistant_only_loss=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=ds["train"],
        eval_dataset=ds["eval"],
        processing_class=AutoTokenizer.from_pretrained(str(model_dir)),
    )
    trainer.train()
    changed = sum(not (before[n] == p.detach()).all() for n, p in trainer.model.named_parameters())
    assert changed > 0
    assert trainer.evaluate()["eval_loss"] > 0


def test_example_config_and_docs_cover_every_key() -> None:
    from pipeline.build import Filters
    from pipeline.config import load_config

    root = Path(__file__).resolve().parent.parent
    example = load_config(BuildConfig, root / "configs/build.example.yaml", "build", {})
    assert example == BuildConfig(run=Path("data/runs/demo"), to=Path("data/datasets/demo"))
    text = (root / "configs/build.example.yaml").read_text()
    docs = (root / "docs/build.md").read_text()
    for key in list(BuildConfig.model_fields) + list(Filters.model_fields):
        assert f"`{key}`" in docs, key
        assert key in text or key == "json_report", key
    for name in FILTERS:
        assert f"`{name}`" in docs, name


def test_two_teachers_deduplicated_across_teachers(tmp_path: Path, server: OpenAIServer) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": f"What is {i} + 1?", "reference": str(i + 1)})
            + "\n"
            for i in range(4)
        )
    )
    teachers = [{"name": name, "base_url": server.url, "model": name} for name in ("big", "small")]
    harvest(HarvestConfig(prompts=[prompts], out=tmp_path / "run", teachers=teachers), pretty=False)
    report, ds = do_build(tmp_path / "run", tmp_path / "out", eval_size=1)
    # Both teachers give the test server's same answer: one of each pair is a duplicate (which
    # one follows the store's order: prompt id, sample index, key).
    assert report["removed"]["duplicate"] == 4 and report["kept"] == 4
    assert [t["teacher"] for t in report["teachers"]] == ["big", "small"]
    assert [t["rows"] for t in report["teachers"]] == [4, 4]
    assert sum(t["kept"] for t in report["teachers"]) == 4
    assert sorted(r["prompt_id"] for r in all_rows(ds)) == ["p0", "p1", "p2", "p3"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| big | big |" in card and "| small | small |" in card


def test_prefer_teachers_keeps_one_teacher_per_prompt_verified_first(
    tmp_path: Path, server: OpenAIServer
) -> None:
    """'big' answers p0 and p1 wrong; 'small' answers everything right. With big preferred, big's
    answer is kept where it is verified (p2, p3), small's where only small's is (p0, p1)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": f"What is {i} + 1?", "reference": str(i + 1)})
            + "\n"
            for i in range(4)
        )
    )

    def answer(body: dict, i: int) -> dict:
        n = int(body["messages"][-1]["content"].split()[2])
        wrong = body["model"] == "big" and n < 2
        return {"content": f"{body['model']} says the answer is {n + 1 + (7 if wrong else 0)}."}

    server.responder = answer
    teachers = [{"name": name, "base_url": server.url, "model": name} for name in ("big", "small")]
    harvest(HarvestConfig(prompts=[prompts], out=tmp_path / "run", teachers=teachers), pretty=False)
    report, ds = do_build(
        tmp_path / "run",
        tmp_path / "out",
        eval_size=1,
        prefer_teachers=["big", "small"],
        filters={"verify": False},
    )
    kept = {r["prompt_id"]: r["teacher"] for r in all_rows(ds)}
    assert kept == {"p0": "small", "p1": "small", "p2": "big", "p3": "big"}
    assert report["removed"]["not_selected"] == 4
    assert report["rows_in"] == sum(report["removed"].values()) + report["kept"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| not_selected | 4 | not the preferred teacher" in card  # said "off" (select: all)


def test_split_field_fixes_the_eval_set_and_filter_eval_false_keeps_it_whole(
    tmp_path: Path, server: OpenAIServer
) -> None:
    """A predefined held-out set (meta split: eval), measured on every prompt the teacher
    answered, right or wrong, while train keeps only verified answers."""
    rows = [
        {"id": f"p{i}", "prompt": f"What is {i} + 1?", "reference": str(i + 1)}
        | ({"meta": {"split": "eval"}} if i < 3 else {})
        for i in range(10)
    ]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # every even prompt is answered wrong
    server.responder = lambda body, i: {
        "content": "The answer is "
        + str(
            int(body["messages"][-1]["content"].split()[2])
            + 1
            + (body["messages"][-1]["content"].split()[2] in "02468") * 5
        )
        + "."
    }
    harvest(
        HarvestConfig(prompts=[prompts], out=tmp_path / "run", base_url=server.url, model="t"),
        pretty=False,
    )
    report, ds = do_build(
        tmp_path / "run", tmp_path / "out", split_field="split", eval_size=0, filter_eval=False
    )
    assert sorted(ds["eval"]["prompt_id"]) == ["p0", "p1", "p2"]
    assert sorted(zip(ds["eval"]["prompt_id"], ds["eval"]["verified"])) == [
        ("p0", False),
        ("p1", True),
        ("p2", False),
    ]
    assert sorted(ds["train"]["prompt_id"]) == ["p3", "p5", "p7", "p9"]  # wrong answers dropped
    assert report["split"]["eval_filtered"] is False
    # the default filters eval too, and the hash split applies to prompts without the field
    report2, ds2 = do_build(tmp_path / "run", tmp_path / "out2", split_field="split", eval_size=1)
    assert set(ds2["eval"]["prompt_id"]) >= {"p1"} and "p0" not in ds2["eval"]["prompt_id"]
    assert len(set(ds2["eval"]["prompt_id"]) - {"p1"}) == 1
