"""Online backups of the store, and restoring one.

A backup is `Store.snapshot` (`VACUUM INTO` a `.tmp` file: one read transaction on the live
file, which in WAL mode never blocks the writer) into `<folder>/<store stem>-<UTC time>.sqlite`,
checked with `PRAGMA integrity_check` BEFORE it is fsynced and renamed into place: a file
with the final name is always complete and verified, so only those count (`list_backups`)
and pruning to `keep` never deletes a good backup for a bad one. Why not the sqlite3 backup
API: stepped (`pages=N`), it restarts whenever another connection writes between two steps
(the server writes all the time: measured in `bench.store_backup`); in one step it holds a
read transaction just as VACUUM INTO does, but copies free pages and WAL-era fragmentation too.

Restore never overwrites in place by default: `restore_backup` verifies the backup and
copies it NEXT TO the store (`<store>.restored-<time>`), for the operator to move once the
server is stopped. With `force=True` it moves it into place itself, only when no other
process has the store open: `store_in_use` asks SQLite for an exclusive lock
(`locking_mode=EXCLUSIVE`, `BEGIN EXCLUSIVE`, no busy wait), which fails while any
connection holds the store, since every WAL connection keeps a shared lock for as long as
it is open (the server's and the trainer's `Store` stay open for their process's life).
The replaced store is kept beside it as `<store>.before-restore-<time>`.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from common.paths import fsync_path
from common.store.core import Store
from common.store.errors import StoreError
from common.store.schema import LATEST_VERSION, check_not_newer

_STAMP = re.compile(r"-(\d{8}T\d{6}\.\d{3}Z)\.sqlite$")


class StoreInUseError(StoreError):
    """Another process has the store open (a running server or trainer)."""


@dataclass(frozen=True)
class BackupResult:
    """One verified backup, and the older ones pruned to make room."""

    path: Path
    bytes: int
    seconds: float
    pruned: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "pruned": [p.name for p in self.pruned]}


def utc_stamp(now: float | None = None) -> str:
    """`20261203T184501.123Z`: sorts as the time it names."""
    at = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    return at.strftime("%Y%m%dT%H%M%S.") + f"{at.microsecond // 1000:03d}Z"


def check_integrity(path: Path) -> None:
    """Raise StoreError unless `PRAGMA integrity_check` passes and the schema is one this code
    knows (a file from newer code would be refused by every Store anyway)."""
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError as exc:  # not a database at all
        raise StoreError(f"{path}: not a readable SQLite store ({exc})") from exc
    finally:
        conn.close()
    if problems != ["ok"]:
        raise StoreError(f"{path}: integrity check failed: {'; '.join(problems[:5])}")
    check_not_newer(version, LATEST_VERSION, str(path))


def list_backups(folder: Path, stem: str) -> list[Path]:
    """The finished backups of the store `stem` in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    named = [p for p in folder.glob(f"{stem}-*.sqlite") if _STAMP.search(p.name) and p.is_file()]
    return sorted(named, key=lambda p: p.name)


def prune_backups(folder: Path, stem: str, keep: int) -> list[Path]:
    """Delete all but the newest `keep` backups; return those deleted."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    doomed = list_backups(folder, stem)[:-keep]
    for path in doomed:
        path.unlink()
    if doomed:
        fsync_path(Path(folder))
    return doomed


def backup_store(store: Store, folder: Path, keep: int | None = None, now: float | None = None) -> BackupResult:
    """Write a verified, fsynced copy of the live store into `folder`, named by the time;
    then keep only the newest `keep` (None: keep all)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = store.path.stem
    dest = folder / f"{stem}-{utc_stamp(now)}.sqlite"
    if dest.exists():
        raise StoreError(f"{dest}: a backup of that name exists already")
    started = time.perf_counter()
    store.snapshot(dest, check=check_integrity)
    seconds = time.perf_counter() - started
    pruned = prune_backups(folder, stem, keep) if keep is not None else []
    return BackupResult(dest, dest.stat().st_size, seconds, pruned)


def store_in_use(path: Path) -> bool:
    """True when another connection has the store at `path` open (module docstring: how)."""
    path = Path(path)
    if not path.exists():
        return False
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        conn.execute("COMMIT")
        return False
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return True
        raise
    finally:
        conn.close()  # the last connection: SQLite checkpoints the WAL into the file and deletes it


@dataclass(frozen=True)
class RestoreResult:
    """Where the verified copy of the backup is, and whether it replaced the store."""

    staged: Path
    replaced: bool
    previous: Path | None = None  # the replaced store, kept aside


def restore_backup(backup: Path, store_path: Path, *, force: bool = False, now: float | None = None) -> RestoreResult:
    """Verify `backup` and copy it beside `store_path`; with `force`, move it into place
    (the old store kept aside), refusing with StoreInUseError while another process has the
    store open. Without `force` the store is never touched."""
    backup, store_path = Path(backup), Path(store_path)
    check_integrity(backup)
    stamp = utc_stamp(now)
    store_path.parent.mkdir(parents=True, exist_ok=True)
    staged = store_path.with_name(f"{store_path.name}.restored-{stamp}")
    tmp = staged.with_name(staged.name + ".tmp")
    shutil.copyfile(backup, tmp)
    fsync_path(tmp)
    os.replace(tmp, staged)
    fsync_path(staged.parent)
    if not force:
        return RestoreResult(staged, replaced=False)
    if store_in_use(store_path):
        raise StoreInUseError(
            f"{store_path} is open in another process (a running server or trainer): stop it first; "
            f"the verified copy is at {staged}")
    previous = None
    if store_path.exists():
        previous = store_path.with_name(f"{store_path.name}.before-restore-{stamp}")
        os.replace(store_path, previous)
    for suffix in ("-wal", "-shm"):  # left by an unclean stop: they belong to the old file
        side = store_path.with_name(store_path.name + suffix)
        if side.exists():
            if previous is not None and suffix == "-wal":
                os.replace(side, previous.with_name(previous.name + suffix))
            else:
                side.unlink()
    os.replace(staged, store_path)
    fsync_path(store_path.parent)
    return RestoreResult(staged, replaced=True, previous=previous)
