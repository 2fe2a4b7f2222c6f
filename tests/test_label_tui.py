"""`rlhf label`: the order parser, and a whole session in a pseudo-terminal (pexpect)
against a real server with the tiny model, malformed input included."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from clients.label_tui import parse_order
from common.paths import REPO_ROOT

# ------------------------------------------------------------------ parse_order


@pytest.mark.parametrize(
    "text, k, groups",
    [
        ("3>1=2>4", 4, [[3], [1, 2], [4]]),
        (" 3 > 1 = 2 > 4 ", 4, [[3], [1, 2], [4]]),
        ("1>2>3>4>5>6>7>8>9", 9, [[n] for n in range(1, 10)]),
        ("2=1>3", 3, [[2, 1], [3]]),
    ],
)
def test_parse_order(text: str, k: int, groups: list[list[int]]) -> None:
    assert parse_order(text, k) == groups


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty order: rank all 4 responses, e.g. 1>2>3>4"),
        ("3>1>2", "missing response 4: rank all 4"),
        ("3>1", "missing responses 2, 4: rank all 4"),
        ("3>1>1>2>4", "response 1 appears twice"),
        ("5>1>2>3>4", "no response 5: the responses are numbered 1..4"),
        ("0>1>2>3", "no response 0"),
        ("1=2=3=4", "everything is tied"),
        ("hello", "unexpected 'h' at character 1"),
        ("1,2,3,4", "unexpected ',' at character 2"),
        ("3>>1>2>4", "'>' needs a response number on each side"),
        ("=3>1>2>4", "'=' needs a response number on each side"),
        ("3>1>2>4>", "the order ends with '>'"),
        ("3 1>2>4", "missing '>' or '=' before 1"),
    ],
)
def test_parse_order_refuses_with_a_specific_message(text: str, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_order(text, 4)
    assert message in str(refused.value)


# ------------------------------------------------------------------ a session in a pty


def test_a_labeling_session_in_a_terminal(tiny_model_dir: Path, tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    from server.engines.hf import HFEngine
    from test_feedback_harness import FeedbackServerThread, issue_key, seed_prompt

    with FeedbackServerThread(tmp_path / "store.sqlite", lambda: HFEngine(tiny_model_dir, 0), max_new_tokens=6) as server:
        key = issue_key(server.store, "terminal-labeler", "labeler", "train")
        prompt_id, _ = seed_prompt(server.store, 0, text="Suggest a name for a friendly robot.")
        env = dict(os.environ, RLHF_API_KEY=key, PYTHONUNBUFFERED="1", COLUMNS="100")
        child = pexpect.spawn(sys.executable, ["-m", "common.cli", "label", "--target", server.target, "--k", "4"],
                              cwd=str(REPO_ROOT), env=env, encoding="utf-8", timeout=180)  # fmt: skip
        try:
            child.expect("Suggest a name for a friendly robot.")
            for number in (1, 2, 3, 4):
                child.expect(f"--- response {number} ")
            for bad, why in [("3>1>2", "missing response 4"), ("3>1>1>2>4", "response 1 appears twice"),
                             ("7>1>2>3", "no response 7"), ("1=2=3=4", "everything is tied"),
                             ("rank them please", "unexpected 'r'"), ("", "empty order")]:  # fmt: skip
                child.expect_exact("Order of responses 1..4: ")
                child.sendline(bad)
                child.expect_exact(f"Not a valid order: ")
                child.expect_exact(why)
            child.expect_exact("Order of responses 1..4: ")
            child.sendline("3>1=2>4")
            child.expect(r"Saved ranking ([0-9a-f]{32}) \(5 comparisons\)\.")
            ranking_id = child.match.group(1)
            child.expect_exact("no prompt waiting for labels")
            child.expect_exact("Nothing to label. Enter checks again, q quits: ")
            child.sendline("q")
            child.expect_exact("Bye: 1 ranking submitted.")
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
        assert child.exitstatus == 0
        row = server.store.read_sync(lambda db: db.table("rankings").get(ranking_id))
        task = server.store.read_sync(lambda db: db.table("comparison_tasks").get(row["task_id"]))
        c = json.loads(task["completion_ids_json"])  # in the order the session numbered them
        assert json.loads(row["ranking_json"]) == [[c[2]], [c[0], c[1]], [c[3]]]
        assert (row["prompt_id"], row["labeler_id"], task["status"]) == (prompt_id, "terminal-labeler", "submitted")
