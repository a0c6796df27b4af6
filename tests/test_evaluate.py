"""`distill eval` on a tiny random model, a LoRA variant of it and a five-row dataset.

The fine-tuned student is a real PEFT adapter with random (non-zero) LoRA weights, saved in the
layout `distill finetune` writes (OUT/adapter, train_report.json, log_history.json), so the two
students differ without training anything.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import ConfigError, InputError
from pipeline.evaluate import (
    Answer,
    EvalConfig,
    Prompt,
    eval_dtype,
    eval_set,
    evaluate,
    headline,
    load_prompts,
    paired_difference,
    read_report,
    rouge_l,
    score,
    teacher_metrics,
    verification,
    wilson,
)
from tests.tinymodels import make_tiny_model

SYSTEM = "You are a tiny test model. Answer with the number only."
# (prompt id, question, teacher answers, reference); p0 has two samples, p3 no reference.
ROWS = [
    ("p0", "What is 12 + 7?", ["The answer is 19.", "The answer is 19."], "19"),
    ("p1", "What is 3 * 4?", ["The answer is 12."], "12"),
    ("p2", "What is 100 + 1000?", ["The answer is 1100."], "1100"),
    ("p3", "Name a number.", ["The answer is 7."], None),
]
# A reference no random model can hit: every student's accuracy must be exactly 0.
UNREACHABLE = "987654321.125"
# The teacher's answers all have this shape; a random student's never do.
FORMAT = r"^The answer is \d+\.$"


def _rows(split_rows: list[tuple[str, str, list[str], str | None]]) -> list[dict[str, Any]]:
    out = []
    for pid, question, answers, ref in split_rows:
        for k, answer in enumerate(answers):
            out.append(
                {
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer},
                    ],
                    "prompt_id": pid,
                    "teacher": "tiny-teacher",
                    "verified": True,
                    "key": f"{pid}-{k}",
                    "reference": ref,
                    "sample_index": k,
                }
            )
    return out


def write_dataset(
    path: Path, eval_rows: list[dict[str, Any]], splits: tuple[str, ...] = ("train", "eval")
) -> Path:
    import datasets

    parts = {s: datasets.Dataset.from_list(eval_rows) for s in splits}
    datasets.DatasetDict(parts).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny base model, a fine-tune OUT folder with a random LoRA adapter, a dataset."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("eval")
    tiny = make_tiny_model(root / "tiny", arch="qwen2", template="known")
    # Scaled-up weights: a freshly initialised model predicts nearly uniformly, so a wrong mask or
    # a padding bug would move its NLL by only ~1e-5; ten times larger weights make it visible.
    model = AutoModelForCausalLM.from_pretrained(str(tiny))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(10)
    base = root / "base"
    model.save_pretrained(str(base))
    AutoTokenizer.from_pretrained(str(tiny)).save_pretrained(str(base))
    run = root / "finetune"
    torch.manual_seed(1)
    # init_lora_weights=False: B is random too, so the adapter changes the model's outputs.
    lora = LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(str(run / "adapter"))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(run / "adapter"))
    (run / "train_report.json").write_text(json.dumps({"student": str(base), "steps": 4}))
    history = [
        {"loss": 5.0, "step": 1},
        {"loss": 4.0, "step": 2},
        {"eval_loss": 4.2, "step": 2},
        {"loss": 3.5, "step": 3},
        {"loss": 3.0, "step": 4},
        {"eval_loss": 3.4, "step": 4},
    ]
    (run / "log_history.json").write_text(json.dumps(history))
    merged = root / "merged"
    peft_model.merge_and_unload().save_pretrained(str(merged))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(merged))

    rows = _rows(ROWS)
    rows[2]["reference"] = UNREACHABLE  # p1 (its only sample)
    data = write_dataset(root / "dataset", rows)
    return {"root": root, "base": base, "run": run, "merged": merged, "data": data}


def _cfg(setup: dict[str, Path], out: str, **kw: Any) -> EvalConfig:
    values: dict[str, Any] = {
        "data": setup["data"],
        "finetuned": setup["run"],
        "out": setup["root"] / out,
        "max_new_tokens": 8,
        "batch_size": 2,
        "device": "cpu",
        "format_regex": FORMAT,
        "examples": 3,
    }
    values.update(kw)
    return EvalConfig(**values)


@pytest.fixture(scope="module")
def report(setup: dict[str, Path]) -> dict[str, Any]:
    out = evaluate(_cfg(setup, "report"))
    return read_report(out)


def test_report_files_written(setup: dict[str, Path], report: dict[str, Any]) -> None:
    from PIL import Image

    out = setup["root"] / "report"
    for name in ("report.md", "report.json", "metrics.png", "loss_curves.png"):
        assert (out / name).is_file(), name
    for name in ("metrics.png", "loss_curves.png"):
        with Image.open(out / name) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
    md = (out / "report.md").read_text()
    assert (
        "| metric | base | fine-tuned | teacher | better when | fine-tuned − base [95% CI] | verdict |"
        in md
    )
    assert "fine-tuned student" in md and "base student" in md
    assert (
        md.count("| teacher (final answer) | The answer is") == 3
    )  # three examples, as configured
    # The report says what the eval set is, what each side saw, and how sure each number is.
    assert "eval set: the `eval` split (no build_report.json" in md
    assert (
        "system prompt: the teacher saw the dataset's system message; the students saw the dataset's"
        in md
    )
    assert "accuracy 95% interval (Wilson): base [" in md and "paired bootstrap" in md
    assert "held out from training: not checked" in md


def test_both_students_scored_each_prompt_once(
    setup: dict[str, Path], report: dict[str, Any]
) -> None:
    assert report["prompts"] == 4  # five rows, p0 twice
    assert report["prompts_with_reference"] == 3
    assert report["students"]["base"] == str(setup["base"])
    assert report["students"]["finetuned"] == str(setup["run"] / "adapter")
    assert report["students"]["adapter"] is True
    assert [ex["prompt_id"] for ex in report["examples"]] == ["p0", "p1", "p2", "p3"]
    assert report["examples"][0]["teacher"] == ["The answer is 19.", "The answer is 19."]
    for ex in report["examples"]:
        # The students see what the fine-tune trained on: the dataset's system message too.
        assert [m["role"] for m in ex["messages"]] == ["system", "user"]
        for s in ("base", "finetuned"):
            assert isinstance(ex[s]["answer"], str)
            assert 0 <= ex[s]["tokens"] <= 8


def test_metrics_in_range(report: dict[str, Any]) -> None:
    for s in ("base", "finetuned"):
        m = report["metrics"][s]
        for key in ("accuracy", "teacher_match", "rouge_l", "format_compliance", "hit_max_tokens"):
            assert 0.0 <= m[key] <= 1.0, (s, key)
        assert m["n_reference"] == 3
        assert m["n_teacher_answers"] == 4
        assert 0 < m["nll"] < 20 and math.isclose(m["perplexity"], math.exp(m["nll"]), rel_tol=1e-9)
        assert 0 <= m["answer_tokens"] <= 8
        assert m["judge_score"] is None  # the judge is off by default
        # By construction: a random student never writes the teacher's format.
        assert m["format_compliance"] == 0.0
    t = report["metrics"]["teacher"]
    # Per teacher sample: p0's two and p2's are right, p1's reference is unreachable.
    assert t["accuracy"] == pytest.approx(3 / 4)
    assert t["format_compliance"] == 1.0
    assert t["samples"] == 5
    lo, hi = t["accuracy_ci"]
    assert lo < 3 / 4 < hi and t["n_reference"] == 4
    for key, d in report["differences"].items():
        assert d["ci"][0] <= d["diff"] <= d["ci"][1], key
        assert d["verdict"] in ("better", "worse", "no clear difference")
    assert report["differences"]["accuracy"]["n"] == 3  # prompts with a reference
    # Each difference is the difference of the two numbers the table shows (NLL token-weighted).
    for key in ("nll", "accuracy", "rouge_l"):
        shown = report["metrics"]["finetuned"][key] - report["metrics"]["base"][key]
        assert report["differences"][key]["diff"] == pytest.approx(shown), key


def test_unreachable_reference_is_never_correct(report: dict[str, Any]) -> None:
    p1 = report["examples"][1]
    assert p1["reference"] == UNREACHABLE
    assert p1["base"]["correct"] is False and p1["finetuned"]["correct"] is False
    assert report["examples"][3]["base"]["correct"] is None  # no reference, not scored


def test_finetuned_differs_from_base(report: dict[str, Any]) -> None:
    b, f = report["metrics"]["base"], report["metrics"]["finetuned"]
    assert b["nll_tokens"] == f["nll_tokens"] > 0
    assert abs(b["nll"] - f["nll"]) > 1e-3


def test_nll_matches_an_unbatched_forward_pass(
    setup: dict[str, Path], report: dict[str, Any]
) -> None:
    """The batched, left-padded NLL equals the plain loss of each unpadded sequence."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(setup["base"]))
    model = AutoModelForCausalLM.from_pretrained(str(setup["base"])).eval()
    for i, (_, question, answers, _) in enumerate(ROWS):
        user = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        # Qwen's ChatML: the answer, then <|im_end|> (trained); the newline after it is not.
        full = prompt + answers[0] + "<|im_end|>"
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        n = len(ids) - len(p_ids)
        expected = F.cross_entropy(logits[-n - 1 : -1], torch.tensor(ids[-n:])).item()
        got = report["examples"][i]["base"]
        assert got["nll_tokens"] == n * len(answers)  # p0's two samples both count
        assert got["nll"] == pytest.approx(expected, abs=1e-4), ROWS[i][0]


