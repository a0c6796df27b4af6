"""The `distill` command line: parse flags, load config, call one stage function, report.

Each command turns the project's own errors (`DistillError`) into one line on stderr and an
exit code (see pipeline/errors.py); anything else is a bug and keeps its traceback. Ctrl-C is
`interrupted` and exit 130 in every command. Every line printed passes redact.py.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pipeline.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, DistillError
from pipeline.redact import redact

T = TypeVar("T")


def run_stage(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a stage; a DistillError becomes `error: <message>` and its exit code, Ctrl-C 130."""
    try:
        return fn(*args, **kwargs)
    except DistillError as e:
        click.echo(redact(f"error: {e}"), err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: rerun to continue", err=True)
        sys.exit(EXIT_INTERRUPTED)


def say(text: str, err: bool = False) -> None:
    """Print a summary line or JSON, redacted like everything else that leaves the process."""
    click.echo(redact(text), err=err)


PATH = click.Path(path_type=Path)
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _config_option(help: str) -> Decorator:
    """`--config FILE`, read into the `config_path` argument; `help` names the section read."""
    return click.option("--config", "config_path", type=PATH, help=help)


def _options(*decorators: Decorator) -> Decorator:
    """Several click options as one decorator, in the order they show in --help."""

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


_json_option = click.option(
    "--json",
    "json_summary",
    is_flag=True,
    default=None,
    help="Print the summary as JSON on stdout.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="distill", prog_name="distill")
def cli() -> None:
    """distill: harvest a teacher API's answers, build a dataset, fine-tune a student, evaluate it."""


@cli.command()
@click.option(
    "--prompts",
    multiple=True,
    type=PATH,
    help="Prompt file (repeatable): .jsonl .json .csv .parquet .txt or a dataset folder.",
)
@click.option("--out", type=PATH, help="Run directory (store.sqlite lives here).")
@_config_option("YAML config; its harvest: section. Flags override it.")
@click.option(
    "--base-url", help="OpenAI-compatible API root (default $OPENAI_BASE_URL, else OpenAI)."
)
@click.option("--model", help="Teacher model name.")
@click.option(
    "--api-key-env", help="Environment variable holding the API key (default OPENAI_API_KEY)."
)
@click.option("--samples", type=int, help="Answers per prompt.")
@click.option("--temperature", type=float)
@click.option("--top-p", type=float)
@click.option("--max-tokens", type=int)
@click.option("--stop", multiple=True, help="Stop sequence (repeatable).")
@click.option("--seed", type=int)
@click.option("--reasoning-effort", type=click.Choice(["minimal", "low", "medium", "high"]))
@click.option("--logprobs/--no-logprobs", default=None)
@click.option("--top-logprobs", type=int)
@click.option("--system-prompt-file", type=PATH)
@click.option("--user-template-file", type=PATH)
@click.option("--concurrency", type=int, help="Most requests in flight.")
@click.option("--rpm", type=float, help="Requests per minute to stay under.")
@click.option("--tpm", type=float, help="Tokens per minute to stay under.")
@click.option("--timeout", type=float, help="Seconds to wait for one response.")
@click.option("--max-retries", type=int, help="Retries of transient failures.")
@click.option("--limit", type=int, help="Only the first N unique prompts.")
@click.option("--max-cost", type=float, help="Stop before this run's spend (USD) would pass this.")
@click.option("--max-duration", type=float, help="Stop sending after this many seconds.")
@click.option(
    "--replace-changed-prompts",
    is_flag=True,
    default=None,
    help="A prompt id whose text changed: harvest the new text; build uses only it.",
)
@click.option(
    "--dry-run", is_flag=True, default=None, help="Count requests, tokens and cost; send nothing."
)
@_json_option
def harvest(config_path: Path | None, **flags: Any) -> None:
    """Send prompts to a teacher API; store every answer once (rerun = resume)."""
    from pipeline.config import load_config
    from pipeline.harvest import HarvestConfig, harvest, summary_json

    flags["prompts"] = list(flags["prompts"]) or None
    flags["stop"] = list(flags["stop"]) or None
    cfg = run_stage(load_config, HarvestConfig, config_path, "harvest", flags)
    summary = run_stage(harvest, cfg)
    say(summary.line(), err=True)
    if cfg.json_summary:
        say(summary_json(summary))
    sys.exit(summary.exit_code)


@cli.command()
@click.option(
    "--base-url", help="OpenAI-compatible API root (default: the config's, else $OPENAI_BASE_URL)."
)
@click.option("--model", help="Model name to probe (default: the config's).")
@_config_option(
    "YAML config; its harvest: section (teacher, prices, extra_body). Flags override it."
)
@click.option(
    "--api-key-env", help="Environment variable holding the API key (default OPENAI_API_KEY)."
)
@click.option(
    "--max-cost", type=float, help="Send no request that could take the probe past this (USD)."
)
@click.option("--timeout", type=float, help="Seconds to wait for one answer (default 60).")
@click.option(
    "--out", type=PATH, help="Run directory: write probe.json there (harvest reads it while fresh)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def probe(
    config_path: Path | None,
    out: Path | None,
    as_json: bool,
    max_cost: float | None,
    timeout: float | None,
    **flags: Any,
) -> None:
    """What an endpoint supports (n, logprobs, scoring, reasoning, headers, Batch API), in a few cheap requests."""
    from pipeline.config import load_config
    from pipeline.harvest import HarvestConfig
    from pipeline.probe import probe as do_probe
    from pipeline.probe import table, write_probe

    cfg = run_stage(load_config, HarvestConfig, config_path, "harvest", flags)
    t = cfg.all_teachers()[0]
    if not t.model:
        click.echo(
            "error: no model to probe: pass --model NAME or set model: in the config", err=True
        )
        sys.exit(EXIT_USAGE)
    result = run_stage(
        do_probe, t.base_url, t.model, t.api_key_env, max_cost, teacher=t, timeout=timeout or 60.0
    )
    if out is not None:
        click.echo(f"probe result -> {write_probe(out, result)}", err=True)
    say(result.model_dump_json(indent=2) if as_json else table(result))


@cli.command()
@click.argument("run_dir", type=PATH)
@click.option("--to", required=True, type=PATH, help="Output folder.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hf", "parquet", "jsonl"]),
    default="hf",
    show_default=True,
)
def export(run_dir: Path, to: Path, fmt: str) -> None:
    """Write a run's stored answers as a dataset (hf), Parquet or JSONL."""
    from pipeline.export import export as do_export

    path = run_stage(do_export, run_dir, to, fmt)  # type: ignore[arg-type]
    click.echo(f"exported {run_dir} -> {path}", err=True)


