"""The HF transformers engine: batched, streaming generation with plain PyTorch.

The pure-PyTorch fallback where vLLM is not installed, and the fast engine for tests.
Concurrent requests are batched: each request's n samples become n rows, a background
task collects waiting rows into a batch of at most `max_batch_size`, and a worker thread
decodes the batch step by step with a KV cache (left padding, per-row finish, per-row
sampling and seeds). Requests that arrive while a batch runs wait for the next one
(static batching: simple, and enough for a fallback).

Greedy decoding of a single prompt gives the same tokens as `model.generate(do_sample=False)`:
same forward passes, same cache, argmax.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable, Sequence

from common.chat import render_chat_ids
from server.engines.base import (
    Engine,
    EngineError,
    FinishReason,
    GenerationUpdate,
    SamplingOptions,
    SwapGate,
    SwapResult,
)
from server.engines.compat import check_swap_compatible

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- pure helpers

def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into one batch.

    Returns (input_ids, attention_mask), both Shape: (B, T) with T the longest prompt;
    the mask is 1 on real tokens, 0 on padding.
    """
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, width - len(prompt):] = 1
    return input_ids, attention_mask


def sample_next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """Pick the next token from one row's logits, Shape: (V,).

    temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) restricted
    to the smallest set of tokens whose probability reaches top_p (nucleus sampling).
    """
    import torch

    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (V,)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index where the earliest stop string starts in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def row_seeds(seed: int | None, n: int) -> list[int]:
    """One seed per sample: derived from the request's seed (reproducible) or random."""
    import torch

    if seed is None:
        return [random.getrandbits(62) for _ in range(n)]
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**62, (n,), generator=generator).tolist()


# ---------------------------------------------------------------- requests and rows

class _Request:
    """A submitted generation: its n rows report here; the stream reads `updates`."""

    def __init__(self, request_id: str, prompt: list[int], options: SamplingOptions, version: int):
        self.id = request_id
        self.prompt = prompt
        self.options = options
        self.version = version
        self.updates: asyncio.Queue[GenerationUpdate] = asyncio.Queue()
        # Set from the event loop, read by the decode thread between steps.
        self.aborted = threading.Event()
        self.rows_left = options.n
        self.done = asyncio.Event()

    def push(self, update: GenerationUpdate) -> None:
        """Deliver one update (runs on the event loop)."""
        self.updates.put_nowait(update)
        if update.finished:
            self.rows_left -= 1
            if self.rows_left == 0:
                self.done.set()


@dataclass
class _Row:
    """One sample of one request: the unit of batching."""

    request: _Request
    index: int
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)
    emitted: str = ""  # text already streamed
    finish_reason: FinishReason | None = None


# ---------------------------------------------------------------- the decode loop (worker thread)

Emit = Callable[[_Row, str], None]


