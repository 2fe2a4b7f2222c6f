"""`rlhf web`: the labeling web app, a client of the rlhf.v1 gRPC API (see docs/WEBAPP.md)."""

import common  # noqa: F401  before any grpc import: gRPC's fork setting (common/__init__.py)
