"""Labeler quality and the labeling features around it, over a real server (tiny model, HF
engine, a real SQLite file): Feedback.DeclineTask and GetProgress, shared prompts
(`label_overlap_share`) and gold tasks (`label_gold_share`) in the queue,
Admin.SetGoldRanking, GetLabelerQuality (figures worked out by hand below) with its
Prometheus gauges, GetRatingsReport, and the `rlhf labelers` / `rlhf cycles` commands."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlite_utils import Database
from test_feedback_harness import user_in_split

from clients import admin_cli
from clients.client import RlhfClient
from common.store import (
    NewCompletion,
    Store,
    add_completions,
    add_prompt,
    add_ranking,
    add_rating,
    decline_task,
    lease_task,
    set_gold_ranking,
)
from rlhf.v1 import admin_pb2, feedback_pb2
from server_harness import ServerThread, create_key, server_config

Code = grpc.StatusCode
TRAIN_USER, TEST_USER = user_in_split("train", "asker"), user_in_split("test", "asker")
LABELERS = {"alice": "A", "bob": "A", "carol": "B", "dave": "B", "erin": "B"}


# ---------------------------------------------------------------- servers and helpers


@dataclass
class Env:
    server: ServerThread
    keys: dict[str, str]

    @property
    def store(self) -> Store:
        assert self.server.store is not None
        return self.server.store

    @property
    def path(self) -> Path:
        return self.server.config.store_path

    def client(self, who: str | None) -> RlhfClient:
        return RlhfClient(self.server.target, self.keys[who] if who else "")

    def call(self, who: str | None, method: str, request: Any) -> Any:
        with self.client(who) as c:
            service = c.admin if method in admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods_by_name else c.feedback
            return getattr(service, method)(request, metadata=c.metadata, timeout=120)

    def next(self, who: str) -> feedback_pb2.ComparisonTask:
        return self.call(who, "NextComparison", feedback_pb2.NextComparisonRequest(request_id=uuid.uuid4().hex))

    def rank(self, who: str, task: feedback_pb2.ComparisonTask, order: list[int] | None = None) -> None:
        ids = [c.completion_id for c in task.completions]
        groups = [feedback_pb2.RankGroup(completion_ids=[ids[i]]) for i in (order or range(len(ids)))]
        self.call(who, "SubmitRanking", feedback_pb2.SubmitRankingRequest(
            request_id=uuid.uuid4().hex, task_id=task.task_id, ranking=groups))

    def decline(self, who: str, task_id: str, reason: int = feedback_pb2.SKIPPED, comment: str = "",
                request_id: str | None = None) -> feedback_pb2.DeclineTaskResponse:
        return self.call(who, "DeclineTask", feedback_pb2.DeclineTaskRequest(
            request_id=uuid.uuid4().hex if request_id is None else request_id, task_id=task_id, reason=reason,
            comment=comment))

    def rows(self, sql: str, params: Any = ()) -> list[tuple]:
        return self.store.read_sync(lambda db: [tuple(r) for r in db.execute(sql, params).fetchall()])


def _start(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, **config: Any) -> Iterator[Env]:
    settings = server_config(tmp_path_factory.mktemp("quality"), tiny_model_dir, label_k=4, label_max_new_tokens=4,
                             **config)
    keys = {who: create_key(settings.store_path, "labeler", who, group)[0] for who, group in LABELERS.items()}
    keys["admin"] = create_key(settings.store_path, "admin", "ops")[0]
    keys["user"] = create_key(settings.store_path, "user", TRAIN_USER)[0]
    with ServerThread(settings) as server:
        yield Env(server, keys)


def _empty_queue(env: Env) -> Env:
    """Earlier tests' prompts leave the queue (to the test split, which it never serves) and
    every lease, ranking and gold ranking goes: each test starts from an empty queue."""

    def retire(db: Database) -> None:
        db.execute("UPDATE prompts SET split = 'test'")
        for table in ("rankings", "comparison_tasks", "gold_rankings", "ratings", "demonstrations"):
            db.execute(f"DELETE FROM {table}")

    env.store.write_sync(retire)
    return env


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Env]:
    """Every prompt shared (overlap share 1.0), a gold task whenever one waits (gold share 1.0)."""
    yield from _start(tmp_path_factory, tiny_model_dir, label_overlap_share=1.0, label_gold_share=1.0)


@pytest.fixture(scope="module")
def plain_env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Env]:
    """No shared prompts, no gold tasks (both shares 0.0)."""
    yield from _start(tmp_path_factory, tiny_model_dir, label_overlap_share=0.0, label_gold_share=0.0)


@pytest.fixture
def shared(shared_env: Env) -> Env:
    return _empty_queue(shared_env)


@pytest.fixture
def plain(plain_env: Env) -> Env:
    return _empty_queue(plain_env)


def seed_prompt(store: Store, n: int = 4, *, user: str = TRAIN_USER, text: str = "Name a river.",
                ids: list[str] | None = None, version: int = 0, now: float | None = None) -> tuple[str, list[str]]:
    """A logged prompt with n served completions (ids chosen when given): (prompt id, completion ids)."""
    samples = [NewCompletion(idx=i, text=f"answer {i}", policy_version=version, finish_reason="stop", prompt_tokens=3,
                             completion_tokens=2, latency_s=0.1, id=ids[i] if ids else None) for i in range(n)]

    def op(db: Database) -> tuple[str, list[str]]:
        prompt = add_prompt(user, text, now=now)(db)
        return prompt.id, [c.id for c in add_completions(prompt.id, samples, now=now)(db)]

    return store.write_sync(op)


def gold_request(prompt_id: str, groups: list[list[str]], request_id: str = "") -> admin_pb2.SetGoldRankingRequest:
    return admin_pb2.SetGoldRankingRequest(request_id=request_id, prompt_id=prompt_id,
                                           ranking=[feedback_pb2.RankGroup(completion_ids=g) for g in groups])


def every_value(path: Path) -> list[tuple[str, str]]:
    """Every value of every table but the audit (refusals are audited by design)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return sorted((t, repr(v)) for t in tables if t not in ("audit", "sqlite_sequence")
                      for row in conn.execute(f"SELECT * FROM {t}") for v in row)
    finally:
        conn.close()


