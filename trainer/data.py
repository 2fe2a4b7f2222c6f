"""How training examples (``trainer.examples``) become token tensors.

Every stage uses one convention so that log-probs, masks and rewards line up:

- A prompt is a chat (a tuple of ``{"role", "content"}`` dicts); the policy's chat
  template renders it with the generation prompt appended (``common.chat.render_chat_ids``,
  the server's rendering too).
- A response is its tokens followed by the end-of-sequence token (``<|im_end|>`` for
  SmolLM2): the EOS is part of the response, so the policy learns to stop.
- A batch is RIGHT-padded: ``input_ids`` (B, T) = prompt ++ response ++ pad, with
  ``attention_mask`` (B, T) and ``response_mask`` (B, T), 1 exactly on response tokens.
- Token t is predicted by the logits at t - 1, so per-token quantities over the response
  live on the shifted grid: ``shift_for_labels`` turns (B, T) tensors into the (B, T-1)
  grid where the masks of ``trainer.losses`` apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from trainer.torch_parts import right_pad


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
        rows.append(torch.tensor(row, dtype=torch.long))
        masks.append(torch.tensor([0.0] * plen + [1.0] * len(response)))
        plens.append(plen)
    input_ids, attention_mask = right_pad(rows, value=pad_token_id)  # (B, T) each
    response_mask, _ = right_pad(masks)  # (B, T) float
    return SequenceBatch(input_ids, attention_mask, response_mask, plens)


def shift_for_labels(logits: torch.Tensor, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align logits with the tokens they predict.

    Shapes: logits (B, T, V) -> (B, T-1, V); labels (B, T-1) = input_ids[:, 1:];
    mask (B, T-1) = response_mask[:, 1:] (1 where the label is a response token).
    """
    return logits[:, :-1, :], batch.input_ids[:, 1:], batch.response_mask[:, 1:]