@cli.command("eval")
@click.option("--data", type=PATH, help="Dataset folder from `distill build` (its eval split).")
@click.option(
    "--base", type=PATH, help="Base student model folder (default: the fine-tune run's student)."
)
@click.option(
    "--finetuned", type=PATH, help="Fine-tune OUT folder, adapter folder or merged model folder."
)
@click.option(
    "--against",
    type=PATH,
    help="Compare against this fine-tune OUT folder (or merged model) instead of the base.",
)
@click.option("--out", type=PATH, help="Report folder (report.md, report.json, PNGs).")
@_config_option("YAML config; its eval: section. Flags override it.")
@click.option("--split", help="Dataset split to evaluate (default eval).")
@click.option("--max-new-tokens", type=int)
@click.option("--batch-size", type=int)
@click.option("--greedy/--sample", default=None, help="Greedy decoding (default) or sampling.")
@click.option("--temperature", type=float)
@click.option("--top-p", type=float)
@click.option("--limit", type=int, help="Only the first N prompts.")
@click.option("--answer-patterns", multiple=True, help="Answer-extraction regex (repeatable).")
@click.option("--format-regex", help="Declared answer format (re.search on each answer).")
@click.option("--system-prompt", help="System prompt the students see (default: the dataset's).")
@click.option(
    "--keep-system/--drop-system",
    default=None,
    help="Students see the dataset's system message, as in training (default), or none.",
)
@click.option(
    "--nll/--no-nll", default=None, help="Compute NLL/perplexity of the teacher's answers."
)
@click.option("--examples", type=int, help="Side-by-side examples in report.md.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option(
    "--load-in-4bit", is_flag=True, default=None, help="Load the students in 4-bit (CUDA)."
)
@click.option("--seed", type=int)
@click.option(
    "--judge/--no-judge", default=None, help="LLM judge through the teacher client (costs money)."
)
@click.option("--judge-model")
@click.option("--judge-base-url")
@click.option("--judge-api-key-env")
@click.option("--judge-concurrency", type=int)
def eval_cmd(config_path: Path | None, **flags: Any) -> None:
    """Score the base and fine-tuned students on held-out prompts; write report.md, JSON and PNGs."""
    from pipeline.config import load_config
    from pipeline.evaluate import EvalConfig, evaluate, headline, read_report

    flags["answer_patterns"] = list(flags["answer_patterns"]) or None
    cfg = run_stage(load_config, EvalConfig, config_path, "eval", flags)
    out = run_stage(evaluate, cfg)
    click.echo(headline(read_report(out)))
    click.echo(f"report: {out / 'report.md'}", err=True)


