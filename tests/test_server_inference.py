"""Inference over a real socket with the HF engine on the tiny model: greedy output equals
transformers' own, streams join into the unary answer, cancellation and deadlines free
the engine, every answered sample is in the store, idempotent retries, and the table of
bad inputs (each row: request + metadata -> status code + message)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients.client import RlhfClient, generate_request
from common.store import Store, revoke_key
from rlhf.v1 import admin_pb2, common_pb2, inference_pb2
from server.config import RequestLimits
from server_harness import (
    ServerThread,
    completions_in_store,
    corrupt_weights,
    create_key,
    greedy_reference,
    join_stream,
    publish,
    server_config,
)

# Chat prompts whose greedy steps on the tiny model all lead by a logit margin >= 0.003
# (see tests/server_harness.py): far above the ~1e-5 that batch shapes move a logit.
PROMPTS = ["The quick brown fox", "How do bees make honey?", "Tell me a story."]
MAX_NEW = 16
MAX_PROMPT_TOKENS = 64
MAX_RECEIVE = 64 * 1024
PER_KEY = 2


@dataclass
class Env:
    server: ServerThread
    store_path: Path
    keys: dict[str, str] = field(default_factory=dict)
    reference: dict[str, str] = field(default_factory=dict)

    def client(self, who: str = "user") -> RlhfClient:
        return RlhfClient(self.server.target, self.keys[who])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("inference")
    config = server_config(tmp, tiny_model_dir, max_receive_message_bytes=MAX_RECEIVE,
                           max_concurrent_per_key=PER_KEY,
                           limits=RequestLimits(max_prompt_tokens=MAX_PROMPT_TOKENS))
    keys = {who: create_key(config.store_path, role, f"{who}-id")[0]
            for who, role in [("user", "user"), ("admin", "admin"), ("labeler", "labeler")]}
    revoked, revoked_id = create_key(config.store_path, "user", "revoked-id")
    with Store(config.store_path) as store:
        store.write_sync(revoke_key(revoked_id))
    keys["revoked"] = revoked
    with ServerThread(config) as server:
        # v1 is published corrupt: the table's swap must be refused and v0 keep serving.
        corrupt_weights(publish(config.checkpoints_root, config.store_path, 1, tiny_model_dir))
        yield Env(server, config.store_path, keys, greedy_reference(tiny_model_dir, PROMPTS, MAX_NEW))


def test_greedy_output_equals_transformers_greedy(env: Env) -> None:
    with env.client() as client:
        for prompt in PROMPTS:
            reply = client.generate(prompt, temperature=0, max_new_tokens=MAX_NEW, n=2)
            assert [c.index for c in reply.completions] == [0, 1]
            # Greedy samples are identical, and equal to transformers' generate(do_sample=False).
            assert [c.text for c in reply.completions] == [env.reference[prompt]] * 2
            assert {c.policy_version for c in reply.completions} == {reply.policy_version} == {0}


def test_stream_chunks_join_into_the_unary_result(env: Env) -> None:
    with env.client() as client:
        unary = client.generate(PROMPTS[1], temperature=0, max_new_tokens=MAX_NEW)
        events = list(client.generate_stream(PROMPTS[1], temperature=0, max_new_tokens=MAX_NEW))
    joined = join_stream(events)
    (text, final), = joined.values()
    assert len(events) > 2  # streamed, not sent at once
    assert text == final.text == unary.completions[0].text == env.reference[PROMPTS[1]]
    assert final.finish_reason == unary.completions[0].finish_reason
    assert final.completion_tokens == unary.completions[0].completion_tokens
    assert {e.prompt_id for e in events} == {events[0].prompt_id} and events[0].policy_version == 0


def test_stream_of_n_samples_sends_each_final_event_once(env: Env) -> None:
    with env.client() as client:
        events = list(client.generate_stream(PROMPTS[0], n=3, temperature=1.0, seed=7, max_new_tokens=8))
    joined = join_stream(events)
    assert sorted(joined) == [0, 1, 2]
    for text, final in joined.values():
        assert final is not None and final.text == text


def test_cancelled_stream_frees_its_slot(env: Env) -> None:
    with env.client() as client:
        stream = client.generate_stream(PROMPTS[0], temperature=0, max_new_tokens=500)
        first = next(stream)
        stream.close()  # cancels the call
        _wait_until(lambda: env.server.running_generations() == 0)
        # Both of this key's slots are free again.
        with contextlib.ExitStack() as stack:
            streams = [stack.enter_context(contextlib.closing(
                client.generate_stream(PROMPTS[0], temperature=0, max_new_tokens=4))) for _ in range(PER_KEY)]
            assert all(join_stream(list(s))[0][1] is not None for s in streams)
    # What it produced is logged as aborted (by a background write: poll for it).
    _wait_until(lambda: len(_rows_where(env.store_path, "c.prompt_id = ?", [first.prompt_id])) == 1)
    (row,) = _rows_where(env.store_path, "c.prompt_id = ?", [first.prompt_id])
    assert row["finish_reason"] == "abort" and 0 < row["completion_tokens"] < 500


def test_deadline_aborts_the_generation_in_the_engine(env: Env) -> None:
    with env.client() as client, pytest.raises(grpc.RpcError) as caught:
        client.generate(PROMPTS[0], temperature=0, max_new_tokens=500, timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_until(lambda: env.server.running_generations() == 0)
    with env.client() as client:
        assert client.generate(PROMPTS[0], temperature=0, max_new_tokens=MAX_NEW).completions[0].text == \
            env.reference[PROMPTS[0]]


def test_answered_request_is_in_the_store(env: Env) -> None:
    with env.client() as client:
        reply = client.generate(PROMPTS[2], n=2, temperature=0.8, top_p=0.9, seed=3, max_new_tokens=6,
                                stop=["\n\n"])
    # A separate connection: the rows committed before the answer was sent.
    rows = sorted(completions_in_store(env.store_path, [reply.prompt_id]), key=lambda r: r["idx"])
    assert [r["id"] for r in rows] == [c.completion_id for c in reply.completions]
    for row, completion in zip(rows, reply.completions):
        assert row["user_id"] == "user-id" and row["prompt_text"] == PROMPTS[2]
        assert row["policy_version"] == 0 and row["purpose"] == "serve"
        assert row["text"] == completion.text
        assert row["completion_tokens"] == completion.completion_tokens > 0
        assert row["prompt_tokens"] == completion.prompt_tokens > 0
        assert row["finish_reason"] in ("stop", "length")
        assert row["latency_s"] >= row["ttft_s"] > 0
        sampling = json.loads(row["sampling_json"])
        assert sampling == {"n": 2, "max_new_tokens": 6, "temperature": pytest.approx(0.8),
                            "top_p": pytest.approx(0.9), "seed": 3, "stop": ["\n\n"]}


def test_chat_messages_are_templated_and_logged(env: Env) -> None:
    messages = [("system", "You are terse."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")]
    with env.client() as client:
        reply = client.generate(messages=messages, temperature=0, max_new_tokens=4)
    conn = sqlite3.connect(f"file:{env.store_path}?mode=ro", uri=True)
    text, messages_json = conn.execute("SELECT text, messages_json FROM prompts WHERE id = ?",
                                       [reply.prompt_id]).fetchone()
    conn.close()
    assert text == "Bye" and '"You are terse."' in messages_json


def test_request_id_makes_generate_idempotent(env: Env) -> None:
    with env.client() as client:
        first = client.generate(PROMPTS[0], n=2, seed=1, max_new_tokens=6, request_id="retry-1")
        again = client.generate(PROMPTS[0], n=2, seed=1, max_new_tokens=6, request_id="retry-1")
        streamed = list(client.generate_stream(PROMPTS[0], n=2, seed=1, max_new_tokens=6, request_id="retry-1"))
        with pytest.raises(grpc.RpcError) as caught:
            client.generate("another prompt", request_id="retry-1")
    assert again == first
    assert {i: c.completion_id for i, (_, c) in join_stream(streamed).items()} == \
        {c.index: c.completion_id for c in first.completions}
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(completions_in_store(env.store_path, [first.prompt_id])) == 2  # sampled once


def test_get_model(env: Env) -> None:
    with env.client() as client:
        info = client.get_model()
    assert (info.policy_version, info.engine, info.model_name) == (0, "hf", "tiny-llama")
    assert (info.max_prompt_tokens, info.max_new_tokens_limit, info.max_n) == (MAX_PROMPT_TOKENS, 512, 9)
    assert info.serving_since.seconds > 0


# ---------------------------------------------------------------- the table of bad inputs


@dataclass(frozen=True)
class BadInput:
    name: str
    request: Any  # a GenerateRequest or SwapPolicyRequest
    key: str | None  # who calls (None: no authorization metadata)
    code: grpc.StatusCode
    message: str  # a substring of the status details
    metadata: tuple[tuple[str, str], ...] = ()
    hold_slots: bool = False  # first fill this key's concurrency slots with running streams


def _gen(prompt: str = "hi", **sampling: Any) -> inference_pb2.GenerateRequest:
    return generate_request(prompt, **sampling)


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_INPUTS = [
    BadInput("empty prompt", _gen(""), "user", INVALID, "prompt is empty"),
    BadInput("blank chat", generate_request(messages=[("user", "  ")]), "user", INVALID, "no non-empty user turn"),
    BadInput("prompt too long", _gen("word " * 200), "user", INVALID, f"at most {MAX_PROMPT_TOKENS} allowed"),
    # proto3: n = 0 means 1 (the contract), so the rejected values are above max_n = 9.
    BadInput("n = 10", _gen(n=10), "user", INVALID, "n must be in 1..9"),
    BadInput("n = 100", _gen(n=100), "user", INVALID, "n must be in 1..9"),
    BadInput("max_new_tokens too large", _gen(max_new_tokens=513), "user", INVALID, "max_new_tokens must be in 1..512"),
    BadInput("temperature < 0", _gen(temperature=-0.5), "user", INVALID, "temperature must be in [0, 2]"),
    BadInput("temperature > 2", _gen(temperature=2.5), "user", INVALID, "temperature must be in [0, 2]"),
    BadInput("top_p = 0", _gen(top_p=0.0), "user", INVALID, "top_p must be in (0, 1]"),
    BadInput("top_p > 1", _gen(top_p=1.5), "user", INVALID, "top_p must be in (0, 1]"),
    BadInput("9 stop strings", _gen(stop=[str(i) for i in range(9)]), "user", INVALID, "too many stop strings"),
    BadInput("long request_id", generate_request("hi", request_id="x" * 129), "user", INVALID, "request_id"),
    BadInput("unknown policy version", admin_pb2.SwapPolicyRequest(version=99), "admin",
             grpc.StatusCode.NOT_FOUND, "policy v99 not found"),
    BadInput("swap to a corrupt checkpoint", admin_pb2.SwapPolicyRequest(version=1), "admin",
             grpc.StatusCode.FAILED_PRECONDITION, "model.safetensors: sha256 mismatch"),
    BadInput("missing key", _gen(), None, grpc.StatusCode.UNAUTHENTICATED, "missing API key"),
    BadInput("invalid key", _gen(), "rlhf_not-a-key", grpc.StatusCode.UNAUTHENTICATED, "invalid API key"),
    BadInput("malformed authorization", _gen(), None, grpc.StatusCode.UNAUTHENTICATED, "Bearer",
             metadata=(("authorization", "Basic abc"),)),
    BadInput("revoked key", _gen(), "revoked", grpc.StatusCode.UNAUTHENTICATED, "API key revoked"),
    BadInput("user key on Admin", admin_pb2.SwapPolicyRequest(version=0), "user",
             grpc.StatusCode.PERMISSION_DENIED, "needs role 'admin'"),
    BadInput("labeler key on Admin", admin_pb2.SwapPolicyRequest(version=0), "labeler",
             grpc.StatusCode.PERMISSION_DENIED, "needs role 'admin'"),
    BadInput("oversize message", _gen("x" * (MAX_RECEIVE + 1)), "user",
             grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    BadInput("over the per-key concurrency", _gen(max_new_tokens=4), "user",
             grpc.StatusCode.RESOURCE_EXHAUSTED, "too many concurrent requests", hold_slots=True),
]


def _call(env: Env, client: RlhfClient, row: BadInput) -> Any:
    key = env.keys.get(row.key, row.key) if row.key else None
    metadata = ((("authorization", f"Bearer {key}"),) if key else ()) + row.metadata
    if isinstance(row.request, admin_pb2.SwapPolicyRequest):
        return client.admin.SwapPolicy(row.request, metadata=metadata, timeout=60)
    return client.inference.Generate(row.request, metadata=metadata, timeout=60)


@contextlib.contextmanager
def _slots_held(env: Env, n: int) -> Iterator[None]:
    """n long streams of the user's key, admitted by the server (so holding its slots)."""
    metadata = (("authorization", f"Bearer {env.keys['user']}"),)
    with env.client() as client:
        calls = [client.inference.GenerateStream(
            generate_request("Count to a thousand.", temperature=0, max_new_tokens=512), metadata=metadata)
            for _ in range(n)]
        try:
            _wait_until(lambda: env.server.in_flight() == n)
            yield
        finally:
            for call in calls:
                call.cancel()


