"""Serving through gRPC, end to end, on the embedded model, in ONE run:

1. Throughput. The same chat prompts, greedy, at most MAX_TOKENS new tokens each:
   - the server (vLLM engine, real store with synchronous=FULL, real auth, every sample
     logged before it is answered) driven by 16 concurrent streaming gRPC clients;
   - vLLM's offline `LLM.generate` (all prompts in one call: the ceiling), goal: the
     server reaches >= 0.85 of it; and the same call with the engine capped at 16 sequences
     at once, as the server's engine is (16 clients never have more in flight): that ratio
     isolates what serving costs (gRPC, auth, streaming, logging) from batch size;
   - transformers `generate`, one prompt at a time (the naive baseline), goal: >= 3x.
   Greedy fp32 everywhere, so all generate the same tokens; tokens/s counts them.
2. Time to first token seen by the clients during the throughput run: p50 and p99.
3. A hot swap under load, in the server's default swap mode (`keep` on vLLM): the 16
   clients keep streaming; once all are mid-stream the admin calls SwapPolicy. Reported:
   the server's stall, the call's duration, the time until a client received the first
   token of the new version, failed requests (must be 0), and completions whose tokens
   came from two versions (recorded as such; `bench.swap` compares the modes).

For the throughput run the clients live in a child process (real clients run elsewhere;
in the server's own interpreter they would compete for its GIL); the swap run keeps them
in the server's event loop. The vLLM engine core runs in its own process as always. Baselines come from `bench.engines` (same prompts, same
token budget). Figures on a shared machine move with its load: the load average is
printed with them.

    python -m bench.serving [--prompts N] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from bench.engines import MAX_TOKENS, PROMPTS, offline_vllm_throughput, sequential_hf_throughput

CLIENTS = 16
HF_SEQUENTIAL_PROMPTS = 8  # transformers alone runs ~15 tok/s here: keep it to ~30 s
GOAL_VS_OFFLINE = 0.85
GOAL_VS_SEQUENTIAL = 3.0


# ---------------------------------------------------------------- the server under test


def _link_or_copy(src: Path, dst: Path) -> None:
    """Fill checkpoint folder `dst` with `src`'s model files (hard links when possible)."""
    for path in sorted(p for p in src.iterdir() if p.is_file() and p.name != "rlhf-model.json"):
        try:
            os.link(path, dst / path.name)
        except OSError:
            shutil.copyfile(path, dst / path.name)


def publish_versions(model_dir: Path, root: Path, store: Any) -> None:
    """v0 (serving) and v1 (a candidate with the same weights: a reload costs the same)."""
    from common.checkpoints import write_checkpoint
    from common.store import add_policy

    for version in (0, 1):
        path = write_checkpoint(root, version, lambda d: _link_or_copy(model_dir, d), parent_version=None,
                                cycle_id=None, base_model=model_dir.name)
        store.write_sync(add_policy(version, str(path), status="serving" if version == 0 else "candidate"))


@dataclass
class Request:
    """What one client saw of one streamed request."""

    started: float
    first_token: float | None = None
    finished: float = 0.0
    tokens: int = 0
    versions: set[int] = field(default_factory=set)
    first_token_of: dict[int, float] = field(default_factory=dict)  # version -> when


async def stream_one(client: Any, prompt: str, max_tokens: int,
                     on_first_token: asyncio.Event | None = None) -> Request:
    """One greedy GenerateStream; timestamps of the first token (per version) and the end."""
    request = Request(started=time.perf_counter())
    async for event in client.generate_stream(prompt, temperature=0, max_new_tokens=max_tokens, timeout=600):
        now = time.perf_counter()
        request.versions.add(event.policy_version)
        if event.text_delta and request.first_token is None:
            request.first_token = now
            if on_first_token is not None:
                on_first_token.set()
        request.first_token_of.setdefault(event.policy_version, now)
        if event.HasField("completion"):
            request.tokens += event.completion.completion_tokens
            request.versions.update(s.policy_version for s in event.completion.version_spans)
    request.finished = time.perf_counter()
    return request


async def throughput(target: str, key: str, prompts: Sequence[str], max_tokens: int) -> dict[str, Any]:
    """CLIENTS concurrent streaming clients take the prompts from a shared queue until none is left."""
    from clients.client import AsyncRlhfClient

    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    done: list[Request] = []

    async def client_loop() -> None:
        async with AsyncRlhfClient(target, key) as client:
            while not queue.empty():
                done.append(await stream_one(client, queue.get_nowait(), max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(CLIENTS)))
    seconds = time.perf_counter() - start
    ttfts = sorted(r.first_token - r.started for r in done if r.first_token is not None)
    tokens = sum(r.tokens for r in done)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "requests": len(done),
            "ttft_p50_s": _percentile(ttfts, 50), "ttft_p99_s": _percentile(ttfts, 99)}


