"""Users and their API keys (stored hashed; `common.identity` makes them)."""

from __future__ import annotations

from sqlite_utils import Database

from common.identity import ROLES, Role
from common.store.errors import (
    InvalidArgumentError,
    NotFoundError,
)
from common.store.ops.base import Op, clock, get_one, insert_record, new_id
from common.store.records import (
    ApiKey,
    User,
    from_row,
)


def add_user(
    user_id: str | None = None, labeler_group: str | None = None, now: float | None = None
) -> Op[User]:
    """Create a user (a fresh id unless given)."""

    def op(db: Database) -> User:
        row = {"id": user_id or new_id(), "created_at": clock(now), "labeler_group": labeler_group}
        return insert_record(db, "users", User, row)

    return op


def add_api_key(
    user_id: str,
    role: Role,
    key_hash: str,
    labeler_group: str | None = None,
    note: str = "",
    now: float | None = None,
) -> Op[ApiKey]:
    """Store a key by its hash (`identity.hash_api_key`), creating the user if new."""

    def op(db: Database) -> ApiKey:
        if role not in ROLES:
            raise InvalidArgumentError(f"Unknown role: {role!r}")
        at = clock(now)
        db.conn.execute(
            "INSERT OR IGNORE INTO users (id, created_at, labeler_group) VALUES (?, ?, ?)",
            [user_id, at, labeler_group],
        )
        row = {
            "key_id": new_id(), "key_hash": key_hash, "user_id": user_id, "role": role,
            "labeler_group": labeler_group, "created_at": at, "revoked_at": None, "note": note,
        }  # fmt: skip
        return insert_record(db, "api_keys", ApiKey, row)

    return op


def find_key_by_hash(key_hash: str) -> Op[ApiKey | None]:
    """The key with this hash, revoked or not (check `.active`), or None."""
    return get_one(ApiKey, "api_keys", "key_hash", key_hash)


def revoke_key(key_id: str, now: float | None = None) -> Op[bool]:
    """Revoke a key; False when it does not exist or was already revoked."""

    def op(db: Database) -> bool:
        cursor = db.conn.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
            [clock(now), key_id],
        )
        return cursor.rowcount == 1

    return op


def list_keys(user_id: str | None = None, include_revoked: bool = True) -> Op[list[ApiKey]]:
    """Keys, oldest first, optionally of one user and/or only active ones."""

    def op(db: Database) -> list[ApiKey]:
        where, params = [], []
        if user_id is not None:
            where.append("user_id = ?")
            params.append(user_id)
        if not include_revoked:
            where.append("revoked_at IS NULL")
        rows = db.table("api_keys").rows_where(
            " AND ".join(where) or None, params, order_by="created_at, key_id"
        )
        return [from_row(ApiKey, row) for row in rows]

    return op


def set_train_opt_out(user_id: str, opt_out: bool, create: bool = False, now: float | None = None) -> Op[bool]:
    """Set a user's "do not train on my data" setting; True when it changed.

    An id without a users row is NotFoundError, unless ``create`` (a caller setting its
    own, e.g. in open mode, where users have no row): the row is then made.
    """

    def op(db: Database) -> bool:
        if not user_id:
            raise InvalidArgumentError("user_id is empty: name the user whose setting changes")
        row = db.execute("SELECT train_opt_out FROM users WHERE id = ?", [user_id]).fetchone()
        if row is None and not create:
            raise NotFoundError(f"user {user_id!r} not found")
        if row is None:
            db.execute("INSERT INTO users (id, created_at, labeler_group, train_opt_out) VALUES (?, ?, NULL, ?)",
                       [user_id, clock(now), int(opt_out)])
            return bool(opt_out)
        db.execute("UPDATE users SET train_opt_out = ? WHERE id = ?", [int(opt_out), user_id])
        return bool(row[0]) != bool(opt_out)

    return op


def opted_out_user_ids() -> Op[frozenset[str]]:
    """The ids of the users who asked not to be trained on."""

    def op(db: Database) -> frozenset[str]:
        return frozenset(row[0] for row in db.execute("SELECT id FROM users WHERE train_opt_out = 1"))

    return op
