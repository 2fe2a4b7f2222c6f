"""Store records → rlhf.v1 messages (shared by the Inference, Admin and Feedback servicers)."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from common import store
from rlhf.v1 import admin_pb2, common_pb2

FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}
POLICY_STATUSES = {
    "candidate": common_pb2.POLICY_STATUS_CANDIDATE,
    "serving": common_pb2.POLICY_STATUS_SERVING,
    "rejected": common_pb2.POLICY_STATUS_REJECTED,
    "retired": common_pb2.POLICY_STATUS_RETIRED,
}
CYCLE_STATES = {
    "queued": admin_pb2.CYCLE_STATE_QUEUED,
    "running": admin_pb2.CYCLE_STATE_RUNNING,
    "promoted": admin_pb2.CYCLE_STATE_PROMOTED,
    "rejected": admin_pb2.CYCLE_STATE_REJECTED,
    "skipped": admin_pb2.CYCLE_STATE_SKIPPED,
    "failed": admin_pb2.CYCLE_STATE_FAILED,
}


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True)


def timestamp(unix_seconds: float | None) -> Timestamp | None:
    """A Timestamp of unix seconds; None stays None (the field is left unset)."""
    if unix_seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(round(unix_seconds * 1e9))
    return ts


def completion(c: store.Completion) -> common_pb2.Completion:
    return common_pb2.Completion(
        completion_id=c.id, index=c.idx, text=c.text,
        finish_reason=FINISH_REASONS[c.finish_reason],
        prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
        policy_version=c.policy_version,
        version_spans=[common_pb2.VersionSpan(policy_version=v, start_token=start, end_token=end)
                       for v, start, end in c.version_spans or ()],
    )


def policy(p: store.Policy) -> common_pb2.Policy:
    return common_pb2.Policy(
        version=p.version, path=p.path, parent_version=p.parent_version,
        status=POLICY_STATUSES[p.status], created_at=timestamp(p.created_at),
        cycle_id=p.cycle_id, metrics_json=_json(p.metrics), serving_since=timestamp(p.serving_since),
    )


def cycle(c: store.Cycle) -> admin_pb2.Cycle:
    return admin_pb2.Cycle(
        cycle_id=c.id, state=CYCLE_STATES[c.state], stage=c.stage or "", trigger=c.trigger,
        created_at=timestamp(c.created_at), started_at=timestamp(c.started_at),
        finished_at=timestamp(c.finished_at),
        base_version=-1 if c.base_version is None else c.base_version,  # -1: not recorded
        candidate_version=c.candidate_version, metrics_json=_json(c.metrics),
        error=c.error or "",
    )


def stats(s: store.Stats, serving_version: int) -> admin_pb2.Stats:
    return admin_pb2.Stats(
        serving_version=serving_version if s.serving_version is None else s.serving_version,
        users=s.users, prompts=s.prompts, completions=s.completions, rankings=s.rankings,
        demonstrations=s.demonstrations, ratings=s.ratings, policies=s.policies,
        cycles=s.cycles, prompts_by_split=s.prompts_by_split,
        mixed_version_completions=s.mixed_version_completions,
    )


def erasure(e: store.Erasure) -> admin_pb2.EraseUserResponse:
    return admin_pb2.EraseUserResponse(
        user_id_sha256=e.user_id_sha256, erased_at=timestamp(e.erased_at),
        rows_deleted=e.rows_deleted, audit_rows_pseudonymised=e.audit_rows_pseudonymised,
    )
