"""Per-key limits under a flood: does one key's flood leave the other keys' latency alone?

A real server (HF engine; the tiny test Llama by default, `--model` for another folder;
real store, real auth, every sample logged) serves TRICKLE_KEYS keys that each send one
Generate every TRICKLE_INTERVAL_S seconds, first alone (quiet), then while one more key
floods: FLOOD_CONCURRENCY calls in flight at all times, each sent again once answered. A
refused call is resent after its `retry-after-ms` (or, without a hint, after a backoff
like a gRPC retry policy's), or at once by a flood that ignores the hints. All requests
ask for MAX_TOKENS new tokens at temperature 1.

Reported per run (`RUNS`: the bench's limits with a backing-off and a hint-ignoring flood,
and no rate or token limit): the trickle keys' latency quiet and during the flood (p50,
p95) and their ratio (goal: p50 within 2x), the flood key's answered and RESOURCE_EXHAUSTED
calls (by reason) and the tokens it was served. Trickle and flood clients run in their own
processes (real clients run elsewhere); on a 2-core machine they still share the cores
with the server.

    python -m bench.rate_limits [--model DIR] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

TRICKLE_KEYS = 3
TRICKLE_INTERVAL_S = 0.5
FLOOD_CONCURRENCY = 64
MAX_TOKENS = 32
SECONDS = 20.0
WARMUP_S = 2.0  # trickle latencies of the flood's first seconds are left out (it is ramping up)
GOAL_RATIO = 2.0
PROMPTS = ("How do bees make honey?", "Tell me a story.", "Explain gravity.", "Name three rivers.")
# The bench's limits: what an operator sharing a small engine between keys might set. The
# token budget is each key's share: 100 tokens/s (6,000 per minute; a trickle key needs at
# most 64) with a burst of 4 requests, which must hold the largest request, so requests are
# capped at 64 tokens x 2 samples.
LIMITED = {"max_concurrent_per_key": 4, "requests_per_second": 20.0, "request_burst": 40,
           "tokens_per_minute": 6_000.0, "token_burst": 4 * MAX_TOKENS}
UNLIMITED = {"requests_per_second": 0.0, "tokens_per_minute": 0.0}
BACKOFF_S = (0.1, 2.0)  # a backing-off flood without a hint: first wait, longest wait
# (name, per-key limits, whether the flood waits as the refusals say)
RUNS = (("limited, flood backs off", LIMITED, True), ("limited, flood ignores the hints", LIMITED, False),
        ("unlimited, flood backs off", UNLIMITED, True))
REQUEST_LIMITS = {"max_new_tokens_limit": 2 * MAX_TOKENS, "default_max_new_tokens": MAX_TOKENS, "max_n": 2}
LABEL_MAX_NEW_TOKENS = 8  # x 9 = 72: a labeling task fits the burst too (none is leased here)


# ---------------------------------------------------------------- clients (child processes)


async def _trickle(target: str, keys: Sequence[str], seconds: float) -> list[tuple[float, float]]:
    """Each key sends one request every TRICKLE_INTERVAL_S: (sent at, latency) of each
    answered one; a refused one has latency -1 (it must not happen: counted, reported)."""
    import grpc

    from clients.client import AsyncRlhfClient

    start = time.perf_counter()
    results: list[tuple[float, float]] = []

    async def one_key(i: int, key: str) -> None:
        async with AsyncRlhfClient(target, key) as client:
            await asyncio.sleep(i * TRICKLE_INTERVAL_S / len(keys))  # spread the keys over the interval
            k = 0
            while time.perf_counter() - start < seconds:
                sent = time.perf_counter()
                try:
                    await client.generate(PROMPTS[(i + k) % len(PROMPTS)], max_new_tokens=MAX_TOKENS, timeout=120)
                    results.append((sent - start, time.perf_counter() - sent))
                except grpc.aio.AioRpcError:
                    results.append((sent - start, -1.0))
                k += 1
                await asyncio.sleep(max(0.0, TRICKLE_INTERVAL_S - (time.perf_counter() - sent)))

    await asyncio.gather(*(one_key(i, key) for i, key in enumerate(keys)))
    return results


async def _flood(target: str, key: str, seconds: float, honour_hints: bool) -> dict[str, Any]:
    """FLOOD_CONCURRENCY loops sending requests back to back; counts by status and reason.
    `honour_hints`: after a RESOURCE_EXHAUSTED a loop waits `retry-after-ms`, or without a
    hint backs off like a gRPC retry policy (0.1 s doubling to 2 s); else it resends at once."""
    import grpc

    from clients.client import AsyncRlhfClient

    start = time.perf_counter()
    counts: Counter[str] = Counter()
    tokens = 0

    async def loop(i: int, client: Any) -> None:
        nonlocal tokens
        backoff = BACKOFF_S[0]
        while time.perf_counter() - start < seconds:
            try:
                reply = await client.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=MAX_TOKENS, timeout=120)
                counts["OK"] += 1
                tokens += sum(c.completion_tokens for c in reply.completions)
                backoff = BACKOFF_S[0]
            except grpc.aio.AioRpcError as e:
                details = e.details() or ""
                reason = ("rate" if "request rate" in details else "tokens" if "token budget" in details
                          else "concurrency" if "concurrent" in details else "other")
                counts[f"{e.code().name}:{reason}"] += 1
                if honour_hints and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    hint = dict(e.trailing_metadata() or ()).get("retry-after-ms")
                    await asyncio.sleep(int(hint) / 1000 if hint else backoff)
                    backoff = backoff if hint else min(BACKOFF_S[1], 2 * backoff)

    async with AsyncRlhfClient(target, key) as client:
        await asyncio.gather(*(loop(i, client) for i in range(FLOOD_CONCURRENCY)))
    return {"counts": dict(counts), "tokens": tokens, "seconds": time.perf_counter() - start}


def trickle_process(target: str, keys: Sequence[str], seconds: float) -> list[tuple[float, float]]:
    return asyncio.run(_trickle(target, keys, seconds))


def flood_process(target: str, key: str, seconds: float, honour_hints: bool) -> dict[str, Any]:
    return asyncio.run(_flood(target, key, seconds, honour_hints))


# ---------------------------------------------------------------- one server, quiet then flooded


def _latencies(samples: list[tuple[float, float]], skip_s: float = 0.0) -> dict[str, float]:
    values = sorted(latency for sent, latency in samples if sent >= skip_s and latency >= 0)
    p95 = statistics.quantiles(values, n=20, method="inclusive")[18] if len(values) > 1 else values[0]
    failed = sum(1 for sent, latency in samples if sent >= skip_s and latency < 0)
    return {"requests": len(values), "failed": failed, "p50_s": statistics.median(values), "p95_s": p95}


async def _measure(model_dir: Path, tmp: Path, limits: dict[str, Any], seconds: float,
                   honour_hints: bool) -> dict[str, Any]:  # fmt: skip
    from common.identity import generate_api_key, hash_api_key
    from common.store import Store, add_api_key
    from server.app import build_server
    from server.config import RequestLimits, ServerConfig
    from server.engines.hf import HFEngine
    from server.policies import startup_policy

    store = Store(tmp / "store.sqlite")
    try:
        keys = {f"trickle-{i}": generate_api_key() for i in range(TRICKLE_KEYS)} | {"flood": generate_api_key()}
        for user, key in keys.items():
            store.write_sync(add_api_key(user, "user", hash_api_key(key)))
        config = ServerConfig(port=0, engine="hf", store_path=tmp / "store.sqlite", checkpoints_root=tmp / "checkpoints",
                              base_model_dir=model_dir, base_model_name=model_dir.name,
                              limits=RequestLimits(**REQUEST_LIMITS), label_max_new_tokens=LABEL_MAX_NEW_TOKENS,
                              **limits)  # fmt: skip
        policy = await startup_policy(store, config.checkpoints_root, model_dir, model_dir.name)
        running = await build_server(config, HFEngine(Path(policy.path), policy.version), store)
        await running.start()
        await running.load_engine()
        trickle_keys = [k for user, k in keys.items() if user != "flood"]
        loop = asyncio.get_running_loop()
        try:
            spawn = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(2, mp_context=spawn) as pool:
                # Warm both children and the engine (imports, channels, first batch) untimed.
                await asyncio.gather(loop.run_in_executor(pool, trickle_process, running.target, trickle_keys, 1.0),
                                     loop.run_in_executor(pool, trickle_process, running.target, trickle_keys, 1.0))
                quiet = await loop.run_in_executor(pool, trickle_process, running.target, trickle_keys, seconds)
                flooded, flood = await asyncio.gather(
                    loop.run_in_executor(pool, trickle_process, running.target, trickle_keys, seconds),
                    loop.run_in_executor(pool, flood_process, running.target, keys["flood"], seconds, honour_hints))
        finally:
            await running.stop(5)
    finally:
        store.close()
    quiet_figures, flood_figures = _latencies(quiet), _latencies(flooded, WARMUP_S)
    return {"limits": limits, "honour_hints": honour_hints, "quiet": quiet_figures, "flooded": flood_figures, "flood": flood,
            "ratio_p50": flood_figures["p50_s"] / quiet_figures["p50_s"],
            "ratio_p95": flood_figures["p95_s"] / quiet_figures["p95_s"]}


def run(model_dir: Path | None = None, seconds: float = SECONDS) -> dict[str, Any]:
    """Both configurations on `model_dir` (default: the tiny test Llama); markdown under "markdown"."""
    from common import paths
    from common.models import build_tiny_model

    model_dir = Path(model_dir) if model_dir else build_tiny_model(paths.models_dir() / "tiny-llama-seed0", seed=0)
    runs = {}
    for name, limits, honour_hints in RUNS:
        with tempfile.TemporaryDirectory(prefix="bench-rate-limits-") as tmp:
            runs[name] = asyncio.run(_measure(model_dir, Path(tmp), limits, seconds, honour_hints))
    result = {"model": model_dir.name, "seconds": seconds, "runs": runs, "load_average": os.getloadavg()}
    result["markdown"] = markdown(result)
    return result


def markdown(r: dict[str, Any]) -> str:
    def row(name: str, run: dict[str, Any]) -> str:
        flood, counts = run["flood"], run["flood"]["counts"]
        refused = sum(n for status, n in counts.items() if status.startswith("RESOURCE_EXHAUSTED"))
        reasons = ", ".join(f"{status.split(':')[1]} {n}" for status, n in sorted(counts.items())
                            if status.startswith("RESOURCE_EXHAUSTED")) or "none"
        other = sum(n for status, n in counts.items() if status != "OK" and not status.startswith("RESOURCE_EXHAUSTED"))
        verdict = "met" if run["ratio_p50"] <= GOAL_RATIO else "NOT met"
        return (f"| {name} | {run['quiet']['p50_s']:.3f} / {run['quiet']['p95_s']:.3f} | "
                f"{run['flooded']['p50_s']:.3f} / {run['flooded']['p95_s']:.3f} | "
                f"{run['quiet']['requests']} / {run['flooded']['requests']} "
                f"({run['quiet']['failed'] + run['flooded']['failed']} failed) | "
                f"{run['ratio_p50']:.2f} ({verdict}) / {run['ratio_p95']:.2f} | {counts.get('OK', 0)} | "
                f"{refused} ({reasons}) | {other} | {flood['tokens'] / flood['seconds']:.0f} |")

    lim = LIMITED
    return "\n".join([
        f"Model {r['model']} on the HF engine; {TRICKLE_KEYS} trickle keys, one Generate each every "
        f"{TRICKLE_INTERVAL_S} s; one flood key with {FLOOD_CONCURRENCY} calls in flight, each resent when answered (a "
        f"refusal: after its `retry-after-ms`, or backing off {BACKOFF_S[0]} s doubling to {BACKOFF_S[1]:g} s without one; "
        f"or at once where it ignores the hints); every request {MAX_TOKENS} new tokens at temperature 1; {r['seconds']:.0f} s quiet, then "
        f"{r['seconds']:.0f} s flooded (its first {WARMUP_S:.0f} s left out). Limited: "
        f"{lim['max_concurrent_per_key']} in flight, {lim['requests_per_second']:g} requests/s (burst "
        f"{lim['request_burst']}), {lim['tokens_per_minute']:g} tokens/min (burst {lim['token_burst']}) per key. "
        "Unlimited: no rate or token limit, the default 8 in flight per key. Load average when done: "
        f"{', '.join(f'{x:.1f}' for x in r['load_average'])}.",
        "",
        "| limits | trickle p50 / p95 quiet (s) | flooded (s) | trickle requests quiet / flooded | "
        "ratio p50 (goal <= 2) / p95 | flood answered | flood RESOURCE_EXHAUSTED (by reason) | flood other errors | "
        "flood tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[row(name, run) for name, run in r["runs"].items()],
        "",
        "A flood that ignores the hint and resends each refusal at once would cost the server one RPC per refusal "
        "(authentication, the bucket, the status), and on this machine that CPU, not the engine, is what the other "
        "keys wait for; the server therefore answers a rate or token refusal only near its retry time, at most "
        "1 s late (`server.servicers.hold_refusal`), so such a client waits on a sleeping coroutine.",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="model folder (default: the tiny test Llama)")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="length of the quiet and the flooded phase")
    args = parser.parse_args(argv)
    print(run(args.model, args.seconds)["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