class _BatchDecoder:
    """Decodes one batch of rows with one model; runs in a worker thread."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, emit: Emit):
        self.model = model
        self.tokenizer = tokenizer
        self.emit = emit
        self.device = next(model.parameters()).device
        self.eos_ids = _eos_ids(model, tokenizer)
        self.max_positions = getattr(model.config, "max_position_embeddings", 1 << 30)

    def run(self, rows: list[_Row]) -> None:
        """Decode until every row has finished (EOS, stop string, length or abort)."""
        import torch
        from transformers import DynamicCache

        with torch.inference_mode():
            input_ids, attention_mask = left_pad([r.request.prompt for r in rows], self.tokenizer.pad_token_id)
            attention_mask = attention_mask.to(self.device)
            cache = DynamicCache()
            logits = self._forward(input_ids.to(self.device), attention_mask, cache)  # (B, V)
            active = rows
            while active:
                tokens = [self._step_row(row, logits[i]) for i, row in enumerate(active)]
                keep = [i for i, row in enumerate(active) if row.finish_reason is None]
                if not keep:
                    return
                if len(keep) < len(active):
                    # Finished rows leave the batch: drop their KV cache and mask rows.
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    attention_mask = attention_mask[index]
                    active = [active[i] for i in keep]
                    tokens = [tokens[i] for i in keep]
                step_ids = torch.tensor(tokens, device=self.device)[:, None]  # (B', 1)
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=1)
                logits = self._forward(step_ids, attention_mask, cache)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache) -> torch.Tensor:
        """Logits of the last position, Shape: (B, V), for input_ids (B, t) after the cache.

        attention_mask is (B, cached + t); positions count real tokens only, so a left-
        padded row sees the same positions as it would alone.
        """
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]

    def _step_row(self, row: _Row, logits: torch.Tensor) -> int:
        """Sample one token for a row, stream its text, and decide whether it finished."""
        options = row.request.options
        if row.request.aborted.is_set():
            return self._finish(row, "abort", row.emitted)
        token = sample_next_token(logits, options.temperature, options.top_p, row.generator)
        row.token_ids.append(token)
        if token in self.eos_ids:
            return self._finish(row, "stop", self._text(row), token)
        text = self._text(row)
        stop_at = find_stop(text, options.stop) if options.stop else -1
        if stop_at >= 0:
            # Never take back text already streamed (decoding is prefix-stable in practice).
            return self._finish(row, "stop", text[: max(stop_at, len(row.emitted))], token)
        if len(row.token_ids) >= options.max_new_tokens or self._context_full(row):
            return self._finish(row, "length", text, token)
        self._stream(row, text)
        return token

    def _text(self, row: _Row) -> str:
        ids = [t for t in row.token_ids if t not in self.eos_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _context_full(self, row: _Row) -> bool:
        return len(row.request.prompt) + len(row.token_ids) >= self.max_positions

    def _stream(self, row: _Row, text: str) -> None:
        """Emit the new text, holding back what may still change: an incomplete UTF-8
        character, and a tail that could be the start of a stop string."""
        safe = text.rstrip("\ufffd")
        hold = max((len(s) for s in row.request.options.stop), default=1) - 1
        upto = len(safe) - hold
        if upto > len(row.emitted) and safe.startswith(row.emitted):
            delta = safe[len(row.emitted):upto]
            row.emitted += delta
            self.emit(row, delta)

    def _finish(self, row: _Row, reason: FinishReason, final_text: str, token: int = -1) -> int:
        """Mark the row finished and emit its last delta (the rest of its final text)."""
        row.finish_reason = reason
        delta = final_text[len(row.emitted):] if final_text.startswith(row.emitted) else ""
        row.emitted += delta
        self.emit(row, delta)
        return token


def _update(row: _Row, delta: str) -> GenerationUpdate:
    """A row's progress as the update its request's stream yields."""
    return GenerationUpdate(
        index=row.index,
        text_delta=delta,
        completion_tokens=len(row.token_ids),
        policy_version=row.request.version,
        finished=row.finish_reason is not None,
        finish_reason=row.finish_reason,
    )


def _emitter(loop: asyncio.AbstractEventLoop) -> Emit:
    """The decode thread's callback: hand each delta to the event loop."""

    def emit(row: _Row, delta: str) -> None:
        # Snapshot now: the thread moves the row on before the loop runs the callback.
        loop.call_soon_threadsafe(row.request.push, _update(row, delta))

    return emit


def _abort_unfinished(rows: list[_Row]) -> None:
    """A crashed batch ends its unfinished rows with "abort" so no stream hangs."""
    for row in rows:
        if row.finish_reason is None:
            row.finish_reason = "abort"
            row.request.push(_update(row, ""))


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token id that ends a sample: the generation config's eos ids and the tokenizer's."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    ids.discard(None)
    return ids


# ---------------------------------------------------------------- the engine

@dataclass
class _Policy:
    """The served weights and the version they are tagged with; replaced whole on a swap."""

    model: PreTrainedModel
    version: int
    checkpoint_dir: Path


