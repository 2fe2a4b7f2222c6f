"""JSONL exchange of feedback: the ranking helpers, export then import reproducing the
rows (K-way rankings, demonstrations), TRL pairs both ways, and all-or-nothing imports
that name every bad line. Real store files in tmp_path."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlite_utils import Database

from common.exchange import ImportRejected, export_jsonl, export_records, import_jsonl
from common.paths import REPO_ROOT
from common.store import (
    InvalidArgumentError,
    NewCompletion,
    Store,
    add_completions,
    add_demonstration,
    add_prompt,
    add_ranking,
    lease_task,
)
from common.store.rankings import check_ranking_groups, count_pairs, ranking_to_pairs

# ------------------------------------------------------------------ pure helpers


def test_ranking_to_pairs_skips_ties() -> None:
    # a > {b, c} > d: a beats b, c, d; b and c each beat d; b-c tied: 3 + 2 = 5 pairs.
    groups = [["a"], ["b", "c"], ["d"]]
    assert ranking_to_pairs(groups) == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")]
    assert count_pairs(groups) == 5
    assert count_pairs([["a"], ["b"], ["c"], ["d"]]) == 6  # C(4, 2)


@pytest.mark.parametrize(
    "groups, fragment",
    [
        ([], "the ranking is empty"),
        ([["a"], [], ["b"]], "group 2 of the ranking is empty"),
        ([["a"], ["a"]], "completion 'a' appears more than once"),
        ([["a"], [""]], "group 2 holds an empty completion id"),
        ([["a", "b", "c"]], "all 3 completions are tied"),
        ([["a"]], "K = 1 completions; K must be 2..9"),
        ([[str(i)] for i in range(10)], "K = 10 completions; K must be 2..9"),
    ],
)
def test_check_ranking_groups_names_the_problem(groups, fragment) -> None:
    with pytest.raises(InvalidArgumentError, match=fragment):
        check_ranking_groups(groups, min_k=2, max_k=9)


# ------------------------------------------------------------------ a store with feedback

TRAIN, VAL = "user-2", "user-7"  # split_for_user: train, val (the split survives the trip)


def sample(i: int, text: str, version: int = 0, purpose: str = "label") -> NewCompletion:
    return NewCompletion(idx=i, text=text, policy_version=version, finish_reason="stop" if i % 2 else "length",
                         prompt_tokens=7, completion_tokens=3 + i, latency_s=0.25 * i, sampling={"n": 4, "temperature": 1.0},
                         ttft_s=0.01 * i, purpose=purpose)  # type: ignore[arg-type]  # fmt: skip


def fill(store: Store) -> dict[str, list[str]]:
    """Prompts (plain, chat, redacted PII, unredacted PII), completions of two policy
    versions, rankings with ties (one answering a task), demonstrations."""

    def op(db: Database) -> dict[str, list[str]]:
        plain = add_prompt(TRAIN, "Name three birds.", now=100.0)(db)
        chat = add_prompt(VAL, "And in French?", now=101.0, messages=[
            {"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "And in French?"}])(db)  # fmt: skip
        pii = add_prompt(TRAIN, "Mail me at jo@example.com", has_pii=True, redacted_text="Mail me at [EMAIL]", now=102.0)(db)
        raw_pii = add_prompt(TRAIN, "Call 555-0100", has_pii=True, now=103.0)(db)
        c = {p.id: [x.id for x in add_completions(p.id, [sample(i, f"{p.text[:10]} -> reply {i}", version=i % 2) for i in range(5)], now=110.0)(db)]
             for p in (plain, chat, pii, raw_pii)}  # fmt: skip
        task = lease_task(plain.id, "alice", c[plain.id][:4], 600.0, now=120.0)(db)
        add_ranking(plain.id, "alice", [[c[plain.id][2]], [c[plain.id][0], c[plain.id][1]], [c[plain.id][3]]],
                    labeler_group="train", task_id=task.id, now=121.0)(db)  # fmt: skip
        add_ranking(chat.id, "bob", [[c[chat.id][4]], [c[chat.id][0]], [c[chat.id][1]], [c[chat.id][2]], [c[chat.id][3]]],
                    labeler_group="heldout", now=122.0)(db)  # fmt: skip
        add_ranking(pii.id, "alice", [[c[pii.id][0]], [c[pii.id][1]]], labeler_group="train", source="import", now=123.0)(db)
        add_ranking(raw_pii.id, "bob", [[c[raw_pii.id][1]], [c[raw_pii.id][0], c[raw_pii.id][2]]], now=124.0)(db)
        add_demonstration(plain.id, "carol", "Robin, sparrow, owl.", labeler_group="train", now=130.0)(db)
        add_demonstration(chat.id, "carol", "Bonjour !", labeler_group=None, now=131.0)(db)
        add_demonstration(raw_pii.id, "dave", "I cannot call anyone.", labeler_group="heldout", now=132.0)(db)
        return {"plain": [plain.id], "chat": [chat.id], "pii": [pii.id], "raw_pii": [raw_pii.id], **c}

    return store.write_sync(op)


@pytest.fixture
def source(tmp_path: Path):
    with Store(tmp_path / "source.sqlite") as store:
        ids = fill(store)
        yield store, ids


def rows(store: Store, table: str, where: str = "1 = 1", drop: tuple[str, ...] = ()) -> list[dict]:
    """A table's rows sorted by id, without the `drop` columns."""
    found = store.read_sync(lambda db: list(db.query(f"SELECT * FROM {table} WHERE {where} ORDER BY id")))
    return [{k: v for k, v in r.items() if k not in drop} for r in found]


