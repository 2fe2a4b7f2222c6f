"""Erasing a user and opting out of training.

Store level: an erased user (prompts, completions, rankings as labeler and ranked by
others, demonstrations, ratings, tasks, idempotency records, keys, audit rows) leaves no
row, and no byte of the store file or of the next snapshot, that names them or holds their
text; the audit keeps only the sha256 of the id; erasure is idempotent and atomic. An
opted-out user's data never reaches a cycle's training data.

Service level (HF engine, tiny model): EraseUser and SetTrainingOptOut end to end, an
opted-out user is still served, and the table of bad inputs of both RPCs, each refused
with its status while storing nothing.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from loop_helpers import users_in

from common.identity import generate_api_key, hash_api_key
from common.store import (
    NewCompletion,
    NotFoundError,
    Store,
    add_api_key,
    add_completions,
    add_demonstration,
    add_prompt,
    add_ranking,
    add_rating,
    audit,
    erase_user,
    lease_task,
    record_idempotent,
    set_gold_ranking,
    set_train_opt_out,
    user_id_sha256,
)
from common.store.ops import erasure as erasure_ops
from rlhf.v1 import admin_pb2
from trainer.hygiene import HygieneConfig, run_hygiene
from trainer.snapshot_data import StoreRows, prompt_records, read_rows, split_cycle_data

VICTIM = users_in("train", 1, prefix="erin-victim")[0]
OTHER = users_in("train", 1, prefix="olga-other")[0]
LABELER = "lars-labeler"
ADMIN = "ada-admin"
SPARE = "sam-spare"  # erased by the table's request_id row
# Distinctive texts: a byte scan for them cannot match anything else.
VICTIM_PROMPTS = ("zebra umbrella question number one", "quokka lantern question number two")
VICTIM_ANSWER = "narwhal teapot answer"  # completions of the victim's prompts
VICTIM_DEMO = "victim wrote this platypus demonstration"
VICTIM_COMMENT = "victim rated this with an axolotl comment"
OTHER_PROMPT = "how do glaciers move across valleys"
OTHER_ANSWER = "slowly, under their own weight"


def _completions(prompt_id: str, text: str, n: int = 2) -> Any:
    return add_completions(prompt_id, [
        NewCompletion(idx=i, text=f"{text} {i}", policy_version=0, finish_reason="stop", prompt_tokens=4,
                      completion_tokens=4, latency_s=0.1) for i in range(n)])


@dataclass
class Seeded:
    victim_prompts: list[str]
    victim_completions: list[str]
    other_prompt: str
    other_completions: list[str]
    other_ranking: str  # the labeler's ranking of the other user's prompt: must survive


def seed(store: Store) -> Seeded:
    """The victim as a user (2 prompts, ranked, demonstrated and rated by LABELER, one of
    them a gold task) and as a labeler (ranks, demonstrates, rates OTHER's prompt), with a
    task, idempotency records (theirs, and LABELER's leased task naming the victim's
    prompt) and audit rows; OTHER's prompt is a gold task too."""
    for user, role in [(VICTIM, "user"), (VICTIM, "labeler"), (OTHER, "user"), (LABELER, "labeler"), (ADMIN, "admin")]:
        store.write_sync(add_api_key(user, role, hash_api_key(generate_api_key())))  # type: ignore[arg-type]
    victim_prompts, victim_completions = [], []
    for text in VICTIM_PROMPTS:
        prompt = store.write_sync(add_prompt(VICTIM, text, request_id="victim-gen"))
        done = store.write_sync(_completions(prompt.id, VICTIM_ANSWER))
        victim_prompts.append(prompt.id)
        victim_completions += [c.id for c in done]
        store.write_sync(add_ranking(prompt.id, LABELER, [[c.id] for c in done]))  # others rank the victim
        store.write_sync(add_demonstration(prompt.id, LABELER, "the labeler's demonstration"))
        store.write_sync(add_rating(done[0].id, LABELER, 5))
    other = store.write_sync(add_prompt(OTHER, OTHER_PROMPT))
    other_done = store.write_sync(_completions(other.id, OTHER_ANSWER))
    other_ids = [c.id for c in other_done]
    store.write_sync(add_ranking(other.id, VICTIM, [[other_ids[1]], [other_ids[0]]]))  # the victim as labeler
    kept = store.write_sync(add_ranking(other.id, LABELER, [[other_ids[0]], [other_ids[1]]]))
    store.write_sync(add_demonstration(other.id, VICTIM, VICTIM_DEMO))
    store.write_sync(add_rating(other_ids[0], VICTIM, 3, comment=VICTIM_COMMENT))
    store.write_sync(lease_task(other.id, VICTIM, other_ids, 600))
    store.write_sync(set_gold_ranking(victim_prompts[0], [[victim_completions[1]], [victim_completions[0]]], ADMIN))
    store.write_sync(set_gold_ranking(other.id, [[other_ids[0]], [other_ids[1]]], ADMIN))  # stays
    task = store.write_sync(lease_task(victim_prompts[1], LABELER, victim_completions[2:], 600))
    answer = json.dumps({"task_id": task.id, "prompt_id": victim_prompts[1], "prompt_text": VICTIM_PROMPTS[1]})
    store.write_sync(record_idempotent(LABELER, "rlhf.v1.Feedback/NextComparison", "lease-1", "sha", answer.encode()))
    store.write_sync(record_idempotent(VICTIM, "rlhf.v1.Inference/Generate", "victim-gen", "sha", b"answer"))
    store.write_sync(record_idempotent(LABELER, "rlhf.v1.Feedback/SubmitRanking", "rank-1", "sha", kept.id.encode()))
    store.write_sync(audit(VICTIM, "admin.GetStats", {"outcome": f"PERMISSION_DENIED: role 'user' ({VICTIM})"}))
    store.write_sync(audit(ADMIN, "admin.SetTrainingOptOut", {"user_id": VICTIM, "outcome": "OK"}))
    return Seeded(victim_prompts, victim_completions, other.id, other_ids, kept.id)


def every_value(path: Path) -> Iterator[tuple[str, Any]]:
    """(table, value) for every value of every row of every table of the file."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in conn.execute(f"SELECT * FROM {table}"):
                for value in row:
                    yield table, value
    finally:
        conn.close()


def secrets(seeded: Seeded) -> list[str]:
    """What must be gone: the victim's id, texts and row ids."""
    return [VICTIM, *VICTIM_PROMPTS, VICTIM_ANSWER, VICTIM_DEMO, VICTIM_COMMENT,
            *seeded.victim_prompts, *seeded.victim_completions]


def found(path: Path, needles: list[str]) -> list[tuple[str, str]]:
    """(table, needle) for every value of the file that contains a needle."""
    hits = []
    for table, value in every_value(path):
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        hits += [(table, n) for n in needles if n in text]
    return hits


def row_counts(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}
    finally:
        conn.close()


@pytest.fixture
def seeded_store(tmp_path: Path) -> Iterator[tuple[Store, Seeded]]:
    with Store(tmp_path / "store.sqlite") as store:
        yield store, seed(store)


# ---------------------------------------------------------------- the store op


def test_erasure_leaves_no_row_naming_the_user_or_their_text(seeded_store: tuple[Store, Seeded]) -> None:
    store, seeded = seeded_store
    assert {n for _, n in found(store.path, secrets(seeded))} == set(secrets(seeded))  # the scan sees them first
    erasure = store.write_sync(erase_user(VICTIM, erased_by=ADMIN, now=1234.5))
    assert found(store.path, secrets(seeded)) == []
    # Deleted: 2 prompts x 2 completions; rankings: the labeler's 2 of the victim's prompts + the
    # victim's 1; demonstrations 2 + 1; ratings 2 + 1; tasks: the victim's lease and the
    # labeler's lease of the victim's prompt; idempotency: the victim's record and the
    # labeler's lease record that names the victim's prompt; 2 keys, 1 user row; the gold
    # ranking of the victim's prompt (it names erased completions).
    assert erasure.rows_deleted == {"prompts": 2, "completions": 4, "rankings": 3, "demonstrations": 3,
                                    "ratings": 3, "comparison_tasks": 2, "idempotency": 2, "api_keys": 2,
                                    "users": 1, "gold_rankings": 1}
    assert erasure.audit_rows_pseudonymised == 2
    # The other user's data and the labeler's ranking of it stay, with its idempotency record.
    with sqlite3.connect(store.path) as conn:
        other = conn.execute("SELECT COUNT(*) FROM completions WHERE prompt_id = ?", [seeded.other_prompt]).fetchone()
        assert other == (2,)
        assert conn.execute("SELECT id FROM rankings").fetchall() == [(seeded.other_ranking,)]
        assert conn.execute("SELECT request_id FROM idempotency").fetchall() == [("rank-1",)]
        assert conn.execute("SELECT prompt_id FROM gold_rankings").fetchall() == [(seeded.other_prompt,)]
        audit_rows = conn.execute("SELECT user_id, action, detail_json FROM audit ORDER BY id").fetchall()
    pseudonym = "sha256:" + hashlib.sha256(VICTIM.encode()).hexdigest()
    assert audit_rows[0][0] == pseudonym and pseudonym in audit_rows[0][2]
    assert json.loads(audit_rows[1][2])["user_id"] == pseudonym
    who, action, detail = audit_rows[-1]
    assert (who, action) == (ADMIN, "user.erased")
    assert json.loads(detail) == {"user_id_sha256": user_id_sha256(VICTIM), "erased_by": ADMIN,
                                  "rows_deleted": erasure.rows_deleted, "audit_rows_pseudonymised": 2}


def test_erasing_an_operator_removes_the_gold_rankings_they_set(seeded_store: tuple[Store, Seeded]) -> None:
    store, seeded = seeded_store  # ADMIN set both gold rankings (seed)
    erasure = store.write_sync(erase_user(ADMIN, erased_by="another-admin"))
    assert erasure.rows_deleted["gold_rankings"] == 2
    assert found(store.path, [ADMIN]) == []


def test_the_store_file_and_the_next_snapshot_hold_none_of_it(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    with Store(path) as store:
        seeded = seed(store)
        store.write_sync(erase_user(VICTIM, erased_by=ADMIN))
        snapshot = store.snapshot(tmp_path / "snapshot.sqlite")
    with Store.open_readonly(snapshot) as snap:
        rows: StoreRows = snap.read_sync(read_rows)
    assert [p.id for p in rows.prompts] == [seeded.other_prompt]
    assert [r.labeler_id for r in rows.rankings] == [LABELER]
    assert rows.demonstrations == [] and set(rows.completions) == set(seeded.other_completions)
    # Not a byte of it in the snapshot, nor in the store file once closed (its WAL folded in):
    # deleted rows' pages were zeroed (secure_delete), not left readable.
    needles = [s.encode() for s in secrets(seeded)]
    for file in (snapshot, path):
        content = file.read_bytes()
        assert [n for n in needles if n in content] == [], file


def test_erasure_is_idempotent(seeded_store: tuple[Store, Seeded]) -> None:
    store, _ = seeded_store
    first = store.write_sync(erase_user(VICTIM, erased_by=ADMIN))
    counts = row_counts(store.path)
    again = store.write_sync(erase_user(VICTIM, erased_by="another-admin"))
    assert again == first  # the first erasure's answer, not an empty one
    assert row_counts(store.path) == counts  # and nothing written
    with pytest.raises(NotFoundError, match="never erased"):
        store.write_sync(erase_user("nobody-ever", erased_by=ADMIN))


def test_an_erasure_that_fails_midway_erases_nothing(seeded_store: tuple[Store, Seeded],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store, seeded = seeded_store
    before = row_counts(store.path)

    def fail(*args: Any) -> int:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(erasure_ops, "_pseudonymise_audit", fail)  # after every DELETE ran
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.write_sync(erase_user(VICTIM, erased_by=ADMIN))
    assert row_counts(store.path) == before
    assert {n for _, n in found(store.path, secrets(seeded))} == set(secrets(seeded))


# ---------------------------------------------------------------- opt-out in the trainer


def cycle_texts(rows: StoreRows) -> dict[str, set[str]]:
    """The prompt texts a cycle would train and evaluate on, by use."""
    kept, _ = run_hygiene(prompt_records(rows.prompts), HygieneConfig())
    data = split_cycle_data(rows, kept, since=0.0, until=float("inf"), max_ppo_prompts=100,
                            ppo_sources=["traffic"], eval_splits=["val"], max_eval_prompts=None)
    last_turn = lambda messages: messages[-1]["content"]  # noqa: E731
    return {
        "ppo": {last_turn(p.messages) for p in data.ppo_prompts},
        "comparisons": {last_turn(c.messages) for cs in data.comparisons.values() for c in cs},
        "demonstrations": {d.response for ds in data.demonstrations.values() for d in ds},
    }


def test_opt_out_keeps_a_users_data_out_of_training(seeded_store: tuple[Store, Seeded], tmp_path: Path) -> None:
    store, _ = seeded_store

    def next_cycle() -> dict[str, set[str]]:
        with Store.open_readonly(store.snapshot(tmp_path / "snapshot.sqlite")) as snap:
            return cycle_texts(snap.read_sync(read_rows))

    trained = next_cycle()  # before: the victim's prompts train PPO and the RM, its demonstration SFT
    assert set(VICTIM_PROMPTS) <= trained["ppo"] and set(VICTIM_PROMPTS) <= trained["comparisons"]
    assert VICTIM_DEMO in trained["demonstrations"]
    assert store.write_sync(set_train_opt_out(VICTIM, True)) is True
    assert store.write_sync(set_train_opt_out(VICTIM, True)) is False  # already so
    opted = next_cycle()
    assert opted["ppo"] == {OTHER_PROMPT}
    # The other user's prompt still trains the RM, ranked by the labeler, not by the victim.
    assert opted["comparisons"] == {OTHER_PROMPT} and opted["demonstrations"] == set()
    with Store.open_readonly(tmp_path / "snapshot.sqlite") as snap:
        rows = snap.read_sync(read_rows)
    assert rows.opted_out == {VICTIM} and {r.labeler_id for r in rows.rankings} == {LABELER}
    store.write_sync(set_train_opt_out(VICTIM, False))
    assert next_cycle() == trained  # --undo: trained on again
    with pytest.raises(NotFoundError):
        store.write_sync(set_train_opt_out("nobody-ever", True))


# ---------------------------------------------------------------- the service


@dataclass
class Env:
    target: str
    store_path: Path
    keys: dict[str, str]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Env]:
    from server_harness import ServerThread, create_key, server_config

    config = server_config(tmp_path_factory.mktemp("erasure"), tiny_model_dir)
    keys = {who: create_key(config.store_path, role, who)[0]
            for who, role in [(ADMIN, "admin"), (OTHER, "user"), (LABELER, "labeler"), (VICTIM, "user"),
                              (SPARE, "user")]}
    with ServerThread(config) as server:
        yield Env(server.target, config.store_path, keys)


def client(env: Env, who: str | None) -> Any:
    from clients.client import RlhfClient

    return RlhfClient(env.target, env.keys[who] if who else "")


def test_opted_out_user_is_served_but_never_trained_on(env: Env, tmp_path: Path) -> None:
    with client(env, OTHER) as other:
        reply = other.set_training_opt_out(OTHER, True, request_id="opt-1")
        assert (reply.train_opt_out, reply.changed) == (True, True)
        assert other.set_training_opt_out(OTHER, True, request_id="opt-1") == reply  # a retry replays
        served = other.generate("Which way do rivers flow?", max_new_tokens=4)
    assert served.completions and served.completions[0].text is not None
    with Store.open_readonly(env.store_path) as live:
        snapshot = live.snapshot(tmp_path / "snapshot.sqlite")
        logged = live.read_sync(lambda db: db.execute("SELECT COUNT(*) FROM prompts WHERE id = ?",
                                                      [served.prompt_id]).fetchone()[0])
    assert logged == 1  # logged as usual...
    with Store.open_readonly(snapshot) as snap:
        rows = snap.read_sync(read_rows)
    assert served.prompt_id not in {p.id for p in rows.prompts}  # ...but no cycle reads it
    with client(env, ADMIN) as admin:  # an admin clears it for them
        assert admin.set_training_opt_out(OTHER, False).changed is True


def test_erase_user_over_the_service(env: Env) -> None:
    with client(env, VICTIM) as victim:
        victim.generate("my secret pelican prompt", max_new_tokens=4)
    with client(env, ADMIN) as admin:
        first = admin.erase_user(VICTIM, request_id="erase-1")
        assert admin.erase_user(VICTIM, request_id="erase-1") == first  # a retry replays
        assert admin.erase_user(VICTIM, request_id="erase-2") == first  # a second call answers the same
    assert first.user_id_sha256 == user_id_sha256(VICTIM)
    assert (first.rows_deleted["prompts"], first.rows_deleted["api_keys"], first.rows_deleted["users"]) == (1, 1, 1)
    assert first.rows_deleted["completions"] >= 1 and first.erased_at.seconds > 0
    assert found(env.store_path, [VICTIM, "my secret pelican prompt"]) == []
    with client(env, VICTIM) as victim, pytest.raises(grpc.RpcError) as gone:
        victim.generate("still here?", max_new_tokens=4)
    assert gone.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the key went with the user


# ---------------------------------------------------------------- the table of bad inputs


@dataclass(frozen=True)
class BadInput:
    name: str
    request: Any  # EraseUserRequest or SetTrainingOptOutRequest
    who: str | None  # the caller (None: no key)
    code: grpc.StatusCode
    message: str  # a substring of the status details
    first: Any = None  # a request sent first (and answered OK), e.g. to use a request_id


INVALID, DENIED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED
_erase, _opt = admin_pb2.EraseUserRequest, admin_pb2.SetTrainingOptOutRequest
BAD_INPUTS = [
    BadInput("erase: empty user_id", _erase(), ADMIN, INVALID, "user_id is empty"),
    BadInput("erase: unknown user", _erase(user_id="nobody-ever"), ADMIN, grpc.StatusCode.NOT_FOUND,
             "'nobody-ever' not found"),
    BadInput("erase: an admin erasing itself", _erase(user_id=ADMIN), ADMIN, INVALID, "cannot erase itself"),
    BadInput("erase: user key", _erase(user_id=OTHER), OTHER, DENIED, "needs role 'admin'"),
    BadInput("erase: labeler key", _erase(user_id=OTHER), LABELER, DENIED, "needs role 'admin'"),
    BadInput("erase: no key", _erase(user_id=OTHER), None, grpc.StatusCode.UNAUTHENTICATED, "missing API key"),
    BadInput("erase: request_id reused for another user", _erase(user_id=OTHER, request_id="erase-reuse"), ADMIN,
             grpc.StatusCode.ALREADY_EXISTS, "already used", first=_erase(user_id=SPARE, request_id="erase-reuse")),
    BadInput("opt-out: empty user_id", _opt(train_opt_out=True), OTHER, INVALID, "user_id is empty"),
    BadInput("opt-out: a user on another user", _opt(user_id=LABELER, train_opt_out=True), OTHER, DENIED,
             "may set only its own training opt-out"),
    BadInput("opt-out: a labeler on another user", _opt(user_id=OTHER, train_opt_out=True), LABELER, DENIED,
             "may set only its own training opt-out"),
    BadInput("opt-out: admin on an unknown user", _opt(user_id="nobody-ever", train_opt_out=True), ADMIN,
             grpc.StatusCode.NOT_FOUND, "'nobody-ever' not found"),
    BadInput("opt-out: no key", _opt(user_id=OTHER, train_opt_out=True), None, grpc.StatusCode.UNAUTHENTICATED,
             "missing API key"),
    BadInput("opt-out: request_id reused with another setting", _opt(user_id=OTHER, train_opt_out=True,
             request_id="opt-same"), OTHER, grpc.StatusCode.ALREADY_EXISTS, "already used",
             first=_opt(user_id=OTHER, train_opt_out=False, request_id="opt-same")),
]


def _send(env: Env, who: str | None, request: Any) -> Any:
    with client(env, who) as c:
        if isinstance(request, admin_pb2.EraseUserRequest):
            return c.admin.EraseUser(request, metadata=c.metadata, timeout=60)
        return c.admin.SetTrainingOptOut(request, metadata=c.metadata, timeout=60)


def stored_state(path: Path) -> list[tuple[str, Any]]:
    """Every value of every table but the audit (refusals are audited by design) and the
    audit's id counter."""
    return sorted((t, repr(v)) for t, v in every_value(path) if t not in ("audit", "sqlite_sequence"))


@pytest.mark.parametrize("row", BAD_INPUTS, ids=[r.name for r in BAD_INPUTS])
def test_bad_input_is_refused_with_its_status_storing_nothing(env: Env, row: BadInput) -> None:
    if row.first is not None:
        _send(env, row.who, row.first)
    before = stored_state(env.store_path)
    with pytest.raises(grpc.RpcError) as caught:
        _send(env, row.who, row.request)
    assert caught.value.code() == row.code, caught.value.details()
    assert row.message in caught.value.details()
    assert stored_state(env.store_path) == before


# ---------------------------------------------------------------- command-line tools


def test_keys_cli_sets_and_shows_the_opt_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from server import keys_cli

    store = str(tmp_path / "store.sqlite")
    assert keys_cli.main(["--store", store, "create", "--role", "user", "--user", "uma"]) == 0
    assert keys_cli.main(["--store", store, "opt-out", "uma"]) == 0
    assert "uma: opted out of training" in capsys.readouterr().out
    assert keys_cli.main(["--store", store, "list"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert row.split()[header.split().index("opt_out")] == "yes"
    assert keys_cli.main(["--store", store, "opt-out", "uma", "--undo"]) == 0
    assert keys_cli.main(["--store", store, "list"]) == 0
    header, row = capsys.readouterr().out.splitlines()[-2:]
    assert row.split()[header.split().index("opt_out")] == "no"
    assert keys_cli.main(["--store", store, "opt-out", "nobody-ever"]) == 1
    assert "no user 'nobody-ever'" in capsys.readouterr().err


def test_users_cli_erases_over_the_service(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    from clients import admin_cli

    flags = ["--target", env.target, "--key", env.keys[ADMIN]]
    with pytest.raises(SystemExit):  # irreversible: --yes is required
        admin_cli.users_main(["erase", LABELER, *flags])
    assert found(env.store_path, [LABELER]) != []
    assert admin_cli.users_main(["erase", LABELER, "--yes", *flags]) == 0
    assert f"erased user sha256:{user_id_sha256(LABELER)}" in capsys.readouterr().out
    assert found(env.store_path, [LABELER]) == []
    assert admin_cli.users_main(["erase", "nobody-ever", "--yes", *flags]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
