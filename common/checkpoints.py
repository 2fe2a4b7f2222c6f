"""The one checkpoint format that serving, training and the loop share.

A checkpoint is a folder `<root>/vN/` holding full model weights (safetensors),
`config.json`, `generation_config.json`, the tokenizer files and `manifest.json`:

    {"format": 1, "version": N, "parent_version": int | null, "created_at": iso8601,
     "cycle_id": int | null, "base_model": str,
     "files": {relpath: {"sha256": hex, "bytes": int}}, "metrics": {...},
     "snapshot": {"sha256": hex, "taken_at": float, "watermark": float, "counts": {...}} | null,
     "adapter": {"path": "adapter", "base_version": int, "base_weights_sha256": hex} | null}

`snapshot` names the store snapshot the version was trained on (absent in manifests
written before it existed; readers treat absent as null, and older readers ignore it).

`adapter`: a policy trained as LoRA adapters on an SFT base keeps its adapters too, in
the PEFT folder `<vN>/adapter/` (adapter_config.json, adapter_model.safetensors), beside
the merged full weights. The server's "adapter" swap mode loads them next to the policy
it serves instead of reloading the whole model (`server/engines/vllm.py`). They apply to
exactly one base: checkpoint `v<base_version>` under the same root, whose weight files'
digest (`weights_digest`) must equal `base_weights_sha256` (`adapter_of` checks it).
Absent in older manifests (= null).

Publishing is atomic: the writer fills `vN.tmp/`, hashes it, writes the manifest,
fsyncs every file and directory, then renames `vN.tmp` to `vN` and fsyncs the root.
A visible `vN/` is therefore always complete; readers never see a half-written one.
This module imports no torch, so the server and the trainer can share it cheaply.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.paths import fsync_path

FORMAT = 1
MANIFEST_NAME = "manifest.json"
# Weight files a checkpoint may hold; an unlisted one means someone wrote into the
# folder after publishing (or a writer bug), and the weights served would be unverified.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_VERSION_DIR = re.compile(r"^v(\d+)$")
_PARTIAL_SUFFIXES = (".tmp", ".trash")
_LOCK_NAME = ".write.lock"
_CHUNK = 1 << 20


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete, corrupted or cannot be written."""


@dataclass(frozen=True)
class FileRecord:
    """Size and content hash of one file of a checkpoint."""

    sha256: str
    bytes: int


@dataclass
class Manifest:
    """The parsed `manifest.json` of a checkpoint."""

    version: int
    parent_version: int | None
    created_at: str
    cycle_id: int | None
    base_model: str
    files: dict[str, FileRecord]
    metrics: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT
    snapshot: dict[str, Any] | None = None  # the store snapshot it trained on (None: unknown)
    adapter: dict[str, Any] | None = None  # its LoRA adapters and their base (module docstring)

    def to_json(self) -> str:
        """Serialise with sorted keys so equal manifests are equal bytes."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        """Build from parsed JSON; raises KeyError/TypeError/ValueError on a bad shape."""
        files = {str(k): FileRecord(sha256=str(v["sha256"]), bytes=int(v["bytes"]))
                 for k, v in raw["files"].items()}
        return cls(version=_int(raw["version"]), parent_version=_opt_int(raw["parent_version"]),
                   created_at=str(raw["created_at"]), cycle_id=_opt_int(raw["cycle_id"]),
                   base_model=str(raw["base_model"]), files=files,
                   metrics=dict(raw.get("metrics") or {}), format=_int(raw["format"]),
                   snapshot=_opt_dict(raw.get("snapshot")), adapter=_opt_dict(raw.get("adapter")))


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _opt_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def _opt_dict(value: Any) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"expected an object or null, got {value!r}")
    return None if value is None else dict(value)


# ---------------------------------------------------------------- hashing and fsync

def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(folder: Path, exclude: frozenset[str] = frozenset()) -> dict[str, FileRecord]:
    """Records for every regular file under `folder` (POSIX relative paths), minus `exclude`."""
    records: dict[str, FileRecord] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in exclude:
            records[rel] = FileRecord(sha256=sha256_file(path), bytes=path.stat().st_size)
    return records


def check_files(folder: Path, files: dict[str, FileRecord]) -> None:
    """Raise CheckpointError naming the first listed file that is missing or differs."""
    for rel, record in sorted(files.items()):
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        size = path.stat().st_size
        if size != record.bytes:
            raise CheckpointError(f"{path}: size {size} != {record.bytes} in manifest")
        if sha256_file(path) != record.sha256:
            raise CheckpointError(f"{path}: sha256 mismatch")


def fsync_tree(folder: Path) -> None:
    """fsync every file, then every directory bottom-up, so the rename publishes durable data."""
    dirs = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            dirs.append(path)
        elif path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for d in reversed(dirs):
        fsync_path(d)


def make_readable(folder: Path) -> None:
    """chmod 0644 every file under `folder`.

    transformers 5 writes model.safetensors with mode 0600; a server or container running
    as another user must still be able to read the weights.
    """
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o644)


def remove_tree_atomic(folder: Path) -> None:
    """Rename `folder` to a `.trash` sibling, then delete it: readers see all or nothing."""
    trash = folder.with_name(folder.name + ".trash")
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(folder, trash)
    fsync_path(folder.parent)
    shutil.rmtree(trash)


@contextlib.contextmanager
def _write_lock(root: Path) -> Iterator[None]:
    # One writer per root at a time: a second writer would otherwise delete the first
    # one's `vN.tmp` as a "leftover", and prune could race a publish.
    root.mkdir(parents=True, exist_ok=True)
    with open(root / _LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---------------------------------------------------------------- paths and listing

def checkpoint_path(root: Path, version: int) -> Path:
    """The folder of checkpoint `version` under `root` (it may not exist)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"Unknown checkpoint version: {version!r} (a non-negative int)")
    return Path(root) / f"v{version}"


