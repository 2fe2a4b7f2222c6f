"""The CUDA path in one run, on the tiny model in bf16 (``scripts/gpu_check.sh`` calls it).

What it runs, each on ``cuda`` with ``bfloat16`` (the trainer's own entry points, so the
device and dtype handling under test is the code a cycle runs):

  hf_engine   ``server.engines.hf.HFEngine`` greedy on 4 prompts, one at a time and 4 at
              once (batched); compared with transformers' ``generate`` on the same bf16
              CUDA model and with the fp32 CPU reference the CPU tests use
  sft         ``trainer.sft.train_sft``: one epoch, one optimizer step
  rm_head     ``trainer.rm_training.train_reward_model``, the cycle's default (pooled head on
              the frozen, cached trunk): one epoch, one step
  rm_full     the same with every weight training (the paper's RM, what a GPU is for)
  ppo_full    ``trainer.ppo.train_ppo`` against rm_head's RM: one iteration (rollouts,
              scores, one PPO-ptx minibatch step)
  ppo_lora    the same with LoRA adapters

Every check runs even when an earlier one failed (ppo_* need an RM: they fail without
one); exit status 1 when any failed. A check fails on an exception, a loss that is not
finite, or no CUDA memory allocated (it did not run on the GPU). The agreement of greedy
outputs is a figure, not a pass mark: bf16 and fp32 are not expected to agree token for
token on a random-init model.

Output: one line per check, then a Markdown table for docs/GPU.md (name the device).
The tiny model is built locally (``common.models.build_tiny_model``, cached under the data
dir); this script fetches nothing.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common import paths
from common.chat import render_chat_ids
from common.models import build_tiny_model, load_causal_lm, load_tokenizer
from trainer.examples import Comparison, Demonstration, PromptExample, user_turn

DEVICE, DTYPE = "cuda", "bfloat16"
PROMPTS = ["Tell me about rivers.", "How do I bake bread?", "What is a volcano?", "Why is the sky blue?"]
WORDS = ("river", "bread", "stone", "cloud", "green", "quick", "table", "music", "light", "paper", "ocean", "field")
GREEDY_TOKENS = 24

Figures = dict[str, Any]


# ---------------------------------------------------------------------------- data


def demonstrations(n: int) -> list[Demonstration]:
    return [Demonstration(user_turn(f"Tell me about {WORDS[i % len(WORDS)]}."), "A short, polite answer.")
            for i in range(n)]


def comparisons(n: int, seed: int) -> list[Comparison]:
    """K = 3 completions ranked shorter-is-better (the loop tests' simulated labelers' rule)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        texts = tuple(" ".join(rng.sample(WORDS, length)) for length in (2, 5, 9))
        out.append(Comparison(user_turn(f"Say something ({seed}-{i})"), texts, (0, 1, 2),
                              labeler_group="A" if i % 2 else "B"))
    return out


# ---------------------------------------------------------------------------- checks


def check_hf_engine(model_dir: Path, scratch: Path) -> Figures:
    tokenizer = load_tokenizer(model_dir)
    served_alone, served_batched, seconds, tokens = asyncio.run(engine_replies(model_dir))
    reference_bf16 = generate_replies(load_causal_lm(model_dir, dtype=DTYPE, device=DEVICE), tokenizer)
    reference_fp32_cpu = generate_replies(load_causal_lm(model_dir, dtype="float32", device="cpu"), tokenizer)
    if not any(served_batched.values()):
        raise AssertionError("the engine generated nothing")

    def agree(a: dict[str, str], b: dict[str, str]) -> str:
        return f"{sum(a[p] == b[p] for p in PROMPTS)}/{len(PROMPTS)}"

    return {"batched_tokens_per_s": round(tokens / seconds, 1),
            "alone_vs_batched": agree(served_alone, served_batched),
            "vs_transformers_bf16_cuda": agree(served_alone, reference_bf16),
            "vs_fp32_cpu_reference": agree(served_alone, reference_fp32_cpu)}


