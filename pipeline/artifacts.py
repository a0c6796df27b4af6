"""Readers for what one stage leaves on disk for the next: the built dataset and a fine-tune run,
and the streaming writer that `distill build` and `distill export` write datasets with.

    ds = read_dataset("data/demo/dataset")        # DatasetDict with train/eval, checked
    run = read_finetune_run("data/demo/student")  # run.adapter, run.student, run.report

Every stage that opens these goes through here, so their layout and errors are defined once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import InputError


class DatasetWriter:
    """Rows written one at a time to an Arrow split folder (the layout `save_to_disk` writes:
    `datasets.load_from_disk` reads it), a Parquet file or a JSONL file, in batches of `batch` rows:
    memory stays flat whatever the row count, and the same rows always give the same bytes.

    `datasets.Dataset.from_list(rows).save_to_disk()` would hold every row, then read the Arrow file
    back through a memory map, whose pages count as resident: both grow with the dataset.
    """

    def __init__(self, path: Path, kind: str, features: Any = None, batch: int = 1000):
        self.path, self.kind = path, kind
        if kind == "jsonl":
            self.file = path.open("w", encoding="utf-8")
            return
        from datasets.arrow_writer import ArrowWriter, ParquetWriter

        if kind == "arrow":
            path.mkdir(parents=True, exist_ok=True)
        target = path / "data-00000-of-00001.arrow" if kind == "arrow" else path
        cls = ArrowWriter if kind == "arrow" else ParquetWriter
        self.features = features
        self.writer = cls(features=features, path=str(target), writer_batch_size=batch)

    def write(self, row: dict[str, Any]) -> None:
        if self.kind == "jsonl":
            self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            self.writer.write(row)

    def close(self) -> None:
        if self.kind == "jsonl":
            self.file.close()
            return
        self.writer.finalize()
        self.writer.close()
        if self.kind == "arrow":
            _arrow_state(self.path, self.features)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:  # a failure: the file is closed, not finalized
            (self.file if self.kind == "jsonl" else self.writer).close()


def _arrow_state(folder: Path, features: Any) -> None:
    """state.json and dataset_info.json beside the Arrow file, as `save_to_disk` writes them; the
    fingerprint is the file's hash, so it changes with the data and only with it."""
    import datasets
    from datasets.utils.py_utils import asdict  # save_to_disk's: leaves out unset fields

    digest = hashlib.sha256()
    with (folder / "data-00000-of-00001.arrow").open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    state: dict[str, Any] = {
        "_data_files": [{"filename": "data-00000-of-00001.arrow"}],
        "_fingerprint": digest.hexdigest()[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), "utf-8")
    info = asdict(datasets.DatasetInfo(features=features))
    info = {k: info[k] for k in sorted(info)}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2), "utf-8")


def read_dataset(path: str | Path, split: str = "train") -> Any:
    """The DatasetDict from `distill build`, its `split` checked: there, with messages, not empty."""
    from datasets import DatasetDict, load_from_disk

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: dataset folder not found; run `distill build` first or fix --data")
    try:
        ds = load_from_disk(str(p))
    except Exception as e:  # datasets raises FileNotFoundError/ValueError for foreign folders
        raise InputError(
            f"{p}: not a dataset saved by `distill build` ({type(e).__name__}); point --data at "
            "the build output"
        ) from None
    if not isinstance(ds, DatasetDict) or split not in ds:
        has = ", ".join(ds) if isinstance(ds, DatasetDict) else "one unnamed split"
        raise InputError(
            f"{p}: no `{split}` split (it has: {has}); rebuild it with `distill build` "
            "(splits train and eval)"
        )
    if "messages" not in ds[split].column_names:
        cols = ", ".join(ds[split].column_names)
        raise InputError(
            f"{p}: the {split} split has no 'messages' column (it has: {cols}); "
            "point --data at the output of `distill build`"
        )
    if len(ds[split]) == 0:
        raise InputError(f"{p}: the {split} split is empty; harvest and build more rows")
    return ds


def fingerprint(prompt_ids: Iterable[str]) -> str:
    """sha256 of the sorted distinct prompt ids, one a line: names a split's prompts in a report."""
    return hashlib.sha256("\n".join(sorted(set(prompt_ids))).encode()).hexdigest()


