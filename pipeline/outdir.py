"""Each stage owns its output folder: a marker names the stage and the files it wrote.

A stage calls `claim(out, stage)` before writing. It refuses, with a one-line error, a folder that
another stage owns (a run directory as a fine-tune's --out, say) or one holding files no stage of
distill wrote; it accepts a new or empty folder, or its own earlier output. When a stage replaces
its earlier output, `replace_own` removes only the files its marker lists: what a user put beside
them stays. Folders written before markers existed are recognised by their signature files.

    out/.distill.json   {"stage": "build", "files": ["dataset_dict.json", "train", ...]}
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import InputError

MARKER = ".distill.json"
# Entries that do not make a folder anyone's: the marker, and `distill probe --out RUN`'s result,
# written into a run directory before the harvest (or on-policy run) that will own it.
NEUTRAL = (MARKER, "probe.json")

# Files that identify a stage's output written before markers existed.
SIGNATURES: dict[str, tuple[str, ...]] = {
    # first: an on-policy run also holds a store and a train report
    "onpolicy": ("reverse_kl.png", "checkpoint"),
    "harvest": ("store.sqlite", "harvest.log", "lock"),
    "build": ("build_report.json",),
    "export": ("responses.jsonl", "responses.parquet", "dataset_info.json"),
    "finetune": ("train_report.json", "checkpoints"),  # checkpoints/: a run stopped mid-way
    "merge": (),  # a merged model folder looks like any model: refused as foreign unless marked
    "eval": ("report.json", "report.md"),
}


def owner(out: Path) -> str | None:
    """The stage that wrote `out` (from its marker, else its signature files), or None."""
    marker = out / MARKER
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text(encoding="utf-8"))["stage"])
        except (ValueError, KeyError, TypeError, OSError):
            return None
    for stage, names in SIGNATURES.items():
        if any((out / n).exists() for n in names):
            return stage
    return None


def own_files(out: Path) -> list[str]:
    """The entries of `out` that its stage wrote, as its marker lists them (none without one)."""
    try:
        data = json.loads((out / MARKER).read_text(encoding="utf-8"))
        return [str(f) for f in data.get("files", [])]
    except (OSError, ValueError, AttributeError):
        return []


def claim(out: Path, stage: str, flag: str = "--out") -> Path:
    """Make `out` this stage's folder, or refuse with what to do. Returns `out`, created."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file, not a folder; choose a folder for {flag}")
    # A folder holding only a marker (a stage that stopped before writing) counts as empty.
    if out.is_dir() and any(p.name not in NEUTRAL for p in out.iterdir()):
        found = owner(out)
        if found is None:
            raise InputError(
                f"{out}: holds files that distill did not write; choose an empty or new {flag}"
            )
        if found != stage:
            raise InputError(
                f"{out}: is the output of `distill {found}`; writing `distill {stage}` there "
                f"would mix them: choose another {flag}"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        if owner(out) != stage:
            _write(out, stage, [])
    except OSError as e:
        raise InputError(
            f"{out}: cannot write here ({e.strerror}); choose another {flag}"
        ) from None
    return out


@contextlib.contextmanager
def staged(out: Path, stage: str, flag: str = "--out") -> Iterator[Path]:
    """Claim `out`, then yield an empty sibling folder to write the whole output into; on success
    it replaces the stage's earlier files (`replace_own`), on any failure it goes, with `out` too
    when this call created it: a reader never sees half an output."""
    existed = Path(out).exists()
    out = claim(out, stage, flag)
    tmp = out.parent / f".{out.name}.{stage}-staging"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise InputError(
            f"{out.parent}: cannot write the output here ({e.strerror}); choose another {flag}"
        ) from None
    try:
        yield tmp
        replace_own(out, stage, tmp)  # only the earlier output's files go; a user's stay
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not existed:  # nothing written: leave no folder behind either
            shutil.rmtree(out, ignore_errors=True)
        raise


def record(out: Path, stage: str, names: list[str]) -> None:
    """Add `names` (entries directly in `out`) to the files this stage owns there."""
    _write(out, stage, sorted(set(own_files(out)) | set(names)))


def replace_own(out: Path, stage: str, new: Path) -> None:
    """Replace this stage's earlier files in `out` by the entries of folder `new` (then removed),
    keeping anything else a user put in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    names = [entry.name for entry in sorted(new.iterdir()) if entry.name != MARKER]
    # What goes: the earlier output's files (a marker-less folder lists none), and whatever a new
    # entry would land on.
    for name in (own_files(out) if owner(out) == stage else []) + names:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for name in names:
        (new / name).replace(out / name)
    shutil.rmtree(new)
    _write(out, stage, names)


def _write(out: Path, stage: str, files: list[str]) -> None:
    tmp = out / f"{MARKER}.{os.getpid()}.tmp"  # several ranks of one training may write it
    tmp.write_text(json.dumps({"stage": stage, "files": files}, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out / MARKER)