# ---------------------------------------------------------------- DeclineTask


def test_a_skipped_task_is_stored_and_its_prompt_goes_to_others_only(plain: Env) -> None:
    prompt_id, _ = seed_prompt(plain.store)
    task = plain.next("alice")
    answer = plain.decline("alice", task.task_id, feedback_pb2.SKIPPED, comment="cannot judge poems")
    assert (answer.task_id, answer.reason) == (task.task_id, feedback_pb2.SKIPPED)
    [(status, reason, comment, declined_at)] = plain.rows(
        "SELECT status, decline_reason, decline_comment, declined_at FROM comparison_tasks WHERE id = ?", [task.task_id])
    assert (status, reason, comment) == ("declined", "skipped", "cannot judge poems")
    assert declined_at == pytest.approx(time.time(), abs=60)
    assert plain.rows("SELECT COUNT(*) FROM rankings") == [(0,)]
    with pytest.raises(grpc.RpcError) as empty:  # never offered to alice again...
        plain.next("alice")
    assert empty.value.code() == Code.NOT_FOUND
    assert plain.next("bob").prompt_id == prompt_id  # ...but to others


def test_none_acceptable_is_a_stored_verdict_never_a_ranking(plain: Env) -> None:
    seed_prompt(plain.store)
    task = plain.next("alice")
    plain.decline("alice", task.task_id, feedback_pb2.NONE_ACCEPTABLE)
    assert plain.rows("SELECT status, decline_reason FROM comparison_tasks WHERE id = ?", [task.task_id]) == [
        ("declined", "none_acceptable")]
    assert plain.rows("SELECT COUNT(*) FROM rankings") == [(0,)]  # nothing a reward model could train on
    with pytest.raises(grpc.RpcError) as closed:  # and it cannot be ranked after all
        plain.rank("alice", task)
    assert closed.value.code() == Code.FAILED_PRECONDITION and "already declined" in closed.value.details()


def test_a_replayed_decline_stores_once_and_answers_the_same(plain: Env) -> None:
    seed_prompt(plain.store)
    task = plain.next("alice")
    first = plain.decline("alice", task.task_id, comment="dup", request_id="decline-1")
    assert plain.decline("alice", task.task_id, comment="dup", request_id="decline-1") == first
    assert plain.rows("SELECT status, declined_at IS NOT NULL FROM comparison_tasks WHERE id = ?", [task.task_id]) == [
        ("declined", 1)]
    audited = plain.rows("SELECT detail_json FROM audit WHERE action = 'feedback.DeclineTask' "
                         "AND json_extract(detail_json, '$.request_id') = 'decline-1'")
    assert len(audited) == 1
    assert json.loads(audited[0][0]).items() >= {"task_id": task.task_id, "reason": "skipped", "outcome": "OK"}.items()