def read_build_report(path: str | Path) -> dict[str, Any]:
    """The build_report.json next to a dataset, or {} (a dataset not written by `distill build`)."""
    return read_json(Path(path) / "build_report.json")


def dataset_record(path: str | Path, split: str = "train", ds: Any = None) -> dict[str, Any]:
    """Which data a fine-tune trained on, for its train_report.json: the dataset folder, the split,
    its prompt ids and their fingerprint (`distill eval` refuses an eval split that shares any).
    `ds`: the dataset already read from `path`, if the caller has it."""
    ds = (ds if ds is not None else read_dataset(path, split))[split]
    ids = sorted({str(p) for p in ds["prompt_id"]}) if "prompt_id" in ds.column_names else []
    return {
        "path": str(Path(path).absolute()),
        "split": split,
        "rows": len(ds),
        "prompts": len(ids),
        "fingerprint": fingerprint(ids),
        "prompt_ids": ids,
    }


def trained_prompt_ids(report: dict[str, Any]) -> set[str] | None:
    """The prompt ids a fine-tune run trained on (from its train_report.json), None if unrecorded."""
    ids = (report.get("dataset") or {}).get("prompt_ids")
    return {str(p) for p in ids} if isinstance(ids, list) and ids else None


@dataclass
class FinetuneRun:
    """A `distill finetune` output folder: the LoRA adapter and the student it was trained on."""

    out: Path | None
    """The run folder (holds adapter/, train_report.json, config.yaml); None for a merged model
    whose run is not beside it."""
    adapter: Path | None
    """The PEFT adapter folder (adapter_config.json, weights, tokenizer); None: a merged model."""
    student: str
    """The base model: a local folder (absolute in runs written since) or a hub id."""
    report: dict[str, Any] = field(default_factory=dict)
    """train_report.json, or {} when the run has none (an adapter folder on its own)."""


def student_path(student: str) -> str:
    """A local student as an absolute path (so a run's record works from any cwd); a hub id as is."""
    p = Path(student).expanduser()
    return str(p.absolute()) if p.exists() else student


def _has(folder: Path, *files: str) -> bool:
    return any((folder / f).is_file() for f in files)


def read_finetune_run(
    out: str | Path, student: str | None = None, *, merged: bool = False
) -> FinetuneRun:
    """The run at `out` (the --out of `distill finetune`, or its adapter/ folder; with `merged`,
    also a merged model folder from `distill merge`: adapter None).

    The student is `student` when given (a --student or --base override), else the one the run
    names: train_report.json, then config.yaml, then the adapter's `base_model_name_or_path`.
    """
    given = Path(out)
    if not given.exists():
        raise InputError(f"{given}: folder not found; pass the --out folder of `distill finetune`")
    if _has(given / "adapter", "adapter_config.json"):
        run_dir, adapter = given, given / "adapter"
    elif _has(given, "adapter_config.json"):
        adapter = given
        run_dir = given.parent if _has(given.parent, "train_report.json", "config.yaml") else given
    elif merged and _has(given, "config.json"):
        # A merged model: its run (student, loss curves) is the folder or the parent, if either.
        found = (
            d for d in (given, given.parent) if _has(d, "train_report.json", "log_history.json")
        )
        run = next(found, None)
        report = read_json(run / "train_report.json") if run else {}
        return FinetuneRun(run, None, _named(given, student or report.get("student")), report)
    else:
        what = "no LoRA adapter here (adapter/adapter_config.json)"
        if merged:
            what = "neither a fine-tune OUT folder (adapter/), a PEFT adapter nor a model folder"
        raise InputError(f"{given}: {what}; pass the --out folder of `distill finetune`")
    report = read_json(run_dir / "train_report.json")
    named = student or report.get("student") or _config_student(run_dir / "config.yaml")
    named = named or read_json(adapter / "adapter_config.json").get("base_model_name_or_path")
    return FinetuneRun(run_dir, adapter, _named(given, named), report)


def _named(given: Path, student: Any) -> str:
    if not student:
        raise InputError(
            f"{given}: cannot tell which student was trained; name it (--student; --base for eval)"
        )
    return str(student)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _config_student(path: Path) -> str | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8, or a bad date
        return None
    return data.get("student") if isinstance(data, dict) else None
