"""The whole loop, end to end, as separate processes over a real socket:

    rlhf serve (HF or vLLM engine, the tiny model)  <-- users: Generate
                                                    <-- simulated labelers: Feedback
                                                    <-- the test: Admin.TriggerCycle
    rlhf trainer (polls the store, trains, publishes v2, Admin.SwapPolicy)

While the trainer trains and swaps, a background client keeps generating: not one request
may fail, and every reply names the version that produced it (0, then the candidate).
In the "adapter" case PPO trains LoRA adapters on the cycle's SFT model and the server
runs in swap mode "adapter": the candidate's adapters (published by the trainer) load on
their base, and swaps between the base and the candidate then stall nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from loop_helpers import shipped_texts, tiny_cycle_config, tiny_trainer_config, users_in
from store_reads import completions_of

from clients.client import RlhfClient
from clients.simulated_labeler import SimulatedLabeler
from common.checkpoints import adapter_of
from common.identity import generate_api_key, hash_api_key
from common.store import Store, add_api_key, list_policies
from rlhf.v1 import admin_pb2, common_pb2, feedback_pb2, feedback_pb2_grpc
from trainer.loop_config import config_to_dict

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
PROMPTS = shipped_texts()[:24]  # distinct: hygiene would drop repeats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def issue_keys(store: Store) -> dict[str, str]:
    """Keys by name: the admin, labelers of groups A and B, and users of each split."""
    keys = {}
    named = [("admin", "ops", "admin", None), ("labeler-A", "lab-a", "labeler", "A"),
             ("labeler-B", "lab-b", "labeler", "B")]
    named += [(f"{split}-{i}", user, "user", None) for split, n in (("train", 3), ("val", 2), ("test", 1))
              for i, user in enumerate(users_in(split, n))]
    for name, user, role, group in named:
        keys[name] = generate_api_key()
        store.write_sync(add_api_key(user, role, hash_api_key(keys[name]), labeler_group=group))
    return keys


def spawn(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env={**os.environ, **env}, stdout=log,
                                stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(condition, what: str, timeout: float, logs: list[Path]) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


class Traffic(threading.Thread):
    """Generates continuously; records the version of every reply and every failure."""

    def __init__(self, target: str, key: str) -> None:
        super().__init__(daemon=True)
        self.client = RlhfClient(target, key)
        self.versions: list[int] = []
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            try:
                reply = self.client.generate(f"Background question number {i}?", max_new_tokens=4, timeout=120)
                self.versions.append(reply.policy_version)
            except grpc.RpcError as err:
                self.failures.append(f"{err.code().name}: {err.details()}")
            i += 1
            time.sleep(0.05)
        self.client.close()


@pytest.mark.parametrize("engine, swap_mode", [
    ("hf", "auto"), pytest.param("vllm", "auto", marks=pytest.mark.vllm),
    pytest.param("vllm", "adapter", marks=pytest.mark.vllm, id="vllm-adapter")])
def test_a_triggered_cycle_swaps_the_served_policy_without_failing_a_request(
        engine: str, swap_mode: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    cycle = tiny_cycle_config()
    if swap_mode == "adapter":
        cycle = replace(cycle, ppo=replace(cycle.ppo, train_mode="lora"))
    config = tiny_trainer_config(tmp_path, server_address=target, cycle=cycle)
    config_path = tmp_path / "trainer.json"
    config_path.write_text(json.dumps(config_to_dict(config)))
    with Store(config.store_path) as store:
        keys = issue_keys(store)
    server_log, trainer_log = tmp_path / "server.log", tmp_path / "trainer.log"
    logs = [server_log, trainer_log]
    server = spawn(["-m", "server.app", "--engine", engine, "--port", str(port), "--store-path",
                    str(config.store_path), "--checkpoints-root", str(config.checkpoints_root), "--base-model-dir",
                    str(tiny_model_dir), "--base-model-name", "tiny-llama", "--grace-seconds", "5",
                    "--swap-mode", swap_mode],
                   server_log, {})
    trainer = None
    admin = RlhfClient(target, keys["admin"])
    try:
        def serving() -> bool:
            try:
                return admin.health_status(timeout=2) == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return server.poll() is None and False
        wait_until(serving, "the server to serve", 300, logs)
        trainer = spawn(["-m", "trainer.service", "--config", str(config_path)], trainer_log,
                        {"RLHF_ADMIN_KEY": keys["admin"]})

        # users' traffic: train prompts for PPO, val prompts for the judge and the evaluation
        # (8: the gate evaluates 4; the judge trains on the rankings of the other 4 and the train
        # split's), test prompts
        texts, train_prompt_ids = iter(PROMPTS), []
        for name in [k for k in keys if k.split("-")[0] in ("train", "val", "test")]:
            with RlhfClient(target, keys[name]) as user:
                for _ in range(2 if name.startswith("test") else 4):
                    reply = user.generate(next(texts), max_new_tokens=8, timeout=120)
                    assert reply.policy_version == 0
                    if name.startswith("train"):
                        train_prompt_ids.append(reply.prompt_id)
        # labelers: every train/val prompt ranked once (K = 4 fresh samples), a few demonstrations
        with grpc.insecure_channel(target) as channel:
            feedback = feedback_pb2_grpc.FeedbackStub(channel)
            for group, n in (("A", 12), ("B", 12)):
                metadata = (("authorization", f"Bearer {keys['labeler-' + group]}"),)
                SimulatedLabeler(p=0.0, seed=1, labeler_group=group, metadata=metadata).run(feedback, n, k=4)
            metadata = (("authorization", f"Bearer {keys['labeler-A']}"),)
            for i, prompt_id in enumerate(train_prompt_ids[:3]):  # SFT runs: a new lineage
                feedback.SubmitDemonstration(feedback_pb2.SubmitDemonstrationRequest(
                    request_id=f"demo-{i}", prompt_id=prompt_id, response="Glad to help: a short, clear answer."),
                    metadata=metadata, timeout=30)

        traffic = Traffic(target, keys["test-0"])
        traffic.start()
        cycle_id = admin.trigger_cycle(reason="e2e", request_id="e2e-1").cycle_id
        finished = (admin_pb2.CYCLE_STATE_PROMOTED, admin_pb2.CYCLE_STATE_REJECTED, admin_pb2.CYCLE_STATE_SKIPPED,
                    admin_pb2.CYCLE_STATE_FAILED)
        wait_until(lambda: admin.get_cycle(cycle_id).state in finished, "the cycle to finish", 600, logs)
        time.sleep(1.0)  # traffic on the new version
        traffic.halt.set()
        traffic.join(timeout=180)

        cycle = admin.get_cycle(cycle_id)
        assert cycle.state == admin_pb2.CYCLE_STATE_PROMOTED, cycle.error
        new = cycle.candidate_version
        assert new == 2 and cycle.trigger == "admin"  # v1 is the cycle's SFT model, v2 its PPO candidate
        assert sorted(json.loads(cycle.metrics_json)) == sorted(
            ["snapshot", "hygiene", "sft", "rm", "ppo", "evaluate", "gate", "publish", "swap", "record"])
        assert traffic.failures == []
        assert traffic.versions and set(traffic.versions) <= {0, new} and traffic.versions[-1] == new
        assert traffic.versions == sorted(traffic.versions)  # never back to the old version
        assert {p.version: p.status for p in admin.list_policies()}[new] == common_pb2.POLICY_STATUS_SERVING

        reply = RlhfClient(target, keys["train-0"]).generate("One more question?", max_new_tokens=4, timeout=60)
        assert reply.policy_version == new
        with Store(config.store_path) as store:
            logged = store.read_sync(completions_of(reply.prompt_id))
            assert logged and all(c.policy_version == new for c in logged)
            assert [p.status for p in store.read_sync(list_policies())][0] == "serving"
        if swap_mode == "adapter":
            adapters = adapter_of(config.checkpoints_root / f"v{new}")
            assert adapters is not None and adapters.base_version == 1  # LoRA on the cycle's SFT model
            # v0 served the full weights: the candidate needed its base loaded first (a drain) ...
            assert json.loads(cycle.metrics_json)["swap"]["swap_mode"] == "drain"
            # ... and from then on its base and it swap by adapters alone.
            swaps = [admin.swap_policy(1, timeout=60), admin.swap_policy(new, timeout=60)]
            assert [(s.version, s.swap_mode, s.stall_seconds) for s in swaps] == [(1, "adapter", 0.0),
                                                                                  (new, "adapter", 0.0)]
            with RlhfClient(target, keys["train-0"]) as user:
                assert user.generate("And another?", max_new_tokens=4, timeout=60).policy_version == new
    finally:
        admin.close()
        if trainer is not None:
            stop(trainer)
        stop(server)
