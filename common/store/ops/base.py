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


def fetch_one(db: Database, sql: str, params: Sequence[Any]) -> dict[str, Any] | None:
    return next(iter(db.query(sql, params)), None)


def get_or_raise(db: Database, cls: type[T], sql: str, key: Any, what: str) -> T:
    row = fetch_one(db, sql, [key])
    if row is None:
        raise NotFoundError(f"{what} {key!r} not found")
    return from_row(cls, row)
