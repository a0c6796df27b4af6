"""`distill finetune` and `distill merge` on tiny random models (CPU, a few steps each)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pipeline.artifacts import read_finetune_run
from pipeline.chat import (
    check_masks,
    prepare_messages,
    renders_reasoning,
    tokenize_row,
    training_template,
)
from pipeline.cli import cli
from pipeline.errors import TrainingError
from pipeline.finetune import (
    FinetuneConfig,
    finetune,
    packed_rows_collator,
    packing_keeps_sequences_apart,
)
from tests.tinymodels import make_chat_dataset, make_tiny_model, tiny_model  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Small and fast: 2-4 steps of batch 4 on rows of <= 256 tokens.
FAST = [
    "--batch-size", "4", "--grad-accum", "1", "--max-length", "256", "--eval-steps", "2",
    "--save-steps", "2", "--logging-steps", "1", "--report-to", "none",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run 10x+ faster on one thread on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_chat_dataset(tmp_path_factory.mktemp("data") / "dataset", n_train=24, n_eval=6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, data_dir) -> dict:  # noqa: F811
    """One CLI run (Llama-style model, template unknown to TRL): 2 steps, a checkpoint each 2."""
    student = tiny_model("llama", "unknown")
    out = tmp_path_factory.mktemp("run") / "out"
    args = ["finetune", "--data", str(data_dir), "--student", str(student), "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--max-steps", "2", *FAST])
    assert result.exit_code == 0, result.output
    return {"out": out, "student": student, "output": result.output, "args": args}


def labelled_text(tok, row: dict) -> str:
    return tok.decode([t for t in row["labels"] if t != -100])


def mask_of(tok, messages: list[dict], train_on: str = "last") -> tuple[str, dict, str]:
    template, how = training_template(tok)
    msgs = prepare_messages(messages, renders_reasoning(tok, template))
    row = tokenize_row(tok, template, how, msgs, train_on)
    return how, row, labelled_text(tok, row)


QA = [
    {"role": "system", "content": "Answer with the number."},
    {"role": "user", "content": "What is 5 + 7?"},
    {"role": "assistant", "content": "The answer is 12."},
]


def test_mask_known_template_uses_trl_training_template(tiny_model):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model("qwen2", "known"))
    how, row, text = mask_of(tok, QA)
    assert how == "markers"
    # Exactly the assistant turn carries loss: its text and the end-of-turn token, nothing else.
    assert text == "\nThe answer is 12.<|im_end|>\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") in row["labels"]
    full = tok.decode(row["input_ids"])
    assert full.startswith("<|im_start|>system\nAnswer with the number.")
    # Masked positions are a prefix (system + user + assistant header), trained ones the rest.
    first = next(i for i, t in enumerate(row["labels"]) if t != -100)
    assert all(t == -100 for t in row["labels"][:first])
    assert row["labels"][first:] == row["input_ids"][first:]
    assert tok.decode(row["input_ids"][:first]).endswith("<|im_start|>assistant")


def test_mask_unknown_template_found_by_rendering(tiny_model):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model("llama", "unknown"))
    how, row, text = mask_of(tok, QA)
    assert how == "rendering"
    assert text == "The answer is 12.<|eot_id|>"
    assert row["labels"][-1] == tok.convert_tokens_to_ids("<|eot_id|>")  # EOS is trained


TWO_TURNS = [*QA, {"role": "user", "content": "And 1 + 1?"}, {"role": "assistant", "content": "2."}]


@pytest.mark.parametrize(
    "arch, template, last, both",
    [
        ("llama", "unknown", "2.<|eot_id|>", "The answer is 12.<|eot_id|>2.<|eot_id|>"),
        ("qwen2", "known", "\n2.<|im_end|>\n", "\nThe answer is 12.<|im_end|>\n\n2.<|im_end|>\n"),
    ],
)
def test_only_the_teachers_last_turn_is_trained(tiny_model, arch, template, last, both):  # noqa: F811
    """In a multi-turn prompt only the last assistant turn is the teacher's: by default it alone
    carries loss (both ways of finding the mask); train_on all trains every assistant turn."""
    from transformers import AutoTokenizer

    assert FinetuneConfig.model_fields["train_on"].default == "last"  # what a run gets unasked
    tok = AutoTokenizer.from_pretrained(tiny_model(arch, template))
    assert mask_of(tok, TWO_TURNS)[2] == last
    assert mask_of(tok, TWO_TURNS, "all")[2] == both


def test_reasoning_rendered_natively_or_folded_inline(tiny_model):  # noqa: F811
    from transformers import AutoTokenizer

    turn = [
        {"role": "user", "content": "What is 5 + 7?"},
        {"role": "assistant", "content": "12", "reasoning_content": "5 plus 7 is 12."},
    ]
    # Qwen2.5's template drops reasoning_content: it is folded into the answer instead.
    qwen = AutoTokenizer.from_pretrained(tiny_model("qwen2", "known"))
    assert not renders_reasoning(qwen, training_template(qwen)[0])
    assert mask_of(qwen, turn)[2] == "\n<think>\n5 plus 7 is 12.\n</think>\n\n12<|im_end|>\n"
    # The bespoke template renders reasoning_content itself, and it is trained.
    bespoke = AutoTokenizer.from_pretrained(tiny_model("llama", "unknown"))
    assert renders_reasoning(bespoke, training_template(bespoke)[0])
    assert mask_of(bespoke, turn)[2] == "<think>\n5 plus 7 is 12.\n</think>\n\n12<|eot_id|>"
    # Inline reasoning is kept as written.
    inline = [turn[0], {"role": "assistant", "content": "<think>\nadd\n</think>\n\n12"}]
    assert mask_of(bespoke, inline)[2] == "<think>\nadd\n</think>\n\n12<|eot_id|>"


def test_empty_think_added_by_template_is_not_trained(tiny_model, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model("qwen2", "known"))
    # Like Qwen3's template: every assistant turn gets a <think> block, empty without reasoning.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' %}<think>\n{{ m.reasoning_content or '' }}\n</think>\n\n{% endif %}"
        "{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    _, _, plain = mask_of(tok, QA)
    assert plain == "The answer is 12.<|im_end|>\n"  # no "<think>" in the loss
    turn = [QA[1], {"role": "assistant", "content": "12", "reasoning_content": "add"}]
    assert mask_of(tok, turn)[2] == "<think>\nadd\n</think>\n\n12<|im_end|>\n"
    # Per turn, not per row: an earlier turn's trace does not make a later empty block trained.
    mixed = [
        *turn,
        {"role": "user", "content": "And 1 + 1?"},
        {"role": "assistant", "content": "2"},
    ]
    assert mask_of(tok, mixed)[2] == "2<|im_end|>\n"
    assert mask_of(tok, mixed, "all")[2] == "<think>\nadd\n</think>\n\n12<|im_end|>\n2<|im_end|>\n"


def test_mask_checks_stop_bad_templates(tiny_model):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model("llama", "unknown"))
    # The assistant turn is never rendered: nothing to train on.
    tok.chat_template = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}<|eot_id|>{% endif %}{% endfor %}"
    _, row, _ = mask_of(tok, QA)
    with pytest.raises(TrainingError, match="p7 no assistant tokens"):
        check_masks([row], tok, ["p7"], "tiny")
    # The end-of-turn token is emitted by the *next* message: the answer would never stop.
    tok.chat_template = (
        "{% for m in messages %}{% if not loop.first %}<|eot_id|>{% endif %}"
        "{{ m.role }}: {{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<|eot_id|>assistant: {% endif %}"
    )
    _, row, text = mask_of(tok, QA)
    assert text.strip() == "The answer is 12."
    with pytest.raises(TrainingError, match="never learn to stop"):
        check_masks([row], tok, ["p8"], "tiny")


def test_packing_probe(tiny_model):  # noqa: F811
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen2", "known"))
    assert packing_keeps_sequences_apart(model)

    class Leaky(torch.nn.Module):
        """Attention stand-in that mixes every earlier token in, ignoring position ids."""

        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 8)
            self.config = model.config

        def forward(self, input_ids, position_ids=None, use_cache=False):
            h = self.emb(input_ids % 50).cumsum(1)
            return type("Out", (), {"logits": h})()

    assert not packing_keeps_sequences_apart(Leaky())


def test_packed_rows_keep_sequences_apart(tiny_model):  # noqa: F811
    """Two conversations packed in one row give the same logits as each alone; a shorter
    row in the same batch is padded; no loss crosses a boundary."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen2", "known")).eval()
    a, b, c = [5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]
    rows = [
        {"input_ids": a + b, "labels": a + b, "seq_lengths": [5, 3]},
        {"input_ids": c, "labels": c, "seq_lengths": [4]},
    ]
    batch = packed_rows_collator(pad_token_id=0)(rows)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 0, 0, 0]]
    assert batch["labels"][0, 5] == -100 and batch["labels"][1, 4:].eq(-100).all()
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        alone_b = model(input_ids=torch.tensor([b]), use_cache=False).logits
        alone_c = model(input_ids=torch.tensor([c]), use_cache=False).logits
    assert torch.allclose(packed[0, 5:], alone_b[0], atol=1e-5)
    assert torch.allclose(packed[1, :4], alone_c[0], atol=1e-5)


