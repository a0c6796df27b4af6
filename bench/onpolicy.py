"""On-policy vs SFT on the demo's context-distillation task, at equal teacher tokens, in one run.

    python -m bench.onpolicy                   # prints the table; data/bench/onpolicy/report.md
    python -m bench.onpolicy --quick OUT       # smaller budgets (what `make demo-onpolicy` runs)

The task is the demo's (configs/demo.yaml, prompts/demo/): review sentiment in one fixed line. The
student is SmolLM2-135M-Instruct without the system prompt; the teacher is the same model given
prompts/demo/system.md, served by vLLM's CPU build (pipeline/demo/serve.py, engine "vllm"), which
both generates (SFT arm) and scores (on-policy arm, `prompt_logprobs`).

- SFT arm: harvest the teacher's answers to the first N training prompts (and the held-out ones,
  with top-5 logprobs, for the eval's teacher-KL), build as the demo does but without the
  reference filter (neither arm sees the labels), LoRA fine-tune, for each N in the budgets.
- On-policy arms: `distill onpolicy` on the same training prompts, with the system prompt as
  teacher-only context, run on (it resumes) while a step still fits in half of, then in each SFT
  budget, then further (shown at the tokens it scored: about the budget, since steps are sized by
  the rate so far; 2,149 against 2,148 once). The forward-KL arm (every run): GKD's on-policy forward KL toward the teacher's top-20 sharpened to temperature 0.05 (the teacher's greedy next
  token at each of the student's prefixes), one prompt x 2 samples a step. The reverse-KL arm
  (full run only): the per-token reverse KL of Thinking Machines' recipe, 4 prompts x 4 samples.
- Every arm: `distill eval` on the held-out prompts (format compliance, accuracy vs the reference
  label, teacher-KL on the teacher's answers).

Teacher tokens are answer tokens: the tokens the teacher generated (SFT) or scored (on-policy). The
tokens each request also carried (system prompt and review) are reported beside them. Printed:
"teacher tokens on-policy needs to reach SFT's held-out accuracy / SFT's", whatever it is.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs/demo.yaml"
# (held-out prompts, SFT budgets in training prompts, on-policy budgets beyond SFT's largest)
FULL: dict[str, Any] = {"held_out": 32, "sft_prompts": (16, 48, 96), "extra": (2, 4)}
QUICK: dict[str, Any] = {"held_out": 16, "sft_prompts": (16, 48), "extra": (2,)}
COMMON = {"lr": 1e-3, "lora_r": 8, "lora_alpha": 16, "eval_prompts": 0, "save_steps": 1}
ARMS = {  # name -> settings; the arms are compared by `distill eval`, not by eval_prompts
    "forward KL": {  # per step: 1 prompt x 2 samples of <= 8 tokens
        **COMMON,
        "samples": 2,
        "prompts_per_step": 1,
        "max_new_tokens": 8,
        "top_k": 20,
        "kd_alpha": 1.0,
        "reverse_kl": 0.0,
        "teacher_temperature": 0.05,
    },
    "reverse KL": {**COMMON, "samples": 4, "prompts_per_step": 4, "max_new_tokens": 12},
}
QUICK_ARMS = ("forward KL",)


def with_(cfg: Any, **update: Any) -> Any:
    """A copy of a stage config with fields changed, validated (a path given as a string, which
    both str and Path fields take)."""

    def plain(v: Any) -> Any:
        return (
            str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, list) else v
        )

    return type(cfg).model_validate(
        {**cfg.model_dump(), **{k: plain(v) for k, v in update.items()}}
    )


def say(text: str) -> None:
    print(f"bench.onpolicy: {text}", file=sys.stderr, flush=True)


def sft_tokens(run: Path, held_ids: set[str]) -> tuple[int, int]:
    """(answer tokens, all tokens) the teacher generated / processed for the training prompts."""
    from pipeline.store import Store

    answer = total = 0
    with Store(run, readonly=True) as s:
        for r in s.iter_responses():
            if r.prompt_id not in held_ids:
                answer += r.completion_tokens or 0
                total += (r.prompt_tokens or 0) + (r.completion_tokens or 0)
    return answer, total


def onpolicy_tokens(out: Path) -> tuple[int, int, int]:
    """(answer tokens scored, all tokens scored, steps) of an on-policy run so far."""
    rep = json.loads((out / "train_report.json").read_text())
    answer = int(sum(h.get("tokens", 0) for h in rep["history"]))
    return answer, int(rep["teacher_tokens_scored"]), int(rep["steps"])


def held_out_scores(
    data: Path, finetuned: Path, out: Path, n: int, against: Path | None = None
) -> dict[str, Any]:
    """`distill eval` of one student on the n held-out prompts; its and the base's metrics (or,
    with `against`, the whole report: that run in the base's column, paired differences)."""
    from pipeline.config import load_config
    from pipeline.evaluate import EvalConfig, evaluate, read_report

    cfg = with_(
        load_config(EvalConfig, CONFIG, "eval"),
        data=data,
        finetuned=finetuned,
        out=out,
        limit=n,
        examples=2,
        against=against,
    )
    evaluate(cfg)
    return read_report(out) if against is not None else read_report(out)["metrics"]