@cli.command()
@click.option("--data", help="Dataset folder from `distill build` (splits train, eval).")
@click.option("--student", help="Student model: a local folder (or a hub id where reachable).")
@click.option("--out", help="Output folder: adapter/, train_report.json, loss.png, checkpoints/.")
@_config_option("YAML config; its finetune: section. Flags override it.")
@click.option("--max-steps", type=int, help="Stop after N optimizer steps (overrides --epochs).")
@click.option("--epochs", type=float)
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--lora-r", type=int)
@click.option("--lora-alpha", type=int)
@click.option(
    "--lora-target-modules",
    multiple=True,
    help="Module name to adapt (repeatable; default all-linear).",
)
@click.option("--use-dora/--no-dora", default=None)
@click.option("--batch-size", type=int, help="Per-device batch (default: auto-fit to memory).")
@click.option("--grad-accum", type=int, help="Gradient accumulation (default: auto).")
@click.option("--effective-batch-size", type=int, help="Target sequences per optimizer step.")
@click.option("--max-length", type=int, help="Longest row in tokens (packed row length).")
@click.option("--quantize", type=click.Choice(["auto", "4bit", "none"]))
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None)
@click.option("--packing/--no-packing", default=None)
@click.option(
    "--train-on",
    type=click.Choice(["last", "all"]),
    help="Assistant turns that carry loss: last (the teacher's answer, default) or all.",
)
@click.option("--eval-steps", type=int)
@click.option("--save-steps", type=int)
@click.option("--logging-steps", type=int)
@click.option(
    "--report-to", help="tensorboard, wandb, none, ... (default tensorboard if installed)."
)
@click.option(
    "--resume", is_flag=True, default=None, help="Continue from the last checkpoint in OUT."
)
@click.option("--seed", type=int)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    default=None,
    help="Run model code shipped with the student.",
)
@click.option(
    "--loss",
    type=click.Choice(["sft", "kd"]),
    help="sft (default) or kd: CE mixed with KL to the teacher's top-k (needs a build with --tokenizer).",
)
@click.option("--kd-alpha", type=float, help="Weight of the KD term (default 0.5).")
@click.option(
    "--kd-temperature", type=float, help="Student temperature in the KD term (default 1)."
)
@click.option("--kd-tail/--no-kd-tail", default=None, help="Tail bucket (default on).")
def finetune(config_path: Path | None, **flags: Any) -> None:
    """Fine-tune a student with LoRA/QLoRA on the built dataset, sized to this machine."""
    from pipeline.config import load_config
    from pipeline.finetune import FinetuneConfig
    from pipeline.finetune import finetune as run_finetune

    flags["lora_target_modules"] = list(flags["lora_target_modules"]) or None
    cfg = run_stage(load_config, FinetuneConfig, config_path, "finetune", flags)
    out = run_stage(run_finetune, cfg)
    click.echo(f"report: {out / 'train_report.json'}", err=True)


