"""trainer.rollout: EOS handling, left padding, seeding, and HF generation on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.chat import render_chat_ids
from common.models import load_causal_lm, load_tokenizer
from trainer.examples import PromptExample, user_turn
from trainer.rollout import HFRolloutGenerator, RolloutGenerator, Rollouts, cut_at_eos, left_pad

EOS = 2
PROMPTS = [PromptExample("a", user_turn("Hi.")), PromptExample("b", user_turn("Tell me a long story about rivers."))]


def test_cut_at_eos_keeps_the_first_eos_and_drops_the_rest():
    assert cut_at_eos([5, 6, EOS, EOS, EOS], EOS) == [5, 6, EOS]  # pad = EOS after the stop
    assert cut_at_eos([EOS, 7], EOS) == [EOS]
    assert cut_at_eos([5, 6, 7], EOS) == [5, 6, 7]  # cut at max_new_tokens: no EOS


def test_left_pad_right_aligns_rows():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


class ScriptedLM(torch.nn.Module):
    """Stands in for a causal LM: ``generate`` appends fixed continuations (pad = EOS after a stop)."""

    def __init__(self, continuations: list[list[int]]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations
        self.seen: dict = {}

    def generate(self, input_ids, attention_mask, generation_config):
        self.seen = {"input_ids": input_ids, "attention_mask": attention_mask, "config": generation_config,
                     "training": self.training}
        width = max(len(c) for c in self.continuations)
        new = torch.tensor([c + [EOS] * (width - len(c)) for c in self.continuations])
        return torch.cat([input_ids, new], dim=1)


class FakeTokenizer:
    eos_token_id = EOS
    pad_token_id = EOS

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return [100 + len(m["content"]) for m in messages] + [99]  # one id per turn + a header

    def batch_decode(self, rows, skip_special_tokens):
        return [" ".join(str(t) for t in row if not (skip_special_tokens and t == EOS)) for row in rows]


def test_hf_generator_cuts_responses_and_flags_stops():
    model = ScriptedLM([[7, 8, EOS], [9, 10, 11, 12]]).train()
    rollouts = HFRolloutGenerator(model, FakeTokenizer()).generate(PROMPTS, max_new_tokens=4, temperature=0.7,
                                                                  top_p=0.9)
    assert rollouts.response_ids == [[7, 8, EOS], [9, 10, 11, 12]]
    assert rollouts.stopped == [True, False]
    assert rollouts.texts == ["7 8", "9 10 11 12"]
    assert rollouts.prompt_ids == [[103, 99], [134, 99]]
    # Left padding; sampling settings passed explicitly (no checkpoint defaults such as top_k).
    assert model.seen["attention_mask"].tolist() == [[1, 1], [1, 1]]
    config = model.seen["config"]
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 0.7, 0.9, 0)
    assert model.seen["training"] is False and model.training  # eval while generating, mode restored


def test_generator_is_the_interface():
    assert issubclass(HFRolloutGenerator, RolloutGenerator)
    with pytest.raises(TypeError):
        RolloutGenerator()  # abstract


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_causal_lm(tiny_model_dir, dtype=torch.float32, device="cpu"), load_tokenizer(tiny_model_dir)


def test_tiny_rollouts_are_seeded_and_leave_the_global_rng_alone(tiny):
    generator = HFRolloutGenerator(*tiny)
    state = torch.random.get_rng_state()
    a = generator.generate(PROMPTS, max_new_tokens=5, seed=3)
    b = generator.generate(PROMPTS, max_new_tokens=5, seed=3)
    c = generator.generate(PROMPTS, max_new_tokens=5, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.response_ids == b.response_ids != c.response_ids
    assert all(1 <= len(r) <= 5 for r in a.response_ids)
    assert a.prompt_ids == [render_chat_ids(tiny[1], p.messages) for p in PROMPTS]
    assert len(a) == 2 and a.prompts == PROMPTS


def test_tiny_greedy_batched_equals_one_at_a_time(tiny):
    """Left padding must not change what a row generates."""
    generator = HFRolloutGenerator(*tiny)
    batched = generator.generate(PROMPTS, max_new_tokens=6, temperature=0.0).response_ids
    alone = [generator.generate([p], max_new_tokens=6, temperature=0.0).response_ids[0] for p in PROMPTS]
    assert batched == alone


def test_tiny_prompts_are_cut_from_the_left(tiny):
    generator = HFRolloutGenerator(*tiny, batch_size=1)
    full = render_chat_ids(tiny[1], PROMPTS[1].messages)
    rollouts: Rollouts = generator.generate(PROMPTS, max_new_tokens=2, temperature=0.0, max_prompt_tokens=8)
    assert rollouts.prompt_ids[1] == full[-8:]
