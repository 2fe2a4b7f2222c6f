"""The engine interface: what the servicers need from a text generator.

Engines know nothing of gRPC or the store. Two implementations (vllm.py, hf.py) are
chosen at start-up by `server.engines.create_engine`.

Versions. Every completion records the policy version(s) that produced its tokens. How
a swap treats requests in flight is the engine's `swap_mode` (`SWAP_MODES`):
- "drain": a generation holds `SwapGate` for its whole life; a swap closes the gate to
  new generations, waits for the running ones to finish on the old weights, loads the new
  ones, then reopens. Every completion is one version; new requests wait the whole drain
  (the "stall"). The drain is bounded (`drain_timeout_s`): past it the engine does what
  its docstring says (vLLM: continues the rest as in "keep"; HF: keeps waiting, and logs).
- "keep" (vLLM only): the scheduler pauses with in-flight requests frozen, the weights are
  swapped (on a CPU staged beforehand, while requests run), and the frozen requests
  continue on the new weights; the stall is the swap of weights itself.
  A request that spans the swap is recorded with its `version_spans` (the tokens each
  version produced) and counted as mixed; it is never taken for one version's sample.
- "adapter" (vLLM only): the engine serves an SFT base with LoRA adapters on it. A
  checkpoint whose adapters were trained on the loaded base (its manifest says so,
  `common.checkpoints.adapter_of`) is swapped in by loading its adapters beside the
  current ones: new requests use them at once, requests in flight finish on the adapters
  they started with. Nothing waits and nothing mixes. Any other checkpoint (a new SFT
  lineage, a policy without adapters) is a full swap by "drain"; requests still running
  after the drain bound are aborted (their samples end "abort", one version each), as
  adapters of the old base cannot run on the new one. The price is throughput: LoRA
  layers run beside every linear layer (docs/BENCHMARKS.md, "Hot swap").
"auto" is "keep" on vLLM and "drain" on HF: the fastest mode that keeps every record
truthful at full throughput; "adapter" is chosen explicitly.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Literal, Sequence

FinishReason = Literal["stop", "length", "abort"]
SwapMode = Literal["drain", "keep", "adapter"]
SWAP_MODES: tuple[str, ...] = ("auto", "drain", "keep", "adapter")


@dataclass(frozen=True)
class VersionSpan:
    """Output tokens [start, end) of a sample were produced by policy `version`."""

    version: int
    start: int
    end: int


@dataclass(frozen=True)
class SamplingOptions:
    """Validated sampling parameters (the servicer fills defaults and checks ranges)."""

    n: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationUpdate:
    """One step of one sample of a request.

    `text_delta` is the text produced since this sample's previous update. The sample's
    last update has `finished=True`, its `finish_reason`, and the final token counts; the
    concatenated deltas of a sample equal its final text.

    `policy_version` is the version serving when the request started; on the last update
    it is the version of the sample's first token, and `version_spans` lists each
    version's tokens when more than one version produced the sample (empty otherwise).
    """

    index: int
    text_delta: str
    completion_tokens: int
    policy_version: int
    finished: bool = False
    finish_reason: FinishReason | None = None
    version_spans: tuple[VersionSpan, ...] = ()


@dataclass(frozen=True)
class SwapResult:
    previous_version: int
    version: int
    drain_seconds: float  # waiting for in-flight generations to finish on the old weights
    load_seconds: float  # loading the new weights
    stall_seconds: float  # how long new requests could not start (drain + load)
    mode: SwapMode = "drain"  # what this swap did ("adapter": adapters loaded beside the serving ones)
    continued_requests: int = 0  # in flight across the reload, continued on the new weights
    aborted_requests: int = 0  # still running past the drain bound of a full swap in "adapter" mode


class EngineError(RuntimeError):
    """A generation or swap failed inside the engine (not the caller's fault)."""


class SwapGate:
    """Readers (generations) share the gate; a writer (swap) waits for them and excludes new ones."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._active = 0
        self._swapping = False

    @property
    def active(self) -> int:
        return self._active

    @contextlib.asynccontextmanager
    async def generation(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._swapping)
            self._active += 1
        try:
            yield
        finally:
            async with self._cond:
                self._active -= 1
                self._cond.notify_all()

    async def drained(self) -> None:
        """Wait until no generation holds the gate (inside `swap`, after its bound passed)."""
        async with self._cond:
            await self._cond.wait_for(lambda: self._active == 0)

    @contextlib.asynccontextmanager
    async def swap(self, drain_timeout_s: float | None = None) -> AsyncIterator[float]:
        """Close the gate, wait for the drain (at most `drain_timeout_s`: then the caller
        goes on with `active` generations still in flight); yields the drain time in seconds."""
        async with self._cond:
            await self._cond.wait_for(lambda: not self._swapping)
            self._swapping = True
            start = time.perf_counter()
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._cond.wait_for(lambda: self._active == 0), drain_timeout_s)
            except BaseException:
                # A swap cancelled while draining must reopen the gate, or it stays shut.
                self._swapping = False
                self._cond.notify_all()
                raise
            drained = time.perf_counter() - start
        try:
            yield drained
        finally:
            async with self._cond:
                self._swapping = False
                self._cond.notify_all()


class Engine(abc.ABC):
    """A policy behind an async, streaming generate; swappable at run time."""

    name: str  # "vllm" | "hf"
    swap_mode: SwapMode  # how a swap treats requests in flight (module docstring)

    @property
    @abc.abstractmethod
    def version(self) -> int:
        """The policy version new generations will use."""

    @property
    @abc.abstractmethod
    def model_name(self) -> str: ...

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the initial checkpoint (may take seconds to minutes)."""

    @abc.abstractmethod
    def render_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Prompt token ids: the chat template applied, generation prompt appended."""

    @abc.abstractmethod
    def generate(
        self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions
    ) -> AsyncIterator[GenerationUpdate]:
        """Stream the n samples' updates (interleaved by index). Closing the iterator
        early (a cancelled call) aborts the generation in the engine."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a running generation; its samples finish with reason "abort"."""

    @abc.abstractmethod
    async def swap(self, checkpoint_dir: Path, version: int) -> SwapResult:
        """Load the (already verified) checkpoint and serve it as `version`, treating the
        requests in flight as the engine's swap mode says (module docstring). On a load
        failure the old weights keep serving and EngineError is raised."""

    @abc.abstractmethod
    async def check_health(self) -> bool: ...

    @abc.abstractmethod
    async def shutdown(self) -> None: ...
