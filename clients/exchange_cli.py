"""`rlhf export` / `rlhf import`: feedback as JSONL files (formats: `common.exchange`).

    rlhf export --store data/rlhf.sqlite --kind rankings --out rankings.jsonl
    rlhf export --kind pairs --split train --out train_pairs.jsonl      # TRL reward data
    rlhf import --store fresh.sqlite --kind rankings rankings.jsonl
    rlhf import --kind pairs --labeler-group bootstrap hh_pairs.jsonl

These are operator tools on the store FILE (the server may be running: SQLite's WAL lets
them share it; an import holds the write lock for its one transaction). An import with
any bad line writes nothing and lists every bad line with its number; exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import paths
from common.exchange import KINDS, ImportRejected, export_jsonl, export_records, import_jsonl, write_jsonl


def _default_store() -> Path:
    return paths.data_dir() / "rlhf.sqlite"


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf export", description="Export feedback from the store as JSONL.")
    parser.add_argument("--store", type=Path, default=None, help="the SQLite store (default: $RLHF_DATA_DIR/rlhf.sqlite)")
    parser.add_argument("--kind", choices=KINDS, required=True, help="rankings (K-way, lossless) | pairs (TRL) | demonstrations (chat)")
    parser.add_argument("--out", required=True, help="output file ('-' for stdout)")
    parser.add_argument("--split", action="append", choices=("train", "val", "test"), help="only prompts of this split (repeatable)")
    parser.add_argument("--redact-pii", action="store_true", help="write the redacted text of PII prompts (drop unredacted ones)")
    args = parser.parse_args(argv)
    from common.store import Store

    store_path = args.store or _default_store()
    if not store_path.exists():
        parser.error(f"no store at {store_path}")
    filters = {"splits": args.split, "redact_pii": args.redact_pii}
    with Store(store_path, read_threads=1) as store:
        if args.out == "-":
            n = write_jsonl(export_records(store, args.kind, **filters), sys.stdout)
        else:
            n = export_jsonl(store, args.kind, args.out, **filters)
    print(f"exported {n} {args.kind} line{'s' if n != 1 else ''} from {store_path}", file=sys.stderr)
    return 0


def import_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf import", description="Import feedback from JSONL into the store, all or nothing.")
    parser.add_argument("file", help="the JSONL file ('-' for stdin)")
    parser.add_argument("--store", type=Path, default=None, help="the SQLite store (default: $RLHF_DATA_DIR/rlhf.sqlite; created if missing)")
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--labeler-id", default="import", help="labeler recorded for lines that name none (pairs, plain chats)")
    parser.add_argument("--labeler-group", default="import", help="labeler group recorded for those lines")
    args = parser.parse_args(argv)
    from common.store import Store

    store_path = args.store or _default_store()
    source = sys.stdin if args.file == "-" else Path(args.file)
    if source is not sys.stdin and not Path(args.file).exists():
        parser.error(f"no such file: {args.file}")
    with Store(store_path, read_threads=1) as store:
        try:
            report = import_jsonl(store, args.kind, source, labeler_id=args.labeler_id, labeler_group=args.labeler_group)
        except ImportRejected as rejected:
            print(f"rlhf import: {args.file}: {rejected}", file=sys.stderr)
            return 1
    print(f"imported {args.file} into {store_path}: {report.summary()}", file=sys.stderr)
    return 0
