"""common/chat.py: the server (what the policy is asked) and the trainer (what it is trained
and scored on) render a chat to the SAME token ids, on the tiny test model's tokenizer and
on the embedded SmolLM2 tokenizer when it is on disk."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from common import paths
from common.chat import render_chat_ids
from common.models import load_tokenizer
from server.engines.hf import HFEngine

CHATS = {
    "one user turn": [{"role": "user", "content": "Name three birds."}],
    "system and several turns": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And in French?"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "Now in German, please."},
    ],
}


def smollm2_dir() -> Path:
    path = paths.models_dir() / "SmolLM2-135M-Instruct"
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"the embedded SmolLM2 tokenizer is not extracted at {path}")
    return path


@pytest.fixture(params=["tiny", "smollm2"])
def model_dir(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Path:
    return tiny_model_dir if request.param == "tiny" else smollm2_dir()


def served_ids(model_dir: Path, chat: list[dict[str, str]]) -> list[int]:
    """The ids the HF engine would generate from (its own tokenizer, left padding)."""

    async def render() -> list[int]:
        engine = HFEngine(model_dir, 0)
        await engine.start()
        try:
            return engine.render_chat(chat)
        finally:
            await engine.shutdown()

    return asyncio.run(render())


@pytest.mark.parametrize("name", CHATS)
def test_trainer_prompt_ids_equal_the_servers(model_dir: Path, name: str) -> None:
    chat = CHATS[name]
    trainer_tokenizer = load_tokenizer(model_dir, padding_side="right")  # as trainer/sft.py, ppo.py load it
    prompt_ids = render_chat_ids(trainer_tokenizer, tuple(chat))
    assert prompt_ids == served_ids(model_dir, chat)
    # The template's text, tokenised without special tokens of its own: no second BOS, no
    # token merged across a turn boundary.
    text = trainer_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt_ids == trainer_tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = trainer_tokenizer.decode(prompt_ids)
    assert decoded.endswith("<|im_start|>assistant\n")
    assert all(m["content"] in decoded for m in chat)
