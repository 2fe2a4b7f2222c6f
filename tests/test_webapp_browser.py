"""The labeling web app in a real headless Chromium (Debian's, driven by Playwright), against
a real server on the tiny model: sign in, rank by keyboard with a tie, rank by drag and
drop, rate with flags, skip, mark all bad, write a demonstration, sign out. Each test
checks the rows the store holds, and that the same form posted again stores nothing new.
Then the admin pages: the cycles page and its charts, and a policy swap confirmed in
the browser. The run writes the screenshots docs/img/web-label.png, web-admin.png,
web-cycles.png and web-policies.png."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from web_harness import WebStack

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "img"

try:
    from playwright.sync_api import Browser, Page, sync_playwright

    PLAYWRIGHT_MISSING = None
except ImportError as err:  # pragma: no cover - depends on the machine
    PLAYWRIGHT_MISSING = f"playwright is not installed ({err}): pip install playwright"

SKIP_REASON = PLAYWRIGHT_MISSING or (None if CHROMIUM.exists() else
                                     "/usr/bin/chromium is missing: apt-get install -y --no-install-recommends chromium")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]

# Readable answers for the page the screenshot shows (the tiny model's own are noise).
EGG_PROMPT = "How do I boil an egg so the yolk stays soft?"
EGG_ANSWERS = [
    "Bring water to a boil, lower the egg in with a spoon and cook it for 6 minutes.\n"
    "Then cool it in cold water for a minute so it stops cooking, and peel it.",
    "Boil the egg for 12 minutes.",
    "Put the egg in cold water, bring it to a boil, then turn off the heat and wait 4 minutes.",
    "Eggs are a good source of protein. Chickens lay about 300 eggs a year.",
]


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebStack]:
    with WebStack.start(tmp_path_factory.mktemp("web-browser"), tiny_model_dir) as stack:
        yield stack


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, stack: WebStack) -> Iterator[Page]:
    """A fresh browser context (no cookies) on an empty queue; any JS dialog fails the test."""
    stack.retire_all()
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    yield page
    context.close()
    assert dialogs == [], f"a script ran: {dialogs}"


def sign_in(page: Page, stack: WebStack, who: str = "ana") -> None:
    page.goto(f"{stack.url}/login")
    page.fill("#api-key", stack.keys[who])
    page.click("#sign-in")
    page.wait_for_url(f"{stack.url}/label")


def completion_ids(page: Page) -> list[str]:
    """The completion ids of responses 1..K (the page's numbering)."""
    k = page.locator(".completion").count()
    return [page.locator(f"#response-{n}").get_attribute("data-completion-id") for n in range(1, k + 1)]  # type: ignore[misc]


def submit_and_replay(page: Page, stack: WebStack, act: Callable[[], Any]) -> tuple[str, dict[str, int]]:
    """Do `act` (it submits the form), wait for the next page, then post the very same form
    body again: it must answer 303 and store nothing new. The task id and the counts."""
    task_id = page.locator("input[name=task_id]").input_value()
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/label")) as posted:
        with page.expect_navigation(wait_until="load"):  # POST, 303, then the next task's page
            act()
    body = posted.value.post_data
    assert body
    counts = stack.counts()
    replay = page.request.post(f"{stack.url}/label", data=body, max_redirects=0,
                               headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert replay.status == 303, replay.text()
    assert stack.counts() == counts
    return task_id, counts


def test_rank_four_completions_by_keyboard_with_a_tie(page: Page, stack: WebStack) -> None:
    stack.prompt_with_completions(EGG_PROMPT, EGG_ANSWERS)
    sign_in(page, stack)
    assert page.locator("#prompt-text").inner_text() == EGG_PROMPT
    ids = completion_ids(page)
    page.focus("#response-1")
    for digit in "1223":  # responses 2 and 3 tie
        page.keyboard.press(digit)
    assert [page.input_value(f"#rank-{n}") for n in range(1, 5)] == ["1", "2", "2", "3"]
    assert page.evaluate("document.activeElement.id") == "submit-ranking"  # focus moved on past the last
    page.focus("#response-4")  # Enter on a card submits
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")  # the sticky guidelines panel at the top of the shot
    page.screenshot(path=str(SCREENSHOTS / "web-label.png"), full_page=True)
    before = stack.counts()
    task_id, after = submit_and_replay(page, stack, lambda: page.keyboard.press("Enter"))
    assert "Saved your ranking of 4 responses (5 comparisons)" in page.content()
    assert stack.ranking_of(task_id) == [[ids[0]], [ids[1], ids[2]], [ids[3]]]
    assert stack.task(task_id)["status"] == "submitted"
    assert after["rankings"] == before["rankings"] + 1 and after["closed_tasks"] == before["closed_tasks"] + 1


def test_rank_by_drag_and_drop(page: Page, stack: WebStack) -> None:
    stack.waiting_prompt("Name three rivers.")
    sign_in(page, stack)
    ids = completion_ids(page)
    page.locator("#response-4").drag_to(page.locator("#response-1"))  # 4 goes on top: 4, 1, 2, 3
    order = page.locator(".completion").evaluate_all("cards => cards.map(c => c.dataset.number)")
    assert order == ["4", "1", "2", "3"]
    assert [page.input_value(f"#rank-{n}") for n in (4, 1, 2, 3)] == ["1", "2", "3", "4"]
    page.locator("#response-1").drag_to(page.locator("#response-3"))  # down: 4, 2, 3, 1
    assert [page.input_value(f"#rank-{n}") for n in (4, 2, 3, 1)] == ["1", "2", "3", "4"]
    task_id, _ = submit_and_replay(page, stack, lambda: page.click("#submit-ranking"))
    assert stack.ranking_of(task_id) == [[ids[3]], [ids[1]], [ids[2]], [ids[0]]]


def test_rate_with_flags(page: Page, stack: WebStack) -> None:
    stack.waiting_prompt("Is the moon made of cheese?")
    sign_in(page, stack)
    ids = completion_ids(page)
    for n, rank in zip(range(1, 5), "2143"):
        page.fill(f"#rank-{n}", rank)
    page.click("#rating-1 summary")
    page.select_option("#overall-1", "6")
    page.check("#flag-1-hallucination")
    page.check("#flag-1-expresses_opinion")
    page.click("#rating-3 summary")
    page.select_option("#overall-3", "2")
    page.check("#flag-3-fails_to_follow_instruction")
    before = stack.counts()
    task_id, after = submit_and_replay(page, stack, lambda: page.click("#submit-ranking"))
    assert stack.ranking_of(task_id) == [[ids[1]], [ids[0]], [ids[3]], [ids[2]]]
    rows = {r["completion_id"]: r for r in stack.rows(
        "SELECT completion_id, overall, flags_json, labeler_group FROM ratings WHERE completion_id IN (?, ?, ?, ?)", ids)}
    assert set(rows) == {ids[0], ids[2]} and after["ratings"] == before["ratings"] + 2
    on = {cid: {name for name, value in json.loads(r["flags_json"]).items() if value} for cid, r in rows.items()}
    assert (rows[ids[0]]["overall"], on[ids[0]]) == (6, {"hallucination", "expresses_opinion"})
    assert (rows[ids[2]]["overall"], on[ids[2]]) == (2, {"fails_to_follow_instruction"})
    assert rows[ids[0]]["labeler_group"] == "A"


def test_skip(page: Page, stack: WebStack) -> None:
    stack.waiting_prompt("Translate 'hello' into Klingon.")
    sign_in(page, stack)
    page.fill("#demonstration", "not sent with a skip")
    before = stack.counts()
    task_id, after = submit_and_replay(page, stack, lambda: page.click("#skip"))
    assert "Skipped: you will not be given that prompt again." in page.content()
    task = stack.task(task_id)
    assert (task["status"], task["decline_reason"]) == ("declined", "skipped")
    assert after == {**before, "closed_tasks": before["closed_tasks"] + 1}  # no ranking, demonstration or rating


def test_mark_all_bad_with_a_demonstration(page: Page, stack: WebStack) -> None:
    prompt_id = stack.waiting_prompt("Write a haiku about rain.")
    sign_in(page, stack)
    haiku = "Soft rain on the roof\nthe gutters hum their one note\nthe street shines again"
    page.fill("#demonstration", haiku)
    page.fill("#comment", "none is a haiku")
    before = stack.counts()
    task_id, after = submit_and_replay(page, stack, lambda: page.click("#none-acceptable"))
    assert "Saved: none of the responses is acceptable, with your demonstration." in page.content()
    task = stack.task(task_id)
    assert (task["status"], task["decline_reason"], task["decline_comment"]) == ("declined", "none_acceptable",
                                                                                 "none is a haiku")  # fmt: skip
    assert stack.rows("SELECT id FROM rankings WHERE task_id = ?", [task_id]) == []  # not a ranking: the RM never sees it
    (demo,) = stack.rows("SELECT response, labeler_id FROM demonstrations WHERE prompt_id = ?", [prompt_id])
    assert demo == {"response": haiku, "labeler_id": "ana"}
    assert after == {**before, "demonstrations": before["demonstrations"] + 1, "closed_tasks": before["closed_tasks"] + 1}


def test_write_a_demonstration(page: Page, stack: WebStack) -> None:
    prompt_id = stack.waiting_prompt("What is 2 + 2?")
    sign_in(page, stack)
    for n in range(1, 5):
        page.fill(f"#rank-{n}", str(n))
    page.fill("#demonstration", "2 + 2 = 4.")
    task_id, _ = submit_and_replay(page, stack, lambda: page.click("#submit-ranking"))
    assert stack.task(task_id)["status"] == "submitted"
    (demo,) = stack.rows("SELECT response, labeler_group FROM demonstrations WHERE prompt_id = ?", [prompt_id])
    assert demo == {"response": "2 + 2 = 4.", "labeler_group": "A"}
    assert "Saved your ranking of 4 responses (6 comparisons), with your demonstration." in page.content()


def test_html_in_a_prompt_or_completion_never_runs(page: Page, stack: WebStack) -> None:
    script = "<script>alert('prompt')</script><img src=x onerror=\"alert('img')\">"
    long = "\n".join(f"line {n} of a long answer" for n in range(40))
    stack.prompt_with_completions(f"Hi {script}", [f"{i} {script}" for i in range(3)] + [long])
    response = None

    def keep(r: Any) -> None:
        nonlocal response
        if r.url.endswith("/label") and r.request.method == "GET":
            response = r

    page.on("response", keep)
    sign_in(page, stack)
    assert page.locator("#prompt-text").inner_text() == f"Hi {script}"
    assert page.locator("#text-2").inner_text() == f"1 {script}"
    assert page.locator("#completions img, #prompt-text img, #completions script").count() == 0
    # The long answer starts collapsed; its toggle shows it all.
    assert page.locator(".toggle").count() == 1 and "collapsed" in page.get_attribute("#text-4", "class")  # type: ignore[operator]
    collapsed_height = page.locator("#text-4").bounding_box()["height"]  # type: ignore[index]
    page.click("#response-4 .toggle")
    assert "collapsed" not in page.get_attribute("#text-4", "class")  # type: ignore[operator]
    assert page.locator("#text-4").bounding_box()["height"] > 2 * collapsed_height  # type: ignore[index]
    assert response is not None and "default-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_timeout(300)  # the page fixture fails the test on any dialog


def test_sign_out(page: Page, stack: WebStack) -> None:
    stack.waiting_prompt()
    sign_in(page, stack)
    task_id = page.locator("input[name=task_id]").input_value()
    before = stack.counts()
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/logout")) as posted:
        page.click("#sign-out")
    page.wait_for_url(f"{stack.url}/login?reason=signed_out")
    assert "You are signed out." in page.content()
    assert not [c for c in page.context.cookies() if c["name"] == "rlhf_session"]
    page.goto(f"{stack.url}/label")
    assert page.url.startswith(f"{stack.url}/login")
    replay = page.request.post(f"{stack.url}/logout", data=posted.value.post_data, max_redirects=0,
                               headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert replay.status == 401
    assert stack.counts() == before and stack.task(task_id)["status"] == "leased"


def shared_work(stack: WebStack) -> None:
    """Ben (group B) ranks the completion sets ana ranked, the first as she did and the
    others in reverse; the operator sets ana's first ranking as that prompt's gold one."""
    from clients.client import RlhfClient
    from rlhf.v1 import admin_pb2, feedback_pb2

    rankings = stack.rows("SELECT prompt_id, ranking_json FROM rankings WHERE labeler_id = 'ana' ORDER BY created_at")
    groups = lambda ranking: [feedback_pb2.RankGroup(completion_ids=g) for g in ranking]  # noqa: E731
    with RlhfClient(stack.server.target, stack.keys["ben"]) as ben, RlhfClient(stack.server.target, stack.keys["ops"]) as ops:
        for i, row in enumerate(rankings):
            ranking = json.loads(row["ranking_json"])
            ben.feedback.SubmitRanking(feedback_pb2.SubmitRankingRequest(
                request_id=f"shared-{i}", prompt_id=row["prompt_id"], ranking=groups(ranking if i == 0 else ranking[::-1])),
                metadata=ben.metadata, timeout=30)  # fmt: skip
        first = rankings[0]
        stack.server.store.write_sync(lambda db: db.execute(  # type: ignore[union-attr]
            "UPDATE prompts SET split = 'train' WHERE id = ?", [first["prompt_id"]]))  # retired by the fixture
        ops.admin.SetGoldRanking(admin_pb2.SetGoldRankingRequest(
            request_id="gold-0", prompt_id=first["prompt_id"], ranking=groups(json.loads(first["ranking_json"]))),
            metadata=ops.metadata, timeout=30)  # fmt: skip


def test_admin_page(page: Page, stack: WebStack) -> None:
    shared_work(stack)
    sign_in(page, stack, "ops")
    page.goto(f"{stack.url}/admin")
    assert page.locator("#labelers tbody tr").filter(has_text="ana").count() == 1
    assert page.locator("#labelers tbody tr").filter(has_text="ben").count() == 1
    assert "72.6 ± 1.5%" in page.locator("#groups").inner_text()
    ratings = page.locator("#ratings").inner_text()
    assert "v0" in ratings and "hallucination" in ratings
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "web-admin.png"), full_page=True)


def cycle_metrics(n: int, win: float, acc_a: float, acc_b: float, kl: float, promoted: bool) -> dict[str, Any]:
    """The per-stage metrics a trainer records for cycle n (the test's figures)."""
    rm = {"num_train_pairs": 2000 + 1000 * n, "val": {"accuracy": (acc_a + acc_b) / 2,
                                                      "by_group": {"A": {"accuracy": acc_a}, "B": {"accuracy": acc_b}}}}
    evaluate = {"seconds": 60.0, "judge_win_rate": win, "rm_win_rate": win + 0.05, "kl_to_sft": kl,
                "ptx_nll_candidate": 3.1 + kl, "ptx_regression": kl / 2, "mean_words_candidate": 24.0 - 2 * n}
    metrics = {"snapshot": {"seconds": 1.2}, "hygiene": {"seconds": 0.4}, "sft": {"seconds": 95.0 - 40 * n},
               "rm": {"seconds": 180.0, "rm": rm, "judge": {"val": {"accuracy": acc_a - 0.02}}},
               "ppo": {"seconds": 240.0}, "evaluate": evaluate}
    return {**metrics, "swap": {"seconds": 0.8, "stall_seconds": 0.35}} if promoted else metrics


def record_cycles(stack: WebStack) -> None:
    """Three finished cycles, written through the store's own ops (as the trainer writes them)."""
    from common.store import claim_queued_cycle, create_cycle, update_cycle

    store = stack.server.store
    assert store is not None
    for n, (win, acc_a, acc_b, kl) in enumerate([(0.62, 0.64, 0.61, 0.011), (0.47, 0.69, 0.66, 0.019),
                                                 (0.71, 0.73, 0.70, 0.024)]):  # fmt: skip
        promoted = win >= 0.55
        cycle = store.write_sync(create_cycle("schedule", base_version=0))
        store.write_sync(claim_queued_cycle())
        store.write_sync(update_cycle(cycle.id, stage="swap" if promoted else "gate",
                                      candidate_version=n + 1 if promoted else None,
                                      stage_metrics=cycle_metrics(n, win, acc_a, acc_b, kl, promoted)))  # fmt: skip
        store.write_sync(update_cycle(cycle.id, state="promoted" if promoted else "rejected",
                                      error=None if promoted else f"win_rate {win} >= 0.55 failed"))  # fmt: skip


def test_cycles_page(page: Page, stack: WebStack) -> None:
    record_cycles(stack)
    sign_in(page, stack, "ops")
    page.click("header nav >> text=Cycles")
    page.wait_for_url(f"{stack.url}/admin/cycles")
    assert page.locator("#cycles tbody tr[class^=state-]").count() == 3
    for n in (1, 2, 3):  # drawn: each chart has its line
        box = page.locator(f"#chart-{n} svg").bounding_box()
        assert box is not None and box["width"] > 200 and page.locator(f"#chart-{n} polyline").count() >= 1
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "web-cycles.png"), full_page=True)


def test_swap_a_policy(page: Page, stack: WebStack) -> None:
    from server_harness import publish, tiny_model

    publish(stack.server.config.checkpoints_root, stack.store_path, 1, tiny_model(1))
    sign_in(page, stack, "ops")
    page.click("header nav >> text=Policies")
    page.wait_for_url(f"{stack.url}/admin/policies")
    assert page.locator("#serving-now").inner_text().startswith("Serving now: v0")
    page.click("#swap-1")
    page.wait_for_url(f"{stack.url}/admin/policies/swap")
    assert page.locator("#question").inner_text() == "Swap the served policy from v0 to v1?"
    assert stack.rows("SELECT version FROM policies WHERE status = 'serving'") == [{"version": 0}]
    page.click("#confirm")
    page.wait_for_url(f"{stack.url}/admin/policies/swap/confirm")
    assert page.locator("#outcome").inner_text() == "Now serving v1 (was v0)."
    assert stack.rows("SELECT version FROM policies WHERE status = 'serving'") == [{"version": 1}]
    page.click("#back")
    page.wait_for_url(f"{stack.url}/admin/policies")
    assert page.locator("#serving-now").inner_text().startswith("Serving now: v1 · served before: v0")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "web-policies.png"), full_page=True)
