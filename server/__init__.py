"""The gRPC server: engines (vLLM | HF) serve the current policy, servicers translate
between protos and the domain, the store logs everything. Never imports the trainer."""

import common  # noqa: F401  before any grpc import: gRPC's fork setting (common/__init__.py)
