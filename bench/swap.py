"""A hot swap under 16 streaming clients, once per swap mode, on the embedded model.

For each mode (`drain`; `keep`, whose frozen requests continue on their KV cache
(`keep_kv="reuse"`, the default); `keep` recomputing that cache under the new weights
(`keep-recompute`); `drain` with a short bound, which shows what the bound does; and
`adapter`; and, asked for by name, `keep-inplace` and `keep-recompute-inplace`: the same
without staging, the reload in the pause) a fresh server (vLLM engine, real store, real auth) serves v0; 16
clients stream greedy requests of MAX_TOKENS tokens in a loop; once every client is
mid-stream the admin calls SwapPolicy (v1: the same weights, so a reload costs what a
real one does). In `adapter` mode the server serves a LoRA policy (adapters of rank 16
on every linear layer of the base, the shape PPO's lora mode trains) and swaps to
another one on the same base; the tokens per second the clients got over the run show
what serving through adapters costs against the other modes' full weights.
Reported per mode:

- stall: the longest wait for a first token of a request sent while the SwapPolicy call
  ran (a probe sends a short one every PROBE_EVERY_S for as long as the call runs, which
  with staging includes the seconds before the pause; the engine has room for them
  beside the clients' requests), beside the same wait with no
  swap (BASELINE_PROBES requests sent the same way just before the call: what a new
  request waits under this load anyway), the median time to first token before the swap
  and the server's own figure (how long new requests could not start); and the freeze: the longest pause between two tokens of a stream that was
  running when the call came (what a user in the middle of an answer felt);
- the first token a client received after the call returned (every token generated after
  the reload is the new version's) and the call's own duration;
- failed requests (must be 0) and completions that two versions produced (their
  `version_spans`; 0 in `drain` unless the bound cut the drain short).

A benchmark, not a test: its figures depend on the machine and its load (printed).

    python -m bench.swap [--max-tokens N] [--modes drain,keep,keep-recompute,drain-bounded,adapter]
    python -m bench.swap --prefix-cache [--history-turns N] [--rounds N]   (what the prefix cache is worth)
    python -m bench.swap --reload-parts   (an in-place reload against staging and its commit)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

from bench.engines import PROMPTS
from bench.serving import publish_versions
from trainer.config import LORA_TARGETS  # PPO's lora mode's default: every linear layer

CLIENTS = 16
MAX_TOKENS = 128
SHORT_BOUND_S = 2.0  # the drain bound of the "drain-bounded" run
PROBE_EVERY_S = 0.5  # new requests sent while the SwapPolicy call runs, for as long as it runs ...
MAX_PROBES = 120  # ... (at most this many: a minute) ...
PROBE_TOKENS = 8  # ... and short: their first token is what counts, and they must not pile up
BASELINE_PROBES = 3  # sent the same way just before the call: a new request's wait with no swap
# The engine runs up to 2 x CLIENTS sequences: a probe finds a free slot, so its wait is
# the swap's, not a queue behind the 16 clients' requests.
MAX_NUM_SEQS = 2 * CLIENTS
# run name -> (swap_mode, drain bound in seconds, the engine's keep_kv, its staged_reload)
MODES: dict[str, tuple[str, float, str, bool]] = {
    "drain": ("drain", 30.0, "reuse", True),
    "keep": ("keep", 30.0, "reuse", True),  # the default
    "keep-recompute": ("keep", 30.0, "recompute", True),
    "drain-bounded": ("drain", SHORT_BOUND_S, "reuse", True),
    "adapter": ("adapter", 30.0, "reuse", True),
    # The ablation of staging: the reload runs in the pause, as before it existed.
    "keep-inplace": ("keep", 30.0, "reuse", False),
    "keep-recompute-inplace": ("keep", 30.0, "recompute", False),
}
DEFAULT_MODES = ("drain", "keep", "keep-recompute", "drain-bounded", "adapter")
GOALS_S = {"keep": 1.5, "keep-recompute": 1.5, "keep-inplace": 1.5, "keep-recompute-inplace": 1.5, "adapter": 0.5}
LORA_RANK = 16  # PPO's lora_r default


@dataclass
class Seen:
    """What one client saw of one streamed request."""

    sent: float
    first_token: float | None = None
    done: float = 0.0
    mixed: bool = False
    token_times: list[float] = field(default_factory=list)


async def stream(client: Any, prompt: str, max_tokens: int, mid_stream: asyncio.Event) -> Seen:
    seen = Seen(sent=time.perf_counter())
    async for event in client.generate_stream(prompt, temperature=0, max_new_tokens=max_tokens, timeout=600):
        now = time.perf_counter()
        if event.text_delta:
            seen.token_times.append(now)
            if seen.first_token is None:
                seen.first_token = now
                mid_stream.set()
        if event.HasField("completion") and event.completion.version_spans:
            seen.mixed = True
    seen.done = time.perf_counter()
    return seen


def publish_lora_policy(root: Path, store: Any, version: int, base_version: int, seed: int,
                        rank: int = LORA_RANK, targets: tuple[str, ...] = LORA_TARGETS, b_std: float | None = None,
                        status: str = "candidate") -> Path:
    """Publish, as checkpoint vN, a policy made of LoRA adapters (random, from `seed`) on the
    checkpoint `v<base_version>`: the adapters in `adapter/` with their base named in the
    manifest, and the merged full weights beside them (what PPO's lora mode publishes);
    record it in `store` with `status`. `b_std`: the spread of the random B matrices
    (default 0.05 / sqrt(rank))."""
    import torch
    from peft import LoraConfig, get_peft_model

    from common.checkpoints import ADAPTER_DIR, adapter_record, checkpoint_path, write_checkpoint
    from common.models import load_causal_lm, load_tokenizer
    from common.store import add_policy

    base_dir = checkpoint_path(root, base_version)
    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(base_dir), LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                target_modules=list(targets)))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero (no change): random B makes another policy
            param.data.normal_(0.0, 0.05 / rank**0.5 if b_std is None else b_std)

    def save(d: Path) -> None:
        model.save_pretrained(d / ADAPTER_DIR)
        model.merge_and_unload().save_pretrained(d)
        load_tokenizer(base_dir).save_pretrained(d)

    path = write_checkpoint(root, version, save, parent_version=base_version, cycle_id=None,
                            base_model=read_base_model(base_dir), adapter=adapter_record(base_dir))
    store.write_sync(add_policy(version, str(path), parent_version=base_version, status=status))
    return path


def read_base_model(checkpoint_dir: Path) -> str:
    from common.checkpoints import read_manifest

    return read_manifest(checkpoint_dir).base_model


async def swap_once(target: str, key: str, max_tokens: int, new_version: int = 1,
                    before_call: Callable[[], None] | None = None) -> dict[str, Any]:
    """CLIENTS clients loop; when all are mid-stream the admin swaps to `new_version`; each
    client stops after one request sent after the call returned. `before_call` runs just
    before the call (after the no-swap probes)."""
    import grpc

    from clients.client import AsyncRlhfClient

    mid_stream = [asyncio.Event() for _ in range(CLIENTS)]
    window: dict[str, float] = {}
    seen: list[Seen] = []
    baseline_seen: list[Seen] = []
    failures: list[str] = []

    async def client_loop(i: int) -> None:
        async with AsyncRlhfClient(target, key) as client:
            k, after = 0, False
            while not after:
                after = "returned" in window
                try:
                    seen.append(await stream(client, PROMPTS[(i + k) % len(PROMPTS)], max_tokens, mid_stream[i]))
                except grpc.aio.AioRpcError as e:
                    failures.append(f"client {i}: {e.code().name}: {e.details()}")
                    mid_stream[i].set()
                    return
                k += 1

    async def probe(client: Any, prompt: str) -> None:
        try:
            seen.append(await stream(client, prompt, PROBE_TOKENS, asyncio.Event()))
        except grpc.aio.AioRpcError as e:
            failures.append(f"probe: {e.code().name}: {e.details()}")

    async def baseline(client: Any, prompt: str) -> None:
        try:
            baseline_seen.append(await stream(client, prompt, PROBE_TOKENS, asyncio.Event()))
        except grpc.aio.AioRpcError as e:
            failures.append(f"baseline probe: {e.code().name}: {e.details()}")

    async def operator() -> Any:
        async with AsyncRlhfClient(target, key) as admin:
            await asyncio.gather(*(e.wait() for e in mid_stream))
            sent = []
            for k in range(BASELINE_PROBES):  # the same load, no swap: what a new request waits anyway
                sent.append(asyncio.ensure_future(baseline(admin, PROMPTS[k % len(PROMPTS)])))
                await asyncio.sleep(PROBE_EVERY_S)
            await asyncio.gather(*sent)
            if before_call is not None:
                before_call()
            window["called"] = time.perf_counter()
            call = asyncio.ensure_future(admin.swap_policy(new_version, timeout=600))
            probes, k = [], 0
            while not call.done() and k < MAX_PROBES:  # new requests arriving while the swap runs
                probes.append(asyncio.ensure_future(probe(admin, PROMPTS[k % len(PROMPTS)])))
                k += 1
                await asyncio.wait([call], timeout=PROBE_EVERY_S)
            response = await call
            window["returned"] = time.perf_counter()
            await asyncio.gather(*probes)
            return response

    response, *_ = await asyncio.gather(operator(), *(client_loop(i) for i in range(CLIENTS)))
    called, returned = window["called"], window["returned"]
    during = [s for s in seen if called <= s.sent <= returned and s.first_token is not None]
    before = [s.first_token - s.sent for s in seen if s.sent < called and s.first_token is not None
              and s.first_token < called]  # fmt: skip
    running = [s for s in seen if s.sent < called < s.done]
    freeze = max((b - a for s in running for a, b in zip([s.sent, *s.token_times], [*s.token_times, s.done])
                  if b > called and a < returned), default=0.0)  # fmt: skip
    after_tokens = [t for s in seen for t in s.token_times if t > returned]
    run_s = max(s.done for s in seen) - min(s.sent for s in seen)
    return {
        # Streamed deltas (a token each) per second over the whole run, swap included: what
        # the clients got, to set beside the other modes.
        "tokens_per_s": sum(len(s.token_times) for s in seen) / run_s,
        "stall_s": max((s.first_token - s.sent for s in during), default=float("nan")),  # type: ignore[operator]
        "requests_sent_during_swap": len(during),
        "no_swap_wait_s": max((s.first_token - s.sent for s in baseline_seen if s.first_token is not None),
                              default=float("nan")),
        "freeze_s": freeze,
        "ttft_before_p50_s": statistics.median(before) if before else float("nan"),
        "server_stall_s": response.stall_seconds,
        "swap_call_s": returned - called,
        "first_token_after_call_s": (min(after_tokens) - called) if after_tokens else float("nan"),
        "continued_requests": response.continued_requests,
        "swap_mode": response.swap_mode,
        "requests": len(seen),
        "failures": len(failures),
        "failure_examples": failures[:3],
        "mixed_version_completions": sum(s.mixed for s in seen),
    }


def one_mode(model_dir: Path, swap_mode: str, drain_bound_s: float, max_tokens: int,
             keep_kv: str = "recompute", staged_reload: bool = True, cold: bool = False,
             adapter_targets: tuple[str, ...] = LORA_TARGETS) -> dict[str, Any]:
    from common.identity import generate_api_key, hash_api_key
    from common.store import Store, add_api_key
    from server.app import build_server
    from server.config import ServerConfig
    from server.engines import create_engine

    async def measure(tmp: Path) -> dict[str, Any]:
        store = Store(tmp / "store.sqlite")
        try:
            publish_versions(model_dir, tmp / "checkpoints", store)
            serve, swap_to = 0, 1
            if swap_mode == "adapter":  # a LoRA policy serves (v2), another on the same base comes (v3)
                serve, swap_to = 2, 3
                publish_lora_policy(tmp / "checkpoints", store, 2, base_version=0, seed=2, status="serving",
                                    targets=adapter_targets)
                publish_lora_policy(tmp / "checkpoints", store, 3, base_version=0, seed=3, targets=adapter_targets)
            key = generate_api_key()
            store.write_sync(add_api_key("bench", "admin", hash_api_key(key)))
            # No per-key limit in the way: the probes and the clients share one key.
            config = ServerConfig(port=0, engine="vllm", store_path=tmp / "store.sqlite", swap_mode=swap_mode,
                                  swap_drain_timeout_s=drain_bound_s, checkpoints_root=tmp / "checkpoints",
                                  max_concurrent_per_key=1024, tokens_per_minute=0, requests_per_second=0)  # fmt: skip
            engine = create_engine("vllm", tmp / "checkpoints" / f"v{serve}", serve, max_model_len=2048,
                                   max_num_seqs=MAX_NUM_SEQS, swap_mode=swap_mode, drain_timeout_s=drain_bound_s,
                                   keep_kv=keep_kv, staged_reload=staged_reload)
            running = await build_server(config, engine, store)
            await running.start()
            await running.load_engine()
            try:
                new_checkpoint = tmp / "checkpoints" / f"v{swap_to}"
                return await swap_once(running.target, key, max_tokens, swap_to,
                                       (lambda: evict_from_page_cache(new_checkpoint)) if cold else None)
            finally:
                await running.stop(5)
        finally:
            store.close()

    with tempfile.TemporaryDirectory(dir=model_dir.parent, prefix="bench-swap-") as tmp:
        return asyncio.run(measure(Path(tmp)))


def evict_from_page_cache(folder: Path) -> None:
    """Drop `folder`'s files from the OS page cache (written out first), so the swap reads
    them from disk: a checkpoint written long ago, or pushed out by memory pressure."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run(modes: list[str] | None = None, max_tokens: int = MAX_TOKENS, model_dir: Path | None = None,
        cold: bool = False, adapter_targets: tuple[str, ...] = LORA_TARGETS) -> dict[str, Any]:
    from common.models import ensure_embedded_model

    modes = list(DEFAULT_MODES) if modes is None else modes
    model_dir = Path(model_dir) if model_dir else ensure_embedded_model()
    results = {}
    for name in modes:
        swap_mode, bound, keep_kv, staged_reload = MODES[name]
        results[name] = {"drain_bound_s": bound,
                         **one_mode(model_dir, swap_mode, bound, max_tokens, keep_kv, staged_reload, cold,
                                   adapter_targets)}
        print(f"{name}: {results[name]}", flush=True)
    r = {"model": model_dir.name, "max_tokens": max_tokens, "clients": CLIENTS, "modes": results, "cold": cold,
         "adapter_targets": list(adapter_targets), "load_average": os.getloadavg()}
    r["markdown"] = markdown(r)
    return r


