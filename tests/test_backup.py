"""Backups and restore (common/store/backup.py, `rlhf store backup|restore`), and the store
snapshot a published checkpoint's manifest names (trainer/cycle.py, trainer/publishing.py)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

import common.store.backup as backup_module
from common.checkpoints import read_manifest, sha256_file, write_checkpoint
from common.store import (
    Store,
    StoreError,
    StoreInUseError,
    add_policy,
    add_prompt,
    create_cycle,
    backup_store,
    check_integrity,
    list_backups,
    restore_backup,
    store_in_use,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "live" / "rlhf.sqlite") as s:
        yield s


def prompt_texts(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT text FROM prompts ORDER BY rowid")]
    finally:
        conn.close()


def test_a_backup_under_write_load_restores_every_write_acknowledged_before_it(store: Store, tmp_path: Path) -> None:
    acked: list[int] = []  # appended only after each write_sync returned (committed)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            store.write_sync(add_prompt("user", str(i)))
            acked.append(i)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(acked) < 50:
            stop.wait(0.01)
        acked_before = len(acked)
        result = backup_store(store, tmp_path / "backups", keep=3)
        acked_after = len(acked)
        while len(acked) < acked_after + 20:  # writes go on after the backup
            stop.wait(0.01)
    finally:
        stop.set()
        thread.join()

    assert list_backups(tmp_path / "backups", "rlhf") == [result.path]
    assert sorted(os.listdir(tmp_path / "backups")) == [result.path.name]  # no .tmp left behind
    restored = restore_backup(result.path, tmp_path / "restored" / "rlhf.sqlite", force=True)
    assert restored.replaced and restored.previous is None
    check_integrity(tmp_path / "restored" / "rlhf.sqlite")
    seqs = sorted(int(t) for t in prompt_texts(tmp_path / "restored" / "rlhf.sqlite"))
    assert seqs == list(range(len(seqs)))  # a prefix of the commit order, no gap
    assert acked_before <= len(seqs) <= acked_after + 1  # every write acknowledged before it began
    assert len(prompt_texts(store.path)) > len(seqs)  # and the live store went on without it


def test_a_backup_counts_only_once_verified(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store.write_sync(add_prompt("user", "hello"))
    folder = tmp_path / "backups"
    checked: list[Path] = []

    def failing_check(path: Path) -> None:
        checked.append(path)
        raise StoreError(f"{path}: integrity check failed: injected")

    monkeypatch.setattr(backup_module, "check_integrity", failing_check)
    with pytest.raises(StoreError, match="injected"):
        backup_store(store, folder, keep=1)
    assert [p.name.endswith(".sqlite.tmp") for p in checked] == [True]  # checked before its rename
    assert list(folder.iterdir()) == []  # neither the final name nor the .tmp
    monkeypatch.undo()

    good = backup_store(store, folder).path
    check_integrity(good)
    damaged = tmp_path / "damaged.sqlite"
    data = bytearray(good.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page:2 * page] = b"\xff" * page  # the second page (a b-tree page) overwritten
    damaged.write_bytes(bytes(data))
    with pytest.raises(StoreError):
        check_integrity(damaged)
    with pytest.raises(StoreError):
        restore_backup(damaged, tmp_path / "elsewhere.sqlite")
    assert not (tmp_path / "elsewhere.sqlite").exists()


def test_old_backups_are_pruned_to_keep(store: Store, tmp_path: Path) -> None:
    t0 = 1_780_000_000.0
    made = [backup_store(store, tmp_path / "b", keep=2, now=t0 + i).path for i in range(4)]
    assert list_backups(tmp_path / "b", "rlhf") == made[2:]
    assert made[0].name == "rlhf-20260528T202640.000Z.sqlite"  # named by UTC time: sorts as time


def test_restore_refuses_a_store_open_in_another_process(store: Store, tmp_path: Path) -> None:
    store.write_sync(add_prompt("user", "in the backup"))
    backup = backup_store(store, tmp_path / "backups").path
    store.write_sync(add_prompt("user", "after the backup"))
    target = tmp_path / "served" / "rlhf.sqlite"
    with Store(target) as other:
        other.write_sync(add_prompt("user", "served"))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from common.store import Store; s = Store(sys.argv[1]); "
         "print('open', flush=True); time.sleep(60)", str(target)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert store_in_use(target)
        with pytest.raises(StoreInUseError, match="open in another process"):
            restore_backup(backup, target, force=True)
        assert prompt_texts(target) == ["served"]  # untouched
    finally:
        holder.kill()
        holder.wait()
    assert not store_in_use(target)  # killed: its locks died with it
    result = restore_backup(backup, target, force=True)
    assert result.replaced and prompt_texts(target) == ["in the backup"]
    assert prompt_texts(result.previous) == ["served"]  # the replaced store is kept aside


def test_restore_without_force_never_touches_the_store(store: Store, tmp_path: Path) -> None:
    store.write_sync(add_prompt("user", "in the backup"))
    backup = backup_store(store, tmp_path / "backups").path
    store.write_sync(add_prompt("user", "later"))
    assert store_in_use(store.path)  # this process's own Store counts too
    result = restore_backup(backup, store.path)
    assert not result.replaced and result.staged.parent == store.path.parent
    assert prompt_texts(result.staged) == ["in the backup"]
    assert sorted(prompt_texts(store.path)) == ["in the backup", "later"]
    with pytest.raises(StoreInUseError):
        restore_backup(backup, store.path, force=True)


def test_rlhf_store_backup_and_restore(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.store_cli import main

    path = tmp_path / "rlhf.sqlite"
    with Store(path) as s:
        s.write_sync(add_prompt("user", "kept"))
    config = ["--set", f"store_path={path}", "--set", f"backup.folder={tmp_path / 'backups'}"]
    assert main([*config, "backup"]) == 0
    backup = Path(json.loads(capsys.readouterr().out)["path"])
    assert backup.parent == tmp_path / "backups" and backup.is_file()
    with Store(path) as s:
        s.write_sync(add_prompt("user", "lost"))
        assert main([*config, "restore", str(backup), "--force"]) == 1  # this process holds it open
        assert "refused" in capsys.readouterr().err
    assert main([*config, "restore", str(backup)]) == 0
    assert "mv " in capsys.readouterr().out and sorted(prompt_texts(path)) == ["kept", "lost"]
    assert main([*config, "restore", str(backup), "--force"]) == 0
    assert prompt_texts(path) == ["kept"]


# ---------------------------------------------------------------------------- the manifest names the snapshot


def test_a_published_checkpoint_names_the_store_snapshot_it_trained_on(store: Store, tmp_path: Path) -> None:
    from trainer.cycle import take_snapshot
    from trainer.publishing import publish_policy

    root = tmp_path / "checkpoints"
    v0 = write_checkpoint(root, 0, lambda d: (d / "model.safetensors").write_bytes(b"w0"), parent_version=None,
                          cycle_id=None, base_model="tiny")
    store.write_sync(add_policy(0, str(v0), status="serving"))
    cycle = store.write_sync(create_cycle("cli"))
    for text in ("one", "two", "three"):
        store.write_sync(add_prompt("user", text))
    snap = take_snapshot(store, tmp_path / "cycle" / "snapshot.sqlite", window_s=None)
    store.write_sync(add_prompt("user", "after the snapshot"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w1")
    publish_policy(store, root, cycle.id, model, parent=0, metrics={"kind": "ppo"}, snapshot=snap.manifest_record())

    recorded = read_manifest(root / "v1").snapshot
    assert recorded["sha256"] == sha256_file(tmp_path / "cycle" / "snapshot.sqlite")
    assert recorded["counts"]["prompts"] == 3 and recorded["counts"]["policies"] == 1
    assert recorded["watermark"] == snap.watermark and recorded["taken_at"] == snap.taken_at
    assert read_manifest(root / "v0").snapshot is None  # published without one
