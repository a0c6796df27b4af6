"""On-policy distillation against a real model behind the test server (tests/model_server.py): the
teacher scores the student's token ids with vLLM's prompt_logprobs. Reverse KL on held-out prompts
falls; a kill -9 resumes without scoring any rollout twice; endpoints that cannot score, teachers
with another tokenizer, a bad key and a closed port are one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench.common import free_port
from pipeline.artifacts import read_finetune_run
from pipeline.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from pipeline.onpolicy import CHECK_TEXT, OnpolicyConfig, onpolicy
from tests.conftest import assert_one_line_error, run_cli, write_jsonl
from tests.model_server import ModelServer, make_teacher_model
from tests.openai_server import OpenAIServer
from tests.tinymodels import make_tiny_model

# The tiny models learn through LoRA only when the output layer has an adapter too.
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj", "lm_head"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(teacher trained on arithmetic text, fresh student with the same tokenizer)."""
    root = tmp_path_factory.mktemp("onpolicy_models")
    return make_teacher_model(root / "teacher", steps=150), make_tiny_model(root / "student")


@pytest.fixture(scope="module")
def teacher_server(models: tuple[Path, Path]):
    with ModelServer(models[0]) as srv:
        yield srv


def prompts(path: Path, n: int = 12) -> Path:
    return write_jsonl(
        path, [{"id": f"q{i}", "prompt": f"What is {i} + {2 * i}?"} for i in range(n)]
    )


def config(tmp_path: Path, url: str, student: Path, **more: object) -> dict:
    return {
        "base_url": url,
        "model": "teacher",
        "student": str(student),
        "prompts": [str(prompts(tmp_path / "prompts.jsonl"))],
        "out": str(tmp_path / "out"),
        "max_new_tokens": 16,
        "samples": 4,
        "prompts_per_step": 8,
        "eval_prompts": 4,
        "lr": 1e-2,
        "lora_r": 8,
        "lora_target_modules": TARGETS,
        "progress_every": 0.01,
        **more,
    }


def scoring_requests(srv: ModelServer) -> int:
    """Requests that scored a rollout's token ids (not the probe's text, nor the tokenizer check)."""
    check = srv.tok(CHECK_TEXT, add_special_tokens=False)["input_ids"]
    return sum(isinstance(b.get("prompt"), list) and b["prompt"] != check for b in srv.bodies)


def test_reverse_kl_on_held_out_prompts_falls_and_the_output_is_a_finetune_run(
    models: tuple[Path, Path], teacher_server: ModelServer, tmp_path: Path
) -> None:
    cfg = OnpolicyConfig(
        **config(tmp_path, teacher_server.url, models[1], steps=16, eval_every=8, save_steps=8)
    )
    summary = onpolicy(cfg)
    assert summary.exit_code == EXIT_OK and summary.steps_done == 16
    held = [h["eval_reverse_kl"] for h in summary.history if h.get("eval_reverse_kl") is not None]
    assert len(held) == 3  # step 0, 8, 16
    assert held[-1] < 0.95 * held[0], held
    run = read_finetune_run(tmp_path / "out")  # what `distill eval` and `distill merge` read
    assert run.student == str(models[1]) and run.report["steps"] == 16
    assert run.report["teacher_tokens_scored"] > 0 and run.report["scoring"] == "prompt_logprobs"
    assert (tmp_path / "out" / "reverse_kl.png").stat().st_size > 0
    db = sqlite3.connect(tmp_path / "out" / "store.sqlite")
    rows = db.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM rollouts").fetchone()
    assert rows[0] == rows[1] == summary.scored  # every rollout stored once


def test_kill_9_resumes_and_scores_no_rollout_twice(
    models: tuple[Path, Path], teacher_server: ModelServer, tmp_path: Path
) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text(
        yaml.safe_dump(
            {"onpolicy": config(tmp_path, teacher_server.url, models[1], steps=10, save_steps=3)}
        )
    )
    store = tmp_path / "out" / "store.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "onpolicy", "--config", str(conf)],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ},
    )
    # Kill once steps past the first checkpoint (3) have stored rollouts.
    deadline = time.monotonic() + 120
    top = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
            top = db.execute("SELECT MAX(step) FROM rollouts WHERE kind = 'train'").fetchone()[0]
            db.close()
        except sqlite3.Error:
            top = None
        if top is not None and top >= 5:
            break
        time.sleep(0.05)
    assert top is not None and top >= 5, "no step past the first checkpoint within 120 s"
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = sqlite3.connect(store).execute("SELECT COUNT(*) FROM rollouts").fetchone()[0]
    scored_before = scoring_requests(teacher_server)
    assert before > 0

    again = run_cli("onpolicy", "--config", str(conf))
    assert again.returncode == EXIT_OK, again.stderr
    after = sqlite3.connect(store).execute("SELECT COUNT(*) FROM rollouts").fetchone()[0]
    # The rerun paid only for rollouts that were not stored: none scored twice.
    assert scoring_requests(teacher_server) - scored_before == after - before
    report = json.loads((tmp_path / "out" / "train_report.json").read_text())
    assert report["steps"] == 10
    reused = re.search(r"\((\d+) reused\)", again.stderr)
    assert reused and int(reused.group(1)) > 0, again.stderr  # steps after the checkpoint


