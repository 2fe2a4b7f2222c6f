"""PPO rollouts in the trainer: transformers' `generate` on the trained module
(`HFRolloutGenerator`) vs a vLLM engine kept on the policy's weights (`VLLMRolloutGenerator`).

The workload is PPO's, minus the learning: one policy (`load_causal_lm`, fp32), and per
iteration and shape (B prompts, at most T new tokens), a tiny weight change standing in
for the optimizer step (Gaussian noise, std 1e-4, on every weight), then one sampled
response (temperature 1.0) per prompt from each engine. vLLM first pulls the new weights
(`load_weights`: its sync cost, which transformers does not pay). The two engines
ALTERNATE, iteration by iteration (HF first, then vLLM first), in one process: a load
from other processes hits both alike, and only ratios within one run mean anything.
Sampled lengths differ between engines (EOS comes at random), so tokens/s is the fair
speed; seconds per iteration is what PPO waits.

Correctness, once, after the timed loop: a larger weight change (std 3e-3, enough to
change greedy answers), a sync, then vLLM's greedy rollouts must equal transformers'
greedy rollouts of the updated policy token for token.

    python -m bench.rollouts [--iterations 3] [--batch-sizes 12 16] [--max-new-tokens 40 64]
                             [--hf-threads N] [--vllm-threads-bind auto]   # markdown on stdout
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

ITERATIONS = 3
BATCH_SIZES = (12, 16)
MAX_NEW_TOKENS = (40, 64)
TEMPERATURE = 1.0
STEP_NOISE_STD = 1e-4  # the stand-in for one optimizer step
CHECK_NOISE_STD = 3e-3  # measured: enough to change SmolLM2's greedy answers
CHECK_PROMPTS = 6
CHECK_MAX_NEW_TOKENS = 32


@dataclass
class IterationFigures:
    """One engine's rollouts for one iteration and shape."""

    engine: str  # "hf" | "vllm"
    batch_size: int
    max_new_tokens: int
    iteration: int
    generate_s: float
    sync_s: float  # 0 for transformers: it samples from the trained module itself
    tokens: int  # response tokens, EOS included
    stopped: int  # responses that ended with EOS

    @property
    def total_s(self) -> float:
        return self.generate_s + self.sync_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.generate_s


def prompt_batches(batch_size: int, count: int, offset: int = 0) -> list[list[Any]]:
    """`count` batches of `batch_size` shipped prompts, consecutive, no prompt reused
    (wrapping around the set only when it runs out)."""
    from clients.prompts import load_prompts
    from trainer.examples import PromptExample, user_turn

    pool = [PromptExample(p.id, user_turn(p.text)) for p in load_prompts()]
    flat = [pool[(offset + i) % len(pool)] for i in range(batch_size * count)]
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]


def perturb_(model: Any, std: float, seed: int) -> None:
    """Add N(0, std^2) noise to every weight in place: a stand-in for an optimizer step."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)


def timed_rollouts(engine: str, generator: Any, policy: Any, prompts: Sequence[Any], max_new_tokens: int,
                   iteration: int, seed: int) -> IterationFigures:
    """One engine's turn: sync (vLLM only), then one sampled response per prompt."""
    sync_s = generator.load_weights(policy) if engine == "vllm" else 0.0
    start = time.perf_counter()
    rollouts = generator.generate(prompts, max_new_tokens=max_new_tokens, temperature=TEMPERATURE, seed=seed)
    generate_s = time.perf_counter() - start
    return IterationFigures(engine, len(prompts), max_new_tokens, iteration, generate_s, sync_s,
                            sum(rollouts.response_lengths), sum(rollouts.stopped))


def alternating_runs(generators: dict[str, Any], policy: Any, iterations: int, batch_sizes: Sequence[int],
                     max_new_tokens: Sequence[int]) -> list[IterationFigures]:
    """Every (iteration, shape): one weight change, then both engines, the first one alternating."""
    shapes = [(b, t) for b in batch_sizes for t in max_new_tokens]
    batches = {b: prompt_batches(b, iterations * len(max_new_tokens), offset=i * 97)
               for i, b in enumerate(batch_sizes)}
    figures, turn = [], 0
    for iteration in range(iterations):
        for b, t in shapes:
            prompts = batches[b][iteration * len(max_new_tokens) + max_new_tokens.index(t)]
            perturb_(policy, STEP_NOISE_STD, seed=turn)
            order = ("hf", "vllm") if turn % 2 == 0 else ("vllm", "hf")
            for engine in order:
                figures.append(timed_rollouts(engine, generators[engine], policy, prompts, t, iteration, seed=turn))
                _progress(figures[-1])
            turn += 1
    return figures