def throughput_in_own_process(target: str, key: str, prompts: Sequence[str], max_tokens: int) -> dict[str, Any]:
    """`throughput` run in a child process (spawned), as real clients run elsewhere: the
    clients' protobuf and asyncio work does not share the server's interpreter."""
    return asyncio.run(throughput(target, key, prompts, max_tokens))


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def swap_under_load(target: str, key: str, prompts: Sequence[str], max_tokens: int,
                          new_version: int) -> dict[str, Any]:
    """CLIENTS clients stream in a loop; when all are mid-stream, swap; each stops after one
    request that started after the swap returned."""
    import grpc

    from clients.client import AsyncRlhfClient

    mid_stream = [asyncio.Event() for _ in range(CLIENTS)]
    swapped = asyncio.Event()
    requests: list[Request] = []
    failures: list[str] = []

    async def client_loop(i: int) -> None:
        async with AsyncRlhfClient(target, key) as client:
            k, after = 0, False
            while not after:
                after = swapped.is_set()
                prompt = prompts[(i + k) % len(prompts)]
                k += 1
                try:
                    requests.append(await stream_one(client, prompt, max_tokens, mid_stream[i]))
                except grpc.aio.AioRpcError as e:
                    failures.append(f"client {i}: {e.code().name}: {e.details()}")
                    mid_stream[i].set()  # never keep the operator waiting for a failed client
                    return

    async def operator() -> dict[str, Any]:
        async with AsyncRlhfClient(target, key) as admin:
            await asyncio.gather(*(e.wait() for e in mid_stream))
            called = time.perf_counter()
            response = await admin.swap_policy(new_version, timeout=600)
            returned = time.perf_counter()
            swapped.set()
            return {"called": called, "returned": returned, "response": response}

    swap, *_ = await asyncio.gather(operator(), *(client_loop(i) for i in range(CLIENTS)))
    first_new = min((r.first_token_of[new_version] for r in requests if new_version in r.first_token_of),
                    default=float("nan"))
    return {
        "swap_mode": swap["response"].swap_mode,
        "stall_s": swap["response"].stall_seconds,
        "swap_call_s": swap["returned"] - swap["called"],
        "server_total_s": swap["response"].total_seconds,
        "first_new_token_after_call_s": first_new - swap["called"],
        "requests": len(requests),
        "failures": len(failures),
        "mixed_version_requests": sum(len(r.versions) > 1 for r in requests),
    }


def server_figures(model_dir: Path, prompts: Sequence[str], max_tokens: int) -> dict[str, Any]:
    """Start the real server (vLLM engine) on v0, measure throughput + TTFT, then swap to v1 under load."""
    from common.identity import generate_api_key, hash_api_key
    from common.store import Store, add_api_key
    from server.app import build_server
    from server.config import ServerConfig
    from server.engines import create_engine

    async def measure(tmp: Path) -> dict[str, Any]:
        store = Store(tmp / "store.sqlite")
        try:
            publish_versions(model_dir, tmp / "checkpoints", store)
            key = generate_api_key()
            store.write_sync(add_api_key("bench", "admin", hash_api_key(key)))
            config = ServerConfig(port=0, engine="vllm", store_path=tmp / "store.sqlite",
                                  checkpoints_root=tmp / "checkpoints", max_concurrent_per_key=64)
            engine = create_engine("vllm", tmp / "checkpoints" / "v0", 0, max_model_len=2048,
                                   max_num_seqs=CLIENTS)
            running = await build_server(config, engine, store)
            await running.start()
            started = time.perf_counter()
            await running.load_engine()
            startup = time.perf_counter() - started
            try:
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients:
                    # warm the child (imports, channel set-up) outside the timed run
                    await asyncio.get_running_loop().run_in_executor(
                        clients, throughput_in_own_process, running.target, key, prompts[:1], 4)
                    rate = await asyncio.get_running_loop().run_in_executor(
                        clients, throughput_in_own_process, running.target, key, prompts, max_tokens)
                swap = await swap_under_load(running.target, key, prompts, max_tokens, new_version=1)
            finally:
                await running.stop(5)
            return {"startup_s": startup, "throughput": rate, "swap": swap}
        finally:
            store.close()

    # Beside the model folder: the same filesystem, so checkpoints are hard links.
    with tempfile.TemporaryDirectory(dir=model_dir.parent, prefix="bench-serving-") as tmp:
        return asyncio.run(measure(Path(tmp)))


