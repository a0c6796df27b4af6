"""Config loading shared by every stage: YAML file, then CLI flags, then defaults.

Each stage defines its own pydantic model next to its code (`HarvestConfig` in harvest.py, ...),
deriving from `StageConfig` so unknown keys are refused. A config file holds one section per
stage (`harvest:`, `build:`, `finetune:`, `eval:`); a section's keys are the model's fields.

    cfg = load_config(HarvestConfig, "configs/demo.yaml", "harvest", {"model": "gpt-4o-mini"})

API keys never live in config: a teacher names the environment variable that holds its key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import ConfigError
from pipeline.redact import redact

SECTIONS = ("harvest", "batch", "build", "finetune", "onpolicy", "merge", "eval")
"""The sections a config file may hold, in pipeline order; reference.py maps each to its model."""


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are an error, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


C = TypeVar("C", bound=StageConfig)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict; errors name the file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{p}: config file not found; pass an existing file to --config"
        ) from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where}: {problem}; fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: expected a mapping of sections (harvest:, build:, ...), got {type(data).__name__}"
        )
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def format_validation_error(
    err: ValidationError, where: str, model: type[BaseModel] | None = None
) -> str:
    """One line: the first problem, with its key path and the value given."""
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown key '{loc}'; see the config reference in README.md for the valid keys"
    if first["type"] == "missing":  # say which flag, not pydantic's "Field required"
        field = model.model_fields.get(loc) if model is not None else None
        what = f"; {field.description}" if field is not None and field.description else ""
        flag = loc.replace("_", "-")
        return f"{where}: {loc} is required: pass --{flag} (or {loc}: in the config){what}"
    given = first.get("input")
    shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {loc}: {first['msg']}{shown}{more}"


def load_config(
    model: type[C],
    path: str | Path | None,
    section: str,
    overrides: dict[str, Any] | None = None,
) -> C:
    """Build a stage config from the `section` of a YAML file, then `overrides` (CLI flags).

    Overrides whose value is None (flags not given) are ignored. Nested keys use dicts.
    """
    data: dict[str, Any] = {}
    where = "flags"
    if path is not None:
        full = read_yaml(path)
        unknown = set(full) - set(SECTIONS)
        if unknown:
            raise ConfigError(
                f"{path}: unknown section '{sorted(unknown)[0]}'; sections are {', '.join(sorted(SECTIONS))}"
            )
        data = full.get(section) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping")
        where = f"{path} [{section}]"
    given = {k: v for k, v in (overrides or {}).items() if v is not None and v != ()}
    try:
        return model.model_validate(_merge(data, given))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, where, model)) from None


def dump_config(cfg: BaseModel, exclude: set[str] | None = None) -> str:
    """YAML of a config as used (for a run's record). Holds no secrets: keys stay in the environment,
    and credentials in a URL (`http://user:pw@host`) are masked."""
    return redact(yaml.safe_dump(cfg.model_dump(mode="json", exclude=exclude), sort_keys=False))
