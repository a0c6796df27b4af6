"""Prompt files -> prompt rows: the harvester's input, in any of the formats users have.

Formats (by extension): .jsonl, .json (an array), .csv, .parquet, .txt (one prompt a line), or a
folder saved with `datasets.save_to_disk`. Any other name is read by its content (JSON lines, a
JSON array, a CSV header naming prompt/messages, Parquet's magic bytes) or refused: a JSONL file
named .yaml is never sent line by line as text. A UTF-8 byte order mark is accepted everywhere. A row is `{"id"?, "prompt" | "messages", "reference"?,
"meta"?}`; any other field is kept in `meta` and can be used by the user template.

    rows, dropped = load_prompts([Path("prompts/demo/train.jsonl")], system_prompt="...")

A row's id is the one given, else a hash of its own content (stable across runs, and across
template changes). Rows whose final request messages are identical are sent once.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import sqlite3
import string
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import InputError
from pipeline.record import canonical_json, content_hash

T = TypeVar("T")
KNOWN_KEYS = {"id", "prompt", "messages", "reference", "meta"}
ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass
class PromptRow:
    """One prompt, ready to send: the request messages plus what curation and eval need."""

    id: str
    messages: list[dict[str, Any]]
    source: str  # "file:line", for error messages
    reference: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # set by the reader: canonical_json(messages), made once for the hashes below and the store
    # keys; and content_hash(messages), the prompt's identity in the store
    messages_json: str = field(default="", repr=False)
    digest: str = ""


def _rows_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                msg = e.msg.removesuffix(" at")  # "Unterminated string starting at": no "at at"
                raise InputError(
                    f"{path}:{n}: invalid JSON ({msg} at column {e.colno}); fix or remove the line"
                ) from None


def _rows_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix the file") from None
    if isinstance(data, dict) and isinstance(data.get("prompts"), list):
        data = data["prompts"]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON array of prompt rows, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def _rows_csv(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield (
                f"{path}:{reader.line_num}",
                {k: v for k, v in row.items() if k is not None and v != ""},
            )


def _rows_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)  # not the whole table
        for i, row in enumerate(itertools.chain.from_iterable(b.to_pylist() for b in batches)):
            yield f"{path}[row {i}]", row
    except Exception as e:  # pyarrow raises several types for a bad file
        raise InputError(f"{path}: not a readable Parquet file ({e}); check the file") from None


def _rows_txt(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                yield f"{path}:{n}", {"prompt": line.rstrip("\n")}


def _rows_hf(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise InputError(f"{path}: not a dataset folder saved with save_to_disk ({e})") from None
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [("", ds)]
    for name, split in splits:
        tag = f"[{name}]" if name else ""
        for i, row in enumerate(split):
            yield f"{path}{tag}[row {i}]", row


def _read(path: Path) -> Iterator[tuple[str, Any]]:
    """(file:line, raw record) of one file, read as iterated (a file never sits in memory whole,
    but for a .json array)."""
    if not path.exists():
        raise InputError(f"{path}: prompt file not found; check the --prompts path")
    readers = {
        ".jsonl": _rows_jsonl,
        ".ndjson": _rows_jsonl,
        ".json": _rows_json,
        ".csv": _rows_csv,
        ".parquet": _rows_parquet,
        ".txt": _rows_txt,
    }
    try:
        reader = _rows_hf if path.is_dir() else readers.get(path.suffix.lower()) or _sniff(path)
        yield from reader(path)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; convert it or use .parquet") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied; make the prompt file readable") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory but not a saved dataset") from None


def _sniff(path: Path) -> Callable[[Path], Iterator[tuple[str, Any]]]:
    """The reader for a file whose name does not say its format, from its first bytes."""
    with path.open("rb") as f:
        head = f.read(65536)
    if head.startswith(b"PAR1"):
        return _rows_parquet
    text = head.decode("utf-8-sig", errors="replace")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if first.startswith("["):
        return _rows_json
    if first.startswith("{"):
        try:
            return _rows_jsonl if isinstance(json.loads(first), dict) else _rows_json
        except json.JSONDecodeError:
            return _rows_json  # an object spread over lines: {"prompts": [...]}
    header = next(csv.reader([first]), [])
    if len(header) > 1 and {"prompt", "messages"} & {h.strip() for h in header}:
        return _rows_csv
    raise InputError(
        f"{path}: cannot tell its format from the name or the content; name it .jsonl, .json, "
        ".csv, .parquet, or .txt (one prompt a line)"
    )


def _render(template: str, values: dict[str, Any], src: str) -> str:
    try:
        return string.Formatter().vformat(template, (), values)
    except KeyError as e:
        raise InputError(
            f"{src}: user template uses {{{e.args[0]}}} but the row has no such field "
            f"(fields: {', '.join(sorted(values)) or 'none'}); fix the template or the row"
        ) from None
    except (ValueError, IndexError) as e:
        raise InputError(f"user template: {e}; write literal braces as {{{{ and }}}}") from None


def _check_messages(msgs: Any, src: str) -> list[dict[str, Any]]:
    if not isinstance(msgs, list) or not msgs:
        raise InputError(f"{src}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(msgs):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str | list)
        ):
            raise InputError(
                f"{src}: messages[{i}] must be an object with a role ({'/'.join(sorted(ROLES))}) and a content string"
            )
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def to_row(
    raw: Any, src: str, *, system_prompt: str | None, user_template: str | None
) -> PromptRow:
    """One raw record -> a PromptRow; errors name `src` (file:line)."""
    if not isinstance(raw, dict):
        raise InputError(
            f"{src}: expected an object with 'prompt' or 'messages', got {type(raw).__name__}"
        )
    given = raw.get("meta")
    meta = dict(given) if isinstance(given, dict) else {} if given is None else {"meta": given}
    meta.update({k: v for k, v in raw.items() if k not in KNOWN_KEYS})
    if raw.get("messages") is not None:
        messages = _check_messages(raw["messages"], src)
        own_content: Any = messages
    elif raw.get("prompt") is not None or user_template:
        text = "" if raw.get("prompt") is None else str(raw["prompt"])
        if user_template:  # the names it may use: the row's keys, its meta's, and prompt
            text = _render(user_template, {"prompt": text, **meta, **raw}, src)
        if not text.strip():
            raise InputError(f"{src}: empty prompt; remove the row or fill it in")
        messages = [{"role": "user", "content": text}]
        own_content = {k: v for k, v in raw.items() if k != "id"}
    else:
        keys = ", ".join(sorted(raw)) or "none"
        raise InputError(
            f"{src}: row has neither 'prompt' nor 'messages' (keys: {keys}); add one, or set user_template to build it from the row's fields"
        )
    if system_prompt and messages[0]["role"] not in ("system", "developer"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    rid = raw.get("id")
    prompt_id = str(rid) if rid not in (None, "") else content_hash(own_content, length=16)
    ref = raw.get("reference")
    return PromptRow(
        id=prompt_id,
        messages=messages,
        source=src,
        reference=None if ref is None else str(ref),
        meta=meta,
    )


def read_text_arg(inline: str | None, path: Path | None, what: str) -> str | None:
    """An inline text setting or the content of its file (system prompt, user template)."""
    if path is None:
        return inline
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(
            f"{path}: {what} file not found; fix the path (shipped ones are in prompts/)"
        ) from None
    except OSError as e:
        raise InputError(f"{path}: cannot read {what} file ({e.strerror})") from None


# Rows are checked against those before them this many at a time: what the reader holds in
# memory is about this many rows, whatever the size of the files.
CHUNK = 2000
# The page cache of the reader's temporary deduplication file: past it, pages go to disk.
SEEN_CACHE_MB = 64


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last one shorter)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class PromptReader:
    """The rows of prompt files, in order, without exact duplicates, read as they are iterated:
    memory does not grow with the files (what deduplication must remember, each prompt's text hash
    and id, lives in a temporary SQLite file, and `kept` is one byte a record).

    A row asking the same as an earlier one (same request messages) is dropped (`dropped`); under
    another id or reference, that is a conflict, described in `conflicts` for a warning. An id
    used by two different prompts is an error. `limit` keeps the first N unique rows. Iterate once
    to check and read everything; `again()` re-reads the rows kept, without the checks.
    """

    def __init__(
        self,
        paths: list[Path],
        *,
        system_prompt: str | None = None,
        user_template: str | None = None,
        limit: int | None = None,
    ):
        if not paths:
            raise InputError(
                "no prompt files given; pass --prompts FILE (or set prompts: in the config)"
            )
        self.paths = [Path(p) for p in paths]
        self.system_prompt, self.user_template, self.limit = system_prompt, user_template, limit
        self.dropped = 0
        self.count = 0  # rows kept
        self.conflicts: list[str] = []
        self.kept = bytearray()  # per record read: 1 if its row was kept

    def _records(self) -> Iterator[tuple[str, Any]]:
        for path in self.paths:
            yield from _read(path)

    def _row(self, src: str, raw: Any) -> PromptRow:
        row = to_row(raw, src, system_prompt=self.system_prompt, user_template=self.user_template)
        row.messages_json = canonical_json(row.messages)
        row.digest = hashlib.sha256(row.messages_json.encode("utf-8")).hexdigest()[:32]
        return row

    def __iter__(self) -> Iterator[PromptRow]:
        self.dropped, self.count, self.conflicts, self.kept = 0, 0, [], bytearray()
        seen = sqlite3.connect("")  # a private temporary file, deleted when closed
        try:
            # nothing to keep after a crash: no journal; a bounded cache (SEEN_CACHE_MB)
            seen.execute("PRAGMA journal_mode=OFF")
            seen.execute(f"PRAGMA cache_size=-{SEEN_CACHE_MB * 1024}")
            seen.execute(
                "CREATE TABLE texts (digest TEXT PRIMARY KEY, id TEXT UNIQUE, reference TEXT, "
                "source TEXT) WITHOUT ROWID"
            )
            records = self._records()
            while self.limit is None or self.count < self.limit:
                # never more rows than the limit still allows: no record past it is read
                size = CHUNK if self.limit is None else min(CHUNK, self.limit - self.count)
                chunk = [self._row(src, raw) for src, raw in itertools.islice(records, size)]
                if not chunk:
                    break
                yield from self._dedup(seen, chunk)
        finally:
            seen.close()
        if not self.count:
            names = ", ".join(str(p) for p in self.paths)
            raise InputError(f"{names}: no prompts found (empty file?); add prompt rows")

    def _dedup(self, seen: sqlite3.Connection, chunk: list[PromptRow]) -> Iterator[PromptRow]:
        """The rows of `chunk` not asked before, checked against earlier chunks and each other.
        One query and one insert a chunk: an id that an earlier chunk gave other text is caught
        by the UNIQUE id (or, on a row dropped as a duplicate, by asking)."""
        texts: dict[str, tuple[str, str | None, str]] = {
            d: (i, ref, src)
            for d, i, ref, src in seen.execute(
                "SELECT digest, id, reference, source FROM texts "
                "WHERE digest IN (SELECT value FROM json_each(?))",
                (json.dumps([r.digest for r in chunk]),),
            )
        }
        owners: dict[str, tuple[str, str]] = {}  # id -> (source, digest), this chunk's
        new = []
        for row in chunk:
            owner = owners.get(row.id)
            if row.digest in texts and texts[row.digest][0] != row.id and owner is None:
                owner = self._owner(seen, row.id)
            if owner is not None and owner[1] != row.digest:
                raise InputError(
                    f"{row.source}: prompt id {row.id!r} is also used by a different prompt at "
                    f"{owner[0]}; ids must be unique"
                )
            if row.digest in texts:
                first_id, first_ref, first_src = texts[row.digest]
                if (first_id, first_ref) != (row.id, row.reference):
                    what = f"ids {first_id!r} and {row.id!r}" if first_id != row.id else ""
                    if first_ref != row.reference:
                        refs = f"references {first_ref!r} and {row.reference!r}"
                        what = f"{what}, {refs}" if what else refs
                    self.conflicts.append(
                        f"{row.source}: same prompt as {first_src} but {what}; only {first_src} "
                        "is used: change the text or remove one of them"
                    )
                self.dropped += 1
                self.kept.append(0)
                continue
            texts[row.digest] = (row.id, row.reference, row.source)
            owners[row.id] = (row.source, row.digest)
            new.append(row)
            self.kept.append(1)
        try:
            seen.executemany(
                "INSERT INTO texts VALUES (?, ?, ?, ?)",
                [(r.digest, r.id, r.reference, r.source) for r in new],
            )
        except sqlite3.IntegrityError:  # an id an earlier chunk gave other text: which one
            for row in new:
                owner = self._owner(seen, row.id)
                if owner is not None and owner[1] != row.digest:
                    raise InputError(
                        f"{row.source}: prompt id {row.id!r} is also used by a different prompt "
                        f"at {owner[0]}; ids must be unique"
                    ) from None
            raise
        self.count += len(new)
        yield from new

    @staticmethod
    def _owner(seen: sqlite3.Connection, pid: str) -> tuple[str, str] | None:
        return seen.execute("SELECT source, digest FROM texts WHERE id = ?", (pid,)).fetchone()

    def again(self) -> Iterator[PromptRow]:
        """The rows kept by the last full iteration, read again (no checks: they passed)."""
        for keep, (src, raw) in zip(self.kept, self._records()):
            if keep:
                yield self._row(src, raw)


def load_prompts(
    paths: list[Path],
    *,
    system_prompt: str | None = None,
    user_template: str | None = None,
    limit: int | None = None,
    conflicts: list[str] | None = None,
) -> tuple[list[PromptRow], int]:
    """All rows of all files, in order, without exact duplicates (PromptReader, in a list).
    Returns (rows, duplicates dropped); conflicts are added to `conflicts` when given."""
    reader = PromptReader(
        paths, system_prompt=system_prompt, user_template=user_template, limit=limit
    )
    rows = list(reader)
    if conflicts is not None:
        conflicts.extend(reader.conflicts)
    return rows, reader.dropped