def test_merged_model_scores_like_its_adapter(
    setup: dict[str, Path], report: dict[str, Any]
) -> None:
    out = evaluate(
        _cfg(setup, "eval_merged", finetuned=setup["merged"], base=setup["base"], limit=2)
    )
    merged = read_report(out)
    assert merged["students"]["adapter"] is False
    assert merged["prompts"] == 2
    assert not (out / "loss_curves.png").exists()  # no fine-tune run next to a bare merged folder
    for i in range(2):
        assert merged["examples"][i]["finetuned"]["nll"] == pytest.approx(
            report["examples"][i]["finetuned"]["nll"], abs=1e-4
        )
        assert (
            merged["examples"][i]["finetuned"]["answer"]
            == report["examples"][i]["finetuned"]["answer"]
        )


def test_headline_lists_both_students(report: dict[str, Any]) -> None:
    text = headline(report)
    assert "base" in text and "fine-tuned" in text and "teacher" in text
    assert "4 held-out prompts" in text
    assert "NLL of teacher answers" in text and "format compliance" in text
    assert "fine-tune" in text and "[95% CI]" in text and "accuracy 95% interval (Wilson)" in text
    assert "eval set: " in text
    assert "LLM judge" not in text  # no judge numbers: no judge row


def test_rouge_l() -> None:
    assert rouge_l("The answer is 19.", "the answer is 19 .") == 1.0
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert rouge_l("alpha", "beta") == 0.0
    assert rouge_l("", "beta") == 0.0


