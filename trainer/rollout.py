"""Rollouts: the policy answers a batch of prompts, and we keep the tokens it produced.

PPO needs the exact token ids that were sampled (not re-tokenised text), so a generator
returns, per prompt, the prompt ids it conditioned on and the response ids it sampled.
Responses follow ``trainer.data``'s convention: a response that stopped ends with the EOS
token (the EOS is part of the response, so the policy learns to stop); one that hit
``max_new_tokens`` is cut there and has no EOS.

``RolloutGenerator`` is the interface PPO depends on. ``HFRolloutGenerator`` runs
``transformers``' ``generate`` on the very module being trained, so every rollout uses the
current weights with no sync step. ``trainer.rollout_vllm.VLLMRolloutGenerator`` samples
from vLLM's engine on a copy of the weights, which ``sync`` refreshes after each update
(``PPOConfig.rollout_engine``; measured in docs/BENCHMARKS.md); PPO's importance ratio
stays right because the old log-probs are recomputed by the trainer, not taken from the engine.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Sequence

import torch

from common.chat import render_chat_ids
from trainer import distributed
from trainer.examples import PromptExample


@dataclass
class Rollouts:
    """One batch of sampled responses, row i answering ``prompts[i]``."""

    prompts: list[PromptExample]
    prompt_ids: list[list[int]]  # the (possibly left-truncated) prompt the model saw
    response_ids: list[list[int]]  # ends with EOS iff the model stopped
    texts: list[str]  # the response decoded without special tokens
    eos_token_id: int | None = None

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def stopped(self) -> list[bool]:
        """Whether each response ended with EOS (False: cut at ``max_new_tokens``)."""
        return [bool(r) and r[-1] == self.eos_token_id for r in self.response_ids]

    @property
    def response_lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]


class RolloutGenerator(abc.ABC):
    """Samples responses from the CURRENT policy weights."""

    def sync(self, policy: torch.nn.Module) -> None:
        """Take ``policy``'s current weights (after an optimizer step). An engine sampling
        from the policy module itself has nothing to do."""

    def close(self) -> None:
        """Release the engine (a process, memory)."""

    @abc.abstractmethod
    def generate(
        self,
        prompts: Sequence[PromptExample],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        max_prompt_tokens: int | None = None,
    ) -> Rollouts:
        """One response per prompt. ``temperature == 0`` means greedy; ``seed`` makes
        sampling reproducible; prompts longer than ``max_prompt_tokens`` keep their end."""


def cut_at_eos(tokens: Sequence[int], eos_token_id: int) -> list[int]:
    """Tokens up to and including the first EOS (all of them when there is none)."""
    tokens = list(tokens)
    if eos_token_id in tokens:
        return tokens[: tokens.index(eos_token_id) + 1]
    return tokens


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask for generation. Shapes: both (B, T_max)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


class HFRolloutGenerator(RolloutGenerator):
    """Batched sampling with ``model.generate`` on the model being trained (a plain causal LM
    or a peft-wrapped one), left-padded, ``batch_size`` prompts per call."""

    def __init__(self, model, tokenizer, batch_size: int = 64) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id)

    def generate(
        self,
        prompts: Sequence[PromptExample],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        max_prompt_tokens: int | None = None,
    ) -> Rollouts:
        prompt_ids = [render_chat_ids(self.tokenizer, p.messages) for p in prompts]
        if max_prompt_tokens is not None:
            prompt_ids = [ids[-max_prompt_tokens:] for ids in prompt_ids]
        responses: list[list[int]] = []
        # fork_rng: a seeded rollout must not reset the caller's global RNG stream.
        with torch.random.fork_rng(devices=self._cuda_devices()):
            if seed is not None:
                torch.manual_seed(seed)
            # Sharded weights (FSDP2): every rank makes the same number of generate calls
            for rows in distributed.row_chunks(len(prompt_ids), self.batch_size, self.model):
                responses += self._generate_chunk(prompt_ids[rows], max_new_tokens, temperature, top_p)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return Rollouts(list(prompts), prompt_ids, responses, texts, self.eos_token_id)

    @torch.no_grad()
    def _generate_chunk(
        self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, top_p: float
    ) -> list[list[int]]:
        from transformers import GenerationConfig

        device = next(self.model.parameters()).device
        input_ids, attention_mask = left_pad(prompt_ids, self.pad_token_id)
        # An explicit config: the checkpoint's generation_config (top_k, repetition penalty)
        # would otherwise change the distribution PPO computes log-probs for.
        sampling = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=0 if sampling else None,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        was_training = self.model.training
        self.model.eval()
        try:
            # sharded weights: every rank runs forwards until all ranks' sequences are done
            in_step = {"synced_gpus": True} if distributed.is_sharded(self.model) else {}
            out = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                **in_step,
            )  # (B, T_prompt + new)
        finally:
            self.model.train(was_training)
        new_tokens = out[:, input_ids.shape[1] :].tolist()
        return [cut_at_eos(row, self.eos_token_id) for row in new_tokens]

    def _cuda_devices(self) -> list[int]:
        device = next(self.model.parameters()).device
        return [device.index or 0] if device.type == "cuda" else []