def greedy_check(generators: dict[str, Any], policy: Any) -> dict[str, Any]:
    """A visible weight change, a sync, then vLLM's greedy rollouts vs transformers'."""
    prompts = prompt_batches(CHECK_PROMPTS, 1, offset=200)[0]
    before = generators["hf"].generate(prompts, CHECK_MAX_NEW_TOKENS, temperature=0.0).response_ids
    perturb_(policy, CHECK_NOISE_STD, seed=10_000)
    sync_s = generators["vllm"].load_weights(policy)
    hf = generators["hf"].generate(prompts, CHECK_MAX_NEW_TOKENS, temperature=0.0).response_ids
    vllm = generators["vllm"].generate(prompts, CHECK_MAX_NEW_TOKENS, temperature=0.0).response_ids
    return {
        "prompts": len(prompts),
        "max_new_tokens": CHECK_MAX_NEW_TOKENS,
        "equal": sum(a == b for a, b in zip(hf, vllm)),
        "changed_by_update": sum(a != b for a, b in zip(before, hf)),
        "sync_s": sync_s,
    }


def _progress(f: IterationFigures) -> None:
    print(f"[bench.rollouts] {f.engine:4s} B={f.batch_size} T={f.max_new_tokens} it={f.iteration}: "
          f"generate {f.generate_s:.2f} s, sync {f.sync_s:.2f} s, {f.tokens} tokens, {f.tokens_per_s:.0f} tok/s",
          file=sys.stderr, flush=True)


def run(model_dir: Path | None = None, iterations: int = ITERATIONS, batch_sizes: Sequence[int] = BATCH_SIZES,
        max_new_tokens: Sequence[int] = MAX_NEW_TOKENS, *, hf_threads: int | None = None,
        vllm_threads_bind: str | None = None) -> dict[str, Any]:
    """Both engines on `model_dir` (default: the embedded model); markdown under "markdown".
    hf_threads: torch threads for transformers (None: torch's default); vllm_threads_bind:
    VLLM_CPU_OMP_THREADS_BIND for the engine (None: the trainer's default)."""
    import torch

    from common.models import ensure_embedded_model, load_causal_lm, load_tokenizer
    from trainer.rollout import HFRolloutGenerator
    from trainer.rollout_vllm import VLLMRolloutGenerator

    if hf_threads is not None:
        torch.set_num_threads(hf_threads)
    model_dir = Path(model_dir) if model_dir else ensure_embedded_model()
    tokenizer = load_tokenizer(model_dir)
    policy = load_causal_lm(model_dir, dtype=torch.float32, device="cpu")
    batch_sizes, max_new_tokens = list(batch_sizes), list(max_new_tokens)
    with VLLMRolloutGenerator(model_dir, tokenizer, max_model_len=1024, dtype="float32",
                              max_num_seqs=max(batch_sizes), omp_threads_bind=vllm_threads_bind) as vllm:
        generators = {"hf": HFRolloutGenerator(policy, tokenizer, batch_size=max(batch_sizes)), "vllm": vllm}
        _warm_up(generators, policy)
        figures = alternating_runs(generators, policy, iterations, batch_sizes, max_new_tokens)
        check = greedy_check(generators, policy)
        startup_s = vllm.startup_seconds
    result = {
        "model": model_dir.name,
        "iterations": iterations,
        "hf_threads": torch.get_num_threads(),
        "vllm_threads_bind": vllm_threads_bind or os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "vllm_startup_s": startup_s,
        "runs": [asdict(f) | {"total_s": f.total_s, "tokens_per_s": f.tokens_per_s} for f in figures],
        "summary": summarize(figures),
        "greedy_check": check,
        "load_average": os.getloadavg(),
    }
    result["markdown"] = markdown(result)
    return result


def _warm_up(generators: dict[str, Any], policy: Any) -> None:
    """One untimed round of each engine and one sync: first calls pay one-off costs."""
    prompts = prompt_batches(2, 1, offset=250)[0]
    generators["vllm"].load_weights(policy)
    for generator in generators.values():
        generator.generate(prompts, max_new_tokens=4, temperature=TEMPERATURE, seed=0)