@dataclass(frozen=True)
class BadDecline:
    name: str
    who: str
    fields: dict[str, Any]  # DeclineTaskRequest fields; task_id "<live>" etc. is filled in
    code: grpc.StatusCode
    message: str


BAD_DECLINES = [
    BadDecline("reason unspecified", "alice", {"reason": 0}, Code.INVALID_ARGUMENT, "say why"),
    BadDecline("reason unknown", "alice", {"reason": 7}, Code.INVALID_ARGUMENT, "reason = 7"),
    BadDecline("comment too long", "alice", {"comment": "x" * 4097}, Code.INVALID_ARGUMENT, "at most 4096"),
    BadDecline("no request_id", "alice", {"request_id": ""}, Code.INVALID_ARGUMENT, "request_id is required"),
    BadDecline("no task_id", "alice", {"task_id": ""}, Code.INVALID_ARGUMENT, "task_id is required"),
    BadDecline("unknown task", "alice", {"task_id": "no-such-task"}, Code.NOT_FOUND, "not found"),
    BadDecline("another labeler's task", "bob", {}, Code.PERMISSION_DENIED, "leased to another labeler"),
    BadDecline("expired task", "alice", {"task_id": "<expired>"}, Code.FAILED_PRECONDITION, "expired at 20"),
    BadDecline("answered task", "alice", {"task_id": "<answered>"}, Code.FAILED_PRECONDITION, "already answered"),
    BadDecline("declined task", "alice", {"task_id": "<declined>"}, Code.FAILED_PRECONDITION, "already declined"),
    BadDecline("a user's key", "user", {}, Code.PERMISSION_DENIED, "needs role 'labeler'"),
    BadDecline("request_id reused for another task", "alice", {"request_id": "<used>"}, Code.ALREADY_EXISTS,
               "already used"),
]


@pytest.mark.parametrize("row", BAD_DECLINES, ids=[r.name for r in BAD_DECLINES])
def test_a_bad_decline_is_refused_with_its_status_storing_nothing(plain: Env, row: BadDecline) -> None:
    tasks = {}
    for name in ("expired", "answered", "declined", "used", "live"):
        seed_prompt(plain.store, text=f"{name} prompt")
        tasks[name] = plain.next("alice")
    plain.store.write_sync(lambda db: db.execute(
        "UPDATE comparison_tasks SET expires_at = 1e9 WHERE id = ?", [tasks["expired"].task_id]))  # 2001-09-09
    plain.rank("alice", tasks["answered"])
    plain.decline("alice", tasks["declined"].task_id)
    used_id = uuid.uuid4().hex  # the module's store keeps every earlier row's request_id
    plain.decline("alice", tasks["used"].task_id, request_id=used_id)
    fields = {"request_id": uuid.uuid4().hex, "task_id": tasks["live"].task_id, "reason": feedback_pb2.SKIPPED,
              **row.fields}
    if fields["task_id"].startswith("<"):
        fields["task_id"] = tasks[fields["task_id"].strip("<>")].task_id
    if fields["request_id"] == "<used>":
        fields["request_id"] = used_id
    before = every_value(plain.path)
    with pytest.raises(grpc.RpcError) as refused:
        plain.call(row.who, "DeclineTask", feedback_pb2.DeclineTaskRequest(**fields))
    assert refused.value.code() == row.code, refused.value.details()
    assert row.message in refused.value.details()
    assert every_value(plain.path) == before


# ---------------------------------------------------------------- GetProgress


