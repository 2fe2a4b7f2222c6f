"""PII at ingest, through the real gRPC server (HF engine, tiny model): a chat whose
EARLIER turn holds a phone number, an email and a card number is flagged as it is logged
and never reaches a labeling task, PPO's prompts or an export's training data; a
completion with PII is flagged and shown to labelers (and trained on) redacted only; in
"redact" mode no original text reaches the disk."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from server_harness import ServerThread, create_key, server_config
from store_reads import completions_of
from test_feedback_harness import bearer, user_in_split

from clients.client import RlhfClient
from common.exchange import export_records
from common.store import NewCompletion, Store, get_prompt
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc
from server.engines.base import Engine, GenerationUpdate, SamplingOptions
from server.engines.hf import HFEngine
from server.logging_sink import CompletionLog, PromptRecord
from server.pii_ingest import PiiIngest
from trainer.hygiene import HygieneConfig, run_hygiene
from trainer.snapshot_data import prompt_records, read_rows, split_cycle_data

PHONE, EMAIL, CARD = "(415) 555-0199", "jo.doe@example.com", "4111 1111 1111 1111"  # card: Luhn sum 30
PII_CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": f"I am Jo: call {PHONE}, mail {EMAIL}, my card is {CARD}."},
    {"role": "assistant", "content": "Noted. What would you like to do?"},
    {"role": "user", "content": "Write me a short poem about autumn."},  # the last turn is clean
]
# What the leaky engine appends to every sample: a model that repeats PII.
LEAK_PHONE, LEAK_EMAIL = "+44 20 7946 0958", "leak@example.org"
LEAK = f" Reach me on {LEAK_PHONE} or {LEAK_EMAIL}."
RAW = (PHONE, EMAIL, CARD, LEAK_PHONE, LEAK_EMAIL)
Code = grpc.StatusCode


class LeakyEngine(HFEngine):
    """The tiny model, with LEAK appended to every sample's last piece of text."""

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       options: SamplingOptions) -> AsyncIterator[GenerationUpdate]:  # fmt: skip
        async with contextlib.aclosing(super().generate(request_id, prompt_token_ids, options)) as updates:
            async for update in updates:
                yield replace(update, text_delta=update.text_delta + LEAK) if update.finished else update


def leaky_engine(checkpoint_dir: Path, version: int) -> Engine:
    return LeakyEngine(checkpoint_dir, version)


@dataclass
class Env:
    server: ServerThread
    user_key: str
    labeler_key: str

    @property
    def store(self) -> Store:
        assert self.server.store is not None
        return self.server.store

    def generate(self, prompt: str | None = None, **kwargs) -> str:
        with RlhfClient(self.server.target, self.user_key) as client:
            return client.generate(prompt, max_new_tokens=4, temperature=1.0, timeout=120, **kwargs).prompt_id

    @contextlib.contextmanager
    def feedback(self) -> Iterator[feedback_pb2_grpc.FeedbackStub]:
        with grpc.insecure_channel(self.server.target) as channel:
            yield feedback_pb2_grpc.FeedbackStub(channel)

    def next_task(self, k: int = 4) -> feedback_pb2.ComparisonTask:
        with self.feedback() as feedback:
            request = feedback_pb2.NextComparisonRequest(k=k, request_id=uuid.uuid4().hex)
            return feedback.NextComparison(request, metadata=bearer(self.labeler_key), timeout=120)

    def rank(self, *, task_id: str = "", prompt_id: str = "", completion_ids: list[str]) -> None:
        groups = [feedback_pb2.RankGroup(completion_ids=[cid]) for cid in completion_ids]
        request = feedback_pb2.SubmitRankingRequest(request_id=uuid.uuid4().hex, task_id=task_id,
                                                    prompt_id=prompt_id, ranking=groups)  # fmt: skip
        with self.feedback() as feedback:
            feedback.SubmitRanking(request, metadata=bearer(self.labeler_key), timeout=30)


def start(tmp: Path, tiny_model_dir: Path, **overrides) -> Env:
    config = server_config(tmp, tiny_model_dir, **overrides)
    user_key, _ = create_key(config.store_path, "user", user_in_split("train", "pii-user"))
    labeler_key, _ = create_key(config.store_path, "labeler", "pii-labeler", "train")
    return Env(ServerThread(config, engine_factory=leaky_engine).start(), user_key, labeler_key)


@dataclass
class Flagged:
    """What the default ("flag") server went through: a clean prompt, then the PII chat
    (the newest), 4 samples each; a labeler leased a task and ranked it, asked for another
    (`second_lease`: the status), then ranked the PII prompt's samples directly."""

    env: Env
    clean: str
    pii: str
    task: feedback_pb2.ComparisonTask
    second_lease: grpc.StatusCode | None