def referenced(store: Store, table: str, kind: str) -> list[dict]:
    """Rows of prompts/completions that the rankings (or demonstrations) refer to."""
    if kind == "rankings":
        ids = {c for r in rows(store, "rankings") for g in json.loads(r["ranking_json"]) for c in g}
        prompt_ids = {r["prompt_id"] for r in rows(store, "rankings")}
    else:
        ids, prompt_ids = set(), {r["prompt_id"] for r in rows(store, "demonstrations")}
    wanted = prompt_ids if table == "prompts" else ids
    return [r for r in rows(store, table) if r["id"] in wanted]


# ------------------------------------------------------------------ round trips


def test_export_then_import_reproduces_the_ranking_rows(source, tmp_path: Path) -> None:
    store, _ = source
    path = tmp_path / "rankings.jsonl"
    assert export_jsonl(store, "rankings", path) == 4
    with Store(tmp_path / "fresh.sqlite") as fresh:
        report = import_jsonl(fresh, "rankings", path)
        assert report.inserted == {"prompts": 4, "completions": 4 + 5 + 2 + 3, "rankings": 4}
        # Leases are queue state, not data: the imported ranking answers no task.
        assert rows(fresh, "rankings", drop=("task_id",)) == rows(store, "rankings", drop=("task_id",))
        assert all(r["task_id"] is None for r in rows(fresh, "rankings"))
        assert rows(fresh, "prompts") == referenced(store, "prompts", "rankings")
        assert rows(fresh, "completions") == referenced(store, "completions", "rankings")
        again = import_jsonl(fresh, "rankings", path)  # a second import is a no-op
        assert not again.inserted and again.already_present["rankings"] == 4


def test_export_then_import_reproduces_the_demonstration_rows(source, tmp_path: Path) -> None:
    store, ids = source
    path = tmp_path / "demos.jsonl"
    assert export_jsonl(store, "demonstrations", path) == 3
    chat_line = [json.loads(line) for line in path.read_text().splitlines()][1]
    assert chat_line["messages"] == [
        {"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And in French?"}, {"role": "assistant", "content": "Bonjour !"}]  # fmt: skip
    with Store(tmp_path / "fresh.sqlite") as fresh:
        import_jsonl(fresh, "demonstrations", path)
        assert rows(fresh, "demonstrations") == rows(store, "demonstrations")
        assert rows(fresh, "prompts") == referenced(store, "prompts", "demonstrations")


def test_a_redacted_export_carries_no_raw_pii(source) -> None:
    store, ids = source
    lines = export_records(store, "rankings", redact_pii=True)
    text = json.dumps(lines)
    assert "jo@example.com" not in text and "555-0100" not in text
    assert "Mail me at [EMAIL]" in text and len(lines) == 3  # the unredacted prompt is left out


