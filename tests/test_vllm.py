"""Against a real self-hosted server: vLLM's CPU build (its own virtualenv, offline) serving a tiny
model. What the probe says of it, and a harvest that relies on it: `n`, logprobs, streaming."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict
from pathlib import Path

import pytest

from pipeline.probe import probe
from pipeline.record import unpack_logprobs
from pipeline.store import Store
from tests.conftest import arithmetic_rows, harvest_args, run_cli, write_jsonl

pytestmark = pytest.mark.slow
Teacher = tuple[str, str, Path]


def rows_of(run: Path) -> list[dict]:
    with Store(run, readonly=True) as s:
        rows = [asdict(r) for r in s.iter_responses()]
    return sorted(rows, key=lambda r: (r["prompt_id"], r["sample_index"]))


def test_the_probe_of_vllm(vllm_teacher: Teacher) -> None:
    url, model, _ = vllm_teacher
    r = probe(url, model)
    assert r.n_honoured is True
    assert r.logprobs is True and r.top_logprobs == 20
    assert r.scoring == "prompt_logprobs"
    assert r.ratelimit_headers == {} and r.batch_api is False
    assert r.reasoning is None  # a plain model: no reasoning parser
    assert r.latency_s is not None and r.requests <= 8


def test_harvest_from_vllm_honours_n_and_returns_logprobs(
    vllm_teacher: Teacher, tmp_path: Path
) -> None:
    url, model, _ = vllm_teacher
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(4))
    more = ("--samples", "2", "--temperature", "1", "--logprobs", "--top-logprobs", "5")
    proc = run_cli(
        *harvest_args(url, p, tmp_path / "run", *more, "--max-tokens", "8", "--json", model=model)
    )
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["completed"] == 8 and s["failed"] == 0
    assert s["requests_sent"] == 1 + 4  # the one-token probe, then one request (n=2) a prompt
    rows = rows_of(tmp_path / "run")
    assert len(rows) == 8
    for r in rows:
        lp = unpack_logprobs(r["logprobs"])
        assert lp and 1 <= len(lp) <= 8  # a logprob per token, up to max_tokens
        assert all(len(entry[2]) == 5 for entry in lp)


def test_a_streamed_harvest_from_vllm_stores_the_same_rows(
    vllm_teacher: Teacher, tmp_path: Path
) -> None:
    url, model, _ = vllm_teacher
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(3))
    (tmp_path / "stream.yaml").write_text("harvest:\n  stream: true\n")
    greedy = ("--temperature", "0", "--logprobs", "--top-logprobs", "3", "--max-tokens", "8")
    for name, extra in (("plain", ()), ("streamed", ("--config", str(tmp_path / "stream.yaml")))):
        proc = run_cli(*harvest_args(url, p, tmp_path / name, *greedy, *extra, model=model))
        assert proc.returncode == 0, proc.stderr
    per_run = {"latency_s", "created_at", "response_id", "attempts"}
    plain, streamed = (
        [{k: v for k, v in r.items() if k not in per_run} for r in rows_of(tmp_path / n)]
        for n in ("plain", "streamed")
    )
    assert len(plain) == 3 and plain == streamed
    assert all(r["prompt_tokens"] and r["completion_tokens"] and r["logprobs"] for r in streamed)


FORWARD_KL = [
    "--top-k",
    "5",
    "--kd-alpha",
    "1",
    "--reverse-kl",
    "0",
    "--teacher-temperature",
    "0.1",
]


@pytest.mark.parametrize("loss", [[], FORWARD_KL], ids=["reverse-kl", "sharpened-forward-kl"])
def test_onpolicy_against_vllm_scores_with_prompt_logprobs(
    vllm_teacher: Teacher, tmp_path: Path, loss: list[str]
) -> None:
    """`distill onpolicy` with vLLM as the scorer: the probe finds prompt_logprobs, the student's
    token ids pass the tokenizer check, every rollout is stored once, held-out reverse KL is in
    the report (a fresh tiny student with the teacher's tokenizer); with the top-k forward KL,
    vLLM's top-k is stored with every rollout and the held-out forward KL is reported too."""
    from tests.tinymodels import make_tiny_model

    url, model, _ = vllm_teacher
    student = make_tiny_model(tmp_path / "student")
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(8))
    out = tmp_path / "out"
    args = ["--prompts", str(p), "--student", str(student), "--out", str(out)]
    args += ["--base-url", url, "--model", model, "--steps", "3", *loss]
    conf = tmp_path / "c.yaml"
    conf.write_text(
        "onpolicy:\n  max_new_tokens: 8\n  samples: 2\n  prompts_per_step: 2\n  eval_prompts: 2\n"
        "  eval_every: 3\n  lr: 0.01\n  lora_target_modules: [q_proj, v_proj, lm_head]\n"
    )
    proc = run_cli("onpolicy", "--config", str(conf), *args, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "probe.json").read_text())["scoring"] == "prompt_logprobs"
    report = json.loads((out / "train_report.json").read_text())
    assert report["scoring"] == "prompt_logprobs" and report["steps"] == 3
    held = dict(report["eval_reverse_kl"])
    assert set(held) == {0, 3} and all(v == v and v > -1e-3 for v in held.values()), held
    db = sqlite3.connect(out / "store.sqlite")
    n, distinct, tokens = db.execute(
        "SELECT COUNT(*), COUNT(DISTINCT key), SUM(prompt_tokens) FROM rollouts"
    ).fetchone()
    assert n == distinct == 3 * 2 * 2 + 2 * 2 * 2  # 3 steps of 2x2, held-out at steps 0 and 3
    assert tokens == report["teacher_tokens_scored"] > 0
    if loss:
        kd = {h["step"]: h["eval_kd_loss"] for h in report["history"] if "eval_kd_loss" in h}
        assert set(kd) == {0, 3} and all(0 <= v < 100 for v in kd.values()), kd
        empty = db.execute("SELECT COUNT(*) FROM rollouts WHERE teacher_topk IS NULL").fetchone()
        assert empty == (0,)
    print(f"vLLM on-policy {loss}: held-out reverse KL {held}, {tokens} teacher tokens scored")
