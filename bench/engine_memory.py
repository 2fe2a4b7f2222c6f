"""Does the vLLM engine's memory grow with the requests it serves, or with what it has seen?

The soak (`bench.soak`) found the server tree's RSS growing in steps, all of it in the
vLLM worker's anonymous memory (the gRPC server process and the engine core stay flat).
A leak grows with every request served; a cache (kernels or buffers per batch shape, the
allocator's free lists) grows while new shapes arrive and then stops. This replays ONE
fixed workload several times through the server's own engine (`VLLMEngine`, the embedded
model): 16 concurrent greedy requests over the same prompts, the same token budget, pass
after pass. Each pass serves as many requests as the first; if the worker's anonymous
memory grows in the first passes and then not at all, what grows is bounded by the
workload's variety, not by the traffic.

    python -m bench.engine_memory [--passes 15] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

from bench.engines import PROMPTS
from bench.soak import tree_memory_mb

CONCURRENCY = 16
PASSES = 15
MAX_TOKENS = 32


def worker_anon_mb() -> dict[str, float]:
    """Anonymous RSS (MiB) of each process of this process's tree, by process name."""
    return {name.rsplit(":", 1)[0]: kinds["RssAnon"] for name, kinds in tree_memory_mb(os.getpid()).items()}


async def one_pass(engine: Any, ids: list[list[int]], max_tokens: int, tag: str) -> int:
    from server.engines import SamplingOptions

    options = SamplingOptions(n=1, max_new_tokens=max_tokens, temperature=0.0)
    queue = list(enumerate(ids))
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while queue:
            i, prompt_ids = queue.pop()
            async for update in engine.generate(f"{tag}-{i}", prompt_ids, options):
                if update.finished:
                    tokens += update.completion_tokens

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return tokens


def run(passes: int = PASSES, max_tokens: int = MAX_TOKENS, model_dir: Path | None = None) -> dict[str, Any]:
    from common.models import ensure_embedded_model
    from server.engines import create_engine

    model_dir = Path(model_dir) if model_dir else ensure_embedded_model()

    async def measure() -> list[dict[str, Any]]:
        engine = create_engine("vllm", model_dir, 0, max_model_len=2048, max_num_seqs=CONCURRENCY)
        await engine.start()
        try:
            ids = [engine.render_chat([{"role": "user", "content": p}]) for p in PROMPTS]
            rows = [{"pass": 0, "tokens": 0, "seconds": 0.0, "anon_mb": worker_anon_mb()}]
            for k in range(1, passes + 1):
                started = time.perf_counter()
                tokens = await one_pass(engine, ids, max_tokens, f"p{k}")
                rows.append({"pass": k, "tokens": tokens, "seconds": time.perf_counter() - started,
                             "anon_mb": worker_anon_mb()})
                print(rows[-1], flush=True)
            return rows
        finally:
            await engine.shutdown()

    rows = asyncio.run(measure())
    result = {"model": model_dir.name, "prompts": len(PROMPTS), "max_tokens": max_tokens, "rows": rows,
              "load_average": os.getloadavg()}
    result["markdown"] = markdown(result)
    return result


def markdown(r: dict[str, Any]) -> str:
    names = sorted({name for row in r["rows"] for name in row["anon_mb"]}, key=lambda n: -r["rows"][-1]["anon_mb"].get(n, 0))
    header = "| pass | tokens | seconds | " + " | ".join(f"{n} anon MiB (change)" for n in names) + " |"
    lines = [f"`python -m bench.engine_memory`: {r['model']}, the same {r['prompts']} prompts every pass, "
             f"{CONCURRENCY} concurrent greedy requests of at most {r['max_tokens']} tokens. Load average "
             f"{', '.join(f'{x:.1f}' for x in r['load_average'])}.", "", header,
             "| --- | ---: | ---: |" + " ---: |" * len(names)]
    previous = r["rows"][0]["anon_mb"]
    for row in r["rows"]:
        cells = [f"{row['anon_mb'].get(n, 0):.0f} ({row['anon_mb'].get(n, 0) - previous.get(n, 0):+.0f})" for n in names]
        lines.append(f"| {row['pass']} | {row['tokens']} | {row['seconds']:.1f} | " + " | ".join(cells) + " |")
        previous = row["anon_mb"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", type=int, default=PASSES)
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    args = parser.parse_args(argv)
    print(run(args.passes, args.max_tokens)["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
