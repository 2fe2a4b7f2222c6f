"""Benchmarks: each module one measurement (`python -m bench.NAME`), its figures in docs/BENCHMARKS.md."""

import common  # noqa: F401  before any grpc import: gRPC's fork setting (common/__init__.py)


def report(results: dict, json_path=None) -> None:
    """A benchmark's command-line ending: its markdown section on stdout, and every figure as
    JSON at ``json_path`` when given (``--json``)."""
    import json

    print(results["markdown"])
    if json_path:
        json_path.write_text(json.dumps(results, indent=2, default=str))
