"""One request through the engine, logged: render → check → generate → log → answer.

`Sampler.run` is what Inference.Generate/GenerateStream (and the Feedback service, for
the K completions of a labeling task, with purpose "label") use. It yields domain
events: `SampleDelta` as text is produced and `SampleDone` once a sample's row has
COMMITTED, so a caller that forwards `SampleDone` never answers with an unlogged sample.
Closing the iterator early (a cancelled call, a passed deadline) closes the engine's
stream, which aborts the generation in the engine, and logs what was produced so far
with finish_reason "abort".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from common.store import Completion, NewCompletion
from common.store.records import CompletionPurpose
from server.auth import Caller
from server.config import RequestLimits
from server.engines.base import Engine, GenerationUpdate, SamplingOptions
from server.limits import GenerationBudget, GenerationInput, check_prompt_tokens
from server.logging_sink import CompletionLog, IdempotencyKey, PromptRecord, ResponseBuilder
from server.metrics import ServerMetrics


@dataclass(frozen=True)
class SampleDelta:
    """New text of sample `index` (not yet finished)."""

    index: int
    text_delta: str
    policy_version: int


@dataclass(frozen=True)
class SampleDone:
    """Sample `index` finished and is logged; `text_delta` is its last piece of text."""

    index: int
    text_delta: str
    completion: Completion

    @property
    def policy_version(self) -> int:
        return self.completion.policy_version


SampleEvent = SampleDelta | SampleDone


@dataclass
class _SampleProgress:
    text: str = ""
    completion_tokens: int = 0
    policy_version: int | None = None
    version_spans: tuple[tuple[int, int, int], ...] = ()
    first_token_at: float | None = None
    done: bool = False


@dataclass
class _Run:
    """The bookkeeping of one request while it generates."""

    prompt: PromptRecord
    prompt_tokens: int
    options: SamplingOptions
    purpose: CompletionPurpose
    started: float
    samples: dict[int, _SampleProgress] = field(default_factory=dict)
    logged: list[Completion] = field(default_factory=list)
    inflight_write: asyncio.Future[list[Completion]] | None = None

    def progress(self, index: int) -> _SampleProgress:
        return self.samples.setdefault(index, _SampleProgress())

    @property
    def prompt_logged(self) -> bool:
        return bool(self.logged)

    @property
    def first_token_at(self) -> float | None:
        times = [p.first_token_at for p in self.samples.values() if p.first_token_at is not None]
        return min(times) if times else None

    def new_completion(self, index: int, finish_reason: str, now: float) -> NewCompletion:
        p = self.progress(index)
        return NewCompletion(
            idx=index, text=p.text, policy_version=p.policy_version if p.policy_version is not None else -1,
            finish_reason=finish_reason, prompt_tokens=self.prompt_tokens,  # type: ignore[arg-type]
            completion_tokens=p.completion_tokens, latency_s=now - self.started,
            sampling=sampling_record(self.options),
            ttft_s=None if p.first_token_at is None else p.first_token_at - self.started,
            purpose=self.purpose, version_spans=p.version_spans)


def sampling_record(options: SamplingOptions) -> dict[str, object]:
    """The sampling parameters as logged with each completion (JSON-ready)."""
    record = dataclasses.asdict(options)
    record["stop"] = list(options.stop)
    return record


class Sampler:
    """Runs requests through the engine under the caller's generation budget (concurrency
    and tokens) and logs them."""

    def __init__(self, engine: Engine, completion_log: CompletionLog, metrics: ServerMetrics,
                 limits: RequestLimits, budget: GenerationBudget) -> None:
        self._engine = engine
        self._log = completion_log
        self._metrics = metrics
        self._limits = limits
        self._budget = budget

    def prompt_token_ids(self, request: GenerationInput) -> list[int]:
        """The chat template applied; InvalidRequest when the result is too long."""
        ids = self._engine.render_chat(request.messages)
        check_prompt_tokens(len(ids), self._limits)
        return ids

    async def run(
        self,
        caller: Caller,
        request: GenerationInput,
        prompt: PromptRecord,
        *,
        started: float | None = None,
        purpose: CompletionPurpose = "serve",
        answer: tuple[IdempotencyKey, ResponseBuilder] | None = None,
    ) -> AsyncIterator[SampleEvent]:
        """Generate `request`'s n samples as `caller`, logging each; see the module docstring.

        Raises InvalidRequest (prompt too long) or TooManyRequests (no slot, or
        RateLimited: not enough tokens for max_new_tokens x n) before the first event.
        `started` (time.perf_counter()) is when the call arrived: latency and time to first
        token are measured from it. `answer` records the idempotent response with the last sample.
        """
        prompt_ids = self.prompt_token_ids(request)
        run = _Run(prompt, len(prompt_ids), request.options, purpose,
                   time.perf_counter() if started is None else started)
        engine_request_id = f"{prompt.prompt_id}-{uuid.uuid4().hex[:8]}"
        reserve = request.options.max_new_tokens * request.options.n
        with self._budget.hold(caller.limit_key, reserve) as charge, self._metrics.generation():
            updates = self._engine.generate(engine_request_id, prompt_ids, request.options)
            try:
                async with contextlib.aclosing(updates):
                    async for update in updates:
                        yield await self._event(run, update, answer)
            finally:
                charge.used = sum(p.completion_tokens for p in run.samples.values())
                self._record_metrics(run)
                if len(run.logged) < run.options.n:
                    self._log.in_background(self._log_abandoned(run), f"log abandoned {prompt.prompt_id}")

    async def _event(self, run: _Run, update: GenerationUpdate,
                     answer: tuple[IdempotencyKey, ResponseBuilder] | None) -> SampleEvent:
        now = time.perf_counter()
        p = run.progress(update.index)
        p.text += update.text_delta
        p.completion_tokens = update.completion_tokens
        p.policy_version = update.policy_version
        p.version_spans = tuple((v.version, v.start, v.end) for v in update.version_spans)
        if p.first_token_at is None and update.completion_tokens > 0:
            p.first_token_at = now
        if not update.finished:
            return SampleDelta(update.index, update.text_delta, update.policy_version)
        p.done = True
        last = sum(s.done for s in run.samples.values()) == run.options.n
        record = run.new_completion(update.index, update.finish_reason or "stop", now)
        # A task, shielded: if the call is cancelled mid-write the commit still lands
        # (and is counted in run.logged), so the abandoned-sample log neither loses nor
        # duplicates this sample.
        run.inflight_write = asyncio.ensure_future(self._write(run, record, answer if last else None))
        stored = await asyncio.shield(run.inflight_write)
        return SampleDone(update.index, update.text_delta, stored[0])

    async def _write(self, run: _Run, record: NewCompletion,
                     answer: tuple[IdempotencyKey, ResponseBuilder] | None) -> list[Completion]:
        stored = await self._log.write_samples(
            run.prompt, [record], with_prompt=not run.prompt_logged,
            answer=None if answer is None else (answer[0], answer[1], list(run.logged)))
        run.logged.extend(stored)
        return stored

    async def _log_abandoned(self, run: _Run) -> None:
        """The caller left before every sample was logged: log the prompt (if it is not
        yet) and what each started sample produced, with finish_reason "abort"."""
        if run.inflight_write is not None:
            with contextlib.suppress(Exception):
                await run.inflight_write
        logged = {c.idx for c in run.logged}
        now = time.perf_counter()
        pending = [run.new_completion(i, "abort", now) for i, p in sorted(run.samples.items())
                   if i not in logged and p.policy_version is not None]
        if pending or not run.prompt_logged:
            await self._log.write_samples(run.prompt, pending, with_prompt=not run.prompt_logged)

    def _record_metrics(self, run: _Run) -> None:
        seconds = time.perf_counter() - run.started
        ttft = run.first_token_at
        tokens = sum(p.completion_tokens for p in run.samples.values())
        self._metrics.record_generation(seconds, None if ttft is None else ttft - run.started, tokens)
