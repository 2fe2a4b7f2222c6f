"""`rlhf keys create|list|revoke|opt-out`: manage API keys and users' settings in the store
directly (no server needed).

    rlhf keys create --role admin --user alice           # prints the key ONCE
    rlhf keys create --role labeler --user bob --group g1
    rlhf keys list [--user alice] [--active]             # with each user's training opt-out
    rlhf keys revoke KEY_ID
    rlhf keys opt-out alice [--undo]                     # never train on alice's data (or again)

Keys are stored as their sha256 only; a lost key cannot be recovered, only revoked and
replaced. A running server sees a new or revoked key on its next call. Creating the
first key ends the server's open (keyless, loopback-only) mode. An opt-out takes effect
from the trainer's next snapshot; users set their own through `Admin.SetTrainingOptOut`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection, Sequence
from datetime import datetime, timezone
from pathlib import Path

from common import paths
from common.identity import ROLES, generate_api_key, hash_api_key
from common.store import ApiKey, Store, add_api_key, list_keys, opted_out_user_ids, revoke_key, set_train_opt_out
from common.store.errors import NotFoundError


def default_store_path() -> Path:
    return paths.data_dir() / "rlhf.sqlite"


def _when(unix_seconds: float | None) -> str:
    if unix_seconds is None:
        return "-"
    return datetime.fromtimestamp(unix_seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def format_keys(keys: Sequence[ApiKey], opted_out: Collection[str] = frozenset()) -> str:
    """A plain table of keys (never the key itself: only its id); `opted_out` users show
    "yes" under opt_out (never trained on)."""
    header = (f"{'key_id':<32}  {'user':<20}  {'role':<7}  {'group':<10}  {'opt_out':<7}  {'created':<20}  "
              f"{'revoked':<20}  note")
    rows = [
        f"{k.key_id:<32}  {k.user_id:<20}  {k.role:<7}  {k.labeler_group or '-':<10}  "
        f"{'yes' if k.user_id in opted_out else 'no':<7}  {_when(k.created_at):<20}  {_when(k.revoked_at):<20}  "
        f"{k.note}"
        for k in keys
    ]
    return "\n".join([header, *rows])


def create(store: Store, role: str, user: str, group: str | None, note: str) -> tuple[str, ApiKey]:
    """A new key for `user` with `role`; returns (the key, its stored record)."""
    key = generate_api_key()
    stored = store.write_sync(add_api_key(user, role, hash_api_key(key), labeler_group=group, note=note))  # type: ignore[arg-type]
    return key, stored


def set_opt_out(store: Store, user: str, opt_out: bool) -> int:
    """`rlhf keys opt-out USER [--undo]`: set the user's training opt-out; 1 for an unknown user."""
    try:
        changed = store.write_sync(set_train_opt_out(user, opt_out))
    except NotFoundError:
        print(f"rlhf keys: no user {user!r} (users are made with their first key)", file=sys.stderr)
        return 1
    state = "opted out of training" if opt_out else "trained on again"
    print(f"{user}: {state}" + ("" if changed else " (unchanged)"))
    return 0


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
    opt_out = sub.add_parser("opt-out", help="never train on a user's data (served as usual); --undo to train again")
    opt_out.add_argument("user")
    opt_out.add_argument("--undo", action="store_true", help="clear the opt-out: train on the user's data again")
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
            keys = store.read_sync(list_keys(args.user, include_revoked=not args.active))
            print(format_keys(keys, store.read_sync(opted_out_user_ids())))
        elif args.command == "revoke":
            if not store.write_sync(revoke_key(args.key_id)):
                print(f"rlhf keys: no active key with id {args.key_id!r}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}")
        elif args.command == "opt-out":
            return set_opt_out(store, args.user, not args.undo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
