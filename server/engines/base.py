"""The engine interface: what the servicers need from a text generator.

Engines know nothing of gRPC or the store. Two implementations (vllm.py, hf.py) are
chosen at start-up by `server.engines.create_engine`.

Version consistency: every completion must be produced by ONE policy version. Both
engines get that the same way, with `SwapGate`: a generation holds the gate for its whole
life; a swap closes the gate to new generations, waits for the running ones to drain,
loads the new weights, then reopens. New requests wait (the "stall") instead of failing,
and the version they are tagged with is read after the gate lets them in.
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
    """

    index: int
    text_delta: str
    completion_tokens: int
    policy_version: int
    finished: bool = False
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class SwapResult:
    previous_version: int
    version: int
    drain_seconds: float  # waiting for in-flight generations to finish on the old weights
    load_seconds: float  # loading the new weights
    stall_seconds: float  # how long the gate was closed to new requests (drain + load)


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

    @contextlib.asynccontextmanager
    async def swap(self) -> AsyncIterator[float]:
        """Close the gate, wait for the drain; yields the drain time in seconds."""
        async with self._cond:
            await self._cond.wait_for(lambda: not self._swapping)
            self._swapping = True
            start = time.perf_counter()
            try:
                await self._cond.wait_for(lambda: self._active == 0)
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
        """Drain, load the (already verified) checkpoint, serve it as `version`. On a load
        failure the old weights keep serving and EngineError is raised."""

    @abc.abstractmethod
    async def check_health(self) -> bool: ...

    @abc.abstractmethod
    async def shutdown(self) -> None: ...