def test_progress_counts_todays_work_and_the_prompts_waiting(plain: Env) -> None:
    now = time.time()
    midnight = now - now % 86400
    for i in range(4):
        seed_prompt(plain.store, text=f"progress prompt {i}")
    plain.rank("bob", plain.next("bob"))
    plain.decline("bob", plain.next("bob").task_id)
    done = plain.next("bob")  # leased: bob cannot be given it again while the lease lasts... nor anyone else
    plain.call("bob", "SubmitDemonstration", feedback_pb2.SubmitDemonstrationRequest(
        request_id=uuid.uuid4().hex, prompt_id=done.prompt_id, response="A good answer."))
    for c in done.completions[:2]:
        plain.call("bob", "SubmitRating", feedback_pb2.SubmitRatingRequest(
            request_id=uuid.uuid4().hex, completion_id=c.completion_id, overall=5))
    prompt_id, ids = seed_prompt(plain.store, text="ranked yesterday")
    plain.store.write_sync(add_ranking(prompt_id, "bob", [[i] for i in ids], now=midnight - 10))  # not today
    progress = plain.call("bob", "GetProgress", feedback_pb2.GetProgressRequest())
    assert (progress.user_id, progress.role, progress.labeler_group) == ("bob", "labeler", "A")
    assert (progress.ranked_today, progress.declined_today, progress.demonstrations_today,
            progress.ratings_today) == (1, 1, 1, 2)  # fmt: skip
    # 5 prompts: bob ranked two (one yesterday), declined one, leases one: one waits for him.
    assert progress.queue_waiting == 1
    alice = plain.call("alice", "GetProgress", feedback_pb2.GetProgressRequest())
    assert (alice.ranked_today, alice.queue_waiting) == (0, 4)  # all but bob's live lease
    admin = plain.call("admin", "GetProgress", feedback_pb2.GetProgressRequest())
    assert (admin.user_id, admin.role, admin.labeler_group) == ("ops", "admin", "")
    with pytest.raises(grpc.RpcError) as denied:
        plain.call("user", "GetProgress", feedback_pb2.GetProgressRequest())
    assert denied.value.code() == Code.PERMISSION_DENIED


# ---------------------------------------------------------------- shared prompts


def test_a_shared_prompt_goes_first_to_a_second_labeler_with_the_same_completions(shared: Env) -> None:
    first_prompt, _ = seed_prompt(shared.store, text="shared", now=time.time() - 60)
    alice = shared.next("alice")
    assert alice.prompt_id == first_prompt
    shared.rank("alice", alice)
    fresh, _ = seed_prompt(shared.store, text="fresh and newer")  # unranked: first in line without sharing
    completions = shared.rows("SELECT COUNT(*) FROM completions")
    bob = shared.next("bob")
    assert bob.prompt_id == first_prompt  # the shared prompt first, to a labeler who has not ranked it
    assert [c.completion_id for c in bob.completions] == [c.completion_id for c in alice.completions]
    assert shared.rows("SELECT COUNT(*) FROM completions") == completions  # no new samples
    shared.rank("bob", bob)
    carol = shared.next("carol")  # two labelers ranked it (label_overlap_labelers = 2): the fresh one now
    assert carol.prompt_id == fresh


def test_without_sharing_a_second_labeler_gets_fresh_prompts_and_new_samples(plain: Env) -> None:
    first_prompt, _ = seed_prompt(plain.store, text="not shared", now=time.time() - 60)
    alice = plain.next("alice")
    plain.rank("alice", alice)
    fresh, _ = seed_prompt(plain.store, text="fresh and newer")
    assert plain.next("bob").prompt_id == fresh  # fewest rankings first, as ever
    again = plain.next("bob")
    assert again.prompt_id == first_prompt
    assert not {c.completion_id for c in again.completions} & {c.completion_id for c in alice.completions}


# ---------------------------------------------------------------- gold tasks


def test_a_gold_task_is_given_and_scored_in_labeler_quality(shared: Env) -> None:
    seed_prompt(shared.store, text="an ordinary prompt, fresher", now=time.time())
    gold_prompt, ids = seed_prompt(shared.store, 6, text="a gold prompt", now=time.time() - 60)
    gold = [[ids[2]], [ids[0]], [ids[4]], [ids[5]]]  # 4 of its 6 completions, best first
    done = shared.call("admin", "SetGoldRanking", gold_request(gold_prompt, gold, request_id="gold-1"))
    assert (done.prompt_id, done.comparisons, done.replaced) == (gold_prompt, 6, False)
    task = shared.next("dave")  # gold share 1.0: the gold task first
    assert task.prompt_id == gold_prompt
    assert sorted(c.completion_id for c in task.completions) == sorted([ids[0], ids[2], ids[4], ids[5]])
    by_id = {c.completion_id: i for i, c in enumerate(task.completions)}
    # dave swaps the gold's best two: 5 of its 6 pairs right.
    shared.rank("dave", task, [by_id[ids[0]], by_id[ids[2]], by_id[ids[4]], by_id[ids[5]]])
    assert shared.next("dave").prompt_id != gold_prompt  # ranked: never given to dave again
    quality = shared.call("admin", "GetLabelerQuality", admin_pb2.GetLabelerQualityRequest())
    [dave] = [s for s in quality.labelers if s.labeler_id == "dave"]
    assert (dave.gold_tasks, dave.gold_agreement, dave.tasks_done, dave.flagged) == (1, pytest.approx(5 / 6), 1, False)
    assert dave.median_seconds_per_task == pytest.approx(0, abs=60)


