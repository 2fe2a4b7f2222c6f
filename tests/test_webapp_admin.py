"""The admin pages over HTTP (httpx), against a real server on the tiny model, its real
store and the app served by uvicorn: the cycles page (no cycle yet, then cycles recorded
through the store's own ops and Admin.TriggerCycle), and the policies page with swap and
rollback behind a confirmation page, checked against what serves (Inference.GetModel)
and the store's policies and audit rows. Reading the figures and the charts' geometry
are tested alone first."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from clients.client import RlhfClient
from common.store import claim_queued_cycle, create_cycle, update_cycle
from rlhf.v1 import admin_pb2
from server_harness import corrupt_weights, publish, tiny_model
from web_harness import WebStack
from webapp.admin_views import cell, cycle_columns, cycles_view, figure, read_metrics
from webapp.plots import line_chart, nice_step, tick_label

# ---------------------------------------------------------------- pure parts


def test_figures_are_read_defensively() -> None:
    m = read_metrics('{"rm": {"rm": {"val": {"accuracy": 0.7, "by_group": {"A": {"accuracy": "n/a"}}}}}, "gate": 3}')
    assert figure(m, ("rm", "rm", "val", "accuracy")) == 0.7
    assert figure(m, ("rm", "rm", "val", "by_group", "A", "accuracy")) is None  # not a number
    assert figure(m, ("rm", "judge", "val", "accuracy")) is None  # missing
    assert figure(m, ("gate", "promote")) is None  # a step that is not an object
    assert figure({"x": True}, ("x",)) is None and figure({"x": float("nan")}, ("x",)) is None
    assert read_metrics("not json") == {} and read_metrics("[1, 2]") == {} and read_metrics("") == {}
    # the demo's _cell: 3 decimals, 4 below 0.01, none from 100, ints as they are
    assert [cell(v) for v in (None, 0.71234, 0.00512, 0.0, 123.4, 120)] == ["—", "0.712", "0.0051", "0.000", "123",
                                                                         "120"]


def test_the_cycle_table_has_the_demos_columns_and_one_rm_accuracy_per_group() -> None:
    names = [c.name for c in cycle_columns(["A", "B"])]
    assert names[:4] == ["rm_pairs", "rm_acc", "rm_acc_A", "rm_acc_B"]
    assert {"judge_acc", "gate_win", "rm_score", "kl", "ptx", "ptx_reg", "words", "stall"} <= set(names)
    metrics = {"rm": {"rm": {"val": {"by_group": {"B": {"accuracy": 0.8}}}}}, "snapshot": {"seconds": 1.5},
               "custom": {"seconds": 2}}
    cycle = admin_pb2.Cycle(cycle_id=4, state=admin_pb2.CYCLE_STATE_SKIPPED, trigger="schedule", base_version=-1,
                            metrics_json=json.dumps(metrics))
    view = cycles_view([cycle])
    (row,) = view["rows"]
    assert [c.name for c in view["columns"]][2] == "rm_acc_B" and row["figures"][2] == "0.800"
    assert row["figures"][0] == "—" and row["base"] == "—" and row["seconds"] == "—"
    assert view["stages"] == ["snapshot", "custom"] and row["stage_seconds"] == ["1.500", "2"]


def test_a_chart_maps_figures_to_pixels() -> None:
    # The plot area is x 56..348, y 30..204 (px). y_floor 0..1 and step 0.2: y 0.5 -> 204 - 0.5 * 174 = 117,
    # y 1.0 -> 30. x from cycle 1 to 3: cycle 1 -> 56, cycle 2 -> 56 + 292 / 2 = 202, cycle 3 -> 348.
    # Cycle 2 has no figure: left out of the line.
    chart = line_chart("gate", "cycle", "win rate", [1, 2, 3], {"judge": [0.5, None, 1.0], "rm": [None, None, None]},
                       y_floor=(0.0, 1.0), guides={"even": 0.5})  # fmt: skip
    judge, rm = chart.lines
    assert judge.points == "56.0,117.0 348.0,30.0" and [m.title for m in judge.markers] == [
        "judge, cycle 1: 0.5", "judge, cycle 3: 1"]
    assert rm.points == "" and rm.markers == [] and not chart.empty
    assert [t.label for t in chart.y_ticks] == ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert [(t.at, t.label) for t in chart.x_ticks] == [(56.0, "1"), (202.0, "2"), (348.0, "3")]
    assert chart.guides[0].y == 117.0
    assert (nice_step(0.7), nice_step(37), tick_label(0.35, 0.05), tick_label(-0.0, 0.2)) == (0.2, 10, "0.35", "0")


# ---------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebStack]:
    """v0 serves (the tiny model); v1 (the seed-1 tiny model) is a published candidate, v2
    a candidate whose weights were corrupted after publishing."""
    with WebStack.start(tmp_path_factory.mktemp("web-admin"), tiny_model_dir) as stack:
        root = stack.server.config.checkpoints_root
        publish(root, stack.store_path, 1, tiny_model(1))
        corrupt_weights(publish(root, stack.store_path, 2, tiny_model_dir))
        yield stack


def sign_in(stack: WebStack, who: str) -> httpx.Client:
    client = httpx.Client(base_url=stack.url, follow_redirects=False, timeout=120)
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)  # type: ignore[union-attr]
    assert client.post("/login", data={"csrf": token, "api_key": stack.keys[who]}).status_code == 303
    return client


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]


def form_after(page: str, marker: str) -> dict[str, str]:
    """The hidden fields of the form that holds `marker` (a button id)."""
    end = page.index(marker)
    start = page.rindex("<form", 0, end)
    return dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', page[start:end]))


def admin_client(stack: WebStack) -> RlhfClient:
    return RlhfClient(stack.server.target, stack.keys["ops"])


def serving(stack: WebStack) -> int:
    """The version the engine serves (GetModel), checked against the store's policies table."""
    with admin_client(stack) as client:
        version = client.get_model().policy_version
    assert stack.rows("SELECT version FROM policies WHERE status = 'serving'") == [{"version": version}]
    return version


