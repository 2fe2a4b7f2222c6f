"""Tests of common/store: schema migrations, the group-commit writer and its durability,
snapshots, and the domain operations. Every test uses a real SQLite file in tmp_path."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlite_utils import Database
from store_reads import completions_of

from common.identity import hash_api_key
from common.store import (
    LATEST_VERSION,
    MIGRATIONS,
    ConflictError,
    InvalidArgumentError,
    Mutation,
    NewCompletion,
    NotFoundError,
    NotYourTaskError,
    SchemaError,
    SchemaTooNewError,
    Store,
    StoreClosedError,
    StoreError,
    TaskClosedError,
    WriterStats,
    add_api_key,
    add_completions,
    add_demonstration,
    add_policy,
    add_prompt,
    add_ranking,
    add_rating,
    add_user,
    audit,
    claim_queued_cycle,
    commit_mutation,
    create_cycle,
    expire_tasks,
    fail_stale_cycles,
    find_key_by_hash,
    get_cycle,
    get_prompt,
    get_task,
    lease_task,
    list_audit,
    list_cycles,
    list_keys,
    list_policies,
    lookup_idempotent,
    migrate,
    previous_serving_policy,
    record_idempotent,
    replay_mutation,
    revoke_key,
    run_mutation,
    serving_policy,
    set_policy_status,
    stats,
    update_cycle,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
ALL_TABLES = {
    "users", "api_keys", "prompts", "completions", "comparison_tasks", "rankings",
    "demonstrations", "ratings", "policies", "cycles", "idempotency", "audit", "gold_rankings",
}  # fmt: skip


# ---------------------------------------------------------------- helpers


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "store.db") as s:
        yield s


def sample(idx: int, text: str | None = None, version: int = 0) -> NewCompletion:
    return NewCompletion(
        idx=idx, text=text if text is not None else f"completion {idx}", policy_version=version,
        finish_reason="stop", prompt_tokens=5, completion_tokens=3, latency_s=0.25,
        sampling={"temperature": 1.0},
    )  # fmt: skip


def log_generation(user_id: str, text: str, n: int) -> Any:
    """One op: a prompt and its n completions, each completion text '<prompt>/<idx>'."""

    def op(db: Database) -> str:
        prompt = add_prompt(user_id, text)(db)
        add_completions(prompt.id, [sample(i, f"{text}/{i}") for i in range(n)])(db)
        return prompt.id

    return op


def table_names(db: Database) -> set[str]:
    return {t for t in db.table_names() if not t.startswith("sqlite_")}


def count(store: Store, table: str) -> int:
    return store.read_sync(lambda db: db.table(table).count)


def raw_db(path: Path) -> Database:
    return Database(sqlite3.connect(path, isolation_level=None), execute_plugins=False)


# ---------------------------------------------------------------- migrations


def test_new_file_is_created_at_the_latest_version_in_wal_mode(tmp_path: Path) -> None:
    with Store(tmp_path / "new.db"):
        pass
    db = raw_db(tmp_path / "new.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION == len(MIGRATIONS)
    assert table_names(db) == ALL_TABLES
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert "heartbeat_at" in db.table("cycles").columns_dict
    assert "task_id" in db.table("rankings").columns_dict


def _seed_old_store(db: Database, version: int) -> None:
    """Rows that the schema at `version` can hold, written with plain SQL of that time."""
    sql = db.conn.execute
    sql("INSERT INTO users (id, created_at, labeler_group) VALUES ('u1', 1.0, NULL)")  # later versions add columns
    sql("INSERT INTO api_keys VALUES ('k1', 'hash1', 'u1', 'admin', NULL, 1.0, NULL, 'ops')")
    sql(
        "INSERT INTO prompts VALUES "
        "('p1', 'u1', 'Hi', NULL, 'traffic', 'train', 'hi', 0, NULL, NULL, 2.0)"
    )
    for i in range(2):
        sql(f"INSERT INTO completions (id, prompt_id, idx, policy_version, text, finish_reason, prompt_tokens, "
            f"completion_tokens, sampling_json, latency_s, ttft_s, purpose, created_at) VALUES ('c{i}', 'p1', {i}, 0, "
            f"'out{i}', 'stop', 2, 3, '{{}}', 0.5, NULL, 'label', 3.0)")  # fmt: skip
    sql(
        "INSERT INTO rankings (id, prompt_id, labeler_id, labeler_group, ranking_json, k, source,"
        " created_at) VALUES ('r1', 'p1', 'lab', 'g1', '[[\"c1\"],[\"c0\"]]', 2, 'label', 4.0)"
    )
    sql("INSERT INTO demonstrations VALUES ('d1', 'p1', 'lab', 'g1', 'Hello!', 'label', 4.0)")
    sql("INSERT INTO ratings VALUES ('t1', 'c0', 'lab', 'g1', 6, '{}', '', 4.0)")
    sql("INSERT INTO policies VALUES (0, '/ckpt/v0', NULL, 'serving', 1.0, NULL, '{}', 1.0)")
    # Two running cycles, as an old trainer could leave behind after a crash (from v3 on the
    # schema refuses that: the store then holds what v3's step left).
    states = ("running", "running", "queued") if version < 3 else ("failed", "running", "queued")
    for state in states:
        sql(
            "INSERT INTO cycles (state, trigger, created_at, started_at, error) "
            "VALUES (?, 'cli', 5.0, 5.0, ?)",
            [state, "superseded: seeded as v3 left it" if version >= 3 and state == "failed" else None],
        )
    if version >= 2:
        sql(
            "INSERT INTO comparison_tasks VALUES ('task1', 'p1', 'lab', 2, '[\"c0\",\"c1\"]',"
            " 'submitted', 6.0, 66.0)"
        )
        sql("UPDATE rankings SET task_id = 'task1' WHERE id = 'r1'")
        sql("INSERT INTO idempotency VALUES ('u1', 'SubmitRanking', 'req1', 'sha', x'0102', 6.0)")
        sql("INSERT INTO audit (at, user_id, action, detail_json) VALUES (6.0, 'u1', 'swap', '{}')")


@pytest.mark.parametrize("old_version", range(1, LATEST_VERSION))
def test_each_older_version_migrates_forward_keeping_rows(tmp_path: Path, old_version: int) -> None:
    path = tmp_path / "old.db"
    old = raw_db(path)
    assert migrate(old, target=old_version) == old_version  # the old steps build the old schema
    _seed_old_store(old, old_version)
    old_tables = table_names(old)
    old.close()

    with Store(path) as store:
        db_version = store.read_sync(lambda db: db.execute("PRAGMA user_version").fetchone()[0])
        assert db_version == LATEST_VERSION
        assert store.read_sync(table_names) == ALL_TABLES >= old_tables
        cycle_columns = store.read_sync(lambda db: set(db.table("cycles").columns_dict))
        assert {"heartbeat_at", "owner_pid"} <= cycle_columns  # added by v3
        assert store.read_sync(completions_of("p1"))[0].has_pii is False  # added by v4, default 0
        opt_out = store.read_sync(lambda db: db.execute("SELECT train_opt_out FROM users WHERE id = 'u1'").fetchone())
        assert opt_out[0] == 0
        prompt = store.read_sync(get_prompt("p1"))
        assert prompt is not None and prompt.text == "Hi" and prompt.split == "train"
        assert [c.text for c in store.read_sync(completions_of("p1"))] == ["out0", "out1"]
        ranking = store.read_sync(lambda db: db.table("rankings").get("r1"))
        assert ranking["ranking_json"] == '[["c1"],["c0"]]'
        assert ranking["task_id"] == ("task1" if old_version >= 2 else None)
        assert store.read_sync(serving_policy()).version == 0
        key = store.read_sync(find_key_by_hash("hash1"))
        assert key is not None and key.identity().role == "admin"
        # v3 keeps only the newest running cycle and fails the other one.
        cycles = {c.id: c for c in store.read_sync(list_cycles(limit=0))}
        assert [cycles[i].state for i in (1, 2, 3)] == ["failed", "running", "queued"]
        assert "superseded" in (cycles[1].error or "")
        assert store.write_sync(claim_queued_cycle()) is None  # cycle 2 still runs
        if old_version >= 2:
            assert (
                store.read_sync(lookup_idempotent("u1", "SubmitRanking", "req1")).response
                == b"\x01\x02"
            )
            assert store.read_sync(list_audit())[0].action == "swap"
        s = store.read_sync(stats())
        assert (s.users, s.prompts, s.completions, s.rankings, s.demonstrations, s.ratings) == (
            1, 1, 2, 1, 1, 1,
        )  # fmt: skip
        assert store.read_sync(lambda db: db.execute("PRAGMA foreign_key_check").fetchall()) == []
        if old_version >= 2:  # v6 rebuilt comparison_tasks: the row, and the ranking's reference to it, stay
            task = store.read_sync(get_task("task1"))
            assert (task.status, task.completion_ids, task.expires_at) == ("submitted", ["c0", "c1"], 66.0)
            assert (task.shown_at, task.decline_reason, task.decline_comment) == (None, None, "")


def _seed_v5_queue(db: Database) -> None:
    """Tasks in each status a v5 store knows, two answered by rankings, plus the rows they name."""
    sql = db.conn.execute
    sql("INSERT INTO prompts VALUES ('p1', 'u1', 'Hi', NULL, 'traffic', 'train', 'hi', 0, NULL, NULL, 2.0)")
    for i in range(4):
        sql(f"INSERT INTO completions (id, prompt_id, idx, policy_version, text, finish_reason, prompt_tokens, "
            f"completion_tokens, latency_s, purpose, created_at) VALUES ('c{i}', 'p1', {i}, 0, 'out', 'stop', 2, 3, "
            "0.5, 'label', 3.0)")  # fmt: skip
    ids = '["c0","c1","c2","c3"]'
    for task, status in [("t-leased", "leased"), ("t-done1", "submitted"), ("t-done2", "submitted"),
                         ("t-expired", "expired")]:  # fmt: skip
        sql("INSERT INTO comparison_tasks VALUES (?, 'p1', 'lab', 4, ?, ?, 6.0, 66.0)", [task, ids, status])
    for ranking, task in [("r1", "t-done1"), ("r2", "t-done2")]:
        sql("INSERT INTO rankings (id, prompt_id, labeler_id, ranking_json, k, source, created_at, task_id) "
            "VALUES (?, 'p1', 'lab', '[[\"c0\"],[\"c1\",\"c2\",\"c3\"]]', 4, 'label', 7.0, ?)", [ranking, task])


def test_v6_rebuilds_comparison_tasks_keeping_rows_indexes_and_the_rankings_reference(tmp_path: Path) -> None:
    path = tmp_path / "v5.db"
    old = raw_db(path)
    migrate(old, target=5)
    _seed_v5_queue(old)
    old_indexes = {r[0] for r in old.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'comparison_tasks' AND sql IS NOT NULL")}
    old.close()
    with Store(path) as store:
        tasks = {t: store.read_sync(get_task(t)) for t in ("t-leased", "t-done1", "t-done2", "t-expired")}
        assert {t: task.status for t, task in tasks.items()} == {
            "t-leased": "leased", "t-done1": "submitted", "t-done2": "submitted", "t-expired": "expired"}
        assert all(task.completion_ids == ["c0", "c1", "c2", "c3"] and task.shown_at is None for task in tasks.values())
        indexes = store.read_sync(lambda db: {r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'comparison_tasks' AND sql IS NOT NULL")})
        assert indexes == old_indexes == {"comparison_tasks_by_status", "comparison_tasks_by_labeler",
                                          "comparison_tasks_by_prompt"}
        rankings_sql = store.read_sync(lambda db: db.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'rankings'").fetchone()[0])
        assert "REFERENCES comparison_tasks(id)" in rankings_sql  # not the v6 build table's name
        assert "comparison_tasks_v6" not in store.read_sync(table_names)
        # The reference is enforced against the rebuilt table...
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            store.write_sync(lambda db: db.execute("UPDATE rankings SET task_id = 'no-such-task' WHERE id = 'r1'"))
        # ...and its new CHECKs: 'declined' needs a reason, a reason needs 'declined'.
        store.write_sync(lambda db: db.execute(
            "UPDATE comparison_tasks SET status = 'declined', decline_reason = 'skipped' WHERE id = 't-leased'"))
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            store.write_sync(lambda db: db.execute("UPDATE comparison_tasks SET status = 'declined' WHERE id = 't-expired'"))
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            store.write_sync(lambda db: db.execute(
                "UPDATE comparison_tasks SET decline_reason = 'bored' WHERE id = 't-leased'"))
    raw = raw_db(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    assert raw.execute("PRAGMA foreign_key_check").fetchall() == []


def test_a_migration_step_that_breaks_a_reference_is_refused(tmp_path: Path) -> None:
    """Foreign keys are off while a step runs (a table rebuild needs that), so the step's
    result is checked before it commits."""
    db = raw_db(tmp_path / "s.db")
    migrate(db, target=5)
    _seed_v5_queue(db)

    def drops_the_tasks(db: Database) -> None:
        db.execute("DELETE FROM comparison_tasks")

    with pytest.raises(SchemaError, match="reference is missing"):
        migrate(db, migrations=(*MIGRATIONS[:5], drops_the_tasks))
    assert db.execute("PRAGMA user_version").fetchone()[0] == 5
    assert db.execute("SELECT COUNT(*) FROM comparison_tasks").fetchone()[0] == 4  # rolled back


def test_a_failing_migration_step_leaves_the_previous_version(tmp_path: Path) -> None:
    def broken_step(db: Database) -> None:
        db.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("step failed midway")

    db = raw_db(tmp_path / "s.db")
    with pytest.raises(RuntimeError, match="midway"):
        migrate(db, migrations=(MIGRATIONS[0], broken_step))
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "half_done" not in table_names(db)  # the step's transaction was rolled back
    assert "users" in table_names(db)


def test_a_file_from_newer_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with Store(path):
        pass
    raw = raw_db(path)
    raw.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    raw.close()
    with pytest.raises(
        SchemaTooNewError, match=rf"version {LATEST_VERSION + 1}.*up to {LATEST_VERSION}"
    ):
        Store(path)
    with pytest.raises(SchemaTooNewError):
        Store.open_readonly(path)
    assert raw_db(path).execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION + 1


# ---------------------------------------------------------------- the writer


def _check_generations(store: Store, expected_texts: set[str], n: int) -> None:
    """Every prompt is there once, with exactly its n completions, no more, no less."""
    rows = store.read_sync(
        lambda db: list(
            db.query(
                "SELECT p.text AS prompt, c.text AS completion, c.idx, c.prompt_tokens, "
                "c.sampling_json FROM prompts p JOIN completions c ON c.prompt_id = p.id"
            )
        )
    )
    assert count(store, "prompts") == len(expected_texts)
    assert len(rows) == n * len(expected_texts)
    assert {r["prompt"] for r in rows} == expected_texts
    assert all(r["completion"] == f"{r['prompt']}/{r['idx']}" for r in rows)
    assert all(
        r["prompt_tokens"] == 5 and r["sampling_json"] == '{"temperature":1.0}' for r in rows
    )


def test_8_threads_writing_concurrently_lose_nothing(store: Store) -> None:
    def writer(t: int) -> None:
        for i in range(250):
            store.write_sync(log_generation(f"user-{t}", f"t{t}-{i}", n=1))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _check_generations(store, {f"t{t}-{i}" for t in range(8) for i in range(250)}, n=1)
    assert store.writer_stats().ops_committed == 2000


def test_many_async_tasks_lose_nothing(store: Store) -> None:
    async def main() -> list[str]:
        return await asyncio.gather(
            *(store.write(log_generation(f"user-{i % 17}", f"a{i}", n=2)) for i in range(1500))
        )

    prompt_ids = asyncio.run(main())
    assert len(set(prompt_ids)) == 1500
    _check_generations(store, {f"a{i}" for i in range(1500)}, n=2)


def _block_writer(store: Store) -> threading.Event:
    """Occupy the writer thread until the returned event is set, so that everything
    submitted meanwhile lands in ONE following batch."""
    started, release = threading.Event(), threading.Event()

    def blocker(db: Database) -> None:
        started.set()
        release.wait(60)

    store.submit(blocker)
    assert started.wait(60)
    return release


def test_queued_writes_commit_in_batches_of_at_most_max_batch(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db", max_batch=16) as store:
        release = _block_writer(store)
        futures = [store.submit(add_user(f"user-{i}")) for i in range(100)]
        release.set()
        assert [f.result(60).id for f in futures] == [f"user-{i}" for i in range(100)]
        # The blocker's batch, then 100 queued ops drained 16 at a time: 1 + ceil(100 / 16).
        assert store.writer_stats() == WriterStats(
            batches=8, ops_committed=101, ops_failed=0, largest_batch=16
        )


def test_a_failing_op_fails_only_its_own_awaitable(store: Store) -> None:
    def half_then_raise(db: Database) -> None:
        add_prompt("u", "half", prompt_id="p-half")(db)
        raise RuntimeError("boom after a write")

    async def main() -> list[Any]:
        release = _block_writer(store)
        tasks = [
            asyncio.ensure_future(store.write(op))
            for op in (
                add_prompt("u", "first", prompt_id="p-a"),
                add_prompt("u", "duplicate id", prompt_id="p-a"),  # PRIMARY KEY violation
                add_completions("no-such-prompt", [sample(0)]),  # FOREIGN KEY violation
                half_then_raise,  # wrote a row, then raised: that row must go
                add_prompt("u", "last", prompt_id="p-e"),
            )
        ]
        await asyncio.sleep(0)  # let every write reach the queue
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    before = store.writer_stats()
    ok_a, dup, orphan, half, ok_e = asyncio.run(main())
    assert ok_a.text == "first" and ok_e.text == "last"
    assert isinstance(dup, sqlite3.IntegrityError) and "UNIQUE" in str(dup)
    assert isinstance(orphan, sqlite3.IntegrityError) and "FOREIGN KEY" in str(orphan)
    assert isinstance(half, RuntimeError)
    after = store.writer_stats()
    assert after.batches == before.batches + 2  # the blocker's batch, then all five together
    assert after.largest_batch >= 5
    assert (after.ops_committed - before.ops_committed, after.ops_failed - before.ops_failed) == (
        3,
        3,
    )
    assert store.read_sync(get_prompt("p-a")).text == "first"
    assert store.read_sync(get_prompt("p-e")) is not None
    assert store.read_sync(get_prompt("p-half")) is None
    assert count(store, "completions") == 0


def test_a_write_cancelled_before_the_writer_runs_it_never_happens(store: Store) -> None:
    async def main() -> None:
        release = _block_writer(store)
        task = asyncio.ensure_future(store.write(add_prompt("u", "cancelled", prompt_id="p-x")))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # by now the cancel has reached the queued request
        release.set()
        await store.write(add_prompt("u", "after", prompt_id="p-y"))  # the writer goes on

    asyncio.run(main())
    assert store.read_sync(get_prompt("p-x")) is None
    assert store.read_sync(get_prompt("p-y")) is not None


def test_a_batch_wakes_its_awaiting_writers_with_one_callback_after_commit(store: Store) -> None:
    seen_committed: list[bool] = []

    async def write_and_check(i: int) -> str:
        prompt = await store.write(add_prompt("u", f"batched {i}", prompt_id=f"p-{i}"))
        # Acknowledge-after-commit: another connection already sees the row.
        with sqlite3.connect(store.path) as other:
            seen_committed.append(other.execute("SELECT 1 FROM prompts WHERE id = ?", [prompt.id]).fetchone() is not None)
        return prompt.id

    async def main() -> tuple[list[Any], int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return call_soon_threadsafe(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        release = _block_writer(store)
        tasks = [asyncio.ensure_future(write_and_check(i)) for i in range(20)]
        tasks.append(asyncio.ensure_future(store.write(add_prompt("u", "dup", prompt_id="p-0"))))
        await asyncio.sleep(0)  # every write is queued behind the blocker
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True), wakeups

    before = store.writer_stats()
    results, wakeups = asyncio.run(main())
    assert results[:20] == [f"p-{i}" for i in range(20)]
    assert isinstance(results[20], sqlite3.IntegrityError)  # failed alone, woken with the rest
    assert seen_committed == [True] * 20
    assert store.writer_stats().batches == before.batches + 2  # the blocker's, then one of 21
    assert wakeups == 1


def test_writers_on_two_event_loops_in_one_batch_are_each_woken(store: Store) -> None:
    before = store.writer_stats()
    release = _block_writer(store)
    queued = threading.Barrier(3)
    results: dict[str, Any] = {}

    def loop_thread(name: str) -> None:
        async def main() -> str:
            task = asyncio.ensure_future(store.write(add_prompt("u", name, prompt_id=name)))
            await asyncio.sleep(0)
            queued.wait(60)
            return (await task).id

        results[name] = asyncio.run(main())

    threads = [threading.Thread(target=loop_thread, args=(name,)) for name in ("p-left", "p-right")]
    for thread in threads:
        thread.start()
    queued.wait(60)
    release.set()
    for thread in threads:
        thread.join(60)
    assert results == {"p-left": "p-left", "p-right": "p-right"}
    assert store.writer_stats().batches == before.batches + 2  # the blocker's, then both writes


def test_a_write_whose_event_loop_closed_still_commits_and_the_writer_goes_on(store: Store) -> None:
    release = _block_writer(store)
    loop = asyncio.new_event_loop()
    task = loop.create_task(store.write(add_prompt("u", "orphan", prompt_id="p-orphan")))
    loop.run_until_complete(asyncio.sleep(0))  # queued behind the blocker
    loop.close()  # nobody will ever await it now (the task stays pending)
    task._log_destroy_pending = False  # pending on purpose: no "Task was destroyed" warning at exit
    release.set()
    assert store.write_sync(add_prompt("u", "next", prompt_id="p-next"), timeout=60).id == "p-next"
    assert store.read_sync(get_prompt("p-orphan")) is not None
    assert not task.done()


def test_an_op_that_ends_the_transaction_itself_is_not_acknowledged(store: Store) -> None:
    release = _block_writer(store)
    fine = store.submit(add_prompt("u", "before the rogue op"))
    rogue = store.submit(lambda db: db.conn.execute("ROLLBACK"))
    later = store.submit(add_prompt("u", "after the rogue op", prompt_id="p-later"))
    release.set()
    # The rogue ROLLBACK discarded `fine`'s row: it must not be reported as written.
    for future in (fine, rogue):
        with pytest.raises(StoreError, match="ended the batch transaction"):
            future.result(60)
    assert later.result(60).id == "p-later"
    assert store.read_sync(get_prompt("p-later")) is not None


def test_ops_must_not_return_generators_or_nest_write_sync(store: Store) -> None:
    with pytest.raises(TypeError, match="generator"):
        store.write_sync(lambda db: db.query("SELECT 1"))
    with pytest.raises(StoreError, match="inside a write op"):
        store.write_sync(lambda db: store.write_sync(add_user()))
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store.read_sync(add_user())  # read connections are query_only
    assert count(store, "users") == 0


def test_a_writer_whose_connection_breaks_fails_writes_instead_of_hanging(store: Store) -> None:
    with pytest.raises(sqlite3.ProgrammingError):
        store.write_sync(lambda db: db.conn.close(), timeout=60)
    with pytest.raises(StoreClosedError):
        store.write_sync(add_user(), timeout=60)
    store.close()  # returns: the writer thread has ended


def test_close_commits_what_was_queued_then_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    futures = [store.submit(add_user(f"user-{i}")) for i in range(200)]
    store.close()
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(StoreClosedError):
        store.submit(add_user())
    with pytest.raises(StoreClosedError):
        store.read_sync(stats())
    store.close()  # idempotent
    with Store(path) as reopened:
        assert count(reopened, "users") == 200


# ---------------------------------------------------------------- crashes

CRASH_CHILD = r"""
import asyncio, os, sys, time
from common.store import NewCompletion, Store, add_completions, add_prompt