def test_system_prompt_handling(setup: dict[str, Path]) -> None:
    keep = load_prompts(_cfg(setup, "x", keep_system=True))
    assert keep[0].messages[0] == {"role": "system", "content": SYSTEM}
    own = load_prompts(_cfg(setup, "x", system_prompt="Be brief."))
    assert [m["content"] for m in own[0].messages] == ["Be brief.", ROWS[0][1]]
    assert len(load_prompts(_cfg(setup, "x", limit=3))) == 3


def _argv(setup: dict[str, Path], out: Path, *args: str) -> list[str]:
    """`distill eval` on the fixture's dataset and fine-tune run, on the CPU, plus `args`."""
    data, run = str(setup["data"]), str(setup["run"])
    return ["eval", "--data", data, "--finetuned", run, "--out", str(out), "--device", "cpu", *args]


def test_cli_eval_prints_headline(setup: dict[str, Path]) -> None:
    out = setup["root"] / "cli"
    argv = _argv(setup, out, "--max-new-tokens", "4", "--limit", "2", "--no-nll")
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, result.output
    assert "2 held-out prompts" in result.stdout and "fine-tuned" in result.stdout
    assert read_report(out)["metrics"]["base"]["nll"] is None


def _bad(setup: dict[str, Path], *args: str) -> str:
    argv = _argv(setup, setup["root"] / "bad", *args)
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_bad_inputs_give_one_line(setup: dict[str, Path]) -> None:
    root = setup["root"]
    no_eval = write_dataset(root / "no_eval", _rows(ROWS), splits=("train",))
    assert "no `eval` split" in _bad(setup, "--data", str(no_eval))
    import datasets

    datasets.DatasetDict({"eval": datasets.Dataset.from_list([{"text": "hi"}])}).save_to_disk(
        str(root / "no_msgs")
    )
    assert "has no 'messages' column" in _bad(setup, "--data", str(root / "no_msgs"))
    assert "dataset folder not found" in _bad(setup, "--data", str(root / "nope"))
    msg = _bad(setup, "--base", str(root / "no_such_model"))
    assert "no_such_model" in msg and "--base" in msg
    msg = _bad(setup, "--finetuned", str(root / "no_such_run"))
    assert "no_such_run" in msg and "finetuned" in msg
    (root / "not_a_run").mkdir(exist_ok=True)
    msg = _bad(setup, "--finetuned", str(root / "not_a_run"))
    assert "not_a_run" in msg and "key `finetuned`" in msg
    msg = _bad(setup, "--against", str(root / "not_a_run"))
    assert "not_a_run" in msg and "key `against`" in msg
    msg = _bad(setup, "--format-regex", "(unclosed")
    assert "format_regex" in msg and "(unclosed" in msg
    assert "answer_patterns" in _bad(setup, "--answer-patterns", "[a-")


