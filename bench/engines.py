"""Engine-level serving figures: throughput of vLLM offline vs the AsyncLLM engine wrapper
(vs HF), and the stall of a hot swap under load. No gRPC here (bench/serving.py does that).

1. Throughput, greedy, on the same chat prompts: vLLM's offline `LLM.generate` (the
   ceiling: one call, the whole batch known up front), `VLLMEngine` driven by 16
   concurrent streaming tasks (what the server does), the HF engine driven the same way
   (batched), and transformers one prompt at a time (the naive baseline). Greedy fp32
   everywhere, so every engine generates the same tokens; tokens/s counts them.
2. Swap under load: 16 concurrent streaming greedy generations loop on `VLLMEngine`;
   once all are mid-stream, a swap to another checkpoint: drain (in-flight requests
   finish on the old weights), load (in-place reload), stall (how long new requests
   waited), time until the first token of the new version, failures, mixed versions.

    python -m bench.engines [--model DIR] [--new DIR] [--no-hf]   # markdown on stdout
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

CONCURRENCY = 16
MAX_TOKENS = 64
HF_SEQUENTIAL_PROMPTS = 8  # transformers alone runs ~15 tok/s here: keep it to ~30 s

# Chat prompts that draw answers of a few sentences from SmolLM2-135M-Instruct.
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a rainbow forms.",
    "Describe your ideal weekend in detail.",
    "What are the benefits of regular exercise?",
    "Explain the water cycle to a ten-year-old.",
    "Write a poem about autumn leaves.",
    "How does a bicycle stay upright?",
    "Give me three tips for learning a new language.",
    "Describe the city of Paris to someone who has never been there.",
    "Why do cats purr?",
    "Explain what a computer program is.",
    "Write a letter to a friend about a recent trip.",
    "What makes a good teacher?",
    "Describe how bread is made.",
    "Explain why the sky is blue.",
    "Tell me about the history of the bicycle.",
    "What should I pack for a camping trip?",
    "Explain photosynthesis in simple terms.",
    "Write a short dialogue between a robot and a child.",
    "How do airplanes fly?",
    "Describe a busy market in the morning.",
    "What are some ways to save energy at home?",
    "Explain how vaccines work.",
    "Write a recipe for a simple vegetable soup.",
    "What is the difference between weather and climate?",
    "Describe the life cycle of a butterfly.",
    "Give advice to someone starting their first job.",
    "Explain how the moon affects the tides.",
    "Write a short speech for a school graduation.",
    "Why is sleep important?",
    "Describe a thunderstorm.",
    "How do bees make honey?",
]


def chat_prompt_ids(model_dir: Path, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt as one user turn through the model's chat template."""
    from common.chat import render_chat_ids
    from common.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    return [render_chat_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]


def _rate(tokens: int, seconds: float, **extra: Any) -> dict[str, Any]:
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, **extra}


# ---------------------------------------------------------------- throughput


def offline_vllm_throughput(model_dir: Path, prompts: Sequence[str], max_tokens: int = MAX_TOKENS,
                            *, dtype: str | None = None, max_num_seqs: int | None = None) -> dict[str, Any]:
    """vLLM's offline `LLM.generate` on all prompts in one call, greedy; start-up excluded.
    `max_num_seqs` caps the sequences the engine runs at once (None: vLLM's default)."""
    from common.vllm_env import set_vllm_env_defaults

    set_vllm_env_defaults()  # before vllm is imported (common.vllm_env says why)
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.platforms import current_platform

    started = time.perf_counter()
    llm = LLM(model=str(model_dir), dtype=dtype or ("float32" if current_platform.is_cpu() else "bfloat16"),
              enforce_eager=current_platform.is_cpu(), max_model_len=2048, disable_log_stats=True,
              **({"max_num_seqs": max_num_seqs} if max_num_seqs else {}))
    startup = time.perf_counter() - started
    try:
        inputs = [TokensPrompt(prompt_token_ids=ids) for ids in chat_prompt_ids(model_dir, prompts)]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        start = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    finally:
        llm.llm_engine.engine_core.shutdown()
    return _rate(sum(len(o.outputs[0].token_ids) for o in outputs), seconds, startup_s=startup,
                 max_num_seqs=max_num_seqs)


async def engine_throughput(engine: Any, prompt_ids: Sequence[list[int]], max_tokens: int = MAX_TOKENS,
                            *, concurrency: int = CONCURRENCY) -> dict[str, Any]:
    """A started Engine driven by `concurrency` tasks that stream greedy generations of
    the prompts (taken in turn from a shared queue) until none are left."""
    from server.engines.base import SamplingOptions

    queue: asyncio.Queue[tuple[int, list[int]]] = asyncio.Queue()
    for item in enumerate(prompt_ids):
        queue.put_nowait(item)
    options = SamplingOptions(temperature=0.0, max_new_tokens=max_tokens)
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while not queue.empty():
            i, ids = queue.get_nowait()
            async for update in engine.generate(f"bench-{i}", ids, options):
                if update.finished:
                    tokens += update.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return _rate(tokens, time.perf_counter() - start, concurrency=concurrency)