def test_split_filter(source) -> None:
    store, ids = source
    assert [r["prompt"]["id"] for r in export_records(store, "rankings", splits=["val"])] == ids["chat"]


# ------------------------------------------------------------------ pairs (TRL)


def test_pairs_export_expands_each_ranking_without_ties_or_raw_pii(source) -> None:
    store, ids = source
    pairs = export_records(store, "pairs")
    assert set(pairs[0]) == {"prompt", "chosen", "rejected"}
    by_prompt: dict[str, list] = {}
    for p in pairs:
        by_prompt.setdefault(p["prompt"], []).append((p["chosen"], p["rejected"]))
    # 2 > {0, 1} > 3: 5 pairs; 5 strict: 10; the redacted PII prompt: 1; raw PII: left out.
    assert {k: len(v) for k, v in by_prompt.items()} == {"Name three birds.": 5, "And in French?": 10, "Mail me at [EMAIL]": 1}
    assert ("Name three -> reply 2", "Name three -> reply 0") in by_prompt["Name three birds."]
    assert ("Name three -> reply 0", "Name three -> reply 1") not in by_prompt["Name three birds."]


def test_pairs_import_as_k2_comparisons(tmp_path: Path) -> None:
    lines = [
        {"prompt": "Is water wet?", "chosen": "Yes, in the everyday sense.", "rejected": "42"},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},  # fmt: skip
        {"prompt": "Is water wet?", "chosen": "Yes, in the everyday sense.", "rejected": "42"},  # a second vote
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with Store(tmp_path / "fresh.sqlite") as store:
        report = import_jsonl(store, "pairs", path, labeler_id="hh", labeler_group="bootstrap")
        assert report.inserted == {"prompts": 2, "completions": 4, "rankings": 3}
        ranked = rows(store, "rankings")
        assert {(r["k"], r["source"], r["labeler_id"], r["labeler_group"]) for r in ranked} == {(2, "import", "hh", "bootstrap")}
        chat = rows(store, "prompts", "text = 'Hi'")[0]
        assert json.loads(chat["messages_json"]) == [{"role": "user", "content": "Hi"}]
        assert not import_jsonl(store, "pairs", path, labeler_id="hh", labeler_group="bootstrap").inserted  # idempotent
        round_trip = export_records(store, "pairs")
        assert sorted(json.dumps(p, sort_keys=True) for p in round_trip) == sorted(
            json.dumps({"prompt": "Hi" if isinstance(l["prompt"], list) else l["prompt"],
                        "chosen": "Hello!" if isinstance(l["chosen"], list) else l["chosen"],
                        "rejected": "Go away." if isinstance(l["rejected"], list) else l["rejected"]}, sort_keys=True)
            for l in lines)  # fmt: skip


def test_a_plain_chat_file_imports_as_demonstrations(tmp_path: Path) -> None:
    line = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Help me."},
                         {"role": "assistant", "content": "Of course."}]}  # fmt: skip
    with Store(tmp_path / "fresh.sqlite") as store:
        import_jsonl(store, "demonstrations", io.StringIO(json.dumps(line) + "\n"), labeler_id="ext")
        (demo,) = rows(store, "demonstrations")
        (prompt,) = rows(store, "prompts")
        assert (demo["response"], demo["labeler_id"], demo["source"]) == ("Of course.", "ext", "import")
        assert prompt["text"] == "Help me." and len(json.loads(prompt["messages_json"])) == 2


# ------------------------------------------------------------------ bad files import nothing


def good_ranking_lines(source_store: Store) -> list[str]:
    return [json.dumps(r) for r in export_records(source_store, "rankings")]


def test_one_bad_line_imports_nothing_and_is_named(source, tmp_path: Path) -> None:
    store, _ = source
    lines = good_ranking_lines(store)
    bad = json.loads(lines[1])
    bad["ranking"] = [sum(bad["ranking"], [])]  # everything tied
    lines[1] = json.dumps(bad)
    with Store(tmp_path / "fresh.sqlite") as fresh:
        with pytest.raises(ImportRejected) as rejected:
            import_jsonl(fresh, "rankings", io.StringIO("\n".join(lines)))
        assert [(b.number, b.reason) for b in rejected.value.bad_lines] == [(2, "all 5 completions are tied: a ranking must prefer at least one")]
        assert "line 2: all 5 completions are tied" in str(rejected.value)
        assert all(not rows(fresh, t) for t in ("prompts", "completions", "rankings"))


