"""Which policy serves: the one at start-up, and hot swaps while serving.

Start-up (`startup_policy`): the store's serving policy, verified; with none recorded,
the base model is published as checkpoint v0 (`common.checkpoints.init_v0`) and recorded
as serving. A restarted server therefore serves the last promoted version.

Swaps (`PolicySwitcher`): look the version up in the store, VERIFY its checkpoint
(manifest, sizes, hashes; in "adapter" mode its adapters' base checkpoint too) before the
engine touches it, let the engine drain and load,
then record the change (old → retired, new → serving, serving_since). A checkpoint
that fails verification or loading is marked rejected and the old version keeps
serving. One swap at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlite_utils import Database

from common.checkpoints import CheckpointError, adapter_of, init_v0, verify_checkpoint
from common.store import (
    Op,
    Policy,
    Store,
    add_policy,
    get_policy,
    previous_serving_policy,
    serving_policy,
    set_policy_status,
)
from server.engines.base import Engine, EngineError
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class PolicyNotFound(LookupError):
    """No policy with that version is recorded in the store."""


class SwapRefused(Exception):
    """The swap cannot happen (bad checkpoint, failed load, nothing to roll back to);
    the version that served before still serves."""


@dataclass(frozen=True)
class SwapOutcome:
    previous_version: int
    version: int
    stall_seconds: float  # new requests waited this long (gate closed: drain, switch)
    total_seconds: float  # from the call until the new version served
    drain_seconds: float = 0.0
    load_seconds: float = 0.0
    verify_seconds: float = 0.0
    swap_mode: str = "drain"
    continued_requests: int = 0  # in flight across the reload, recorded with both versions
    aborted_requests: int = 0  # past the drain bound of a full swap in "adapter" mode


async def startup_policy(
    store: Store, checkpoints_root: Path, base_model_dir: Path, base_model_name: str
) -> Policy:
    """The policy to serve at start-up (see the module docstring); its checkpoint verified."""
    policy = await store.read(serving_policy())
    if policy is None:
        policy = await _publish_v0(store, checkpoints_root, base_model_dir, base_model_name)
    try:
        manifest = await asyncio.to_thread(verify_checkpoint, Path(policy.path))
    except CheckpointError as e:
        raise SwapRefused(
            f"the serving policy v{policy.version} failed verification, refusing to serve it: {e}. "
            "Roll back with `rlhf policies rollback` from a running server, or mark another "
            "version serving in the store."
        ) from e
    if manifest.version != policy.version:
        raise SwapRefused(f"{policy.path}: manifest says v{manifest.version}, the store says v{policy.version}")
    return policy


async def _publish_v0(store: Store, root: Path, model_dir: Path, base_model_name: str) -> Policy:
    log.info("no serving policy in the store: publishing %s as v0", model_dir)
    path = await asyncio.to_thread(init_v0, root, model_dir, base_model_name)
    if await store.read(get_policy(0)) is None:
        return await store.write(add_policy(0, str(Path(path).resolve()), status="serving"))
    return await store.write(set_policy_status(0, "serving"))


SwapRecord = Callable[[SwapOutcome], Op[object]]


def _together(first: Op[object], second: Op[object]) -> Op[None]:
    """Both ops in one transaction, in order."""

    def op(db: Database) -> None:
        first(db)
        second(db)

    return op


class PolicySwitcher:
    """Hot-swaps the engine's policy and keeps the store's statuses in step."""

    def __init__(self, engine: Engine, store: Store, metrics: ServerMetrics) -> None:
        self._engine = engine
        self._store = store
        self._metrics = metrics
        self._lock = asyncio.Lock()

    async def swap(self, version: int, record: SwapRecord | None = None) -> SwapOutcome:
        """Serve `version` (PolicyNotFound, SwapRefused); a no-op if it serves already.

        `record(outcome)` is a store op committed in the same transaction as the new
        serving status (the caller's idempotency record and audit row); on a no-op, alone."""
        started = time.perf_counter()
        async with self._lock:
            policy = await self._store.read(get_policy(version))
            if policy is None:
                raise PolicyNotFound(f"policy v{version} not found (`rlhf policies` lists the published ones)")
            current = self._engine.version
            if version == current:
                outcome = SwapOutcome(current, current, 0.0, time.perf_counter() - started)
                if record is not None:
                    await self._store.write(record(outcome))
                return outcome
            verify_seconds = await self._verify(policy, current)
            try:
                result = await self._engine.swap(Path(policy.path), version)
            except EngineError as e:
                await self._refuse(version, str(e))
                raise SwapRefused(f"policy v{version} could not be loaded, still serving v{current}: {e}") from e
            outcome = SwapOutcome(result.previous_version, version, result.stall_seconds, time.perf_counter() - started,
                                  result.drain_seconds, result.load_seconds, verify_seconds,
                                  result.mode, result.continued_requests, result.aborted_requests)  # fmt: skip
            serve = set_policy_status(version, "serving")
            await self._store.write(serve if record is None else _together(serve, record(outcome)))
        self._metrics.record_swap("ok", result.stall_seconds)
        self._metrics.serving_version.set(version)
        log.info("now serving v%d (was v%d): stall %.3f s, total %.3f s", version, current,
                 result.stall_seconds, outcome.total_seconds)
        return outcome

    async def rollback(self, version: int | None = None, record: SwapRecord | None = None) -> SwapOutcome:
        """Serve `version`, or when None the version that served before the current one."""
        if version is None:
            previous = await self._store.read(previous_serving_policy())
            if previous is None:
                raise SwapRefused("nothing to roll back to: no other version has served before")
            version = previous.version
        return await self.swap(version, record)

    async def _verify(self, policy: Policy, current: int) -> float:
        """Hash-check the checkpoint off the event loop; SwapRefused naming the bad file."""
        started = time.perf_counter()
        try:
            manifest = await asyncio.to_thread(verify_checkpoint, Path(policy.path))
            if manifest.version != policy.version:
                raise CheckpointError(
                    f"{Path(policy.path) / 'manifest.json'}: version {manifest.version}, "
                    f"but the store records this folder as v{policy.version}")
            if self._engine.swap_mode == "adapter" and manifest.adapter is not None:
                # The engine may load the adapters' base too: its files are checked as well.
                adapter = adapter_of(Path(policy.path), manifest)
                await asyncio.to_thread(verify_checkpoint, adapter.base_dir)
        except CheckpointError as e:
            await self._refuse(policy.version, str(e))
            raise SwapRefused(
                f"checkpoint of policy v{policy.version} failed verification, still serving v{current}: {e}"
            ) from e
        return time.perf_counter() - started

    async def _refuse(self, version: int, reason: str) -> None:
        log.warning("refused policy v%d: %s", version, reason)
        self._metrics.record_swap("refused")
        await self._store.write(set_policy_status(version, "rejected"))