@pytest.mark.parametrize(
    "capability, dtype",
    [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 6), "bf16"), ((9, 0), "bf16")],
)
def test_eval_dtype_by_compute_capability(capability: tuple[int, int], dtype: str) -> None:
    """A T4 (7.5) gets fp16 although torch.cuda.is_bf16_supported() says True there (emulated)."""
    assert eval_dtype("cuda", lambda: capability) == dtype


def test_eval_dtype_off_the_gpu_is_fp32() -> None:
    def no_gpu() -> tuple[int, int]:
        raise AssertionError("capability asked off the GPU")

    assert eval_dtype("cpu", no_gpu) == "fp32" and eval_dtype("mps", no_gpu) == "fp32"


def test_load_in_4bit_needs_cuda_and_bitsandbytes(setup: dict[str, Path]) -> None:
    msg = _bad(setup, "--load-in-4bit")
    assert "load_in_4bit needs a CUDA GPU" in msg and "device is cpu" in msg
    if importlib.util.find_spec("bitsandbytes") is None:
        msg = _bad(setup, "--load-in-4bit", "--device", "cuda")
        assert "pip install 'distill[qlora]'" in msg


def test_bad_inputs_raise_typed_errors(setup: dict[str, Path]) -> None:
    with pytest.raises(InputError, match="not a fine-tune OUT folder|neither"):
        evaluate(_cfg(setup, "x", finetuned=setup["root"]))  # a folder with no model in it
    with pytest.raises(ConfigError, match="judge_model"):
        evaluate(_cfg(setup, "x", judge=True, limit=1, nll=False))


def test_judge_through_the_teacher_client(setup: dict[str, Path], server: Any) -> None:
    """The judge (off by default) grades every answer through the real HTTP client; a password
    in its URL reaches no file of the report."""
    seen: list[str] = []

    def grade(body: dict[str, Any], index: int) -> dict[str, Any]:
        seen.append(body["messages"][0]["content"])
        return {"content": "7"}

    server.responder = grade
    cfg = _cfg(setup, "judged", limit=2, nll=False, max_new_tokens=2)
    judge_url = server.url.replace("http://", "http://alice:judgepw-1234@")
    cfg.judge, cfg.judge_model, cfg.judge_base_url = True, "judge-model", judge_url
    out = evaluate(cfg)
    got = read_report(out)
    for f in out.rglob("*"):
        assert not f.is_file() or b"judgepw-1234" not in f.read_bytes(), f
    assert got["config"]["judge_base_url"] == server.url.replace("http://", "http://***@")
    assert len(seen) == 4  # two prompts x two students
    assert all("Reference answer:\nThe answer is" in s for s in seen)
    assert (
        got["metrics"]["base"]["judge_score"] == got["metrics"]["finetuned"]["judge_score"] == 0.7
    )
    assert "LLM judge score" in headline(got)


# -- final answers, intervals, held-out check ------------------------------------------------------

TRACE = "<think>\nIs it 41? The answer is 41. No: 40 + 2.\n</think>\n\n"


def test_a_reasoning_teacher_is_scored_on_its_final_answer(tmp_path: Path) -> None:
    """The teacher's trace is cut off before every comparison, as the students' is."""
    prompts = [
        Prompt("a", [], [{"role": "assistant", "content": TRACE + "The answer is 42."}], "42"),
        Prompt("b", [], [{"role": "assistant", "content": "The answer is 7."}], "7"),
    ]
    cfg = EvalConfig(data=tmp_path, finetuned=tmp_path, format_regex=FORMAT)
    ver = verification(cfg)
    words = lambda text, add_special_tokens: {"input_ids": text.split()}  # noqa: E731
    teacher = teacher_metrics(prompts, words, cfg, ver)
    assert teacher["accuracy"] == 1.0 and teacher["format_compliance"] == 1.0
    assert teacher["answer_tokens"] == 4.0  # "The answer is 42." and "The answer is 7."
    assert teacher["reasoning_share"] == 0.5 and teacher["trace_chars"] == len(
        "Is it 41? The answer is 41. No: 40 + 2."
    )
    # A student that copies the teacher's final answer exactly matches it on every score.
    copy = [Answer("The answer is 42.", 5, False), Answer("The answer is 7.", 5, False)]
    metrics, per = score(prompts, copy, None, cfg, ver)
    assert [r["rouge_l"] for r in per] == [1.0, 1.0]
    assert metrics["teacher_match"] == metrics["accuracy"] == metrics["format_compliance"] == 1.0
    assert metrics["reasoning_share"] == 0.0


