"""Reward model: the paper's K-way batched step against naive pairwise training, and the
CPU-sized train modes (full vs LoRA vs top layers).

1. Speed. One prompt with K = 9 ranked completions. The K-way step (InstructGPT) runs each
   completion through the RM once (9 forwards) and puts all C(9, 2) = 36 pairs in one loss;
   the naive step treats every pair as its own example (TRL-style chosen/rejected), i.e.
   2 x 36 = 72 forwards. Same data, same model, same run, steps alternated; both compute
   the same loss value (checked). Goal: ratio >= 6x. Naive pairs go through in micro-batches
   of ``NAIVE_CHUNK`` sequences so both fit in memory; the K-way step is one micro-batch of 9.
2. Train modes on a synthetic preference (completions with more marker words rank higher;
   K = 4, strict rankings, held-out comparisons drawn fresh): held-out pairwise accuracy,
   wall time and trainable parameters for ``full``, ``lora`` and ``top_layers``, on the
   tiny model (a small LR sweep per mode) and, when affordable, on the embedded model.

    python -m bench.reward_model [--model embedded|tiny] [--skip-embedded-modes]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common import paths
from common.models import build_tiny_model, ensure_embedded_model
from trainer.config import RMConfig
from trainer.data import pack_sequences
from trainer.examples import Comparison, user_turn
from trainer.reward_model import RewardModel
from trainer.rm_training import configure_trainable, encode_comparisons, kway_loss, train_reward_model
from trainer.torch_parts import build_optimizer

K = 9
NAIVE_CHUNK = 12  # sequences per naive micro-batch (6 pairs)
STEPS = 2
SPEED_WORDS = 24  # words per completion in the speed test (~60 tokens with the chat template)
WORDS = ("apple river stone cloud green table music paper light window garden orange silver forest "
         "bread chair candle mountain letter winter").split()
MARKER = "please"
EMBEDDED_GRID = {"full": [2e-5], "lora": [2e-4], "top_layers": [1e-4]}
EMBEDDED_TRAIN, EMBEDDED_VAL = 32, 16


# ---------------------------------------------------------------------------- data


def marker_task(n: int, seed: int, k: int = 4, words_per_completion: int = 10) -> list[Comparison]:
    """K completions with 0..K-1 marker words each (a random permutation); more markers rank higher."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        counts = rng.sample(range(k), k)
        completions = []
        for m in counts:
            words = [rng.choice(WORDS) for _ in range(words_per_completion - m)]
            for _ in range(m):
                words.insert(rng.randrange(len(words) + 1), MARKER)
            completions.append(" ".join(words))
        out.append(Comparison(user_turn(f"Write a short note, number {seed}-{i}."), tuple(completions),
                              tuple(k - 1 - m for m in counts), labeler_group="synthetic"))
    return out


def speed_comparison() -> Comparison:
    """One prompt, K = 9 completions of ``SPEED_WORDS`` words, strictly ranked."""
    return marker_task(1, seed=123, k=K, words_per_completion=SPEED_WORDS)[0]


# ---------------------------------------------------------------------------- 1. speed


def naive_pairwise_loss(rm: RewardModel, comparison: Comparison, tokenizer, chunk: int) -> tuple[float, int]:
    """Two forwards per ordered pair (chosen, rejected); backward per micro-batch. Returns (loss, pairs)."""
    items = encode_comparisons(tokenizer, [comparison], max_response_length=256)[0]
    pairs = [(i, j) for i in range(len(items.ranks)) for j in range(len(items.ranks))
             if items.ranks[i] < items.ranks[j]]
    per_chunk = chunk // 2
    device = next(rm.parameters()).device
    total = 0.0
    for start in range(0, len(pairs), per_chunk):
        part = pairs[start:start + per_chunk]
        sequences = [items.completion_ids[i] for i, _ in part] + [items.completion_ids[j] for _, j in part]
        batch = pack_sequences([items.prompt_ids] * len(sequences), sequences, tokenizer.pad_token_id)
        scores = rm(batch.input_ids.to(device), batch.attention_mask.to(device))  # (2P,)
        chosen, rejected = scores[:len(part)], scores[len(part):]
        # -1/C(K,2) * sum log sigma(r_w - r_l), accumulated chunk by chunk
        loss = -F.logsigmoid(chosen - rejected).sum() / len(pairs)
        if torch.is_grad_enabled():
            loss.backward()
        total += float(loss.detach())
    return total, len(pairs)


def kway_step_loss(rm: RewardModel, comparison: Comparison, tokenizer) -> float:
    items = encode_comparisons(tokenizer, [comparison], max_response_length=256)
    loss, _ = kway_loss(rm, items, tokenizer.pad_token_id, max_length=None)
    if torch.is_grad_enabled():
        loss.backward()
    return float(loss.detach())


