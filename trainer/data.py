"""Training examples as plain records, and how they become token tensors.

Every stage uses one convention so that log-probs, masks and rewards line up:

- A prompt is a chat (a tuple of ``{"role", "content"}`` dicts); the policy's chat
  template renders it with the generation prompt appended.
- A response is its tokens followed by the end-of-sequence token (``<|im_end|>`` for
  SmolLM2): the EOS is part of the response, so the policy learns to stop.
- A batch is RIGHT-padded: ``input_ids`` (B, T) = prompt ++ response ++ pad, with
  ``attention_mask`` (B, T) and ``response_mask`` (B, T), 1 exactly on response tokens.
- Token t is predicted by the logits at t - 1, so per-token quantities over the response
  live on the shifted grid: ``shift_for_labels`` turns (B, T) tensors into the (B, T-1)
  grid where the masks of ``trainer.losses`` apply.

The cycle maps store rows to these records; tests build them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

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
    policy_versions: tuple[int, ...] | None = None  # which policy sampled each completion, when known

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


@dataclass
class SequenceBatch:
    """Right-padded prompt+response token ids. Shapes: all (B, T)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_lengths: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.response_mask.to(device),
            list(self.prompt_lengths),
        )

    @property
    def last_token_index(self) -> torch.Tensor:
        """(B,) index of each row's last non-pad token (where the RM reads its score)."""
        return self.attention_mask.sum(dim=1).long() - 1


def render_prompt(tokenizer, messages: Messages) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant header."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


def encode_response(tokenizer, text: str, max_tokens: int | None = None, eos: bool = True) -> list[int]:
    """Response token ids followed by EOS (truncated before the EOS when too long).

    ``eos`` False: the policy was cut at its token budget, so the response has no EOS (as in
    PPO's rollouts), and is cut to ``max_tokens`` tokens.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not eos:
        return list(ids)[:max_tokens] if max_tokens is not None else list(ids)
    if max_tokens is not None:
        ids = ids[: max(max_tokens - 1, 0)]
    return list(ids) + [tokenizer.eos_token_id]


def pack_row(prompt: Sequence[int], response: Sequence[int], max_length: int | None = None) -> list[int]:
    """One row of ``pack_sequences``: prompt + response, the prompt cut from the left to fit."""
    prompt = list(prompt)
    if max_length is not None and len(prompt) + len(response) > max_length:
        prompt = prompt[len(prompt) + len(response) - max_length :]
    return prompt + list(response)


def pack_sequences(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    max_length: int | None = None,
) -> SequenceBatch:
    """Concatenate each prompt with its response and right-pad into one batch.

    When ``max_length`` is set, prompts are cut from the LEFT (the end of a prompt, next to
    the response, matters most) so that prompt + response fits; a response is never cut here.
    """
    rows, masks, plens = [], [], []
    for prompt, response in zip(prompts, responses, strict=True):
        row = pack_row(prompt, response, max_length)
        plen = len(row) - len(response)
        rows.append(row)
        masks.append([0] * plen + [1] * len(response))
        plens.append(plen)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        response_mask[i, : len(row)] = torch.tensor(mask, dtype=torch.float32)
    return SequenceBatch(input_ids, attention_mask, response_mask, plens)


def shift_for_labels(logits: torch.Tensor, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align logits with the tokens they predict.

    Shapes: logits (B, T, V) -> (B, T-1, V); labels (B, T-1) = input_ids[:, 1:];
    mask (B, T-1) = response_mask[:, 1:] (1 where the label is a response token).
    """
    return logits[:, :-1, :], batch.input_ids[:, 1:], batch.response_mask[:, 1:]
