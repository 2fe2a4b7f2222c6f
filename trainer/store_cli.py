"""`rlhf store prune | backup | restore`: the store's upkeep on demand, with the trainer's
configuration (``--config``/``--set`` as `rlhf trainer` takes them: the store path, the
retention rule, the backup folder).

    rlhf store prune [--max-age-days D]      prune now (default age: retention.max_age_days)
    rlhf store backup [--to FOLDER]          a verified backup now (default: backup.folder)
    rlhf store restore BACKUP [--force]      verify BACKUP and copy it beside the store;
                                             --force: move it into place (the store must
                                             not be open in any other process)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from common.store import Store, StoreError, StoreInUseError, restore_backup
from trainer.loop_config import TrainerConfig, load_trainer_config_for_cli
from trainer.maintenance import back_up_store, prune_old_data


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rlhf store", description="Prune, back up or restore the store.")
    parser.add_argument("--config", help="the trainer's TOML or JSON config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by its dotted path, e.g. retention.max_age_days=30")
    commands = parser.add_subparsers(dest="command", required=True)
    prune = commands.add_parser("prune", help="delete old logged prompts/completions nothing uses")
    prune.add_argument("--max-age-days", type=float, help="instead of retention.max_age_days")
    backup = commands.add_parser("backup", help="write a verified online backup of the store")
    backup.add_argument("--to", type=Path, help="folder to write it to (default: backup.folder, pruned to keep)")
    restore = commands.add_parser("restore", help="restore a backup (beside the store, or in place with --force)")
    restore.add_argument("backup", type=Path, help="the backup file")
    restore.add_argument("--force", action="store_true",
                         help="replace the store itself (refused while a server or trainer has it open)")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `rlhf store`."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    config = load_trainer_config_for_cli(args.config, args.overrides, "store")
    if config is None:
        return 2
    try:
        if args.command == "restore":
            return restore(config, args.backup, args.force)
        if not config.store_path.exists():
            print(f"rlhf store: no store at {config.store_path}", file=sys.stderr)
            return 2
        with Store(config.store_path) as store:
            if args.command == "prune":
                return prune(store, config, args.max_age_days)
            result = back_up_store(store, config.backup, args.to)
            print(json.dumps(result.to_dict()))
            return 0
    except StoreError as exc:
        print(f"rlhf store {args.command}: {exc}", file=sys.stderr)
        return 1


def prune(store: Store, config: TrainerConfig, max_age_days: float | None) -> int:
    report = prune_old_data(store, config.retention, config.cycle.data.eval_splits, max_age_days)
    if report is None:
        print("rlhf store prune: retention is off: set retention.max_age_days or pass --max-age-days",
              file=sys.stderr)
        return 2
    print(json.dumps({"cutoff": report.cutoff, "deleted": report.deleted, "scanned": report.scanned,
                      "batches": report.batches}))
    return 0


def restore(config: TrainerConfig, backup: Path, force: bool) -> int:
    store_path = config.store_path
    try:
        result = restore_backup(backup, store_path, force=force)
    except StoreInUseError as exc:
        print(f"rlhf store restore: refused: {exc}", file=sys.stderr)
        return 1
    if result.replaced:
        kept = f"; the previous store is {result.previous}" if result.previous else ""
        print(f"restored {backup} into {store_path}{kept}")
        return 0
    print(f"verified {backup} and copied it to {result.staged}\n"
          f"stop the server and the trainer, then either run\n"
          f"  mv {result.staged} {store_path} && rm -f {store_path}-wal {store_path}-shm\n"
          f"(after moving the old store aside if you want to keep it), or rerun with --force")
    return 0
