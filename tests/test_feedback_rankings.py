"""Feedback.SubmitRanking / SubmitDemonstration / SubmitRating over a real socket: every
malformed submission is refused with the right status and a message naming the problem,
and stores nothing; retries store once; a reused request_id with another payload is
ALREADY_EXISTS."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest

from common.store import lease_task
from rlhf.v1 import feedback_pb2
from server.engines.hf import HFEngine
from test_feedback_harness import FeedbackServerThread, bearer, count_rows, issue_key, seed_prompt, stub, user_in_split

TABLES = ("prompts", "completions", "rankings", "comparison_tasks", "demonstrations", "ratings", "idempotency")
Code = grpc.StatusCode


@dataclass
class Env:
    server: FeedbackServerThread
    feedback: object  # FeedbackStub
    alice: str  # labeler key, group "train"
    bob: str  # another labeler
    user: str  # role "user": no labeling

    @property
    def store(self):
        return self.server.store

    def task(self, labeler: str = "alice", k: int = 4, lease_s: float = 600.0, now: float | None = None):
        """A leased task of `labeler` on a fresh prompt: (task id, prompt id, completion ids)."""
        prompt_id, ids = seed_prompt(self.store, k, text=f"task prompt {uuid.uuid4().hex[:6]}")
        task = self.store.write_sync(lease_task(prompt_id, labeler, ids, lease_s, now=now))
        return task.id, prompt_id, ids


@pytest.fixture(scope="module")
def env(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    path = tmp_path_factory.mktemp("feedback") / "store.sqlite"
    with FeedbackServerThread(path, lambda: HFEngine(tiny_model_dir, 0), max_new_tokens=8) as server:
        keys = {
            "alice": issue_key(server.store, "alice", "labeler", "train"),
            "bob": issue_key(server.store, "bob", "labeler", "heldout"),
            "user": issue_key(server.store, user_in_split("train", "customer"), "user", None),
        }
        channel, feedback = stub(server)
        with channel:
            yield Env(server, feedback, keys["alice"], keys["bob"], keys["user"])


def ranking(*groups: list[str]) -> list[feedback_pb2.RankGroup]:
    return [feedback_pb2.RankGroup(completion_ids=g) for g in groups]


def submit(env: Env, key: str, **fields) -> feedback_pb2.SubmitRankingResponse:
    fields.setdefault("request_id", uuid.uuid4().hex)
    return env.feedback.SubmitRanking(feedback_pb2.SubmitRankingRequest(**fields), metadata=bearer(key), timeout=30)


# Each case builds (key, request fields, expected message fragment) from a fresh setup.
Case = Callable[[Env], tuple[str, dict, str]]


def duplicate_id(env: Env):
    task, _, c = env.task()
    return env.alice, dict(task_id=task, ranking=ranking([c[0]], [c[1]], [c[0]], [c[2], c[3]])), f"completion {c[0]!r} appears more than once"


def missing_id(env: Env):
    task, _, c = env.task()
    return env.alice, dict(task_id=task, ranking=ranking([c[0]], [c[1]], [c[2]])), f"completion {c[3]!r} of task {task!r} is missing"


def id_of_another_prompt_in_a_task(env: Env):
    task, _, c = env.task()
    _, other = seed_prompt(env.store, 4, text="another prompt")
    return env.alice, dict(task_id=task, ranking=ranking([c[0]], [c[1]], [c[2]], [other[0]])), f"completion {other[0]!r} is not one of task"


def id_of_another_prompt_by_prompt_id(env: Env):
    prompt, c = seed_prompt(env.store, 4)
    other_prompt, other = seed_prompt(env.store, 4, text="another prompt")
    groups = ranking([c[0]], [c[1]], [c[2]], [other[0]])
    return env.alice, dict(prompt_id=prompt, ranking=groups), f"completion {other[0]!r} belongs to prompt {other_prompt!r}"


def unknown_completion(env: Env):
    prompt, c = seed_prompt(env.store, 4)
    return env.alice, dict(prompt_id=prompt, ranking=ranking([c[0]], [c[1]], [c[2]], ["no-such-id"])), "completion 'no-such-id' not found"


def k_is_3(env: Env):
    prompt, c = seed_prompt(env.store, 3)
    return env.alice, dict(prompt_id=prompt, ranking=ranking([c[0]], [c[1]], [c[2]])), "K = 3 completions; K must be 4..9"


def k_is_10(env: Env):
    prompt, c = seed_prompt(env.store, 10)
    return env.alice, dict(prompt_id=prompt, ranking=ranking(*[[cid] for cid in c])), "K = 10 completions; K must be 4..9"


def unknown_prompt(env: Env):
    _, c = seed_prompt(env.store, 4)
    return env.alice, dict(prompt_id="no-such-prompt", ranking=ranking(*[[cid] for cid in c])), "prompt 'no-such-prompt' not found"


def unknown_task(env: Env):
    _, c = seed_prompt(env.store, 4)
    return env.alice, dict(task_id="no-such-task", ranking=ranking(*[[cid] for cid in c])), "task 'no-such-task' not found"


def expired_task(env: Env):
    task, _, c = env.task(lease_s=10, now=time.time() - 60)
    return env.alice, dict(task_id=task, ranking=ranking(*[[cid] for cid in c])), f"task {task!r} expired at"


def task_of_another_labeler(env: Env):
    task, _, c = env.task(labeler="bob")
    return env.alice, dict(task_id=task, ranking=ranking(*[[cid] for cid in c])), f"task {task!r} is leased to another labeler"


def caller_without_labeler_role(env: Env):
    prompt, c = seed_prompt(env.store, 4)
    return env.user, dict(prompt_id=prompt, ranking=ranking(*[[cid] for cid in c])), "needs role 'labeler'"


def empty_group(env: Env):
    task, _, c = env.task()
    return env.alice, dict(task_id=task, ranking=ranking([c[0]], [], [c[1], c[2]], [c[3]])), "group 2 of the ranking is empty"


def all_tied(env: Env):
    task, _, c = env.task()
    return env.alice, dict(task_id=task, ranking=ranking(list(c))), "all 4 completions are tied"


def empty_ranking(env: Env):
    task, _, _ = env.task()
    return env.alice, dict(task_id=task, ranking=[]), "the ranking is empty"


def no_task_no_prompt(env: Env):
    _, c = seed_prompt(env.store, 4)
    return env.alice, dict(ranking=ranking(*[[cid] for cid in c])), "give the task_id"


def no_request_id(env: Env):
    task, _, c = env.task()
    return env.alice, dict(task_id=task, request_id="", ranking=ranking(*[[cid] for cid in c])), "request_id is required"


def prompt_id_not_the_tasks(env: Env):
    task, _, c = env.task()
    other, _ = seed_prompt(env.store, 4)
    return env.alice, dict(task_id=task, prompt_id=other, ranking=ranking(*[[cid] for cid in c])), f"is not the prompt of task {task!r}"


def answered_task_with_another_prompt_id(env: Env):
    """The prompt mismatch is named before "already answered", as it is for a live task."""
    task, _, c = env.task()
    submit(env, env.alice, task_id=task, ranking=ranking(*[[cid] for cid in c]))
    other, _ = seed_prompt(env.store, 4)
    return env.alice, dict(task_id=task, prompt_id=other, ranking=ranking(*[[cid] for cid in c])), f"is not the prompt of task {task!r}"


INVALID = [
    (duplicate_id, Code.INVALID_ARGUMENT),
    (missing_id, Code.INVALID_ARGUMENT),
    (id_of_another_prompt_in_a_task, Code.INVALID_ARGUMENT),
    (id_of_another_prompt_by_prompt_id, Code.INVALID_ARGUMENT),
    (unknown_completion, Code.INVALID_ARGUMENT),
    (k_is_3, Code.INVALID_ARGUMENT),
    (k_is_10, Code.INVALID_ARGUMENT),
    (unknown_prompt, Code.NOT_FOUND),
    (unknown_task, Code.NOT_FOUND),
    (expired_task, Code.FAILED_PRECONDITION),
    (task_of_another_labeler, Code.PERMISSION_DENIED),
    (caller_without_labeler_role, Code.PERMISSION_DENIED),
    (empty_group, Code.INVALID_ARGUMENT),
    (all_tied, Code.INVALID_ARGUMENT),
    (empty_ranking, Code.INVALID_ARGUMENT),
    (no_task_no_prompt, Code.INVALID_ARGUMENT),
    (no_request_id, Code.INVALID_ARGUMENT),
    (prompt_id_not_the_tasks, Code.INVALID_ARGUMENT),
    (answered_task_with_another_prompt_id, Code.INVALID_ARGUMENT),
]


@pytest.mark.parametrize("case, code", INVALID, ids=[case.__name__ for case, _ in INVALID])
def test_an_invalid_ranking_is_refused_and_stores_nothing(env: Env, case: Case, code: grpc.StatusCode) -> None:
    key, fields, fragment = case(env)
    before = count_rows(env.store, *TABLES)
    submitted_before = env.store.read_sync(lambda db: db.table("comparison_tasks").count_where("status = 'submitted'"))
    with pytest.raises(grpc.RpcError) as refused:
        submit(env, key, **fields)
    assert refused.value.code() == code, refused.value.details()
    assert fragment in refused.value.details()
    assert count_rows(env.store, *TABLES) == before
    assert env.store.read_sync(lambda db: db.table("comparison_tasks").count_where("status = 'submitted'")) == submitted_before


def test_a_valid_ranking_is_stored_with_its_labeler_and_the_task_is_submitted(env: Env) -> None:
    task, prompt, c = env.task()
    response = submit(env, env.alice, task_id=task, ranking=ranking([c[2]], [c[0], c[1]], [c[3]]))
    # Pairs: c2 beats 3, then c0 and c1 (tied) each beat c3: 3 + 2 = 5.
    assert response.comparisons == 5
    row = env.store.read_sync(lambda db: db.table("rankings").get(response.ranking_id))
    assert (row["prompt_id"], row["labeler_id"], row["labeler_group"], row["k"], row["source"], row["task_id"]) == (
        prompt, "alice", "train", 4, "label", task)
    assert json.loads(row["ranking_json"]) == [[c[2]], [c[0], c[1]], [c[3]]]
    assert env.store.read_sync(lambda db: db.table("comparison_tasks").get(task))["status"] == "submitted"
    with pytest.raises(grpc.RpcError) as again:  # a NEW request for the same task
        submit(env, env.alice, task_id=task, ranking=ranking([c[2]], [c[0], c[1]], [c[3]]))
    assert again.value.code() == Code.FAILED_PRECONDITION and "already answered" in again.value.details()


def test_a_refused_ranking_leaves_its_task_leased_for_the_right_one(env: Env) -> None:
    """The task is claimed by the same statement that reads it; a refusal after that
    claim (a missing completion) must undo it."""
    task, _, c = env.task()
    with pytest.raises(grpc.RpcError) as refused:
        submit(env, env.alice, task_id=task, ranking=ranking([c[0]], [c[1]], [c[2]]))
    assert refused.value.code() == Code.INVALID_ARGUMENT
    assert env.store.read_sync(lambda db: db.table("comparison_tasks").get(task))["status"] == "leased"
    response = submit(env, env.alice, task_id=task, ranking=ranking([c[0]], [c[1]], [c[2]], [c[3]]))
    assert response.comparisons == 6  # 4 singletons: 3 + 2 + 1
    assert env.store.read_sync(lambda db: db.table("comparison_tasks").get(task))["status"] == "submitted"


def test_a_ranking_by_prompt_id_of_served_completions_is_accepted(env: Env) -> None:
    prompt, c = seed_prompt(env.store, 6)
    response = submit(env, env.bob, prompt_id=prompt, ranking=ranking([c[5]], [c[0]], [c[1], c[2]], [c[3], c[4]]))
    assert response.comparisons == 5 + 4 + 4  # 1·5 + 1·4 + 2·2
    row = env.store.read_sync(lambda db: db.table("rankings").get(response.ranking_id))
    assert (row["labeler_group"], row["task_id"], row["k"]) == ("heldout", None, 6)


def test_a_retried_submission_stores_once_and_returns_the_first_answer(env: Env) -> None:
    task, _, c = env.task()
    request_id = uuid.uuid4().hex
    fields = dict(request_id=request_id, task_id=task, ranking=ranking([c[1]], [c[0]], [c[2]], [c[3]]))
    before = count_rows(env.store, "rankings", "idempotency")
    first = submit(env, env.alice, **fields)
    retries = [submit(env, env.alice, **fields) for _ in range(3)]
    assert all(r == first for r in retries)
    after = count_rows(env.store, "rankings", "idempotency")
    assert after == {"rankings": before["rankings"] + 1, "idempotency": before["idempotency"] + 1}


def _audit_rows(env: Env) -> list[tuple[str, str, dict]]:
    rows = env.store.read_sync(lambda db: list(db.execute("SELECT user_id, action, detail_json FROM audit ORDER BY id")))
    return [(user_id, action, json.loads(detail)) for user_id, action, detail in rows]


def test_an_accepted_submission_is_audited_once_with_its_ids_never_its_text(env: Env) -> None:
    task, _, c = env.task()
    request_id = uuid.uuid4().hex
    fields = dict(request_id=request_id, task_id=task, ranking=ranking([c[1]], [c[0]], [c[2]], [c[3]]))
    before = len(_audit_rows(env))
    first = submit(env, env.alice, **fields)
    submit(env, env.alice, **fields)  # a replay is not a new mutation: no row
    with pytest.raises(grpc.RpcError):  # refused: nothing stored, no row
        submit(env, env.alice, task_id=task, ranking=ranking([c[0]], [c[1]]))
    demo_response = demo(env, env.alice, prompt_text="A secret prompt text.", response="A secret answer.")
    rows = _audit_rows(env)[before:]
    assert rows == [
        ("alice", "feedback.SubmitRanking",
         {"role": "labeler", "task_id": task, "ranking_id": first.ranking_id, "request_id": request_id, "outcome": "OK"}),
        ("alice", "feedback.SubmitDemonstration",
         {"role": "labeler", "demonstration_id": demo_response.demonstration_id, "prompt_id": demo_response.prompt_id,
          "request_id": rows[1][2]["request_id"], "outcome": "OK"}),
    ]  # fmt: skip
    assert "secret" not in json.dumps(rows)


def test_the_same_request_id_with_another_payload_is_already_exists(env: Env) -> None:
    task, _, c = env.task()
    request_id = uuid.uuid4().hex
    submit(env, env.alice, request_id=request_id, task_id=task, ranking=ranking([c[1]], [c[0]], [c[2]], [c[3]]))
    before = count_rows(env.store, *TABLES)
    with pytest.raises(grpc.RpcError) as refused:
        submit(env, env.alice, request_id=request_id, task_id=task, ranking=ranking([c[0]], [c[1]], [c[2]], [c[3]]))
    assert refused.value.code() == Code.ALREADY_EXISTS
    assert request_id in refused.value.details()
    assert count_rows(env.store, *TABLES) == before


def test_request_ids_are_per_caller(env: Env) -> None:
    """Two labelers may pick the same request_id: each gets its own answer."""
    request_id = uuid.uuid4().hex
    prompt, c = seed_prompt(env.store, 4)
    a = submit(env, env.alice, request_id=request_id, prompt_id=prompt, ranking=ranking([c[0]], [c[1]], [c[2]], [c[3]]))
    b = submit(env, env.bob, request_id=request_id, prompt_id=prompt, ranking=ranking([c[3]], [c[2]], [c[1]], [c[0]]))
    assert a.ranking_id != b.ranking_id


# ------------------------------------------------------------------ demonstrations and ratings


def demo(env: Env, key: str, **fields) -> feedback_pb2.SubmitDemonstrationResponse:
    fields.setdefault("request_id", uuid.uuid4().hex)
    return env.feedback.SubmitDemonstration(feedback_pb2.SubmitDemonstrationRequest(**fields), metadata=bearer(key), timeout=30)


def rate(env: Env, key: str, **fields) -> feedback_pb2.SubmitRatingResponse:
    fields.setdefault("request_id", uuid.uuid4().hex)
    return env.feedback.SubmitRating(feedback_pb2.SubmitRatingRequest(**fields), metadata=bearer(key), timeout=30)


def test_a_demonstration_on_a_new_prompt_is_stored_under_the_labeler(env: Env) -> None:
    request_id = uuid.uuid4().hex
    first = demo(env, env.alice, request_id=request_id, prompt_text="Name a blue fruit.", response="A blueberry.")
    again = demo(env, env.alice, request_id=request_id, prompt_text="Name a blue fruit.", response="A blueberry.")
    assert again == first
    prompt = env.store.read_sync(lambda db: db.table("prompts").get(first.prompt_id))
    row = env.store.read_sync(lambda db: db.table("demonstrations").get(first.demonstration_id))
    assert (prompt["user_id"], prompt["source"], prompt["text"]) == ("alice", "demonstration", "Name a blue fruit.")
    assert (row["labeler_id"], row["labeler_group"], row["response"]) == ("alice", "train", "A blueberry.")
    with pytest.raises(grpc.RpcError) as reused:
        demo(env, env.alice, request_id=request_id, prompt_text="Name a red fruit.", response="A cherry.")
    assert reused.value.code() == Code.ALREADY_EXISTS


def test_a_demonstration_on_an_existing_prompt(env: Env) -> None:
    prompt, _ = seed_prompt(env.store, 0)
    response = demo(env, env.bob, prompt_id=prompt, response="Have a lovely day!")
    assert response.prompt_id == prompt


def test_a_rating_stores_the_likert_score_and_all_eleven_flags(env: Env) -> None:
    _, c = seed_prompt(env.store, 1)
    flags = feedback_pb2.RatingFlags(hallucination=True, expresses_opinion=True)
    response = rate(env, env.alice, completion_id=c[0], overall=6, flags=flags, comment="fine")
    row = env.store.read_sync(lambda db: db.table("ratings").get(response.rating_id))
    stored = json.loads(row["flags_json"])
    assert len(stored) == 11 and stored["hallucination"] and stored["expresses_opinion"]
    assert sum(stored.values()) == 2 and row["overall"] == 6 and row["labeler_group"] == "train"


INVALID_OTHER = [
    ("demo", dict(prompt_text="Hi", response="   "), "the response is empty", Code.INVALID_ARGUMENT),
    ("demo", dict(response="Hello"), "give a prompt_id", Code.INVALID_ARGUMENT),
    ("demo", dict(prompt_id="no-such-prompt", response="Hello"), "prompt 'no-such-prompt' not found", Code.NOT_FOUND),
    ("demo", dict(prompt_text="", response="Hello"), "prompt_text is empty", Code.INVALID_ARGUMENT),
    ("demo", dict(prompt_text="Hi", response="x" * 40000), "at most 32768", Code.INVALID_ARGUMENT),
    ("rate", dict(completion_id="{c}", overall=0), "overall = 0: the Likert scale is 1..7", Code.INVALID_ARGUMENT),
    ("rate", dict(completion_id="{c}", overall=8), "overall = 8", Code.INVALID_ARGUMENT),
    ("rate", dict(completion_id="no-such-completion", overall=4), "completion 'no-such-completion' not found", Code.NOT_FOUND),
    ("rate", dict(completion_id="{c}", overall=4, comment="y" * 4097), "at most 4096", Code.INVALID_ARGUMENT),
    ("rate", dict(completion_id="{c}", overall=4, request_id=""), "request_id is required", Code.INVALID_ARGUMENT),
]


@pytest.mark.parametrize("method, fields, fragment, code", INVALID_OTHER, ids=[f"{m}-{f}" for m, _, f, _ in INVALID_OTHER])
def test_invalid_demonstrations_and_ratings_are_refused_and_store_nothing(env, method, fields, fragment, code) -> None:
    _, c = seed_prompt(env.store, 1)
    fields = {k: (v.format(c=c[0]) if isinstance(v, str) and v == "{c}" else v) for k, v in fields.items()}
    before = count_rows(env.store, *TABLES)
    with pytest.raises(grpc.RpcError) as refused:
        (demo if method == "demo" else rate)(env, env.alice, **fields)
    assert refused.value.code() == code, refused.value.details()
    assert fragment in refused.value.details()
    assert count_rows(env.store, *TABLES) == before


@pytest.mark.parametrize("method", ["demo", "rate"])
def test_demonstrations_and_ratings_need_the_labeler_role(env: Env, method: str) -> None:
    _, c = seed_prompt(env.store, 1)
    with pytest.raises(grpc.RpcError) as refused:
        if method == "demo":
            demo(env, env.user, prompt_text="Hi", response="Hello")
        else:
            rate(env, env.user, completion_id=c[0], overall=4)
    assert refused.value.code() == Code.PERMISSION_DENIED
