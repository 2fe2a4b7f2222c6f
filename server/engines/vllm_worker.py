"""Code that runs inside vLLM's worker processes, mixed into the worker class through
the engine argument `worker_extension_cls` and reached with `collective_rpc`.

Imported by the worker process, so it imports nothing of the server beyond this module
(and ``common.vllm_reload``, shared with the trainer's rollout engine).
"""

from __future__ import annotations


class PolicyReloadExtension:
    """Worker methods for hot-swapping the policy's weights in place."""

    def reload_policy_weights(self, weights_path: str) -> None:
        """Reload every weight from a checkpoint folder, then rebuild the kernel state
        derived from embedding-shaped weights (``repack_tied_embeddings`` says why)."""
        from common.vllm_reload import repack_tied_embeddings

        self.reload_weights(weights_path=weights_path, is_checkpoint_format=True)
        repack_tied_embeddings(self)