def test_without_gold_share_no_gold_task_is_given(plain: Env) -> None:
    fresh, _ = seed_prompt(plain.store, text="ordinary and fresh", now=time.time())
    gold_prompt, ids = seed_prompt(plain.store, text="gold", now=time.time() - 60)
    plain.call("admin", "SetGoldRanking", gold_request(gold_prompt, [[i] for i in ids]))
    assert plain.next("alice").prompt_id == fresh


def test_setting_a_gold_ranking_again_replaces_it(plain: Env) -> None:
    prompt_id, ids = seed_prompt(plain.store)
    plain.call("admin", "SetGoldRanking", gold_request(prompt_id, [[i] for i in ids]))
    again = plain.call("admin", "SetGoldRanking", gold_request(prompt_id, [ids[:2], ids[2:]]))
    assert (again.replaced, again.comparisons) == (True, 4)
    [(ranking, set_by)] = plain.rows("SELECT ranking_json, set_by FROM gold_rankings WHERE prompt_id = ?", [prompt_id])
    assert (json.loads(ranking), set_by) == ([ids[:2], ids[2:]], "ops")


@dataclass(frozen=True)
class BadGold:
    name: str
    who: str | None
    ranking: str  # completion indexes of the seeded prompt, best first: "0,1;2;3" (a ';' between groups)
    code: grpc.StatusCode
    message: str
    prompt: str = "seeded"  # "seeded" (10 completions), "other" (4, its gold ranking set), "test" (test split),
    # "unknown", "" (none)
    reuse_request_id: bool = False  # send it with the request_id that set "other"'s gold ranking


BAD_GOLDS = [
    BadGold("no prompt_id", "admin", "0;1;2;3", Code.INVALID_ARGUMENT, "prompt_id is empty", prompt=""),
    BadGold("unknown prompt", "admin", "0;1;2;3", Code.NOT_FOUND, "not found", prompt="unknown"),
    BadGold("K = 3", "admin", "0;1;2", Code.INVALID_ARGUMENT, "K = 3"),
    BadGold("K = 10", "admin", "0;1;2;3;4;5;6;7;8;9", Code.INVALID_ARGUMENT, "K = 10"),
    BadGold("all tied", "admin", "0,1,2,3", Code.INVALID_ARGUMENT, "all 4 completions are tied"),
    BadGold("a completion twice", "admin", "0;1;2;2", Code.INVALID_ARGUMENT, "more than once"),
    BadGold("an empty group", "admin", "0;1;;2;3", Code.INVALID_ARGUMENT, "group 3 of the ranking is empty"),
    BadGold("another prompt's completion", "admin", "0;1;2;other", Code.INVALID_ARGUMENT, "belongs to prompt"),
    BadGold("a test-split prompt", "admin", "0;1;2;3", Code.INVALID_ARGUMENT, "test split", prompt="test"),
    BadGold("a labeler's key", "alice", "0;1;2;3", Code.PERMISSION_DENIED, "needs role 'admin'"),
    BadGold("no key", None, "0;1;2;3", Code.UNAUTHENTICATED, "missing API key"),
    BadGold("request_id reused with another ranking", "admin", "1;0;2;3", Code.ALREADY_EXISTS, "already used",
            prompt="other", reuse_request_id=True),
]


