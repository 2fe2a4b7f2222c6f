"""Retention (common/store/ops/retention.py, trainer/maintenance.py): old rows nothing uses go,
everything else stays, and the store stays consistent."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import pytest
from loop_helpers import users_in

from common.store import (
    NewCompletion,
    PruneStep,
    Store,
    add_completions,
    add_demonstration,
    add_prompt,
    add_ranking,
    add_rating,
    decline_task,
    lease_task,
    prune_in_batches,
    record_idempotent,
    release_task,
    set_gold_ranking,
)
from trainer.loop_config import RetentionConfig, TrainerConfig
from trainer.maintenance import kept_splits, prune_old_data
from trainer.service import TrainerService, build_scheduler

DAY = 86_400.0
NOW = 1_000 * DAY  # the clock of these tests
OLD = NOW - 40 * DAY  # older than the 30-day cutoff
NEW = NOW - 5 * DAY
CUTOFF = NOW - 30 * DAY
TRAIN, VAL = users_in("train", 1)[0], users_in("val", 1)[0]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "store.db") as s:
        yield s


def log(store: Store, user: str, name: str, n: int, at: float) -> tuple[str, list[str]]:
    """A prompt `name` and its n completions `name/i`, logged at `at`."""
    prompt = store.write_sync(add_prompt(user, name, now=at))
    samples = [NewCompletion(idx=i, text=f"{name}/{i}", policy_version=0, finish_reason="stop", prompt_tokens=3,
                             completion_tokens=2, latency_s=0.1) for i in range(n)]
    return prompt.id, [c.id for c in store.write_sync(add_completions(prompt.id, samples, now=at))]


def texts(store: Store, table: str) -> set[str]:
    return set(store.read_sync(lambda db: [r[0] for r in db.execute(f"SELECT text FROM {table}")]))


def fill(store: Store) -> None:
    """One case per clause of the rule (module docstring of common/store/ops/retention.py)."""
    log(store, TRAIN, "a-unused", 2, OLD)
    b, (b0, b1, _) = log(store, TRAIN, "b-ranked", 3, OLD)
    store.write_sync(add_ranking(b, "lab", [[b0], [b1]], now=OLD))
    c, _ = log(store, TRAIN, "c-demonstrated", 1, OLD)
    store.write_sync(add_demonstration(c, "lab", "the answer", now=OLD))
    _, (d0, _) = log(store, TRAIN, "d-rated", 2, OLD)
    store.write_sync(add_rating(d0, "lab", 5, now=OLD))
    e, (e0, e1, _) = log(store, TRAIN, "e-live-task", 3, OLD)
    store.write_sync(lease_task(e, "lab", [e0, e1], lease_s=NOW, now=OLD))  # leased, not yet answered
    f, f_ids = log(store, TRAIN, "f-expired-task", 2, OLD)
    task = store.write_sync(lease_task(f, "lab", f_ids, lease_s=60, now=OLD))
    store.write_sync(release_task(task.id, now=OLD + 1))
    log(store, VAL, "g-val", 2, OLD)  # evaluation data: kept whatever its age
    i, i_ids = log(store, TRAIN, "i-demonstrated-expired-task", 2, OLD)  # the prompt stays, its completions go:
    store.write_sync(add_demonstration(i, "lab", "the answer", now=OLD))  # so must the task naming them
    task = store.write_sync(lease_task(i, "lab", i_ids, lease_s=60, now=OLD))
    store.write_sync(release_task(task.id, now=OLD + 1))
    j, (j0, j1, _, _) = log(store, TRAIN, "j-gold", 4, OLD)
    store.write_sync(set_gold_ranking(j, [[j1], [j0]], "ops", now=OLD))  # labelers are scored against it
    k, (k0, k1, _) = log(store, TRAIN, "k-declined-task", 3, OLD)
    task = store.write_sync(lease_task(k, "lab", [k0, k1], lease_s=NOW, now=OLD))
    store.write_sync(decline_task(task.id, "lab", "none_acceptable", now=OLD + 1))  # a verdict on k0 and k1
    log(store, TRAIN, "h-new", 2, NEW)
    for request, at in (("old", OLD), ("new", NEW)):
        store.write_sync(record_idempotent(TRAIN, "rlhf.v1.Inference/Generate", request, "x", b"text", now=at))


# What the rule keeps of fill(): prompts, and completions by text.
KEPT_PROMPTS = {"b-ranked", "c-demonstrated", "d-rated", "e-live-task", "g-val", "h-new",
                "i-demonstrated-expired-task", "j-gold", "k-declined-task"}
KEPT_COMPLETIONS = {"b-ranked/0", "b-ranked/1",  # ranked (b-ranked/2 is not)
                    "d-rated/0",  # rated
                    "e-live-task/0", "e-live-task/1",  # named by the live lease
                    "j-gold/0", "j-gold/1",  # named by the gold ranking
                    "k-declined-task/0", "k-declined-task/1",  # named by the declined task
                    "g-val/0", "g-val/1", "h-new/0", "h-new/1"}


def check_consistent(store: Store) -> None:
    """No row points at a pruned one: foreign keys, and the ids inside rankings' and tasks' JSON."""
    def op(db):
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        completions = {r[0] for r in db.execute("SELECT id FROM completions")}
        for (ranking,) in db.execute("SELECT ranking_json FROM rankings"):
            assert {c for group in json.loads(ranking) for c in group} <= completions
        for (ids,) in db.execute("SELECT completion_ids_json FROM comparison_tasks"):
            assert set(json.loads(ids)) <= completions

    store.read_sync(op)


@pytest.mark.parametrize("batch_rows", [500, 1])  # 1: every row its own op, the cursor carries the scan
def test_old_unused_rows_go_and_everything_else_stays(store: Store, batch_rows: int) -> None:
    fill(store)
    report = prune_in_batches(store.write_sync, CUTOFF, ["val", "test"], batch_rows)

    assert texts(store, "prompts") == KEPT_PROMPTS
    assert texts(store, "completions") == KEPT_COMPLETIONS
    # a-unused/0,1, b-ranked/2, c-demonstrated/0, d-rated/1, e-live-task/2, f-expired-task/0,1, i-.../0,1,
    # j-gold/2,3, k-declined-task/2
    assert report.deleted == {"completions": 13, "prompts": 2, "comparison_tasks": 2, "idempotency": 1}
    statuses = store.read_sync(lambda db: [r[0] for r in db.execute("SELECT status FROM comparison_tasks ORDER BY rowid")])
    assert statuses == ["leased", "declined"]  # the expired tasks of f and i went with their completions
    assert store.read_sync(lambda db: [r[0] for r in db.execute("SELECT request_id FROM idempotency")]) == ["new"]
    check_consistent(store)

    again = prune_in_batches(store.write_sync, CUTOFF, ["val", "test"], batch_rows)
    assert sum(again.deleted.values()) == 0  # idempotent


def test_without_kept_splits_old_val_prompts_go_too(store: Store) -> None:
    fill(store)
    prune_in_batches(store.write_sync, CUTOFF, [], 500)
    assert texts(store, "prompts") == KEPT_PROMPTS - {"g-val"}


def test_each_op_scans_at_most_batch_rows(store: Store) -> None:
    fill(store)
    steps: list[PruneStep] = []

    def write(op):
        steps.append(store.write_sync(op))
        return steps[-1]

    prune_in_batches(write, CUTOFF, ["val", "test"], batch_rows=2)
    assert steps and max(s.scanned for s in steps) <= 2
    # the 24 old completions and 10 old prompts are each scanned once, then the 1 old idempotency record
    assert sum(s.scanned for s in steps) == 24 + 10 + 1
    assert texts(store, "prompts") == KEPT_PROMPTS


def test_retention_off_prunes_nothing_and_the_evaluation_splits_are_always_kept(store: Store) -> None:
    fill(store)
    assert prune_old_data(store, RetentionConfig(), eval_splits=["val"], now=NOW) is None
    assert len(texts(store, "prompts")) == 11
    retention = RetentionConfig(max_age_days=30, keep_splits=[])
    assert kept_splits(retention, ["val"]) == ["val"]
    report = prune_old_data(store, retention, eval_splits=["val"], now=NOW)
    assert report is not None and report.deleted["prompts"] == 2
    assert texts(store, "prompts") == KEPT_PROMPTS


def test_the_trainer_schedules_retention_and_backups(tmp_path: Path) -> None:
    config = TrainerConfig(store_path=tmp_path / "s.db", trunk_cache_mb=0, schedule="off", server_address=None)
    config.backup.folder = tmp_path / "backups"
    with Store(config.store_path) as store:
        service = TrainerService(config, store)
        assert [j.id for j in service.upkeep_jobs()] == ["backup"]  # retention is off by default
        config.retention.max_age_days = 30
        jobs = {j.id: j for j in service.upkeep_jobs(now=NOW)}
        assert jobs["retention"].first_at == NOW and jobs["retention"].every_s == 24 * 3600
        assert jobs["backup"].first_at == NOW  # no backup yet: due at once
        scheduler = build_scheduler(config, lambda: None, list(jobs.values()))
        assert sorted(j.id for j in scheduler.get_jobs()) == ["backup", "retention"]

        jobs["backup"].run()  # a real backup; the next one is due every_hours after it
        (backup,) = (tmp_path / "backups").iterdir()
        due = {j.id: j for j in service.upkeep_jobs(now=time.time())}["backup"].first_at
        assert due == pytest.approx(backup.stat().st_mtime + 24 * 3600)


def test_rlhf_store_prune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.store_cli import main

    path = tmp_path / "store.db"
    with Store(path) as store:
        log(store, TRAIN, "old", 2, time.time() - 40 * DAY)
        log(store, TRAIN, "new", 2, time.time())
    assert main(["--set", f"store_path={path}", "prune"]) == 2  # retention off: nothing done
    assert "retention is off" in capsys.readouterr().err
    assert main(["--set", f"store_path={path}", "prune", "--max-age-days", "30"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"]["prompts"] == 1
    with Store(path) as store:
        assert texts(store, "prompts") == {"new"}
