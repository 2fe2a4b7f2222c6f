"""The reward model's scalar heads: what turns the trunk's hidden states into a score.

- ``LastTokenHead`` (the paper's): a linear map of the state at the response's last token.
- ``PooledHead``: the states of EVERY response token (by default the token embeddings and a
  middle layer's states, concatenated: what the token is and what it means in context),
  projected to a few features and pooled three ways (max, mean, log of the positive sum),
  optionally next to the last token's final state (``last_state``; off by default, so the
  trunk runs only up to the pooled layer), then a linear map. Max-pooling carries "some token
  of the response is X", the sum carries "how many", the mean "how much on average":
  properties spread over a response that the last token's state barely encodes. Measured on
  the embedded model's own samples ranked by simulated labelers (``python -m
  bench.reward_curve``, docs/BENCHMARKS.md): on a frozen trunk it beat the last-token head
  and trained top layers at every data size, pooling a middle layer's states beat pooling
  the final ones, adding the embeddings beat the middle layer alone, and dropping the last
  token's final state lost nothing.

Both read only response tokens besides the last one, so both need the response mask, and
both give per-token values (``per_token``, the PPO value model's V(s_t)): the score the
head would give if the response ended at t. For the pooled head the pools then run over
the response tokens up to t (cumulative max, mean and sum).

Inputs are standardised by statistics fixed before training (``fit_normalizer``) and saved
with the head: final hidden states have a few dimensions two orders of magnitude larger
than the rest, which otherwise dominate the first steps of AdamW.

Pure modules: tensors in, tensors out (torch only).
"""

from __future__ import annotations

import math

import torch

from trainer.config import HeadKind

_NO_TOKEN = -1e4  # a pooled max over no response token yet


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's last non-pad position. Shape: (B, T) -> (B,) long."""
    return attention_mask.sum(dim=1).long() - 1