@pytest.mark.parametrize("row", BAD_INPUTS, ids=[r.name for r in BAD_INPUTS])
def test_bad_input_is_refused_with_its_status(env: Env, row: BadInput) -> None:
    with RlhfClient(env.server.target, api_key="") as client:
        with _slots_held(env, PER_KEY) if row.hold_slots else contextlib.nullcontext():
            with pytest.raises(grpc.RpcError) as caught:
                _call(env, client, row)
    assert caught.value.code() == row.code, caught.value.details()
    assert row.message in caught.value.details()


def test_after_the_table_the_server_still_serves(env: Env) -> None:
    _wait_until(lambda: env.server.running_generations() == 0)
    with env.client() as client:
        reply = client.generate(PROMPTS[0], temperature=0, max_new_tokens=MAX_NEW)
        assert reply.completions[0].text == env.reference[PROMPTS[0]]
        assert reply.policy_version == 0  # the corrupt v1 was refused
    with env.client("admin") as admin:
        with pytest.raises(grpc.RpcError):
            admin.swap_policy(1)  # refused again, as in the table
        assert admin.get_model().policy_version == 0
        statuses = {p.version: p.status for p in admin.list_policies()}
    assert statuses == {0: common_pb2.POLICY_STATUS_SERVING, 1: common_pb2.POLICY_STATUS_REJECTED}


# ---------------------------------------------------------------- helpers


def _rows_where(store_path: Path, where: str, params: list[Any]) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT c.* FROM completions c WHERE {where}", params)]
    finally:
        conn.close()


def _wait_until(condition: Callable[[], bool], attempts: int = 600) -> None:
    """Poll `condition` (every 50 ms, up to 30 s): for state that settles asynchronously."""
    import time

    for _ in range(attempts):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition never became true")
