"""`distill doctor RUN`: check a run's store and, if damaged, recover every intact row into a new file.

    distill doctor data/runs/demo            # check; recover into store.recovered.sqlite if damaged
    distill doctor data/runs/demo --replace  # then swap it in (the damaged file is kept beside it)

The check is SQLite's `PRAGMA integrity_check`. Recovery works like the sqlite3 shell's `.recover`
(which Debian's sqlite3 cannot run: its library lacks the `sqlite_dbpage` table it needs): it
reads every page of the file, decodes the rows of every table leaf page, including leaves that a
damaged interior page has cut off from their table, and gives each row to the distill table whose
columns it fits. So one bad page costs the rows on that page and nothing else. Rows are copied
unchanged (rowid, keys, answers, logprobs) into a fresh store of the current schema; pages on the
freelist (deleted rows) are skipped. The report says, per table, how many rows came back against
how many the damaged file still lists in its key index (where that index is readable), and which
keys were lost.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, StoreError
from pipeline.store import STORE_FILE, RunLock, backfill_prompts, check_schema, create_store_file

RECOVERED = "store.recovered.sqlite"
# What a value of each declared column type can be stored as (SQLite keeps an integral REAL as
# an integer on disk).
_STORED_AS: dict[str, type | tuple[type, ...]] = {
    "TEXT": str,
    "INTEGER": (int, float),
    "REAL": (int, float),
}


@dataclass
class DoctorReport:
    store: Path
    problems: list[str] = field(default_factory=list)
    recovered: dict[str, int] = field(default_factory=dict)
    claimed: dict[str, int | None] = field(default_factory=dict)  # rows the damaged file lists
    lost: dict[str, list[str]] = field(default_factory=dict)  # keys listed but not recovered
    written: Path | None = None
    replaced_damaged: Path | None = None

    @property
    def healthy(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        if self.healthy:
            return [f"{self.store}: ok (integrity_check passed); nothing to do"]
        first = " ".join(self.problems[0].replace("*** in database main ***", "").split())
        more = f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        out = [f"{self.store}: damaged: {first[:160]}{more}"]
        if self.recovered:
            out.append("recovered page by page (every table leaf page read, orphaned ones too):")
        for table, n in self.recovered.items():
            claimed = self.claimed.get(table)
            if n == 0 and claimed == 0:
                continue  # an empty table: nothing to say
            lost = self.lost.get(table) or []
            if claimed is None:
                line = f"  {table}: {n} rows recovered (the damaged file's own count is unreadable)"
            else:
                line = f"  {table}: {n} of {claimed} rows recovered"
            if lost:
                more = " ..." if len(lost) > 5 else ""
                line += f"; lost {len(lost)}: {', '.join(lost[:5])}{more}"
            out.append(line)
        if self.replaced_damaged is not None:
            out.append(
                f"recovered store is now {self.store}; the damaged file is kept as {self.replaced_damaged}"
            )
        elif self.written is not None:
            out.append(
                f"recovered into {self.written}; rerun with --replace to use it "
                "(then `distill harvest` re-asks only what was lost)"
            )
        return out


def _read_only(path: Path) -> contextlib.closing[sqlite3.Connection]:
    """The store file opened read-only, closed when the with-block ends."""
    return contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True))


def integrity_problems(path: Path) -> list[str]:
    """What SQLite's integrity check finds wrong with the file ([] when it is sound)."""
    try:
        with _read_only(path) as db:
            db.text_factory = lambda b: b.decode(errors="replace")  # garbage in a message or name
            rows = db.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.Error as e:
        return [str(e)]
    except UnicodeDecodeError:  # SQLite's message quotes garbage bytes
        return ["the schema holds bytes that are not text (file is damaged)"]
    found = [str(r[0]) for r in rows]
    return [] if found == ["ok"] else found


# -- reading the file format (https://www.sqlite.org/fileformat2.html) ------------------------


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    """SQLite's big-endian varint at `at`: (value, offset after it)."""
    value = 0
    for i in range(8):
        b = buf[at + i]
        value = (value << 7) | (b & 0x7F)
        if b < 0x80:
            return value, at + i + 1
    return (value << 8) | buf[at + 8], at + 9