def test_finetune_cli_trains_saves_and_reports(trained):
    out = trained["out"]
    output = trained["output"]
    # The plan is printed before training.
    assert "memory estimate per device" in output
    assert "device cpu, dtype fp32, 4-bit no" in output
    assert output.index("memory estimate") < output.index("done:")
    for name in ("adapter/adapter_model.safetensors", "adapter/tokenizer.json", "config.yaml",
                 "train_report.json", "log_history.json", "loss.png"):  # fmt: skip
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert any((out / "checkpoints").glob("checkpoint-2"))
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == 2
    assert report["student"] == str(trained["student"])
    assert report["tokens_seen"] > 0 and report["train_tokens_per_s"] > 0
    assert report["peak_memory_bytes"] > 0 and report["wall_time_s"] > 0
    assert report["final_eval_loss"] is not None and report["final_train_loss"] > 0
    # Which data it trained on: what `distill eval` checks its held-out prompts against.
    from pipeline.artifacts import fingerprint, read_dataset

    train_ids = sorted(set(read_dataset(report["data"])["train"]["prompt_id"]))
    assert report["dataset"]["prompt_ids"] == train_ids
    assert report["dataset"]["fingerprint"] == fingerprint(train_ids)
    s = report["settings"]
    assert (s["device"], s["dtype"], s["quantize"], s["batch_size"], s["grad_accum"]) == (
        "cpu", "fp32", "none", 4, 1,
    )  # fmt: skip
    assert s["packing"] is True and s["gradient_checkpointing"] is False
    assert s["loss_mask"] == "rendering" and s["end_of_turn_token"] == "<|eot_id|>"
    history = json.loads((out / "log_history.json").read_text())
    assert any("eval_loss" in e for e in history) and any("loss" in e for e in history)
    cfg = (out / "config.yaml").read_text()
    assert "max_steps: 2" in cfg and "lora_r: 16" in cfg
    # The saved tokenizer keeps the student's own template (what inference will use).
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out / "adapter")
    original = AutoTokenizer.from_pretrained(trained["student"])
    assert saved.chat_template == original.chat_template


