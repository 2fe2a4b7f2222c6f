"""trainer.metrics: what the trainer exports to Prometheus, scraped over HTTP on loopback.

The figures fed in are those two recorded demo cycles wrote to the store (trimmed to what
the metrics read): runs/demo-full cycle 1 (promoted) and runs/demo-default cycle 1
(rejected: the judge's accuracy 0.522 < 0.55). The stage dicts have the shape
``trainer.cycle.StageLog`` records; a service test runs real (data-less) cycles.
"""

from __future__ import annotations

import logging
import math
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loop_helpers import publish_v0, tiny_trainer_config
from prometheus_client.parser import text_string_to_metric_families

from common.store import Store
from trainer import service as trainer_service
from trainer.loop_config import load_trainer_config
from trainer.metrics import GATE_CHECKS, MAX_GROUPS, STAGES, TrainerMetrics, rejection_reason
from trainer.service import TrainerService

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> Samples:
    """GET /metrics on loopback; (sample name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def served() -> Iterator[tuple[TrainerMetrics, int]]:
    """Metrics with group "B" held out (as in the demos' config), served on a free port."""
    metrics, port = TrainerMetrics(held_out_groups=["B"]), free_port()
    metrics.serve_http("127.0.0.1", port)
    yield metrics, port
    metrics.stop_http()


# ---------------------------------------------------------------------------- recorded cycles


def accuracy(overall: float, pairs: int, by_group: dict[str, tuple[float, int]]) -> dict[str, Any]:
    return {"accuracy": overall, "num_pairs": pairs,
            "by_group": {g: {"accuracy": a, "num_pairs": n} for g, (a, n) in by_group.items()}}


def check(value_: float, op: str, bound: float) -> dict[str, Any]:
    passed = value_ >= bound if op == ">=" else value_ <= bound
    return {"value": value_, "op": op, "bound": bound, "passed": passed}


# runs/demo-full/data/rlhf.sqlite, cycle 1 (promoted); stage -> recorded metrics
PROMOTED = {
    "snapshot": {"seconds": 0.022}, "hygiene": {"seconds": 0.002}, "sft": {"seconds": 0.0, "ran": False},
    "rm": {"seconds": 122.291,
           "rm": {"val": accuracy(0.5667215815485996, 1214, {"A": (0.5706580366774542, 927),
                                                             "B": (0.554006968641115, 287)})},
           "judge": {"val": accuracy(0.55579058699101, 1891, {"A": (0.5548628428927681, 1604),
                                                              "B": (0.5609756097560976, 287)})}},
    "ppo": {"seconds": 124.22, "last": {"rm_score": -0.7824087738990784, "kl_ref": 0.6051517724990845,
                                        "ptx_loss": 3.4581541220347085}},
    "evaluate": {"seconds": 24.545, "kl_to_sft": 0.003711200784891844, "judge_win_rate": 0.6875,
                 "ptx_regression": -0.03376934996571812},
    "gate": {"seconds": 0.0, "promote": True, "reason": "all checks passed", "checks": {
        "judge_accuracy": check(0.55579058699101, ">=", 0.55), "kl_to_sft": check(0.0037, "<=", 0.5),
        "win_rate": check(0.6875, ">=", 0.5)}},
    "publish": {"seconds": 1.792}, "swap": {"seconds": 2.286}, "record": {"seconds": 0.001},
}

# runs/demo-default/data/rlhf.sqlite, cycle 1 (rejected: no publish, swap or record)
REJECTED = {
    "snapshot": {"seconds": 0.024}, "hygiene": {"seconds": 0.002}, "sft": {"seconds": 61.585, "ran": True},
    "rm": {"seconds": 121.026,
           "rm": {"val": accuracy(0.5785256410256411, 1248, {"A": (0.5738045738045738, 962),
                                                             "B": (0.5944055944055944, 286)})},
           "judge": {"val": accuracy(0.5221238938053098, 1921, {"A": (0.5155963302752293, 1635),
                                                                "B": (0.5594405594405595, 286)})}},
    "ppo": {"seconds": 110.947, "last": {"rm_score": -0.6314982175827026, "kl_ref": 0.20379197597503662,
                                         "ptx_loss": 3.459505637486776}},
    "evaluate": {"seconds": 26.38, "kl_to_sft": 0.01925473101437092, "judge_win_rate": 0.625,
                 "ptx_regression": -0.015139780325714725},
    "gate": {"seconds": 0.0, "promote": False, "reason": "judge_accuracy 0.5221 >= 0.55 failed", "checks": {
        "judge_accuracy": check(0.5221238938053098, ">=", 0.55), "kl_to_sft": check(0.0193, "<=", 0.5),
        "win_rate": check(0.625, ">=", 0.5)}},
}


def replay(metrics: TrainerMetrics, stages: dict[str, dict[str, Any]], state: str) -> None:
    """What StageLog and run_cycle call, in the recipe's order."""
    for name in STAGES:
        if name in stages:
            metrics.stage_started(name)
            metrics.stage_ended(name, stages[name])
    metrics.cycle_ended(state)


def test_two_recorded_cycles_scrape_as_recorded(served) -> None:
    metrics, port = served
    replay(metrics, PROMOTED, "promoted")
    replay(metrics, REJECTED, "rejected")
    s = scrape(port)

    counts = {state: value(s, "rlhf_trainer_cycles_total", state=state)
              for state in ("promoted", "rejected", "skipped", "failed")}
    assert counts == {"promoted": 1, "rejected": 1, "skipped": 0, "failed": 0}
    assert value(s, "rlhf_trainer_last_cycle_end_timestamp_seconds", state="rejected") > 0
    assert value(s, "rlhf_trainer_stage", rlhf_trainer_stage="idle") == 1
    assert value(s, "rlhf_trainer_stage", rlhf_trainer_stage="rm") == 0

    # durations: rm ran in both (122.291 + 121.026 s), publish only in the promoted one
    assert value(s, "rlhf_trainer_stage_seconds_count", stage="rm") == 2
    assert value(s, "rlhf_trainer_stage_seconds_sum", stage="rm") == pytest.approx(243.317)
    assert value(s, "rlhf_trainer_stage_seconds_count", stage="publish") == 1
    assert value(s, "rlhf_trainer_stage_seconds_bucket", stage="publish", le="5.0") == 1  # 1.792 s

    # the gauges show the last cycle (the rejected one); B is the held-out group
    def acc(model: str, group: str, held_out: str) -> float:
        return value(s, "rlhf_trainer_rm_accuracy", model=model, group=group, held_out=held_out)

    assert acc("rm", "", "") == 0.5785256410256411
    assert acc("rm", "A", "false") == 0.5738045738045738
    assert acc("rm", "B", "true") == 0.5944055944055944
    assert acc("judge", "", "") == 0.5221238938053098
    assert acc("judge", "B", "true") == 0.5594405594405595
    assert value(s, "rlhf_trainer_rm_accuracy_pairs", model="judge", group="A", held_out="false") == 1635
    assert value(s, "rlhf_trainer_ppo_rm_score") == -0.6314982175827026
    assert value(s, "rlhf_trainer_ppo_kl") == 0.20379197597503662
    assert value(s, "rlhf_trainer_ppo_ptx_loss") == 3.459505637486776
    assert value(s, "rlhf_trainer_kl_to_sft") == 0.01925473101437092
    assert value(s, "rlhf_trainer_judge_win_rate") == 0.625
    assert value(s, "rlhf_trainer_ptx_regression") == -0.015139780325714725

    assert value(s, "rlhf_trainer_gate_decisions_total", decision="promote", reason="passed") == 1
    assert value(s, "rlhf_trainer_gate_decisions_total", decision="reject", reason="judge_accuracy") == 1
    assert value(s, "rlhf_trainer_gate_check_failures_total", check="judge_accuracy") == 1
    assert value(s, "process_resident_memory_bytes") > 0  # the process collector (Linux)


def test_the_current_stage_is_the_one_running(served) -> None:
    metrics, port = served
    metrics.stage_started("ppo")
    s = scrape(port)
    assert value(s, "rlhf_trainer_stage", rlhf_trainer_stage="ppo") == 1
    assert sum(v for (name, _), v in s.items() if name == "rlhf_trainer_stage") == 1  # one state at a time


# ---------------------------------------------------------------------------- bounded, robust


def test_a_rejection_s_reason_is_its_first_failed_check_in_the_gate_s_order() -> None:
    # The store gives the checks back with sorted keys: kl_to_sft before win_rate. The gate
    # checks win_rate first, so that is the reason.
    assert rejection_reason(["kl_to_sft", "win_rate"]) == "win_rate"
    assert rejection_reason([]) == "passed"
    assert rejection_reason(["some_new_check"]) == "other"  # a label set that stays closed
    assert GATE_CHECKS[0] == "judge_accuracy"  # trainer.gate.decide checks the judge first


def test_every_failed_check_is_counted_but_a_decision_once(served) -> None:
    metrics, port = served
    metrics.stage_ended("gate", {"promote": False, "checks": {
        "kl_to_sft": check(0.9, "<=", 0.5), "ptx_regression": check(0.1, "<=", 0.25),
        "win_rate": check(0.25, ">=", 0.5)}})
    s = scrape(port)
    assert value(s, "rlhf_trainer_gate_decisions_total", decision="reject", reason="win_rate") == 1
    assert value(s, "rlhf_trainer_gate_check_failures_total", check="win_rate") == 1
    assert value(s, "rlhf_trainer_gate_check_failures_total", check="kl_to_sft") == 1
    assert ("rlhf_trainer_gate_check_failures_total", frozenset({("check", "ptx_regression")})) not in s


def test_a_stage_that_raised_keeps_the_gauges_and_an_unmeasured_figure_reads_nan(served) -> None:
    metrics, port = served
    replay(metrics, PROMOTED, "promoted")
    metrics.stage_ended("ppo", {"seconds": 3.5, "cpu_seconds": 7.0})  # raised: no "last"
    metrics.stage_ended("evaluate", {"seconds": 1.0})
    s = scrape(port)
    assert value(s, "rlhf_trainer_ppo_rm_score") == -0.7824087738990784  # still the promoted cycle's
    assert value(s, "rlhf_trainer_kl_to_sft") == 0.003711200784891844
    assert value(s, "rlhf_trainer_stage_seconds_count", stage="ppo") == 2  # the failed attempt timed too

    metrics.stage_ended("ppo", {"seconds": 2.0, "last": {"rm_score": 0.5, "kl_ref": 0.1, "ptx_loss": None}})
    s = scrape(port)
    assert value(s, "rlhf_trainer_ppo_rm_score") == 0.5
    assert math.isnan(value(s, "rlhf_trainer_ppo_ptx_loss"))  # ptx off: not measured, not stale


def test_labeler_groups_are_capped_and_a_group_gone_does_not_linger(served) -> None:
    metrics, port = served
    # 40 groups; group gNN has NN pairs: the 32 with the most pairs (g08..g39) stay
    many = {f"g{i:02d}": (0.5, i) for i in range(40)}
    metrics.stage_ended("rm", {"rm": {"val": accuracy(0.5, 780, many)}})
    s = scrape(port)
    groups = {dict(labels)["group"] for (name, labels) in s if name == "rlhf_trainer_rm_accuracy"}
    assert len(groups) == MAX_GROUPS + 1 and "" in groups and "g08" in groups and "g07" not in groups

    metrics.stage_ended("rm", {"rm": {"val": accuracy(0.6, 10, {"A": (0.6, 10)})}})
    s = scrape(port)
    series = {tuple(sorted(labels)) for (name, labels) in s if name == "rlhf_trainer_rm_accuracy"}
    assert series == {(("group", ""), ("held_out", ""), ("model", "rm")),
                      (("group", "A"), ("held_out", "false"), ("model", "rm"))}


def test_a_stage_s_metrics_of_an_unexpected_shape_never_fail_the_cycle(served, caplog) -> None:
    metrics, _ = served
    with caplog.at_level(logging.WARNING, logger="trainer.metrics"):
        metrics.stage_ended("rm", {"seconds": 1.0, "rm": {"val": "not a dict"}})
        metrics.stage_ended("evaluate", {"kl_to_sft": "n/a"})
    assert [r.message for r in caplog.records] == ["metrics of stage rm not recorded",
                                                   "metrics of stage evaluate not recorded"]


# ---------------------------------------------------------------------------- the trainer process


def test_the_trainer_service_exports_its_cycles(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Real cycles through StageLog and run_cycle: one fails (no serving policy yet), one is
    skipped (no data); both in milliseconds."""
    port = free_port()
    config = tiny_trainer_config(tmp_path, trunk_cache_mb=0, metrics_port=port)
    with Store(config.store_path) as store:
        trainer = TrainerService(config, store, hook=lambda point: None)
        trainer.metrics.serve_http(config.metrics_host, config.metrics_port)
        try:
            trainer.enqueue("cli")
            [failed] = trainer.run_pending()
            publish_v0(store, config.checkpoints_root, tiny_model_dir)
            trainer.enqueue("cli")
            [skipped] = trainer.run_pending()
            s = scrape(port)
        finally:
            trainer.metrics.stop_http()
    assert (failed.state, skipped.state) == ("failed", "skipped")
    assert value(s, "rlhf_trainer_cycles_total", state="failed") == 1
    assert value(s, "rlhf_trainer_cycles_total", state="skipped") == 1
    assert value(s, "rlhf_trainer_stage_seconds_count", stage="snapshot") == 2
    assert value(s, "rlhf_trainer_stage_seconds_count", stage="hygiene") == 1  # the failed one stopped before
    assert value(s, "rlhf_trainer_stage", rlhf_trainer_stage="idle") == 1


def test_rlhf_trainer_serves_metrics_on_the_configured_port_while_it_runs(tmp_data_dir: Path, monkeypatch) -> None:
    port, seen = free_port(), {}

    def scrape_instead(trainer: TrainerService, *, once: bool, trigger: bool) -> int:
        seen.update(scrape(port))
        return 0

    monkeypatch.setattr(trainer_service, "run_service", scrape_instead)
    code = trainer_service.main(["--once", "--set", f"metrics_port={port}", "--set", "server_address=",
                                 "--set", "share_cpu=false", "--set", "trunk_cache_mb=0"])
    assert code == 0
    assert value(seen, "rlhf_trainer_cycles_total", state="failed") == 0
    with pytest.raises(urllib.error.URLError):  # closed when the process's work is done
        scrape(port)


def test_metrics_port_is_off_by_default_on_loopback_and_range_checked() -> None:
    config = load_trainer_config()
    assert (config.metrics_port, config.metrics_host) == (0, "127.0.0.1")
    with pytest.raises(ValueError, match="metrics_port"):
        load_trainer_config(overrides=["metrics_port=70000"])
