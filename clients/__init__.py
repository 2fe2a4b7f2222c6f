"""Clients of the rlhf.v1 gRPC API: the Python client, the CLIs, the simulated labelers."""

import common  # noqa: F401  before any grpc import: gRPC's fork setting (common/__init__.py)
