"""Config: YAML then flags then defaults, unknown keys refused, shipped configs valid, no secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import dump_config, load_config, read_yaml
from pipeline.errors import ConfigError
from pipeline.harvest import HarvestConfig

ROOT = Path(__file__).resolve().parent.parent


def test_yaml_then_flags_then_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("harvest:\n  model: from-yaml\n  temperature: 0.3\n  concurrency: 5\n")
    cfg = load_config(HarvestConfig, f, "harvest", {"temperature": 0.9, "concurrency": None})
    assert cfg.model == "from-yaml" and cfg.temperature == 0.9 and cfg.concurrency == 5
    assert cfg.samples == 1  # default


def test_openai_env_vars_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9999/v1/")
    monkeypatch.setenv("MY_KEY", "sk-abc")
    cfg = HarvestConfig(model="m", api_key_env="MY_KEY")
    assert cfg.base_url == "http://127.0.0.1:9999/v1" and cfg.api_key() == "sk-abc"
    assert "sk-abc" not in dump_config(cfg)  # the key stays in the environment


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("harvest:\n  modle: x\n", "unknown key 'modle'"),
        ("harvest:\n  samples: many\n", "samples"),
        ("harvest:\n  base_url: ftp://x\n", "base_url"),
        ("harvets:\n  model: x\n", "unknown section 'harvets'"),
        ("harvest: [1, 2\n", "c.yaml:"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(HarvestConfig, f, "harvest")
    assert needle in str(e.value) and "\n" not in str(e.value)


STAGES = {
    "harvest": ("pipeline.harvest", "HarvestConfig"),
    "build": ("pipeline.build", "BuildConfig"),
    "finetune": ("pipeline.finetune", "FinetuneConfig"),
    "eval": ("pipeline.evaluate", "EvalConfig"),
    "batch": ("pipeline.batch", "BatchConfig"),
    "merge": ("pipeline.merge", "MergeConfig"),
}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    import importlib

    sections = read_yaml(path)
    assert sections, path
    for name in sections:
        module, cls = STAGES[name]
        load_config(getattr(importlib.import_module(module), cls), path, name)
    if "harvest" not in sections:
        return
    cfg = load_config(HarvestConfig, path, "harvest")
    for t in cfg.all_teachers():
        assert t.model
    for p in cfg.prompts:
        assert (ROOT / p).exists(), p


def test_readme_reference_is_complete_and_current() -> None:
    """The README's config reference is generated: regenerate with `distill reference --write README.md`."""
    from pipeline.config import REFERENCE_END, REFERENCE_START, full_reference

    readme = (ROOT / "README.md").read_text()
    section = readme.split(REFERENCE_START)[1].split(REFERENCE_END)[0]
    assert section.strip() == full_reference().strip()
    from pipeline.export import EXPORT_COLUMNS

    for col in EXPORT_COLUMNS:  # the data layout documents every export column
        assert f"| `{col}` |" in readme, col