def gather_last(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The state at each row's last non-pad token. Shape: (B, T, H), (B, T) -> (B, H)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask)]


class LastTokenHead(torch.nn.Module):
    """r = w . h_last + b: the paper's head, read at the last token (the EOS when the policy stopped)."""

    kind: HeadKind = "last_token"
    reads_tokens = False  # only the last token's final state
    reads_final = True

    def __init__(self, hidden_size: int, init_std: float | None = None) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        std = init_std if init_std is not None else 1.0 / math.sqrt(hidden_size + 1)
        torch.nn.init.normal_(self.linear.weight, std=std)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: torch.Tensor | None, last: torch.Tensor, response_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Shape: last (B, H) -> (B,); ``tokens`` and ``response_mask`` are not read."""
        return self.linear(last).squeeze(-1)

    def per_token(self, tokens: torch.Tensor | None, final: torch.Tensor, response_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """The head at every position. Shape: final (B, T, H) -> (B, T)."""
        return self.linear(final).squeeze(-1)

    def fit_normalizer(self, token_states: torch.Tensor, last_states: torch.Tensor) -> None:
        """Nothing to fit (the paper's head reads raw states)."""


class PooledHead(torch.nn.Module):
    """r = w . [max_t p_t, mean_t p_t, log(1 + sum_t relu(p_t)), z(h_last)] + b over response tokens t,
    where p_t = U z(x_t) (``features`` projections) of the token states x_t (``token_size`` wide:
    the states at ``RewardModel.pool_layers``, concatenated), h_last the final state at the last
    token (``hidden_size`` wide), z a standardisation.

    ``last_state`` False drops the z(h_last) term: the head then reads nothing above the
    deepest pooled layer, so the trunk need not run its upper layers at all
    (``RewardModel``). Measured (``bench.reward_curve``): no worse without it, and a 576-wide
    input less to overfit on a few thousand pairs."""

    kind: HeadKind = "pooled"
    reads_tokens = True

    def __init__(self, hidden_size: int, features: int = 16, init_std: float | None = None,
                 token_size: int | None = None, last_state: bool = True) -> None:
        super().__init__()
        token_size = hidden_size if token_size is None else token_size
        self.reads_final = last_state
        self.proj = torch.nn.Linear(token_size, features)
        self.linear = torch.nn.Linear(3 * features + (hidden_size if last_state else 0), 1)
        # torch's default (uniform) init unless told: measured better here than a normal init
        # of the last-token head's scale (0.72 vs 0.68 pairwise accuracy, 3 seeds)
        if init_std is not None:
            torch.nn.init.normal_(self.linear.weight, std=init_std)
            torch.nn.init.zeros_(self.linear.bias)
        self.register_buffer("token_mean", torch.zeros(token_size))
        self.register_buffer("token_std", torch.ones(token_size))
        if last_state:
            self.register_buffer("last_mean", torch.zeros(hidden_size))
            self.register_buffer("last_std", torch.ones(hidden_size))

    def fit_normalizer(self, token_states: torch.Tensor, last_states: torch.Tensor) -> None:
        """Fix the standardisation from training data. Shape: token_states (N, token_size)
        response tokens, last_states (M, H) last tokens' final states (not read without
        ``last_state``)."""
        with torch.no_grad():
            self.token_mean.copy_(token_states.mean(0))
            self.token_std.copy_(token_states.std(0) + 1e-4)
            if self.reads_final:
                self.last_mean.copy_(last_states.mean(0))
                self.last_std.copy_(last_states.std(0) + 1e-4)

    def forward(self, tokens: torch.Tensor, last: torch.Tensor, response_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Shape: tokens (B, T, token_size), last (B, H) (not read without ``last_state``),
        response_mask (B, T) -> (B,)."""
        mask = self._response(response_mask, tokens)  # (B, T, 1)
        p = self.proj((tokens - self.token_mean) / self.token_std)  # (B, T, F)
        count = mask.sum(dim=1)  # (B, 1)
        pooled_max = p.masked_fill(mask == 0, _NO_TOKEN).max(dim=1).values  # (B, F)
        pooled_max = torch.where(count > 0, pooled_max, torch.zeros_like(pooled_max))
        pooled_mean = (p * mask).sum(dim=1) / count.clamp_min(1.0)  # (B, F)
        pooled_sum = torch.log1p(torch.relu(p * mask).sum(dim=1))  # (B, F)
        return self._score([pooled_max, pooled_mean, pooled_sum], last)

    def per_token(self, tokens: torch.Tensor, final: torch.Tensor, response_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """The score as if the response ended at each position t: the pools over the response
        tokens up to t, final[:, t] as the last state. Shape: tokens (B, T, token_size), final
        (B, T, H), (B, T) -> (B, T)."""
        mask = self._response(response_mask, tokens)  # (B, T, 1)
        p = self.proj((tokens - self.token_mean) / self.token_std)  # (B, T, F)
        count = torch.cumsum(mask, dim=1)  # (B, T, 1) response tokens up to t
        pooled_max = torch.cummax(p.masked_fill(mask == 0, _NO_TOKEN), dim=1).values
        pooled_max = torch.where(count > 0, pooled_max, torch.zeros_like(pooled_max))
        pooled_mean = torch.cumsum(p * mask, dim=1) / count.clamp_min(1.0)
        pooled_sum = torch.log1p(torch.cumsum(torch.relu(p * mask), dim=1))
        return self._score([pooled_max, pooled_mean, pooled_sum], final)

    def _score(self, pools: list[torch.Tensor], last: torch.Tensor) -> torch.Tensor:
        """The linear map of the pools and, with ``last_state``, the standardised last state.
        Shape: pools (..., F) each, last (..., H) -> (...)."""
        if self.reads_final:
            pools = [*pools, (last - self.last_mean) / self.last_std]
        return self.linear(torch.cat(pools, dim=-1)).squeeze(-1)

    @staticmethod
    def _response(response_mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        if response_mask is None:
            raise ValueError("the pooled reward head reads the response tokens: pass response_mask")
        return response_mask.to(tokens.dtype).unsqueeze(-1)


class HeadEnsemble(torch.nn.Module):
    """The mean of ``members`` heads of one kind, each initialised and trained on its own
    (``member_scores`` gives each one's scores for its own loss). A head on few thousand noisy
    pairs lands in rather different places from different inits (pairwise accuracy 0.71 to
    0.73 over 5 seeds at 4,000 pairs); their mean is steadier and better (0.74)."""

    def __init__(self, members: list[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.kind: HeadKind = members[0].kind
        self.reads_tokens = members[0].reads_tokens
        self.reads_final = members[0].reads_final

    def member_scores(self, tokens: torch.Tensor | None, last: torch.Tensor, response_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Each member's scores. Shape: -> (M, B)."""
        return torch.stack([m(tokens, last, response_mask) for m in self.members])

    def forward(self, tokens: torch.Tensor | None, last: torch.Tensor, response_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The members' mean. Shape: -> (B,)."""
        return self.member_scores(tokens, last, response_mask).mean(dim=0)

    def per_token(self, tokens: torch.Tensor | None, final: torch.Tensor, response_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """The members' mean at every position. Shape: -> (B, T)."""
        return torch.stack([m.per_token(tokens, final, response_mask) for m in self.members]).mean(dim=0)

    def fit_normalizer(self, token_states: torch.Tensor, last_states: torch.Tensor) -> None:
        for member in self.members:
            member.fit_normalizer(token_states, last_states)


def build_head(kind: str, hidden_size: int, *, features: int = 16, init_std: float | None = None,
               ensemble: int = 1, token_size: int | None = None, last_state: bool = True) -> torch.nn.Module:
    """A fresh head of ``kind`` for final states of ``hidden_size`` and pooled token states of
    ``token_size`` (default: ``hidden_size``; the pooled head only, which reads the last final
    state only with ``last_state``), the mean of ``ensemble`` of them when > 1."""
    if ensemble > 1:
        return HeadEnsemble([build_head(kind, hidden_size, features=features, init_std=init_std,
                                        token_size=token_size, last_state=last_state) for _ in range(ensemble)])
    if kind == "last_token":
        return LastTokenHead(hidden_size, init_std)
    if kind == "pooled":
        return PooledHead(hidden_size, features, init_std, token_size, last_state)
    raise ValueError(f"Unknown reward head: {kind}")


def member_count(head: torch.nn.Module) -> int:
    return len(head.members) if isinstance(head, HeadEnsemble) else 1
