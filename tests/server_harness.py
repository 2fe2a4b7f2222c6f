"""A real server for service tests: its own event loop in a thread, a real socket
(127.0.0.1, port 0), a real store file and a real engine.

Tests stay synchronous and talk to it with `clients.client.RlhfClient` (or, for
concurrency, `AsyncRlhfClient` inside `asyncio.run`). `ServerThread.call(fn)` runs a
coroutine function on the server's loop, e.g. to read engine state without races.

Also: checkpoint helpers (publish a model folder as vN, corrupt one) and the reference
greedy output of a checkpoint, computed offline with transformers.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from common.checkpoints import checkpoint_path, write_checkpoint
from common.identity import generate_api_key, hash_api_key
from common.store import Store, add_api_key, add_policy
from server.app import RunningServer, build_server
from server.config import ServerConfig
from server.engines.base import Engine
from server.policies import startup_policy

T = TypeVar("T")

# Chat prompts (one user turn) on which greedy decoding of the tiny Llama, seeds 0 and 1,
# leads by a logit margin >= 0.0029 at every one of 24 steps (measured with transformers,
# fp32): 300x the ~1e-5 by which batch shapes and kernels (HF batched, vLLM) move a
# logit, so every engine's greedy text equals transformers' own.
WIDE_MARGIN_PROMPTS = ("The quick brown fox", "How do bees make honey?", "Tell me a story.", "Explain gravity.")
EngineFactory = Callable[[Path, int], Engine]


def hf_engine(checkpoint_dir: Path, version: int) -> Engine:
    from server.engines.hf import HFEngine

    return HFEngine(checkpoint_dir, version)


@dataclass
class ServerThread:
    """Runs `build_server(config, engine, store)` on a private loop; see the module docstring."""

    config: ServerConfig
    engine_factory: EngineFactory = hf_engine
    load_engine: bool = True
    running: RunningServer | None = None
    store: Store | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stopped: asyncio.Event | None = None
    _ready: Future[None] = field(default_factory=Future)

    def start(self, timeout: float = 600) -> ServerThread:
        self._thread = threading.Thread(target=self._main, name="test-server", daemon=True)
        self._thread.start()
        self._ready.result(timeout)
        return self

    @property
    def target(self) -> str:
        assert self.running is not None
        return self.running.target

    @property
    def engine(self) -> Engine:
        assert self.running is not None
        return self.running.deps.engine

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float = 600) -> T:
        """Run `fn()` on the server's loop and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(_await(fn), self._loop).result(timeout)

    def load(self) -> None:
        """Start the engine (for servers started with load_engine=False)."""
        self.call(lambda: self.running.load_engine())  # type: ignore[union-attr]

    def running_generations(self) -> int:
        """Generations the engine still runs (requests it has not finished)."""
        return self.call(_running_in_engine(self.engine))

    def in_flight(self) -> int:
        """Generate/GenerateStream calls admitted and not finished (the per-key limiter's count)."""
        async def count() -> int:
            return self.running.deps.limiter.in_flight()  # type: ignore[union-attr]

        return self.call(count)

    def stop(self, grace: float = 5.0) -> None:
        if self._loop is None or self._thread is None:
            return
        if self.running is not None:
            self.call(lambda: self.running.stop(grace))  # type: ignore[union-attr]
        self._loop.call_soon_threadsafe(self._stopped.set)  # type: ignore[union-attr]
        self._thread.join(120)
        self._loop = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        try:
            self.store = Store(self.config.store_path)
            policy = await startup_policy(self.store, self.config.checkpoints_root,
                                          self.config.base_model_dir, self.config.base_model_name)
            engine = self.engine_factory(Path(policy.path), policy.version)
            self.running = await build_server(self.config, engine, self.store)
            await self.running.start()
            if self.load_engine:
                await self.running.load_engine()
        except BaseException as e:
            self._ready.set_exception(e)
            if self.store is not None:
                self.store.close()
            return
        self._ready.set_result(None)
        try:
            await self._stopped.wait()
        finally:
            self.store.close()