def test_training_changes_lora_not_base(trained):
    weights = load_file(str(trained["out"] / "adapter" / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)  # only the adapter is saved
    # PEFT starts lora_B at zero: after training it is not.
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and all(v.abs().sum() > 0 for v in b)
    # The student folder is untouched: loading base + adapter gives the base weights back.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_state = load_file(str(trained["student"] / "model.safetensors"))
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(trained["student"]), trained["out"] / "adapter"
    )
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(q, base_state["model.layers.0.self_attn.q_proj.weight"])


def test_merge_gives_same_logits_as_adapter(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", str(trained["out"]), "--to", str(merged_dir)])
    assert result.exit_code == 0, result.output
    assert "GGUF: skipped" in result.output  # no llama.cpp here, and we say so
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(trained["student"]), trained["out"] / "adapter"
    )
    base = AutoModelForCausalLM.from_pretrained(trained["student"])
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        a, b, c = (m.eval()(input_ids=ids).logits for m in (merged, peft, base))
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-5)  # the adapter did change the model
    assert (merged_dir / "tokenizer.json").exists() and (merged_dir / "model.safetensors").exists()


def test_a_merged_model_is_refused_on_the_prompts_it_was_trained_on(trained, data_dir, tmp_path):
    """The merged folder carries its training record: `distill eval` finds the base student and
    the prompt ids trained on from it wherever the folder was moved, and refuses the train split."""
    result = CliRunner().invoke(cli, ["merge", str(trained["out"]), "--to", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    merged = tmp_path / "moved" / "merged"
    shutil.move(tmp_path / "m", merged)  # away from its run, as a shipped model is
    record = json.loads((merged / "train_report.json").read_text())
    assert record["student"] == str(trained["student"]) and (merged / "log_history.json").is_file()
    args = ["eval", "--data", str(data_dir), "--finetuned", str(merged), "--split", "train"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "ev")])
    assert result.exit_code == 2, result.output
    assert "trained on" in result.output and "Traceback" not in result.output


