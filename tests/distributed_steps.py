"""One SFT, RM and PPO optimisation step on a fixed global batch, on every rank of a torchrun job.

Run by ``tests/test_distributed.py``:

    python -m torch.distributed.run --standalone --nproc-per-node N tests/distributed_steps.py \\
        --model TINY_MODEL_DIR --work DIR --out OUT [--die-rank R | --hang-rank R]

Every rank builds the same global batch, takes its shard (``trainer.distributed.shard``) and
runs the recipe's own step functions; with N = 1 they take their single-process path. Rank 0
writes the steps' statistics to ``OUT.json`` and the trained weights to ``OUT.safetensors``,
each through a temporary file and a rename, weights first: a run that fails leaves neither.

The optimiser is plain SGD without clipping: AdamW's first step is about lr * sign(grad),
blind to the gradient's scale, which is exactly what the data-parallel loss scaling gets
right or wrong; with SGD the update IS the gradient.

``RLHF_DATA_PARALLEL=fsdp2``: the SFT and PPO models sharded (FSDP2), the RM still DDP.
``RLHF_DDP_BACKEND=nccl`` (``make gpu-check`` with 2 GPUs): every rank trains on its GPU
(``LOCAL_RANK``) and the ranks talk over NCCL; default: CPU and gloo.

``--die-rank R``: rank R exits (os._exit(1)) after the SFT step, as a killed process would.
``--hang-rank R``: rank R sleeps there instead (the peers' collective timeout fires).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from common.models import load_causal_lm, load_tokenizer
from trainer import distributed
from trainer.config import PPOConfig, RMConfig
from trainer.corpus import PtxBatcher
from trainer.examples import Comparison, Demonstration, PromptExample, user_turn
from trainer.losses import kl_penalized_rewards
from trainer.ppo import (
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
from trainer.sft import demo_batch, encode_demonstrations, sft_step

# Where the steps run: NCCL needs CUDA tensors (``trainer.distributed.init_from_env`` picks
# the backend from the device and this rank's GPU from LOCAL_RANK).
DEVICE = "cuda" if os.environ.get("RLHF_DDP_BACKEND", "gloo") == "nccl" else "cpu"
WORDS = "apple river stone cloud green table music paper light window garden orange silver forest".split()
LR = 0.5


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)


def trained_weights(prefix: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone: tied weights share storage, which safetensors refuses to save twice
    # full_tensor: FSDP2's parameters are shards (a collective: every rank gathers them)
    return {f"{prefix}.{name}": (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone().contiguous()
            for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------- the three steps


def sft(model_dir: Path) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """5 demonstrations of different lengths, one per micro-batch: rank 0 gets 2, rank 1 gets 3."""
    rng = random.Random(1)
    demos = [Demonstration(user_turn(words(rng, 3)), words(rng, 2 + 3 * i)) for i in range(5)]
    model = load_causal_lm(model_dir, dtype=torch.float32, device=torch.device(DEVICE))
    tokenizer = load_tokenizer(model_dir, padding_side="right")
    examples = distributed.shard(encode_demonstrations(tokenizer, demos, max_response_length=32))
    batches = [demo_batch([e], tokenizer.pad_token_id, max_length=64).to(DEVICE) for e in examples]
    replica = distributed.wrap_data_parallel(model) if distributed.world().distributed else None
    model.train()
    loss = sft_step(model, batches, sgd(model), max_grad_norm=None, replica=replica)
    return {"loss": loss}, trained_weights("sft", model)


def rm(model_dir: Path, train_mode: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The recipe's RM pieces on 5 prompts with K = 2..4 (ties included), micro-batches of
    at most 4 completions: the ranks' shards split into different numbers of them."""
    rng = random.Random(2)
    ks = [2, 3, 4, 3, 2]
    comparisons = [Comparison(user_turn(words(rng, 3)), tuple(words(rng, 2 + j) for j in range(k)),
                              tuple(rng.sample([0, 0, 1, 2][:k] if k > 2 else [0, 1], k)))
                   for k in ks]
    config = RMConfig(train_mode=train_mode, top_layers=1, max_completions_per_step=4, max_grad_norm=None,
                      max_length=64, max_response_length=16, device=DEVICE, dtype="float32", seed=0)
    torch.manual_seed(config.seed)
    model = load_reward_model(model_dir, config)
    # The head's input standardisation from the GLOBAL batch: the same on every rank.
    items, _, _ = training_items(model, comparisons, model_dir, config)
    pad_id = model.tokenizer.pad_token_id
    scorer = data_parallel_scorer(model) if distributed.world().distributed else None
    model.train()
    step = rm_step(model, distributed.shard(items), sgd(model), pad_token_id=pad_id, max_length=config.max_length,
                   max_sequences=config.max_completions_per_step, max_grad_norm=None, scorer=scorer)
    return dataclasses.asdict(step), trained_weights(f"rm_{train_mode}", model)