def test_every_bad_line_is_reported(source, tmp_path: Path) -> None:
    store, ids = source
    lines = good_ranking_lines(store)
    k10 = json.loads(lines[0])
    k10["completions"] = [dict(k10["completions"][0], id=f"c{i}") for i in range(10)]
    k10["ranking"] = [[f"c{i}"] for i in range(10)]
    no_labeler = json.loads(lines[2])
    del no_labeler["labeler_id"]
    dup = json.loads(lines[3])
    dup["ranking"] = dup["ranking"] + [dup["ranking"][0]]
    text = "\n".join([lines[0], "{not json", json.dumps(k10), "", json.dumps(no_labeler), json.dumps(dup), "[1, 2]"])
    with Store(tmp_path / "fresh.sqlite") as fresh:
        with pytest.raises(ImportRejected) as rejected:
            import_jsonl(fresh, "rankings", io.StringIO(text))
        got = {b.number: b.reason for b in rejected.value.bad_lines}
        assert sorted(got) == [2, 3, 5, 6, 7]  # line 4 is blank, lines 1 is good
        assert got[2].startswith("not valid JSON")
        assert "K = 10 completions; K must be 2..9" in got[3]
        assert got[5] == "missing field 'labeler_id'"
        assert "appears more than once" in got[6]
        assert got[7] == "a line must be a JSON object"
        assert not rows(fresh, "rankings")


def test_a_line_that_contradicts_the_store_imports_nothing(source, tmp_path: Path) -> None:
    """Checks against stored rows run inside the import's one transaction: an id that
    exists with other content fails its line, and the lines before it roll back."""
    store, _ = source
    lines = good_ranking_lines(store)
    with Store(tmp_path / "fresh.sqlite") as fresh:
        import_jsonl(fresh, "rankings", io.StringIO(lines[0]))
        changed = json.loads(lines[0])
        changed["completions"][0]["text"] = "edited"
        with pytest.raises(ImportRejected) as rejected:
            import_jsonl(fresh, "rankings", io.StringIO("\n".join([lines[1], json.dumps(changed)])))
        (bad,) = rejected.value.bad_lines
        assert bad.number == 2 and "already exists with a different text" in bad.reason
        assert len(rows(fresh, "rankings")) == 1  # line 1 was rolled back with the rest


@pytest.mark.parametrize(
    "line, fragment",
    [
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "no preference"),
        ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "field 'chosen' is empty"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string or a list"),
    ],
)
def test_bad_pairs(tmp_path: Path, line: dict, fragment: str) -> None:
    with Store(tmp_path / "fresh.sqlite") as store:
        with pytest.raises(ImportRejected) as rejected:
            import_jsonl(store, "pairs", io.StringIO(json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(line)))
        assert [b.number for b in rejected.value.bad_lines] == [2] and fragment in rejected.value.bad_lines[0].reason
        assert not rows(store, "rankings")


# ------------------------------------------------------------------ the CLI


def rlhf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.cli", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_cli_export_and_import(source, tmp_path: Path) -> None:
    store, _ = source
    out, fresh = tmp_path / "out.jsonl", tmp_path / "fresh.sqlite"
    done = rlhf("export", "--store", str(store.path), "--kind", "rankings", "--out", str(out))
    assert done.returncode == 0 and "exported 4 rankings lines" in done.stderr
    done = rlhf("import", "--store", str(fresh), "--kind", "rankings", str(out))
    assert done.returncode == 0 and "wrote 14 completions, 4 prompts, 4 rankings" in done.stderr, done.stderr
    out.write_text(out.read_text() + "{broken\n")
    done = rlhf("import", "--store", str(tmp_path / "other.sqlite"), "--kind", "rankings", str(out))
    assert done.returncode == 1 and "line 5: not valid JSON" in done.stderr and "nothing imported" in done.stderr
