"""8 labelers submitting rankings at once to a server in its own process lose nothing:
after a clean stop the rows match the acknowledged submissions exactly, and after a
SIGKILL mid-flight every acknowledged ranking is still there (acknowledge-after-commit).

The load lasts RLHF_FEEDBACK_LOAD_SECONDS (default 12); run it for a minute by hand:
    RLHF_FEEDBACK_LOAD_SECONDS=60 .venv/bin/python -m pytest tests/test_feedback_load.py -s
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from bench.feedback import random_ranking, seed, start_server, stop_server
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc

LABELERS = [(f"labeler-{i}", "train" if i < 6 else "heldout") for i in range(8)]
SECONDS = float(os.environ.get("RLHF_FEEDBACK_LOAD_SECONDS", "12"))


@dataclass
class Sent:
    """What one labeler sent: acknowledged rankings by ranking id, and requests that got
    no answer (in flight when the server died)."""

    labeler: str
    acked: dict[str, dict] = field(default_factory=dict)
    unanswered: dict[str, dict] = field(default_factory=dict)
    retried: int = 0


def labeler_loop(target: str, user: str, key: str, work: list, stop: threading.Event, sent: Sent, seed_: int) -> None:
    """Submit rankings until `stop`; one in ten is sent again with the same request_id
    (a client retry after a lost answer), which must return the same ranking."""
    rng = random.Random(seed_)
    metadata = (("authorization", f"Bearer {key}"),)
    with grpc.insecure_channel(target) as channel:
        stub = feedback_pb2_grpc.FeedbackStub(channel)
        for position in range(10**9):
            if stop.is_set():
                return
            task_id, prompt_id, ids = work[position % len(work)]
            use_task = position < len(work)
            groups = random_ranking(ids, rng)
            record = {"request_id": uuid.uuid4().hex, "task_id": task_id if use_task else None,
                      "prompt_id": prompt_id, "groups": groups}  # fmt: skip
            request = feedback_pb2.SubmitRankingRequest(
                request_id=record["request_id"], task_id=task_id if use_task else "", prompt_id=prompt_id,
                ranking=[feedback_pb2.RankGroup(completion_ids=g) for g in groups])  # fmt: skip
            try:
                response = stub.SubmitRanking(request, metadata=metadata, timeout=30)
                if rng.random() < 0.1:
                    assert stub.SubmitRanking(request, metadata=metadata, timeout=30) == response
                    sent.retried += 1
            except grpc.RpcError as err:
                if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                    sent.unanswered[record["request_id"]] = record
                    return  # the server is gone
                raise
            sent.acked[response.ranking_id] = record


def run_labelers(target: str, seeded: dict, seconds: float, kill: subprocess.Popen | None = None) -> list[Sent]:
    """8 labeler threads for `seconds`; then stop them (or SIGKILL the server under them)."""
    stop = threading.Event()
    sents = [Sent(user) for user, _ in LABELERS]
    threads = [
        threading.Thread(target=labeler_loop, args=(target, user, seeded["keys"][user], seeded["work"][user], stop, sents[i], i))
        for i, (user, _) in enumerate(LABELERS)
    ]
    for t in threads:
        t.start()
    time.sleep(seconds)
    if kill is not None:
        kill.send_signal(signal.SIGKILL)
        kill.wait()
    stop.set()
    for t in threads:
        t.join(timeout=60)
    return sents


def stored_rankings(path: Path) -> dict[str, dict]:
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        rows = {r["id"]: dict(r) for r in conn.execute("SELECT * FROM rankings")}
        tasks = {r["id"]: r["status"] for r in conn.execute("SELECT id, status FROM comparison_tasks")}
        answers = conn.execute(
            "SELECT COUNT(*) FROM idempotency WHERE method = 'rlhf.v1.Feedback/SubmitRanking'").fetchone()[0]  # fmt: skip
    for row in rows.values():
        row["task_status"] = tasks.get(row["task_id"])
    assert answers == len(rows), "every ranking is committed with its idempotency record, in one transaction"
    return rows


def check_complete(row: dict, record: dict, labeler: str, group: str) -> None:
    """The stored row is exactly what was acknowledged, every field filled in."""
    assert json.loads(row["ranking_json"]) == record["groups"]
    assert (row["prompt_id"], row["labeler_id"], row["labeler_group"]) == (record["prompt_id"], labeler, group)
    assert row["k"] == sum(len(g) for g in record["groups"]) and row["source"] == "label"
    assert row["task_id"] == record["task_id"] and row["created_at"] > 0
    if record["task_id"] is not None:
        assert row["task_status"] == "submitted"


@pytest.fixture
def seeded_store(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "store.sqlite"
    return path, seed(path, LABELERS, tasks_per_labeler=max(200, int(SECONDS * 60)))


def test_8_labelers_for_a_bounded_time_lose_nothing(seeded_store: tuple[Path, dict]) -> None:
    path, seeded = seeded_store
    process, target = start_server(path)
    try:
        sents = run_labelers(target, seeded, SECONDS)
    finally:
        stop_server(process)
    rows = stored_rankings(path)
    acked = {rid: (s.labeler, record) for s in sents for rid, record in s.acked.items()}
    assert not any(s.unanswered for s in sents)
    assert len(acked) > 8 * 10, f"only {len(acked)} rankings in {SECONDS} s"
    assert set(rows) == set(acked)  # nothing lost, nothing extra (retries stored once)
    group = dict(LABELERS)
    for rid, (labeler, record) in acked.items():
        check_complete(rows[rid], record, labeler, group[labeler])
    rate = len(acked) / SECONDS
    print(f"\n{len(acked)} rankings acknowledged and stored in {SECONDS:.0f} s ({rate:.0f}/s), "
          f"{sum(s.retried for s in sents)} retries stored once")  # fmt: skip


def test_a_server_killed_mid_flight_keeps_every_acknowledged_ranking(seeded_store: tuple[Path, dict]) -> None:
    path, seeded = seeded_store
    process, target = start_server(path)
    sents = run_labelers(target, seeded, min(SECONDS, 4.0), kill=process)
    rows = stored_rankings(path)
    group = dict(LABELERS)
    acked = {rid: (s.labeler, record) for s in sents for rid, record in s.acked.items()}
    unanswered = [record for s in sents for record in s.unanswered.values()]
    assert acked and set(acked) <= set(rows)  # every acknowledged ranking survived the kill
    for rid, (labeler, record) in acked.items():
        check_complete(rows[rid], record, labeler, group[labeler])
    # Committed but never answered (in flight at the kill): only requests that were sent.
    extra = [rows[rid] for rid in set(rows) - set(acked)]
    assert len(extra) <= len(unanswered) <= len(LABELERS)
    sent_unanswered = {(r["prompt_id"], json.dumps(r["groups"], separators=(",", ":"))) for r in unanswered}
    assert all((row["prompt_id"], row["ranking_json"]) in sent_unanswered for row in extra)
