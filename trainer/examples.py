"""Training examples as plain records: what the cycle reads from the store and every stage
trains or measures on (a chat, a demonstration, a K-way comparison). No torch here: the
trainer's configuration, the cycle's bookkeeping and the CLI read these without loading it;
``trainer.data`` turns them into token tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Messages = tuple[dict[str, str], ...]


def user_turn(text: str) -> Messages:
    """A plain prompt as a one-turn chat."""
    return ({"role": "user", "content": text},)


@dataclass(frozen=True)
class PromptExample:
    """A logged prompt (PPO rollouts, evaluation)."""

    prompt_id: str
    messages: Messages


@dataclass(frozen=True)
class Demonstration:
    """A labeler's desired response to a prompt (SFT)."""

    messages: Messages
    response: str
    prompt_id: str = ""


@dataclass(frozen=True)
class Comparison:
    """One prompt's K completions with their ranks (lower = better, equal = tied): ONE
    reward-model batch element, however many pairs it implies."""

    messages: Messages
    completions: tuple[str, ...]
    ranks: tuple[int, ...]
    labeler_group: str = ""
    labeler_id: str = ""
    prompt_id: str = ""
    # Per completion: did the policy stop (EOS) or hit its token budget? None: all stopped.
    # The RM sees a cut completion without EOS, as PPO's rollouts are scored.
    stopped: tuple[bool, ...] | None = None
    # which policy sampled each completion, when known (None: two versions, across a hot swap)
    policy_versions: tuple[int | None, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.completions) != len(self.ranks):
            raise ValueError(f"{len(self.completions)} completions but {len(self.ranks)} ranks")
        if self.stopped is not None and len(self.stopped) != len(self.completions):
            raise ValueError(f"{len(self.completions)} completions but {len(self.stopped)} stopped flags")
        if len(self.completions) < 2:
            raise ValueError("a comparison needs at least 2 completions")


def ranks_from_groups(groups: Sequence[Sequence[str]], completion_ids: Sequence[str]) -> tuple[int, ...]:
    """Best-first tie groups -> one rank per completion id (0 = best; a group shares a rank)."""
    rank_of = {cid: rank for rank, group in enumerate(groups) for cid in group}
    return tuple(rank_of[cid] for cid in completion_ids)
