"""trainer.service: queueing, claiming, the scheduler, dead-trainer recovery, the CLI, and
the swap step's two implementations. Cycles here have no data, so they end "skipped"
in milliseconds; tests/test_cycle.py trains."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from loop_helpers import publish_v0, tiny_trainer_config

from common.store import (
    Store,
    add_policy,
    claim_queued_cycle,
    create_cycle,
    get_cycle,
    get_policy,
    list_cycles,
    serving_policy,
    set_policy_status,
)
from rlhf.v1 import admin_pb2, admin_pb2_grpc
from trainer import service
from trainer.loop_config import config_to_dict
from trainer.publishing import AdminSwapper, StoreSwapper, swap_to
from trainer.service import TrainerService, build_scheduler


@pytest.fixture
def trainer(tmp_path: Path, tiny_model_dir: Path):
    config = tiny_trainer_config(tmp_path)
    with Store(config.store_path) as store:
        publish_v0(store, config.checkpoints_root, tiny_model_dir)
        yield TrainerService(config, store, hook=lambda point: None)


def test_a_trigger_coalesces_while_a_cycle_is_queued_or_running(trainer: TrainerService) -> None:
    first = trainer.enqueue("schedule")
    assert first is not None and first.state == "queued"
    assert trainer.enqueue("schedule") is None  # one is queued
    trainer.store.write_sync(claim_queued_cycle())
    assert trainer.enqueue("cli") is None  # one is running
    assert [c.id for c in trainer.store.read_sync(list_cycles())] == [first.id]


def test_a_trigger_during_a_run_is_queued_and_runs_next(trainer: TrainerService) -> None:
    """The server's TriggerCycle always queues (create_cycle); the trainer runs it after."""
    def trigger_while_running(point: str) -> None:
        if point == "stage:snapshot" and len(trainer.store.read_sync(list_cycles())) == 1:
            trainer.store.write_sync(create_cycle("admin", "during the run"))

    trainer.hook = trigger_while_running
    trainer.enqueue("cli")
    done = trainer.run_pending()
    assert [(c.trigger, c.state) for c in done] == [("cli", "skipped"), ("admin", "skipped")]
    assert done[0].finished_at <= done[1].started_at  # one at a time


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_cycles_of_a_dead_trainer_are_failed_and_free_the_queue(trainer: TrainerService) -> None:
    store = trainer.store
    store.write_sync(create_cycle("schedule"))
    crashed = store.write_sync(claim_queued_cycle(owner_pid=dead_pid()))
    assert store.write_sync(claim_queued_cycle()) is None  # the lock is held by the dead one
    assert trainer.fail_dead_cycles() == [crashed.id]
    failed = store.read_sync(get_cycle(crashed.id))
    assert failed.state == "failed" and "died" in failed.error
    # a live owner without heartbeats for stale_after_s is failed too
    store.write_sync(create_cycle("schedule"))
    hung = store.write_sync(claim_queued_cycle(owner_pid=1, now=time.time() - 3600))
    assert trainer.fail_dead_cycles() == [hung.id]


def test_the_interval_schedule_queues_cycles_that_the_poll_loop_runs(trainer: TrainerService) -> None:
    trainer.config.schedule, trainer.config.interval_s = "interval", 0.3
    stop = threading.Event()
    thread = threading.Thread(target=trainer.serve_forever, args=(stop,))
    thread.start()
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            done = trainer.store.read_sync(list_cycles(state="skipped"))
            if done:
                break
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert done and done[0].trigger == "schedule" and done[0].reason == "scheduled"


def test_cron_schedule(trainer: TrainerService) -> None:
    from apscheduler.triggers.cron import CronTrigger

    trainer.config.schedule, trainer.config.cron = "cron", "*/15 * * * *"
    scheduler = build_scheduler(trainer.config, lambda: None)
    (job,) = scheduler.get_jobs()
    assert isinstance(job.trigger, CronTrigger) and job.max_instances == 1 and job.coalesce
    trainer.config.schedule = "off"
    assert build_scheduler(trainer.config, lambda: None) is None


