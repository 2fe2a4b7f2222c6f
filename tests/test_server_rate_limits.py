"""Per-key request rate and token budget over a real socket (tiny model, HF engine): a
flood from one key is answered RESOURCE_EXHAUSTED with a retry hint (message and
`retry-after-ms` trailing metadata) while another key is served; a generation's unused
reservation comes back; labeling samples count against the labeler's key. The bucket
math itself is tested on hand-worked values in test_server_limits.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from clients.client import RlhfClient
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc
from server.config import RequestLimits
from server_harness import ServerThread, create_key, server_config
from test_feedback_harness import bearer, seed_prompt, user_in_split

Code = grpc.StatusCode
# 16 x 2 = 32 tokens per request at most, 8 x 9 = 72 per labeling task: the burst holds both.
LIMITS = RequestLimits(max_new_tokens_limit=16, default_max_new_tokens=8, max_n=2)
TOKEN_BURST = 72


def retry_after_ms(error: grpc.RpcError) -> int:
    return int(dict(error.trailing_metadata() or ())["retry-after-ms"])  # type: ignore[attr-defined]


# ---------------------------------------------------------------- request rate


@pytest.fixture(scope="module")
def rate_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[ServerThread, str, str]]:
    # 1 request per 10 s after a burst of 5: the flood outruns it in any test run.
    config = server_config(tmp_path_factory.mktemp("rate"), tiny_model_dir, requests_per_second=0.1, request_burst=5)
    flood_key, _ = create_key(config.store_path, "user", "flooder")
    other_key, _ = create_key(config.store_path, "user", "neighbour")
    with ServerThread(config) as server:
        yield server, flood_key, other_key


def test_a_flood_from_one_key_is_refused_with_a_retry_hint_and_another_key_is_served(rate_server) -> None:  # noqa: ANN001
    server, flood_key, other_key = rate_server
    refused: list[grpc.RpcError] = []
    with RlhfClient(server.target, flood_key) as flooder:
        for _ in range(12):
            try:
                flooder.get_model()
            except grpc.RpcError as error:
                refused.append(error)
    assert len(refused) == 12 - 5  # the burst of 5 passed (10 s per new request: none refilled)
    error = refused[0]
    assert error.code() == Code.RESOURCE_EXHAUSTED
    assert "request rate limit: this API key may start 0.1 requests per second (burst 5); retry in" in error.details()
    assert 0 < retry_after_ms(error) <= 10_000  # 1 request at 0.1/s
    with RlhfClient(server.target, other_key) as neighbour:
        assert neighbour.generate("hi", max_new_tokens=2).completions[0].completion_tokens == 2


# ---------------------------------------------------------------- token budget


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerThread]:
    # 1 token per minute: nothing refills within a test.
    config = server_config(tmp_path_factory.mktemp("tokens"), tiny_model_dir, limits=LIMITS, tokens_per_minute=1,
                           token_burst=TOKEN_BURST, label_max_new_tokens=8)  # fmt: skip
    with ServerThread(config) as server:
        yield server


def _level(server: ServerThread, key_id: str) -> float:
    async def level() -> float:
        return server.running.deps.budget.tokens.level(f"key:{key_id}")  # type: ignore[union-attr]

    return server.call(level)


def test_the_unused_part_of_a_reservation_is_refunded(token_server: ServerThread) -> None:
    key, key_id = create_key(token_server.config.store_path, "user", "refunded")
    with RlhfClient(token_server.target, key) as client:
        reply = client.generate("hi", max_new_tokens=16, n=2)  # 32 reserved
    used = sum(c.completion_tokens for c in reply.completions)
    # 72 - 32 + (32 - used) = 72 - used, plus at most a few seconds at 1/60 token per second.
    assert _level(token_server, key_id) == pytest.approx(TOKEN_BURST - used, abs=0.5)


def test_a_token_flood_is_refused_with_a_retry_hint_and_another_key_is_served(token_server: ServerThread) -> None:
    flood_key, _ = create_key(token_server.config.store_path, "user", "token-flooder")
    other_key, _ = create_key(token_server.config.store_path, "user", "token-neighbour")
    with RlhfClient(token_server.target, flood_key) as flooder:
        with pytest.raises(grpc.RpcError) as caught:
            for _ in range(TOKEN_BURST):  # each generates >= 1 token; 32 must stay reservable
                flooder.generate("hi", max_new_tokens=16, n=2)
    error = caught.value
    assert error.code() == Code.RESOURCE_EXHAUSTED
    assert "token budget: this API key may generate 1 tokens per minute (burst 72); this request reserves 32" in error.details()
    assert "retry in" in error.details() and retry_after_ms(error) > 1000  # tokens missing at 1/60 per second
    with RlhfClient(token_server.target, other_key) as neighbour:
        assert neighbour.generate("hi", max_new_tokens=16, n=2).completions


def test_labeling_samples_count_against_the_labelers_key(token_server: ServerThread) -> None:
    store_path = token_server.config.store_path
    labeler, labeler_id = create_key(store_path, "labeler", user_in_split("train", "token-labeler"), "train")
    for i in range(2):
        seed_prompt(token_server.store, 0, text=f"Tell me about token budget {i}.")  # type: ignore[arg-type]
    with grpc.insecure_channel(token_server.target) as channel:
        feedback = feedback_pb2_grpc.FeedbackStub(channel)

        def lease(k: int) -> feedback_pb2.ComparisonTask:
            request = feedback_pb2.NextComparisonRequest(k=k, request_id=uuid.uuid4().hex)
            return feedback.NextComparison(request, metadata=bearer(labeler), timeout=120)

        task = lease(4)  # 4 x 8 = 32 reserved
        used = sum(c.completion_tokens for c in task.completions)
        assert used > 0 and _level(token_server, labeler_id) == pytest.approx(TOKEN_BURST - used, abs=0.5)
        with pytest.raises(grpc.RpcError) as caught:
            lease(9)  # 9 x 8 = 72, the whole burst: no longer there
    assert caught.value.code() == Code.RESOURCE_EXHAUSTED and "this request reserves 72" in caught.value.details()
    assert retry_after_ms(caught.value) > 0
