"""The trainer's CPU sharing (trainer.device): threads = the cores other processes leave idle."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from trainer import device
from trainer.device import Neighbours, ThreadsBesideNeighbours, adapt_threads


class FixedNeighbours:
    def __init__(self, busy: float | None) -> None:
        self.busy = busy

    def busy_cores(self) -> float | None:
        return self.busy

    def stop(self) -> None:
        pass


@pytest.fixture(autouse=True)
def restore_threads():
    previous = torch.get_num_threads()
    yield
    device.stop_sharing_cpu()
    torch.set_num_threads(previous)


@pytest.mark.parametrize(("cores", "busy", "cap", "threads"), [
    (2, 0.0, None, 2),  # an idle machine: every core
    (2, None, None, 2),  # nothing measured yet: every core
    (2, 1.0, None, 1),  # the engine busy on one core: the other one
    (2, 0.3, None, 2),  # light traffic: both
    (2, 0.6, None, 1),
    (2, 3.5, None, 1),  # never below one
    (8, 2.0, None, 6),
    (8, 0.0, 4, 4),  # torch_threads caps it
])
def test_threads_are_the_cores_others_leave_idle(cores, busy, cap, threads):
    policy = ThreadsBesideNeighbours(cap, neighbours=FixedNeighbours(busy))
    policy.cores = cores
    policy.max_threads = cap or cores
    assert policy.threads_now() == threads


def test_adapt_threads_sets_torch_only_when_sharing_and_not_fixed():
    torch.set_num_threads(2)
    assert adapt_threads() == 2  # sharing off: left alone
    device._threads_policy = ThreadsBesideNeighbours(neighbours=FixedNeighbours(10.0))
    assert adapt_threads(fixed=2) == 2 and torch.get_num_threads() == 2  # the stage's own count wins
    assert adapt_threads() == 1 and torch.get_num_threads() == 1
    assert [threads for _, threads in device._threads_policy.decisions] == [1]


def test_own_cpu_time_is_not_counted_as_a_neighbour():
    neighbours = Neighbours(window_s=2.0, period_s=60.0)  # sampled by hand below
    try:
        neighbours.samples.clear()
        # (monotonic s, all cores' busy CPU s, this process's CPU s): over 2 s the machine was
        # busy 3.0 core-seconds, 1.5 of them this process's
        neighbours.samples.extend([(100.0, 50.0, 10.0), (102.0, 53.0, 11.5)])
        assert neighbours.busy_cores() == pytest.approx(0.75)
    finally:
        neighbours.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_neighbours_see_another_process():
    neighbours = Neighbours(window_s=2.0, period_s=0.25)
    try:
        busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 3\nwhile time.time() < t: pass"])
        time.sleep(2.5)
        seen = neighbours.busy_cores()
        busy.wait()
        assert seen is not None and seen >= 0.6  # the spinning child: about one core (more if others run)
    finally:
        neighbours.stop()
