"""Export a run's store as a dataset: the raw harvest, one row per (prompt, sample, teacher).

    distill export data/runs/demo --to data/exports/demo --format hf

Formats: `hf` (a Hugging Face dataset folder: `datasets.load_from_disk(DIR)`), `parquet`
(DIR/responses.parquet) and `jsonl` (DIR/responses.jsonl). The store is opened read-only.
Columns are documented in EXPORT_COLUMNS; curation (`distill build`) is a separate stage.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import StoreError
from pipeline.store import Store

ExportFormat = Literal["hf", "parquet", "jsonl"]

# name -> (arrow-ish type, meaning). The README's data layout section is generated from this.
EXPORT_COLUMNS: dict[str, tuple[str, str]] = {
    "prompt_id": ("string", "the prompt row's id (given, or a hash of its content)"),
    "sample_index": ("int64", "which sample of this prompt (0..samples-1)"),
    "messages": (
        "list",
        "the request messages followed by the assistant answer (without its reasoning)",
    ),
    "response": ("string", "the answer, reasoning stripped"),
    "reasoning": (
        "string",
        "the reasoning trace (reasoning_content, reasoning, or inline <think>), or null",
    ),
    "finish_reason": ("string", "stop, length, content_filter, ... as the server said"),
    "model": ("string", "the model name the server reported (else the one requested)"),
    "requested_model": ("string", "the model name sent in the request"),
    "teacher": ("string", "the teacher's label (config name, else model)"),
    "base_url": ("string", "the teacher's API root"),
    "prompt_tokens": ("int64", "usage.prompt_tokens"),
    "completion_tokens": ("int64", "usage.completion_tokens (reasoning included)"),
    "reasoning_tokens": ("int64", "usage.completion_tokens_details.reasoning_tokens, or null"),
    "cost_usd": ("float64", "spend for this answer at the configured prices"),
    "latency_s": ("float64", "seconds from send to full response"),
    "attempts": ("int64", "HTTP attempts it took"),
    "created_at": ("string", "UTC time the answer was committed (ISO 8601)"),
    "reference": ("string", "the prompt row's reference answer, or null"),
    "meta": ("string", "the prompt row's meta and extra fields, as JSON, or null"),
    "params": ("string", "generation parameters sent (JSON)"),
    "params_hash": ("string", "hash of params"),
    "system_fingerprint": ("string", "system_fingerprint from the server, or null"),
    "response_id": ("string", "the server's response id"),
    "logprobs": (
        "string",
        "JSON [[token, logprob, [[alt, logprob], ...]], ...] when asked, else null",
    ),
    "source": ("string", "online or batch"),
    "key": ("string", "the store key: hash of endpoint, model, messages, params, sample index"),
}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def export_rows(store: Store) -> list[dict[str, Any]]:
    rows = []
    for r in store.iter_responses():
        msgs = [{"role": m["role"], "content": _text(m.get("content"))} for m in r.messages]
        msgs.append({"role": "assistant", "content": r.response})
        lp = r.token_logprobs()
        rows.append(
            {
                "prompt_id": r.prompt_id,
                "sample_index": r.sample_index,
                "messages": msgs,
                "response": r.response,
                "reasoning": r.reasoning,
                "finish_reason": r.finish_reason,
                "model": r.response_model or r.model,
                "requested_model": r.model,
                "teacher": r.teacher,
                "base_url": r.base_url,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "reasoning_tokens": r.reasoning_tokens,
                "cost_usd": r.cost_usd,
                "latency_s": r.latency_s,
                "attempts": r.attempts,
                "created_at": r.created_at,
                "reference": r.reference,
                "meta": None
                if r.meta is None
                else json.dumps(r.meta, ensure_ascii=False, sort_keys=True),
                "params": json.dumps(r.params, sort_keys=True),
                "params_hash": r.params_hash,
                "system_fingerprint": r.system_fingerprint,
                "response_id": r.response_id,
                "logprobs": None if lp is None else json.dumps(lp, ensure_ascii=False),
                "source": r.source,
                "key": r.key,
            }
        )
    return rows


def features():  # type: ignore[no-untyped-def]
    import datasets

    f: dict[str, Any] = {}
    for name, (kind, _) in EXPORT_COLUMNS.items():
        if kind == "list":
            f[name] = datasets.List(
                {"role": datasets.Value("string"), "content": datasets.Value("string")}
            )
        else:
            f[name] = datasets.Value(kind)
    return datasets.Features(f)


def export(run_dir: Path, to: Path, fmt: ExportFormat = "hf") -> Path:
    """Write the run's responses to `to` in `fmt`; returns the path written."""
    with Store(run_dir, readonly=True) as store:
        rows = export_rows(store)
    if not rows:
        raise StoreError(
            f"{run_dir}: the store holds no responses yet; run `distill harvest` first"
        )
    to = Path(to)
    if fmt == "jsonl":
        to.mkdir(parents=True, exist_ok=True)
        path = to / "responses.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
        return path
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_list(rows, features=features())
    if fmt == "parquet":
        to.mkdir(parents=True, exist_ok=True)
        path = to / "responses.parquet"
        ds.to_parquet(str(path))
        return path
    if to.exists():
        if not (to / "dataset_info.json").exists() and any(to.iterdir()):
            raise StoreError(f"{to}: exists and is not a dataset folder; choose an empty --to")
        shutil.rmtree(to)
    ds.save_to_disk(str(to))
    return to
