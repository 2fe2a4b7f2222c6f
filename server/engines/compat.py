"""Can a checkpoint replace the served one in place? Checked from files alone.

A hot swap loads new weights into the SAME model object (vLLM reloads in place; the HF
engine keeps the tokenizer), so the new checkpoint must have the serving one's
architecture: same config dims and the same tensor names and shapes. Both are read
without loading any weights (config.json and the safetensors headers), so a bad
checkpoint is refused before the engine is touched. Imports the standard library only.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from server.engines.base import EngineError

# config.json keys that fix the model's shapes or the math of its forward pass. An
# in-place reload copies weights only, so a change to any of these would be ignored
# (rope settings) or break the load (dims).
ARCHITECTURE_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rms_norm_eps",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
)

_HEADER_LEN_BYTES = 8  # a safetensors file starts with the header length, u64 little-endian
_MAX_HEADER_BYTES = 100 * 2**20


def read_config(checkpoint_dir: Path) -> dict:
    """The checkpoint's config.json as a dict; EngineError if absent or unreadable."""
    path = Path(checkpoint_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot read {path}: {e}") from e


def safetensors_files(checkpoint_dir: Path) -> list[Path]:
    """The checkpoint's weight files, sorted; EngineError if there are none."""
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise EngineError(f"{checkpoint_dir} holds no *.safetensors weights")
    return files


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from one file's header; checks the file is complete.

    Hand-written rather than `safetensors.safe_open(path, "pt")` (whose `keys()` and
    `get_slice(name).get_shape()/get_dtype()` give the same names, shapes and dtypes for a
    complete file), because safe_open cannot tell a truncated file from others it refuses:
    it answers "incomplete metadata, file not fully covered" both for a file cut short and
    for one with bytes after its data (safetensors 0.8.0), without the byte counts. The swap
    refusal names the truncated file and what it is missing (tests/test_engines.py checks
    "truncated"), and a file with trailing bytes keeps passing this check, as before."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(_HEADER_LEN_BYTES))
            if header_len > _MAX_HEADER_BYTES:
                raise ValueError(f"header length {header_len} is implausible")
            header = json.loads(f.read(header_len))
        data_bytes = path.stat().st_size - _HEADER_LEN_BYTES - header_len
    except (OSError, ValueError, struct.error) as e:
        raise EngineError(f"{path.name}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    needed = max((info["data_offsets"][1] for info in header.values()), default=0)
    if data_bytes < needed:
        raise EngineError(
            f"{path.name} is truncated: its header needs {needed} data bytes, it has {data_bytes}"
        )
    return {name: (info["dtype"], tuple(info["shape"])) for name, info in header.items()}


def read_tensor_shapes(checkpoint_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over all of the checkpoint's safetensors files."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in safetensors_files(checkpoint_dir):
        for name, (_, shape) in read_safetensors_header(path).items():
            shapes[name] = shape
    return shapes


def config_differences(serving: dict, candidate: dict) -> list[str]:
    """Human-readable `key: serving -> candidate` lines for the architecture keys that differ.

    A key absent from either file is skipped: writers differ in which defaults they
    spell out, and the tensor shapes catch what matters."""
    return [
        f"{key}: {serving[key]!r} -> {candidate[key]!r}"
        for key in ARCHITECTURE_KEYS
        if key in serving and key in candidate and serving[key] != candidate[key]
    ]


def shape_differences(
    serving: dict[str, tuple[int, ...]], candidate: dict[str, tuple[int, ...]]
) -> list[str]:
    """Lines naming the tensors missing, extra or reshaped in `candidate`."""
    lines = [f"missing tensor {name}" for name in sorted(serving.keys() - candidate.keys())]
    lines += [f"unexpected tensor {name}" for name in sorted(candidate.keys() - serving.keys())]
    lines += [
        f"{name}: shape {list(serving[name])} -> {list(candidate[name])}"
        for name in sorted(serving.keys() & candidate.keys())
        if serving[name] != candidate[name]
    ]
    return lines


def check_swap_compatible(serving_dir: Path, candidate_dir: Path) -> None:
    """Raise EngineError, saying why, unless `candidate_dir` can be loaded in place of
    `serving_dir` (same architecture, tensor names and shapes, complete files)."""
    problems = config_differences(read_config(serving_dir), read_config(candidate_dir))
    problems += shape_differences(read_tensor_shapes(serving_dir), read_tensor_shapes(candidate_dir))
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise EngineError(
            f"checkpoint {candidate_dir} cannot replace {serving_dir} in place "
            f"(a swap needs the same architecture): {shown}"
        )