path, mode = sys.argv[1], sys.argv[2]
store = Store(path)

def sample(i, text):
    return NewCompletion(idx=i, text=text, policy_version=0, finish_reason="stop",
                         prompt_tokens=5, completion_tokens=3, latency_s=0.1)

def committed_generation(db):
    add_prompt("crash-user", "acknowledged", prompt_id="p-acked")(db)
    add_completions("p-acked", [sample(i, "ok") for i in range(4)])(db)
    return "p-acked"

def crashing_generation(db):
    add_prompt("crash-user", "never committed", prompt_id="p-crash")(db)
    # 4 x 2 MB: more than the 2 MB page cache, so SQLite spills uncommitted pages
    # into the WAL before the crash; recovery must ignore them.
    add_completions("p-crash", [sample(i, "x" * 2_000_000) for i in range(4)])(db)
    if mode == "exit":
        os._exit(3)
    print("inside-transaction", flush=True)
    time.sleep(600)  # the parent SIGKILLs us here

async def acknowledged_then_killed():
    print(await store.write(committed_generation), flush=True)
    await asyncio.sleep(600)  # the parent SIGKILLs us here

if mode == "acked":
    asyncio.run(acknowledged_then_killed())
else:
    store.write_sync(committed_generation)
    store.write_sync(crashing_generation)
