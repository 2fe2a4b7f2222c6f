"""The distributed trainer's step time: one process against two ranks on gloo (DDP, and FSDP2).

Three steps on a fixed global batch, each the recipe's own step function
(``trainer.distributed``'s loss scaling when data-parallel):

- RM, the default recipe: the pooled-head ensemble on a frozen, cached trunk (``rm_step``);
- RM, every weight trained (``train_mode="full"``), where the backbone's gradient is all-reduced;
- PPO: one policy step (clipped surrogate + ptx) and one value step (``ppo_minibatch_step``).

Layouts on the same cores: 1 process x 1 thread, 1 process x 2 threads, 2 ranks x 1 thread
(torchrun, ``--standalone``) with DDP, and the same with FSDP2 (``RLHF_DATA_PARALLEL=fsdp2``:
the PPO step's policy and value model sharded; the RM stays DDP, so its rows repeat DDP's). A rank's step time is wall-clock from a barrier to the step's
end (the all-reduces make the ranks finish together); the table gives the median of
``--steps`` timed steps after one warm-up step.

    python -m bench.distributed [--models tiny,embedded] [--steps 3]

Run it on an otherwise idle machine: every layout uses all the cores it is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import paths
from common.models import build_tiny_model, ensure_embedded_model
from trainer import distributed
from trainer.config import PPOConfig, RMConfig
from trainer.corpus import PtxBatcher, load_corpus
from trainer.examples import Comparison, PromptExample, user_turn
from trainer.losses import kl_penalized_rewards
from trainer.ppo import (
    build_optimizers,
    compute_advantages,
    data_parallel_replicas,
    evaluate_rollouts,
    load_models,
    ppo_minibatch_step,
    rollout_batch,
    score_rollouts,
)
from trainer.reward_model import RewardModel
from trainer.rm_training import data_parallel_scorer, load_reward_model, rm_step, training_items
from trainer.rollout import Rollouts
from trainer.torch_parts import build_optimizer

WORDS = ("apple river stone cloud green table music paper light window garden orange silver forest "
         "bread chair candle mountain letter winter").split()
PROMPTS, K, COMPLETION_WORDS = 8, 4, 20  # the RM step: 8 prompts x 4 completions of ~25 tokens
ROLLOUTS, RESPONSE_TOKENS = 8, 32  # the PPO minibatch
PTX_ROWS, PTX_LEN = 4, 64
LAYOUTS = [(1, 1, "ddp"), (1, 2, "ddp"), (2, 1, "ddp"), (2, 1, "fsdp2")]  # (ranks, threads per rank, strategy)


# ---------------------------------------------------------------------------- one rank


def timed(step, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls after one warm-up call, each from a barrier."""
    times = []
    for i in range(steps + 1):
        distributed.barrier()
        started = time.perf_counter()
        step()
        if i:
            times.append(time.perf_counter() - started)
    return times


def rm_case(model_dir: Path, train_mode: str, steps: int) -> list[float]:
    rng = random.Random(0)
    comparisons = [Comparison(user_turn(" ".join(rng.sample(WORDS, 8))),
                              tuple(" ".join(rng.choices(WORDS, k=COMPLETION_WORDS)) for _ in range(K)),
                              tuple(rng.sample(range(K), K)))
                   for _ in range(PROMPTS)]
    head = "pooled" if train_mode == "head" else "last_token"
    config = RMConfig(train_mode=train_mode, head=head, head_ensemble=5 if train_mode == "head" else 1,
                      learning_rate=1e-3 if train_mode == "head" else 1e-5, device="cpu", dtype="float32")
    torch.manual_seed(0)
    rm = load_reward_model(model_dir, config)
    items, _, _ = training_items(rm, comparisons, model_dir, config)
    pad_id = rm.tokenizer.pad_token_id
    optimizer, _ = build_optimizer(list(rm.named_parameters()), config.learning_rate, config.weight_decay,
                                   (config.adam_beta1, config.adam_beta2), 100, 0.0, 1.0)
    scorer = data_parallel_scorer(rm) if distributed.world().distributed else None
    shard = distributed.shard(items)
    rm.train()
    return timed(lambda: rm_step(rm, shard, optimizer, pad_token_id=pad_id, max_length=config.max_length,
                                 max_sequences=config.max_completions_per_step,
                                 max_grad_norm=config.max_grad_norm, scorer=scorer), steps)