class HFEngine(Engine):
    """transformers on CPU or CUDA, with batching and streaming."""

    name = "hf"

    def __init__(
        self,
        checkpoint_dir: Path | str,
        version: int,
        *,
        max_batch_size: int = 8,
        dtype: str | None = None,
        device: str | None = None,
        swap_mode: str = "auto",
        drain_timeout_s: float = 30.0,
    ) -> None:
        """swap_mode: this engine swaps by "drain" only ("auto" = drain): its batches run
        whole in a worker thread and cannot be frozen and continued on new weights. Past
        `drain_timeout_s` a swap logs that it is still waiting and keeps waiting."""
        if swap_mode not in ("auto", "drain"):
            raise ValueError(f"swap_mode {swap_mode!r}: the HF engine swaps by 'drain' only ('keep' and 'adapter' "
                             "need the vLLM engine: its batches run whole in one thread, on one set of weights)")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._initial = (Path(checkpoint_dir), version)
        self._max_batch_size = max_batch_size
        self.swap_mode = "drain"
        self._drain_timeout_s = drain_timeout_s
        self._dtype = dtype
        self._device = device
        self._policy: _Policy | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._gate = SwapGate()
        self._swap_lock = asyncio.Lock()
        self._requests: dict[str, _Request] = {}
        self._pending: deque[_Row] = deque()
        self._work = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._batches = 0
        self._batched_rows = 0
        self._max_rows_seen = 0
        self._running_rows = 0

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the initial checkpoint and start the batching task."""
        from common.models import load_tokenizer

        checkpoint_dir, version = self._initial
        model = await asyncio.to_thread(self._load_model, checkpoint_dir)
        self._tokenizer = await asyncio.to_thread(load_tokenizer, checkpoint_dir)
        self._policy = _Policy(model, version, checkpoint_dir)
        self._loop_task = asyncio.create_task(self._batch_loop(), name="hf-engine-batches")

    async def shutdown(self) -> None:
        """Abort what runs, stop the batching task, drop the model."""
        for request in list(self._requests.values()):
            request.aborted.set()
        self._finish_pending_aborted()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        self._policy = None

    async def check_health(self) -> bool:
        return self._policy is not None and self._loop_task is not None and not self._loop_task.done()

    # ------------------------------------------------------------ metadata

    @property
    def version(self) -> int:
        return self._require_policy().version

    @property
    def model_name(self) -> str:
        return self._require_policy().checkpoint_dir.name

    def render_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return render_chat_ids(self._require_tokenizer(), messages)

    def stats(self) -> dict[str, int]:
        """Counters: batches run, rows they held, the largest batch, requests and rows in flight."""
        return {
            "batches": self._batches,
            "batched_rows": self._batched_rows,
            "max_batch_rows": self._max_rows_seen,
            "running": len(self._requests),
            "running_rows": self._running_rows,
            "pending_rows": len(self._pending),
        }

    # ------------------------------------------------------------ generation

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions
    ) -> AsyncIterator[GenerationUpdate]:
        if not prompt_token_ids:
            raise EngineError("empty prompt")
        async with self._gate.generation():
            request = self._submit(request_id, list(prompt_token_ids), options)
            # Count finals as they are READ: `rows_left` drops when they are pushed, so it
            # can reach 0 while another sample's final update still waits in the queue.
            unread_finals = options.n
            try:
                while unread_finals:
                    update = await request.updates.get()
                    unread_finals -= update.finished
                    yield update
            finally:
                if request.rows_left:
                    # The consumer went away: free the rows before leaving the gate.
                    await self._abort_and_wait(request)
                self._requests.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        """Stop a request; its rows finish with "abort" at the next decode step."""
        request = self._requests.get(request_id)
        if request is not None:
            request.aborted.set()
            self._finish_pending_aborted()

    def _submit(self, request_id: str, prompt: list[int], options: SamplingOptions) -> _Request:
        """Register a request (tagged with the version now serving) and queue its rows."""
        import torch

        if request_id in self._requests:
            raise EngineError(f"request id {request_id!r} is already running")
        request = _Request(request_id, prompt, options, self.version)
        self._requests[request_id] = request
        for index, seed in enumerate(row_seeds(options.seed, options.n)):
            generator = torch.Generator().manual_seed(seed) if options.temperature > 0 else None
            self._pending.append(_Row(request, index, generator))
        self._work.set()
        return request

    async def _abort_and_wait(self, request: _Request) -> None:
        request.aborted.set()
        self._finish_pending_aborted()
        await request.done.wait()

    def _finish_pending_aborted(self) -> None:
        """Rows of aborted requests that never reached a batch finish here, at once."""
        for row in [r for r in self._pending if r.request.aborted.is_set()]:
            self._pending.remove(row)
            row.finish_reason = "abort"
            row.request.push(_update(row, ""))

    # ------------------------------------------------------------ batching

    async def _batch_loop(self) -> None:
        """Forever: wait for rows, take a batch, decode it in a worker thread."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._work.clear()
                await self._work.wait()
            await asyncio.sleep(0)  # let requests submitted in the same tick join
            rows = self._take_batch()
            policy = self._require_policy()
            # The swap gate switches policies only with no request in flight.
            assert all(r.request.version == policy.version for r in rows), "rows from two versions"
            decoder = _BatchDecoder(policy.model, self._require_tokenizer(), _emitter(loop))
            self._record_batch(len(rows))
            try:
                await asyncio.to_thread(decoder.run, rows)
            except Exception:
                log.exception("batch of %d rows failed", len(rows))
                _abort_unfinished(rows)
            finally:
                self._running_rows = 0

    def _take_batch(self) -> list[_Row]:
        rows = []
        while self._pending and len(rows) < self._max_batch_size:
            rows.append(self._pending.popleft())
        return rows

    def _record_batch(self, size: int) -> None:
        self._batches += 1
        self._batched_rows += size
        self._max_rows_seen = max(self._max_rows_seen, size)
        self._running_rows = size

    # ------------------------------------------------------------ swapping

    async def swap(self, checkpoint_dir: Path, version: int) -> SwapResult:
        """Load the new weights beside the old (the old keep serving meanwhile), then close
        the gate, drain, and switch. The stall is the drain only; the load is not in it."""
        checkpoint_dir = Path(checkpoint_dir)
        async with self._swap_lock:
            current = self._require_policy()
            check_swap_compatible(current.checkpoint_dir, checkpoint_dir)
            started = time.perf_counter()
            try:
                model = await asyncio.to_thread(self._load_model, checkpoint_dir)
            except Exception as e:
                raise EngineError(f"loading {checkpoint_dir} failed, still serving v{current.version}: {e}") from e
            load_seconds = time.perf_counter() - started
            closed = time.perf_counter()
            async with self._gate.swap(self._drain_timeout_s) as drain_seconds:
                if self._gate.active:
                    log.warning("swap v%d -> v%d: %d generations still running after the %.0f s drain bound; "
                                "waiting for them (the HF engine cannot continue them on new weights)",
                                current.version, version, self._gate.active, self._drain_timeout_s)  # fmt: skip
                    await self._gate.drained()
                    drain_seconds = time.perf_counter() - closed
                self._policy = _Policy(model, version, checkpoint_dir)
            stall_seconds = time.perf_counter() - closed
        log.info("swapped v%d -> v%d (drain %.2f s, load %.2f s)", current.version, version, drain_seconds, load_seconds)
        return SwapResult(current.version, version, drain_seconds, load_seconds, stall_seconds)

    def _load_model(self, checkpoint_dir: Path) -> PreTrainedModel:
        from common.models import load_causal_lm

        return load_causal_lm(checkpoint_dir, dtype=self._dtype, device=self._device)

    # ------------------------------------------------------------ helpers

    def _require_policy(self) -> _Policy:
        if self._policy is None:
            raise EngineError("engine not started (or shut down)")
        return self._policy

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise EngineError("engine not started")
        return self._tokenizer

