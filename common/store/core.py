"""`Store`: one SQLite file, one writer thread with group commit, per-thread readers.

Writes. Every write is a function `fn(db)` queued to the single writer thread, which owns
the only writing connection of this process. The writer takes whatever is queued (up to
`max_batch` ops) and runs it as ONE transaction, each op inside its own SAVEPOINT: an op
that raises is rolled back to its savepoint and fails only its own future, while the
others commit. Futures resolve only after COMMIT returned (acknowledge-after-commit), so
a caller that saw its write succeed will find it after any crash of this process. The
asyncio callers of a batch are woken together, by ONE callback per event loop: a wake-up
per write (a self-pipe write by the writer, an epoll wake-up and a future copy on the loop)
cost about as much as a small op's SQL.

Durability. WAL mode with `synchronous=FULL` (the default): each commit fsyncs the WAL, so
an acknowledged write survives a process crash AND a power loss or kernel panic. Group
commit pays that fsync once per batch, not per write. `synchronous="NORMAL"` is accepted
for benchmarks and throwaway stores: a commit then reaches the OS page cache but is
fsynced only at checkpoints, which still survives a process crash (SIGKILL, os._exit) but
may lose the last commits on power loss. Other processes may open the same file with
their own Store (the trainer does): BEGIN IMMEDIATE plus `busy_timeout` serialize them.

Reads. `read_sync(fn)` runs `fn(db)` on a connection owned by the calling thread, inside
one read transaction (a consistent view even across several queries); `await read(fn)`
does so on a small thread pool. Read connections are `query_only`. WAL lets readers run
beside the writer without blocking it.

Snapshots. `snapshot(dest)` writes a consistent, compact single-file copy with
`VACUUM INTO` (one short read transaction on the live file) and renames it into place;
`Store.open_readonly(dest)` opens such a copy for the trainer (no writer, no migration).

Ops must finish their work before returning (return lists, not lazy generators), must not
COMMIT or ROLLBACK themselves, and must not call `write_sync` (the writer would wait on
itself: that raises).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from sqlite_utils import Database

from common.identity import unit_interval_hash
from common.paths import fsync_path
from common.store.errors import SchemaError, StoreClosedError, StoreError
from common.store.records import WriterStats
from common.store.schema import LATEST_VERSION, check_not_newer, migrate, schema_version

T = TypeVar("T")
log = logging.getLogger(__name__)
Synchronous = Literal["FULL", "NORMAL"]


@dataclass
class _WriteRequest:
    fn: Callable[[Database], Any]
    future: Future[Any]  # the outcome; settled by the writer thread
    waiter: asyncio.Future[Any] | None = None  # an awaiting `write`, settled on its loop


class Store:
    """The rlhf-loop store on one SQLite file (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "FULL",
        max_batch: int = 256,
        read_threads: int = 4,
        busy_timeout_s: float = 30.0,
        readonly: bool = False,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"Unknown synchronous mode: {synchronous!r}")
        self.path = Path(path)
        self.readonly = readonly
        self._synchronous = synchronous
        self._max_batch = max_batch
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._lock = threading.Lock()  # guards _closed against racing submit/close
        self._closed = False
        self._stats = WriterStats()
        self._local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []
        self._read_pool = ThreadPoolExecutor(read_threads, thread_name_prefix="store-read")
        self._queue: queue.SimpleQueue[_WriteRequest | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        if readonly:
            self._check_readonly_version()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._start_writer()

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str], read_threads: int = 2) -> Store:
        """Open a snapshot (or any store file at the current version) for reading only."""
        if not Path(path).exists():
            raise FileNotFoundError(path)
        return cls(path, readonly=True, read_threads=read_threads)

    # ------------------------------------------------------------ connections

    def _connect(self, readonly: bool = False) -> sqlite3.Connection:
        """A connection in autocommit mode (transactions are explicit everywhere)."""
        if readonly:
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        conn.execute("PRAGMA foreign_keys = ON")
        # The labeling queue's shared prompts (ops/labeling.py): sha256 of an id in [0, 1).
        conn.create_function("rlhf_unit_hash", 1, unit_interval_hash, deterministic=True)
        return conn

    def _connect_writer(self) -> Database:
        """The writer's connection: WAL, the chosen fsync level, the schema migrated."""
        conn = self._connect()
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        db = Database(conn, execute_plugins=False)
        migrate(db, where=str(self.path))
        return db

    def _reader_db(self) -> Database:
        """This thread's read connection, opened on first use."""
        db: Database | None = getattr(self._local, "db", None)
        if db is None:
            conn = self._connect(readonly=self.readonly)
            conn.execute("PRAGMA query_only = ON")
            db = Database(conn, execute_plugins=False)
            with self._lock:
                if self._closed:
                    conn.close()
                    raise StoreClosedError(f"store {self.path} is closed")
                self._read_conns.append(conn)
            self._local.db = db
        return db

    def _check_readonly_version(self) -> None:
        """A read-only store cannot migrate: refuse a file at another version."""
        version = self.read_sync(schema_version)
        if version != LATEST_VERSION:
            self.close()
            check_not_newer(version, LATEST_VERSION, str(self.path))
            raise SchemaError(
                f"{self.path} has schema version {version}, this code needs "
                f"{LATEST_VERSION}; open it read-write once to migrate it"
            )

    # ------------------------------------------------------------ the writer thread

    def _start_writer(self) -> None:
        """Start the writer thread and wait until it has opened and migrated the file."""
        ready: Future[None] = Future()
        self._writer = threading.Thread(
            target=self._writer_main, args=(ready,), name="store-writer", daemon=True
        )
        self._writer.start()
        try:
            ready.result()
        except BaseException:
            self._writer.join()
            self._read_pool.shutdown(wait=False)
            with self._lock:
                self._closed = True
            raise

    def _writer_main(self, ready: Future[None]) -> None:
        """Open the file, then commit batches until close() queues the stop marker."""
        try:
            db = self._connect_writer()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        error: BaseException | None = None
        try:
            stop = False
            while not stop:
                batch, stop = self._next_batch()
                if batch:
                    self._run_batch(db, batch)
        except BaseException as exc:  # a broken connection: stop, but never leave callers hanging
            log.exception("store writer for %s stopped", self.path)
            error = exc
        finally:
            self._refuse_queued(error)
            db.conn.close()

    def _refuse_queued(self, error: BaseException | None) -> None:
        """Close the store to new writes and fail any still queued (none after close())."""
        with self._lock:
            self._closed = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(StoreClosedError(f"the store writer stopped: {error!r}"))
                _wake_waiters([item])

    def _next_batch(self) -> tuple[list[_WriteRequest], bool]:
        """Block for one request, then take whatever else is queued, up to max_batch.
        The bool says the stop marker was seen (everything before it is in the batch)."""
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        while len(batch) < self._max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run_batch(self, db: Database, batch: list[_WriteRequest]) -> None:
        """Run a batch as one transaction; resolve futures only after it committed."""
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        outcomes: list[tuple[_WriteRequest, bool, Any]] = []
        try:
            db.conn.execute("BEGIN IMMEDIATE")
            for request in live:
                outcomes.append(self._run_op(db, request))
                if not db.conn.in_transaction:
                    outcomes = self._fail_ended_transaction(outcomes)
                    db.conn.execute("BEGIN IMMEDIATE")
            db.conn.execute("COMMIT")
        except BaseException as exc:
            # BEGIN or COMMIT itself failed (disk full, I/O error, lock timeout): nothing of
            # this batch committed, so every op fails, before a ROLLBACK that may raise too.
            self._count(len(live), committed=0, failed=len(live))
            for request in live:
                request.future.set_exception(exc)
            _wake_waiters(live)
            if db.conn.in_transaction:
                db.conn.execute("ROLLBACK")
            return
        self._resolve(outcomes)

    def _run_op(self, db: Database, request: _WriteRequest) -> tuple[_WriteRequest, bool, Any]:
        """Run one op inside its own savepoint: (request, succeeded, value or exception)."""
        db.conn.execute("SAVEPOINT store_op")
        try:
            value = request.fn(db)
            if inspect.isgenerator(value):
                raise TypeError("a store op returned a generator; return a list instead")
        except BaseException as exc:
            # The op's own error may have ended the transaction already (nothing to undo).
            if db.conn.in_transaction:
                db.conn.execute("ROLLBACK TO store_op")
                db.conn.execute("RELEASE store_op")
            return request, False, exc
        if db.conn.in_transaction:
            db.conn.execute("RELEASE store_op")
        return request, True, value

    @staticmethod
    def _fail_ended_transaction(
        outcomes: list[tuple[_WriteRequest, bool, Any]],
    ) -> list[tuple[_WriteRequest, bool, Any]]:
        """The batch transaction ended inside the last op: the op ran COMMIT/ROLLBACK, or
        its error made SQLite roll back the whole transaction (SQLITE_FULL, IOERR, ...).
        Whether the ops before it persisted is unknown, so none may be acknowledged."""
        error = StoreError("a write op ended the batch transaction itself (COMMIT/ROLLBACK)")
        return [(request, False, error) for request, _, _ in outcomes]

    def _resolve(self, outcomes: list[tuple[_WriteRequest, bool, Any]]) -> None:
        """Hand each committed op its result and each failed op its exception."""
        failed = sum(1 for _, ok, _ in outcomes if not ok)
        # Count first: whoever sees its future resolved also sees the stats that include it.
        self._count(len(outcomes), committed=len(outcomes) - failed, failed=failed)
        for request, ok, value in outcomes:
            if ok:
                request.future.set_result(value)
            else:
                request.future.set_exception(value)
        _wake_waiters([request for request, _, _ in outcomes])

    def _count(self, size: int, committed: int, failed: int) -> None:
        s = self._stats
        self._stats = WriterStats(
            batches=s.batches + 1,
            ops_committed=s.ops_committed + committed,
            ops_failed=s.ops_failed + failed,
            largest_batch=max(s.largest_batch, size),
        )

    # ------------------------------------------------------------ public API

    def submit(self, fn: Callable[[Database], T]) -> concurrent.futures.Future[T]:
        """Queue a write; the future resolves with fn's result after its commit."""
        return self._enqueue(fn, None)

    def _enqueue(self, fn: Callable[[Database], T], waiter: asyncio.Future[T] | None) -> Future[T]:
        if self.readonly:
            raise StoreClosedError(f"store {self.path} is read-only")
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"store {self.path} is closed")
            self._queue.put(_WriteRequest(fn, future, waiter))
        return future

    async def write(self, fn: Callable[[Database], T]) -> T:
        """Run `fn(db)` on the writer thread; return its result once committed.
        Cancelling the caller before the writer starts the op withdraws it."""
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        future = self._enqueue(fn, waiter)
        # A cancelled caller withdraws the op, unless the writer has already started it.
        waiter.add_done_callback(lambda w: future.cancel() if w.cancelled() else None)
        return await waiter

    def write_sync(self, fn: Callable[[Database], T], timeout: float | None = None) -> T:
        """Blocking `write`, for threads, the CLI and the trainer."""
        if threading.current_thread() is self._writer:
            raise StoreError("write_sync called from inside a write op: compose ops instead")
        return self.submit(fn).result(timeout)

    def read_sync(self, fn: Callable[[Database], T]) -> T:
        """Run `fn(db)` in one read transaction on this thread's read connection."""
        if self._closed:
            raise StoreClosedError(f"store {self.path} is closed")
        db = self._reader_db()
        db.conn.execute("BEGIN")
        try:
            value = fn(db)
            if inspect.isgenerator(value):
                raise TypeError("a store read returned a generator; return a list instead")
            return value
        finally:
            db.conn.execute("ROLLBACK")

    async def read(self, fn: Callable[[Database], T]) -> T:
        """`read_sync` on the store's reader threads, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._read_pool, self.read_sync, fn)

    def snapshot(self, dest: str | os.PathLike[str], check: Callable[[Path], None] | None = None) -> Path:
        """Write a consistent single-file copy of the store to `dest` (atomically).
        `check(copy)` runs on the finished copy before it is renamed into place; when it
        raises, the copy is deleted and `dest` never appears (backups verify with it)."""
        dest = Path(dest)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.unlink(missing_ok=True)
        conn = self._connect(readonly=self.readonly)
        try:
            conn.execute("VACUUM INTO ?", [str(tmp)])
        finally:
            conn.close()
        try:
            if check is not None:
                check(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_path(tmp)
        os.replace(tmp, dest)
        fsync_path(dest.parent)
        return dest

    def writer_stats(self) -> WriterStats:
        """Batches committed and ops committed/failed so far (for tests and benchmarks)."""
        return self._stats  # frozen, replaced whole by the writer: a consistent copy

    def close(self) -> None:
        """Commit everything queued, stop the writer, close all connections. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._writer is not None:
                self._queue.put(None)
        if self._writer is not None:
            self._writer.join()
        self._read_pool.shutdown(wait=True)
        with self._lock:
            conns, self._read_conns = self._read_conns, []
        for conn in conns:
            conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _wake_waiters(requests: list[_WriteRequest]) -> None:
    """Hand settled outcomes to their awaiting `write` calls: one callback per event loop
    (called by the writer thread after it settled the requests' futures)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_WriteRequest]] = {}
    for request in requests:
        if request.waiter is not None:
            by_loop.setdefault(request.waiter.get_loop(), []).append(request)
    for loop, settled in by_loop.items():
        try:
            loop.call_soon_threadsafe(_copy_outcomes, settled)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _copy_outcomes(requests: list[_WriteRequest]) -> None:
    """On the waiters' loop: each waiter takes its settled future's result or error."""
    for request in requests:
        waiter = request.waiter
        if waiter is None or waiter.done():  # cancelled meanwhile: the outcome is dropped
            continue
        error = request.future.exception()
        if error is None:
            waiter.set_result(request.future.result())
        elif isinstance(error, StopIteration):  # asyncio futures refuse it; never skip the rest
            waiter.set_exception(RuntimeError(f"a store op raised {error!r}"))
        else:
            waiter.set_exception(error)


