"""The `distill` command line: parse flags, load config, call one stage function, report.

Each command turns the project's own errors (`DistillError`) into one line on stderr and an
exit code (see pipeline/errors.py); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pipeline.errors import DistillError

T = TypeVar("T")


def run_stage(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a stage; a DistillError becomes `error: <message>` and its exit code."""
    try:
        return fn(*args, **kwargs)
    except DistillError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="distill", prog_name="distill")
def cli() -> None:
    """distill: harvest a teacher API's answers, build a dataset, fine-tune a student, evaluate it."""


@cli.command()
@click.option("--prompts", "prompts", multiple=True, type=click.Path(path_type=Path), help="Prompt file (repeatable): .jsonl .json .csv .parquet .txt or a dataset folder.")
@click.option("--out", type=click.Path(path_type=Path), help="Run directory (store.sqlite lives here).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="YAML config; its harvest: section. Flags override it.")
@click.option("--base-url", help="OpenAI-compatible API root (default $OPENAI_BASE_URL, else OpenAI).")
@click.option("--model", help="Teacher model name.")
@click.option("--api-key-env", help="Environment variable holding the API key (default OPENAI_API_KEY).")
@click.option("--samples", type=int, help="Answers per prompt.")
@click.option("--temperature", type=float)
@click.option("--top-p", type=float)
@click.option("--max-tokens", type=int)
@click.option("--stop", "stop", multiple=True, help="Stop sequence (repeatable).")
@click.option("--seed", type=int)
@click.option("--reasoning-effort", type=click.Choice(["minimal", "low", "medium", "high"]))
@click.option("--logprobs/--no-logprobs", default=None)
@click.option("--top-logprobs", type=int)
@click.option("--system-prompt-file", type=click.Path(path_type=Path))
@click.option("--user-template-file", type=click.Path(path_type=Path))
@click.option("--concurrency", type=int, help="Most requests in flight.")
@click.option("--rpm", type=float, help="Requests per minute to stay under.")
@click.option("--tpm", type=float, help="Tokens per minute to stay under.")
@click.option("--timeout", type=float, help="Seconds to wait for one response.")
@click.option("--max-retries", type=int, help="Retries of transient failures.")
@click.option("--limit", type=int, help="Only the first N unique prompts.")
@click.option("--max-cost", type=float, help="Stop before this run's spend (USD) would pass this.")
@click.option("--max-duration", type=float, help="Stop sending after this many seconds.")
@click.option("--dry-run", is_flag=True, default=None, help="Count requests, tokens and cost; send nothing.")
@click.option("--json", "json_summary", is_flag=True, default=None, help="Print the summary as JSON on stdout.")
def harvest(config_path: Path | None, **flags: Any) -> None:
    """Send prompts to a teacher API; store every answer once (rerun = resume)."""
    from pipeline.config import load_config
    from pipeline.harvest import HarvestConfig, harvest, summary_json

    flags["prompts"] = list(flags["prompts"]) or None
    flags["stop"] = list(flags["stop"]) or None
    cfg = run_stage(load_config, HarvestConfig, config_path, "harvest", flags)
    summary = run_stage(harvest, cfg)
    click.echo(summary.line(), err=True)
    if cfg.json_summary:
        click.echo(summary_json(summary))
    sys.exit(summary.exit_code)


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--to", "to", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--format", "fmt", type=click.Choice(["hf", "parquet", "jsonl"]), default="hf", show_default=True)
def export(run_dir: Path, to: Path, fmt: str) -> None:
    """Write a run's stored answers as a dataset (hf), Parquet or JSONL."""
    from pipeline.export import export as do_export

    path = run_stage(do_export, run_dir, to, fmt)  # type: ignore[arg-type]
    click.echo(f"exported {run_dir} -> {path}", err=True)


def main() -> None:
    cli(prog_name="distill")
