"""The config reference: every stage's keys as Markdown tables, generated into README.md.

    distill reference --write README.md

A leaf module: it imports every stage's config, and nothing imports it but the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.batch import BatchConfig
from pipeline.build import BuildConfig, Filters
from pipeline.config import StageConfig
from pipeline.errors import InputError
from pipeline.evaluate import EvalConfig
from pipeline.finetune import FinetuneConfig
from pipeline.harvest import HarvestConfig
from pipeline.merge import MergeConfig
from pipeline.onpolicy import OnpolicyConfig
from pipeline.teacher import TeacherConfig

REFERENCE: list[tuple[str, type[StageConfig]]] = [
    ("harvest", HarvestConfig),
    ("harvest.teachers[]", TeacherConfig),
    ("batch", BatchConfig),
    ("build", BuildConfig),
    ("build.filters", Filters),
    ("finetune", FinetuneConfig),
    ("onpolicy", OnpolicyConfig),
    ("merge", MergeConfig),
    ("eval", EvalConfig),
]
"""(section, model) in pipeline order; the top-level names are config.SECTIONS (a test checks)."""

REFERENCE_START, REFERENCE_END = "<!-- reference:start -->", "<!-- reference:end -->"


def _type_name(annotation: Any) -> str:
    text = str(annotation)
    if getattr(annotation, "__args__", None) is None:  # a plain class: its name
        text = getattr(annotation, "__name__", None) or text
    for noise in ("typing.", "pathlib.", "pipeline.teacher.", "pipeline.", "<class '", "'>"):
        text = text.replace(noise, "")
    return text.replace("NoneType", "None").replace("|", "\\|")


def reference_markdown(model: type[BaseModel], section: str) -> str:
    """The config reference of one stage as a Markdown table (README's reference is generated)."""
    lines = [f"#### `{section}:`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        if f.default_factory is not None:
            default = "(see meaning)" if name == "base_url" else repr(f.default_factory())  # type: ignore[call-arg]
        else:
            default = repr(f.default)
        default = default.replace("PosixPath(", "Path(").replace("|", "\\|")
        desc = (f.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{name}` | {_type_name(f.annotation)} | `{default}` | {desc} |")
    return "\n".join(lines) + "\n"


def full_reference() -> str:
    """Every stage's reference, in pipeline order (`distill reference`)."""
    return "\n".join(reference_markdown(model, section) for section, model in REFERENCE)


def write_reference(readme: Path) -> None:
    """Replace the README's generated reference section with the current one."""
    if not Path(readme).is_file():
        raise InputError(f"{readme}: file not found; pass the project's README.md to --write")
    text = Path(readme).read_text(encoding="utf-8")
    if REFERENCE_START not in text:
        raise InputError(f"{readme}: no {REFERENCE_START} marker; pass the project's README.md")
    head, _, rest = text.partition(REFERENCE_START)
    _, _, tail = rest.partition(REFERENCE_END)
    Path(readme).write_text(
        f"{head}{REFERENCE_START}\n{full_reference()}{REFERENCE_END}{tail}", encoding="utf-8"
    )