def test_a_single_target_module_name_is_a_list_of_one(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    """As in finetune: PEFT reads a plain string as a regex over full module names, so
    `lora_target_modules: q_proj` found nothing ("Target modules q_proj not found")."""
    from pipeline.onpolicy import load_student

    cfg = config(tmp_path, "http://127.0.0.1:9/v1", models[1], lora_target_modules="q_proj")
    student = load_student(OnpolicyConfig(**cfg), None)
    assert student.model.peft_config["default"].target_modules == {"q_proj"}


def test_an_endpoint_that_cannot_score_is_refused(
    models: tuple[Path, Path], server: OpenAIServer, tmp_path: Path
) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({"onpolicy": config(tmp_path, server.url, models[1])}))
    proc = run_cli("onpolicy", "--config", str(conf))
    assert_one_line_error(proc, "cannot score", "--loss kd")
    assert proc.returncode == EXIT_FAILED
    assert not (tmp_path / "out" / "store.sqlite").exists()


def test_a_teacher_with_another_tokenizer_is_refused(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    other = tmp_path / "other_teacher"
    shutil.copytree(models[0], other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    regular = sorted(i for i in vocab.values() if i >= 16)
    flip = dict(zip(regular, reversed(regular)))  # same tokens, other ids
    tj["model"]["vocab"] = {t: flip.get(i, i) for t, i in vocab.items()}
    (other / "tokenizer.json").write_text(json.dumps(tj))
    with ModelServer(other) as srv:
        conf = tmp_path / "c.yaml"
        conf.write_text(yaml.safe_dump({"onpolicy": config(tmp_path, srv.url, models[1])}))
        proc = run_cli("onpolicy", "--config", str(conf))
    assert_one_line_error(proc, "does not share the student's tokenizer")
    assert proc.returncode == EXIT_USAGE


def test_a_bad_key_and_a_closed_port_are_harvests_errors(
    models: tuple[Path, Path], server: OpenAIServer, tmp_path: Path
) -> None:
    server.api_key = "sk-right"
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({"onpolicy": config(tmp_path, server.url, models[1])}))
    bad = run_cli("onpolicy", "--config", str(conf), env={"OPENAI_API_KEY": "sk-wrong-9"})
    assert_one_line_error(bad, "HTTP 401", "OPENAI_API_KEY")
    assert bad.returncode == EXIT_FAILED and "sk-wrong-9" not in bad.stderr
    closed = f"http://127.0.0.1:{free_port()}/v1"
    proc = run_cli("onpolicy", "--config", str(conf), "--base-url", closed)
    assert_one_line_error(proc, "cannot reach")
    assert proc.returncode == EXIT_FAILED


def test_eval_and_merge_read_an_onpolicy_run_unchanged(
    models: tuple[Path, Path], teacher_server: ModelServer, tmp_path: Path
) -> None:
    """The output is a normal fine-tune: `distill merge` folds its adapter in (same logits as the
    adapter, not the base's) and `distill eval` scores it against its base student."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.tinymodels import make_chat_dataset

    cfg = OnpolicyConfig(**config(tmp_path, teacher_server.url, models[1], steps=2, eval_every=2))
    assert onpolicy(cfg).steps_done == 2
    out = tmp_path / "out"
    merged = tmp_path / "merged"
    proc = run_cli("merge", str(out), "--to", str(merged))
    assert proc.returncode == EXIT_OK, proc.stderr
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(models[1]), out / "adapter"
    )
    with torch.no_grad():
        a, b, c = (
            m.eval()(input_ids=ids).logits
            for m in (
                AutoModelForCausalLM.from_pretrained(merged),
                peft,
                AutoModelForCausalLM.from_pretrained(models[1]),
            )
        )
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-5)

    data = make_chat_dataset(tmp_path / "ds", n_train=4, n_eval=4, reasoning="none")
    ev = tmp_path / "eval"
    proc = run_cli("eval", "--data", str(data), "--finetuned", str(out), "--out", str(ev),
                   "--max-new-tokens", "8")  # fmt: skip
    assert proc.returncode == EXIT_OK, proc.stderr
    report = json.loads((ev / "report.json").read_text())
    assert report["prompts"] == 4
    assert set(report["metrics"]) >= {"base", "finetuned"}
    assert report["metrics"]["finetuned"]["nll"] != report["metrics"]["base"]["nll"]


def test_teacher_view_sharpens_the_teachers_top_k_and_keeps_its_order() -> None:
    import numpy as np

    from pipeline.kd import pack_targets
    from pipeline.onpolicy import teacher_view

    ids = [[5, 7, 9], [3, 5, 8]]  # per sampled token: itself first, then the alternatives
    lps = [[-1.0, -0.5, -3.0], [-0.25, -2.0, -2.5]]
    r = {
        "completion_ids": [5, 3],
        "teacher_logprobs": [-1.0, -0.25],
        "teacher_topk": pack_targets([0, 1], ids, lps),
    }
    raw, top = teacher_view(r, 1.0)
    assert raw.tolist() == [-1.0, -0.25] and np.allclose(top[1], lps, atol=2e-3)  # as stored
    sharp, (got_ids, got, mask) = teacher_view(r, 0.5)
    want = np.array(lps) / 0.5
    want -= np.log(np.exp(want).sum(-1, keepdims=True))  # renormalized over the k
    assert np.allclose(got, want, atol=5e-3) and got_ids.tolist() == ids and mask.all()
    assert np.allclose(sharp, want[:, 0], atol=5e-3)  # the sampled token's, from the same rows
    assert (np.argsort(got, -1) == np.argsort(np.array(lps), -1)).all()  # same order, sharper
    assert sharp[1] > -0.25 and sharp[0] < -1.0  # the likely token gains, the other loses
    assert teacher_view({**r, "teacher_topk": None}, 0.5)[1] is None


def test_forward_kl_on_the_students_samples_toward_a_sharpened_teacher(
    models: tuple[Path, Path], teacher_server: ModelServer, tmp_path: Path
) -> None:
    """GKD's on-policy forward KL: no reverse-KL term, the teacher's top-k at temperature 0.5 as
    the target at each of the student's sampled positions; the forward KL to that teacher on the
    held-out prompts' samples falls."""
    more = {"top_k": 5, "kd_alpha": 1.0, "reverse_kl": 0.0, "teacher_temperature": 0.5}
    cfg = OnpolicyConfig(
        **config(tmp_path, teacher_server.url, models[1], steps=12, eval_every=12, **more)
    )
    summary = onpolicy(cfg)
    assert summary.exit_code == EXIT_OK and summary.steps_done == 12
    held = [h["eval_kd_loss"] for h in summary.history if "eval_kd_loss" in h]
    assert len(held) == 2 and held[-1] < 0.7 * held[0], held  # step 0 and 12
    assert all("kd_loss" in h for h in summary.history if "reverse_kl" in h)
    settings = json.loads((tmp_path / "out" / "train_report.json").read_text())["settings"]
    assert settings["teacher_temperature"] == 0.5 and settings["reverse_kl"] == 0.0
    db = sqlite3.connect(tmp_path / "out" / "store.sqlite")
    assert db.execute("SELECT COUNT(*) FROM rollouts WHERE teacher_topk IS NULL").fetchone() == (0,)


def test_a_teacher_temperature_without_the_top_k_or_no_loss_term_is_a_config_error(
    models: tuple[Path, Path], teacher_server: ModelServer, tmp_path: Path
) -> None:
    conf = tmp_path / "c.yaml"
    more = {"teacher_temperature": 0.5}
    conf.write_text(
        yaml.safe_dump({"onpolicy": config(tmp_path, teacher_server.url, models[1], **more)})
    )
    proc = run_cli("onpolicy", "--config", str(conf))
    assert_one_line_error(proc, "teacher_temperature 0.5", "top_k")
    assert proc.returncode == EXIT_USAGE
    proc = run_cli("onpolicy", "--config", str(conf), "--reverse-kl", "0")
    assert_one_line_error(proc, "nothing to learn from")
    assert proc.returncode == EXIT_USAGE
