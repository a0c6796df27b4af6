"""The record that flows between stages: one teacher answer to one (prompt, sample, teacher).

The teacher client's answers become `Response` records (teacher.py), the store writes and reads
them (store.py: its `responses` table has exactly these columns, a test checks it), and export and
build consume them. Each field is documented once, here; the export columns and the dataset card
quote these texts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: the same value always gives the same text (and hash)."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def content_hash(obj: Any, length: int = 32) -> str:
    """Stable hex hash of a JSON-able value (sorted keys), used for store keys and prompt ids."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:length]


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _f(doc: str, default: Any = dataclasses.MISSING) -> Any:
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclass
class Response:
    """One stored answer: what was asked, of whom, and what came back. Never changed once stored."""

    key: str = _f("the store key: hash of endpoint, model, messages, params, sample index")
    prompt_id: str = _f("the prompt row's id (given, or a hash of its content)")
    sample_index: int = _f("which sample of this prompt (0..samples-1)")
    teacher: str = _f("the teacher's label (config name, else model)")
    base_url: str = _f("the teacher's API root")
    model: str = _f("the model name sent in the request")
    params_hash: str = _f("hash of params")
    params: dict[str, Any] = _f("generation parameters sent")
    messages: list[dict[str, Any]] = _f("the request messages, as sent")
    response: str = _f("the answer, reasoning stripped")
    created_at: str = _f("UTC time the answer was committed (ISO 8601)")
    reference: str | None = _f("the prompt row's reference answer, or null", None)
    meta: dict[str, Any] | None = _f("the prompt row's meta and extra fields, or null", None)
    reasoning: str | None = _f(
        "the reasoning trace (reasoning_content, reasoning, or inline <think>), or null", None
    )
    finish_reason: str | None = _f("stop, length, content_filter, ... as the server said", None)
    response_model: str | None = _f("the model name the server reported, or null", None)
    system_fingerprint: str | None = _f("system_fingerprint from the server, or null", None)
    response_id: str | None = _f("the server's response id", None)
    prompt_tokens: int | None = _f("usage.prompt_tokens", None)
    completion_tokens: int | None = _f("usage.completion_tokens (reasoning included)", None)
    reasoning_tokens: int | None = _f(
        "usage.completion_tokens_details.reasoning_tokens, or null", None
    )
    cost_usd: float = _f("spend for this answer at the configured prices", 0.0)
    latency_s: float | None = _f("seconds from send to full response (null for batch)", None)
    attempts: int = _f("HTTP attempts it took", 1)
    logprobs: bytes | None = _f(
        "the answer's token logprobs, packed (see pack_logprobs), or null", None
    )
    source: str = _f("online or batch", "online")

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        """Field names, in declaration order (the store names its columns explicitly)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def docs(cls) -> dict[str, str]:
        """Field name -> its documentation (export columns and the dataset card use these)."""
        return {f.name: f.metadata["doc"] for f in dataclasses.fields(cls)}

    @classmethod
    def types(cls) -> dict[str, str]:
        """Field name -> its type as written, e.g. "int | None" (export derives column types)."""
        return {f.name: str(f.type) for f in dataclasses.fields(cls)}

    def token_logprobs(self) -> list | None:
        """The answer's logprobs as [[token, logprob, [[alt, logprob], ...]], ...], or None."""
        return unpack_logprobs(self.logprobs)


def pack_logprobs(rows: list | None) -> bytes | None:
    """Token logprobs as [[token, logprob, [[alt, logprob], ...]], ...] (teacher.token_logprobs
    reads them off the API) -> zlib-compressed JSON; None stays None."""
    return zlib.compress(canonical_json(rows).encode("utf-8"), 6) if rows else None


def unpack_logprobs(blob: bytes | None) -> list | None:
    return None if blob is None else json.loads(zlib.decompress(blob))
