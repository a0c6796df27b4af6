"""The run store: one SQLite file per run directory, append-only, keyed by what was asked.

A response paid for is committed (one transaction, WAL) before anything else happens with it.
Its key is a hash of (endpoint, model, request messages, generation parameters, sample index),
so rerunning the same job finds every key done and sends nothing, and changing a parameter makes
new keys while old rows stay. Rows in `responses` are never updated or deleted; a key can be
inserted once only (ON CONFLICT(key) DO NOTHING), so a response can never appear twice.

Each prompt id's text is kept in `prompts` (a hash of its request messages): a rerun that gives an
id other text is stopped before sending (pipeline/harvest.py check_prompt_identity).

Failed requests go to `failures` (the latest reason and attempt count per key); a later success
for the key removes its failure row. Schema changes are ordered migrations (PRAGMA user_version).

    run/
      store.sqlite      (+ -wal, -shm while open)
      lock              flock held by the harvest writing this run
      harvest.log       one line per event, appended by every run
      config.yaml       the last harvest config used (no secrets)
      .distill.json     marks the folder as harvest's (pipeline/outdir.py)
      batches/          Batch API files in transit (pipeline/batch.py); empty between runs
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import DistillError, InputError, RunLockedError, StoreError
from pipeline.outdir import MARKER, claim, own_files, owner, record
from pipeline.record import Response, canonical_json, content_hash, utcnow
from pipeline.redact import RedactingFilter, redact

STORE_FILE = "store.sqlite"

MIGRATIONS: list[str] = [
    # 1: responses, failures, meta
    """
    CREATE TABLE responses (
        key TEXT PRIMARY KEY,
        prompt_id TEXT NOT NULL,
        sample_index INTEGER NOT NULL,
        teacher TEXT NOT NULL,
        base_url TEXT NOT NULL,
        model TEXT NOT NULL,
        params_hash TEXT NOT NULL,
        params TEXT NOT NULL,
        messages TEXT NOT NULL,
        reference TEXT,
        meta TEXT,
        response TEXT NOT NULL,
        reasoning TEXT,
        finish_reason TEXT,
        response_model TEXT,
        system_fingerprint TEXT,
        response_id TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        reasoning_tokens INTEGER,
        cost_usd REAL NOT NULL DEFAULT 0,
        latency_s REAL,
        attempts INTEGER NOT NULL DEFAULT 1,
        created_at TEXT NOT NULL,
        logprobs BLOB,
        source TEXT NOT NULL DEFAULT 'online'
    );
    CREATE INDEX responses_prompt ON responses (prompt_id, sample_index);
    CREATE TABLE failures (
        key TEXT PRIMARY KEY,
        prompt_id TEXT NOT NULL,
        sample_index INTEGER NOT NULL,
        teacher TEXT NOT NULL,
        status INTEGER,
        error TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: Batch API jobs (pipeline/batch.py). A batch row is written, with its requests, before
    # anything is uploaded: `state` says how far the submission got (prepared, uploaded,
    # submitted, collected, abandoned), `remote_status` what the server last said.
    """
    CREATE TABLE batches (
        id TEXT PRIMARY KEY,
        teacher TEXT NOT NULL,
        teacher_config TEXT NOT NULL,
        state TEXT NOT NULL,
        request_count INTEGER NOT NULL,
        input_file_id TEXT,
        batch_id TEXT,
        remote_status TEXT,
        output_file_id TEXT,
        error_file_id TEXT,
        completed INTEGER,
        failed INTEGER,
        error TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE batch_requests (
        batch TEXT NOT NULL REFERENCES batches (id),
        key TEXT NOT NULL,
        prompt_id TEXT NOT NULL,
        sample_index INTEGER NOT NULL,
        request TEXT NOT NULL,
        PRIMARY KEY (batch, key)
    );
    CREATE INDEX batch_requests_key ON batch_requests (key);
    """,
    # 3: on-policy rollouts (pipeline/onpolicy.py): what the student sampled and what the teacher
    # said of each of its tokens, committed before a training step uses it. Token lists are JSON;
    # `teacher_topk` is kd.pack_targets over the completion's positions (NULL without top-k).
    """
    CREATE TABLE rollouts (
        key TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        step INTEGER NOT NULL,
        prompt_id TEXT NOT NULL,
        sample_index INTEGER NOT NULL,
        teacher TEXT NOT NULL,
        prompt_ids TEXT NOT NULL,
        completion_ids TEXT NOT NULL,
        teacher_logprobs TEXT NOT NULL,
        teacher_topk BLOB,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cost_usd REAL NOT NULL,
        attempts INTEGER NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX rollouts_step ON rollouts (kind, step);
    """,
    # 4: each prompt id's content, so a rerun that gives an id other text is stopped, not mixed:
    # `hash` is content_hash(request messages) of the text harvested under the id now (build uses
    # only rows of that text), `source` the file:line it came from. Backfilled from `responses`.
    """
    CREATE TABLE prompts (
        id TEXT PRIMARY KEY,
        hash TEXT NOT NULL,
        source TEXT,
        first_seen TEXT NOT NULL
    );
    """,
]
ROLLOUT_COLUMNS = (
    "key",
    "kind",
    "step",
    "prompt_id",
    "sample_index",
    "teacher",
    "prompt_ids",
    "completion_ids",
    "teacher_logprobs",
    "teacher_topk",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "attempts",
    "created_at",
)