def summarize(figures: Sequence[IterationFigures]) -> list[dict[str, Any]]:
    """Per shape and over all shapes: means per iteration of each engine, and HF / vLLM ratios."""
    keys = sorted({(f.batch_size, f.max_new_tokens) for f in figures}) + [None]
    rows = []
    for key in keys:
        chosen = [f for f in figures if key is None or (f.batch_size, f.max_new_tokens) == key]
        hf = [f for f in chosen if f.engine == "hf"]
        vllm = [f for f in chosen if f.engine == "vllm"]
        row = {"shape": "all" if key is None else f"{key[0]} x {key[1]}"}
        for name, rows_ in (("hf", hf), ("vllm", vllm)):
            row[f"{name}_generate_s"] = statistics.mean(f.generate_s for f in rows_)
            row[f"{name}_sync_s"] = statistics.mean(f.sync_s for f in rows_)
            row[f"{name}_total_s"] = statistics.mean(f.total_s for f in rows_)
            row[f"{name}_tokens_per_s"] = sum(f.tokens for f in rows_) / sum(f.generate_s for f in rows_)
        row["speedup_total"] = row["hf_total_s"] / row["vllm_total_s"]
        row["speedup_tokens_per_s"] = row["vllm_tokens_per_s"] / row["hf_tokens_per_s"]
        rows.append(row)
    return rows


def markdown(r: dict[str, Any]) -> str:
    """The figures as a markdown section: the summary, then every iteration."""
    check = r["greedy_check"]
    lines = [
        f"Model {r['model']}, fp32, temperature {TEMPERATURE}, one response per prompt; per iteration a "
        f"weight change (noise std {STEP_NOISE_STD}), then both engines, alternating which goes first; "
        f"vLLM syncs the weights first. transformers: {r['hf_threads']} torch threads; vLLM: "
        f"`VLLM_CPU_OMP_THREADS_BIND={r['vllm_threads_bind']}`. Means of {r['iterations']} iterations. "
        f"Load average when done: {', '.join(f'{x:.1f}' for x in r['load_average'])}.",
        "",
        "| B x max new tokens | HF generate s | vLLM generate s | vLLM sync s | vLLM total s | HF tok/s | "
        "vLLM tok/s | HF total / vLLM total | vLLM / HF tok/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in r["summary"]:
        lines.append(
            f"| {s['shape']} | {s['hf_generate_s']:.2f} | {s['vllm_generate_s']:.2f} | {s['vllm_sync_s']:.2f} | "
            f"{s['vllm_total_s']:.2f} | {s['hf_tokens_per_s']:.0f} | {s['vllm_tokens_per_s']:.0f} | "
            f"{s['speedup_total']:.2f} | {s['speedup_tokens_per_s']:.2f} |")
    lines += [
        "",
        f"vLLM start-up (once per trainer process): {r['vllm_startup_s']:.1f} s. Greedy check after a sync "
        f"(noise std {CHECK_NOISE_STD}; it changed {check['changed_by_update']} of {check['prompts']} HF greedy "
        f"answers): vLLM equals transformers token for token on {check['equal']} of {check['prompts']} prompts "
        f"({check['max_new_tokens']} new tokens).",
        "",
        "Every iteration, in the order run:",
        "",
        "| iteration | B x T | engine | generate s | sync s | total s | tokens | stopped | tok/s |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for f in r["runs"]:
        lines.append(
            f"| {f['iteration']} | {f['batch_size']} x {f['max_new_tokens']} | {f['engine']} | {f['generate_s']:.2f} | "
            f"{f['sync_s']:.2f} | {f['total_s']:.2f} | {f['tokens']} | {f['stopped']} | {f['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model folder (default: the embedded model)")
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=list(MAX_NEW_TOKENS))
    parser.add_argument("--hf-threads", type=int, help="torch threads for transformers (default: torch's)")
    parser.add_argument("--vllm-threads-bind", help="VLLM_CPU_OMP_THREADS_BIND for the engine (default: auto)")
    args = parser.parse_args(argv)
    result = run(args.model, args.iterations, args.batch_sizes, args.max_new_tokens,
                 hf_threads=args.hf_threads, vllm_threads_bind=args.vllm_threads_bind)
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