def serve(stack: WebStack, version: int) -> None:
    with admin_client(stack) as client:
        client.swap_policy(version, request_id=f"test-{uuid.uuid4()}")


def swaps(stack: WebStack) -> list[dict]:
    """The swaps (and rollbacks) the audit recorded as done."""
    rows = stack.rows("SELECT action, detail_json FROM audit WHERE action IN ('admin.SwapPolicy', 'admin.Rollback') "
                      "ORDER BY id")  # fmt: skip
    return [{"action": r["action"], **json.loads(r["detail_json"])} for r in rows
            if json.loads(r["detail_json"])["outcome"] == "OK"]  # fmt: skip


ADMIN_PAGES = ("/admin/cycles", "/admin/cycles/1", "/admin/policies")
ADMIN_FORMS = ("/admin/policies/swap", "/admin/policies/swap/confirm", "/admin/policies/rollback",
               "/admin/policies/rollback/confirm")  # fmt: skip


def test_the_admin_pages_and_forms_are_for_admins(stack: WebStack) -> None:
    before, done = serving(stack), swaps(stack)
    labeler = sign_in(stack, "ana")
    token = csrf_of(labeler.get("/label").text)
    for path in ADMIN_PAGES:
        refused = labeler.get(path)
        assert refused.status_code == 403 and "The admin page is for admin keys" in refused.text, path
        assert "signed in as ana with the labeler role" in refused.text
    for path in ADMIN_FORMS:
        refused = labeler.post(path, data={"csrf": token, "request_id": str(uuid.uuid4()), "version": "1"})
        assert refused.status_code == 403 and "Admins only" in refused.text, path
    for path in ADMIN_PAGES:
        assert httpx.get(f"{stack.url}{path}").headers["location"] == "/login?reason=signin"
    for path in ADMIN_FORMS:
        assert httpx.post(f"{stack.url}{path}", data={"version": "1"}).status_code == 401
    assert 'href="/admin/policies"' not in labeler.get("/label").text  # a labeler's header has no admin links
    assert serving(stack) == before and swaps(stack) == done


