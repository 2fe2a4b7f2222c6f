"""Admin over a real socket with the HF engine: a hot swap under 16 concurrent streaming
clients (no failed request, every completion from ONE version), a corrupt checkpoint
refused while the old version keeps serving, rollback, restart serving the last
promoted version, cycles, stats, and the audit of every call."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from clients.client import RlhfClient
from rlhf.v1 import admin_pb2, common_pb2
from server_harness import (
    WIDE_MARGIN_PROMPTS,
    ServerThread,
    completions_in_store,
    corrupt_weights,
    create_key,
    greedy_reference,
    publish,
    server_config,
    swap_under_load,
    tiny_model,
)

PROMPTS = list(WIDE_MARGIN_PROMPTS)
MAX_NEW = 24


@dataclass
class Env:
    server: ServerThread
    store_path: Path
    user_key: str
    admin_key: str
    reference: dict[int, dict[str, str]]  # version -> prompt -> greedy reply

    def admin(self) -> RlhfClient:
        return RlhfClient(self.server.target, self.admin_key)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("admin")
    config = server_config(tmp, tiny_model_dir, max_concurrent_per_key=32)
    user_key, _ = create_key(config.store_path, "user", "load-user")
    admin_key, _ = create_key(config.store_path, "admin", "operator")
    seed1 = tiny_model(1)
    reference = {0: greedy_reference(tiny_model_dir, PROMPTS, MAX_NEW), 1: greedy_reference(seed1, PROMPTS, MAX_NEW)}
    assert all(reference[0][p] != reference[1][p] for p in PROMPTS), "v0 and v1 must answer differently"
    with ServerThread(config) as server:
        publish(config.checkpoints_root, config.store_path, 1, seed1)
        corrupt_weights(publish(config.checkpoints_root, config.store_path, 2, tiny_model_dir))
        yield Env(server, config.store_path, user_key, admin_key, reference)


def test_swap_under_16_concurrent_streams(env: Env) -> None:
    run = asyncio.run(swap_under_load(env.server.target, env.user_key, env.admin_key, PROMPTS,
                                      new_version=1, corrupt_version=2, clients=16, max_new_tokens=MAX_NEW))
    assert run.failures == []
    assert (run.swap.previous_version, run.swap.version) == (0, 1)
    assert 0 <= run.swap.stall_seconds <= run.swap.total_seconds
    # The corrupt checkpoint was refused, naming the bad file; v1 kept serving.
    assert run.corrupt_error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "v2/model.safetensors: sha256 mismatch" in run.corrupt_error.details()
    # Every completion's tokens came from ONE version: its text is that version's greedy reply.
    for r in run.results:
        assert r.text == env.reference[r.version][r.prompt], r
    assert {r.version for r in run.results} == {0, 1}
    assert all(r.version == 1 for r in run.results if r.started_after_swap)
    assert sum(r.started_after_swap for r in run.results) >= 16 * 2
    # The log says the same, row by row, read through a separate connection.
    rows = completions_in_store(env.store_path, [r.prompt_id for r in run.results])
    assert len(rows) == len(run.results)
    for row in rows:
        assert row["text"] == env.reference[row["policy_version"]][row["prompt_text"]]
    with env.admin() as admin:
        assert admin.get_model().policy_version == 1
        statuses = {p.version: p.status for p in admin.list_policies()}
    assert statuses == {0: common_pb2.POLICY_STATUS_RETIRED, 1: common_pb2.POLICY_STATUS_SERVING,
                        2: common_pb2.POLICY_STATUS_REJECTED}


def test_rollback_returns_to_the_previous_version(env: Env) -> None:
    with env.admin() as admin:
        serving = admin.get_model().policy_version
        back = admin.rollback(request_id="rb-1")
        assert back.previous_version == serving and back.version != serving
        assert admin.rollback(request_id="rb-1") == back  # a retry replays, it does not swap again
        assert admin.get_model().policy_version == back.version
        reply = admin.generate(PROMPTS[0], temperature=0, max_new_tokens=MAX_NEW)
        assert reply.completions[0].text == env.reference[back.version][PROMPTS[0]]
        again = admin.rollback(version=serving)  # and forward again, by version
        assert again.version == serving


def test_swap_to_the_serving_version_is_a_no_op(env: Env) -> None:
    with env.admin() as admin:
        serving = admin.get_model().policy_version
        reply = admin.swap_policy(serving)
    assert (reply.previous_version, reply.version, reply.stall_seconds) == (serving, serving, 0.0)


def test_cycles_are_queued_for_the_trainer(env: Env) -> None:
    with env.admin() as admin:
        first = admin.trigger_cycle("more data", request_id="cycle-1")
        retry = admin.trigger_cycle("more data", request_id="cycle-1")
        other = admin.trigger_cycle("again")
        cycle = admin.get_cycle(first.cycle_id)
        listed = [c.cycle_id for c in admin.list_cycles()]
        with pytest.raises(grpc.RpcError) as missing:
            admin.get_cycle(12345)
        with pytest.raises(grpc.RpcError) as reused:
            admin.trigger_cycle("different", request_id="cycle-1")
    assert first == retry and other.cycle_id != first.cycle_id
    assert first.state == admin_pb2.CYCLE_STATE_QUEUED
    assert (cycle.trigger, cycle.state, cycle.base_version) == ("admin", admin_pb2.CYCLE_STATE_QUEUED,
                                                                 cycle.base_version)
    assert listed[:2] == [other.cycle_id, first.cycle_id]  # newest first
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_stats_count_the_log(env: Env) -> None:
    with env.admin() as admin:
        stats = admin.get_stats()
    assert stats.serving_version == env.server.engine.version
    assert stats.prompts >= 16 and stats.completions >= stats.prompts and stats.policies == 3
    assert sum(stats.prompts_by_split.values()) == stats.prompts


def test_every_admin_call_is_audited(env: Env) -> None:
    with RlhfClient(env.server.target, env.user_key) as user, pytest.raises(grpc.RpcError):
        user.get_stats()
    conn = sqlite3.connect(f"file:{env.store_path}?mode=ro", uri=True)
    entries = [(user_id, action, json.loads(detail))
               for user_id, action, detail in conn.execute("SELECT user_id, action, detail_json FROM audit ORDER BY id")]
    conn.close()
    swaps = [d for _, a, d in entries if a == "admin.SwapPolicy"]
    assert any(d["outcome"] == "OK" and d["version"] == 1 and "stall_seconds" in d for d in swaps)
    assert any(d["outcome"].startswith("FAILED_PRECONDITION") and d["version"] == 2 for d in swaps)
    assert ("load-user", "admin.GetStats") in [(u, a) for u, a, d in entries if d["outcome"].startswith("PERMISSION_DENIED")]
    assert {a for _, a, _ in entries} >= {"admin.SwapPolicy", "admin.Rollback", "admin.TriggerCycle",
                                          "admin.GetCycle", "admin.ListCycles", "admin.ListPolicies", "admin.GetStats"}


def test_restarted_server_serves_the_last_promoted_version(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = server_config(tmp_path, tiny_model_dir)
    admin_key, _ = create_key(config.store_path, "admin", "operator")
    with ServerThread(config) as server:
        publish(config.checkpoints_root, config.store_path, 1, tiny_model(1))
        with RlhfClient(server.target, admin_key) as admin:
            assert admin.get_model().policy_version == 0
            admin.swap_policy(1)
    with ServerThread(config) as server, RlhfClient(server.target, admin_key) as admin:
        assert admin.get_model().policy_version == 1
        assert [(p.version, p.status) for p in admin.list_policies()] == [
            (1, common_pb2.POLICY_STATUS_SERVING), (0, common_pb2.POLICY_STATUS_RETIRED)]