# Batch states whose requests are still out (not to be submitted again).
BATCH_OPEN_STATES = ("prepared", "uploaded", "submitted")
BATCH_COLUMNS = (
    "id",
    "teacher",
    "teacher_config",
    "state",
    "request_count",
    "input_file_id",
    "batch_id",
    "remote_status",
    "output_file_id",
    "error_file_id",
    "completed",
    "failed",
    "error",
    "created_at",
    "updated_at",
)

RESPONSE_COLUMNS = Response.columns()  # the `responses` table has exactly these (tests check)
_JSON_COLUMNS = ("params", "messages", "meta")


def request_key(
    base_url: str,
    model: str,
    messages: list[dict],
    params: dict,
    sample_index: int,
    messages_json: str | None = None,
) -> str:
    """The store key: what was asked, of whom, and which sample (see `request_keys`)."""
    return request_keys(base_url, model, params)(messages, sample_index, messages_json)


def request_keys(base_url: str, model: str, params: dict) -> Callable[..., str]:
    """The store key function of one teacher and its params: (messages, sample_index,
    messages_json=None) -> content_hash of {"endpoint", "messages", "model", "params", "sample"}.
    Written out in that (sorted) order, the parts that do not change made once, and
    `messages_json` (canonical_json(messages), when the caller has it) not made again: the same
    text as the dict's, so the same keys (tests check)."""
    head = f'{{"endpoint":{canonical_json(base_url.rstrip("/"))},"messages":'
    tail = f',"model":{canonical_json(model)},"params":{canonical_json(params)},"sample":'

    def key(messages: list[dict], sample_index: int, messages_json: str | None = None) -> str:
        text = f"{head}{messages_json or canonical_json(messages)}{tail}{int(sample_index)}}}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]

    return key


def _friendly(e: sqlite3.Error | OSError | UnicodeDecodeError, path: Path) -> StoreError:
    text = str(e)
    code = e.errno if isinstance(e, OSError) else None
    # SQLite's words count; an OSError's text names its file, so only its errno does
    said = "" if isinstance(e, OSError) else text
    if code == errno.ENOSPC or "full" in said:
        return StoreError(
            f"{path}: disk full; free space and rerun (responses already stored are safe)"
        )
    if code in (errno.EROFS, errno.EACCES) or "readonly" in said or "read-only" in said:
        return StoreError(
            f"{path}: run directory is read-only; choose a writable --out or fix its permissions"
        )
    if isinstance(e, OSError):
        return StoreError(f"{path}: {e.strerror or text}")
    return damaged(path, text)


