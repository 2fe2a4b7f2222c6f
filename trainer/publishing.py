"""What a cycle does to the outside world once it has a model: publish it as the next
checkpoint version, make a version serve (over ``Admin.SwapPolicy``, or in the store alone
when no server runs), keep or prune old checkpoints, and clean up after a trainer that died.

Each function takes the store, folders and swapper it touches as plain arguments; the cycle
(``trainer.cycle``) unpacks its context at the call.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from common.checkpoints import (
    checkpoint_path,
    clean_partial,
    list_checkpoints,
    prune_checkpoints,
    read_manifest,
    write_checkpoint,
)
from common.store import (
    Policy,
    Store,
    add_policy,
    get_policy,
    list_policies,
    previous_serving_policy,
    serving_policy,
    set_policy_status,
    update_cycle,
)

log = logging.getLogger(__name__)

Hook = Callable[[str], None]


def no_hook(point: str) -> None:
    return None


# ---------------------------------------------------------------------------- swapping


class PolicySwapper(Protocol):
    """Makes a published version serve; raises when it cannot."""

    def swap(self, version: int, request_id: str) -> dict[str, Any]: ...


class AdminSwapper:
    """``Admin.SwapPolicy`` on the running server (which verifies, hot-swaps and records)."""

    def __init__(self, target: str, api_key: str | None, timeout_s: float) -> None:
        self.target, self.api_key, self.timeout_s = target, api_key, timeout_s

    def swap(self, version: int, request_id: str) -> dict[str, Any]:
        from clients.client import RlhfClient

        with RlhfClient(self.target, self.api_key) as client:
            reply = client.swap_policy(version, request_id=request_id, timeout=self.timeout_s)
        return {"via": "admin", "previous_version": reply.previous_version, "version": reply.version,
                "stall_seconds": reply.stall_seconds, "total_seconds": reply.total_seconds,
                "swap_mode": reply.swap_mode, "continued_requests": reply.continued_requests,
                "aborted_requests": reply.aborted_requests}


class StoreSwapper:
    """No server: mark the version serving in the store (a server started later serves it)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def swap(self, version: int, request_id: str) -> dict[str, Any]:
        self.store.write_sync(set_policy_status(version, "serving"))
        return {"via": "store", "version": version}


def swap_to(store: Store, swapper: PolicySwapper, cycle_id: int, version: int) -> dict[str, Any]:
    """Ask for ``version`` to serve. A failed call whose swap nevertheless happened (the reply
    was lost) counts as done; otherwise the candidate is marked rejected and the error raised."""
    try:
        return swapper.swap(version, request_id=f"cycle-{cycle_id}-swap-v{version}")
    except Exception:
        serving = store.read_sync(serving_policy())
        if serving is not None and serving.version == version:
            log.warning("swap to v%d raised, but v%d serves: keeping it", version, version, exc_info=True)
            return {"version": version, "note": "the swap call failed, yet the store shows the version serving"}
        if (policy := store.read_sync(get_policy(version))) is not None and policy.status == "candidate":
            store.write_sync(set_policy_status(version, "rejected"))
        raise


# ---------------------------------------------------------------------------- publishing


def sft_version_of(policy: Policy) -> int:
    """The SFT reference of a policy's lineage (a base model is its own)."""
    return int(policy.metrics.get("sft_version", policy.version))


def next_version(store: Store, root: Path) -> int:
    """One above every version recorded in the store or present on disk."""
    recorded = [p.version for p in store.read_sync(list_policies())]
    return max(recorded + list_checkpoints(root) + [-1]) + 1


def publish_policy(store: Store, root: Path, cycle_id: int, model_dir: Path, parent: int, metrics: dict[str, Any],
                   hook: Hook = no_hook, snapshot: dict[str, Any] | None = None,
                   adapter: dict[str, Any] | None = None) -> Policy:
    """Publish ``model_dir`` atomically under ``root`` as the next version and record it as a
    candidate of cycle ``cycle_id`` (``metrics["kind"]``: "sft" or "ppo"); the manifest names
    the store ``snapshot`` it was trained on (``Snapshot.manifest_record``) and, for a policy
    whose LoRA adapters ``model_dir`` holds too, their ``adapter`` record
    (``common.checkpoints.adapter_record`` of their base)."""
    version = next_version(store, root)
    base_model = read_manifest(checkpoint_path(root, parent)).base_model

    point = f"publish:{metrics['kind']}"  # fault-injection points: publish:ppo:renamed, ...

    def save(tmp: Path) -> None:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        hook(f"{point}:files_written")

    path = write_checkpoint(root, version, save, parent_version=parent, cycle_id=cycle_id, base_model=base_model,
                            metrics=metrics, snapshot=snapshot, adapter=adapter)
    hook(f"{point}:renamed")
    policy = store.write_sync(add_policy(version, str(path.resolve()), parent_version=parent, cycle_id=cycle_id,
                                         metrics=metrics))
    store.write_sync(update_cycle(cycle_id, candidate_version=version))
    return policy


# ---------------------------------------------------------------------------- retention and crash clean-up


def retained_versions(policies: list[Policy], previous: Policy | None, on_disk: list[int], keep_last: int) -> set[int]:
    """v0, the serving and previous serving versions with their SFT references, and the newest
    ``keep_last`` versions on disk."""
    keep = {0} | set(sorted(on_disk)[-keep_last:])
    for policy in [p for p in policies if p.status == "serving"] + ([previous] if previous else []):
        keep |= {policy.version, sft_version_of(policy)}
    return keep


def apply_retention(store: Store, root: Path, keep_last: int) -> dict[str, Any]:
    """Delete the checkpoints ``retained_versions`` does not keep."""
    keep = retained_versions(store.read_sync(list_policies()), store.read_sync(previous_serving_policy()),
                             list_checkpoints(root), keep_last)
    return {"kept": sorted(keep & set(list_checkpoints(root))), "pruned": prune_checkpoints(root, keep)}


def clean_up_after_crashes(store: Store, root: Path, stale_scratch: Sequence[Path]) -> dict[str, Any]:
    """Remove what a killed trainer left: ``*.tmp``/``*.trash`` checkpoint folders under
    ``root``, checkpoints published by a cycle but never recorded in the store, and the
    scratch folders of cycles that no longer run.

    Call it inside a claimed cycle: the store's one-running-cycle lock guarantees no other
    trainer is publishing meanwhile.
    """
    partial = clean_partial(root)
    recorded = {p.version for p in store.read_sync(list_policies())}
    orphans = [v for v in list_checkpoints(root) if v not in recorded
               and read_manifest(checkpoint_path(root, v)).cycle_id is not None]
    if orphans:
        prune_checkpoints(root, (set(list_checkpoints(root)) - set(orphans)) | {0})
    for folder in stale_scratch:
        shutil.rmtree(folder, ignore_errors=True)
    if partial or orphans or stale_scratch:
        log.warning("cleaned up after a crash: partial %s, unrecorded checkpoints %s, scratch %s",
                    [p.name for p in partial], orphans, [d.name for d in stale_scratch])
    return {"partial": [p.name for p in partial], "orphans": orphans, "scratch": [d.name for d in stale_scratch]}