def time_steps(model_dir: Path, mode: str, steps: int = STEPS) -> dict[str, Any]:
    """Alternate K-way and naive optimizer steps on one RM; median seconds per step of each."""
    torch.manual_seed(0)
    rm = RewardModel.from_pretrained_lm(model_dir, dtype="float32", device="cpu")
    tokenizer = rm.tokenizer
    configure_trainable(rm, mode, top_layers=2, lora_r=16, lora_alpha=32, lora_dropout=0.0)
    optimizer, _ = build_optimizer(list(rm.named_parameters()), 1e-5, 0.0, (0.9, 0.95), 100, 0.0, 1.0)
    comparison = speed_comparison()
    rm.eval()
    with torch.no_grad():  # same weights, same data: the two losses must agree
        same_kway = kway_step_loss(rm, comparison, tokenizer)
        same_naive, num_pairs = naive_pairwise_loss(rm, comparison, tokenizer, NAIVE_CHUNK)
    rm.train()
    times: dict[str, list[float]] = {"kway": [], "naive": []}
    forwards: dict[str, int] = {}
    for step in range(steps + 1):  # step 0 warms up both paths
        for name in ("kway", "naive"):
            optimizer.zero_grad(set_to_none=True)
            calls = rm.forward_calls
            start = time.perf_counter()
            if name == "kway":
                kway_step_loss(rm, comparison, tokenizer)
            else:
                naive_pairwise_loss(rm, comparison, tokenizer, NAIVE_CHUNK)
            optimizer.step()
            elapsed = time.perf_counter() - start
            print(f"  {mode} step {step} {name}: {elapsed:.2f} s", file=sys.stderr, flush=True)
            forwards[name] = rm.forward_calls - calls
            if step > 0:
                times[name].append(elapsed)
    # min: on a shared machine the fastest repeat is the one least disturbed by other processes
    kway_s, naive_s = min(times["kway"]), min(times["naive"])
    return {"mode": mode, "pairs": num_pairs, "kway_forwards": forwards["kway"], "naive_forwards": forwards["naive"],
            "kway_s": kway_s, "naive_s": naive_s, "speedup": naive_s / kway_s,
            "loss_kway": same_kway, "loss_naive": same_naive, "steps": steps,
            "tokens_per_sequence": _mean_tokens(tokenizer, comparison)}


def _mean_tokens(tokenizer, comparison: Comparison) -> float:
    items = encode_comparisons(tokenizer, [comparison], max_response_length=256)[0]
    return len(items.prompt_ids) + statistics.mean(len(c) for c in items.completion_ids)


# ---------------------------------------------------------------------------- 2. train modes


def mode_run(model_dir: Path, mode: str, lr: float, train: list[Comparison], val: list[Comparison], *,
             epochs: int, top_layers: int, batch_size: int, threads: int | None) -> dict[str, Any]:
    config = RMConfig(train_mode=mode, learning_rate=lr, epochs=epochs, top_layers=top_layers, batch_size=batch_size,
                      warmup_ratio=0.0, device="cpu", dtype="float32", num_threads=threads, show_progress=False)
    with tempfile.TemporaryDirectory() as out:
        result = train_reward_model(model_dir, train, val, config, out)
    return {"mode": mode, "lr": lr, "val_accuracy": result.val["accuracy"],
            "train_s": sum(e["seconds"] for e in result.epochs), "total_s": result.seconds,
            "trainable": result.trainable_params, "total": result.total_params,
            "final_train_loss": result.epochs[-1]["train_loss"]}


def step_seconds_by_mode(model_dir: Path, modes: tuple[str, ...], *, top_layers: int, steps: int = STEPS
                         ) -> dict[str, float]:
    """Best-of-``steps`` seconds per optimizer step (4 prompts x K = 4 = 16 sequences) of each mode, the
    modes' steps alternated in one process so that machine load hits them alike."""
    batch = marker_task(4, seed=7)
    models = {}
    for mode in modes:
        torch.manual_seed(0)
        rm = RewardModel.from_pretrained_lm(model_dir, dtype="float32", device="cpu")
        configure_trainable(rm, mode, top_layers=top_layers, lora_r=16, lora_alpha=32, lora_dropout=0.0)
        optimizer, _ = build_optimizer(list(rm.named_parameters()), 1e-5, 0.0, (0.9, 0.95), 100, 0.0, 1.0)
        models[mode] = (rm.train(), optimizer, encode_comparisons(rm.tokenizer, batch, max_response_length=256))
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for step in range(steps + 1):  # step 0 warms up
        for mode, (rm, optimizer, items) in models.items():
            optimizer.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss, _ = kway_loss(rm, items, rm.tokenizer.pad_token_id, max_length=None)
            loss.backward()
            optimizer.step()
            elapsed = time.perf_counter() - start
            print(f"  {mode} step {step}: {elapsed:.2f} s", file=sys.stderr, flush=True)
            if step > 0:
                times[mode].append(elapsed)
    return {mode: min(t) for mode, t in times.items()}


