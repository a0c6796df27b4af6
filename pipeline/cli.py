"""The `distill` command line: parse flags, load config, call one stage function, report.

Each command turns the project's own errors (`DistillError`) into one line on stderr and an
exit code (see pipeline/errors.py); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
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


def main() -> None:
    cli(prog_name="distill")