def test_merge_keeps_a_bf16_students_dtype(trained, tmp_path):
    """A bf16 student merges in fp32 but is saved bf16: half the bytes of an fp32 save."""
    from transformers import AutoModelForCausalLM

    bf16 = tmp_path / "bf16-student"
    model = AutoModelForCausalLM.from_pretrained(trained["student"], dtype=torch.bfloat16)
    model.save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (trained["student"] / name).exists():
            (bf16 / name).write_bytes((trained["student"] / name).read_bytes())
    sizes = {}
    for student, to in ((bf16, tmp_path / "m16"), (trained["student"], tmp_path / "m32")):
        args = ["merge", str(trained["out"]), "--to", str(to), "--student", str(student)]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        sizes[to.name] = (to / "model.safetensors").stat().st_size
        dtypes = {t.dtype for t in load_file(str(to / "model.safetensors")).values()}
        assert dtypes == ({torch.bfloat16} if to.name == "m16" else {torch.float32})
    assert sizes["m16"] < 0.55 * sizes["m32"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m16").dtype == torch.bfloat16


def test_merge_runs_the_gguf_converter_when_given(trained, tmp_path):
    # llama.cpp is not installed here; a stand-in script at the same boundary (argv in, file out).
    fake = tmp_path / "convert_hf_to_gguf.py"
    fake.write_text(
        "import sys, pathlib\n"
        "a = sys.argv\n"
        "assert (pathlib.Path(a[1]) / 'model.safetensors').exists()\n"
        "pathlib.Path(a[a.index('--outfile') + 1]).write_text(a[a.index('--outtype') + 1])\n"
    )
    to = tmp_path / "merged"
    result = CliRunner().invoke(
        cli, ["merge", str(trained["out"]), "--to", str(to), "--gguf-converter", str(fake)]
    )
    assert result.exit_code == 0, result.output
    assert (to / "model-f16.gguf").read_text() == "f16"
    again = CliRunner().invoke(cli, ["merge", str(trained["out"]), "--to", str(to)])
    assert again.exit_code == 2 and "not empty" in again.output


def test_resume_refuses_a_changed_setting(trained):
    """A longer max_steps would resume at the finished schedule's learning rate (0); a changed
    batch would silently change training: both stop with how to start fresh."""
    out = trained["out"]
    more = [*trained["args"], "--max-steps", "4", *FAST]
    refused = CliRunner().invoke(cli, more)  # without --resume an existing run is not overwritten
    assert refused.exit_code == 2 and "--resume" in refused.output
    for flags, key in ((more, "max_steps 4"), ([*trained["args"], *FAST, "--batch-size", "2"], "batch_size 2")):  # fmt: skip
        result = CliRunner().invoke(cli, [*flags, "--resume"])
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert "\n" not in line and key in line and "another --out" in line
    assert json.loads((out / "train_report.json").read_text())["steps"] == 2  # nothing ran


def test_resume_reuses_the_saved_plan(tiny_model, data_dir, tmp_path):  # noqa: F811
    """An interrupted run resumes with the batch it started with, not a fresh auto-fit."""
    student = tiny_model("llama", "unknown")
    out = tmp_path / "out"
    args = ["finetune", "--data", str(data_dir), "--student", str(student), "--out", str(out)]
    first = CliRunner().invoke(cli, [*args, "--max-steps", "3", *FAST])
    assert first.exit_code == 0, first.output
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["batch_size"], plan["grad_accum"], plan["max_steps"]) == (4, 1, 3)
    # Interrupted after step 2: the last checkpoint and the adapter are gone.
    import shutil

    shutil.rmtree(out / "checkpoints" / "checkpoint-3")
    shutil.rmtree(out / "adapter")
    # Resumed with neither --max-steps nor --batch-size: auto-fit alone would pick 16 x 1.
    rest = FAST[4:]
    assert rest[0] == "--max-length"
    result = CliRunner().invoke(cli, [*args, *rest, "--resume"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == 3 and report["resumed_from"].endswith("checkpoint-2")
    assert (report["settings"]["batch_size"], report["settings"]["grad_accum"]) == (4, 1)
    steps = [e["step"] for e in json.loads((out / "log_history.json").read_text()) if "loss" in e]
    assert steps == [1, 2, 3]  # history carried over from the checkpoint, then step 3


def test_known_template_qwen_trains_end_to_end(tiny_model, data_dir, tmp_path):  # noqa: F811
    out = finetune(
        FinetuneConfig(
            data=str(data_dir),
            student=str(tiny_model("qwen2", "known")),
            out=str(tmp_path / "q"),
            max_steps=2,
            batch_size=2,
            grad_accum=2,
            max_length=128,
            packing=False,
            logging_steps=1,
            eval_steps=5,
            save_steps=5,
            report_to="tensorboard",
        )
    )
    report = json.loads((out / "train_report.json").read_text())
    assert report["settings"]["loss_mask"] == "markers"
    assert report["settings"]["packing"] is False and report["settings"]["grad_accum"] == 2
    assert report["settings"]["end_of_turn_token"] == "<|im_end|>"
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_a_relative_student_is_recorded_absolute(tiny_model, data_dir, tmp_path, monkeypatch):  # noqa: F811
    """`--student student` from one folder: `distill eval` run from another still finds it."""
    shutil.copytree(tiny_model("llama", "known"), tmp_path / "student")
    monkeypatch.chdir(tmp_path)
    cfg = FinetuneConfig(
        data=str(data_dir), student="student", out="ft", max_steps=1, batch_size=2,
        grad_accum=1, max_length=128, eval_steps=5, save_steps=5, report_to="none",
    )  # fmt: skip
    out = finetune(cfg)
    assert json.loads((out / "train_report.json").read_text())["student"] == str(
        tmp_path / "student"
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run = read_finetune_run(tmp_path / "ft")
    assert Path(run.student).is_absolute() and (Path(run.student) / "config.json").is_file()


@pytest.mark.parametrize("text", [b"\xff\xfe not utf-8", b"student: x\nwhen: 2020-13-01\n"])
def test_an_unreadable_config_yaml_falls_back_to_the_adapters_base(
    tmp_path: Path, text: bytes
) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "base-student"})
    )
    (tmp_path / "config.yaml").write_bytes(text)  # a traceback before, not the fallback
    assert read_finetune_run(tmp_path).student == "base-student"


