"""The trainer's steps data-parallel under torchrun (trainer.distributed): 2 ranks on gloo make
the same SFT, RM and PPO updates as one process on the same global batch, and a rank that
dies or hangs fails the job cleanly.

Each test runs ``tests/distributed_steps.py`` under ``python -m torch.distributed.run``
(torchrun) with one thread per rank. Measured on 2 cores, OMP_NUM_THREADS=1: the update test
16 s (two torchruns), the killed rank 5 s, the hung rank 11 s (a 5 s collective timeout).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from common.checkpoints import list_checkpoints, verify_checkpoint
from common.store import get_cycle, list_policies, serving_policy
from loop_helpers import one_cycle_loop
from trainer import distributed
from trainer.distributed import TIMEOUT_ENV as RANK_TIMEOUT_ENV
from trainer.service import KILL_ENV

SCRIPT = Path(__file__).resolve().parent / "distributed_steps.py"
REPO = SCRIPT.parent.parent

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def torchrun(nproc: int, tiny_model_dir: Path, tmp_path: Path, *extra: str, timeout_s: float = 300,
             env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, Path, float]:
    """Run the steps script on ``nproc`` ranks; returns (the finished process, OUT, seconds)."""
    work = tmp_path / f"work{nproc}"
    work.mkdir(exist_ok=True)
    out = tmp_path / f"steps{nproc}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(SCRIPT), "--model", str(tiny_model_dir), "--work", str(work), "--out", str(out), *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return done, out, time.perf_counter() - started


def read_run(done: subprocess.CompletedProcess, out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.with_suffix(".json").read_text()), load_file(out.with_suffix(".safetensors"))


def assert_no_output(out: Path) -> None:
    assert not list(out.parent.glob(out.name + ".*")), "a failed run left output behind"


# ---------------------------------------------------------------------------- in-process pieces


def test_shards_cover_the_batch_once_in_order():
    for n in (0, 1, 5, 8):
        for size in (1, 2, 3):
            shards = [distributed.shard(list(range(n)), distributed.World(rank, size)) for rank in range(size)]
            assert [x for s in shards for x in s] == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert distributed.shard([0, 1, 2, 3, 4], distributed.World(1, 2)) == [2, 3, 4]


def test_one_process_is_a_no_op_world():
    assert distributed.init_from_env() == distributed.World() == distributed.world()
    assert distributed.world().is_coordinator and not distributed.world().distributed
    assert distributed.reduce_sum({"a": 1.5}) == {"a": 1.5}
    assert distributed.loss_scale(3, 7) == 1.0  # one process: the loss is never rescaled
    module = torch.nn.Linear(2, 1)
    assert distributed.wrap_data_parallel(module) is module


def test_loss_scale_makes_the_ddp_average_the_global_mean_gradient(monkeypatch: pytest.MonkeyPatch):
    """Two ranks hold 1 and 3 of the 4 tokens of a token-level mean loss L = mean(w * x), x = 1..4.
    dL/dw = mean(x) = 2.5. Rank 0 backpropagates 2 * 1/4 * mean(w * 1), gradient 0.5; rank 1
    2 * 3/4 * mean(w * (2, 3, 4)), gradient 4.5; DDP's average (0.5 + 4.5) / 2 = 2.5."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    grads = []
    for rank, shard in enumerate([x[:1], x[1:]]):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: distributed.World(rank, 2))
        w = torch.ones((), requires_grad=True)
        (distributed.loss_scale(len(shard), len(x)) * (w * shard).mean()).backward()
        grads.append(w.grad)
    assert_close(torch.stack(grads), torch.tensor([0.5, 4.5]))
    assert_close(sum(grads) / 2, x.mean())


def test_every_rank_takes_part_in_every_step(monkeypatch: pytest.MonkeyPatch):
    """One process: consecutive batches as always. Two ranks holding 5 and 4 of 9 items with
    batches of 4: ceil(9 / 4) = 3 steps on each, of 1-2 items, all items used once."""
    assert distributed.local_steps(9, 9, 4) == [slice(0, 4), slice(4, 8), slice(8, 12)]
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(0, 2))
    assert distributed.local_steps(5, 9, 4) == [slice(0, 1), slice(1, 3), slice(3, 5)]
    assert distributed.local_steps(4, 9, 4) == [slice(0, 1), slice(1, 2), slice(2, 4)]
    with pytest.raises(ValueError, match="one per step"):
        distributed.local_steps(2, 9, 4)  # 2 items for 3 steps


def test_sft_steps_give_every_rank_a_demonstration():
    from trainer.sft import global_steps

    assert global_steps(9, 4) == [slice(0, 4), slice(4, 8), slice(8, 9)]  # one process: unchanged
    assert global_steps(9, 4, world_size=2) == [slice(0, 4), slice(4, 9)]  # the last 1 joins the step before
    assert global_steps(10, 4, world_size=2) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    with pytest.raises(ValueError, match="cannot give each"):
        global_steps(1, 4, world_size=2)


