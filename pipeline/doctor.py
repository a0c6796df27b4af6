"""`distill doctor RUN`: check a run's store and, if damaged, recover every intact row into a new file.

    distill doctor data/runs/demo            # check; recover into store.recovered.sqlite if damaged
    distill doctor data/runs/demo --replace  # then swap it in (the damaged file is kept beside it)

The check is SQLite's `PRAGMA integrity_check`. Recovery reads each table by rowid range and
bisects around every range SQLite cannot read, so one bad page costs the rows on that page and
nothing else; rows are copied unchanged (keys, answers, logprobs) into a fresh store of the same
schema. The report says how many rows of each table came back and which rowid ranges were lost.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import StoreError
from pipeline.store import (
    STORE_FILE,
    RunLock,
    backfill_prompts,
    check_schema,
    create_store_file,
)

TABLES = ("responses", "failures", "batches", "batch_requests", "prompts")
RECOVERED = "store.recovered.sqlite"


@dataclass
class DoctorReport:
    store: Path
    problems: list[str] = field(default_factory=list)
    recovered: dict[str, int] = field(default_factory=dict)
    lost_ranges: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    written: Path | None = None
    replaced_damaged: Path | None = None

    @property
    def healthy(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        if self.healthy:
            return [f"{self.store}: ok (integrity_check passed); nothing to do"]
        first = " ".join(self.problems[0].replace("*** in database main ***", "").split())
        out = [
            f"{self.store}: damaged: {first[:160]}"
            + (f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else "")
        ]
        for table, n in self.recovered.items():
            lost = self.lost_ranges.get(table) or []
            gaps = ", ".join(f"rowids {a}-{b}" for a, b in lost[:5]) + (
                " ..." if len(lost) > 5 else ""
            )
            out.append(f"  {table}: {n} rows recovered" + (f"; unreadable: {gaps}" if lost else ""))
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


def integrity_problems(path: Path) -> list[str]:
    """What SQLite's integrity check finds wrong with the file ([] when it is sound)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        db.text_factory = lambda b: b.decode(errors="replace")  # garbage in a message or name
        try:
            rows = db.execute("PRAGMA integrity_check").fetchall()
        finally:
            db.close()
    except sqlite3.Error as e:
        return [str(e)]
    except UnicodeDecodeError:  # SQLite's message quotes garbage bytes
        return ["the schema holds bytes that are not text (file is damaged)"]
    found = [str(r[0]) for r in rows]
    return [] if found == ["ok"] else found


def _copy_range(
    src: sqlite3.Connection,
    dst: sqlite3.Connection,
    table: str,
    cols: list[str],
    lo: int,
    hi: int,
    lost: list[tuple[int, int]],
    budget: list[int],
) -> int:
    """Copy rows lo..hi of `table`; bisect around what cannot be read. Returns rows copied.
    `budget` caps the failed reads: past it, a failing range is reported lost without bisecting
    (a damaged interior page can make a whole rowid space unreadable)."""
    try:
        rows = src.execute(
            f"SELECT {', '.join(cols)} FROM {table} WHERE rowid BETWEEN ? AND ?", (lo, hi)
        ).fetchall()
    except sqlite3.DatabaseError:
        budget[0] -= 1
        if lo == hi or budget[0] <= 0:
            lost.append((lo, hi))
            return 0
        mid = (lo + hi) // 2
        return _copy_range(src, dst, table, cols, lo, mid, lost, budget) + _copy_range(
            src, dst, table, cols, mid + 1, hi, lost, budget
        )
    dst.executemany(
        f"INSERT OR IGNORE INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
        rows,
    )
    return len(rows)


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


def recover(src_path: Path, dst_path: Path, report: DoctorReport) -> None:
    """Copy every readable row of each distill table from `src_path` into a new store file."""
    if dst_path.exists():
        dst_path.unlink()
    create_store_file(dst_path)
    src = sqlite3.connect(f"file:{src_path}?mode=ro", uri=True)
    dst = sqlite3.connect(dst_path, isolation_level=None)
    try:
        src.execute("SELECT name FROM sqlite_master").fetchall()  # raises if nothing is readable
        dst.execute("BEGIN")
        for table in TABLES:
            cols = [r[1] for r in dst.execute(f"PRAGMA table_info({table})")]
            try:
                top = src.execute(f"SELECT max(rowid) FROM {table}").fetchone()[0] or 0
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):
                    continue  # a store from before batches existed
                top = 1 << 40
            except sqlite3.DatabaseError:
                top = 1 << 40  # the table's right edge is unreadable: scan the whole rowid space
            lost: list[tuple[int, int]] = []
            budget = [20_000]
            report.recovered[table] = _copy_range(
                src, dst, table, cols, 1, max(top, 1), lost, budget
            )
            report.lost_ranges[table] = _merge_ranges(lost)
        backfill_prompts(dst)  # a prompt's text lost with its page comes back from its answers
        dst.execute("COMMIT")
    finally:
        src.close()
        dst.close()


def doctor(run_dir: Path, *, replace: bool = False) -> DoctorReport:
    """Check RUN/store.sqlite; when damaged, recover into RUN/store.recovered.sqlite (and swap it in
    with `replace`). Holds the run's lock, so no harvest writes while it works."""
    run_dir = Path(run_dir)
    path = run_dir / STORE_FILE
    if not path.is_file() or path.stat().st_size == 0:
        raise StoreError(
            f"{run_dir}: no harvest store here ({STORE_FILE} missing or empty); check the path, "
            "or restore the file from a backup"
        )
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        report = DoctorReport(store=path, problems=integrity_problems(path))
        if report.healthy:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                check_schema(db, path)  # a sound file, but is it a distill store?
            finally:
                db.close()
            return report
        dst = run_dir / RECOVERED
        try:
            recover(path, dst, report)
        except (sqlite3.Error, OSError, UnicodeDecodeError) as e:
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