@pytest.fixture(scope="module")
def flagged(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Flagged]:
    env = start(tmp_path_factory.mktemp("pii-flag"), tiny_model_dir)
    try:
        clean = env.generate("How do bees make honey?", n=4)
        pii = env.generate(messages=PII_CHAT, n=4)
        task = env.next_task()
        env.rank(task_id=task.task_id, completion_ids=[c.completion_id for c in task.completions])
        second: grpc.StatusCode | None = None
        try:
            env.next_task()
        except grpc.RpcError as refused:
            second = refused.code()
        env.rank(prompt_id=pii, completion_ids=[c.id for c in env.store.read_sync(completions_of(pii))])
        yield Flagged(env, clean, pii, task, second)
    finally:
        env.server.stop()


def test_a_chat_with_pii_in_an_earlier_turn_is_flagged_at_ingest(flagged: Flagged) -> None:
    stored = flagged.env.store.read_sync(get_prompt(flagged.pii))
    assert stored is not None and stored.has_pii is True
    assert stored.redacted_text is None  # flag mode: as written, kept from labelers and training
    assert stored.text == PII_CHAT[-1]["content"] and stored.messages == PII_CHAT
    assert flagged.env.store.read_sync(get_prompt(flagged.clean)).has_pii is False  # type: ignore[union-attr]


def test_a_completion_with_pii_is_flagged_with_its_redacted_text(flagged: Flagged) -> None:
    completions = flagged.env.store.read_sync(completions_of(flagged.clean))
    assert len(completions) == 4 + 4  # served, then sampled for the labeling task
    for c in completions:
        assert c.has_pii is True and c.text.endswith(LEAK)  # stored as generated in flag mode
        assert c.redacted_text == c.text[: -len(LEAK)] + " Reach me on [PHONE] or [EMAIL]."


def test_the_pii_prompt_never_reaches_a_labeling_task_and_flagged_completions_are_shown_redacted(
    flagged: Flagged,
) -> None:
    # The PII prompt was the newest and unranked: an unflagged one would have come first.
    assert flagged.task.prompt_id == flagged.clean
    for c in flagged.task.completions:
        assert "[PHONE]" in c.text and "[EMAIL]" in c.text
        assert not any(raw in c.text for raw in RAW)
    assert flagged.second_lease == Code.NOT_FOUND  # the clean prompt is ranked; nothing else waits
    leased = flagged.env.store.read_sync(lambda db: [r["prompt_id"] for r in db.query("SELECT prompt_id FROM comparison_tasks")])
    assert leased == [flagged.clean]


def _cycle_data(env: Env, pii_mode: str = "drop"):
    rows = env.store.read_sync(read_rows)
    kept, _ = run_hygiene(prompt_records(rows.prompts), HygieneConfig(pii_mode=pii_mode))  # type: ignore[arg-type]
    return split_cycle_data(rows, kept, since=0.0, until=time.time() + 60, max_ppo_prompts=100,
                            ppo_sources=["traffic"], eval_splits=["val"], max_eval_prompts=None)  # fmt: skip


def test_ppo_never_gets_the_pii_prompt_and_the_reward_model_trains_on_redacted_completions(flagged: Flagged) -> None:
    env, clean, pii = flagged.env, flagged.clean, flagged.pii
    data = _cycle_data(env)
    assert [p.prompt_id for p in data.ppo_prompts] == [clean]
    # The ranked task's completions, as the reward model reads them: redacted.
    (comparison,) = [c for c in data.comparisons["train"] if c.prompt_id == clean]
    assert all("[PHONE]" in text and not any(raw in text for raw in RAW) for text in comparison.completions)
    # Hygiene's redact mode keeps the prompt, with EVERY turn redacted.
    redacted = {p.prompt_id: p for p in _cycle_data(env, "redact").ppo_prompts}[pii]
    turns = json.dumps(redacted.messages)
    assert "[PHONE]" in turns and "[EMAIL]" in turns and "[CARD]" in turns
    assert not any(raw in turns for raw in RAW)


def test_sft_never_gets_a_demonstration_of_the_pii_prompt(flagged: Flagged) -> None:
    env, clean, pii = flagged.env, flagged.clean, flagged.pii
    with env.feedback() as feedback:
        for prompt_id in (clean, pii):
            feedback.SubmitDemonstration(feedback_pb2.SubmitDemonstrationRequest(
                request_id=uuid.uuid4().hex, prompt_id=prompt_id, response="A calm answer."),
                metadata=bearer(env.labeler_key), timeout=30)
    demonstrations = [d.prompt_id for split in _cycle_data(env).demonstrations.values() for d in split]
    assert demonstrations == [clean]  # both stored; only the clean prompt's reaches SFT
    redacted = {d.prompt_id: d for split in _cycle_data(env, "redact").demonstrations.values() for d in split}
    assert set(redacted) == {clean, pii} and not any(raw in json.dumps(redacted[pii].messages) for raw in RAW)


