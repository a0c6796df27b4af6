"""The run store: one SQLite file per run directory, append-only, keyed by what was asked.

A response paid for is committed (one transaction, WAL) before anything else happens with it.
Its key is a hash of (endpoint, model, request messages, generation parameters, sample index),
so rerunning the same job finds every key done and sends nothing, and changing a parameter makes
new keys while old rows stay. Rows in `responses` are never updated or deleted; a key can be
inserted once only (INSERT OR IGNORE), so a response can never appear twice.

Failed requests go to `failures` (the latest reason and attempt count per key); a later success
for the key removes its failure row. Schema changes are ordered migrations (PRAGMA user_version).

    run/
      store.sqlite      (+ -wal, -shm while open)
      lock              flock held by the harvest writing this run
      harvest.log       one line per event, appended by every run
      config.yaml       the last harvest config used (no secrets)
      batches/          Batch API files in transit (pipeline/batch.py); empty between runs
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, RunLockedError, StoreError
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
]

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
    base_url: str, model: str, messages: list[dict], params: dict, sample_index: int
) -> str:
    """The store key: what was asked, of whom, and which sample."""
    return content_hash(
        {
            "endpoint": base_url.rstrip("/"),
            "model": model,
            "messages": messages,
            "params": params,
            "sample": sample_index,
        },
        length=40,
    )


def _friendly(e: sqlite3.Error | OSError, path: Path) -> StoreError:
    text = str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "full" in text:
        return StoreError(
            f"{path}: disk full; free space and rerun (responses already stored are safe)"
        )
    if (
        "readonly" in text
        or "read-only" in text
        or (isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES))
    ):
        return StoreError(
            f"{path}: run directory is read-only; choose a writable --out or fix its permissions"
        )
    if "not a database" in text or "malformed" in text:
        return StoreError(
            f"{path}: not a distill store (or damaged); point --out at a run directory"
        )
    return StoreError(f"{path}: {text}")


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
        if readonly:
            if not self.path.is_file():  # a wrong path: bad input (exit 2) in every command
                raise InputError(
                    f"{self.run_dir}: no harvest store here ({STORE_FILE} missing); "
                    "run `distill harvest --out {dir}` first or check the path".replace(
                        "{dir}", str(self.run_dir)
                    )
                )
            # Read-only, but still WAL-aware: mode=ro needs the -shm file or a writable dir; on
            # read-only media fall back to immutable (nobody can be writing there).
            try:
                self.db = self._open_ro(f"file:{self.path}?mode=ro")
            except sqlite3.OperationalError:
                try:
                    self.db = self._open_ro(f"file:{self.path}?mode=ro&immutable=1")
                except sqlite3.Error as e:
                    raise _friendly(e, self.path) from None
            except sqlite3.Error as e:
                raise _friendly(e, self.path) from None
        else:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode: a commit survives a process crash (kill -9); only an OS crash
                # or power cut could lose the last commits, never corrupt the file.
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.execute("PRAGMA busy_timeout=5000")
                self._migrate()
            except (sqlite3.Error, OSError) as e:
                raise _friendly(e, self.path) from None
            # Keys with a recorded failure: a success for one of them removes that record.
            self.failed_keys = {r[0] for r in self.db.execute("SELECT key FROM failures")}
        self.db.row_factory = sqlite3.Row

    @staticmethod
    def _open_ro(uri: str) -> sqlite3.Connection:
        db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        db.execute("SELECT 1 FROM responses LIMIT 1").fetchall()
        return db

    def _migrate(self) -> None:
        migrate(self.db)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.db.close()

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
        try:
            self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.execute(sql, values)
            if resp.key in self.failed_keys:
                self.db.execute("DELETE FROM failures WHERE key = ?", (resp.key,))
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            raise _friendly(e, self.path) from None
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
        return {r[0] for r in self.db.execute("SELECT key FROM responses")}

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def iter_responses(self) -> Iterator[Response]:
        """Every stored response, in a stable order (prompt id, sample index, key)."""
        cur = self.db.execute(
            f"SELECT {', '.join(RESPONSE_COLUMNS)} FROM responses ORDER BY prompt_id, sample_index, key"
        )
        for r in cur:
            row = dict(zip(RESPONSE_COLUMNS, r))
            for col in _JSON_COLUMNS:
                if row[col] is not None:
                    row[col] = json.loads(row[col])
            yield Response(**row)

    def has_logprobs(self) -> bool:
        """Whether any stored answer carries token logprobs."""
        sql = "SELECT 1 FROM responses WHERE logprobs IS NOT NULL LIMIT 1"
        return self.db.execute(sql).fetchone() is not None

    def failures(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT * FROM failures ORDER BY prompt_id, sample_index, key")
        return [dict(r) for r in cur]

    # -- Batch API jobs ---------------------------------------------------------------------------

    def add_batch(self, batch: dict[str, Any], requests: list[dict[str, Any]]) -> None:
        """Record a batch and its requests in one transaction, before anything is uploaded.
        A request is {key, prompt_id, sample_index, request: {...}} (request stored as JSON)."""
        now = utcnow()
        row = {**batch, "created_at": now, "updated_at": now}
        cols = [c for c in BATCH_COLUMNS if c in row]
        try:
            self.db.execute("BEGIN IMMEDIATE")
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
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            raise _friendly(e, self.path) from None

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
        try:
            cur = self.db.execute(sql + " ORDER BY created_at, id", args)
        except sqlite3.OperationalError:  # a read-only store of schema 1
            return []
        return [dict(r) for r in cur]

    def batch_requests(self, batch_id: str) -> list[dict[str, Any]]:
        cur = self.db.execute(
            "SELECT key, prompt_id, sample_index, request FROM batch_requests WHERE batch = ? "
            "ORDER BY prompt_id, sample_index, key",
            (batch_id,),
        )
        return [{**dict(r), "request": json.loads(r["request"])} for r in cur]

    def keys_in_open_batches(self) -> set[str]:
        """Keys already sent (or being sent) in a batch that has not been collected yet."""
        cur = self.db.execute(
            "SELECT r.key FROM batch_requests r JOIN batches b ON b.id = r.batch "
            f"WHERE b.state IN ({', '.join('?' * len(BATCH_OPEN_STATES))})",
            BATCH_OPEN_STATES,
        )
        return {r[0] for r in cur}

    def batch_keys(self) -> set[str]:
        """Every key ever sent in a batch."""
        try:
            return {r[0] for r in self.db.execute("SELECT DISTINCT key FROM batch_requests")}
        except sqlite3.OperationalError:  # a read-only store of schema 1
            return set()

    def batch_attempts(self, key: str) -> int:
        """How many batches a key has been sent in."""
        cur = self.db.execute("SELECT COUNT(*) FROM batch_requests WHERE key = ?", (key,))
        return int(cur.fetchone()[0])


@contextlib.contextmanager
def open_run(run_dir: Path, log: logging.Logger, config_yaml: str | None = None) -> Iterator[Store]:
    """A run directory opened for writing: created if need be, locked (one writer at a time), its
    store open, `log` appending to RUN/harvest.log, and RUN/config.yaml written if given."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(
            f"{run_dir}: cannot create the run directory ({e.strerror}); choose another --out"
        ) from None
    lock = RunLock(run_dir)
    lock.acquire()
    handler = None
    try:
        with Store(run_dir) as store:
            try:
                handler = logging.FileHandler(run_dir / "harvest.log", encoding="utf-8")
                if config_yaml is not None:
                    (run_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
            except OSError as e:
                raise StoreError(
                    f"{run_dir}: cannot write to the run directory ({e.strerror})"
                ) from None
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            handler.addFilter(RedactingFilter())
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False
            yield store
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        lock.release()


def wait_for_store(run_dir: Path, timeout: float = 5.0) -> None:
    """Poll until a run directory has a store (for tests that start a harvest in a subprocess)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (run_dir / STORE_FILE).exists():
            return
        time.sleep(0.05)
    raise StoreError(f"{run_dir}: no store appeared within {timeout}s")


def migrate(db: sqlite3.Connection) -> None:
    """Bring a store's schema up to date, one ordered migration per transaction."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for i, script in enumerate(MIGRATIONS[version:], start=version + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in script.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute(f"PRAGMA user_version={i}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def create_store_file(path: Path) -> None:
    """A new, empty store of the current schema at `path` (`distill doctor` recovers into one)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        migrate(db)
    finally:
        db.close()