@pytest.mark.parametrize("row", BAD_GOLDS, ids=[r.name for r in BAD_GOLDS])
def test_a_bad_gold_ranking_is_refused_with_its_status_storing_nothing(plain: Env, row: BadGold) -> None:
    seeded, ids = seed_prompt(plain.store, 10)
    other, other_ids = seed_prompt(plain.store)
    tested, test_ids = seed_prompt(plain.store, user=TEST_USER)
    used_id = uuid.uuid4().hex
    plain.call("admin", "SetGoldRanking", gold_request(other, [[i] for i in other_ids], request_id=used_id))
    prompt_id, pool = {"seeded": (seeded, ids), "other": (other, other_ids), "test": (tested, test_ids),
                       "unknown": ("no-such", ids), "": ("", ids)}[row.prompt]  # fmt: skip
    groups = [[other_ids[0] if i == "other" else pool[int(i)] for i in group.split(",") if i]
              for group in row.ranking.split(";")]  # fmt: skip
    before = every_value(plain.path)
    with pytest.raises(grpc.RpcError) as refused:
        request_id = used_id if row.reuse_request_id else ""
        plain.call(row.who, "SetGoldRanking", gold_request(prompt_id, groups, request_id=request_id))
    assert refused.value.code() == row.code, refused.value.details()
    assert row.message in refused.value.details()
    assert every_value(plain.path) == before


# ---------------------------------------------------------------- GetLabelerQuality, by hand


def seed_labeling(store: Store) -> None:
    """A small labeling history whose figures are worked out by hand in the test below.

    P1 (a, b, c, d): alice [a][b][c][d] (task shown at 100, ranked at 130: 30 s) and bob
        [a][c][b][d] (shown 100, ranked 110: 10 s): they differ on (b, c) only, 5 of 6 pairs.
    P5 (i, j, k, l): alice alone (shown 200, ranked 260: 60 s).
    P2, P3, P4 gold, each [w][x][y][z] of its own completions; carol ranks each reversed (0
        of 6 pairs right, three gold tasks: flagged); dave ranks P2 [e, f][g][h] (a tie on
        the gold's strict (e, f) is a miss: 5 of 6). carol and dave share P2: dave orders 5
        pairs strictly, carol reverses each: 0 of 5.
    bob and erin (group B, no ranking at all) each declined a task; an imported ranking of
    P1 is no labeler's work and is ignored.
    """

    tag = uuid.uuid4().hex[:8]  # completion ids unique in the module's store
    prompts: dict[str, str] = {}

    def op(db: Database) -> None:
        def cid(name: str, letter: str) -> str:
            return f"{tag}-{name}-{letter}"

        def ranked(name: str, labeler: str, order: str, shown: float | None = None, at: float = 1000.0) -> None:
            groups = [[cid(name, x) for x in g] for g in order.split(";")]
            task_id = None
            if shown is not None:
                task_id = lease_task(prompts[name], labeler, [c for g in groups for c in g], 1e6, now=shown)(db).id
            add_ranking(prompts[name], labeler, groups, labeler_group=LABELERS[labeler], task_id=task_id, now=at)(db)

        for name, letters in (("P1", "abcd"), ("P5", "ijkl"), ("P2", "efgh"), ("P3", "mnop"), ("P4", "qrst")):
            prompts[name] = add_prompt(TRAIN_USER, f"prompt {name}")(db).id
            add_completions(prompts[name], [
                NewCompletion(idx=i, text=x, policy_version=0, finish_reason="stop", prompt_tokens=2,
                              completion_tokens=1, latency_s=0.1, id=cid(name, x)) for i, x in enumerate(letters)])(db)
        ranked("P1", "alice", "a;b;c;d", shown=100, at=130)
        ranked("P1", "bob", "a;c;b;d", shown=100, at=110)
        ranked("P5", "alice", "i;j;k;l", shown=200, at=260)
        for name, letters in (("P2", "efgh"), ("P3", "mnop"), ("P4", "qrst")):
            set_gold_ranking(prompts[name], [[cid(name, x)] for x in letters], "ops")(db)
            ranked(name, "carol", ";".join(reversed(letters)))
        ranked("P2", "dave", "ef;g;h")
        add_ranking(prompts["P1"], "importer", [[cid("P1", x)] for x in "dcba"], source="import")(db)
        for labeler in ("bob", "erin"):
            task = lease_task(prompts["P1"], labeler, [cid("P1", x) for x in "abcd"], 1e6, now=300)(db)
            decline_task(task.id, labeler, "skipped", now=310)(db)

    store.write_sync(op)


