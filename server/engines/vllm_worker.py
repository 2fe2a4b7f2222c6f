"""Code that runs inside vLLM's worker processes, mixed into the worker class through
the engine argument `worker_extension_cls` and reached with `collective_rpc`.

Imported by the worker process, so it imports nothing of the server beyond this module
(and ``common.vllm_reload``, shared with the trainer's rollout engine).
"""

from __future__ import annotations

import threading
from typing import Any


class PolicyReloadExtension:
    """Worker methods for hot-swapping the policy's weights in place."""

    def reload_policy_weights(self, weights_path: str) -> None:
        """Reload every weight from a checkpoint folder, then rebuild the kernel state
        derived from embedding-shaped weights (``repack_tied_embeddings`` says why)."""
        from common.vllm_reload import repack_tied_embeddings

        self.reload_weights(weights_path=weights_path, is_checkpoint_format=True)
        repack_tied_embeddings(self)

    # Staging (``common.vllm_reload.StagedWeights``): the load and repack run in a thread of
    # this worker while its main thread keeps serving; the engine polls, pauses, commits.

    def stage_policy_weights(self, weights_path: str) -> None:
        """Start loading `weights_path` beside the live weights; returns at once."""
        from common.vllm_reload import StagedWeights

        outcome: dict[str, Any] = {}

        def load() -> None:
            try:
                outcome["staged"] = StagedWeights.load(self, weights_path)
            except BaseException as e:  # reported by staged_policy_weights_status
                outcome["error"] = e

        thread = threading.Thread(target=load, name="stage-policy-weights", daemon=True)
        self._staging = (thread, outcome, weights_path)
        thread.start()

    def staged_policy_weights_status(self) -> str:
        """"loading", "ready", or "refused: <why>" (this model is reloaded in place);
        raises what else the staging raised (an unreadable checkpoint)."""
        from common.vllm_reload import StagingRefused

        thread, outcome, _ = self._staging
        if thread.is_alive():
            return "loading"
        error = outcome.get("error")
        if isinstance(error, StagingRefused):
            return f"refused: {error}"
        if error is not None:
            raise error
        return "ready"

    def commit_staged_policy_weights(self, weights_path: str) -> None:
        """Serve the staged weights (the engine is paused). Refuses weights staged from
        another folder than the one the engine is swapping to."""
        thread, outcome, staged_path = self._staging
        if thread.is_alive() or "staged" not in outcome or staged_path != weights_path:
            raise RuntimeError(f"no staged weights of {weights_path} to commit")
        del self._staging
        outcome["staged"].commit()
        self.model_config.model = weights_path  # as vLLM's reload_weights leaves it

    def drop_staged_policy_weights(self) -> None:
        """Forget staged weights that will not be committed (the thread, if still running,
        finishes into nothing)."""
        self.__dict__.pop("_staging", None)