def test_intervals() -> None:
    assert wilson(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 0) is None
    base = [0.0, 1.0] * 20
    # A difference of 1e-9 is no difference; a clear gain is "better"; lower NLL is "better".
    tiny = paired_difference(base, [base[0] + 1e-9, *base[1:]], "higher", 2000, 0)
    assert tiny["verdict"] == "no clear difference"
    assert paired_difference(base, [1.0] * 40, "higher", 2000, 0)["verdict"] == "better"
    assert paired_difference(base, [1.0] * 40, "lower", 2000, 0)["verdict"] == "worse"
    noisy = paired_difference(base, base[1:] + base[:1], "higher", 2000, 0)
    assert noisy["verdict"] == "no clear difference" and noisy["ci"][0] < 0 < noisy["ci"][1]
    assert paired_difference(base, [1.0] * 40, "higher", 2000, 0) == paired_difference(
        base, [1.0] * 40, "higher", 2000, 0
    )  # seeded


def test_plot_verdict_needs_an_interval_that_excludes_zero() -> None:
    from pipeline.plots import PANELS, verdict

    m = {"accuracy": 0.5, "rouge_l": 0.5}
    report = {
        "metrics": {"base": m, "finetuned": {"accuracy": 0.5 + 1e-9, "rouge_l": 0.9}},
        "differences": {
            "accuracy": paired_difference([0.5] * 9, [0.5 + 1e-9] + [0.5] * 8, "higher", 500, 0),
            "rouge_l": paired_difference([0.5] * 9, [0.9] * 9, "higher", 500, 0),
        },
    }
    text = verdict(report, PANELS)
    assert "better on 1, worse on 0" in text and "unclear" in text


def test_eval_reads_the_builds_verify_settings_and_eval_set(tmp_path: Path) -> None:
    (tmp_path / "build_report.json").write_text(
        json.dumps(
            {
                "config": {
                    "verify": "text",
                    "rel_tol": 0.1,
                    "abs_tol": 0.0,
                    "answer_patterns": [],
                    "filters": {"verify": True},
                },
                "split": {"eval_filtered": True},
            }
        )
    )
    ver = verification(EvalConfig(data=tmp_path, finetuned=tmp_path))
    assert (ver.mode, ver.rel_tol, ver.abs_tol) == ("text", 0.1, 0.0)
    assert ver.check("The answer is 0.52.", "0.5", "p") is True  # within the build's 10%
    own = verification(EvalConfig(data=tmp_path, finetuned=tmp_path, verify="math", rel_tol=0.0))
    assert (own.mode, own.rel_tol) == ("math", 0.0) and "eval config" in own.source
    with pytest.raises(ConfigError, match=r"^prompt p7: verify 'math'"):
        own.check("Paris", "Paris", "p7")
    assert "100% correct by construction" in eval_set(EvalConfig(data=tmp_path, finetuned=tmp_path))


def test_eval_refuses_a_split_the_student_was_trained_on(setup: dict[str, Path]) -> None:
    import shutil

    run = setup["root"] / "leaky_run"
    if not run.exists():
        shutil.copytree(setup["run"], run)
    record = {"student": str(setup["base"]), "dataset": {"prompt_ids": ["p2", "zzz"]}}
    (run / "train_report.json").write_text(json.dumps(record))
    msg = _bad(setup, "--finetuned", str(run))
    assert "'p2'" in msg and "trained on" in msg
    record["dataset"]["prompt_ids"] = ["zzz"]
    (run / "train_report.json").write_text(json.dumps(record))
    out = evaluate(_cfg(setup, "clean", finetuned=run, limit=1, nll=False, max_new_tokens=2))
    assert read_report(out)["held_out_check"].startswith("none of the 1 prompts")