async def _await(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()


def _running_in_engine(engine: Engine) -> Callable[[], Awaitable[int]]:
    async def count() -> int:
        return int(engine.stats()["running"])  # type: ignore[attr-defined]

    return count


def server_config(tmp_path: Path, base_model_dir: Path, **overrides: Any) -> ServerConfig:
    """A config for a server on 127.0.0.1:0 with everything under tmp_path."""
    values: dict[str, Any] = dict(
        port=0, engine="hf", store_path=tmp_path / "store.sqlite",
        checkpoints_root=tmp_path / "checkpoints", base_model_dir=base_model_dir,
        base_model_name="tiny-llama", grace_seconds=5.0)
    values.update(overrides)
    return ServerConfig(**values)


# ---------------------------------------------------------------- store and checkpoints


def create_key(store_path: Path, role: str, user: str, group: str | None = None) -> tuple[str, str]:
    """A new API key in the store at `store_path`: (key, key_id)."""
    key = generate_api_key()
    with Store(store_path) as store:
        stored = store.write_sync(add_api_key(user, role, hash_api_key(key), labeler_group=group))  # type: ignore[arg-type]
    return key, stored.key_id


def publish(root: Path, store_path: Path, version: int, model_dir: Path, parent: int | None = 0) -> Path:
    """Publish `model_dir` as checkpoint vN under `root` and record it as a candidate."""
    path = write_checkpoint(root, version, lambda d: _copy_model(model_dir, d), parent_version=parent,
                            cycle_id=None, base_model="tiny-llama")
    with Store(store_path) as store:
        store.write_sync(add_policy(version, str(path), parent_version=parent))
    return path


def publish_lora_policy(root: Path, store_path: Path, version: int, base_version: int, seed: int,
                        rank: int = 8) -> Path:
    """`bench.swap.publish_lora_policy` (LoRA adapters from `seed` on `v<base_version>`,
    merged weights beside them), recorded as a candidate in the store at `store_path`.
    The targets and spread are fixed because with them the tiny model's greedy replies to
    WIDE_MARGIN_PROMPTS end on whole characters (a reply cut inside a UTF-8 sequence
    decodes with a trailing U+FFFD offline, which the server's detokenizer holds back)."""
    from bench.swap import publish_lora_policy as publish_adapters

    with Store(store_path) as store:
        return publish_adapters(root, store, version, base_version, seed, rank=rank,
                                targets=("q_proj", "v_proj", "up_proj", "down_proj"), b_std=0.05)


def _copy_model(src: Path, dst: Path) -> None:
    for path in sorted(p for p in src.iterdir() if p.is_file()):
        if path.name != "rlhf-model.json":
            shutil.copyfile(path, dst / path.name)


def corrupt_weights(checkpoint: Path) -> Path:
    """Flip bytes in the middle of the checkpoint's weight file; return that file."""
    weights = sorted(checkpoint.glob("*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    weights.write_bytes(bytes(data))
    return weights


def greedy_reference(model_dir: Path, prompts: Sequence[str], max_new_tokens: int) -> dict[str, str]:
    """transformers' own greedy reply to each prompt (one user turn, chat template), offline."""
    import torch

    from common.models import load_causal_lm, load_tokenizer
    from common.chat import render_chat_ids

    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    replies = {}
    for prompt in prompts:
        # on the model's device: load_causal_lm puts it on CUDA when there is one
        ids = torch.tensor([render_chat_ids(tokenizer, [{"role": "user", "content": prompt}])], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        replies[prompt] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return replies


def greedy_token_ids(model_dir: Path, prompts: Sequence[str], max_new_tokens: int,
                     prefixes: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """transformers' greedy token ids for each prompt (one user turn, chat template),
    continuing after `prefixes[prompt]` (token ids already generated) when given: the ids
    returned are the prefix followed by the continuation, `max_new_tokens` in all."""
    import torch

    from common.chat import render_chat_ids
    from common.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    out_ids = {}
    for prompt in prompts:
        prefix = list((prefixes or {}).get(prompt, []))
        ids = torch.tensor([render_chat_ids(tokenizer, [{"role": "user", "content": prompt}]) + prefix],
                           device=model.device)  # a CUDA model takes CUDA ids
        left = max_new_tokens - len(prefix)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=left, pad_token_id=tokenizer.pad_token_id) if left > 0 else ids
        out_ids[prompt] = prefix + out[0, ids.shape[1]:].tolist()
    return out_ids


def greedy_on_stale_cache(old_dir: Path, new_dir: Path, prompt: str, prefix: Sequence[int],
                          max_new_tokens: int) -> list[int]:
    """What a "keep" swap with keep_kv="reuse" makes of a request frozen after `prefix`
    (the tokens the old weights sampled): the new weights continue greedily on the KV cache
    the OLD weights computed for the prompt and every prefix token but the last (that one
    was sampled, not yet fed: the new weights compute its keys and values). Returns prefix +
    continuation, `max_new_tokens` in all."""
    import torch

    from common.chat import render_chat_ids
    from common.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(old_dir)
    old, new = load_causal_lm(old_dir), load_causal_lm(new_dir)
    ids = torch.tensor([render_chat_ids(tokenizer, [{"role": "user", "content": prompt}]) + list(prefix)],
                       device=old.device)
    with torch.no_grad():
        cache = old(ids[:, :-1], use_cache=True).past_key_values  # the old weights' keys and values
    out = new.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, do_sample=False,
                       max_new_tokens=max_new_tokens - len(prefix), pad_token_id=tokenizer.pad_token_id)
    return list(prefix) + out[0, ids.shape[1]:].tolist()


def tiny_model(seed: int) -> Path:
    """The tiny test Llama with weights from `seed` (cached in the data dir)."""
    from common import paths
    from common.models import build_tiny_model

    return build_tiny_model(paths.models_dir() / f"tiny-llama-seed{seed}", seed=seed)


def v_path(root: Path, version: int) -> Path:
    return checkpoint_path(root, version)


# ---------------------------------------------------------------- checks shared by both engines


def join_stream(events: Sequence[Any]) -> dict[int, tuple[str, Any]]:
    """index -> (concatenated text deltas, the final completion) of a stream's events."""
    texts: dict[int, str] = {}
    finals: dict[int, Any] = {}
    for event in events:
        assert event.index not in finals, f"event after sample {event.index}'s final event"
        texts[event.index] = texts.get(event.index, "") + event.text_delta
        if event.HasField("completion"):
            finals[event.index] = event.completion
    return {i: (texts[i], finals.get(i)) for i in texts}


@dataclass(frozen=True)
class StreamResult:
    """One streamed request of the load test."""

    client: int
    prompt: str
    prompt_id: str
    text: str
    version: int
    started_after_swap: bool
    spans: tuple[tuple[int, int, int], ...] = ()  # (version, start, end) when two versions made it


@dataclass
class LoadRun:
    results: list[StreamResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    swap: Any = None
    corrupt_error: Any = None


async def swap_under_load(target: str, user_key: str, admin_key: str, prompts: Sequence[str], *,
                          new_version: int, corrupt_version: int, clients: int = 16,
                          max_new_tokens: int = 24, rounds_after: int = 2) -> LoadRun:
    """`clients` streaming clients (60 s deadline each) run greedy requests in a loop; once
    every client has finished one, the admin swaps to `new_version` (clients are then
    mid-stream), then tries `corrupt_version`. Each client stops after `rounds_after`
    requests that STARTED after the swap returned."""
    import grpc

    from clients.client import AsyncRlhfClient

    run = LoadRun()
    first_done = 0
    all_started = asyncio.Event()
    swapped = asyncio.Event()

    async def one_client(i: int) -> None:
        nonlocal first_done
        async with AsyncRlhfClient(target, user_key) as client:
            done_after, k = 0, 0
            while done_after < rounds_after:
                prompt, after = prompts[(i + k) % len(prompts)], swapped.is_set()
                k += 1
                try:
                    events = [e async for e in client.generate_stream(
                        prompt, temperature=0, max_new_tokens=max_new_tokens, timeout=60)]
                except grpc.aio.AioRpcError as e:
                    run.failures.append(f"client {i}: {e.code().name}: {e.details()}")
                    return
                (text, final), = join_stream(events).values()
                spans = tuple((s.policy_version, s.start_token, s.end_token) for s in final.version_spans)
                run.results.append(StreamResult(i, prompt, events[0].prompt_id, text,
                                                final.policy_version, after, spans))
                if k == 1:
                    first_done += 1
                    if first_done == clients:
                        all_started.set()
                done_after += after

    async def operator() -> None:
        async with AsyncRlhfClient(target, admin_key) as admin:
            await all_started.wait()
            run.swap = await admin.swap_policy(new_version, timeout=120)
            swapped.set()
            try:
                await admin.swap_policy(corrupt_version, timeout=120)
            except grpc.aio.AioRpcError as e:
                run.corrupt_error = e

    await asyncio.gather(operator(), *(one_client(i) for i in range(clients)))
    return run


def completions_in_store(store_path: Path, prompt_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of the completions table for these prompts, read through a SEPARATE connection."""
    import sqlite3

    conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        marks = ",".join("?" for _ in prompt_ids)
        rows = conn.execute(
            f"SELECT c.*, p.text AS prompt_text, p.user_id FROM completions c "
            f"JOIN prompts p ON p.id = c.prompt_id WHERE c.prompt_id IN ({marks})", list(prompt_ids)).fetchall()
        return [dict(r) for r in rows]
    finally:
        conn.close()
