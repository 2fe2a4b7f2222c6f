"""Crash safety: the trainer process is SIGKILLed in the middle of a cycle.

The trainer runs as a real child process (`python -m trainer.service --once --trigger`).
It is killed mid-PPO (found through the cycle row's `stage`, as an operator would see it)
or mid-publish of the candidate (the `RLHF_TRAINER_PAUSE_AT` hook stops it at an exact point: weights
written into `vN.tmp/`, or `vN/` renamed into place but not yet recorded in the store).
Then: no partial checkpoint is visible, v0 still serves, and the next cycle marks the
dead one failed, cleans up and completes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.checkpoints import list_checkpoints, verify_checkpoint
from common.store import Store, get_cycle, list_policies, serving_policy
from loop_helpers import one_cycle_loop
from trainer.service import PAUSE_ENV, TrainerService

pytestmark = pytest.mark.slow  # two training cycles per test, on 2 shared cores
REPO = Path(__file__).resolve().parent.parent


def start_trainer(config_path: Path, log_path: Path, pause_at: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    if pause_at:
        env[PAUSE_ENV] = pause_at
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "trainer.service", "--config", str(config_path), "--once",
                                 "--trigger"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for(condition, proc: subprocess.Popen, log_path: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the trainer exited early ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.05)


@pytest.fixture
def loop(tmp_path: Path, tiny_model_dir: Path):
    """A store with v0 serving and one cycle's data; the trainer config in a file."""
    with one_cycle_loop(tmp_path, tiny_model_dir) as loop:
        yield loop


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def assert_next_cycle_starts_clean(store: Store, config, killed_id: int, stage: str) -> None:
    """Recovery: the dead cycle is failed with its stage; a new cycle cleans up and promotes."""
    trainer = TrainerService(config, store, hook=lambda point: None)
    trainer.enqueue("cli", "after the crash")
    (cycle,) = trainer.run_pending()
    dead = store.read_sync(get_cycle(killed_id))
    assert dead.state == "failed" and dead.error.startswith("the trainer (pid") and f"in stage {stage}" in dead.error
    assert cycle.state == "promoted", cycle.error
    assert not list(config.checkpoints_root.glob("v*.tmp"))
    assert not [d for d in config.work_dir.glob("cycle-*")]
    serving = store.read_sync(serving_policy())
    assert serving.version == cycle.candidate_version
    verify_checkpoint(config.checkpoints_root / f"v{serving.version}")
    recorded = {p.version for p in store.read_sync(list_policies())}
    assert set(list_checkpoints(config.checkpoints_root)) <= recorded  # no unrecorded checkpoint left


def test_sigkill_mid_ppo(loop, tmp_path: Path) -> None:
    store, config, config_path = loop
    log_path = tmp_path / "trainer.log"
    proc = start_trainer(config_path, log_path)
    cycle_row = lambda: store.read_sync(get_cycle(1))  # noqa: E731
    wait_for(lambda: cycle_row() is not None and cycle_row().stage == "ppo", proc, log_path)
    kill(proc)

    assert cycle_row().state == "running"  # as the dead trainer left it
    assert list_checkpoints(config.checkpoints_root) == [0, 1]  # v0 and the cycle's SFT, nothing else
    assert store.read_sync(serving_policy()).version == 0
    assert_next_cycle_starts_clean(store, config, killed_id=1, stage="ppo")


@pytest.mark.parametrize("point", ["publish:ppo:files_written", "publish:ppo:renamed"])
def test_sigkill_mid_publish(loop, tmp_path: Path, point: str) -> None:
    store, config, config_path = loop
    log_path = tmp_path / "trainer.log"
    proc = start_trainer(config_path, log_path, pause_at=point)
    wait_for(lambda: f"paused at {point}" in log_path.read_text(), proc, log_path)
    root = config.checkpoints_root
    if point == "publish:ppo:files_written":  # weights in v2.tmp/, no manifest, no v2/
        assert (root / "v2.tmp" / "model.safetensors").is_file() and not (root / "v2").exists()
    else:  # v2/ complete on disk, not yet in the policies table
        verify_checkpoint(root / "v2")
    kill(proc)

    assert list_checkpoints(root) == ([0, 1] if point == "publish:ppo:files_written" else [0, 1, 2])
    assert [p.version for p in store.read_sync(list_policies())] == [1, 0]  # v2 never recorded
    assert store.read_sync(serving_policy()).version == 0
    assert_next_cycle_starts_clean(store, config, killed_id=1, stage="publish")