# Krippendorff's alpha, ordinal (units: the shared sets' completions, values: ranks):
#   group A, P1: units a (1,1) b (2,3) c (3,2) d (4,4); n_v = 2 each, n = 8;
#     D_o = (2*4 + 2*4) / 8 = 2 (delta(2,3) = 2+2 - 2 = 2, squared 4);
#     D_e = 2 * 4 * (4 + 16 + 36 + 4 + 16 + 4) / (8 * 7) = 640 / 56; alpha = 1 - 112/640 = 0.825.
#   group B, P2: units e (4,1) f (3,1) g (2,2) h (1,3); n_1..4 = 3, 2, 2, 1;
#     o_13 = o_31 = 2, o_14 = o_41 = 1, o_22 = 2; delta^2: 13 -> 20.25, 14 -> 36;
#     D_o = (4 * 20.25 + 2 * 36) / 8 = 153 / 8; D_e = 624 / 56; alpha = 1 - 1071/624 = -447/624.
#   everyone: both units sets, n_1..4 = 5, 4, 4, 3, n = 16; D_o = 641 / 16; D_e = 5088 / 120;
#     alpha = 1 - 641/678.4 = 37.4/678.4.
ALPHA_A, ALPHA_B, ALPHA_ALL = 0.825, -447 / 624, 37.4 / 678.4


def test_labeler_quality_figures_equal_the_hand_worked_values(plain: Env) -> None:
    seed_labeling(plain.store)
    q = plain.call("admin", "GetLabelerQuality", admin_pb2.GetLabelerQualityRequest())
    stats = {s.labeler_id: s for s in q.labelers}
    assert list(stats) == ["alice", "bob", "carol", "dave", "erin"]  # not the importer

    def row(s: admin_pb2.LabelerStats) -> tuple:
        return (s.labeler_group, s.tasks_done, s.tasks_declined,
                s.median_seconds_per_task if s.HasField("median_seconds_per_task") else None, s.shared_tasks,
                s.pairwise_agreement if s.HasField("pairwise_agreement") else None, s.gold_tasks,
                s.gold_agreement if s.HasField("gold_agreement") else None, s.flagged)  # fmt: skip

    assert row(stats["alice"]) == ("A", 2, 0, 45.0, 1, pytest.approx(5 / 6), 0, None, False)  # median(30, 60)
    assert row(stats["bob"]) == ("A", 1, 1, 10.0, 1, pytest.approx(5 / 6), 0, None, False)
    assert row(stats["carol"]) == ("B", 3, 0, None, 1, 0.0, 3, 0.0, True)
    assert row(stats["dave"]) == ("B", 1, 0, None, 1, 0.0, 1, pytest.approx(5 / 6), False)  # 1 gold task < 3
    assert row(stats["erin"]) == ("B", 0, 1, None, 0, None, 0, None, False)  # her group from her users row
    assert "0 of 18 gold pairs" in stats["carol"].flag_reason and "over 3 gold tasks" in stats["carol"].flag_reason
    assert stats["alice"].flag_reason == ""

    groups = {g.labeler_group: g for g in q.groups}
    assert list(groups) == ["A", "B"]
    assert (groups["A"].labelers, groups["A"].shared_tasks, groups["A"].pairs) == (2, 1, 6)
    assert groups["A"].pairwise_agreement == pytest.approx(5 / 6)
    assert groups["A"].krippendorff_alpha == pytest.approx(ALPHA_A)
    assert (groups["B"].labelers, groups["B"].shared_tasks, groups["B"].pairs, groups["B"].pairwise_agreement) == (
        2, 1, 5, 0.0)  # carol and dave ranked; erin only declined
    assert groups["B"].krippendorff_alpha == pytest.approx(ALPHA_B)
    overall = q.overall
    assert (overall.labeler_group, overall.labelers, overall.shared_tasks, overall.pairs) == ("", 4, 2, 11)
    assert overall.pairwise_agreement == pytest.approx(5 / 11)
    assert overall.krippendorff_alpha == pytest.approx(ALPHA_ALL)
    assert (q.overlap_share, q.gold_share, q.gold_min_agreement, q.gold_min_tasks) == (0.0, 0.0, 0.6, 3)

    metrics = plain.server.running.deps.metrics.registry  # type: ignore[union-attr]
    assert metrics.get_sample_value("rlhf_labeler_pairwise_agreement", {"labeler": "alice"}) == pytest.approx(5 / 6)
    assert metrics.get_sample_value("rlhf_labeler_pairwise_agreement", {"labeler": "erin"}) is None  # no figure
    assert metrics.get_sample_value("rlhf_labeler_gold_agreement", {"labeler": "carol"}) == 0.0
    assert metrics.get_sample_value("rlhf_labelers_flagged") == 1
    assert metrics.get_sample_value("rlhf_labeler_group_alpha", {"group": "A"}) == pytest.approx(ALPHA_A)
    assert metrics.get_sample_value("rlhf_labeler_group_alpha", {"group": ""}) == pytest.approx(ALPHA_ALL)


