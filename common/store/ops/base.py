"""Shared by every op module: the `Op` type, ids, the clock, JSON columns and the
small SQL helpers the hot inserts use.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from sqlite_utils import Database

from common.store.errors import (
    NotFoundError,
)
from common.store.records import (
    from_row,
)

T = TypeVar("T")
Op = Callable[[Database], T]


def new_id() -> str:
    """A fresh row id: uuid4 as 32 hex characters."""
    return uuid.uuid4().hex


def clock(now: float | None) -> float:
    return time.time() if now is None else now


def to_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def insert_row(db: Database, table: str, row: Mapping[str, Any]) -> None:
    """INSERT one row (names come from our own code, values are bound)."""
    columns = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    db.conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", list(row.values()))


def insert_record(db: Database, table: str, cls: type[T], row: Mapping[str, Any]) -> T:
    """INSERT one row and return it as its record (``cls``)."""
    insert_row(db, table, row)
    return from_row(cls, row)


def get_one(cls: type[T], table: str, key_column: str, key: Any) -> Op[T | None]:
    """The op reading the row of ``table`` whose ``key_column`` is ``key``, as ``cls``, or None."""

    def op(db: Database) -> T | None:
        row = fetch_one(db, f"SELECT * FROM {table} WHERE {key_column} = ?", [key])
        return None if row is None else from_row(cls, row)

    return op


def fetch_one(db: Database, sql: str, params: Sequence[Any]) -> dict[str, Any] | None:
    return next(iter(db.query(sql, params)), None)


def get_or_raise(db: Database, cls: type[T], sql: str, key: Any, what: str) -> T:
    row = fetch_one(db, sql, [key])
    if row is None:
        raise NotFoundError(f"{what} {key!r} not found")
    return from_row(cls, row)