def damaged(path: Path, why: str) -> StoreError:
    """The one error for a store SQLite cannot read: what it said, and the recovery command."""
    why = " ".join(why.replace("*** in database main ***", "").split())
    why = why if len(why) <= 160 else why[:157] + "..."
    return StoreError(
        f"{path}: damaged or unreadable ({why}); check and recover it with `distill doctor {path.parent}`"
    )


# Files a run directory holds once it has had a store: a missing or empty store.sqlite beside
# them is a lost store, not a new one.
HISTORY = ("harvest.log", "config.yaml", "batches", f"{STORE_FILE}-wal")


def check_schema(db: sqlite3.Connection, path: Path) -> None:
    """Refuse, untouched, a SQLite file that is not a distill store: another application's tables,
    a `responses` table of another shape, or a schema newer than this distill knows."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    tables = {
        r[0]
        for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if not r[0].startswith("sqlite_")
    }
    if version == 0 and tables:
        raise StoreError(
            f"{path}: a SQLite file of another application (tables: {', '.join(sorted(tables))}); "
            "distill leaves it untouched: pass a distill run directory (for harvest, another --out)"
        )
    if version > len(MIGRATIONS):
        raise StoreError(
            f"{path}: written by a newer distill (schema {version}, this one knows {len(MIGRATIONS)}); "
            "upgrade distill"
        )
    if version >= 1:
        cols = {r[1] for r in db.execute("PRAGMA table_info(responses)")}
        if cols != set(RESPONSE_COLUMNS):
            raise StoreError(
                f"{path}: its `responses` table is not distill's (columns differ); distill leaves "
                "it untouched: pass a distill run directory (for harvest, another --out)"
            )


class RunLock:
    """An exclusive flock on RUN/lock. The kernel drops it when the process dies, even by kill -9,
    so a crashed run never leaves the directory stuck."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _friendly(e, self.path.parent) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent}: another harvest is running on this run directory (pid {holder}); "
                "wait for it to finish or stop it, or use another --out"
            ) from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None