@cli.command()
@click.argument("out", required=False)
@click.option("--to", help="Folder for the merged model.")
@_config_option("YAML config; its merge: section.")
@click.option("--student", help="Base model (default: the run's student).")
@click.option(
    "--gguf", type=click.Choice(["auto", "yes", "no"]), help="Also write GGUF (needs llama.cpp)."
)
@click.option("--gguf-type", help="GGUF tensor type (f16, q8_0, ...).")
@click.option("--gguf-converter", help="Path to llama.cpp's convert_hf_to_gguf.py.")
@click.option("--trust-remote-code", is_flag=True, default=None)
def merge(config_path: Path | None, **flags: Any) -> None:
    """Merge a fine-tune run's adapter into its student (safetensors; GGUF when possible)."""
    from pipeline.config import load_config
    from pipeline.merge import MergeConfig
    from pipeline.merge import merge as run_merge

    cfg = run_stage(load_config, MergeConfig, config_path, "merge", flags)
    run_stage(run_merge, cfg)


@cli.command()
@click.argument("run", required=False, type=PATH)
@click.option("--to", type=PATH, help="Output folder (an earlier build there is replaced).")
@_config_option("YAML config; its build: section. Flags override it.")
@click.option(
    "--format",
    type=click.Choice(["hf", "parquet", "jsonl", "sharegpt", "openai"]),
    help="Output format (default hf: datasets.load_from_disk).",
)
@click.option(
    "--reasoning",
    type=click.Choice(["inline", "separate", "drop"]),
    help="Reasoning as <think> in the answer (default), a reasoning_content field, or dropped.",
)
@click.option(
    "--drop-system/--keep-system",
    default=None,
    help="Leave the system prompt out of the training messages.",
)
@click.option(
    "--tokenizer",
    type=PATH,
    help="Student tokenizer folder: length bounds in its tokens, and the teacher's top-k logprobs aligned to it (for --loss kd).",
)
@click.option(
    "--select",
    type=click.Choice(["all", "first", "best"]),
    help="Keep all passing answers, or the first/best --per-prompt.",
)
@click.option("--per-prompt", type=int, help="k answers kept per prompt with --select first|best.")
@click.option("--seed", type=int, help="Seed of the split by prompt id.")
@click.option(
    "--eval-fraction", type=float, help="Share of prompts held out for eval (default 0.1)."
)
@click.option(
    "--eval-size", type=int, help="Number of prompts held out for eval (overrides --eval-fraction)."
)
@click.option("--custom-filter", help="Your filter: module:function or file.py:function.")
@click.option(
    "--json", "json_report", is_flag=True, default=None, help="Print build_report.json on stdout."
)
def build(config_path: Path | None, **flags: Any) -> None:
    """Curate a run's answers into a train/eval dataset; every removed row counted and explained."""
    from pipeline.build import BuildConfig
    from pipeline.build import build as do_build
    from pipeline.config import load_config

    cfg = run_stage(load_config, BuildConfig, config_path, "build", flags)
    report = run_stage(do_build, cfg)
    click.echo(report.line(), err=True)
    if cfg.json_report:
        click.echo(report.to_json(), nl=False)