def test_yaml_config_then_flags(tiny_model, data_dir, tmp_path):  # noqa: F811
    """A config file's finetune: section, overridden by flags; one target module by name."""
    cfg = tmp_path / "x.yaml"
    student = tiny_model("llama", "known")
    cfg.write_text(
        "finetune:\n"
        f"  data: {data_dir}\n  student: {student}\n  out: {tmp_path / 'o'}\n"
        "  lora_target_modules: q_proj\n  lora_r: 4\n  max_steps: 5\n  batch_size: 2\n"
        "  grad_accum: 1\n  max_length: 256\n  report_to: none\n"
    )
    result = CliRunner().invoke(cli, ["finetune", "--config", str(cfg), "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    adapter = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["q_proj"] and adapter["r"] == 4
    assert json.loads((tmp_path / "o" / "train_report.json").read_text())["steps"] == 1
    assert "max_steps: 1" in (tmp_path / "o" / "config.yaml").read_text()  # the flag won
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  lora_rank: 4\n")
    result = CliRunner().invoke(cli, ["finetune", "--config", str(bad)])
    assert result.exit_code == 2 and "unknown key 'lora_rank'" in result.output


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_messages", "has no 'messages' column"),
        ("missing_student", "does not exist"),
        ("bad_target", "matches no linear layer"),
        ("4bit_cpu", "4-bit quantization needs a CUDA GPU"),
        ("empty_mask", "no assistant tokens to train on"),
    ],
)
def test_bad_input_is_one_line_error(case, message, tiny_model, data_dir, tmp_path):  # noqa: F811
    from datasets import Dataset, DatasetDict

    data, student = data_dir, tiny_model("llama", "unknown")
    extra: list[str] = []
    if case == "no_messages":
        data = tmp_path / "bad"
        DatasetDict({"train": Dataset.from_list([{"prompt": "q", "answer": "a"}])}).save_to_disk(
            str(data)
        )
    elif case == "missing_student":
        student = tmp_path / "nope"
    elif case == "bad_target":
        extra = ["--lora-target-modules", "not_a_layer"]
    elif case == "4bit_cpu":
        extra = ["--quantize", "4bit"]
    elif case == "empty_mask":
        student = make_tiny_model(tmp_path / "m", "llama", "unknown")
        cfg_path = student / "tokenizer_config.json"
        tok_cfg = json.loads(cfg_path.read_text())
        tok_cfg["chat_template"] = (  # renders only the user turns
            "{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}<|eot_id|>"
            "{% endif %}{% endfor %}"
        )
        cfg_path.write_text(json.dumps(tok_cfg))
        (student / "chat_template.jinja").unlink(missing_ok=True)
    result = CliRunner().invoke(
        cli,
        ["finetune", "--data", str(data), "--student", str(student), "--out", str(tmp_path / "o"),
         "--max-steps", "1", *FAST, *extra],
    )  # fmt: skip
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