async def engine_replies(model_dir: Path) -> tuple[dict[str, str], dict[str, str], float, int]:
    """(replies one at a time, replies 4 at once, seconds and tokens of the batched run)."""
    from server.engines.base import SamplingOptions
    from server.engines.hf import HFEngine

    engine = HFEngine(model_dir, 0, dtype=DTYPE, device=DEVICE)
    await engine.start()
    options = SamplingOptions(temperature=0.0, max_new_tokens=GREEDY_TOKENS)

    async def reply(request_id: str, prompt: str) -> tuple[str, int]:
        text, count = "", 0
        ids = engine.render_chat([{"role": "user", "content": prompt}])
        async for update in engine.generate(request_id, ids, options):
            text += update.text_delta
            count = update.completion_tokens if update.finished else count
        return text, count

    try:
        alone = {p: (await reply(f"alone-{i}", p))[0] for i, p in enumerate(PROMPTS)}
        started = time.perf_counter()
        batched = await asyncio.gather(*(reply(f"batched-{i}", p) for i, p in enumerate(PROMPTS)))
        seconds = time.perf_counter() - started
    finally:
        await engine.shutdown()
    return alone, {p: text for p, (text, _) in zip(PROMPTS, batched)}, seconds, sum(n for _, n in batched)


def generate_replies(model: Any, tokenizer: Any) -> dict[str, str]:
    """transformers' greedy reply to each prompt, on the model's device and dtype."""
    replies = {}
    for prompt in PROMPTS:
        ids = torch.tensor([render_chat_ids(tokenizer, [{"role": "user", "content": prompt}])], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=GREEDY_TOKENS,
                             pad_token_id=tokenizer.pad_token_id)
        replies[prompt] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return replies


def check_sft(model_dir: Path, scratch: Path) -> Figures:
    from trainer.config import SFTConfig
    from trainer.sft import train_sft

    # 4 demonstrations, batch 4, one epoch: one optimizer step
    config = SFTConfig(epochs=1, batch_size=4, max_length=128, max_response_length=32, eval_batch_size=4,
                       show_progress=False, device=DEVICE, dtype=DTYPE)
    result = train_sft(model_dir, demonstrations(4), demonstrations(2), config, scratch / "sft")
    last = result.epochs[-1]
    return {"train_loss": finite(last["train_loss"]), "val_loss": finite(last["val_loss"])}


def check_rm(train_mode: str) -> Callable[[Path, Path], Figures]:
    def check(model_dir: Path, scratch: Path) -> Figures:
        from trainer.config import RMConfig
        from trainer.rm_training import train_reward_model

        # 8 comparisons, batch 8, one epoch: one optimizer step
        config = RMConfig(train_mode=train_mode, epochs=1, batch_size=8, max_length=128, max_response_length=32,
                          eval_batch_size=8, show_progress=False, device=DEVICE, dtype=DTYPE)
        result = train_reward_model(model_dir, comparisons(8, seed=0), comparisons(4, seed=1), config,
                                    scratch / f"rm_{train_mode}")
        epoch, val_accuracy = result.epochs[-1], result.val.get("accuracy")
        return {"train_loss": finite(epoch["train_loss"]), "train_accuracy": round(epoch["train_accuracy"], 3),
                "val_accuracy": None if val_accuracy is None else round(val_accuracy, 3),
                "trainable_params": result.trainable_params}

    return check


