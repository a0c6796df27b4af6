"""KD vs SFT: the same data, steps and seed, one arm with `--loss kd`, measured in one run.

    python -m bench.kd                 # 3 seeds; prints the table, writes data/bench/kd/report.md
    make demo-kd                       # the same, as the user-facing side-by-side report

The teacher is tests/model_server.py (a tiny real model with real top-k logprobs: the demo's GGUF
teacher cannot return them offline); the student is a fresh tiny model with the same tokenizer.
Per seed: harvest 48 prompts with --logprobs --top-logprobs 5 once, build with --tokenizer, train
both arms for the same steps, then score both on the held-out prompts with `distill eval`
(teacher_kl, NLL of the teacher's answers, accuracy vs reference).

Reported: KD/SFT held-out teacher-KL (goal <= 0.8) with its spread over the seeds, NLL and accuracy
per arm, KD step time / SFT step time (goal <= 1.15; train_runtime / steps, same process), and
dataset bytes per 1,000 answer tokens with and without the targets.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from tests.conftest import harvest_args, write_jsonl

STEPS = 30
TRAIN = [
    "--batch-size", "4", "--grad-accum", "1", "--max-length", "256", "--eval-steps", "1000",
    "--save-steps", "1000", "--logging-steps", "5", "--report-to", "none", "--lr", "3e-3",
]  # fmt: skip


def invoke(*args: str) -> None:
    from pipeline.cli import cli

    result = CliRunner().invoke(cli, list(args))
    if result.exit_code != 0:
        raise RuntimeError(f"distill {args[0]} failed: {result.output[-800:]}")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def one_seed(tmp: Path, teacher: Path, student: Path, seed: int) -> dict[str, Any]:
    from tests.model_server import ModelServer

    rows = [
        {
            "id": f"s{seed}q{i}",
            "prompt": f"What is {i} + {seed + i}?",
            "reference": str(seed + 2 * i),
        }
        for i in range(48)
    ]
    prompts = write_jsonl(tmp / f"prompts{seed}.jsonl", rows)
    run = tmp / f"run{seed}"
    with ModelServer(teacher) as srv:
        more = ["--logprobs", "--top-logprobs", "5", "--max-tokens", "24", "--temperature", "0.3"]
        invoke(*harvest_args(srv.url, prompts, run, *more), "--seed", str(seed))
    (tmp / "build.yaml").write_text(
        "build:\n  filters: {unfinished: false, verify: false, near_duplicate: false}\n"
    )
    build = ["build", "--config", str(tmp / "build.yaml"), str(run), "--eval-size", "12"]
    invoke(*build, "--to", str(tmp / f"plain{seed}"))
    invoke(*build, "--to", str(tmp / f"ds{seed}"), "--tokenizer", str(student))
    ds = tmp / f"ds{seed}"
    kd_info = json.loads((ds / "build_report.json").read_text())["kd"]
    out: dict[str, Any] = {"coverage": kd_info["coverage"]}
    for arm in ("sft", "kd"):
        ft = tmp / f"ft-{arm}{seed}"
        invoke("finetune", "--data", str(ds), "--student", str(student), "--out", str(ft),
               "--max-steps", str(STEPS), "--seed", str(seed), "--loss", arm, *TRAIN)  # fmt: skip
        rep = json.loads((ft / "train_report.json").read_text())
        ev = tmp / f"eval-{arm}{seed}"
        invoke("eval", "--data", str(ds), "--finetuned", str(ft), "--out", str(ev),
               "--max-new-tokens", "16")  # fmt: skip
        m = json.loads((ev / "report.json").read_text())["metrics"]
        out[arm] = {
            "teacher_kl": m["finetuned"]["teacher_kl"],
            "nll": m["finetuned"]["nll"],
            "accuracy": m["finetuned"]["accuracy"],
            "step_s": rep["train_runtime_s"] / rep["steps"],
        }
        out["base"] = {k: m["base"][k] for k in ("teacher_kl", "nll", "accuracy")}
    answer_tokens = kd_info["answer_tokens"]
    out["bytes_per_1000_answer_tokens"] = {
        "with_targets": round(1000 * folder_bytes(ds) / answer_tokens),
        "without": round(1000 * folder_bytes(tmp / f"plain{seed}") / answer_tokens),
        "targets_column": kd_info["bytes_per_1000_answer_tokens"],
    }
    return out


def spread(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f})"


def main(seeds: tuple[int, ...] = (0, 1, 2), report_dir: Path | None = None) -> dict[str, Any]:
    import torch

    from tests.model_server import make_teacher_model
    from tests.tinymodels import make_tiny_model

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-kd-"))
    try:
        teacher = make_teacher_model(tmp / "teacher")
        student = make_tiny_model(tmp / "student")
        per = {seed: one_seed(tmp, teacher, student, seed) for seed in seeds}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kl_ratio = [p["kd"]["teacher_kl"] / p["sft"]["teacher_kl"] for p in per.values()]
    step_ratio = [p["kd"]["step_s"] / p["sft"]["step_s"] for p in per.values()]
    lines = [
        f"KD vs SFT: {STEPS} steps, 48 prompts (12 held out), seeds {list(seeds)}, tiny teacher top-5",
        f"{'seed':<5} {'arm':<5} {'teacher_kl':>10} {'nll':>7} {'accuracy':>8} {'step ms':>8}",
    ]
    for seed, p in per.items():
        for arm in ("base", "sft", "kd"):
            r = p[arm]
            acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.0%}"
            step = f"{1000 * r['step_s']:.1f}" if "step_s" in r else "-"
            lines.append(
                f"{seed:<5} {arm:<5} {r['teacher_kl']:>10.4f} {r['nll']:>7.3f} {acc:>8} {step:>8}"
            )
    size = next(iter(per.values()))["bytes_per_1000_answer_tokens"]
    lines += [
        f"teacher-KL KD/SFT: {spread(kl_ratio)}   (goal <= 0.8)",
        f"step time KD/SFT:  {spread(step_ratio)}   (goal <= 1.15)",
        f"dataset bytes per 1,000 answer tokens (seed {seeds[0]}): {size['with_targets']} with "
        f"targets, {size['without']} without; the kd_targets column alone {size['targets_column']}",
        f"coverage: {[p['coverage'] for p in per.values()]}",
    ]
    text = "\n".join(lines)
    print(text)
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "report.md").write_text(
            "# KD vs SFT, side by side\n\n```\n" + text + "\n```\n", encoding="utf-8"
        )
        print(f"report -> {report_dir / 'report.md'}")
    return {
        "per_seed": per,
        "teacher_kl_ratio": kl_ratio,
        "step_time_ratio": step_ratio,
    }


if __name__ == "__main__":
    main(report_dir=Path(sys.argv[1]) if len(sys.argv) > 1 else Path("data/bench/kd"))
