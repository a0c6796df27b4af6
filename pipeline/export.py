"""Export a run's store as a dataset: the raw harvest, one row per (prompt, sample, teacher).

    distill export data/runs/demo --to data/exports/demo --format hf

Formats: `hf` (a Hugging Face dataset folder: `datasets.load_from_disk(DIR)`), `parquet`
(DIR/responses.parquet) and `jsonl` (DIR/responses.jsonl). The store is opened read-only.
Columns are documented in EXPORT_COLUMNS (from the Response record's field docs); curation (`distill build`) is a separate stage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pipeline.artifacts import DatasetWriter
from pipeline.errors import StoreError
from pipeline.outdir import staged
from pipeline.reasoning import content_text
from pipeline.record import Response
from pipeline.store import Store

ExportFormat = Literal["hf", "parquet", "jsonl"]

_DOCS = Response.docs()
# Column order of an export (as it has always been).
_ORDER = """prompt_id sample_index messages response reasoning finish_reason model requested_model
    teacher base_url prompt_tokens completion_tokens reasoning_tokens cost_usd latency_s attempts
    created_at reference meta params params_hash system_fingerprint response_id logprobs source
    key""".split()  # noqa: SIM905 (a list literal would take 26 lines)
# Columns an export shows differently from the stored field (or only exports).
_EXPORTED = {
    "messages": (
        "list",
        "the request messages followed by the assistant answer (without its reasoning)",
    ),
    "model": ("string", "the model name the server reported (else the one requested)"),
    "requested_model": ("string", _DOCS["model"]),
    "meta": ("string", "the prompt row's meta and extra fields, as JSON, or null"),
    "params": ("string", _DOCS["params"] + " (JSON)"),
    "logprobs": (
        "string",
        "JSON [[token, logprob, [[alt, logprob], ...]], ...] when asked, else null",
    ),
}
_ARROW = {"int": "int64", "float": "float64"}
# name -> (arrow type, meaning): a Response field's own documentation, unless exported differently.
EXPORT_COLUMNS: dict[str, tuple[str, str]] = {
    name: _EXPORTED.get(name)
    or (_ARROW.get(Response.types()[name].split(" ")[0], "string"), _DOCS[name])
    for name in _ORDER
}


def export_rows(store: Store) -> Iterator[dict[str, Any]]:
    """The stored responses as export rows (nested values as JSON text, the answer appended), one
    at a time: an export holds one batch of rows, not the run."""
    return (_row(r) for r in store.iter_responses())


def _row(r: Response) -> dict[str, Any]:
    values = {c: getattr(r, c) for c in Response.columns()}
    lp = r.token_logprobs()
    values.update(
        messages=[
            *({"role": m["role"], "content": content_text(m.get("content"))} for m in r.messages),
            {"role": "assistant", "content": r.response},
        ],
        model=r.response_model or r.model,
        requested_model=r.model,
        meta=None if r.meta is None else json.dumps(r.meta, ensure_ascii=False, sort_keys=True),
        params=json.dumps(r.params, sort_keys=True),
        logprobs=None if lp is None else json.dumps(lp, ensure_ascii=False),
    )
    return {c: values[c] for c in EXPORT_COLUMNS}


def features():  # type: ignore[no-untyped-def]
    import datasets

    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    return datasets.Features(
        {
            name: datasets.List(message) if kind == "list" else datasets.Value(kind)
            for name, (kind, _) in EXPORT_COLUMNS.items()
        }
    )


def export(run_dir: Path, to: Path, fmt: ExportFormat = "hf") -> Path:
    """Write the run's responses to `to` in `fmt`; returns the path written. Rows stream from the
    store to the file, so memory stays flat whatever the run's size."""
    with Store(run_dir, readonly=True) as store:
        if not store.count():
            raise StoreError(
                f"{run_dir}: the store holds no responses yet; run `distill harvest` first"
            )
        # Written into a folder beside `to`, then swapped in for the earlier export, whatever its
        # format (a user's files stay): `to` never holds half an export, nor an older one beside it.
        with staged(Path(to), "export", "--to") as tmp:
            target = tmp if fmt == "hf" else tmp / f"responses.{fmt}"
            schema = None if fmt == "jsonl" else features()
            with DatasetWriter(target, "arrow" if fmt == "hf" else fmt, schema) as out:
                for row in export_rows(store):
                    out.write(row)
    return Path(to) if fmt == "hf" else Path(to) / f"responses.{fmt}"
