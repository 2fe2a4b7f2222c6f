"""The checkpoint format: atomic publish, verification, listing, cleanup, pruning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from common import checkpoints as ck
from common.checkpoints import CheckpointError

REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = bytes(range(256)) * 64  # 16 KiB of fake weights


def fake_save(folder: Path) -> None:
    """A save_fn that writes a small model-like folder without torch."""
    (folder / "model.safetensors").write_bytes(WEIGHTS)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer.json").write_text("{}")


def publish(root: Path, version: int = 1, **kwargs) -> Path:
    args = {"parent_version": 0, "cycle_id": 7, "base_model": "tiny", "metrics": {"reward": 0.5}}
    return ck.write_checkpoint(root, version, fake_save, **{**args, **kwargs})


# ---------------------------------------------------------------- write and verify

def test_write_then_verify_round_trip(tmp_path: Path) -> None:
    path = publish(tmp_path, 3)
    assert path == tmp_path / "v3"
    manifest = ck.verify_checkpoint(path)
    assert (manifest.format, manifest.version, manifest.parent_version, manifest.cycle_id) == (1, 3, 0, 7)
    assert manifest.base_model == "tiny" and manifest.metrics == {"reward": 0.5}
    assert sorted(manifest.files) == ["config.json", "model.safetensors", "tokenizer/tokenizer.json"]
    assert manifest.files["model.safetensors"].bytes == len(WEIGHTS)
    assert manifest.created_at.endswith("+00:00")
    raw = json.loads((path / "manifest.json").read_text())
    assert raw["files"]["config.json"]["sha256"] == ck.sha256_file(path / "config.json")
    assert not (tmp_path / "v3.tmp").exists()
    assert oct((path / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)


def test_round_trip_with_real_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    import torch

    from common.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(tiny_model_dir, device="cpu")
    tokenizer = load_tokenizer(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # a change the reload must carry
    path = ck.write_checkpoint(
        tmp_path, 1, lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d)),
        parent_version=0, cycle_id=1, base_model="tiny-llama-seed0")
    manifest = ck.verify_checkpoint(path)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(manifest.files)
    reloaded = load_causal_lm(path, device="cpu")
    for (name, want), (_, got) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert load_tokenizer(path).eos_token == "<|im_end|>"


def test_existing_version_is_refused(tmp_path: Path) -> None:
    publish(tmp_path, 1)
    with pytest.raises(CheckpointError, match="v1: already exists"):
        publish(tmp_path, 1)


def test_leftover_tmp_is_replaced(tmp_path: Path) -> None:
    stale = tmp_path / "v2.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    path = publish(tmp_path, 2)
    assert not stale.exists()
    assert ck.verify_checkpoint(path).files["model.safetensors"].bytes == len(WEIGHTS)


def test_bad_metrics_fail_before_writing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        publish(tmp_path, 1, metrics={"x": object()})
    assert list(tmp_path.iterdir()) in ([], [tmp_path / ".write.lock"])


def test_save_fn_without_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no weight file"):
        ck.write_checkpoint(tmp_path, 1, lambda d: (d / "config.json").write_text("{}"),
                            parent_version=None, cycle_id=None, base_model="x")
    assert ck.list_checkpoints(tmp_path) == []


def test_the_manifest_names_the_store_snapshot_and_reads_without_one(tmp_path: Path) -> None:
    snapshot = {"sha256": "ab" * 32, "taken_at": 2.5, "watermark": 2.0, "since": 1.0, "counts": {"prompts": 3}}
    path = publish(tmp_path, 1, snapshot=snapshot)
    assert ck.verify_checkpoint(path).snapshot == snapshot
    raw = json.loads((path / "manifest.json").read_text())
    # what readers before the field read is unchanged: the same format and keys, one key more
    assert raw["format"] == 1 and raw["snapshot"] == snapshot
    assert set(raw) - {"snapshot", "adapter"} == {"format", "version", "parent_version", "created_at", "cycle_id",
                                                  "base_model", "files", "metrics"}
    del raw["snapshot"]  # a manifest written before the field
    (path / "manifest.json").write_text(json.dumps(raw))
    assert ck.verify_checkpoint(path).snapshot is None
    (path / "manifest.json").write_text(json.dumps({**raw, "snapshot": [1]}))
    with pytest.raises(CheckpointError, match="garbled"):
        ck.verify_checkpoint(path)
    assert json.loads((publish(tmp_path, 2) / "manifest.json").read_text())["snapshot"] is None


def _save_with_adapter(d: Path) -> None:
    fake_save(d)
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_config.json").write_text('{"r": 4}')
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"lora-weights")


def test_an_adapter_names_its_base_and_is_refused_on_other_weights(tmp_path: Path) -> None:
    base = publish(tmp_path, 1)
    record = ck.adapter_record(base)
    assert record == {"path": "adapter", "base_version": 1,
                      "base_weights_sha256": ck.weights_digest(ck.read_manifest(base))}
    child = ck.write_checkpoint(tmp_path, 2, _save_with_adapter, parent_version=1, cycle_id=3, base_model="x",
                                adapter=record)
    ref = ck.adapter_of(child)
    assert (ref.base_version, ref.base_dir, ref.adapter_dir) == (1, base, child / "adapter")
    assert ck.verify_checkpoint(child).adapter == record  # the adapter files are hashed like the rest
    assert ck.adapter_of(base) is None
    # The digest covers the full model's weight files only, so the child's own adapter does not change it,
    # while any other weights in the base folder do.
    assert ck.weights_digest(ck.read_manifest(child)) == ck.weights_digest(ck.read_manifest(base))
    manifest = ck.read_manifest(base)
    manifest.files["model.safetensors"] = ck.FileRecord("00" * 32, 1)
    (base / "manifest.json").write_text(manifest.to_json())
    with pytest.raises(CheckpointError, match="other weights"):
        ck.adapter_of(child)


def test_an_adapter_record_without_its_files_or_with_a_bad_path_is_refused(tmp_path: Path) -> None:
    record = ck.adapter_record(publish(tmp_path, 1))
    with pytest.raises(CheckpointError, match="missing"):
        ck.write_checkpoint(tmp_path, 2, fake_save, parent_version=1, cycle_id=3, base_model="x", adapter=record)
    for bad in ({**record, "path": "../v1"}, {**record, "extra": 1}, {**record, "base_version": "1"}):
        with pytest.raises((ValueError, TypeError)):
            ck.write_checkpoint(tmp_path, 2, _save_with_adapter, parent_version=1, cycle_id=3, base_model="x",
                                adapter=bad)
    assert ck.list_checkpoints(tmp_path) == [1]


# ---------------------------------------------------------------- tampering is caught

def test_flipped_byte_in_weights_is_refused(tmp_path: Path) -> None:
    path = publish(tmp_path, 3)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"v3/model\.safetensors: sha256 mismatch"):
        ck.verify_checkpoint(path)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = publish(tmp_path)
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: size 10 != 16384"):
        ck.verify_checkpoint(path)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    path = publish(tmp_path)
    (path / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"v1/tokenizer/tokenizer\.json: missing"):
        ck.verify_checkpoint(path)


def test_missing_manifest_is_refused(tmp_path: Path) -> None:
    path = publish(tmp_path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"v1/manifest\.json: missing"):
        ck.verify_checkpoint(path)
    assert ck.list_checkpoints(tmp_path) == []


@pytest.mark.parametrize("garbage, detail", [
    ('{"format": 1, "version": ', "JSONDecodeError"),
    ('{"format": 1}', "KeyError"),
    ("[1, 2]", "TypeError"),
])
def test_garbled_manifest_is_refused(tmp_path: Path, garbage: str, detail: str) -> None:
    path = publish(tmp_path)
    (path / "manifest.json").write_text(garbage)
    with pytest.raises(CheckpointError, match=rf"v1/manifest\.json: garbled \({detail}"):
        ck.verify_checkpoint(path)


def test_wrong_format_and_version_are_refused(tmp_path: Path) -> None:
    path = publish(tmp_path)
    raw = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**raw, "format": 2}))
    with pytest.raises(CheckpointError, match="unsupported format 2"):
        ck.verify_checkpoint(path)
    (path / "manifest.json").write_text(json.dumps({**raw, "version": 9}))
    with pytest.raises(CheckpointError, match="version 9 does not match folder name"):
        ck.verify_checkpoint(path)


def test_unlisted_weight_file_is_refused(tmp_path: Path) -> None:
    path = publish(tmp_path)
    (path / "README.md").write_text("notes are fine")
    ck.verify_checkpoint(path)
    (path / "model-00002.safetensors").write_bytes(b"smuggled")
    with pytest.raises(CheckpointError, match=r"model-00002\.safetensors: weight file not listed"):
        ck.verify_checkpoint(path)


# ---------------------------------------------------------------- interrupted writes

def test_raising_save_fn_leaves_nothing(tmp_path: Path) -> None:
    def crash(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ck.write_checkpoint(tmp_path, 4, crash, parent_version=3, cycle_id=1, base_model="x")
    assert not (tmp_path / "v4").exists() and not (tmp_path / "v4.tmp").exists()
    assert ck.list_checkpoints(tmp_path) == []


def test_sigkilled_writer_leaves_only_tmp(tmp_path: Path) -> None:
    publish(tmp_path, 1)
    ready = tmp_path / "ready"
    child = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from common.checkpoints import write_checkpoint

        def slow_save(folder):
            (folder / "model.safetensors").write_bytes(b"half a model")
            Path({str(ready)!r}).touch()
            time.sleep(60)

        write_checkpoint(Path({str(tmp_path)!r}), 2, slow_save, parent_version=1, cycle_id=2, base_model="x")
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, "writer exited before it was killed"
            assert time.monotonic() < deadline, "writer never reached save_fn"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()

    assert (tmp_path / "v2.tmp" / "model.safetensors").exists()
    assert not (tmp_path / "v2").exists()
    assert ck.list_checkpoints(tmp_path) == [1]
    assert ck.clean_partial(tmp_path) == [tmp_path / "v2.tmp"]
    assert not (tmp_path / "v2.tmp").exists()
    ck.verify_checkpoint(publish(tmp_path, 2))  # the version is free again


# ---------------------------------------------------------------- listing, pruning, v0

def test_list_checkpoints_sorts_numerically_and_skips_strays(tmp_path: Path) -> None:
    for version in (10, 2, 1):
        publish(tmp_path, version)
    (tmp_path / "v5.tmp").mkdir()
    (tmp_path / "v6").mkdir()  # no manifest: not made by write_checkpoint
    (tmp_path / "vX").mkdir()
    (tmp_path / "v7").write_text("a file, not a folder")
    assert ck.list_checkpoints(tmp_path) == [1, 2, 10]
    assert ck.latest_checkpoint(tmp_path) == 10
    assert ck.list_checkpoints(tmp_path / "absent") == []
    assert ck.latest_checkpoint(tmp_path / "absent") is None


def test_checkpoint_path_validates_version(tmp_path: Path) -> None:
    assert ck.checkpoint_path(tmp_path, 12) == tmp_path / "v12"
    for bad in (-1, True, "3", 1.0):
        with pytest.raises(ValueError, match="Unknown checkpoint version"):
            ck.checkpoint_path(tmp_path, bad)  # type: ignore[arg-type]


def test_prune_keeps_only_named_versions(tmp_path: Path) -> None:
    for version in (0, 1, 2, 3):
        publish(tmp_path, version)
    (tmp_path / "v4.tmp").mkdir()
    assert ck.prune_checkpoints(tmp_path, keep={0, 3, 99}) == [1, 2]
    assert ck.list_checkpoints(tmp_path) == [0, 3]
    assert not any(p.name.endswith(".trash") for p in tmp_path.iterdir())
    assert (tmp_path / "v4.tmp").exists()  # partial writes are clean_partial's job
    with pytest.raises(ValueError, match="keep must name at least one version"):
        ck.prune_checkpoints(tmp_path, keep=set())


def test_clean_partial_removes_interrupted_prune(tmp_path: Path) -> None:
    publish(tmp_path, 1)
    (tmp_path / "v0.trash").mkdir()
    (tmp_path / "v3.tmp").mkdir()
    assert ck.clean_partial(tmp_path) == [tmp_path / "v0.trash", tmp_path / "v3.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["v1"]


def test_init_v0_copies_model_folder(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    fake_save(model_dir)
    (model_dir / "rlhf-model.json").write_text("{}")
    root = tmp_path / "checkpoints"
    path = ck.init_v0(root, model_dir, "tiny")
    manifest = ck.verify_checkpoint(path)
    assert (manifest.version, manifest.parent_version, manifest.cycle_id) == (0, None, None)
    assert "rlhf-model.json" not in manifest.files
    assert (path / "model.safetensors").read_bytes() == WEIGHTS
    assert ck.init_v0(root, model_dir, "tiny") == path  # idempotent
    with pytest.raises(CheckpointError, match="holds base model 'tiny'"):
        ck.init_v0(root, model_dir, "other")