@cli.command()
@click.option(
    "--prompts", multiple=True, type=PATH, help="Prompt file the student answers (repeatable)."
)
@click.option("--data", help="Or a `distill build` dataset: its train split's prompts.")
@click.option("--student", help="Student model folder (shares the teacher's tokenizer).")
@click.option("--out", type=PATH, help="Run folder (adapter, report, store).")
@_config_option("YAML config; its onpolicy: section. Flags override it.")
@click.option("--base-url", help="Teacher API root (it must score texts: vLLM, SGLang, Together).")
@click.option("--model", help="Teacher model name.")
@click.option("--api-key-env", help="Environment variable holding the API key.")
@click.option("--teacher-system-prompt-file", type=PATH)
@click.option("--steps", type=int, help="Optimizer steps.")
@click.option("--prompts-per-step", type=int)
@click.option("--samples", type=int, help="Student samples per prompt per step.")
@click.option("--max-new-tokens", type=int)
@click.option("--lr", type=float)
@click.option("--top-k", type=int, help="Teacher's top-k per token (prompt_logprobs only).")
@click.option("--kd-alpha", type=float, help="Weight of the top-k forward-KL term.")
@click.option(
    "--reverse-kl", type=float, help="Weight of the reverse-KL term (0: forward KL only)."
)
@click.option(
    "--teacher-temperature",
    type=float,
    help="Below 1 sharpens the teacher's top-k (needs --top-k).",
)
@click.option("--eval-prompts", type=int, help="Last N prompts held out.")
@click.option("--save-steps", type=int)
@click.option("--concurrency", type=int, help="Most scoring requests in flight.")
@click.option("--rpm", type=float)
@click.option("--timeout", type=float)
@click.option("--max-retries", type=int)
@click.option("--limit", type=int, help="Only the first N unique prompts.")
@click.option("--max-cost", type=float, help="Stop before scoring spend (USD) would pass this.")
@click.option("--seed", type=int)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
def onpolicy(config_path: Path | None, **flags: Any) -> None:
    """On-policy distillation: the student samples, the teacher scores its tokens (reverse KL)."""
    from pipeline.config import load_config
    from pipeline.onpolicy import OnpolicyConfig
    from pipeline.onpolicy import onpolicy as do_onpolicy

    flags["prompts"] = list(flags["prompts"]) or None
    cfg = run_stage(load_config, OnpolicyConfig, config_path, "onpolicy", flags)
    summary = run_stage(do_onpolicy, cfg)
    click.echo(summary.line(), err=True)
    sys.exit(summary.exit_code)


@cli.group()
def batch() -> None:
    """Harvest through a Batch API (OpenAI's: half price, answers within 24 h); cron-safe.

    Same keys and store as `distill harvest`; `run` = collect what has ended, then submit what is
    pending. Exit 0 done, 3 batches still open or requests left (rerun later), 1 failed.
    """


_batch_options = _options(
    click.argument("run_dir", type=PATH),
    _config_option(
        "YAML config: harvest: says what to ask, batch: how. Default: RUN/config.yaml of an earlier submit."
    ),
    click.option("--prompts", multiple=True, type=PATH, help="Prompt file (repeatable)."),
    click.option("--base-url", help="OpenAI-compatible API root."),
    click.option("--model", help="Teacher model name."),
    click.option("--api-key-env", help="Environment variable holding the API key."),
    click.option("--samples", type=int, help="Answers per prompt."),
    click.option("--temperature", type=float),
    click.option("--max-tokens", type=int),
    click.option("--limit", type=int, help="Only the first N unique prompts."),
    click.option(
        "--discount", type=float, help="Batch price as a fraction of the teacher's (default 0.5)."
    ),
)

_wait_options = _options(
    click.option("--wait/--no-wait", default=None, help="Poll until every batch has ended."),
    click.option(
        "--poll-interval", type=float, help="Seconds between polls with --wait (default 60)."
    ),
    click.option(
        "--max-duration", type=float, help="With --wait: stop after this many seconds (exit 3)."
    ),
)


def _run_batch(
    command: str, run_dir: Path, config_path: Path | None, flags: dict[str, Any]
) -> None:
    from pipeline.batch import BatchConfig, harvest_config, run_batch, summary_json
    from pipeline.config import load_config

    keys = ("discount", "json_summary", "wait", "poll_interval", "max_duration")
    bflags = {k: flags.pop(k, None) for k in keys}
    bcfg = run_stage(load_config, BatchConfig, config_path, "batch", bflags)
    hcfg = None
    if command in ("submit", "run"):
        flags["prompts"] = list(flags.get("prompts") or []) or None
        hcfg = run_stage(harvest_config, run_dir, config_path, flags)
    summary = run_stage(run_batch, command, run_dir, bcfg, hcfg)
    say(summary.line(), err=True)
    if bcfg.json_summary:
        say(summary_json(summary))
    sys.exit(summary.exit_code)