def test_nproc_per_node_must_be_positive(capsys: pytest.CaptureFixture[str]):
    from trainer.service import run_under_torchrun

    assert run_under_torchrun(["--once", "--nproc-per-node", "0"], 0) == 2
    assert "at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------- torchrun


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_make_the_single_process_update(tiny_model_dir: Path, tmp_path: Path, strategy: str):
    """DDP, and FSDP2 (the SFT and PPO models sharded; the RM stays DDP): the same update."""
    one, out1, seconds1 = torchrun(1, tiny_model_dir, tmp_path)
    two, out2, seconds2 = torchrun(2, tiny_model_dir, tmp_path, env={distributed.STRATEGY_ENV: strategy})
    (result1, weights1), (result2, weights2) = read_run(one, out1), read_run(two, out2)
    print(f"torchrun ({strategy}): 1 rank {seconds1:.1f} s, 2 ranks {seconds2:.1f} s")
    assert result1["world_size"] == 1 and result2["world_size"] == 2
    # Both ranks hold the same weights after every step: the replicas (or the shards) agree.
    first, second = result2["fingerprints"]
    assert first == pytest.approx(second, rel=1e-12, abs=1e-12)
    for stage, stats in result1["stats"].items():
        assert stats.keys() == result2["stats"][stage].keys()
        for key, value in stats.items():
            assert result2["stats"][stage][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (stage, key)
    stats = result1["stats"]
    assert stats["ppo"]["clip_frac"] > 0 and stats["ppo"]["value_clip_frac"] > 0  # the clipped branches ran
    assert stats["rm_head"]["pairs"] == 1 + 2 + 5 + 2 + 1  # K = 2, 3 (one tie), 4 (one tie), 3, 2
    assert weights1.keys() == weights2.keys()
    assert {name.split(".")[0] for name in weights1} == {"sft", "rm_head", "rm_top_layers", "policy", "value"}
    for name, weight in weights1.items():
        assert_close(weights2[name], weight, atol=1e-5, rtol=1e-5, msg=name)


def test_a_killed_rank_fails_the_run_cleanly(tiny_model_dir: Path, tmp_path: Path):
    done, out, seconds = torchrun(2, tiny_model_dir, tmp_path, "--die-rank", "1")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "PeerFailure" in output, output[-3000:]  # the survivor says why it stopped
    assert "another rank failed" in output or "a peer rank died" in output, output[-3000:]
    root_cause = output.split("Root Cause")[-1]  # torchrun's summary names the rank that died first
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root_cause), root_cause
    assert_no_output(out)
    assert seconds < 120


def test_a_hung_rank_times_out_the_collective(tiny_model_dir: Path, tmp_path: Path):
    done, out, seconds = torchrun(2, tiny_model_dir, tmp_path, "--hang-rank", "1",
                                  env={distributed.TIMEOUT_ENV: "5"})
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "PeerFailure" in output and "a peer rank died, hung past the timeout" in output, output[-3000:]
    assert_no_output(out)
    assert seconds < 120  # the 5 s timeout, not the hung rank's hour


# ---------------------------------------------------------------------------- a whole cycle on 2 ranks


def trainer_ranks(nproc: int, config_path: Path, log_path: Path, *, kill_at: str | None = None,
                  strategy: str = "ddp", timeout_s: float = 600) -> subprocess.CompletedProcess:
    """`rlhf trainer --nproc-per-node N --config C --once --trigger`: one cycle on N ranks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_TRAINER_")}
    env |= {"OMP_NUM_THREADS": "1", **({KILL_ENV: kill_at} if kill_at else {}), RANK_TIMEOUT_ENV: "60",
            distributed.STRATEGY_ENV: strategy}
    command = [sys.executable, "-m", "trainer.service", "--nproc-per-node", str(nproc), "--config", str(config_path),
               "--once", "--trigger"]
    with open(log_path, "w") as log:
        return subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)


@pytest.fixture
def loop(tmp_path: Path, tiny_model_dir: Path):
    """A store with v0 serving and one cycle's data; the trainer config in a file."""
    with one_cycle_loop(tmp_path, tiny_model_dir) as loop:
        yield loop


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_cycle_trains_on_two_ranks_and_the_coordinator_publishes(loop, tmp_path: Path, strategy: str):
    store, config, config_path = loop
    log_path = tmp_path / "ranks.log"
    done = trainer_ranks(2, config_path, log_path, strategy=strategy)
    log = log_path.read_text()
    assert done.returncode == 0, log[-4000:]
    cycle = store.read_sync(get_cycle(1))
    assert cycle.state == "promoted", cycle.error
    for stage in ("train_sft", "train_reward_model", "train_ppo"):  # rank 1 trained every data-parallel stage
        assert f"rank 1: running {stage}" in log, log[-4000:]
    assert store.read_sync(serving_policy()).version == cycle.candidate_version == 2
    verify_checkpoint(config.checkpoints_root / "v2")
    ppo = cycle.metrics["ppo"]
    assert ppo["last"]["rank_rollouts"] == 2  # each rank rolled out half of the 4 prompts


@pytest.mark.slow
def test_a_rank_killed_mid_cycle_fails_the_cycle_and_publishes_nothing(loop, tmp_path: Path):
    store, config, config_path = loop
    log_path = tmp_path / "ranks.log"
    started = time.perf_counter()
    done = trainer_ranks(2, config_path, log_path, kill_at="rank1:train_ppo")
    log = log_path.read_text()
    assert done.returncode != 0, log[-4000:]
    assert "killing myself at rank1:train_ppo" in log
    cycle = store.read_sync(get_cycle(1))
    # The coordinator learns it from its collective (PeerFailure) or from torchrun's SIGTERM, whichever is first.
    assert cycle.state == "failed" and "stage ppo" in cycle.error, (cycle.state, cycle.error, log[-3000:])
    assert "PeerFailure" in cycle.error or "another rank failed" in cycle.error, cycle.error
    assert list_checkpoints(config.checkpoints_root) == [0, 1]  # v0 and the cycle's SFT: no PPO candidate
    assert not list(config.checkpoints_root.glob("v*.tmp"))
    assert store.read_sync(serving_policy()).version == 0
    assert [p.version for p in store.read_sync(list_policies())] == [1, 0]
    assert time.perf_counter() - started < 300  # the peer's death is seen at once, not after the 600 s timeout
