"""Packing: useful (trained, unmasked-label) tokens per second of forward+backward with
`distill finetune`'s packing (best-fit decreasing, sequences kept apart by position ids) against
TRL's padded default (`packing=False`: each batch padded to its longest row), same tiny model,
same data, same run, CPU.

    .venv/bin/python -m bench.packing [--rows 480] [--batch-size 8] [--repeats 3]

Like with like: both arms run forward+backward once over every training conversation, with the
batches, collator and loss `distill finetune` builds (its step functions), and no optimizer step:
packing puts several conversations in one row, so a packed epoch has fewer optimizer steps, and
timing whole training would count those saved steps as packing's speed. The figure is trained
label tokens (the same in both arms) / forward+backward seconds. Arms alternate and each keeps
its best of `--repeats` runs, so a busy machine hurts both alike; torch runs on one thread.
Goal: ratio >= 1.5.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_arm(data: Path, student: Path, out: Path, packing: bool, batch_size: int) -> dict:
    from pipeline import finetune as ft

    cfg = ft.FinetuneConfig(
        data=str(data),
        student=str(student),
        out=str(out),
        epochs=1,
        batch_size=batch_size,
        grad_accum=1,
        max_length=512,
        packing=packing,
        report_to="none",
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        setup = ft.plan_run(cfg)
        data_ = ft.prepare_data(cfg, setup)
        model, _ = ft.load_model(cfg, setup, data_)
        trainer = ft.build_trainer(cfg, setup, data_, model, packing)
        batches = list(trainer.get_train_dataloader())
    model = trainer.model
    # Shifted labels: the tokens the loss counts (equal in both arms when no row is cut).
    label_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    trainer.current_gradient_accumulation_steps = 1  # set by train(), which we do not run
    started = time.perf_counter()
    for b in batches:
        trainer.training_step(model, b)  # forward + backward, as in training
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return {
        "useful_tokens_per_s": label_tokens / seconds,
        "steps": len(batches),
        "conversations": len(data_.train_rows),
        "runtime_s": seconds,
        "label_tokens": label_tokens,
    }


def main(rows: int = 480, batch_size: int = 8, repeats: int = 3) -> dict:
    import torch

    from tests.tinymodels import make_chat_dataset, make_tiny_model

    # One intra-op thread: on a shared 2-core machine, a tiny model's matmuls are 10-40x slower
    # with threads fighting other processes, which would measure the machine, not packing.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    tmp = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    try:
        student = make_tiny_model(tmp / "student", arch="qwen2", template="known")
        data = make_chat_dataset(tmp / "data", n_train=rows, n_eval=2, reasoning="mixed")
        best: dict[str, dict] = {}
        for i in range(repeats):
            for arm, packing in (("packed", True), ("padded", False)):
                r = run_arm(data, student, tmp / f"{arm}-{i}", packing, batch_size)
                if arm not in best or r["useful_tokens_per_s"] > best[arm]["useful_tokens_per_s"]:
                    best[arm] = r
        ratio = best["packed"]["useful_tokens_per_s"] / best["padded"]["useful_tokens_per_s"]
        result = {
            "rows": rows,
            "batch_size": batch_size,
            "packed": best["packed"],
            "padded_trl_default": best["padded"],
            "ratio": round(ratio, 2),
            "goal": 1.5,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(threads)
    for arm in ("packed", "padded_trl_default"):
        r = result[arm]
        print(
            f"{arm:>18}: {r['useful_tokens_per_s']:8.0f} useful tokens/s "
            f"({r['label_tokens']} label tokens, {r['conversations']} conversations in "
            f"{r['steps']} forward+backward steps, {r['runtime_s']:.2f} s)"
        )
    print(f"{'ratio':>18}: {result['ratio']:.2f}x (goal >= 1.5)")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=480)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    main(a.rows, a.batch_size, a.repeats)
