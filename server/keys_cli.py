"""`rlhf keys create|list|revoke`: manage API keys in the store directly (no server needed).

    rlhf keys create --role admin --user alice           # prints the key ONCE
    rlhf keys create --role labeler --user bob --group g1
    rlhf keys list [--user alice] [--active]
    rlhf keys revoke KEY_ID

Keys are stored as their sha256 only; a lost key cannot be recovered, only revoked and
replaced. A running server sees a new or revoked key on its next call. Creating the
first key ends the server's open (keyless, loopback-only) mode.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from common import paths
from common.identity import ROLES, generate_api_key, hash_api_key
from common.store import ApiKey, Store, add_api_key, list_keys, revoke_key


def default_store_path() -> Path:
    return paths.data_dir() / "rlhf.sqlite"


def _when(unix_seconds: float | None) -> str:
    if unix_seconds is None:
        return "-"
    return datetime.fromtimestamp(unix_seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def format_keys(keys: Sequence[ApiKey]) -> str:
    """A plain table of keys (never the key itself: only its id)."""
    header = f"{'key_id':<32}  {'user':<20}  {'role':<7}  {'group':<10}  {'created':<20}  {'revoked':<20}  note"
    rows = [
        f"{k.key_id:<32}  {k.user_id:<20}  {k.role:<7}  {k.labeler_group or '-':<10}  "
        f"{_when(k.created_at):<20}  {_when(k.revoked_at):<20}  {k.note}"
        for k in keys
    ]
    return "\n".join([header, *rows])


def create(store: Store, role: str, user: str, group: str | None, note: str) -> tuple[str, ApiKey]:
    """A new key for `user` with `role`; returns (the key, its stored record)."""
    key = generate_api_key()
    stored = store.write_sync(add_api_key(user, role, hash_api_key(key), labeler_group=group, note=note))  # type: ignore[arg-type]
    return key, stored


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf keys", description="Create, list and revoke API keys.")
    parser.add_argument("--store", type=Path, default=None, help="store file (default: $RLHF_DATA_DIR/rlhf.sqlite)")
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("create", help="create a key and print it once")
    new.add_argument("--role", required=True, choices=ROLES)
    new.add_argument("--user", required=True, help="user id the key acts as")
    new.add_argument("--group", default=None, help="labeler group (for labelers: held-out groups measure RM generalisation)")
    new.add_argument("--note", default="", help="free text kept with the key")
    show = sub.add_parser("list", help="list keys (ids, never the keys)")
    show.add_argument("--user", default=None)
    show.add_argument("--active", action="store_true", help="hide revoked keys")
    revoke = sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    with Store(args.store or default_store_path()) as store:
        if args.command == "create":
            key, stored = create(store, args.role, args.user, args.group, args.note)
            print(key)
            print(f"created key {stored.key_id} for user {stored.user_id!r} with role {stored.role} "
                  "(shown once: store it now)", file=sys.stderr)
        elif args.command == "list":
            print(format_keys(store.read_sync(list_keys(args.user, include_revoked=not args.active))))
        elif args.command == "revoke":
            if not store.write_sync(revoke_key(args.key_id)):
                print(f"rlhf keys: no active key with id {args.key_id!r}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