@pytest.mark.slow
def test_two_processes_share_the_effective_batch(tiny_model, data_dir, tmp_path):  # noqa: F811
    """The multi-process path (as under `accelerate launch`), on CPU: 2 processes with gloo."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pipeline",
        "finetune", "--data", str(data_dir), "--student", str(tiny_model("llama", "unknown")),
        "--out", str(out), "--max-steps", "2", "--batch-size", "2",
        "--effective-batch-size", "8", *FAST[4:],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("distill finetune:") == 1  # only rank 0 speaks
    s = json.loads((out / "train_report.json").read_text())["settings"]
    assert (s["world_size"], s["batch_size"], s["grad_accum"]) == (2, 2, 2)


def test_on_the_output_of_distill_build(tiny_model, tmp_path):  # noqa: F811
    """harvest (test server, answers with reasoning) -> build --reasoning separate -> finetune."""
    from pipeline.build import BuildConfig, build
    from pipeline.harvest import HarvestConfig, harvest
    from tests.openai_server import OpenAIServer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps(
                {"id": f"q{n}", "prompt": f"What is {n} + {n + 1}?", "reference": str(2 * n + 1)}
            )
            + "\n"
            for n in range(20)
        )
    )

    def responder(body: dict, i: int) -> dict:
        q = body["messages"][-1]["content"]
        a, b = (int(x) for x in q.removeprefix("What is ").removesuffix("?").split(" + "))
        reasoning = f"I add {a} and {b}." if a % 2 else ""  # half the answers reason
        return {"content": f"The answer is {a + b}.", "reasoning": reasoning}

    with OpenAIServer(reasoning="reasoning_content") as srv:
        srv.responder = responder
        harvest(
            HarvestConfig(prompts=[prompts], out=tmp_path / "run", base_url=srv.url, model="t"),
            pretty=False,
        )
    build(BuildConfig(run=tmp_path / "run", to=tmp_path / "ds", reasoning="separate", eval_size=4))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        ["finetune", "--data", str(tmp_path / "ds"), "--student", str(tiny_model("qwen2", "known")),
         "--out", str(out), "--max-steps", "2", *FAST],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == 2 and report["final_eval_loss"] is not None
    assert report["settings"]["reasoning"] == "inline <think>"  # Qwen2.5's template drops it
    # What was trained: reasoning rows with their <think> block, the others without any.
    import datasets
    from transformers import AutoTokenizer

    from pipeline.chat import tokenize_split

    tok = AutoTokenizer.from_pretrained(tiny_model("qwen2", "known"))
    template, how = training_template(tok)
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    assert any(m.get("reasoning_content") for r in ds["train"] for m in r["messages"])
    rows, _ = tokenize_split(ds["train"], tok, template, how, False)
    texts = [labelled_text(tok, r) for r in rows]
    assert any(t.startswith("\n<think>\nI add ") for t in texts)
    assert any(t.startswith("\nThe answer is") for t in texts)