def reached(rows: list[dict[str, Any]], target: float) -> int | None:
    """The fewest answer tokens at which an arm's held-out accuracy reached target."""
    hits = [
        r["teacher_tokens"] for r in rows if r["accuracy"] is not None and r["accuracy"] >= target
    ]
    return min(hits) if hits else None


def main(quick: bool = False, out: Path | None = None) -> dict[str, Any]:
    import torch

    from pipeline.build import BuildConfig, build
    from pipeline.config import load_config
    from pipeline.demo.serve import ensure_vllm, serve_teacher, served_model_name
    from pipeline.demo.student import ensure_smollm2
    from pipeline.finetune import FinetuneConfig, finetune
    from pipeline.harvest import HarvestConfig, harvest
    from pipeline.onpolicy import OnpolicyConfig, onpolicy

    torch.set_num_threads(2)
    plan = QUICK if quick else FULL
    out = out or ROOT / "data/bench/onpolicy"
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    student = ensure_smollm2(ROOT / "data/models/SmolLM2-135M-Instruct")
    say("vLLM's CPU build (set up once, ~3 minutes; then 2-3 minutes to start)")
    ensure_vllm()
    n_held, budgets = plan["held_out"], plan["sft_prompts"]
    held = (ROOT / "prompts/demo/eval.jsonl").read_text().splitlines()[:n_held]
    train = (ROOT / "prompts/demo/train.jsonl").read_text().splitlines()[: max(budgets)]
    held_ids = {json.loads(line)["id"] for line in held}
    prompts = out / "prompts.jsonl"  # held-out first, then training: harvest's limit takes a prefix
    prompts.write_text("\n".join([*held, *train]) + "\n")
    train_file = out / "train_prompts.jsonl"
    train_file.write_text("\n".join(train) + "\n")

    sft: list[dict[str, Any]] = []
    onp: list[dict[str, Any]] = []
    vs: dict[str, tuple[int, int, dict[str, Any]]] = {}
    base: dict[str, Any] = {}
    teacher_row: dict[str, Any] = {}
    with serve_teacher(student, log_path=out / "vllm.log", engine="vllm") as url:
        say(f"teacher up at {url} ({time.monotonic() - started:.0f}s)")
        hcfg = with_(
            load_config(HarvestConfig, CONFIG, "harvest"),
            prompts=[prompts],
            out=out / "run",
            base_url=url,
            model=served_model_name(student),
            logprobs=True,
            top_logprobs=5,
            temperature=0.0,
        )
        bcfg = load_config(BuildConfig, CONFIG, "build")
        fcfg = load_config(FinetuneConfig, CONFIG, "finetune")
        for n in budgets:
            t = time.monotonic()
            harvest(with_(hcfg, limit=n_held + n), pretty=False)
            ds = out / f"sft-data-{n}"
            filters = {**bcfg.filters.model_dump(), "verify": False}  # no labels, as on-policy
            build(with_(bcfg, run=out / "run", to=ds, tokenizer=student, filters=filters))
            ft = out / f"sft-{n}"
            finetune(
                with_(
                    fcfg,
                    data=ds,
                    student=student,
                    out=ft,
                    max_steps=None,
                    epochs=2.0,
                    eval_steps=10_000,
                    save_steps=10_000,
                )  # fmt: skip
            )
            m = held_out_scores(ds, ft, out / f"eval-sft-{n}", n_held)
            base, teacher_row = m["base"], m.get("teacher", {})
            answer, total = sft_tokens(out / "run", held_ids)
            sft.append(
                {"prompts": n, "teacher_tokens": answer, "all_tokens": total, **m["finetuned"]}
            )
            say(f"SFT on {n} prompts: {answer} answer tokens, {time.monotonic() - t:.0f}s")
        data = out / f"sft-data-{budgets[-1]}"  # its eval split: the same held-out answers
        sft_tok = [r["teacher_tokens"] for r in sft]
        half = sft_tok[-1] // 2  # the on-policy student here is scored against the largest SFT arm
        targets = sorted({*(t // 2 for t in sft_tok), *sft_tok})
        targets += [sft_tok[-1] * k for k in plan["extra"]]
        for arm in QUICK_ARMS if quick else tuple(ARMS):
            settings = ARMS[arm]
            ocfg = OnpolicyConfig(
                base_url=url,
                model=served_model_name(student),
                student=str(student),
                prompts=[train_file],
                out=out / f"onpolicy-{arm.replace(' ', '-').lower()}",
                teacher_system_prompt_file=ROOT / "prompts/demo/system.md",
                steps=1,
                progress_every=30.0,
                **settings,
            )
            guess = settings["samples"] * settings["prompts_per_step"] * settings["max_new_tokens"]
            done = scored = steps_so_far = 0
            for target in targets:
                t = time.monotonic()
                # More steps (the run resumes) at the rate seen so far, staying within the
                # budget: an arm is never compared at more tokens than the budget it is shown at.
                while target - done >= (per_step := done / steps_so_far if steps_so_far else guess):
                    more = math.floor((target - done) / per_step)
                    ocfg = with_(ocfg, steps=steps_so_far + more)
                    onpolicy(ocfg)
                    done, scored, steps_so_far = onpolicy_tokens(ocfg.out)
                if not steps_so_far:
                    continue  # not even one step fits in this budget
                if not (onp and onp[-1]["arm"] == arm and onp[-1]["steps"] == steps_so_far):
                    m = held_out_scores(
                        data, ocfg.out, out / f"eval-{ocfg.out.name}-{steps_so_far}", n_held
                    )
                    onp.append(
                        {
                            "arm": arm,
                            "steps": steps_so_far,
                            "teacher_tokens": done,
                            "all_tokens": scored,
                            **m["finetuned"],
                        }
                    )
                say(
                    f"on-policy ({arm}) to {done} answer tokens ({steps_so_far} steps), "
                    f"{time.monotonic() - t:.0f}s"
                )
                if target == half:  # the student at half SFT's tokens vs SFT, with intervals
                    vs[arm] = (steps_so_far, done, held_out_scores(
                        data, ocfg.out, out / f"eval-{ocfg.out.name}-vs-sft", n_held,
                        against=out / f"sft-{budgets[-1]}",
                    )["differences"])  # fmt: skip

    target_acc = sft[-1]["accuracy"]
    sft_needs = reached(sft, target_acc)
    lines = [
        f"On-policy vs SFT, demo task (SmolLM2-135M-Instruct; teacher: the same + system prompt, "
        f"vLLM CPU), {n_held} held-out prompts, {'--quick' if quick else 'full'}",
        f"{'arm':<22} {'budget':>10} {'answer tok':>10} {'all tok':>8} {'format':>7} "
        f"{'accuracy':>8} {'teacher-KL':>10}",
    ]

    def row(arm: str, budget: str, r: dict[str, Any]) -> str:
        fmt = r.get("format_compliance")
        acc = r.get("accuracy")
        kl = r.get("teacher_kl")
        return (
            f"{arm:<22} {budget:>10} {r.get('teacher_tokens', 0) if arm != 'base' else '-':>10} "
            f"{r.get('all_tokens', '-') if arm != 'base' else '-':>8} "
            f"{'-' if fmt is None else f'{fmt:.0%}':>7} {'-' if acc is None else f'{acc:.0%}':>8} "
            f"{'-' if kl is None else f'{kl:.3f}':>10}"
        )

    lines.append(row("base", "-", base))
    lines += [row("sft", f"{r['prompts']} prompts", r) for r in sft]
    lines += [row(f"on-policy {r['arm']}", f"{r['steps']} steps", r) for r in onp]
    if teacher_row:
        acc, fmt = teacher_row.get("accuracy"), teacher_row.get("format_compliance")
        lines.append(
            f"teacher (with the system prompt): format "
            f"{'-' if fmt is None else f'{fmt:.0%}'}, accuracy {'-' if acc is None else f'{acc:.0%}'}"
        )
    ratios: dict[str, float | None] = {}
    for arm in dict.fromkeys(r["arm"] for r in onp):
        rows = [r for r in onp if r["arm"] == arm]
        needs = reached(rows, target_acc)
        ratios[arm] = None if needs is None or not sft_needs else needs / sft_needs
        need = (
            f"{needs / sft_needs:.2f} ({needs} / {sft_needs} answer tokens)"
            if needs is not None and sft_needs
            else f"not reached: below {target_acc:.0%} up to {rows[-1]['teacher_tokens']} answer "
            f"tokens (> {rows[-1]['teacher_tokens'] / max(sft_needs or 1, 1):.2f}x SFT's {sft_needs})"
        )
        lines.append(
            f"on-policy {arm}: teacher tokens it needs to reach SFT's held-out accuracy "
            f"({target_acc:.0%}) / SFT's: {need}   (goal <= 0.5)"
        )
        if arm in vs:
            steps, tokens, diffs = vs[arm]
            lines.append(
                f"  at {tokens} answer tokens ({steps} steps) - SFT ({budgets[-1]} prompts, "
                f"{sft_tok[-1]} tokens), `distill eval --against`, 95% paired bootstrap: "
                + "; ".join(
                    f"{k} {d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] {d['verdict']}"
                    for k, d in diffs.items()
                    if k in ("accuracy", "format_compliance", "teacher_kl", "nll")
                )
            )
    lines.append(f"wall time {time.monotonic() - started:.0f}s")
    text = "\n".join(lines)
    print(text)
    (out / "report.md").write_text(
        "# On-policy vs SFT at equal teacher tokens\n\n```\n" + text + "\n```\n", encoding="utf-8"
    )
    print(f"report -> {out / 'report.md'}")
    return {
        "sft": sft,
        "onpolicy": onp,
        "base": base,
        "ratios": ratios,
        "quick": quick,
        "vs_sft": {a: v[2] for a, v in vs.items()},
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    q = "--quick" in args
    rest = [a for a in args if a != "--quick"]
    main(quick=q, out=Path(rest[0]) if rest else None)