def check_ppo(train_mode: str) -> Callable[[Path, Path], Figures]:
    def check(model_dir: Path, scratch: Path) -> Figures:
        from trainer.config import PPOConfig
        from trainer.ppo import train_ppo

        rm_dir = scratch / "rm_head"
        if not rm_dir.is_dir():
            raise RuntimeError("no reward model: rm_head failed")
        # 4 rollouts, minibatch 4, one PPO epoch: one iteration, one policy and one value step
        config = PPOConfig(train_mode=train_mode, rollouts_per_iteration=4, iterations=1, max_new_tokens=8,
                           ppo_epochs=1, minibatch_size=4, ptx_batch_size=2, ptx_seq_len=32, forward_batch_size=4,
                           device=DEVICE, dtype=DTYPE)
        prompts = [PromptExample(f"p{i}", user_turn(p)) for i, p in enumerate(PROMPTS)]
        result = train_ppo(model_dir, model_dir, rm_dir, prompts, config, scratch / f"ppo_{train_mode}",
                           progress=False)
        last = result.history[-1]
        if not result.device.startswith("cuda"):
            raise AssertionError(f"PPO ran on {result.device}")
        return {key: finite(last[key]) for key in ("policy_loss", "value_loss", "ptx_loss", "rm_score", "kl_ref")
                if last.get(key) is not None}

    return check


CHECKS: list[tuple[str, Callable[[Path, Path], Figures]]] = [
    ("hf_engine", check_hf_engine), ("sft", check_sft), ("rm_head", check_rm("head")),
    ("rm_full", check_rm("full")), ("ppo_full", check_ppo("full")), ("ppo_lora", check_ppo("lora")),
]


# ---------------------------------------------------------------------------- running them


def finite(x: float) -> float:
    if not math.isfinite(x):
        raise AssertionError(f"not finite: {x}")
    return round(float(x), 4)


def run_check(name: str, check: Callable[[Path, Path], Figures], model_dir: Path, scratch: Path) -> Figures:
    """Run one check; its figures plus ok, seconds and peak CUDA memory (MiB)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        figures = check(model_dir, scratch)
        peak = torch.cuda.max_memory_allocated() / 2**20
        if peak == 0:
            raise AssertionError("no CUDA memory allocated: it did not run on the GPU")
        ok, error = True, ""
    except Exception as exc:  # noqa: BLE001 - report it and run the next check
        traceback.print_exc()
        figures, peak, ok, error = {}, torch.cuda.max_memory_allocated() / 2**20, False, f"{type(exc).__name__}: {exc}"
    row = {"check": name, "ok": ok, "seconds": round(time.perf_counter() - started, 2),
           "peak_cuda_mib": round(peak, 1), **figures}
    if error:
        row["error"] = error
    print(f"{name:10s} {'ok' if ok else 'FAILED':6s} " + json.dumps({k: v for k, v in row.items()
                                                                      if k not in ("check", "ok")}), flush=True)
    return row


def markdown(rows: list[Figures], device: str) -> str:
    lines = [f"Device: {device}; torch {torch.__version__}, CUDA {torch.version.cuda}, dtype {DTYPE}", "",
             "| check | ok | seconds | peak CUDA MiB | figures |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        rest = {k: v for k, v in row.items() if k not in ("check", "ok", "seconds", "peak_cuda_mib")}
        figures = ", ".join(f"{k} {v}" for k, v in rest.items())
        lines.append(f"| {row['check']} | {'yes' if row['ok'] else 'NO'} | {row['seconds']} | "
                     f"{row['peak_cuda_mib']} | {figures} |")
    return "\n".join(lines)


def main() -> int:
    if not torch.cuda.is_available():
        print(f"a GPU answers nvidia-smi, but torch {torch.__version__} has no CUDA (CPU build installed?): "
              "install the cuda extra", file=sys.stderr)
        return 2
    if not torch.cuda.is_bf16_supported():
        print(f"{torch.cuda.get_device_name()} has no bf16: this check is for bf16", file=sys.stderr)
        return 2
    device = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    model_dir = build_tiny_model(paths.models_dir() / "tiny-llama-seed0", seed=0)  # cached: no download
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        rows = [run_check(name, check, model_dir, Path(scratch)) for name, check in CHECKS]
    print()
    print(markdown(rows, device))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