class _Pages:
    """The raw pages of a store file."""

    def __init__(self, data: bytes):
        self.data = data
        size = struct.unpack(">H", data[16:18])[0] if len(data) >= 100 else 0
        size = 65536 if size == 1 else size
        if size < 512 or size & (size - 1) or size > 65536:
            raise ValueError("the file header is damaged (no valid page size)")
        self.size = size
        self.usable = size - data[20]
        self.count = len(data) // size

    def page(self, n: int) -> bytes:
        return self.data[(n - 1) * self.size : n * self.size]

    def freelist(self) -> set[int]:
        """Pages on the freelist (deleted content, not to be brought back)."""
        free: set[int] = set()
        trunk = struct.unpack(">I", self.data[32:36])[0]
        while 1 < trunk <= self.count and trunk not in free:
            free.add(trunk)
            p = self.page(trunk)
            n = struct.unpack(">I", p[4:8])[0]
            for i in range(min(n, (self.usable - 8) // 4)):
                free.add(struct.unpack(">I", p[8 + 4 * i : 12 + 4 * i])[0])
            trunk = struct.unpack(">I", p[0:4])[0]
        return free

    def payload(self, page: bytes, at: int) -> tuple[int, bytes]:
        """The rowid and full payload of the table-leaf cell at `at` (overflow pages followed)."""
        total, at = _varint(page, at)
        rowid, at = _varint(page, at)
        if rowid >= 1 << 63:
            rowid -= 1 << 64
        u = self.usable
        x = u - 35
        if total <= x:
            if at + total > u:
                raise ValueError("cell runs past the page")
            return rowid, page[at : at + total]
        m = ((u - 12) * 32 // 255) - 23
        k = m + (total - m) % (u - 4)
        local = k if k <= x else m
        out = bytearray(page[at : at + local])
        nxt = struct.unpack(">I", page[at + local : at + local + 4])[0]
        seen: set[int] = set()
        while len(out) < total:
            if not 1 < nxt <= self.count or nxt in seen:
                raise ValueError("broken overflow chain")
            seen.add(nxt)
            ov = self.page(nxt)
            out += ov[4 : min(u, 4 + total - len(out))]
            nxt = struct.unpack(">I", ov[0:4])[0]
        return rowid, bytes(out)

    def leaf_rows(self, n: int) -> Iterator[tuple[int, tuple[Any, ...]]]:
        """(rowid, values) of each decodable cell of page `n` if it is a table leaf page."""
        page = self.page(n)
        hdr = 100 if n == 1 else 0
        if page[hdr] != 0x0D:
            return
        cells = struct.unpack(">H", page[hdr + 3 : hdr + 5])[0]
        for i in range(min(cells, (self.usable - hdr - 8) // 2)):
            at = struct.unpack(">H", page[hdr + 8 + 2 * i : hdr + 10 + 2 * i])[0]
            if not hdr + 8 + 2 * cells <= at < self.usable:
                continue
            with contextlib.suppress(ValueError, IndexError, struct.error, UnicodeDecodeError):
                rowid, payload = self.payload(page, at)
                yield rowid, _record(payload)


def _record(payload: bytes) -> tuple[Any, ...]:
    """Decode one record (header of serial types, then the values)."""
    size, at = _varint(payload, 0)
    if not 0 < size <= len(payload):
        raise ValueError("bad record header")
    types = []
    while at < size:
        t, at = _varint(payload, at)
        types.append(t)
    if at != size:
        raise ValueError("bad record header")
    values: list[Any] = []
    at = size
    widths = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}
    for t in types:
        if t == 0:
            values.append(None)
        elif t in widths:
            w = widths[t]
            values.append(int.from_bytes(payload[at : at + w], "big", signed=True))
            at += w
        elif t == 7:
            values.append(struct.unpack(">d", payload[at : at + 8])[0])
            at += 8
        elif t in (8, 9):
            values.append(t - 8)
        elif t >= 12:
            n = (t - 12) // 2
            raw = payload[at : at + n]
            values.append(raw.decode("utf-8") if t % 2 else bytes(raw))
            at += n
        else:
            raise ValueError("reserved serial type")
        if at > len(payload):
            raise ValueError("record runs past its payload")
    if at != len(payload):
        raise ValueError("record length does not match its payload")
    return tuple(values)


# -- giving rows back to their tables ----------------------------------------------------------


@dataclass
class _Table:
    name: str
    columns: list[str]
    types: list[str]  # declared type per column
    notnull: list[bool]
    key: list[str]  # primary key columns

    def fits(self, values: tuple[Any, ...]) -> bool:
        """Could this record be a row of this table (column count, NOT NULL, stored types)?"""
        if len(values) != len(self.columns):
            return False
        for v, t, nn in zip(values, self.types, self.notnull, strict=True):
            if v is None and nn:
                return False
            if v is not None and t in _STORED_AS and not isinstance(v, _STORED_AS[t]):
                return False
        return True


def _tables(db: sqlite3.Connection) -> list[_Table]:
    names = db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY rootpage"
    ).fetchall()
    out = []
    for (name,) in names:
        info = db.execute(f"PRAGMA table_info({name})").fetchall()
        out.append(
            _Table(
                name=name,
                columns=[r[1] for r in info],
                types=[str(r[2]).upper() for r in info],
                notnull=[bool(r[3]) for r in info],
                key=[r[1] for r in sorted(info, key=lambda r: r[5]) if r[5]],
            )
        )
    return out


def _is_schema_row(values: tuple[Any, ...]) -> bool:
    """A row of sqlite_schema (shaped like batch_requests: skip it, the schema is rebuilt)."""
    return (
        len(values) == 5
        and values[0] in ("table", "index", "view", "trigger")
        and (values[4] is None or str(values[4]).startswith("CREATE "))
    )


def _listed_keys(path: Path, table: _Table) -> set[tuple[Any, ...]] | None:
    """The keys the damaged file still lists for `table` (its key index), or None if unreadable."""
    try:
        with _read_only(path) as db:
            cols = ", ".join(table.key)
            return {tuple(r) for r in db.execute(f"SELECT {cols} FROM {table.name}")}
    except (sqlite3.Error, UnicodeDecodeError):
        return None


def _snapshot(src_path: Path, scratch: Path) -> bytes:
    """The store's pages with its WAL applied, read from a scratch copy (the damaged file and its
    WAL stay exactly as they are)."""
    wal = Path(f"{src_path}-wal")
    if not wal.is_file() or wal.stat().st_size == 0:
        return src_path.read_bytes()
    copy = scratch / STORE_FILE
    shutil.copyfile(src_path, copy)
    shutil.copyfile(wal, Path(f"{copy}-wal"))
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(copy)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return copy.read_bytes()


def recover(src_path: Path, dst_path: Path, report: DoctorReport) -> None:
    """Copy every decodable row of every page of `src_path` into a new store file."""
    dst_path.unlink(missing_ok=True)
    create_store_file(dst_path)
    with contextlib.closing(sqlite3.connect(dst_path, isolation_level=None)) as dst:
        tables = _tables(dst)
        with tempfile.TemporaryDirectory(dir=dst_path.parent, prefix=".doctor-") as scratch:
            pages = _Pages(_snapshot(src_path, Path(scratch)))
        free = pages.freelist()
        got: dict[str, set[tuple[Any, ...]]] = {t.name: set() for t in tables}
        dst.execute("BEGIN")
        for n in range(1, pages.count + 1):
            if n in free:
                continue
            for rowid, values in pages.leaf_rows(n):
                if _is_schema_row(values):
                    continue
                table = next((t for t in tables if t.fits(values)), None)
                if table is None:
                    continue
                cols = ["rowid", *table.columns]
                cur = dst.execute(
                    f"INSERT OR IGNORE INTO {table.name} ({', '.join(cols)}) "
                    f"VALUES ({', '.join('?' * len(cols))})",
                    (rowid, *values),
                )
                if cur.rowcount:
                    row = dict(zip(table.columns, values, strict=True))
                    got[table.name].add(tuple(row[k] for k in table.key))
        backfill_prompts(dst)  # a prompt's text lost with its page comes back from its answers
        dst.execute("COMMIT")
        for t in tables:
            report.recovered[t.name] = len(got[t.name])
            listed = _listed_keys(src_path, t)
            report.claimed[t.name] = None if listed is None else len(listed)
            if listed is not None:
                report.lost[t.name] = sorted("/".join(map(str, k)) for k in listed - got[t.name])


def doctor(run_dir: Path, *, replace: bool = False) -> DoctorReport:
    """Check RUN/store.sqlite; when damaged, recover into RUN/store.recovered.sqlite (and swap it in
    with `replace`). Holds the run's lock, so no harvest writes while it works."""
    path = run_dir / STORE_FILE
    if not path.is_file() or path.stat().st_size == 0:
        raise InputError(  # a wrong path: bad input (exit 2), as in every other command
            f"{run_dir}: no harvest store here ({STORE_FILE} missing or empty); check the path, "
            "or restore the file from a backup"
        )
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        report = DoctorReport(store=path, problems=integrity_problems(path))
        if report.healthy:
            with _read_only(path) as db:
                check_schema(db, path)  # a sound file, but is it a distill store?
            return report
        dst = run_dir / RECOVERED
        try:
            recover(path, dst, report)
        except (sqlite3.Error, OSError, UnicodeDecodeError, ValueError) as e:
            why = " ".join(str(e).split())[:160]
            raise StoreError(
                f"{path}: recovery failed ({why}); copy the file somewhere safe and report this"
            ) from None
        report.written = dst
        if replace:
            kept = run_dir / f"store.damaged-{time.strftime('%Y%m%dT%H%M%S')}.sqlite"
            path.replace(kept)
            for side in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{path}{side}").replace(Path(f"{kept}{side}"))
            dst.replace(path)
            report.replaced_damaged = kept
        return report
    finally:
        lock.release()
