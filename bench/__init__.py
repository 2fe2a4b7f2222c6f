"""Benchmarks: each module one measurement (`python -m bench.NAME`), its figures in docs/BENCHMARKS.md."""

import common  # noqa: F401  before any grpc import: gRPC's fork setting (common/__init__.py)