def mode_comparison(model_dir: Path, grid: dict[str, list[float]], *, n_train: int, n_val: int, epochs: int,
                    top_layers: int, batch_size: int, threads: int | None) -> list[dict[str, Any]]:
    train, val = marker_task(n_train, seed=0), marker_task(n_val, seed=1)
    step_s = step_seconds_by_mode(model_dir, tuple(grid), top_layers=top_layers)
    rows = []
    for mode, lrs in grid.items():
        for lr in lrs:
            rows.append({**mode_run(model_dir, mode, lr, train, val, epochs=epochs, top_layers=top_layers,
                                    batch_size=batch_size, threads=threads), "step_s": step_s[mode]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------- report


def speed_markdown(rows: list[dict[str, Any]], model_name: str) -> str:
    lines = [f"K = {K} completions of one prompt ({rows[0]['pairs']} ordered pairs), model: {model_name}, "
             f"~{rows[0]['tokens_per_sequence']:.0f} tokens per sequence, fp32 CPU, best of {rows[0]['steps']} "
             "optimizer steps after a warm-up step, K-way and naive steps alternated in one process.",
             "",
             "| train mode | K-way: forwards | K-way s/step | naive pairwise: forwards | naive s/step | speed-up |"
             " loss K-way / naive (same weights) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['kway_forwards']} | {r['kway_s']:.2f} | {r['naive_forwards']} | "
                     f"{r['naive_s']:.2f} | **{r['speedup']:.1f}x** | {r['loss_kway']:.5f} / {r['loss_naive']:.5f} |")
    return "\n".join(lines)


def modes_markdown(rows: list[dict[str, Any]], title: str) -> str:
    lines = [title + " Step time: best-of-2 s per optimizer step of 16 sequences, the modes' steps alternated in "
             "one process (robust to machine load); training s: the run's own wall time (runs are sequential, so "
             "load changes between them show there).", "",
             "| train mode | lr | held-out pairwise accuracy | s/step (alternated) | training s | "
             "trainable / total params |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['lr']:g} | {r['val_accuracy']:.3f} | {r['step_s']:.2f} | {r['train_s']:.1f} | "
                     f"{r['trainable'] / 1e6:.2f}M / {r['total'] / 1e6:.1f}M |")
    return "\n".join(lines)


def run(model: str = "embedded", embedded_modes: bool = True, threads: int | None = None,
        speed_modes: tuple[str, ...] = ("full", "top_layers")) -> dict[str, Any]:
    """Run both parts; returns the figures and a "markdown" section."""
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        tiny_dir = build_tiny_model(paths.models_dir() / "tiny-llama-seed0", seed=0)
        speed_dir = ensure_embedded_model() if model == "embedded" else tiny_dir
        model_name = "SmolLM2-135M-Instruct (embedded)" if model == "embedded" else "tiny Llama (hidden 128, 2 layers)"
        speed = [time_steps(speed_dir, mode) for mode in speed_modes]
        for row in speed:
            print(json.dumps(row), flush=True)
        tiny_modes = mode_comparison(tiny_dir, {"full": [1e-3, 3e-3], "lora": [3e-3, 1e-2], "top_layers": [3e-3, 1e-2]},
                                     n_train=64, n_val=32, epochs=1, top_layers=1, batch_size=4, threads=threads)
        sections = [
            "### K-way batched step vs naive pairwise", "", speed_markdown(speed, model_name), "",
            "### Train modes, tiny model", "",
            modes_markdown(tiny_modes, "Tiny Llama (hidden 128, 2 layers, random init), `top_layers=1`, 64 training "
                           "comparisons (K = 4, 6 pairs each), 1 epoch, batch 4 prompts; 32 held-out comparisons "
                           "(192 pairs)."),
        ]
        embedded_rows: list[dict[str, Any]] = []
        if embedded_modes:
            embedded_dir = ensure_embedded_model()
            embedded_rows = mode_comparison(embedded_dir, EMBEDDED_GRID, n_train=EMBEDDED_TRAIN, n_val=EMBEDDED_VAL,
                                            epochs=1, top_layers=2, batch_size=4, threads=threads)
            sections += ["", "### Train modes, embedded model", "",
                         modes_markdown(embedded_rows, f"SmolLM2-135M-Instruct, `top_layers=2` of 30, {EMBEDDED_TRAIN} "
                                        "training comparisons (K = 4), 1 epoch, batch 4 prompts; "
                                        f"{EMBEDDED_VAL} held-out comparisons ({EMBEDDED_VAL * 6} pairs).")]
        return {"speed": speed, "tiny_modes": tiny_modes, "embedded_modes": embedded_rows,
                "markdown": "\n".join(sections) + "\n"}
    finally:
        torch.set_num_threads(previous_threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["embedded", "tiny"], default="embedded",
                        help="model for the speed comparison")
    parser.add_argument("--skip-embedded-modes", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--speed-modes", nargs="+", default=["full", "top_layers"],
                        choices=["full", "lora", "top_layers"])
    args = parser.parse_args(argv)
    result = run(args.model, embedded_modes=not args.skip_embedded_modes, threads=args.threads,
                 speed_modes=tuple(args.speed_modes))
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