def hf_engine_throughput(model_dir: Path, prompts: Sequence[str], max_tokens: int = MAX_TOKENS,
                         *, concurrency: int = CONCURRENCY, max_batch_size: int = 8) -> dict[str, Any]:
    """The HF engine (batched) driven like the vLLM wrapper."""
    from server.engines.hf import HFEngine

    async def measure() -> dict[str, Any]:
        engine = HFEngine(model_dir, 1, max_batch_size=max_batch_size, device="cpu")
        await engine.start()
        try:
            result = await engine_throughput(engine, chat_prompt_ids(model_dir, prompts), max_tokens,
                                             concurrency=concurrency)
            return {**result, "max_batch_rows": engine.stats()["max_batch_rows"]}
        finally:
            await engine.shutdown()

    return asyncio.run(measure())


def sequential_hf_throughput(model_dir: Path, prompts: Sequence[str], max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """transformers `model.generate`, greedy, one prompt at a time; loading excluded."""
    import torch

    from common.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, dtype=torch.float32, device="cpu")
    tokens = 0
    start = time.perf_counter()
    for ids in chat_prompt_ids(model_dir, prompts):
        prompt = torch.tensor([ids])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id)
        tokens += out.shape[1] - prompt.shape[1]
    return _rate(tokens, time.perf_counter() - start)


# ---------------------------------------------------------------- swap under load


@dataclass
class _SwapRun:
    """What the streaming clients saw around one swap."""

    new_version: int
    swap_called: float = 0.0
    swap_returned: float = 0.0
    first_new_token: float | None = None
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    mixed_versions: int = 0
    waits_during_swap: list[float] = field(default_factory=list)  # time to first token