def ppo_case(model_dir: Path, work: Path, steps: int) -> list[float]:
    rm_dir = work / "rm"
    if distributed.world().is_coordinator:  # transformers saves a model on rank 0 only anyway
        torch.manual_seed(0)
        RewardModel.from_pretrained_lm(model_dir, dtype=torch.float32, device="cpu").save(rm_dir)
    distributed.barrier()
    config = PPOConfig(minibatch_size=ROLLOUTS, device="cpu", ptx_batch_size=PTX_ROWS, ptx_seq_len=PTX_LEN)
    models = load_models(model_dir, model_dir, rm_dir, config, torch.device("cpu"), torch.float32)
    tokenizer = models.tokenizer
    rng = random.Random(0)
    prompt_ids = [tokenizer(" ".join(rng.sample(WORDS, 10)))["input_ids"] for _ in range(ROLLOUTS)]
    response_ids = [tokenizer(" ".join(rng.choices(WORDS, k=RESPONSE_TOKENS)))["input_ids"][:RESPONSE_TOKENS]
                    for _ in range(ROLLOUTS)]
    rollouts = Rollouts([PromptExample(f"p{i}", user_turn("")) for i in range(ROLLOUTS)], prompt_ids, response_ids,
                        [""] * ROLLOUTS, tokenizer.eos_token_id)
    batch = rollout_batch(rollouts, tokenizer.pad_token_id)
    scores = score_rollouts(models.reward_model, batch, config.forward_batch_size)
    experience = evaluate_rollouts(models, batch, scores, 1.0, config.forward_batch_size)
    rewards = kl_penalized_rewards(scores, experience.old_logprobs, experience.ref_logprobs, experience.mask,
                                   config.kl_coef)
    advantages, returns = compute_advantages(experience.old_values, rewards, experience.mask, gamma=config.gamma,
                                             lam=config.lam, whiten=True)
    experience = dataclasses.replace(experience, rewards=rewards, advantages=advantages, returns=returns)
    start, stop = distributed.shard_bounds(len(experience))
    mb = experience.select(torch.arange(start, stop))
    ptx = distributed.shard(PtxBatcher(tokenizer, load_corpus()[:20], PTX_ROWS, PTX_LEN).next_batch())
    optimizers = build_optimizers(models, config)
    replicas = data_parallel_replicas(models) if distributed.world().distributed else None
    return timed(lambda: ppo_minibatch_step(models, optimizers, mb, ptx, config, replicas=replicas), steps)


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    ranks = distributed.init_from_env("cpu")
    seconds = {"rm (head, cached trunk)": rm_case(args.model, "head", args.steps),
               "rm (full)": rm_case(args.model, "full", args.steps),
               "ppo (policy + value)": ppo_case(args.model, args.out.parent, args.steps)}
    if ranks.is_coordinator:
        args.out.write_text(json.dumps(seconds))
    distributed.barrier()
    distributed.shutdown()


# ---------------------------------------------------------------------------- the table


def run_layout(model_dir: Path, ranks: int, threads: int, strategy: str, steps: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "seconds.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   "-m", "bench.distributed", "--worker", "--model", str(model_dir), "--threads", str(threads),
                   "--steps", str(steps), "--out", str(out)]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads),
                                                 distributed.STRATEGY_ENV: strategy})
        return json.loads(out.read_text())


def table(model_name: str, results: dict[tuple[int, int, str], dict[str, list[float]]]) -> str:
    lines = [f"| {model_name}: step | " + " | ".join(f"{r} rank{'s' * (r > 1)} x {t} thread{'s' * (t > 1)}"
                                                       + (f" ({how})" if r > 1 else "")
                                                       for r, t, how in results)
             + " | 2 ranks (DDP) / 1 process x 2 threads |",
             "| --- |" + " --- |" * (len(results) + 1)]
    for case in next(iter(results.values())):
        medians = {layout: statistics.median(seconds[case]) for layout, seconds in results.items()}
        ratio = medians[(2, 1, "ddp")] / medians[(1, 2, "ddp")]
        lines.append(f"| {case} | " + " | ".join(f"{m * 1000:.0f} ms" if m < 1 else f"{m:.2f} s"
                                                  for m in medians.values()) + f" | {ratio:.2f}x |")
    return "\n".join(lines)


def run(models: str = "tiny,embedded", steps: int = 3) -> dict[str, Any]:
    """Every layout on each model; ``markdown`` is the tables ``make bench`` writes."""
    folders = {"tiny": lambda: build_tiny_model(paths.models_dir() / "tiny-llama-seed0", seed=0),
               "embedded": ensure_embedded_model}
    parts, figures = [f"Cores: {len(os.sched_getaffinity(0))}; median of {steps} steps per layout."], {}
    for name in models.split(","):
        model_dir = folders[name]()
        started = time.perf_counter()
        results = {(r, t, how): run_layout(model_dir, r, t, how, steps) for r, t, how in LAYOUTS}
        figures[name] = {f"{r}x{t} {how}": seconds for (r, t, how), seconds in results.items()}
        parts.append(f"{table(name, results)}\n\n({name}: {time.perf_counter() - started:.0f} s for all layouts)")
    return {"figures": figures, "markdown": "\n\n".join(parts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,embedded", help="comma-separated: tiny, embedded")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(run(args.models, args.steps)["markdown"])
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
