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


def test_section_table_is_written_once() -> None:
    """load_config's known sections (config.SECTIONS) are the reference's top-level sections."""
    from pipeline.config import SECTIONS
    from pipeline.reference import REFERENCE

    assert [s for s, _ in REFERENCE if "." not in s] == list(SECTIONS)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    from pipeline.reference import REFERENCE

    sections = read_yaml(path)
    assert sections, path
    for name in sections:
        load_config(dict(REFERENCE)[name], path, name)
    if "harvest" not in sections:
        return
    cfg = load_config(HarvestConfig, path, "harvest")
    for t in cfg.all_teachers():
        assert t.model
    for p in cfg.prompts:
        assert (ROOT / p).exists(), p


def test_readme_reference_is_complete_and_current() -> None:
    """The README's config reference is generated: regenerate with `distill reference --write README.md`."""
    from pipeline.reference import REFERENCE_END, REFERENCE_START, full_reference

    readme = (ROOT / "README.md").read_text()
    section = readme.split(REFERENCE_START)[1].split(REFERENCE_END)[0]
    assert section.strip() == full_reference().strip()
    from pipeline.export import EXPORT_COLUMNS

    for col in EXPORT_COLUMNS:  # the data layout documents every export column
        assert f"| `{col}` |" in readme, col


# The layers of README's code map ("How the code is organised"); imports point down only.
BASE = {"config", "errors", "record", "reasoning", "redact", "outdir"}
SHARED = {"teacher", "probe", "store", "ratelimit", "artifacts", "chat", "prompts", "verify"}
SHARED |= {"hardware", "plots", "kd"}
STAGES = {"harvest", "batch", "export", "build", "finetune", "onpolicy", "merge", "evaluate"}
STAGES |= {"doctor"}
TOP = {"cli", "__main__", "reference", "demo", "demo.serve", "demo.student"}
STAGE_EDGES = {("batch", "harvest")}  # the Batch API variant of harvest: its config and planning
SHARED_EDGES = {("teacher", "prompts"), ("teacher", "ratelimit"), ("probe", "teacher")}


def test_import_graph_has_no_circle() -> None:
    """Every `pipeline` import (module- or function-level) between our modules: no cycle; base
    modules import no other layer, shared parts import no stage, and a stage imports another stage
    (a shared part another shared part) only where STAGE_EDGES (SHARED_EDGES) and the README's map
    say so."""
    import ast

    pkg = ROOT / "pipeline"
    names = {".".join(f.relative_to(ROOT).with_suffix("").parts): f for f in pkg.rglob("*.py")}
    names = {n.removesuffix(".__init__"): f for n, f in names.items()}
    graph: dict[str, set[str]] = {}
    for name, f in names.items():
        found = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {n for n in found if n in names and n not in (name, "pipeline")}
    short = {n: {m.removeprefix("pipeline.") for m in graph[n]} for n in graph}
    short = {n.removeprefix("pipeline."): v for n, v in short.items()}
    # Every module (but the package's __init__) has its place in the map, a new one too.
    assert set(short) - {"pipeline"} == BASE | SHARED | STAGES | TOP
    for base in BASE:
        assert short[base] <= {"errors", "redact"}, base
    assert short["redact"] == set()
    for part in SHARED:
        assert short[part] <= BASE | SHARED, (part, short[part] - BASE - SHARED)
        assert {(part, s) for s in short[part] & SHARED} <= SHARED_EDGES, part
    for stage in STAGES:
        assert {(stage, s) for s in short[stage] & STAGES} <= STAGE_EDGES, stage
        assert short[stage] <= BASE | SHARED | STAGES, (stage, short[stage] & TOP)
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import circle: {' -> '.join((*path, node))}"
        if node not in done:
            for nxt in graph[node]:
                visit(nxt, (*path, node))
            done.add(node)

    for node in graph:
        visit(node, ())