async def swap_under_load(engine: Any, prompt_ids: Sequence[list[int]], new_dir: Path, new_version: int,
                          *, streams: int = CONCURRENCY, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """`streams` clients loop on greedy streaming generations; when every client is
    mid-stream, swap to `new_dir`. Each client stops after one request that started
    after the swap returned."""
    from server.engines.base import SamplingOptions

    run = _SwapRun(new_version)
    options = SamplingOptions(temperature=0.0, max_new_tokens=max_tokens)
    mid_stream = [asyncio.Event() for _ in range(streams)]
    swapped = asyncio.Event()

    async def one_request(client: int, k: int) -> None:
        started, versions, first = time.perf_counter(), set(), None
        during_swap = bool(run.swap_called) and not swapped.is_set()
        async for update in engine.generate(f"swap-{client}-{k}", prompt_ids[(client + k) % len(prompt_ids)], options):
            now = time.perf_counter()
            first = first if first is not None else now
            versions.add(update.policy_version)
            mid_stream[client].set()
            if update.policy_version == new_version and run.first_new_token is None:
                run.first_new_token = now
        run.requests += 1
        run.mixed_versions += len(versions) > 1
        if during_swap and first is not None:
            run.waits_during_swap.append(first - started)

    async def client(i: int) -> None:
        k, after = 0, False
        while not after:
            after = swapped.is_set()
            try:
                await one_request(i, k)
            except Exception as e:  # counted, never expected
                run.failures.append(f"client {i}: {e!r}")
                return
            k += 1

    tasks = [asyncio.create_task(client(i)) for i in range(streams)]
    await asyncio.gather(*(e.wait() for e in mid_stream))
    run.swap_called = time.perf_counter()
    result = await engine.swap(new_dir, new_version)
    run.swap_returned = time.perf_counter()
    swapped.set()
    await asyncio.gather(*tasks)
    return {
        "drain_s": result.drain_seconds,
        "load_s": result.load_seconds,
        "stall_s": result.stall_seconds,
        "swap_call_s": run.swap_returned - run.swap_called,
        "first_new_token_after_swap_call_s": (run.first_new_token or float("nan")) - run.swap_called,
        "max_wait_of_requests_started_during_swap_s": max(run.waits_during_swap, default=0.0),
        "requests": run.requests,
        "failures": len(run.failures),
        "mixed_version_requests": run.mixed_versions,
        "streams": streams,
    }


def vllm_engine_figures(model_dir: Path, new_dir: Path, prompts: Sequence[str],
                        max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """One VLLMEngine start: its start-up time, its throughput, then a swap under load."""
    from server.engines.vllm import VLLMEngine

    async def measure() -> dict[str, Any]:
        # The drain mode: this section measures the drain (bench.swap compares the modes).
        engine = VLLMEngine(model_dir, 1, max_model_len=2048, max_num_seqs=CONCURRENCY, swap_mode="drain")
        await engine.start()
        try:
            ids = chat_prompt_ids(model_dir, prompts)
            throughput = await engine_throughput(engine, ids, max_tokens)
            swap = await swap_under_load(engine, ids, new_dir, 2, max_tokens=max_tokens)
            return {"startup_s": engine.startup_seconds, "throughput": throughput, "swap": swap}
        finally:
            await engine.shutdown()

    return asyncio.run(measure())


# ---------------------------------------------------------------- report


def _linked_copy(src: Path, parent: Path) -> Path:
    """A second checkpoint folder with the same files (hard links: no extra disk). The
    reload reads it like any new checkpoint; its weights being equal does not change
    the timing."""
    dst = parent / f"{src.name}-v2"
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def _progress(name: str, figures: dict[str, Any]) -> dict[str, Any]:
    """Print one part's figures as soon as they exist (a later part may be slow or fail)."""
    print(f"[bench.engines] {name}: {json.dumps(figures, default=str)}", file=sys.stderr, flush=True)
    return figures


def run(model_dir: Path | None = None, new_dir: Path | None = None, prompts: Sequence[str] = PROMPTS,
        max_tokens: int = MAX_TOKENS, *, hf: bool = True) -> dict[str, Any]:
    """All figures on `model_dir` (default: the embedded model); markdown under "markdown".
    hf=False skips the two transformers rows (minutes on a busy CPU)."""
    from common.models import ensure_embedded_model

    model_dir = Path(model_dir) if model_dir else ensure_embedded_model()
    result: dict[str, Any] = {"model": model_dir.name, "prompts": len(prompts), "max_tokens": max_tokens}
    with tempfile.TemporaryDirectory(dir=model_dir.parent) as tmp:
        new_dir = Path(new_dir) if new_dir else _linked_copy(model_dir, Path(tmp))
        result["vllm_offline"] = _progress("vllm_offline", offline_vllm_throughput(model_dir, prompts, max_tokens))
        result["vllm_engine"] = _progress("vllm_engine", vllm_engine_figures(model_dir, new_dir, prompts, max_tokens))
    if hf:
        result["hf_engine"] = _progress("hf_engine", hf_engine_throughput(model_dir, prompts, max_tokens))
        result["hf_sequential"] = _progress("hf_sequential", sequential_hf_throughput(
            model_dir, prompts[:HF_SEQUENTIAL_PROMPTS], max_tokens))
    result["load_average"] = os.getloadavg()
    result["markdown"] = markdown(result)
    return result


def markdown(r: dict[str, Any]) -> str:
    """The figures as a markdown section."""
    offline, engine, swap = r["vllm_offline"], r["vllm_engine"]["throughput"], r["vllm_engine"]["swap"]
    rows = [
        ("vLLM offline `LLM.generate` (all prompts in one call)", offline, "1.00"),
        (f"`VLLMEngine`, {engine['concurrency']} concurrent streaming tasks", engine, None),
    ]
    if "hf_engine" in r:
        rows += [
            (f"`HFEngine` (batches of <= {r['hf_engine']['max_batch_rows']} rows), {CONCURRENCY} concurrent tasks",
             r["hf_engine"], None),
            (f"transformers `generate`, one prompt at a time (first {HF_SEQUENTIAL_PROMPTS} prompts)",
             r["hf_sequential"], None),
        ]
    lines = [
        f"Model {r['model']}, fp32, greedy, {r['prompts']} chat prompts, at most {r['max_tokens']} new tokens "
        f"(answers may end earlier at EOS; every engine generates the same greedy tokens). "
        f"Load average when done: {', '.join(f'{x:.1f}' for x in r['load_average'])}.",
        "",
        "| engine | tokens | seconds | tokens/s | vs offline vLLM |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, fig, ratio in rows:
        ratio = ratio or f"{fig['tokens_per_s'] / offline['tokens_per_s']:.2f}"
        lines.append(f"| {name} | {fig['tokens']} | {fig['seconds']:.1f} | {fig['tokens_per_s']:.0f} | {ratio} |")
    lines += [
        "",
        f"vLLM start-up: offline `LLM` {offline['startup_s']:.1f} s, `VLLMEngine` {r['vllm_engine']['startup_s']:.1f} s.",
        "",
        f"Swap under load ({swap['streams']} concurrent streaming greedy generations, reload in place):",
        "",
        "| drain | load | stall (gate closed) | first new-version token after the swap call | "
        "longest wait of a request started during the swap | requests | failed | mixed versions |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {swap['drain_s']:.2f} s | {swap['load_s']:.2f} s | {swap['stall_s']:.2f} s | "
        f"{swap['first_new_token_after_swap_call_s']:.2f} s | {swap['max_wait_of_requests_started_during_swap_s']:.2f} s | "
        f"{swap['requests']} | {swap['failures']} | {swap['mixed_version_requests']} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="model folder (default: the embedded model)")
    parser.add_argument("--new", type=Path, help="checkpoint to swap to (default: a linked copy of --model)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    args = parser.parse_args(argv)
    result = run(args.model, args.new, PROMPTS[: args.prompts], args.max_tokens, hf=not args.no_hf)
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