def test_the_labelers_command_prints_the_tables_beside_the_papers_figure(plain: Env,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    seed_labeling(plain.store)
    flags = ["--target", plain.server.target, "--key", plain.keys["admin"]]
    assert admin_cli.labelers_main(flags) == 0
    out = capsys.readouterr().out
    alice = next(line for line in out.splitlines() if line.startswith("alice"))
    assert alice.split()[:9] == ["alice", "A", "2", "0", "45.0", "1", "83.3%", "0", "-"]
    assert "yes: ordered 0 of 18 gold pairs" in out
    assert next(line for line in out.splitlines() if line.startswith("A ")).split() == ["A", "2", "1", "6", "83.3%",
                                                                                         "0.825"]
    assert "72.6 ± 1.5%" in out
    prompt_id, ids = seed_prompt(plain.store)
    assert admin_cli.labelers_main(["gold", prompt_id, f"{ids[0]},{ids[1]};{ids[2]};{ids[3]}", *flags]) == 0
    assert f"gold ranking of prompt {prompt_id} set: 5 ordered pairs" in capsys.readouterr().out
    assert plain.rows("SELECT ranking_json FROM gold_rankings WHERE prompt_id = ?", [prompt_id]) == [
        (json.dumps([ids[:2], [ids[2]], [ids[3]]], separators=(",", ":")),)]
    assert admin_cli.labelers_main(["gold", prompt_id, f"{ids[0]};{ids[1]}", *flags]) == 1  # K = 2
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_parse_gold_ranking() -> None:
    assert admin_cli.parse_gold_ranking("a,b;c; d ") == [["a", "b"], ["c"], ["d"]]


# ---------------------------------------------------------------- GetRatingsReport


def test_ratings_per_policy_version_by_hand(plain: Env, capsys: pytest.CaptureFixture[str]) -> None:
    _, (v0a, v0b, *_) = seed_prompt(plain.store, version=0)
    _, (v1a, *_) = seed_prompt(plain.store, version=1)
    mixed = NewCompletion(idx=0, text="half v0, half v1", policy_version=0, finish_reason="stop", prompt_tokens=2,
                          completion_tokens=2, latency_s=0.1, version_spans=((0, 0, 1), (1, 1, 2)))
    mixed_id = plain.store.write_sync(lambda db: add_completions(add_prompt(TRAIN_USER, "swapped")(db).id, [mixed])(db))[0].id
    plain.store.write_sync(add_rating(mixed_id, "alice", 1))  # two versions made it: nobody's sample, left out
    plain.store.write_sync(add_rating(v0a, "alice", 2, {"fails_to_follow_instruction": True}))
    plain.store.write_sync(add_rating(v0b, "bob", 5, {"fails_to_follow_instruction": False, "hallucination": True}))
    plain.store.write_sync(add_rating(v1a, "alice", 6, {"satisfies_constraint": True}))
    report = plain.call("admin", "GetRatingsReport", admin_pb2.GetRatingsReportRequest())
    v0, v1 = report.versions  # oldest first
    assert (v0.policy_version, v0.ratings, v0.mean_overall) == (0, 2, 3.5)  # (2 + 5) / 2
    assert (v1.policy_version, v1.ratings, v1.mean_overall) == (1, 1, 6.0)
    assert len(v0.flag_share) == len(v1.flag_share) == 11  # every flag listed
    assert {k: v for k, v in v0.flag_share.items() if v} == {"fails_to_follow_instruction": 0.5, "hallucination": 0.5}
    assert {k: v for k, v in v1.flag_share.items() if v} == {"satisfies_constraint": 1.0}
    assert admin_cli.cycles_main(["--target", plain.server.target, "--key", plain.keys["admin"]]) == 0
    out = capsys.readouterr().out
    assert "ratings per policy version" in out
    assert next(line for line in out.splitlines() if line.startswith("v     0")).split()[:4] == [
        "v", "0", "2", "3.50"]
