"""bench.best_of_n's exact best-of-n win rate and its KL, on hand-worked values."""

from __future__ import annotations

import math

import pytest

from bench.best_of_n import best_of_n_kl, best_of_n_win


def test_a_perfect_picker_on_three_samples():
    truth = [0.0, 1.0, 2.0]
    # Pairs {0,1} pick 1, meet 2: lose; {0,2} pick 2, meet 1: win; {1,2} pick 2, meet 0: win.
    assert best_of_n_win(truth, truth, 2) == pytest.approx(2 / 3)
    # One sample against another of the same policy: as often better as worse.
    assert best_of_n_win(truth, truth, 1) == pytest.approx(0.5)
    # A picker that has it backwards: {0,1} picks 0, {0,2} picks 0, {1,2} picks 1 (beats 0).
    assert best_of_n_win([2.0, 1.0, 0.0], truth, 2) == pytest.approx(1 / 3)


@pytest.mark.parametrize("n", range(1, 9))
def test_a_perfect_picker_without_ties_wins_n_in_n_plus_one(n):
    # The best of n + 1 draws is in the subset n / (n + 1) of the time.
    truth = [0.3, 1.2, -0.5, 2.0, 0.9, 1.1, -1.0, 0.0, 0.4]
    assert best_of_n_win(truth, truth, n) == pytest.approx(n / (n + 1))


def test_ties_count_half_and_the_picker_breaks_its_own_ties_by_order():
    # {0,1} pick 0 (truth 1) meets 2 (0): 1; {0,2} pick 0 meets 1 (1): 0.5; {1,2} pick 2 (0) meets 0: 0.
    assert best_of_n_win([0.9, 0.1, 0.5], [1.0, 1.0, 0.0], 2) == pytest.approx(0.5)
    # A picker that ties everything takes the first of each subset: {0,1} -> 0, {0,2} -> 0, {1,2} -> 1.
    assert best_of_n_win([0.0, 0.0, 0.0], [0.0, 1.0, 2.0], 2) == pytest.approx(1 / 3)


def test_it_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="one sample left"):
        best_of_n_win([0.0, 1.0], [0.0, 1.0], 2)
    with pytest.raises(ValueError, match="picker scores"):
        best_of_n_win([0.0], [0.0, 1.0], 1)


def test_the_kl_of_best_of_n():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.193
    assert best_of_n_kl(8) == pytest.approx(2.0794 - 0.875, abs=1e-4)