@batch.command("submit")
@_batch_options
@_json_option
def batch_submit(run_dir: Path, config_path: Path | None, **flags: Any) -> None:
    """Upload the run's pending requests as batches (split at 50,000 requests / 200 MB)."""
    _run_batch("submit", run_dir, config_path, flags)


@batch.command("run")
@_batch_options
@_wait_options
@_json_option
def batch_run(run_dir: Path, config_path: Path | None, **flags: Any) -> None:
    """Collect ended batches, then submit what is pending (expired requests too): one cron step."""
    _run_batch("run", run_dir, config_path, flags)


@batch.command("collect")
@click.argument("run_dir", type=PATH)
@_config_option("YAML config; its batch: section.")
@_wait_options
@_json_option
def batch_collect(run_dir: Path, config_path: Path | None, **flags: Any) -> None:
    """Download the answers of ended batches into the store."""
    _run_batch("collect", run_dir, config_path, flags)


@batch.command("cancel")
@click.argument("run_dir", type=PATH)
@_json_option
def batch_cancel(run_dir: Path, **flags: Any) -> None:
    """Cancel the run's open batches (answers already made are kept by the next collect)."""
    _run_batch("cancel", run_dir, None, flags)


@batch.command("status")
@click.argument("run_dir", type=PATH)
@_json_option
def batch_status(run_dir: Path, json_summary: bool | None) -> None:
    """Each batch of a run and what the server says of it (changes nothing; no lock)."""
    from pipeline.batch import status, summary_json

    summary = run_stage(status, run_dir)
    for b in summary.batches:
        counts = b.get("request_counts") or {}
        done = (
            f" {counts.get('completed', 0)}+{counts.get('failed', 0)}/{counts.get('total', 0)}"
            if counts
            else ""
        )
        click.echo(
            f"{b['id']}  {b['teacher']}  {b['state']}  {b['batch_id'] or '-'}  {b['remote_status'] or '-'}{done}  ({b['request_count']} requests)",
            err=True,
        )
    click.echo(summary.line(), err=True)
    if json_summary:
        click.echo(summary_json(summary))


@cli.command()
@click.argument("run_dir", type=PATH)
@click.option(
    "--replace", is_flag=True, help="Swap the recovered store in (the damaged file is kept)."
)
def doctor(run_dir: Path, replace: bool) -> None:
    """Check a run's store; if damaged, recover every readable row into a new file.

    Exit 0 healthy (or recovered and swapped in), 3 recovered into store.recovered.sqlite but not
    swapped in yet (rerun with --replace), 1 recovery failed, 2 no store at that path.
    """
    from pipeline.doctor import doctor as run_doctor

    report = run_stage(run_doctor, run_dir, replace=replace)
    for line in report.lines():
        click.echo(line, err=True)
    sys.exit(EXIT_OK if report.healthy or report.replaced_damaged else EXIT_PARTIAL)


@cli.command()
@click.option(
    "--config",
    "config_path",
    type=PATH,
    default=Path("configs/demo.yaml"),
    show_default=True,
    help="The demo's config: one section per stage.",
)
@click.option(
    "--fresh",
    is_flag=True,
    help="Train and evaluate again even if done before (the harvest is always reused).",
)
def demo(config_path: Path, fresh: bool) -> None:
    """The whole pipeline offline on SmolLM2-135M: serve teacher, harvest, build, finetune, eval."""
    from pipeline.demo import demo as run_demo

    run_stage(run_demo, config_path, fresh=fresh)


@cli.command()
@click.option(
    "--write",
    "readme",
    type=PATH,
    help="Rewrite this README's reference section instead of printing.",
)
def reference(readme: Path | None) -> None:
    """Print the config reference (Markdown) of every stage, as in README.md."""
    from pipeline.reference import full_reference, write_reference

    if readme is not None:
        run_stage(write_reference, readme)
    else:
        click.echo(full_reference(), nl=False)


def main() -> None:
    # SIGTERM stops every command as Ctrl-C does (the handler raises KeyboardInterrupt): 130
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cli(prog_name="distill")
