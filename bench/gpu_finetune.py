"""GPU fine-tuning: tokens/s and peak memory for LoRA and QLoRA, in fp16 and in bf16.

    .venv/bin/python -m bench.gpu_finetune                     # Qwen2.5-0.5B-shaped student
    .venv/bin/python -m bench.gpu_finetune --student data/models/SmolLM2-135M-Instruct

Needs a CUDA GPU (and bitsandbytes for the QLoRA rows); on a machine without one it says so and
returns. Each of the four arms runs `distill finetune` for `--steps` optimizer steps on the same
synthetic chat data (tests.tinymodels.make_chat_dataset) with the same batch, and reports
trained tokens/s (input tokens seen / train runtime) and torch.cuda.max_memory_allocated.

By default the student is built here with random weights in Qwen2.5-0.5B's exact shape (its
config.json values: 24 layers, hidden 896, vocab 151936) and the Qwen2.5 chat template, so the
benchmark needs no download: speed and memory do not depend on the weights' values. Pass
`--student DIR` to measure a real checkpoint instead (Qwen2.5-0.5B-Instruct, SmolLM2-135M, ...).
Runs in about 2-4 minutes on one recent GPU; `--json PATH` also writes the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QWEN25_05B: dict[str, Any] = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def qwen05b_shaped(path: Path) -> Path:
    """A random-weight model in Qwen2.5-0.5B's shape, saved in bf16 with a ChatML tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config
    from trl.chat_template_utils import qwen2_5_chat_template

    from tests.tinymodels import make_tokenizer

    tok = make_tokenizer()
    tok.chat_template = qwen2_5_chat_template
    tok.eos_token = "<|im_end|>"
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(**QWEN25_05B, eos_token_id=eos, pad_token_id=pad, dtype="bfloat16")
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    GenerationConfig(eos_token_id=eos, pad_token_id=pad).save_pretrained(str(path))
    del model
    return path


def run_arm(
    out: Path,
    data: Path,
    student: str,
    steps: int,
    batch_size: int,
    max_length: int,
    dtype: str,
    qlora: bool,
) -> dict:
    """One fine-tune of `steps` steps; its speed, peak memory, estimate and final loss."""
    import torch

    from pipeline.finetune import FinetuneConfig, finetune

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = FinetuneConfig(
        data=str(data),
        student=student,
        out=str(out),
        max_steps=steps,
        batch_size=batch_size,
        grad_accum=1,
        max_length=max_length,
        dtype=dtype,  # type: ignore[arg-type]
        quantize="4bit" if qlora else "none",
        gradient_checkpointing=False,
        eval_steps=10**6,
        save_steps=10**6,
        logging_steps=5,
        report_to="none",
    )
    with contextlib.redirect_stdout(io.StringIO()):
        finetune(cfg)
    report = json.loads((out / "train_report.json").read_text())
    return {
        "train_tokens_per_s": report["train_tokens_per_s"],
        "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "estimated_gib": round(report["estimated_memory_bytes"] / 2**30, 3),
        "packing": report["settings"]["packing"],
        "final_train_loss": report["final_train_loss"],
    }


def main(
    student: str | None = None,
    steps: int = 20,
    batch_size: int = 8,
    max_length: int = 512,
    json_path: str | None = None,
) -> dict:
    import torch

    if not torch.cuda.is_available():
        print("bench.gpu_finetune: no CUDA GPU on this machine; nothing measured")
        return {"skipped": "no CUDA GPU"}
    from tests.tinymodels import make_chat_dataset

    try:
        import bitsandbytes  # noqa: F401

        has_bnb = True
    except Exception:
        has_bnb = False
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    results: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "student": student or "random weights, Qwen2.5-0.5B shape",
        "steps": steps,
        "batch_size": batch_size,
        "max_length": max_length,
        "arms": {},
    }
    try:
        path = student or str(qwen05b_shaped(tmp / "student"))
        data = make_chat_dataset(tmp / "data", n_train=batch_size * steps * 2, n_eval=8)
        for method in ("lora", "qlora"):
            for dtype in ("fp16", "bf16"):
                arm = f"{method}-{dtype}"
                if dtype == "bf16" and not torch.cuda.is_bf16_supported():
                    results["arms"][arm] = {"skipped": "no bf16 on this GPU"}
                    continue
                if method == "qlora" and not has_bnb:
                    results["arms"][arm] = {"skipped": "bitsandbytes not installed"}
                    continue
                results["arms"][arm] = run_arm(
                    tmp / arm, data, path, steps, batch_size, max_length, dtype, method == "qlora"
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{results['gpu']}: {results['student']}, {steps} steps of {batch_size} x {max_length}")
    for arm, r in results["arms"].items():
        if "skipped" in r:
            print(f"  {arm:>11}: skipped ({r['skipped']})")
        else:
            print(
                f"  {arm:>11}: {r['train_tokens_per_s']:9.0f} tokens/s, "
                f"max_memory_allocated {r['max_memory_allocated_gib']:.2f} GiB "
                f"(estimate {r['estimated_gib']:.2f})"
            )
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", help="model folder (default: random Qwen2.5-0.5B-shaped)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--json", dest="json_path", help="also write the figures here")
    a = ap.parse_args()
    main(a.student, a.steps, a.batch_size, a.max_length, a.json_path)
