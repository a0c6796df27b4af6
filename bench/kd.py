"""KD vs SFT: the same data, steps and seed, one arm with `--loss kd`, measured in one run.

    python -m bench.kd                       # 3 seeds; prints the table, writes data/bench/kd/
    python -m bench.kd OUT --seeds 0 --steps 30 --alphas 1.0 --temperature 2   # one variant
    make demo-kd                             # the same, as the user-facing side-by-side report

The teacher is tests/model_server.py's tiny real model, trained 300 steps on a counting task it
masters ("What comes after 4?" -> "The answer is 5." or "It is 5."; measured once: 100% greedy
accuracy on the 54 prompts, 99.7% of its mass in its top 20 per answer token, its uncertainty in
the phrasing; --phrasings 4 teaches it four). The student is the same tiny model pretrained on
another task (products) in the same chat format, as a real student knows how to answer but not
what the teacher knows. Per seed: harvest the 54 prompts once, unseeded, with --logprobs
--top-logprobs 20 at temperature 1 (the SFT text follows the teacher's distribution), build with
--tokenizer (18 held out), train every arm the same steps with the seed (sft, and kd at each
alpha) on the same rows, then score each on the held-out prompts with `distill eval`:
teacher_kl, NLL of the teacher's answers, accuracy vs the reference; and each KD arm against SFT
in one `distill eval --against` report (the paired intervals a user sees).

Steps: 2000 (about 20 s an arm here). At 60 both students are still far from fitting their 36
rows (training CE about 2), and the comparison measured early noise. Held-out teacher-KL KD/SFT
(alpha 1, 3 seeds each, measured with this bench): 0.94 at 60 steps, 0.86 at 400, 0.78-0.79 at
1000 (three runs), 0.727 and 0.802 at 2000 (two runs: the harvest is unseeded, so runs differ). SFT fits the one phrasing it saw per
prompt; KD fits the teacher's distribution over them.

Reported: KD/SFT held-out teacher-KL (goal <= 0.8) per seed and its spread, NLL and accuracy per
arm (pooled over the seeds, 95% Wilson interval), kd_loss / ce_loss at the first and last logged
step, KD/SFT step time measured interleaved (goal <= 1.15), dataset bytes per 1,000 answer tokens.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from tests.conftest import harvest_args, write_jsonl

ASK = [
    "What comes after {n}?",
    "Which number follows {n}?",
    "Count up by one from {n}.",
    "What is {n} plus one?",
    "Add one to {n}.",
    "Say the number after {n}.",
]
# The teacher learns each phrasing for every prompt: a split it keeps (--phrasings: how many).
SAY = ["The answer is {m}.", "It is {m}.", "That makes {m}.", "Next comes {m}."]
TASK = [(a.format(n=n), n + 1) for a in ASK for n in range(9)]
TEACHER_STEPS = 300
# The student starts as a pretrained one does: it knows the chat format and answers in it, on
# another task (products), not the teacher's. A fresh random tiny model cannot learn from either
# arm under LoRA: its frozen random lm_head caps every logit near 0.6, so both stay near uniform.
STUDENT_TASK = [
    (f"What is {a} times {b}?", f"The answer is {a * b}.") for a in range(2, 7) for b in range(2, 7)
]
STUDENT_STEPS = 150
TRAIN = [
    "--batch-size", "4", "--grad-accum", "1", "--max-length", "256", "--eval-steps", "1000",
    "--save-steps", "1000", "--logging-steps", "5", "--report-to", "none",
]  # fmt: skip


def invoke(*args: str) -> None:
    from pipeline.cli import cli

    result = CliRunner().invoke(cli, list(args))
    if result.exit_code != 0:
        raise RuntimeError(f"distill {args[0]} failed: {result.output[-800:]}")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def arms(alphas: list[float]) -> dict[str, list[str]]:
    """Arm name -> its finetune flags: sft, and one kd arm per alpha."""
    out = {"sft": ["--loss", "sft"]}
    for a in alphas:
        out[f"kd{a:g}"] = ["--loss", "kd", "--kd-alpha", str(a)]
    return out


def one_seed(tmp: Path, teacher: Path, student: Path, seed: int, o: argparse.Namespace) -> dict:
    from tests.model_server import ModelServer

    rows = [{"id": f"q{i}", "prompt": q, "reference": str(m)} for i, (q, m) in enumerate(TASK)]
    prompts = write_jsonl(tmp / "prompts.jsonl", rows)
    run = tmp / f"run{seed}"
    with ModelServer(teacher) as srv:
        more = ["--logprobs", "--top-logprobs", str(o.top_k), "--max-tokens", "12"]
        # No --seed: harvest sends the same seed with every prompt and the server then draws the
        # same random stream for each, so one seed's answers all take the same phrasing (seeds 0
        # and 2: 18 of 18 answers checked "It is N."), which flatters KD. Unseeded, each answer is drawn
        # on its own, as the teacher's distribution says.
        invoke(*harvest_args(srv.url, prompts, run, *more, "--temperature", "1"))
    (tmp / "build.yaml").write_text(
        "build:\n  filters: {unfinished: false, verify: false, near_duplicate: false}\n"
    )
    build = ["build", "--config", str(tmp / "build.yaml"), str(run), "--eval-size", "18"]
    invoke(*build, "--to", str(tmp / f"plain{seed}"))
    ds = tmp / f"ds{seed}"
    invoke(*build, "--to", str(ds), "--tokenizer", str(student))
    kd_info = json.loads((ds / "build_report.json").read_text())["kd"]
    # Both arms train on this dataset's text; kd on the teacher's own segmentation where it is
    # not the student's canonical one ("resegmented" rows), sft on the canonical one.
    out: dict[str, Any] = {"coverage": kd_info["coverage"], "rows": kd_info["rows_by_alignment"]}
    common = ["--max-steps", str(o.steps), "--seed", str(seed), "--lr", str(o.lr), *TRAIN]
    common += ["--kd-temperature", str(o.temperature)]
    for arm, flags in arms(o.alphas).items():
        ft = tmp / f"ft-{arm}{seed}"
        invoke("finetune", "--data", str(ds), "--student", str(student), "--out", str(ft),
               *common, *flags)  # fmt: skip
        history = json.loads((ft / "log_history.json").read_text())
        logged = [h for h in history if "kd_loss" in h and "ce_loss" in h]
        ev = tmp / f"eval-{arm}{seed}"
        invoke("eval", "--data", str(ds), "--finetuned", str(ft), "--out", str(ev),
               "--max-new-tokens", "12")  # fmt: skip
        m = json.loads((ev / "report.json").read_text())["metrics"]
        out[arm] = {k: m["finetuned"][k] for k in ("teacher_kl", "nll", "accuracy", "n_reference")}
        out[arm]["terms"] = [(h["step"], h["kd_loss"], h["ce_loss"]) for h in logged]
        out["base"] = {k: m["base"][k] for k in ("teacher_kl", "nll", "accuracy", "n_reference")}
    for arm in arms(o.alphas):  # each KD arm against SFT in one report: the paired intervals
        if arm == "sft":
            continue
        ev = tmp / f"eval-{arm}-vs-sft{seed}"
        invoke("eval", "--data", str(ds), "--finetuned", str(tmp / f"ft-{arm}{seed}"),
               "--against", str(tmp / f"ft-sft{seed}"), "--out", str(ev), "--max-new-tokens", "12")  # fmt: skip
        diffs = json.loads((ev / "report.json").read_text())["differences"]
        out[arm]["vs_sft"] = {k: diffs[k] for k in ("teacher_kl", "accuracy") if k in diffs}
    answer_tokens = kd_info["answer_tokens"]
    out["bytes_per_1000_answer_tokens"] = {
        "with_targets": round(1000 * folder_bytes(ds) / answer_tokens),
        "without": round(1000 * folder_bytes(tmp / f"plain{seed}") / answer_tokens),
        "targets_column": kd_info["bytes_per_1000_answer_tokens"],
    }
    return out


def step_times(ds: Path, student: Path, out: Path, pairs: int = 60) -> dict[str, float]:
    """KD and SFT optimizer steps timed interleaved on the same model and the same batches.

    The trainer is built as `distill finetune --loss kd` builds it; an SFT step is the same batch
    without kd_index through SFTTrainer's own loss (trainer.kd unset), a KD step goes through
    DistillTrainer.kd_loss. Each pair runs both on one batch, the order alternating (ABBA), so
    load from other processes falls on both arms alike; reported: the median of the per-pair
    ratios and its interquartile range, and the median step of each arm.
    """
    import torch

    from pipeline import finetune as ft

    cfg = ft.FinetuneConfig(
        data=str(ds), student=str(student), out=str(out), loss="kd", max_steps=1,
        batch_size=4, grad_accum=1, max_length=256, report_to="none", seed=0,
    )  # fmt: skip
    setup = ft.plan_run(cfg)
    data = ft.prepare_data(cfg, setup)
    model, packing = ft.load_model(cfg, setup, data)
    trainer = ft.build_trainer(cfg, setup, data, model, packing[0])
    trainer.use_kd(data.kd, cfg)
    model = trainer.model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batches = list(itertools.islice(itertools.cycle(trainer.get_train_dataloader()), pairs + 4))

    def step(batch: dict, kd: bool) -> float:
        trainer.kd = data.kd if kd else None
        inputs = dict(batch) if kd else {k: v for k, v in batch.items() if k != "kd_index"}
        start = time.perf_counter()
        trainer.compute_loss(model, inputs).backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - start

    for b in batches[:4]:  # warm-up, not timed
        step(b, True), step(b, False)
    kd_s, sft_s = [], []
    for i, b in enumerate(batches[4:]):
        if i % 2 == 0:
            kd_s.append(step(b, True))
            sft_s.append(step(b, False))
        else:
            sft_s.append(step(b, False))
            kd_s.append(step(b, True))
    ratios = sorted(k / s for k, s in zip(kd_s, sft_s))
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {
        "ratio_median": statistics.median(ratios),
        "ratio_q1": q1,
        "ratio_q3": q3,
        "kd_ms": 1000 * statistics.median(kd_s),
        "sft_ms": 1000 * statistics.median(sft_s),
        "pairs": len(ratios),
    }


def spread(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f})"


def pooled(per: dict, arm: str) -> str:
    """Accuracy pooled over the seeds with its 95% Wilson interval."""
    from pipeline.evaluate import wilson

    n = sum(p[arm]["n_reference"] for p in per.values())
    k = sum(round(p[arm]["accuracy"] * p[arm]["n_reference"]) for p in per.values())
    lo, hi = wilson(k, n) or [0.0, 0.0]
    return f"{k}/{n} = {k / max(n, 1):.0%} [{lo:.0%}, {hi:.0%}]"


def report(per: dict, timing: dict, o: argparse.Namespace) -> tuple[str, dict]:
    names = ["base", *arms(o.alphas)]
    kd_names = [a for a in names if a.startswith("kd")]
    lines = [
        f"KD vs SFT: {o.steps} steps at lr {o.lr}, {len(TASK)} prompts (18 held out), seeds "
        f"{o.seeds}, teacher top-{o.top_k} ({o.phrasings} phrasings), kd_temperature "
        f"{o.temperature}",
        f"{'seed':<5} {'arm':<6} {'teacher_kl':>10} {'nll':>7} {'accuracy':>8}",
    ]
    for seed, p in per.items():
        for arm in names:
            r = p[arm]
            lines.append(
                f"{seed:<5} {arm:<6} {r['teacher_kl']:>10.4f} {r['nll']:>7.3f} {r['accuracy']:>8.0%}"
            )
    ratios = {
        a: [p[a]["teacher_kl"] / p["sft"]["teacher_kl"] for p in per.values()] for a in kd_names
    }
    lines.append("held-out teacher-KL KD/SFT (goal <= 0.8):")
    lines += [
        f"  {a}: {spread(r)}   per seed {[round(x, 3) for x in r]}" for a, r in ratios.items()
    ]
    lines.append(
        "KD - SFT in one `distill eval --finetuned KD --against SFT` report per seed (95% paired "
        "bootstrap over prompts):"
    )
    for a in kd_names:
        for seed, p in per.items():
            d = p[a].get("vs_sft", {})
            lines.append(
                f"  {a} seed {seed}: "
                + "; ".join(
                    f"{k} {v['diff']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}] {v['verdict']}"
                    for k, v in d.items()
                )
            )
    lines.append("held-out NLL of the teacher's answers, mean over seeds:")
    lines += [f"  {a}: {statistics.fmean(p[a]['nll'] for p in per.values()):.3f}" for a in names]
    lines.append("accuracy vs reference, pooled over seeds, 95% Wilson interval:")
    lines += [f"  {a}: {pooled(per, a)}" for a in names]
    first = next(iter(per.values()))
    lines.append(
        f"KD and CE terms, seed {next(iter(per))} (step: kd_loss, ce_loss), first -> last:"
    )
    for a in names[1:]:
        t = first[a]["terms"]
        if t:
            lines.append(
                f"  {a}: step {t[0][0]}: {t[0][1]:.3f}, {t[0][2]:.3f} -> "
                f"step {t[-1][0]}: {t[-1][1]:.3f}, {t[-1][2]:.3f}"
            )
    size = first["bytes_per_1000_answer_tokens"]
    lines += [
        f"step time KD/SFT, interleaved, {timing['pairs']} pairs: median {timing['ratio_median']:.3f} "
        f"(IQR {timing['ratio_q1']:.3f}-{timing['ratio_q3']:.3f}); median step KD "
        f"{timing['kd_ms']:.1f} ms, SFT {timing['sft_ms']:.1f} ms   (goal <= 1.15)",
        f"dataset bytes per 1,000 answer tokens: {size['with_targets']} with targets, "
        f"{size['without']} without; the kd_targets column alone {size['targets_column']}",
        f"coverage: {[p['coverage'] for p in per.values()]}; rows by alignment: "
        f"{[p['rows'] for p in per.values()]}",
    ]
    return "\n".join(lines), ratios


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from tests.model_server import make_teacher_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report_dir", nargs="?", type=Path, default=Path("data/bench/kd"))
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--alphas", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 1.0])
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--phrasings", type=int, default=2, choices=range(1, len(SAY) + 1))
    ap.add_argument("--teacher", type=Path, help="keep the trained teacher here and reuse it")
    o = ap.parse_args(argv)

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-kd-"))
    started = time.time()
    try:
        pairs = [(q, s.format(m=m)) for q, m in TASK for s in SAY[: o.phrasings]]
        teacher = make_teacher_model(o.teacher or tmp / "teacher", steps=TEACHER_STEPS, pairs=pairs)
        student = make_teacher_model(tmp / "student", steps=STUDENT_STEPS, pairs=STUDENT_TASK)
        per = {seed: one_seed(tmp, teacher, student, seed, o) for seed in o.seeds}
        timing = step_times(tmp / f"ds{o.seeds[0]}", student, tmp / "timing")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text, ratios = report(per, timing, o)
    text += f"\nwall time {time.time() - started:.0f} s"
    print(text)
    o.report_dir.mkdir(parents=True, exist_ok=True)
    (o.report_dir / "report.md").write_text(
        "# KD vs SFT, side by side\n\n```\n" + text + "\n```\n", encoding="utf-8"
    )
    (o.report_dir / "report.json").write_text(
        json.dumps({"per_seed": per, "teacher_kl_ratio": ratios, "step_time": timing}, indent=1)
    )
    print(f"report -> {o.report_dir / 'report.md'}")
    return {"per_seed": per, "teacher_kl_ratio": ratios, "step_time": timing}


if __name__ == "__main__":
    main()