def list_checkpoints(root: Path) -> list[int]:
    """Versions of the complete checkpoints under `root`, ascending (`*.tmp` is ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    versions = []
    for child in root.iterdir():
        match = _VERSION_DIR.match(child.name)
        # The manifest is written before the rename, so a `vN/` without one was not
        # made by write_checkpoint: skip it rather than serve it.
        if match and child.is_dir() and (child / MANIFEST_NAME).is_file():
            versions.append(int(match.group(1)))
    return sorted(versions)


def latest_checkpoint(root: Path) -> int | None:
    """The highest complete version under `root`, or None when there is none."""
    versions = list_checkpoints(root)
    return versions[-1] if versions else None


def read_manifest(path: Path) -> Manifest:
    """Parse `path/manifest.json` without hashing the files (see verify_checkpoint)."""
    manifest_path = Path(path) / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing")
    try:
        manifest = Manifest.from_dict(json.loads(manifest_path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{manifest_path}: garbled ({type(exc).__name__}: {exc})") from exc
    if manifest.format != FORMAT:
        raise CheckpointError(f"{manifest_path}: unsupported format {manifest.format} (expected {FORMAT})")
    return manifest


def verify_checkpoint(path: Path) -> Manifest:
    """Check the manifest, every listed file's size and sha256, and that no weight file is unlisted."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    manifest = read_manifest(path)
    match = _VERSION_DIR.match(path.name)
    if match and int(match.group(1)) != manifest.version:
        raise CheckpointError(f"{path / MANIFEST_NAME}: version {manifest.version} does not match folder name")
    check_files(path, manifest.files)
    for extra in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = extra.relative_to(path).as_posix()
        if rel not in manifest.files and extra.suffix in WEIGHT_SUFFIXES:
            raise CheckpointError(f"{extra}: weight file not listed in manifest")
    return manifest


# ---------------------------------------------------------------- LoRA adapters and their base

ADAPTER_DIR = "adapter"  # a checkpoint's (and a training output's) subfolder for its LoRA adapters
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # PEFT's save_pretrained


@dataclass(frozen=True)
class AdapterRef:
    """A checkpoint's LoRA adapters and the base checkpoint they apply to."""

    adapter_dir: Path
    base_version: int
    base_dir: Path
    base_weights_sha256: str


def weights_digest(manifest: Manifest) -> str:
    """One sha256 over a checkpoint's weight files (name and content hash, sorted): which
    exact weights an adapter was trained on."""
    digest = hashlib.sha256()
    for rel, record in sorted(manifest.files.items()):
        if rel.endswith(WEIGHT_SUFFIXES) and "/" not in rel:  # the full model, not an adapter subfolder
            digest.update(f"{rel}\0{record.sha256}\n".encode())
    return digest.hexdigest()


def adapter_record(base_dir: Path, adapter_subdir: str = ADAPTER_DIR) -> dict[str, Any]:
    """The manifest's `adapter` entry for adapters trained on the checkpoint `base_dir`."""
    base = read_manifest(Path(base_dir))
    return {"path": adapter_subdir, "base_version": base.version, "base_weights_sha256": weights_digest(base)}


def adapter_of(checkpoint_dir: Path, manifest: Manifest | None = None) -> AdapterRef | None:
    """The checkpoint's adapters and their base, or None when it has none; CheckpointError
    when the base is gone or holds other weights than the adapters were trained on.
    Reads manifests only: `verify_checkpoint` each folder to check the files' hashes."""
    checkpoint_dir = Path(checkpoint_dir)
    manifest = manifest or read_manifest(checkpoint_dir)
    if manifest.adapter is None:
        return None
    record = manifest.adapter
    base_dir = checkpoint_path(checkpoint_dir.parent, int(record["base_version"]))
    try:
        base = read_manifest(base_dir)
    except CheckpointError as e:
        raise CheckpointError(f"{checkpoint_dir}: its adapters' base v{record['base_version']} is unreadable: {e}") from e
    if weights_digest(base) != record["base_weights_sha256"]:
        raise CheckpointError(f"{checkpoint_dir}: its adapters were trained on other weights than {base_dir} holds")
    return AdapterRef(checkpoint_dir / record["path"], base.version, base_dir, record["base_weights_sha256"])