def markdown(r: dict[str, Any]) -> str:
    rows = []
    for name, m in r["modes"].items():
        goal = GOALS_S.get(name)
        verdict = "" if goal is None else f" (goal <= {goal:g} s: {'met' if m['stall_s'] <= goal else 'NOT met'})"
        rows.append(
            f"| {name} (bound {m['drain_bound_s']:g} s) | {m['stall_s']:.2f} s{verdict} ({m['requests_sent_during_swap']} "
            f"sent) | {m['no_swap_wait_s']:.2f} s | {m['ttft_before_p50_s']:.2f} s | {m['freeze_s']:.2f} s | "
            f"{m['server_stall_s']:.2f} s | {m['first_token_after_call_s']:.2f} s | {m['swap_call_s']:.2f} s | "
            f"{m['requests']} | {m['failures']} | {m['mixed_version_completions']} ({m['continued_requests']} continued) | "
            f"{m['tokens_per_s']:.0f} |")
    return "\n".join([
        f"`python -m bench.swap`: {r['model']}, fp32, vLLM engine on this CPU; {r['clients']} clients stream greedy "
        f"requests of {r['max_tokens']} tokens in a loop; SwapPolicy is called once all are mid-stream"
        f"{' (the new checkpoint dropped from the page cache just before)' if r.get('cold') else ''}. Load "
        f"average when done: {', '.join(f'{x:.1f}' for x in r['load_average'])}.",
        "",
        "| mode | stall: longest first-token wait of a request sent during the swap | the same with no swap, just "
        "before it | median first-token wait before it | freeze: longest pause inside a running stream | server's "
        "stall | first token after the call | SwapPolicy call | requests | failed | mixed-version completions | "
        "tokens/s over the run |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ])


def long_chat(turns: int, last: str) -> list[dict[str, str]]:
    """A multi-turn chat: ``turns`` earlier exchanges (each ~100 tokens), then ``last``."""
    chat = [{"role": "system", "content": "You are a concise assistant."}]
    for t in range(turns):
        chat += [{"role": "user", "content": PROMPTS[t % len(PROMPTS)]},
                 {"role": "assistant", "content": " ".join(["The short answer is that it depends on the details, "
                                                            "and here they are in order."] * 4)}]
    return chat + [{"role": "user", "content": last}]


def prefix_cache_cost(rounds: int = 4, model_dir: Path | None = None, history_turns: int = 0
                      ) -> dict[str, list[float]]:
    """What the prefix cache is worth on a labeling-like load, and that either keep_kv
    keeps it: 8 prompts x 9 sampled completions of 64 tokens at once, `rounds` times per
    engine; wall seconds per round with keep_kv "recompute" and "reuse" (the cache on;
    "reuse" salts it per swap) and with the cache off. ``history_turns``: each prompt is
    the last turn of a chat with that many earlier exchanges (long shared prefixes, where
    the cache can save the most)."""
    from common.chat import render_chat_ids
    from common.models import ensure_embedded_model, load_tokenizer
    from server.engines import create_engine
    from server.engines.base import SamplingOptions

    model_dir = Path(model_dir) if model_dir else ensure_embedded_model()
    tokenizer = load_tokenizer(model_dir)
    prompts = [render_chat_ids(tokenizer, long_chat(history_turns, p)) for p in PROMPTS[:8]]
    print(f"prompt tokens: {statistics.mean(len(ids) for ids in prompts):.0f} on average")
    options = SamplingOptions(n=9, max_new_tokens=64, temperature=1.0, seed=0)

    async def measure(engine_options: dict[str, Any]) -> list[float]:
        engine = create_engine("vllm", model_dir, 0, max_model_len=2048, max_num_seqs=128, **engine_options)
        await engine.start()

        async def one(request_id: str, prompt: list[int]) -> None:
            async for _ in engine.generate(request_id, prompt, options):
                pass

        seconds = []
        try:
            for r in range(rounds):
                started = time.perf_counter()
                await asyncio.gather(*(one(f"r{r}-{i}", p) for i, p in enumerate(prompts)))
                seconds.append(time.perf_counter() - started)
        finally:
            await engine.shutdown()
        return seconds

    variants = {"recompute": {"keep_kv": "recompute"}, "reuse": {"keep_kv": "reuse"},
                "cache off": {"enable_prefix_caching": False}}
    return {name: asyncio.run(measure(options)) for name, options in variants.items()}


class ReloadPartsExtension:
    """Worker methods (``--reload-parts``) timing the two ways the server's swap loads
    weights (``server.engines.vllm_worker.PolicyReloadExtension``): vLLM's in-place
    ``reload_weights`` from the checkpoint folder plus the tied-embedding repack (all of it
    inside the pause), and staging (``common.vllm_reload.StagedWeights``: the load and
    repack beside the live weights, before the pause) then its commit (the pause's part)."""

    def bench_reload_in_place(self, path: str) -> tuple[float, float]:
        from common.vllm_reload import repack_tied_embeddings

        started = time.perf_counter()
        self.reload_weights(weights_path=path, is_checkpoint_format=True)
        loaded = time.perf_counter()
        repack_tied_embeddings(self)
        return loaded - started, time.perf_counter() - loaded

    def bench_stage_and_commit(self, path: str) -> tuple[float, float]:
        from common.vllm_reload import StagedWeights

        started = time.perf_counter()
        staged = StagedWeights.load(self, path)
        loaded = time.perf_counter()
        staged.commit()
        return loaded - started, time.perf_counter() - loaded


def reload_parts(rounds: int = 3, model_dir: Path | None = None) -> list[dict[str, float]]:
    """Per round: seconds of an in-place reload and of its repack, then of staging and of
    its commit (offline vLLM, fp32, one worker, nothing else running: the staging's time
    here is its own, not stretched by serving beside it)."""
    import vllm

    from common.models import ensure_embedded_model
    from common.vllm_env import vllm_environment

    model = str(Path(model_dir) if model_dir else ensure_embedded_model())
    with vllm_environment(None):
        llm = vllm.LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512, disable_log_stats=True,
                       worker_extension_cls=f"{__name__}.{ReloadPartsExtension.__qualname__}")
    rows = []
    for _ in range(rounds):
        (reload, repack), = llm.collective_rpc("bench_reload_in_place", args=(model,))
        (stage, commit), = llm.collective_rpc("bench_stage_and_commit", args=(model,))
        rows.append({"reload in place": reload, "repack": repack, "staging": stage, "commit": commit})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--cold-checkpoint", action="store_true",
                        help="drop the new checkpoint's files from the page cache just before the swap")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--prefix-cache", action="store_true",
                        help="instead: a labeling-like load with the prefix cache on (either keep_kv) and off")
    parser.add_argument("--rounds", type=int, default=4, help="with --prefix-cache: rounds per engine")
    parser.add_argument("--history-turns", type=int, default=0,
                        help="with --prefix-cache: earlier exchanges before each prompt (long prefixes)")
    parser.add_argument("--adapter-targets", default=",".join(LORA_TARGETS),
                        help="the adapter mode's LoRA target modules, comma-separated (default: every linear layer, "
                             "PPO's lora default)")
    parser.add_argument("--reload-parts", action="store_true",
                        help="instead: time an in-place reload against staging and its commit")
    args = parser.parse_args(argv)
    if args.reload_parts:
        for row in reload_parts():
            print(", ".join(f"{name} {seconds:.3f} s" for name, seconds in row.items()))
        return 0
    if args.prefix_cache:
        for name, seconds in prefix_cache_cost(args.rounds, history_turns=args.history_turns).items():
            print(f"{name}: rounds {', '.join(f'{x:.2f}' for x in seconds)} s, "
                  f"median {statistics.median(seconds):.2f} s")
        return 0
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}: choose from {list(MODES)}")
    targets = tuple(t for t in args.adapter_targets.split(",") if t)
    result = run(modes, args.max_tokens, cold=args.cold_checkpoint, adapter_targets=targets)
    print(result["markdown"])
    return 0 if all(m["failures"] == 0 for m in result["modes"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