def toy_rollouts(eos: int) -> Rollouts:
    """5 rows: prompts of 3..7 tokens, responses of 1..5 tokens, some stopped (EOS), some cut."""
    prompt_ids = [[10 + 7 * i + j for j in range(3 + i)] for i in range(5)]
    response_ids = [[200 + 11 * i + j for j in range(n)] for i, n in enumerate([2, 5, 1, 4, 3])]
    for row in (0, 3):
        response_ids[row].append(eos)
    prompts = [PromptExample(f"p{i}", user_turn(f"prompt {i}")) for i in range(5)]
    return Rollouts(prompts, prompt_ids, response_ids, texts=[""] * 5, eos_token_id=eos)


def ppo(model_dir: Path, work: Path) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One policy step (clipped surrogate + ptx) and one value step on 5 rollouts."""
    rm_dir = work / "rm"
    if distributed.world().is_coordinator:  # transformers saves a model on rank 0 only anyway
        torch.manual_seed(0)
        RewardModel.from_pretrained_lm(model_dir, dtype=torch.float32, device=DEVICE, head="last_token").save(rm_dir)
    distributed.barrier()
    config = PPOConfig(minibatch_size=5, ptx_coef=0.3, max_grad_norm=None, kl_coef=0.05, device=DEVICE)
    models = load_models(model_dir, model_dir, rm_dir, config, torch.device(DEVICE), torch.float32)
    batch = rollout_batch(toy_rollouts(models.tokenizer.eos_token_id), models.tokenizer.pad_token_id).to(DEVICE)
    scores = score_rollouts(models.reward_model, batch, chunk_size=8)
    experience = evaluate_rollouts(models, batch, scores, temperature=1.0, chunk_size=8)
    mask = experience.mask
    wiggle = torch.sin(torch.arange(mask.numel(), dtype=torch.float32).reshape(mask.shape)).to(mask.device)
    # Old log-probs and values moved off the current ones: ratios != 1, so some tokens clip.
    old_logprobs = experience.old_logprobs + 0.4 * wiggle * mask
    old_values = experience.old_values + 0.5 * wiggle.flip(1) * mask
    rewards = kl_penalized_rewards(scores, old_logprobs, experience.ref_logprobs, mask, config.kl_coef)
    advantages, returns = compute_advantages(old_values, rewards, mask, gamma=1.0, lam=0.95, whiten=False)
    experience = dataclasses.replace(experience, old_logprobs=old_logprobs, old_values=old_values, rewards=rewards,
                                     advantages=advantages, returns=returns)
    ptx = PtxBatcher(models.tokenizer, [" ".join(WORDS) * 3], batch_size=4, seq_len=12).next_batch()
    ptx.mask[0, 5:] = 0  # rows of different token counts: rank 0's share of the ptx tokens is not 1/2
    start, stop = distributed.shard_bounds(len(experience))
    ptx_shard = distributed.shard(ptx)
    replicas = data_parallel_replicas(models) if distributed.world().distributed else None
    stats = ppo_minibatch_step(models, (sgd(models.policy), sgd(models.value_model)),
                               experience.select(torch.arange(start, stop, device=mask.device)), ptx_shard, config,
                               replicas=replicas)
    return stats, trained_weights("policy", models.policy) | trained_weights("value", models.value_model)


# ---------------------------------------------------------------------------- the run


def fingerprint(weights: dict[str, torch.Tensor]) -> list[float]:
    """Two float64 sums over every weight: equal on every rank when DDP kept the replicas in sync."""
    flat = torch.cat([w.flatten().double() for w in weights.values()])
    return [float(flat.sum()), float((flat * torch.linspace(-1, 1, flat.numel(), dtype=torch.float64)).sum())]


def write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="OUT: writes OUT.json and OUT.safetensors")
    parser.add_argument("--die-rank", type=int, default=None)
    parser.add_argument("--hang-rank", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ranks = distributed.init_from_env(DEVICE)
    stats, weights = {}, {}
    stats["sft"], part = sft(args.model)
    weights |= part
    if ranks.rank == args.die_rank:
        os._exit(1)  # no cleanup, no goodbye: what a killed process looks like to its peers
    if ranks.rank == args.hang_rank:
        time.sleep(3600)
    for mode in ("head", "top_layers"):
        stats[f"rm_{mode}"], part = rm(args.model, mode)
        weights |= part
    stats["ppo"], part = ppo(args.model, args.work)
    weights |= part
    prints = [fingerprint(weights)]
    if ranks.distributed:
        prints = [None] * ranks.size
        with distributed.collective("gather of weight fingerprints"):
            dist.all_gather_object(prints, fingerprint(weights))
    if ranks.is_coordinator:
        result: dict[str, Any] = {"world_size": ranks.size, "stats": stats, "fingerprints": prints}
        base = args.out
        write_atomically(base.with_suffix(".safetensors"), lambda p: save_file(weights, str(p)))
        write_atomically(base.with_suffix(".json"), lambda p: p.write_text(json.dumps(result, indent=1)))
    distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main()