def _check_adapter_record(record: dict[str, Any]) -> dict[str, Any]:
    if set(record) != {"path", "base_version", "base_weights_sha256"}:
        raise ValueError(f"adapter record needs path, base_version, base_weights_sha256; got {sorted(record)}")
    path = str(record["path"])
    if not path or "/" in path or path.startswith("."):
        raise ValueError(f"adapter path must be one plain subfolder name, got {path!r}")
    return {"path": path, "base_version": _int(record["base_version"]),
            "base_weights_sha256": str(record["base_weights_sha256"])}


# ---------------------------------------------------------------- writing

def write_checkpoint(
    root: Path,
    version: int,
    save_fn: Callable[[Path], object],
    *,
    parent_version: int | None,
    cycle_id: int | None,
    base_model: str,
    metrics: dict[str, Any] | None = None,
    snapshot: dict[str, Any] | None = None,
    adapter: dict[str, Any] | None = None,
) -> Path:
    """Publish checkpoint `version` under `root` atomically and return its folder.

    `save_fn(tmp_dir)` writes the model files, e.g.
    `lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d))`.
    `snapshot` records the store snapshot the weights were trained on (its sha256, time,
    watermark and row counts). `adapter` ({"path", "base_version", "base_weights_sha256"})
    says `save_fn` also wrote the policy's LoRA adapters to that subfolder (module docstring).
    An existing `vN/` is refused; a leftover `vN.tmp/` from a crashed writer is removed.
    """
    root = Path(root)
    final = checkpoint_path(root, version)
    metrics = dict(metrics or {})
    snapshot = None if snapshot is None else dict(snapshot)
    adapter = None if adapter is None else _check_adapter_record(dict(adapter))
    json.dumps([metrics, snapshot, adapter])  # fail before the expensive save if they are not JSON
    with _write_lock(root):
        if final.exists():
            raise CheckpointError(f"{final}: already exists; versions are never overwritten")
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            _fill_checkpoint(tmp, save_fn, Manifest(
                version=version, parent_version=parent_version, cycle_id=cycle_id,
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                base_model=base_model, files={}, metrics=metrics, snapshot=snapshot, adapter=adapter))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_path(root)
    return final


def _fill_checkpoint(tmp: Path, save_fn: Callable[[Path], object], manifest: Manifest) -> None:
    save_fn(tmp)
    if (tmp / MANIFEST_NAME).exists():
        raise CheckpointError(f"{tmp / MANIFEST_NAME}: save_fn must not write the manifest")
    make_readable(tmp)
    manifest.files = hash_tree(tmp)
    if not any(rel.endswith(WEIGHT_SUFFIXES) for rel in manifest.files):
        raise CheckpointError(f"{tmp}: save_fn wrote no weight file")
    if manifest.adapter is not None:
        adapter_dir = tmp / manifest.adapter["path"]
        missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
        if missing:
            raise CheckpointError(f"{adapter_dir}: the manifest names adapters, but {missing} are missing")
    (tmp / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    fsync_tree(tmp)


def init_v0(root: Path, model_dir: Path, base_model: str) -> Path:
    """Publish the model folder `model_dir` as checkpoint v0 (files copied).

    Idempotent: an existing v0 that verifies and names the same `base_model` is returned.
    """
    final = checkpoint_path(root, 0)
    if final.exists():
        manifest = verify_checkpoint(final)
        if manifest.base_model != base_model:
            raise CheckpointError(f"{final}: holds base model {manifest.base_model!r}, not {base_model!r}")
        return final
    return write_checkpoint(root, 0, lambda d: _copy_model_files(Path(model_dir), d),
                            parent_version=None, cycle_id=None, base_model=base_model)


# Provenance file of a model folder made by common.models; a checkpoint has its own manifest.
_MODEL_FOLDER_ONLY = frozenset({"rlhf-model.json"})


def _copy_model_files(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such model folder")
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src)
        if rel.as_posix() in _MODEL_FOLDER_ONLY or rel.name.startswith("."):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst / rel)


# ---------------------------------------------------------------- cleanup

def clean_partial(root: Path) -> list[Path]:
    """Remove `*.tmp` (crashed writes) and `*.trash` (interrupted prunes) under `root`."""
    root = Path(root)
    if not root.is_dir():
        return []
    with _write_lock(root):
        return _clean_partial_locked(root)


def _clean_partial_locked(root: Path) -> list[Path]:
    removed = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name.startswith("v") and child.name.endswith(_PARTIAL_SUFFIXES):
            shutil.rmtree(child)
            removed.append(child)
    return removed


def prune_checkpoints(root: Path, keep: set[int]) -> list[int]:
    """Delete every complete checkpoint whose version is not in `keep`; return those deleted.

    The retention rule belongs to the loop; this only deletes, one folder at a time
    (rename to `.trash`, then rmtree), so a reader never sees a half-deleted version.
    """
    if not keep:
        # An empty keep set would delete the serving policy too: always a caller bug.
        raise ValueError("prune_checkpoints: keep must name at least one version")
    root = Path(root)
    with _write_lock(root):
        doomed = [v for v in list_checkpoints(root) if v not in keep]
        for version in doomed:
            remove_tree_atomic(checkpoint_path(root, version))
    return doomed
