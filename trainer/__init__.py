"""The trainer: SFT, the K-way reward model and PPO-ptx (a library), and the scheduled
cycle that runs them on store snapshots and publishes checkpoints (its own process).
It talks to a running server only through the Admin service."""

import common  # noqa: F401  before any grpc import: gRPC's fork setting (common/__init__.py)