# ---------------------------------------------------------------- the run


def run(model_dir: Path | None = None, prompts: Sequence[str] = PROMPTS, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """Every figure on `model_dir` (default: the embedded model); markdown under "markdown"."""
    from common.models import ensure_embedded_model

    model_dir = Path(model_dir) if model_dir else ensure_embedded_model()
    offline = offline_vllm_throughput(model_dir, prompts, max_tokens)
    offline_16 = offline_vllm_throughput(model_dir, prompts, max_tokens, max_num_seqs=CLIENTS)
    server = server_figures(model_dir, prompts, max_tokens)
    sequential = sequential_hf_throughput(model_dir, prompts[:HF_SEQUENTIAL_PROMPTS], max_tokens)
    rate = server["throughput"]["tokens_per_s"]
    result = {
        "model": model_dir.name, "prompts": len(prompts), "max_tokens": max_tokens, "clients": CLIENTS,
        "vllm_offline": offline, "vllm_offline_same_concurrency": offline_16, "server": server,
        "hf_sequential": sequential,
        "ratio_vs_offline": rate / offline["tokens_per_s"],
        "ratio_vs_offline_same_concurrency": rate / offline_16["tokens_per_s"],
        "ratio_vs_sequential": rate / sequential["tokens_per_s"],
        "load_average": os.getloadavg(),
    }
    result["markdown"] = markdown(result)
    return result


def _verdict(value: float, goal: float) -> str:
    return f"{value:.2f} (goal >= {goal:g}: {'met' if value >= goal else 'NOT met'})"


def markdown(r: dict[str, Any]) -> str:
    offline, server, sequential = r["vllm_offline"], r["server"]["throughput"], r["hf_sequential"]
    swap = r["server"]["swap"]
    rows = [
        (f"rlhf server (vLLM engine), {r['clients']} concurrent gRPC streaming clients", server),
        ("vLLM offline `LLM.generate` (all prompts in one call)", offline),
        (f"vLLM offline `LLM.generate`, at most {r['clients']} sequences at once (`max_num_seqs`)",
         r["vllm_offline_same_concurrency"]),
        (f"transformers `generate`, one prompt at a time ({HF_SEQUENTIAL_PROMPTS} prompts)", sequential),
    ]
    lines = [
        f"Model {r['model']}, fp32, greedy, {r['prompts']} chat prompts, at most {r['max_tokens']} new tokens each "
        "(every engine generates the same greedy tokens; answers may end earlier at EOS). The server logs every "
        "prompt and sample to its store (synchronous=FULL) before answering. "
        f"Load average when done: {', '.join(f'{x:.1f}' for x in r['load_average'])}.",
        "",
        "| what | tokens | seconds | tokens/s |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {name} | {fig['tokens']} | {fig['seconds']:.1f} | {fig['tokens_per_s']:.1f} |" for name, fig in rows],
        "",
        f"- server vs offline vLLM, all prompts at once: {_verdict(r['ratio_vs_offline'], GOAL_VS_OFFLINE)}",
        f"- server vs offline vLLM at the clients' concurrency (the same engine settings, {r['clients']} "
        f"sequences at most; what serving itself costs): "
        f"{_verdict(r['ratio_vs_offline_same_concurrency'], GOAL_VS_OFFLINE)}",
        f"- server vs sequential HF: {_verdict(r['ratio_vs_sequential'], GOAL_VS_SEQUENTIAL)}",
        f"- time to first token (clients, {server['requests']} requests): p50 {server['ttft_p50_s']:.3f} s, "
        f"p99 {server['ttft_p99_s']:.3f} s",
        f"- engine start-up: server {r['server']['startup_s']:.1f} s, offline `LLM` {offline['startup_s']:.1f} s",
        "",
        f"Hot swap under load ({r['clients']} clients streaming; swap mode {swap['swap_mode']}):",
        "",
        "| stall (new requests waited) | SwapPolicy call | new version's first token after the call | "
        "requests | failed | mixed versions |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {swap['stall_s']:.2f} s | {swap['swap_call_s']:.2f} s | {swap['first_new_token_after_call_s']:.2f} s | "
        f"{swap['requests']} | {swap['failures']} | {swap['mixed_version_requests']} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="model folder (default: the embedded model)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    args = parser.parse_args(argv)
    print(run(args.model, PROMPTS[: args.prompts], args.max_tokens)["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