class Store:
    """The SQLite store of one run directory. Open writable for a harvest, read-only for the rest."""

    def __init__(self, run_dir: str | Path, *, readonly: bool = False):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STORE_FILE
        self.readonly = readonly
        self.failed_keys: set[str] = set()
        self.prompt_sources: dict[str, str] = {}  # prompt id -> file:line, kept in `prompts`
        if readonly:
            # a wrong path (or an emptied file): bad input (exit 2) in every command
            if not self.path.is_file() or self.path.stat().st_size == 0:
                raise InputError(
                    f"{self.run_dir}: no harvest store here ({STORE_FILE} missing or empty); "
                    f"run `distill harvest --out {self.run_dir}` first or check the path"
                )
            # Read-only, but still WAL-aware: mode=ro needs the -shm file or a writable dir; on
            # read-only media fall back to immutable (nobody can be writing there).
            try:
                try:
                    self.db = self._open_ro(f"file:{self.path}?mode=ro")
                except sqlite3.OperationalError:
                    self.db = self._open_ro(f"file:{self.path}?mode=ro&immutable=1")
            except (sqlite3.Error, UnicodeDecodeError) as e:
                raise _friendly(e, self.path) from None
        else:
            self._refuse_lost_store()
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                check_schema(self.db, self.path)
                # A whole-file check before writing: a harvest never adds to, nor reports success
                # on, a damaged store. integrity_check, not quick_check: only it sees a damaged
                # index (the keys index says what is done); 0.3 s on a 100k-row, 212 MB store.
                self.check()
                self.db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode: a commit survives a process crash (kill -9); only an OS crash
                # or power cut could lose the last commits, never corrupt the file.
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.execute("PRAGMA busy_timeout=5000")
                migrate(self.db)
                # Keys with a recorded failure: a success for one of them removes that record.
                self.failed_keys = {r[0] for r in self.db.execute("SELECT key FROM failures")}
            except StoreError:
                self.close()
                raise
            except (sqlite3.Error, OSError, UnicodeDecodeError) as e:
                self.close()
                raise _friendly(e, self.path) from None
        self.db.row_factory = sqlite3.Row

    def _refuse_lost_store(self) -> None:
        """A missing or empty store.sqlite is a new store only in a run directory without history."""
        if self.path.is_file() and self.path.stat().st_size > 0:
            return
        seen = [n for n in HISTORY if (self.run_dir / n).exists()]
        if STORE_FILE in own_files(self.run_dir):
            seen.append(".distill.json")
        if seen:
            state = "empty" if self.path.exists() else "missing"
            raise StoreError(
                f"{self.path}: {state}, but this run directory had a store ({', '.join(seen)}); "
                f"restore store.sqlite from a backup (or `distill doctor {self.run_dir}`), or use a new --out"
            )

    def check(self) -> None:
        """SQLite's integrity check of the whole file; damage is one error naming `distill doctor`.
        Harvest runs it on open; a read-only command that does not read every row runs it too."""
        with self._reading():
            problems = [r[0] for r in self.db.execute("PRAGMA integrity_check(1)")]
        if problems != ["ok"]:
            raise damaged(self.path, "; ".join(map(str, problems)))

    def _open_ro(self, uri: str) -> sqlite3.Connection:
        db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        try:
            check_schema(db, self.path)
            db.execute("SELECT 1 FROM responses LIMIT 1").fetchall()
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error, AttributeError):
            self.db.close()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Any SQLite error while reading is one line naming the file and `distill doctor`."""
        try:
            yield
        except (sqlite3.Error, UnicodeDecodeError) as e:  # garbage where text should be
            raise _friendly(e, self.path) from None

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """One write transaction: rolled back on a SQLite error, which is one line naming the file."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            yield
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            raise _friendly(e, self.path) from None

    def _rows_if_table(self, sql: str, args: Any = ()) -> list[sqlite3.Row]:
        """The rows of a read; none when its table is missing (a read-only store of an older
        schema, which is never migrated)."""
        with self._reading():
            try:
                return self.db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):
                    return []
                raise

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes (harvest) ---------------------------------------------------------------------

    def add_response(self, resp: Response) -> bool:
        """Commit one response. Returns False if its key was already stored (nothing changes)."""
        values = []
        for col in RESPONSE_COLUMNS:
            v = getattr(resp, col)
            if col in _JSON_COLUMNS and v is not None and not isinstance(v, str):
                v = canonical_json(v)
            values.append(v)
        # ON CONFLICT(key) DO NOTHING, not INSERT OR IGNORE: only a stored key is skipped; a row
        # that breaks a NOT NULL constraint raises instead of vanishing.
        sql = f"INSERT INTO responses ({', '.join(RESPONSE_COLUMNS)}) VALUES ({', '.join('?' * len(RESPONSE_COLUMNS))}) ON CONFLICT(key) DO NOTHING"
        with self._writing():
            cur = self.db.execute(sql, values)
            # The first answer to a prompt id fixes its text (a replacement is recorded apart).
            self.db.execute(
                "INSERT INTO prompts (id, hash, source, first_seen) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(id) DO NOTHING",
                (
                    resp.prompt_id,
                    content_hash(resp.messages),
                    # popped: once one answer is in, the prompts row exists (a chunked harvest
                    # adds the sources of each chunk's rows, this keeps the dict small)
                    self.prompt_sources.pop(resp.prompt_id, None),
                    resp.created_at,
                ),
            )
            if resp.key in self.failed_keys:
                self.db.execute("DELETE FROM failures WHERE key = ?", (resp.key,))
        self.failed_keys.discard(resp.key)
        return cur.rowcount == 1

    def add_failure(
        self,
        key: str,
        prompt_id: str,
        sample_index: int,
        teacher: str,
        status: int | None,
        error: str,
        attempts: int,
    ) -> None:
        error = redact(error)  # servers quote requests back, keys included
        try:
            self.db.execute(
                "INSERT INTO failures (key, prompt_id, sample_index, teacher, status, error, attempts, updated_at) "
                "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET status=excluded.status, "
                "error=excluded.error, attempts=failures.attempts+excluded.attempts, updated_at=excluded.updated_at",
                (key, prompt_id, sample_index, teacher, status, error[:2000], attempts, utcnow()),
            )
        except sqlite3.Error as e:
            raise _friendly(e, self.path) from None
        self.failed_keys.add(key)

    # -- reads ----------------------------------------------------------------------------------

    def done_keys(self) -> set[str]:
        with self._reading():
            return {r[0] for r in self.db.execute("SELECT key FROM responses")}

    def done_among(self, keys: list[str]) -> set[str]:
        """The ones of `keys` stored: a harvest asks chunk by chunk, never loading every key."""
        sql = "SELECT key FROM responses WHERE key IN (SELECT value FROM json_each(?))"
        with self._reading():
            return {r[0] for r in self.db.execute(sql, (json.dumps(keys),))}

    def is_current(self) -> bool:
        """Whether the schema is this distill's (no migration left to run)."""
        with self._reading():
            return bool(self.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS))

    def count(self) -> int:
        with self._reading():
            return int(self.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def iter_responses(self) -> Iterator[Response]:
        """Every stored response, in a stable order (prompt id, sample index, key)."""
        with self._reading():
            cur = self.db.execute(
                f"SELECT {', '.join(RESPONSE_COLUMNS)} FROM responses ORDER BY prompt_id, sample_index, key"
            )
            for r in cur:
                row = dict(zip(RESPONSE_COLUMNS, r))
                try:
                    for col in _JSON_COLUMNS:
                        if row[col] is not None:
                            row[col] = json.loads(row[col])
                    resp = Response(**row)
                except ValueError as e:  # garbage inside a row (pydantic's errors are ValueErrors)
                    first = str(e).splitlines()[0]
                    raise damaged(self.path, f"row {row['key']!r}: {first}") from None
                yield resp

    def prompt_hashes(self, ids: list[str] | None = None) -> dict[str, str]:
        """Each prompt id's current content hash, of `ids` or all ({} for a store from before
        they were kept)."""
        sql, args = "SELECT id, hash FROM prompts", []
        if ids is not None:
            sql, args = sql + " WHERE id IN (SELECT value FROM json_each(?))", [json.dumps(ids)]
        return {r[0]: r[1] for r in self._rows_if_table(sql, args)}

    def replace_prompts(self, prompts: list[tuple[str, str, str]]) -> None:
        """Make (id, content hash, file:line) each prompt's current text (build uses only it)."""
        with self._writing():
            self.db.executemany(
                "INSERT INTO prompts (id, hash, source, first_seen) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET hash = excluded.hash, source = excluded.source "
                "WHERE hash != excluded.hash",
                [(pid, h, src, utcnow()) for pid, h, src in prompts],
            )

    def has_logprobs(self) -> bool:
        """Whether any stored answer carries token logprobs."""
        sql = "SELECT 1 FROM responses WHERE logprobs IS NOT NULL LIMIT 1"
        with self._reading():
            return self.db.execute(sql).fetchone() is not None

    def failures(self) -> list[dict[str, Any]]:
        with self._reading():
            cur = self.db.execute("SELECT * FROM failures ORDER BY prompt_id, sample_index, key")
            return [dict(r) for r in cur]

    # -- Batch API jobs ---------------------------------------------------------------------------

    def add_batch(self, batch: dict[str, Any], requests: list[dict[str, Any]]) -> None:
        """Record a batch and its requests in one transaction, before anything is uploaded.
        A request is {key, prompt_id, sample_index, request: {...}} (request stored as JSON)."""
        now = utcnow()
        row = {**batch, "created_at": now, "updated_at": now}
        cols = [c for c in BATCH_COLUMNS if c in row]
        with self._writing():
            self.db.execute(
                f"INSERT INTO batches ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [row[c] for c in cols],
            )
            self.db.executemany(
                "INSERT INTO batch_requests (batch, key, prompt_id, sample_index, request) "
                "VALUES (?,?,?,?,?)",
                [
                    (
                        batch["id"],
                        r["key"],
                        r["prompt_id"],
                        r["sample_index"],
                        canonical_json(r["request"]),
                    )
                    for r in requests
                ],
            )

    def update_batch(self, local_id: str, /, **fields: Any) -> None:
        """Record what happened to a batch (its state, the server's ids and status)."""
        bad = set(fields) - set(BATCH_COLUMNS)
        assert not bad, f"unknown batch columns {bad}"
        fields["updated_at"] = utcnow()
        sets = ", ".join(f"{k} = ?" for k in fields)
        try:
            self.db.execute(f"UPDATE batches SET {sets} WHERE id = ?", [*fields.values(), local_id])
        except sqlite3.Error as e:
            raise _friendly(e, self.path) from None

    def batches(self, states: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Batch rows, oldest first (none in a store written before batches existed)."""
        sql = "SELECT * FROM batches"
        args: tuple[str, ...] = ()
        if states is not None:
            sql += f" WHERE state IN ({', '.join('?' * len(states))})"
            args = states
        return [dict(r) for r in self._rows_if_table(sql + " ORDER BY created_at, id", args)]

    def batch_requests(self, batch_id: str) -> list[dict[str, Any]]:
        with self._reading():
            cur = self.db.execute(
                "SELECT key, prompt_id, sample_index, request FROM batch_requests WHERE batch = ? "
                "ORDER BY prompt_id, sample_index, key",
                (batch_id,),
            )
            try:
                return [{**dict(r), "request": json.loads(r["request"])} for r in cur]
            except ValueError as e:
                raise damaged(self.path, f"batch {batch_id}: {e}") from None

    def keys_in_open_batches(self) -> set[str]:
        """Keys already sent (or being sent) in a batch that has not been collected yet."""
        with self._reading():
            cur = self.db.execute(
                "SELECT r.key FROM batch_requests r JOIN batches b ON b.id = r.batch "
                f"WHERE b.state IN ({', '.join('?' * len(BATCH_OPEN_STATES))})",
                BATCH_OPEN_STATES,
            )
            return {r[0] for r in cur}

    def batch_keys(self) -> set[str]:
        """Every key ever sent in a batch."""
        return {r[0] for r in self._rows_if_table("SELECT DISTINCT key FROM batch_requests")}

    def batch_attempts(self, key: str) -> int:
        """How many batches a key has been sent in."""
        with self._reading():
            cur = self.db.execute("SELECT COUNT(*) FROM batch_requests WHERE key = ?", (key,))
            return int(cur.fetchone()[0])

    # -- on-policy rollouts (pipeline/onpolicy.py) ------------------------------------------------

    def add_rollout(self, row: dict[str, Any]) -> bool:
        """Commit one scored rollout (ROLLOUT_COLUMNS; lists as JSON). False if its key was stored."""
        values = [
            canonical_json(v) if isinstance(v, list) else v
            for v in (row[c] for c in ROLLOUT_COLUMNS)
        ]
        sql = f"INSERT INTO rollouts ({', '.join(ROLLOUT_COLUMNS)}) VALUES ({', '.join('?' * len(ROLLOUT_COLUMNS))}) ON CONFLICT(key) DO NOTHING"
        with self._writing():
            cur = self.db.execute(sql, values)
        return cur.rowcount == 1

    def rollouts(self, kind: str, step: int | None = None) -> dict[str, dict[str, Any]]:
        """Stored rollouts of one kind (train/eval), of one step when given, by key; JSON decoded."""
        sql = "SELECT * FROM rollouts WHERE kind = ?"
        args: tuple[Any, ...] = (kind,)
        if step is not None:
            sql, args = sql + " AND step = ?", (kind, step)
        with self._reading():
            rows = [dict(r) for r in self.db.execute(sql, args)]
        for row in rows:
            for c in ("prompt_ids", "completion_ids", "teacher_logprobs"):
                row[c] = json.loads(row[c])
        return {row["key"]: row for row in rows}

    def rollout_totals(self) -> tuple[float, int]:
        """(USD spent on scoring, teacher tokens scored) over every stored rollout."""
        with self._reading():
            r = self.db.execute(
                "SELECT COALESCE(SUM(cost_usd), 0), COALESCE(SUM(prompt_tokens), 0) FROM rollouts"
            ).fetchone()
        return float(r[0]), int(r[1])


@contextlib.contextmanager
def open_run(
    run_dir: Path, log: logging.Logger, config_yaml: str | None = None, stage: str = "harvest"
) -> Iterator[Store]:
    """A run directory opened for writing: claimed for `stage` (never another stage's folder),
    locked (one writer at a time), its store open, `log` appending to RUN/harvest.log, and
    RUN/config.yaml written if given."""
    claim(run_dir, stage)
    lock = RunLock(run_dir)
    lock.acquire()
    handler = None
    try:
        with Store(run_dir) as store:
            try:
                record(run_dir, stage, [STORE_FILE, "lock", "harvest.log", "config.yaml"])
                handler = log_handler(run_dir)
                if config_yaml is not None:
                    (run_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
            except OSError as e:
                raise StoreError(
                    f"{run_dir}: cannot write to the run directory ({e.strerror})"
                ) from None
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False
            yield store
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        lock.release()


def log_handler(run_dir: Path) -> logging.FileHandler:
    """RUN/harvest.log, appended to, one timestamped line per event, every line redacted."""
    handler = logging.FileHandler(run_dir / "harvest.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter())
    return handler


def log_early_failure(
    run_dir: Path, stage: str, error: DistillError, what: str | None = None
) -> None:
    """`<what, else stage> failed: ERROR (exit N)` appended to RUN/harvest.log, for an error raised before
    `open_run` opened the log (a damaged store, an edited prompt): from cron, a log that ends in
    its last run's summary reads as a hang. Only where the log is already the stage's (its marker
    or harvest.log there): no file is added to a folder the stage does not own. Not for a lock
    refusal: that log belongs to the run holding the lock, which has not failed."""
    if isinstance(error, RunLockedError) or owner(run_dir) != stage:
        return
    if not ((run_dir / MARKER).is_file() or (run_dir / "harvest.log").is_file()):
        return
    with contextlib.suppress(OSError), contextlib.closing(log_handler(run_dir)) as handler:
        text = f"{what or stage} failed: {error} (exit {error.exit_code})"
        handler.handle(
            logging.makeLogRecord({"levelno": logging.ERROR, "levelname": "ERROR", "msg": text})
        )


def migrate(db: sqlite3.Connection) -> None:
    """Bring a store's schema up to date, one ordered migration per transaction."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for i, script in enumerate(MIGRATIONS[version:], start=version + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in script.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            if i == 4:  # the prompts table: filled from the rows of a store harvested before
                backfill_prompts(db)
            db.execute(f"PRAGMA user_version={i}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def backfill_prompts(db: sqlite3.Connection) -> None:
    """Each prompt id without a recorded text gets that of its latest row (migration 4 for a store
    harvested before; `distill doctor` after a recovery)."""
    rows = db.execute(
        "SELECT prompt_id, messages, min(created_at) OVER (PARTITION BY prompt_id) FROM responses "
        "ORDER BY prompt_id, created_at"
    )
    latest = {pid: (content_hash(json.loads(msgs)), first) for pid, msgs, first in rows}
    db.executemany(
        "INSERT OR IGNORE INTO prompts (id, hash, source, first_seen) VALUES (?, ?, 'store', ?)",
        [(pid, h, first) for pid, (h, first) in latest.items()],
    )


def create_store_file(path: Path) -> None:
    """A new, empty store of the current schema at `path` (`distill doctor` recovers into one)."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        migrate(db)