"""


def _start_child(path: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CRASH_CHILD, str(path), mode],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _assert_intact(store: Store) -> None:
    check = store.read_sync(lambda db: db.execute("PRAGMA integrity_check").fetchall())
    assert check == [("ok",)]
    assert store.read_sync(lambda db: db.execute("PRAGMA foreign_key_check").fetchall()) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["exit", "sigkill"])
def test_a_crash_before_commit_leaves_no_half_written_rows(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "crash.db"
    proc = _start_child(path, mode)
    if mode == "sigkill":
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == "inside-transaction", proc.stderr.read()  # type: ignore[union-attr]
        # The uncommitted pages really reached the WAL file: recovery is put to work.
        assert os.path.getsize(f"{path}-wal") > 1_000_000
        _kill(proc)
    else:
        assert proc.wait(timeout=60) == 3, proc.stderr.read()  # type: ignore[union-attr]

    with Store(path) as store:
        _assert_intact(store)
        assert store.read_sync(get_prompt("p-crash")) is None
        assert store.read_sync(completions_of("p-crash")) == []
        orphans = store.read_sync(
            lambda db: db.execute(
                "SELECT COUNT(*) FROM completions c LEFT JOIN prompts p ON p.id = c.prompt_id "
                "WHERE p.id IS NULL"
            ).fetchone()[0]
        )
        assert orphans == 0
        # The write acknowledged before the crash is there, whole.
        assert len(store.read_sync(completions_of("p-acked"))) == 4
        assert count(store, "prompts") == 1


@pytest.mark.timeout(120)
def test_an_acknowledged_write_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "acked.db"
    proc = _start_child(path, "acked")
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert line.strip() == "p-acked", proc.stderr.read()  # type: ignore[union-attr]
    _kill(proc)
    with Store(path) as store:
        _assert_intact(store)
        assert store.read_sync(get_prompt("p-acked")).text == "acknowledged"
        assert [c.text for c in store.read_sync(completions_of("p-acked"))] == ["ok"] * 4


# ---------------------------------------------------------------- snapshots


def test_snapshot_is_consistent_while_writes_continue(store: Store, tmp_path: Path) -> None:
    acked: list[int] = []  # appended only after each write_sync returned (committed)
    stop = threading.Event()

    def writer() -> None:
        for i in range(100_000):
            if stop.is_set():
                return
            store.write_sync(log_generation("snap-user", str(i), n=2))
            acked.append(i)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen: list[int] = []
        for k in range(6):
            acked_before = len(acked)
            snap = store.snapshot(tmp_path / f"snap{k}.db")
            acked_after = len(acked)
            with Store.open_readonly(snap) as ro:
                _assert_intact(ro)
                texts = ro.read_sync(
                    lambda db: [r["text"] for r in db.query("SELECT text FROM prompts")]
                )
                seqs = sorted(int(t) for t in texts)
                # A prefix of the commit order: writes 0..n-1, with no gap.
                assert seqs == list(range(len(seqs)))
                # Everything acknowledged before the snapshot began is in it; at most one
                # write committed but not yet appended to `acked` can be in it besides.
                assert acked_before <= len(seqs) <= acked_after + 1
                per_prompt = ro.read_sync(
                    lambda db: {r["n"] for r in db.query(
                        "SELECT COUNT(c.id) AS n FROM prompts p "
                        "LEFT JOIN completions c ON c.prompt_id = p.id GROUP BY p.id")}
                )  # fmt: skip
                assert per_prompt <= {2}  # never a prompt without (all of) its completions
                seen.append(len(seqs))
            while len(acked) <= seen[-1] + 5 and thread.is_alive():
                stop.wait(0.005)  # let writes go on between snapshots
        assert seen == sorted(seen) and seen[-1] > seen[0]
    finally:
        stop.set()
        thread.join()


def test_snapshot_is_a_single_file_and_opens_read_only(store: Store, tmp_path: Path) -> None:
    store.write_sync(log_generation("u", "hello", n=3))
    (tmp_path / "snaps").mkdir()
    snap = store.snapshot(tmp_path / "snaps" / "snap.db")
    assert sorted(p.name for p in snap.parent.iterdir()) == ["snap.db"]  # no -wal, no .tmp
    with Store.open_readonly(snap) as ro:
        assert ro.read_sync(lambda db: db.execute("PRAGMA journal_mode").fetchone()[0]) == "delete"
        assert ro.read_sync(stats()).completions == 3
        with pytest.raises(StoreClosedError, match="read-only"):
            ro.write_sync(add_user())
    store.write_sync(add_user("later"))
    with Store.open_readonly(snap) as ro:
        assert ro.read_sync(stats()).users == 0  # the copy does not follow the live file


def test_open_readonly_refuses_an_old_version(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    migrate(raw_db(path), target=1)
    with pytest.raises(SchemaError, match="open it read-write once"):
        Store.open_readonly(path)


# ---------------------------------------------------------------- domain operations


def test_api_keys_are_stored_hashed_found_and_revoked(store: Store) -> None:
    key = store.write_sync(add_api_key("lab-1", "labeler", hash_api_key("rlhf_secret"), "g2"))
    assert store.read_sync(lambda db: db.table("users").get("lab-1"))["labeler_group"] == "g2"
    found = store.read_sync(find_key_by_hash(hash_api_key("rlhf_secret")))
    assert found == key and found.active
    assert found.identity().labeler_group == "g2"
    assert store.read_sync(find_key_by_hash(hash_api_key("rlhf_other"))) is None
    with pytest.raises(sqlite3.IntegrityError):
        store.write_sync(add_api_key("lab-2", "labeler", hash_api_key("rlhf_secret")))
    with pytest.raises(InvalidArgumentError):
        store.write_sync(add_api_key("x", "root", "h"))  # type: ignore[arg-type]
    second = store.write_sync(add_api_key("lab-1", "labeler", hash_api_key("rlhf_two"), "g2"))
    assert store.write_sync(revoke_key(key.key_id)) is True
    assert store.write_sync(revoke_key(key.key_id)) is False
    assert not store.read_sync(find_key_by_hash(key.key_hash)).active
    assert [k.key_id for k in store.read_sync(list_keys("lab-1", include_revoked=False))] == [
        second.key_id
    ]
    assert len(store.read_sync(list_keys())) == 2


def test_prompts_get_the_users_split_and_a_dedup_key(store: Store) -> None:
    # Splits pinned in test_identity.py: alice → test, heidi → val, bob → train.
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi  THERE"},
    ]
    for user in ("alice", "heidi", "bob"):
        store.write_sync(add_prompt(user, "Hi  THERE", messages=messages, has_pii=(user == "bob")))
    prompts = store.read_sync(lambda db: list(db.query("SELECT id, user_id FROM prompts")))
    by_user = {r["user_id"]: store.read_sync(get_prompt(r["id"])) for r in prompts}
    assert {u: p.split for u, p in by_user.items()} == {
        "alice": "test",
        "heidi": "val",
        "bob": "train",
    }
    assert by_user["bob"].dedup_key == "hi there" and by_user["bob"].has_pii is True
    assert by_user["alice"].messages == messages and by_user["alice"].has_pii is False
    s = store.read_sync(stats())
    assert s.prompts_by_split == {"train": 1, "val": 1, "test": 1} and s.prompts == 3


def _prompt_with_completions(store: Store, n: int = 4) -> tuple[str, list[str]]:
    prompt_id = store.write_sync(log_generation("u", "rank me", n=n))
    return prompt_id, [c.id for c in store.read_sync(completions_of(prompt_id))]


def test_rankings_are_validated_against_the_prompts_completions(store: Store) -> None:
    prompt_id, (a, b, c, d) = _prompt_with_completions(store)
    other_id, (x, *_) = _prompt_with_completions(store)
    for bad in ([[a, b, c, d]], [[a], [a, b]], [[a], [], [b]]):  # one group, repeat, empty
        with pytest.raises(InvalidArgumentError):
            store.write_sync(add_ranking(prompt_id, "lab", bad))
    with pytest.raises(InvalidArgumentError, match=f"completion {x!r} belongs to prompt {other_id!r}"):
        store.write_sync(add_ranking(prompt_id, "lab", [[a], [x]]))
    with pytest.raises(NotFoundError):
        store.write_sync(add_ranking("nope", "lab", [[a], [b]]))
    ranking = store.write_sync(add_ranking(prompt_id, "lab", [[a], [b, c], [d]], labeler_group="g"))
    assert ranking.k == 4 and ranking.ranking == [[a], [b, c], [d]]
    assert count(store, "rankings") == 1


def test_leases_expire_and_are_answered_at_most_once(store: Store) -> None:
    prompt_id, ids = _prompt_with_completions(store)
    t0 = 1_000.0
    task = store.write_sync(lease_task(prompt_id, "lab", ids, lease_s=60, now=t0))
    assert task.k == 4 and task.completion_ids == ids and task.is_live(t0 + 59)
    assert store.write_sync(expire_tasks(now=t0 + 30)) == 0
    assert store.write_sync(expire_tasks(now=t0 + 61)) == 1
    assert store.read_sync(get_task(task.id)).status == "expired"
    with pytest.raises(TaskClosedError, match="expired"):
        store.write_sync(
            add_ranking(prompt_id, "lab", [ids[:2], ids[2:]], task_id=task.id, now=t0 + 62)
        )

    fresh = store.write_sync(lease_task(prompt_id, "lab", ids, lease_s=60, now=t0 + 100))
    with pytest.raises(NotYourTaskError, match="leased to another labeler"):
        store.write_sync(
            add_ranking(prompt_id, "intruder", [ids[:2], ids[2:]], task_id=fresh.id, now=t0 + 101)
        )
    with pytest.raises(InvalidArgumentError, match=f"completion {ids[3]!r} of task {fresh.id!r} is missing"):
        store.write_sync(
            add_ranking(prompt_id, "lab", [ids[:1], ids[1:3]], task_id=fresh.id, now=t0 + 101)
        )
    # An unswept lease past its expiry is refused too.
    with pytest.raises(ConflictError):
        store.write_sync(
            add_ranking(prompt_id, "lab", [ids[:2], ids[2:]], task_id=fresh.id, now=t0 + 161)
        )
    ranking = store.write_sync(
        add_ranking(prompt_id, "lab", [ids[:2], ids[2:]], task_id=fresh.id, now=t0 + 110)
    )
    assert ranking.task_id == fresh.id
    assert store.read_sync(get_task(fresh.id)).status == "submitted"
    with pytest.raises(ConflictError):
        store.write_sync(
            add_ranking(prompt_id, "lab", [ids[:2], ids[2:]], task_id=fresh.id, now=t0 + 111)
        )
    assert store.write_sync(expire_tasks(now=t0 + 10_000)) == 0  # submitted tasks stay submitted
    assert count(store, "rankings") == 1
    _, other_ids = _prompt_with_completions(store)
    with pytest.raises(InvalidArgumentError):
        store.write_sync(lease_task(prompt_id, "lab", [ids[0], other_ids[0]], lease_s=60))


def test_demonstrations_and_ratings_round_trip(store: Store) -> None:
    prompt_id, ids = _prompt_with_completions(store, n=1)
    demo = store.write_sync(add_demonstration(prompt_id, "lab", "The answer.", labeler_group="g"))
    flags = {"hallucination": True, "satisfies_constraint": False}
    rating = store.write_sync(add_rating(ids[0], "lab", 6, flags, comment="good"))
    assert rating.flags == flags and rating.overall == 6
    assert (
        store.read_sync(lambda db: db.table("demonstrations").get(demo.id))["response"]
        == "The answer."
    )
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        store.write_sync(add_rating(ids[0], "lab", 8))
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        store.write_sync(add_demonstration("no-such-prompt", "lab", "x"))
    s = store.read_sync(stats())
    assert (s.demonstrations, s.ratings) == (1, 1)


def test_one_policy_serves_at_a_time(store: Store) -> None:
    store.write_sync(add_policy(0, "/ckpt/v0", status="serving", now=10.0))
    store.write_sync(
        add_policy(1, "/ckpt/v1", parent_version=0, cycle_id=None, metrics={"rm_acc": 0.7})
    )
    assert store.read_sync(serving_policy()).version == 0
    promoted = store.write_sync(set_policy_status(1, "serving", now=20.0))
    assert promoted.status == "serving" and promoted.serving_since == 20.0
    assert store.read_sync(serving_policy()).metrics == {"rm_acc": 0.7}
    assert [(p.version, p.status) for p in store.read_sync(list_policies())] == [
        (1, "serving"),
        (0, "retired"),
    ]
    assert store.read_sync(previous_serving_policy()).version == 0
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        store.write_sync(
            lambda db: db.execute("UPDATE policies SET status = 'serving' WHERE version = 0")
        )
    with pytest.raises(NotFoundError):
        store.write_sync(set_policy_status(7, "serving"))
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        store.write_sync(add_policy(3, "/ckpt/v3", parent_version=2))
    assert store.read_sync(stats()).serving_version == 1


def test_only_one_cycle_runs_even_with_two_writers_racing(store: Store) -> None:
    created = [store.write_sync(create_cycle("admin", f"r{i}")) for i in range(3)]
    with Store(store.path) as second:  # a second process' store on the same file
        barrier = threading.Barrier(8)
        claims: list[Any] = []

        def claimer(i: int) -> None:
            barrier.wait()
            claims.append(
                (store if i % 2 else second).write_sync(claim_queued_cycle(owner_pid=100 + i))
            )

        threads = [threading.Thread(target=claimer, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    won = [c for c in claims if c is not None]
    assert len(claims) == 8 and len(won) == 1
    assert won[0].id == created[0].id and won[0].state == "running" and won[0].owner_pid >= 100
    assert [c.id for c in store.read_sync(list_cycles(state="running"))] == [created[0].id]
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):  # the index backs the rule
        store.write_sync(
            lambda db: db.execute(
                "UPDATE cycles SET state = 'running' WHERE id = ?", [created[1].id]
            )
        )
    finish = update_cycle(
        created[0].id,
        state="promoted",
        stage="swap",
        stage_metrics={"rm": {"acc": 0.7}},
        candidate_version=1,
    )
    done = store.write_sync(finish)
    assert done.finished and done.finished_at is not None and done.metrics == {"rm": {"acc": 0.7}}
    assert store.write_sync(claim_queued_cycle()).id == created[1].id
    with pytest.raises(ConflictError):
        store.write_sync(update_cycle(created[0].id, state="failed"))  # terminal is final
    with pytest.raises(ConflictError):
        store.write_sync(update_cycle(created[2].id, state="running"))  # only claim starts


def test_cycle_metrics_merge_and_stale_cycles_fail(store: Store) -> None:
    cycle = store.write_sync(create_cycle("schedule", now=0.0))
    store.write_sync(claim_queued_cycle(now=100.0))
    store.write_sync(update_cycle(cycle.id, stage="sft", stage_metrics={"sft": {"loss": 1.5}}))
    store.write_sync(
        update_cycle(
            cycle.id, stage="rm", stage_metrics={"rm": {"acc": 0.7}}, heartbeat=True, now=150.0
        )
    )
    got = store.read_sync(get_cycle(cycle.id))
    assert got.metrics == {"sft": {"loss": 1.5}, "rm": {"acc": 0.7}} and got.stage == "rm"
    assert store.write_sync(fail_stale_cycles(60.0, now=200.0)) == []  # heartbeat 50 s ago
    assert store.write_sync(fail_stale_cycles(60.0, now=300.0)) == [cycle.id]
    dead = store.read_sync(get_cycle(cycle.id))
    assert dead.state == "failed" and "heartbeat" in dead.error
    store.write_sync(create_cycle("cli"))
    assert store.write_sync(claim_queued_cycle()) is not None  # the queue moves again


def test_idempotency_records_replays_and_refuses_a_changed_payload(store: Store) -> None:
    rec = store.write_sync(record_idempotent("u1", "SubmitRanking", "req-1", "sha-a", b"\x08\x01"))
    assert store.read_sync(lookup_idempotent("u1", "SubmitRanking", "req-1")) == rec
    again = store.write_sync(record_idempotent("u1", "SubmitRanking", "req-1", "sha-a", b"other"))
    assert again.response == b"\x08\x01"  # the first answer is kept
    with pytest.raises(ConflictError, match="different payload"):
        store.write_sync(record_idempotent("u1", "SubmitRanking", "req-1", "sha-b", b"x"))
    assert store.read_sync(lookup_idempotent("u2", "SubmitRanking", "req-1")) is None
    assert store.read_sync(lookup_idempotent("u1", "SubmitRating", "req-1")) is None


def test_run_mutation_does_the_work_once_under_concurrent_retries_and_audits_it_once(store: Store) -> None:
    prompt_id, _ = _prompt_with_completions(store, n=1)
    mutation = Mutation("lab", "labeler", "feedback.SubmitDemonstration", "rlhf.v1.Feedback/SubmitDemonstration",
                        "r1", "sha", {"prompt_id": prompt_id})

    def work(db: Database) -> bytes:
        return add_demonstration(prompt_id, "lab", "resp")(db).id.encode()

    async def main() -> list[Any]:
        return await asyncio.gather(*(store.write(run_mutation(mutation, work, now=7.0)) for _ in range(10)))

    outcomes = asyncio.run(main())
    assert len({o.response for o in outcomes}) == 1
    assert sorted(o.replayed for o in outcomes) == [False] + [True] * 9
    assert count(store, "demonstrations") == 1
    # One audit row, for the one accepted mutation: who, what (ids, not text), when.
    (entry,) = store.read_sync(list_audit())
    assert (entry.at, entry.user_id, entry.action) == (7.0, "lab", "feedback.SubmitDemonstration")
    assert entry.detail == {"role": "labeler", "prompt_id": prompt_id, "request_id": "r1", "outcome": "OK"}
    with pytest.raises(ConflictError, match="already used for a different SubmitDemonstration request"):
        store.write_sync(run_mutation(replace(mutation, payload_sha256="other-sha"), work))


def test_a_refused_mutation_stores_neither_its_record_nor_its_audit_row(store: Store) -> None:
    mutation = Mutation("lab", "labeler", "feedback.SubmitRating", "rlhf.v1.Feedback/SubmitRating", "r2", "sha")

    def work(db: Database) -> bytes:
        raise NotFoundError("completion 'x' not found")

    with pytest.raises(NotFoundError):
        store.write_sync(run_mutation(mutation, work))
    assert count(store, "audit") == 0 and count(store, "idempotency") == 0


def test_a_mutation_without_request_id_runs_and_is_audited_every_time(store: Store) -> None:
    mutation = Mutation("ops", "admin", "admin.TriggerCycle", "rlhf.v1.Admin/TriggerCycle")
    for _ in range(2):
        outcome = store.write_sync(run_mutation(mutation, lambda db: b"x", result_ids=lambda answer: {"cycle_id": 1}))
        assert not outcome.replayed
    assert [e.detail for e in store.read_sync(list_audit())] == [{"role": "admin", "cycle_id": 1, "outcome": "OK"}] * 2
    assert count(store, "idempotency") == 0


def test_a_stale_recorded_answer_is_replaced(store: Store) -> None:
    mutation = Mutation("lab", "labeler", "feedback.NextComparison", "rlhf.v1.Feedback/NextComparison", "r3", "sha")
    store.write_sync(commit_mutation(mutation, lambda db: b"old"))
    assert store.read_sync(replay_mutation(mutation)) == b"old"
    assert store.read_sync(replay_mutation(mutation, still_valid=lambda db, answer: False)) is None
    store.write_sync(commit_mutation(mutation, lambda db: b"new"))
    assert store.read_sync(replay_mutation(mutation)) == b"new" and count(store, "idempotency") == 1


def test_audit_and_stats(store: Store) -> None:
    store.write_sync(audit("admin-1", "swap_policy", {"version": 3}, now=5.0))
    store.write_sync(audit(None, "trigger_cycle"))
    entries = store.read_sync(list_audit())
    assert [e.action for e in entries] == ["trigger_cycle", "swap_policy"]
    assert entries[1].detail == {"version": 3} and entries[1].user_id == "admin-1"
    store.write_sync(add_user("u"))
    store.write_sync(log_generation("u", "p", n=2))
    store.write_sync(create_cycle("cli"))
    s = store.read_sync(stats())
    assert (s.users, s.prompts, s.completions, s.cycles, s.policies, s.serving_version) == (
        1,
        1,
        2,
        1,
        0,
        None,
    )


def test_async_reads_see_committed_writes(store: Store) -> None:
    async def main() -> tuple[Any, Any]:
        user = await store.write(add_user("async-user"))
        read = await store.read(lambda db: db.table("users").get("async-user"))
        return user, read

    user, read = asyncio.run(main())
    assert read["id"] == user.id == "async-user"
