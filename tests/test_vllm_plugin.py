"""server/engines/vllm_plugin.py: with RLHF_VLLM_QUIET_WAIT=1 a reader of vLLM's message queue
waits on its notification socket even right after a read (vLLM would spin there)."""

from __future__ import annotations

import importlib.metadata
import time

import pytest

shm_broadcast = pytest.importorskip("vllm.distributed.device_communicators.shm_broadcast")

from server.engines import vllm_plugin  # noqa: E402


class Poller:
    def __init__(self) -> None:
        self.calls: list[int | None] = []

    def poll(self, timeout=None):
        self.calls.append(timeout)
        return []  # nothing arrived: the wait times out


def fresh_reader() -> object:
    """A reader that has just read: vLLM's own wait would sched_yield, not poll."""
    reader = object.__new__(shm_broadcast.SpinCondition)
    reader.is_reader, reader.busy_loop_s, reader.last_read = True, 1.0, time.monotonic()
    reader.poller, reader.read_cancel_socket, reader.local_notify_socket = Poller(), object(), object()
    return reader


@pytest.fixture
def restore_spin_condition(monkeypatch):
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


def test_without_the_variable_vllm_spins_as_before(monkeypatch, restore_spin_condition):
    monkeypatch.delenv(vllm_plugin.ENV, raising=False)
    vllm_plugin.register()
    reader = fresh_reader()
    reader.wait(timeout_ms=5)
    assert reader.poller.calls == []  # the busy loop: sched_yield, no poll


def test_with_the_variable_a_reader_waits_on_its_socket(monkeypatch, restore_spin_condition):
    monkeypatch.setenv(vllm_plugin.ENV, "1")
    vllm_plugin.register()
    vllm_plugin.register()  # idempotent: patched once
    reader = fresh_reader()
    reader.wait(timeout_ms=5)
    reader.wait(timeout_ms=5000)  # vLLM's recheck interval: capped, so a missed wake-up costs 20 ms
    reader.wait(timeout_ms=None)
    assert reader.poller.calls == [5, vllm_plugin.RECHECK_MS, vllm_plugin.RECHECK_MS]