# ---------------------------------------------------------------------------- CLI


def write_config(trainer: TrainerService, tmp_path: Path) -> Path:
    path = tmp_path / "trainer.json"
    path.write_text(json.dumps(config_to_dict(trainer.config)))
    return path


def test_cli_once_with_trigger_runs_one_cycle(trainer: TrainerService, tmp_path: Path, capsys) -> None:
    path = write_config(trainer, tmp_path)
    assert service.main(["--config", str(path), "--once", "--trigger"]) == 0
    assert "cycle 1: skipped (too little new data" in capsys.readouterr().out
    (cycle,) = trainer.store.read_sync(list_cycles())
    assert cycle.trigger == "cli"


def test_cli_prints_config_and_refuses_bad_values(trainer: TrainerService, tmp_path: Path, capsys) -> None:
    path = write_config(trainer, tmp_path)
    assert service.main(["--config", str(path), "--set", "cycle.ppo.kl_coef=0.2", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["cycle"]["ppo"]["kl_coef"] == 0.2
    assert service.main(["--config", str(path), "--set", "keep_last=0", "--once"]) == 2
    assert "keep_last must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------- swapping


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[int, str, str]] = []
        self.fail = fail

    def SwapPolicy(self, request, context):
        self.calls.append((request.version, request.request_id, dict(context.invocation_metadata()).get(
            "authorization", "")))
        if self.fail:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "checkpoint failed verification")
        return admin_pb2.SwapPolicyResponse(previous_version=0, version=request.version, stall_seconds=0.01,
                                            swap_mode="keep", continued_requests=2)


@pytest.fixture
def fake_admin():
    admin = FakeAdmin()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield admin, f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_admin_swapper_calls_swap_policy_with_the_admin_key(fake_admin) -> None:
    admin, target = fake_admin
    outcome = AdminSwapper(target, "rlhf_secret", timeout_s=10).swap(3, request_id="cycle-1-swap-v3")
    assert admin.calls == [(3, "cycle-1-swap-v3", "Bearer rlhf_secret")]
    assert outcome == {"via": "admin", "previous_version": 0, "version": 3, "stall_seconds": 0.01,
                       "total_seconds": 0.0, "swap_mode": "keep", "continued_requests": 2,
                       "aborted_requests": 0}


def test_a_refused_swap_rejects_the_candidate_and_raises(trainer: TrainerService, fake_admin) -> None:
    admin, target = fake_admin
    admin.fail = True
    store = trainer.store
    store.write_sync(add_policy(1, "/nowhere/v1", parent_version=0))
    with pytest.raises(grpc.RpcError):
        swap_to(store, AdminSwapper(target, None, timeout_s=10), cycle_id=1, version=1)
    assert store.read_sync(get_policy(1)).status == "rejected"
    assert store.read_sync(serving_policy()).version == 0


def test_a_lost_reply_of_a_swap_that_happened_counts_as_done(trainer: TrainerService) -> None:
    store = trainer.store
    store.write_sync(add_policy(1, "/nowhere/v1", parent_version=0))

    class LostReply:
        def swap(self, version: int, request_id: str) -> dict:
            store.write_sync(set_policy_status(version, "serving"))  # the server swapped...
            raise TimeoutError("...but the reply never came")

    outcome = swap_to(store, LostReply(), cycle_id=1, version=1)
    assert outcome["version"] == 1 and store.read_sync(serving_policy()).version == 1


def test_default_swapper_is_the_store_without_a_server(trainer: TrainerService) -> None:
    assert isinstance(service.default_swapper(trainer.config, trainer.store), StoreSwapper)
    trainer.config.server_address = "127.0.0.1:1"
    assert isinstance(service.default_swapper(trainer.config, trainer.store), AdminSwapper)