def test_the_cycles_page_says_no_cycle_yet_then_shows_the_cycles(stack: WebStack) -> None:
    admin = sign_in(stack, "ops")
    empty = admin.get("/admin/cycles")
    assert empty.status_code == 200 and "No cycle yet" in empty.text and "<svg" not in empty.text
    assert '<a href="/admin/cycles" aria-current="page">Cycles</a>' in empty.text
    store = stack.server.store
    assert store is not None
    promoted = store.write_sync(create_cycle("schedule", "nightly", base_version=0))
    store.write_sync(claim_queued_cycle())
    store.write_sync(update_cycle(promoted.id, stage="swap", candidate_version=1, stage_metrics={
        "snapshot": {"seconds": 1.25, "prompts": 40},
        "rm": {"seconds": 30.5, "rm": {"num_train_pairs": 120, "val": {"accuracy": 0.7, "by_group": {
            "A": {"accuracy": 0.72}, "<b>G</b>": {"accuracy": 0.61}}}}, "judge": {"val": {"accuracy": 0.66}}},
        "evaluate": {"seconds": 12.0, "judge_win_rate": 0.65, "rm_win_rate": 0.7, "kl_to_sft": 0.0123,
                     "ptx_nll_candidate": 3.25, "ptx_regression": 0.004, "mean_words_candidate": 21.5},
        "swap": {"seconds": 0.5, "stall_seconds": 0.321}}))  # fmt: skip
    store.write_sync(update_cycle(promoted.id, state="promoted"))
    rejected = store.write_sync(create_cycle("cli", base_version=0))
    store.write_sync(claim_queued_cycle())
    store.write_sync(update_cycle(rejected.id, stage="gate", stage_metrics={
        "rm": {"rm": {"val": {"accuracy": "n/a"}}}, "evaluate": {"judge_win_rate": 0.4}}))  # fmt: skip
    store.write_sync(update_cycle(rejected.id, state="rejected", error="<script>alert(1)</script> win_rate failed"))
    with admin_client(stack) as client:
        queued = client.trigger_cycle("from the test", request_id="test-trigger").cycle_id

    page = admin.get("/admin/cycles")
    assert page.status_code == 200, page.text
    table = page.text[page.text.index('id="cycles"'):page.text.index("</table>", page.text.index('id="cycles"'))]
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", table)
    rows = re.findall(r'<tr class="state-(\w+)"><td><a href="/admin/cycles/(\d+)">\d+</a></td>(.*?)</tr>', table)
    assert [(state, int(cid)) for state, cid, _ in rows] == [("queued", queued), ("rejected", rejected.id),
                                                             ("promoted", promoted.id)]  # newest first
    cells = {int(cid): dict(zip(headers[1:], re.findall(r"<td[^>]*>([^<]*)</td>", body))) for _, cid, body in rows}
    assert headers[9:13] == ["rm_pairs", "rm_acc", "rm_acc_&lt;b&gt;G&lt;/b&gt;", "rm_acc_A"]  # the groups, escaped
    first = cells[promoted.id]
    assert (first["trigger"], first["base"], first["candidate"]) == ("schedule", "v0", "v1")
    assert (first["rm_pairs"], first["rm_acc"], first["rm_acc_A"], first["judge_acc"]) == ("120", "0.700", "0.720",
                                                                                             "0.660")  # fmt: skip
    assert (first["gate_win"], first["kl"], first["ptx"], first["ptx_reg"], first["stall"]) == (
        "0.650", "0.012", "3.250", "0.0040", "0.321")
    assert first["p_gate"] == "—" and first["rm_score"] == "—"  # not recorded: a dash
    second = cells[rejected.id]
    assert (second["rm_acc"], second["gate_win"], second["rm_pairs"]) == ("—", "0.400", "—")  # "n/a" is no figure
    assert set(cells[queued].values()) >= {"—"} and cells[queued]["trigger"] == "admin"
    assert "&lt;script&gt;alert(1)&lt;/script&gt; win_rate failed" in page.text and "<script>alert" not in page.text
    # The charts: inline SVG, a line through the two gate verdicts, each figure titled.
    assert page.text.count("<svg") == 3 and "<polyline" in page.text
    assert "<title>judge (the gate), cycle " in page.text and f"cycle {promoted.id}: 0.65</title>" in page.text
    assert "PPO&#39;s RM, group &lt;b&gt;G&lt;/b&gt;" in page.text
    stage_table = page.text[page.text.index('id="stage-seconds"'):]
    assert re.findall(r"<th>(\w+)</th>", stage_table)[:5] == ["cycle", "snapshot", "rm", "evaluate", "swap"]

    detail = admin.get(f"/admin/cycles/{promoted.id}")
    assert detail.status_code == 200 and f"Cycle {promoted.id}: promoted" in detail.text
    assert '&#34;num_train_pairs&#34;: 120' in detail.text and 'id="stage-evaluate"' in detail.text
    rejected_page = admin.get(f"/admin/cycles/{rejected.id}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rejected_page and "<script>alert" not in rejected_page
    missing = admin.get("/admin/cycles/99999")
    assert missing.status_code == 404 and "The server has no cycle 99999." in missing.text


def test_a_forged_csrf_token_or_a_get_swaps_nothing(stack: WebStack) -> None:
    serve(stack, 0)
    done = swaps(stack)
    admin = sign_in(stack, "ops")
    page = admin.get("/admin/policies").text
    fields = form_after(page, 'id="swap-1"')
    assert fields["version"] == "1" and uuid.UUID(fields["request_id"])
    for path in ("/admin/policies/swap", "/admin/policies/swap/confirm"):
        forged = admin.post(path, data={**fields, "csrf": "forged"})
        assert forged.status_code == 403 and "security token is missing or does not match" in forged.text
        missing = admin.post(path, data={k: v for k, v in fields.items() if k != "csrf"})
        assert missing.status_code == 403
    forged_rollback = admin.post("/admin/policies/rollback/confirm", data={**fields, "csrf": "forged"})
    assert forged_rollback.status_code == 403
    for path in ADMIN_FORMS:  # a GET never swaps: the forms' routes take POST only
        assert admin.get(path, params=fields).status_code == 405
    question = admin.post("/admin/policies/swap", data=fields)  # the question alone changes nothing either
    assert question.status_code == 200 and "Swap the served policy from v0 to v1?" in question.text
    assert serving(stack) == 0 and swaps(stack) == done


def test_a_confirmed_swap_serves_the_candidate_once_even_when_replayed(stack: WebStack) -> None:
    serve(stack, 0)
    done = swaps(stack)
    admin = sign_in(stack, "ops")
    page = admin.get("/admin/policies").text
    assert re.search(r'id="serving-now">Serving now: <strong>v0</strong>', page)
    assert re.search(r'<tr class="status-candidate" id="policy-1"><td>v1</td><td>candidate</td><td>v0</td>', page)
    fields = form_after(page, 'id="swap-1"')
    question = admin.post("/admin/policies/swap", data=fields)
    assert question.status_code == 200 and "Swap the served policy from v0 to v1?" in question.text
    assert "In-flight requests are not cut off" in question.text and "v0 keeps serving" in question.text
    confirm = form_after(question.text, 'id="confirm"')
    assert confirm == fields  # the confirmation carries the same request id: one swap however often it is sent
    assert serving(stack) == 0
    answer = admin.post("/admin/policies/swap/confirm", data=confirm)
    assert answer.status_code == 200, answer.text
    assert "Now serving <strong>v1</strong> (was v0)." in answer.text
    for name in ("stall", "total", "swap mode", "continued requests"):
        assert f"<th>{name}</th>" in answer.text
    assert re.search(r"<th>stall</th><td class=\"num\">\d+\.\d{3} s</td>", answer.text)
    assert serving(stack) == 1
    replay = admin.post("/admin/policies/swap/confirm", data=confirm)
    assert replay.status_code == 200 and "Now serving <strong>v1</strong> (was v0)." in replay.text
    new = swaps(stack)[len(done):]
    assert [(s["action"], s["version"], s["request_id"]) for s in new] == [
        ("admin.SwapPolicy", 1, f"{fields['request_id']}/swap")]  # one swap, though confirmed twice
    after = admin.get("/admin/policies").text
    assert "Serving now: <strong>v1</strong>" in after and "served before: v0" in after


def test_rollback_goes_back_to_the_version_served_before(stack: WebStack) -> None:
    serve(stack, 0)
    serve(stack, 1)  # v0 served last before v1
    admin = sign_in(stack, "ops")
    fields = form_after(admin.get("/admin/policies").text, 'id="rollback"')
    question = admin.post("/admin/policies/rollback", data=fields)
    assert question.status_code == 200
    assert "Roll back from v1 to v0?" in question.text
    assert serving(stack) == 1
    answer = admin.post("/admin/policies/rollback/confirm", data=form_after(question.text, 'id="confirm"'))
    assert answer.status_code == 200 and "Now serving <strong>v0</strong> (was v1)." in answer.text
    assert serving(stack) == 0
    assert swaps(stack)[-1]["action"] == "admin.Rollback"


def test_a_corrupt_checkpoint_is_refused_in_words_and_the_old_version_keeps_serving(stack: WebStack) -> None:
    before = serving(stack)
    done = swaps(stack)
    admin = sign_in(stack, "ops")
    question = admin.post("/admin/policies/swap", data=form_after(admin.get("/admin/policies").text, 'id="swap-2"'))
    assert f"Swap the served policy from v{before} to v2?" in question.text
    answer = admin.post("/admin/policies/swap/confirm", data=form_after(question.text, 'id="confirm"'))
    assert answer.status_code == 409, answer.text
    assert "Swap refused" in answer.text and "checkpoint of policy v2 failed verification" in answer.text
    assert f"Nothing changed: v{before} keeps serving." in answer.text
    assert serving(stack) == before and swaps(stack) == done
    assert stack.rows("SELECT status FROM policies WHERE version = 2") == [{"status": "rejected"}]
    assert '<tr class="status-rejected" id="policy-2">' in admin.get("/admin/policies").text
