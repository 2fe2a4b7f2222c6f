"""Feedback.NextComparison over a real socket with the tiny model: which prompt a labeler
gets, K fresh completions of the serving policy logged before the task is returned,
leases (expiry, reuse), idempotent retries, roles, and the empty queue."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from sqlite_utils import Database

from common.store import add_prompt
from rlhf.v1 import feedback_pb2
from server.engines.hf import HFEngine
from test_feedback_harness import FeedbackServerThread, bearer, count_rows, issue_key, seed_prompt, stub, user_in_split

Code = grpc.StatusCode


class Queue:
    def __init__(self, server: FeedbackServerThread, feedback) -> None:
        self.server, self.feedback = server, feedback
        self.keys = {name: issue_key(server.store, name, "labeler", "train") for name in ("alice", "bob", "carol")}
        self.keys["user"] = issue_key(server.store, user_in_split("train", "customer"), "user", None)

    @property
    def store(self):
        return self.server.store

    def next(self, who: str, k: int = 0, request_id: str | None = None) -> feedback_pb2.ComparisonTask:
        request = feedback_pb2.NextComparisonRequest(k=k, request_id=request_id if request_id is not None else uuid.uuid4().hex)
        return self.feedback.NextComparison(request, metadata=bearer(self.keys[who]), timeout=120)

    def rank(self, who: str, task: feedback_pb2.ComparisonTask) -> feedback_pb2.SubmitRankingResponse:
        groups = [feedback_pb2.RankGroup(completion_ids=[c.completion_id]) for c in task.completions]
        request = feedback_pb2.SubmitRankingRequest(request_id=uuid.uuid4().hex, task_id=task.task_id, ranking=groups)
        return self.feedback.SubmitRanking(request, metadata=bearer(self.keys[who]), timeout=30)


@pytest.fixture(scope="module")
def module_queue(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Queue]:
    path = tmp_path_factory.mktemp("queue") / "store.sqlite"
    with FeedbackServerThread(path, lambda: HFEngine(tiny_model_dir, 0), max_new_tokens=4, k_default=4) as server:
        channel, feedback = stub(server)
        with channel:
            yield Queue(server, feedback)


@pytest.fixture
def queue(module_queue: Queue) -> Queue:
    """The module's server with an empty queue: earlier tests' prompts move to the test
    split (which the queue never serves) and their leases end."""

    def retire(db: Database) -> None:
        db.execute("UPDATE prompts SET split = 'test'")
        db.execute("UPDATE comparison_tasks SET status = 'expired' WHERE status = 'leased'")

    module_queue.store.write_sync(retire)
    return module_queue


def test_an_empty_queue_is_not_found(queue: Queue) -> None:
    with pytest.raises(grpc.RpcError) as empty:
        queue.next("alice")
    assert empty.value.code() == Code.NOT_FOUND
    assert empty.value.details() == "no prompt waiting for labels"


def test_a_task_holds_k_fresh_completions_of_the_serving_policy_logged_before_it_returns(queue: Queue) -> None:
    prompt_id, served = seed_prompt(queue.store, 2, text="What is a good name for a cat?")
    task = queue.next("alice", k=5)
    assert task.prompt_id == prompt_id and task.prompt_text == "What is a good name for a cat?"
    assert [c.index for c in task.completions] == [0, 1, 2, 3, 4]
    assert not {c.completion_id for c in task.completions} & set(served)  # sampled now, not the served ones
    rows = queue.store.read_sync(lambda db: {r["id"]: r for r in db.query(
        "SELECT * FROM completions WHERE prompt_id = ? AND purpose = 'label'", [prompt_id])})  # fmt: skip
    assert set(rows) == {c.completion_id for c in task.completions}
    for c in task.completions:
        row = rows[c.completion_id]
        assert (row["policy_version"], row["text"], c.policy_version) == (0, c.text, 0)
        assert row["completion_tokens"] == c.completion_tokens > 0
    lease = queue.store.read_sync(lambda db: db.table("comparison_tasks").get(task.task_id))
    assert (lease["status"], lease["labeler_id"], lease["k"]) == ("leased", "alice", 5)
    assert lease["expires_at"] == pytest.approx(task.lease_expires_at.ToNanoseconds() / 1e9, abs=1e-3)
    assert lease["expires_at"] == pytest.approx(time.time() + 600, abs=60)
    assert queue.rank("alice", task).comparisons == 10  # C(5, 2)


@pytest.mark.parametrize("k", [3, 10])
def test_k_outside_4_to_9_is_invalid(queue: Queue, k: int) -> None:
    seed_prompt(queue.store, 0)
    with pytest.raises(grpc.RpcError) as refused:
        queue.next("alice", k=k)
    assert refused.value.code() == Code.INVALID_ARGUMENT and f"k = {k}" in refused.value.details()


def test_k_0_means_the_server_default(queue: Queue) -> None:
    seed_prompt(queue.store, 0)
    assert len(queue.next("alice", k=0).completions) == 4


def test_fresh_prompts_first_then_newest_and_never_test_split_or_unredacted_pii(queue: Queue) -> None:
    now = time.time()
    older, _ = seed_prompt(queue.store, 0, text="older", now=now - 30)
    newer_val, _ = seed_prompt(queue.store, 0, text="newer, val split", user_id=user_in_split("val"), now=now - 20)
    ranked, ids = seed_prompt(queue.store, 4, text="newest but already ranked", now=now - 10)
    seed_prompt(queue.store, 0, text="test split", user_id=user_in_split("test"), now=now)
    seed_prompt(queue.store, 0, text="mail me at a@b.example", has_pii=True, now=now)
    redacted, _ = seed_prompt(queue.store, 0, text="mail me at a@b.example", has_pii=True,
                              redacted_text="mail me at [EMAIL]", now=now - 40)  # fmt: skip
    request = feedback_pb2.SubmitRankingRequest(
        request_id=uuid.uuid4().hex, prompt_id=ranked,
        ranking=[feedback_pb2.RankGroup(completion_ids=[c]) for c in ids])  # fmt: skip
    queue.feedback.SubmitRanking(request, metadata=bearer(queue.keys["bob"]), timeout=30)

    got = [queue.next("alice") for _ in range(4)]  # none submitted: each lease holds its prompt
    assert [t.prompt_id for t in got] == [newer_val, older, redacted, ranked]
    assert got[2].prompt_text == "mail me at [EMAIL]"
    with pytest.raises(grpc.RpcError) as empty:
        queue.next("alice")
    assert empty.value.code() == Code.NOT_FOUND


def test_a_labeler_never_gets_a_prompt_they_ranked(queue: Queue) -> None:
    prompt_id, _ = seed_prompt(queue.store, 0)
    queue.rank("alice", queue.next("alice"))
    with pytest.raises(grpc.RpcError) as empty:
        queue.next("alice")
    assert empty.value.code() == Code.NOT_FOUND
    assert queue.next("bob").prompt_id == prompt_id  # others still may (agreement data)


def test_a_live_lease_holds_its_prompt_and_an_expired_one_goes_to_anyone_with_the_same_completions(queue: Queue) -> None:
    prompt_id, _ = seed_prompt(queue.store, 0)
    first = queue.next("alice")
    with pytest.raises(grpc.RpcError) as held:
        queue.next("bob")
    assert held.value.code() == Code.NOT_FOUND
    queue.store.write_sync(lambda db: db.execute(
        "UPDATE comparison_tasks SET expires_at = ? WHERE id = ?", [time.time() - 1, first.task_id]))  # fmt: skip
    completions_before = count_rows(queue.store, "completions")
    second = queue.next("bob")
    assert second.prompt_id == prompt_id and second.task_id != first.task_id
    assert [c.completion_id for c in second.completions] == [c.completion_id for c in first.completions]
    assert count_rows(queue.store, "completions") == completions_before  # reused, not sampled again
    with pytest.raises(grpc.RpcError) as late:
        queue.rank("alice", first)
    assert late.value.code() == Code.FAILED_PRECONDITION and "expired" in late.value.details()
    queue.rank("bob", second)


def test_a_retry_with_the_same_request_id_returns_the_same_task(queue: Queue) -> None:
    seed_prompt(queue.store, 0)
    seed_prompt(queue.store, 0)
    request_id = uuid.uuid4().hex
    first = queue.next("carol", request_id=request_id)
    before = count_rows(queue.store, "comparison_tasks", "completions", "audit")
    assert queue.next("carol", request_id=request_id) == first
    assert count_rows(queue.store, "comparison_tasks", "completions", "audit") == before  # a replay writes nothing
    (row,) = queue.store.read_sync(lambda db: list(db.query(
        "SELECT user_id, detail_json FROM audit WHERE action = 'feedback.NextComparison' AND detail_json LIKE ?",
        [f'%{first.task_id}%'])))  # fmt: skip
    assert row["user_id"] == "carol" and json.loads(row["detail_json"]) == {
        "role": "labeler", "k": 4, "task_id": first.task_id, "prompt_id": first.prompt_id, "request_id": request_id,
        "outcome": "OK"}  # fmt: skip
    with pytest.raises(grpc.RpcError) as other_k:
        queue.next("carol", k=6, request_id=request_id)
    assert other_k.value.code() == Code.ALREADY_EXISTS


def test_chat_prompts_come_with_their_conversation(queue: Queue) -> None:
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    queue.store.write_sync(add_prompt(user_in_split("train"), "Name a color.", messages=turns))
    task = queue.next("alice")
    assert [(m.role, m.content) for m in task.messages] == [(t["role"], t["content"]) for t in turns]


def test_next_comparison_needs_the_labeler_role(queue: Queue) -> None:
    seed_prompt(queue.store, 0)
    with pytest.raises(grpc.RpcError) as refused:
        queue.next("user")
    assert refused.value.code() == Code.PERMISSION_DENIED


def test_a_failed_sampling_releases_its_claim(tmp_path: Path) -> None:
    """The engine fails: the caller gets the error, and the prompt is free again (its
    claim ended at once instead of holding the prompt for a whole lease)."""
    from bench.feedback import submit_only_engine  # an engine whose every generation fails

    with FeedbackServerThread(tmp_path / "store.sqlite", submit_only_engine) as server:
        key = issue_key(server.store, "alice")
        seed_prompt(server.store, 0)
        channel, feedback = stub(server)
        with channel:
            for _ in range(2):  # the second call finds the prompt free again
                with pytest.raises(grpc.RpcError) as failed:
                    feedback.NextComparison(feedback_pb2.NextComparisonRequest(request_id=uuid.uuid4().hex),
                                            metadata=bearer(key), timeout=30)  # fmt: skip
                assert failed.value.code() == Code.INTERNAL and "samples nothing" in failed.value.details()
        leases = server.store.read_sync(lambda db: list(db.query("SELECT status, expires_at FROM comparison_tasks")))
        assert len(leases) == 2 and all(r["status"] == "expired" and r["expires_at"] <= time.time() for r in leases)