def test_exports_training_files_leave_out_the_pii_prompt_and_redact_completions(flagged: Flagged) -> None:
    env, clean, pii = flagged.env, flagged.clean, flagged.pii
    pairs = export_records(env.store, "pairs")
    # Only the clean prompt's ranking: K = 4 all strict, C(4, 2) = 6 pairs; the PII one adds none.
    assert len(pairs) == 6 and {p["prompt"] for p in pairs} == {"How do bees make honey?"}
    assert not any(raw in json.dumps(pairs) for raw in RAW)
    redacted = export_records(env.store, "rankings", redact_pii=True)
    assert [line["prompt"]["id"] for line in redacted] == [clean]
    assert not any(raw in json.dumps(redacted) for raw in RAW)
    # The default (lossless backup) export keeps both, flags included, for a restore.
    backup = export_records(env.store, "rankings")
    assert {line["prompt"]["id"] for line in backup} == {clean, pii}
    assert all(c["has_pii"] for line in backup for c in line["completions"])


def test_redact_mode_never_writes_the_original_text(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = start(tmp_path, tiny_model_dir, pii_ingest="redact")
    try:
        with RlhfClient(env.server.target, env.user_key) as client:
            reply = client.generate(messages=PII_CHAT, n=2, max_new_tokens=4, request_id=uuid.uuid4().hex, timeout=120)
        assert all(c.text.endswith(LEAK) for c in reply.completions)  # the caller gets its answer as generated
        stored = env.store.read_sync(get_prompt(reply.prompt_id))
        assert stored is not None and stored.has_pii is True
        assert stored.messages is not None and "[CARD]" in stored.messages[1]["content"]
        task = env.next_task()  # redacted, the prompt may be labeled: shown as its redacted last turn
        assert task.prompt_id == reply.prompt_id and not any(raw in str(task) for raw in RAW)
        with env.feedback() as feedback:
            feedback.SubmitDemonstration(feedback_pb2.SubmitDemonstrationRequest(
                request_id=uuid.uuid4().hex, prompt_text=f"Mail {EMAIL} a thank-you note",
                response=f"Dear Jo, ... call {PHONE}"), metadata=bearer(env.labeler_key), timeout=30)  # fmt: skip
    finally:
        env.server.stop()
    files = sorted(tmp_path.glob("store.sqlite*"))
    assert files and (tmp_path / "store.sqlite").stat().st_size > 0
    for path in files:
        data = path.read_bytes()
        assert not [raw for raw in RAW if raw.encode() in data], path.name
    with Store(tmp_path / "store.sqlite") as store:
        assert store.read_sync(lambda db: db.execute("SELECT COUNT(*) FROM completions WHERE has_pii = 1").fetchone()[0]) == 6


# ---------------------------------------------------------------------------- the policy alone


@pytest.mark.parametrize("role", ["system", "user", "assistant"])
def test_every_turn_is_scanned(role: str) -> None:
    chat = [{"role": role, "content": f"write to {EMAIL}"}, {"role": "user", "content": "Summarise."}]
    assert PiiIngest().prompt("Summarise.", chat).has_pii is True
    assert PiiIngest().prompt("Summarise.", [{"role": role, "content": "hello"}]).has_pii is False
    redacted = PiiIngest("redact").prompt("Summarise.", chat)
    assert redacted.messages == [{"role": role, "content": "write to [EMAIL]"}, {"role": "user", "content": "Summarise."}]
    assert (redacted.text, redacted.redacted_text) == ("Summarise.", "Summarise.")


def test_completion_log_returns_what_was_generated_and_stores_the_redacted_text(tmp_path: Path) -> None:
    import asyncio

    sample = NewCompletion(idx=0, text=f"Call {PHONE}.", policy_version=0, finish_reason="stop",
                           prompt_tokens=3, completion_tokens=5, latency_s=0.1)  # fmt: skip
    prompt = PromptRecord(prompt_id="p1", user_id="u", text=f"my mail is {EMAIL}")

    async def log() -> list:
        with Store(tmp_path / "s.sqlite") as store:
            returned = await CompletionLog(store, PiiIngest("redact")).write_samples(prompt, [sample], with_prompt=True)
            return [returned, store.read_sync(get_prompt("p1")), store.read_sync(completions_of("p1"))]

    returned, stored_prompt, stored = asyncio.run(log())
    assert returned[0].text == f"Call {PHONE}." and returned[0].has_pii is True
    assert stored[0].text == stored[0].redacted_text == "Call [PHONE]."
    assert (stored_prompt.text, stored_prompt.has_pii) == ("my mail is [EMAIL]", True)
    assert stored_prompt.dedup_key == "my mail is [email]"


def test_unknown_ingest_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="Unknown PII ingest mode"):
        PiiIngest("erase")  # type: ignore[arg-type]
