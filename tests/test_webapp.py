"""The labeling web app over HTTP (httpx), against a real server on the tiny model: sign-in,
sessions and CSRF, a submission stored once, and bad input refused in words with nothing
stored. The form parsing, sessions and error wording are tested alone first."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from rlhf.v1 import admin_pb2
from web_harness import WebStack, WebThread, form_fields
from webapp.config import WebConfig
from webapp.forms import FormProblem, parse_ranking, parse_ratings
from webapp.problems import explain
from webapp.sessions import LoginTokens, SessionStore
from webapp.views import DASH, group_row

# ---------------------------------------------------------------- pure parts


def test_ranks_become_best_first_groups_with_ties_and_gaps() -> None:
    ids = ["a", "b", "c", "d"]
    # ranks a=2, b=1, c=2, d=4: b first, a and c tied, then d (the gap at 3 is allowed)
    assert parse_ranking({"a": "2", "b": "1", "c": " 2 ", "d": "4"}, ids) == [["b"], ["a", "c"], ["d"]]
    assert parse_ranking({"a": "1", "b": "2", "c": "3", "d": "4"}, ids) == [["a"], ["b"], ["c"], ["d"]]


@pytest.mark.parametrize(("ranks", "problem"), [
    ({"a": "1", "b": "2", "c": "3"}, "response 4 has no rank"),
    ({"a": "1", "b": "2", "c": "3", "d": "5"}, "response 4's rank 5 is outside 1..4"),
    ({"a": "0", "b": "2", "c": "3", "d": "4"}, "response 1's rank 0 is outside 1..4"),
    ({"a": "1", "b": "two", "c": "3", "d": "4"}, "response 2's rank 'two' is not a whole number"),
    ({"a": "1", "b": "2", "c": "1.5", "d": "4"}, "response 3's rank '1.5' is not a whole number"),
    ({"a": "2", "b": "2", "c": "2", "d": "2"}, "all 4 responses have rank 2"),
])  # fmt: skip
def test_a_ranking_that_is_not_a_ranking_names_the_problem(ranks: dict[str, str], problem: str) -> None:
    with pytest.raises(FormProblem) as refused:
        parse_ranking(ranks, ["a", "b", "c", "d"])
    assert problem in refused.value.message and refused.value.status == 400


def test_ratings_are_optional_and_flags_need_a_score() -> None:
    ids = ["a", "b", "c"]
    (rating,) = parse_ratings({"a": "6", "b": "", "c": ""}, {"a": ["hallucination"]}, ids)
    assert (rating.completion_id, rating.overall) == ("a", 6)
    assert rating.flags["hallucination"] and not rating.flags["expresses_opinion"] and len(rating.flags) == 11
    with pytest.raises(FormProblem, match="response 2 has flags but no overall score"):
        parse_ratings({}, {"b": ["sexual_content"]}, ids)
    with pytest.raises(FormProblem, match="outside 1..7"):
        parse_ratings({"c": "8"}, {}, ids)


def test_sessions_end_when_idle_and_their_tokens_compare_in_constant_time() -> None:
    now = [1000.0]
    store = SessionStore(idle_seconds=60, max_sessions=2, clock=lambda: now[0])
    session = store.create("rlhf_secret", "ana", "labeler", "A")
    assert len(session.id) >= 43 and "rlhf_secret" not in repr(session)
    assert session.csrf_ok(session.csrf_token) and not session.csrf_ok("forged") and not session.csrf_ok(None)
    now[0] += 59
    assert store.get(session.id) is session  # used: its idle clock restarts
    now[0] += 61
    assert store.get(session.id) is None
    tokens = LoginTokens()
    nonce = tokens.new_nonce()
    assert tokens.check(nonce, tokens.form_token(nonce))
    assert not tokens.check(nonce, tokens.form_token(tokens.new_nonce())) and not tokens.check(None, "x")


def test_unset_optional_figures_show_as_a_dash() -> None:
    group = admin_pb2.GroupAgreement(labeler_group="A", labelers=2, shared_tasks=3, pairs=18)
    assert group_row(group)["agreement"] == DASH and group_row(group)["alpha"] == DASH
    group.pairwise_agreement, group.krippendorff_alpha = 0.726, 0.4
    assert (group_row(group)["agreement"], group_row(group)["alpha"]) == ("72.6%", "0.400")


def test_server_errors_in_words() -> None:
    def error(code: grpc.StatusCode, details: str, trailers: tuple = ()) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details)

    slow = explain(error(grpc.StatusCode.RESOURCE_EXHAUSTED, "request rate over 500/s; retry in 1.234 s",
                         (("retry-after-ms", "1234"),)), "h:1")  # fmt: skip
    assert slow.status == 429 and "Slow down" in slow.message and "Try again in 1.2 s" in slow.message
    down = explain(error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"), "h:1")
    assert down.status == 503 and "The rlhf server at h:1 is unreachable" in down.message


# ---------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def module_stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebStack]:
    folder = tmp_path_factory.mktemp("web")
    guidelines = folder / "guidelines.md"
    guidelines.write_text("# Our rules\n\nRank **truthful** answers first.\n\n<script>alert('guidelines')</script>\n")
    with WebStack.start(folder, tiny_model_dir, guidelines=guidelines) as stack:
        yield stack


@pytest.fixture
def stack(module_stack: WebStack) -> WebStack:
    module_stack.retire_all()
    return module_stack


def browser_like(stack: WebStack) -> httpx.Client:
    return httpx.Client(base_url=stack.url, follow_redirects=False, timeout=120)


def sign_in(stack: WebStack, who: str = "ana") -> httpx.Client:
    client = browser_like(stack)
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    answer = client.post("/login", data={"csrf": token, "api_key": stack.keys[who]})
    assert answer.status_code == 303 and answer.headers["location"] == "/label", answer.text
    return client


def ranked(fields: dict, ranks: list[str], **extra: str) -> dict:
    data = {"csrf": fields["csrf"], "request_id": fields["request_id"], "task_id": fields["task_id"], "action": "submit"}
    data.update({f"rank_{cid}": r for cid, r in zip(fields["completion_ids"], ranks)})
    data.update(extra)
    return data


def test_sign_in_keeps_the_key_server_side_and_sign_out_ends_the_session(stack: WebStack) -> None:
    client = browser_like(stack)
    login = client.get("/login")
    assert login.status_code == 200 and "rlhf_login=" in login.headers["set-cookie"]
    for name, value in [("content-security-policy", "default-src 'self'"), ("x-frame-options", "DENY"),
                        ("x-content-type-options", "nosniff"), ("referrer-policy", "no-referrer")]:  # fmt: skip
        assert value in login.headers[name]
    token = re.search(r'name="csrf" value="([^"]+)"', login.text).group(1)  # type: ignore[union-attr]
    answer = client.post("/login", data={"csrf": token, "api_key": stack.keys["ana"]})
    cookie = answer.headers["set-cookie"]
    assert answer.status_code == 303 and "rlhf_session=" in cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and "Secure" not in cookie
    assert stack.keys["ana"] not in cookie
    stack.waiting_prompt()
    page = client.get("/label")
    assert page.status_code == 200 and stack.keys["ana"] not in page.text
    assert "ana · labeler · group A" in page.text and 'id="progress"' in page.text
    assert "<h1>Our rules</h1>" in page.text and "<strong>truthful</strong>" in page.text
    assert "<script>alert('guidelines')" not in page.text  # raw HTML in the Markdown is shown as text
    out = client.post("/logout", data={"csrf": form_fields(page.text)["csrf"]})
    assert out.status_code == 303 and out.headers["location"] == "/login?reason=signed_out"
    client.cookies.set("rlhf_session", cookie.split("rlhf_session=")[1].split(";")[0])  # the old id, replayed
    again = client.get("/label")
    assert again.status_code == 303 and again.headers["location"] == "/login?reason=expired"


def test_sign_in_refusals_say_why(stack: WebStack) -> None:
    client = browser_like(stack)
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)  # type: ignore[union-attr]
    forged = client.post("/login", data={"csrf": "0" * 64, "api_key": stack.keys["ana"]})
    assert forged.status_code == 403 and "security token is missing or wrong" in forged.text
    assert "rlhf_session" not in forged.headers.get("set-cookie", "")
    token = re.search(r'name="csrf" value="([^"]+)"', forged.text).group(1)  # type: ignore[union-attr]
    user = client.post("/login", data={"csrf": token, "api_key": stack.keys["cleo"]})
    assert user.status_code == 403 and "This key is not a labeler&#39;s" in user.text
    token = re.search(r'name="csrf" value="([^"]+)"', user.text).group(1)  # type: ignore[union-attr]
    unknown = client.post("/login", data={"csrf": token, "api_key": "rlhf_" + "x" * 40})
    assert unknown.status_code == 401 and "does not know this key" in unknown.text
    no_cookie = httpx.post(f"{stack.url}/login", data={"csrf": token, "api_key": stack.keys["ana"]})
    assert no_cookie.status_code == 403


def test_a_reload_shows_the_same_task_and_an_empty_queue_says_check_back_later(stack: WebStack) -> None:
    client = sign_in(stack)
    empty = client.get("/label")
    assert empty.status_code == 200 and "No prompt is waiting; check back later." in empty.text
    stack.waiting_prompt()
    first = form_fields(client.get("/label").text)
    second = form_fields(client.get("/label").text)
    assert first["task_id"] == second["task_id"] and len(first["completion_ids"]) == 4
    assert first["request_id"] != second["request_id"]  # a fresh form id per render
    assert len(stack.rows("SELECT id FROM comparison_tasks WHERE labeler_id = 'ana' AND status = 'leased'")) == 1


def test_a_submission_is_stored_once_even_when_the_form_is_replayed(stack: WebStack) -> None:
    prompt_id = stack.waiting_prompt("Say hello.")
    client = sign_in(stack)
    fields = form_fields(client.get("/label").text)
    a, b, c, d = fields["completion_ids"]
    data = ranked(fields, ["1", "2", "2", "3"], **{f"overall_{a}": "6", "demonstration": "Hello there!"})
    data[f"flag_{a}"] = ["hallucination", "expresses_opinion"]  # a checkbox per flag, one field name
    before = stack.counts()
    answer = client.post("/label", data=data)
    assert answer.status_code == 303 and answer.headers["location"] == "/label"
    assert stack.ranking_of(fields["task_id"]) == [[a], [b, c], [d]]
    assert stack.task(fields["task_id"])["status"] == "submitted"
    (rating,) = stack.rows("SELECT overall, flags_json, labeler_id FROM ratings WHERE completion_id = ?", [a])
    flags = json.loads(rating["flags_json"])
    assert rating["overall"] == 6 and rating["labeler_id"] == "ana"
    assert {name for name, on in flags.items() if on} == {"hallucination", "expresses_opinion"}
    (demo,) = stack.rows("SELECT response, labeler_id FROM demonstrations WHERE prompt_id = ?", [prompt_id])
    assert demo == {"response": "Hello there!", "labeler_id": "ana"}
    after = stack.counts()
    assert after == {**before, "rankings": before["rankings"] + 1, "ratings": before["ratings"] + 1,
                     "demonstrations": before["demonstrations"] + 1, "closed_tasks": before["closed_tasks"] + 1}
    replay = client.post("/label", data=data)
    assert replay.status_code == 303 and stack.counts() == after
    assert "Saved your ranking of 4 responses (5 comparisons)" in client.get("/label").text


@pytest.mark.parametrize(("ranks", "problem"), [
    (["1", "2", "3", ""], "response 4 has no rank"),
    (["1", "2", "3", "9"], "response 4&#39;s rank 9 is outside 1..4"),
    (["1", "two", "3", "4"], "response 2&#39;s rank &#39;two&#39; is not a whole number"),
    (["3", "3", "3", "3"], "all 4 responses have rank 3"),
])  # fmt: skip
def test_a_ranking_that_is_not_a_ranking_is_refused_with_the_values_kept(stack: WebStack, ranks: list[str],
                                                                         problem: str) -> None:  # fmt: skip
    stack.waiting_prompt()
    client = sign_in(stack)
    fields = form_fields(client.get("/label").text)
    before = stack.counts()
    answer = client.post("/label", data=ranked(fields, ranks, demonstration="kept <b>text</b>"))
    assert answer.status_code == 400 and problem in answer.text
    for cid, rank in zip(fields["completion_ids"], ranks):
        assert f'name="rank_{cid}" id="rank-' in answer.text
        assert re.search(rf'name="rank_{cid}"[^>]*value="{re.escape(rank)}"', answer.text)
    assert "kept &lt;b&gt;text&lt;/b&gt;</textarea>" in answer.text
    assert form_fields(answer.text)["task_id"] == fields["task_id"]
    assert stack.counts() == before and stack.task(fields["task_id"])["status"] == "leased"


def test_forms_without_a_session_or_with_a_forged_csrf_token_store_nothing(stack: WebStack) -> None:
    stack.waiting_prompt()
    client = sign_in(stack)
    fields = form_fields(client.get("/label").text)
    data = ranked(fields, ["1", "2", "3", "4"])
    before = stack.counts()
    anonymous = httpx.post(f"{stack.url}/label", data=data)
    assert anonymous.status_code == 401 and "You are not signed in" in anonymous.text
    assert httpx.get(f"{stack.url}/label").headers["location"] == "/login?reason=signin"
    forged = client.post("/label", data={**data, "csrf": "forged"})
    assert forged.status_code == 403 and "security token is missing or does not match" in forged.text
    missing = client.post("/label", data={k: v for k, v in data.items() if k != "csrf"})
    assert missing.status_code == 403
    other = sign_in(stack, "ben")  # another session's (valid) token is not this one's
    other_token = form_fields(other.get("/label").text)["csrf"]
    assert client.post("/label", data={**data, "csrf": other_token}).status_code == 403
    assert stack.counts() == before and stack.task(fields["task_id"])["status"] == "leased"


def test_too_large_forms_and_demonstrations_are_refused_413(stack: WebStack) -> None:
    stack.waiting_prompt()
    client = sign_in(stack)
    fields = form_fields(client.get("/label").text)
    before = stack.counts()
    huge = client.post("/label", data=ranked(fields, ["1", "2", "3", "4"], demonstration="x" * 1_000_000))
    assert huge.status_code == 413 and "accepts at most 262,144 bytes (256 KiB)" in huge.text
    assert "Nothing was stored" in huge.text
    long = client.post("/label", data=ranked(fields, ["1", "2", "3", "4"], demonstration="y" * 40_000))
    assert long.status_code == 413 and "the demonstration is 40,000 characters; at most 32,768" in long.text
    assert stack.counts() == before and stack.task(fields["task_id"])["status"] == "leased"


def test_html_and_script_in_a_prompt_and_its_completions_are_shown_as_text(stack: WebStack) -> None:
    script = "<script>alert('x')</script><img src=x onerror=alert(1)>"
    stack.prompt_with_completions(f"Prompt {script}", [f"answer {i} {script}" for i in range(4)])
    client = sign_in(stack)
    page = client.get("/label").text
    assert "<script>alert" not in page and "<img src=x" not in page
    escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"
    assert f"Prompt {escaped}" in page
    assert all(f"answer {i} {escaped}" in page for i in range(4))


def test_a_chat_prompt_shows_its_turns(stack: WebStack) -> None:
    turns = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Name a colour."}]
    stack.waiting_prompt("Name a colour.", messages=turns)
    page = sign_in(stack).get("/label").text
    chat = page[page.index('id="prompt-chat"'):page.index("</ol>", page.index('id="prompt-chat"'))]
    assert re.findall(r'<span class="role">(\w+)</span><div class="text">([^<]*)</div>', chat) == [
        ("system", "Answer in French."), ("user", "Name a colour.")]


def test_an_expired_lease_says_so_and_brings_a_new_task(stack: WebStack) -> None:
    stack.waiting_prompt()
    client = sign_in(stack)
    fields = form_fields(client.get("/label").text)
    stack.expire(fields["task_id"])
    before = stack.counts()
    answer = client.post("/label", data=ranked(fields, ["1", "2", "3", "4"]))
    assert answer.status_code == 303
    page = client.get("/label").text
    assert re.search(r"The lease on this task expired at \d\d:\d\d:\d\d UTC; nothing was stored. Here is a new task.",
                     page)  # fmt: skip
    assert form_fields(page)["task_id"] not in ("", fields["task_id"])
    assert stack.counts() == before


def test_an_unreachable_server_is_named() -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with WebThread(WebConfig(server=f"127.0.0.1:{port}", port=0, rpc_timeout_seconds=5)) as web:
        client = httpx.Client(base_url=web.url, timeout=30)
        token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)  # type: ignore[union-attr]
        answer = client.post("/login", data={"csrf": token, "api_key": "rlhf_anything"})
        assert answer.status_code == 503 and f"The rlhf server at 127.0.0.1:{port} is unreachable" in answer.text


def test_the_admin_page_is_for_admins(stack: WebStack) -> None:
    labeler = sign_in(stack, "ana")
    refused = labeler.get("/admin")
    assert refused.status_code == 403 and "The admin page is for admin keys" in refused.text
    admin = sign_in(stack, "ops")
    page = admin.get("/admin")
    assert page.status_code == 200, page.text
    assert 'id="labelers"' in page.text and 'id="groups"' in page.text and 'id="ratings"' in page.text
    assert "72.6 ± 1.5%" in page.text and "77.3 ± 1.3%" in page.text and 'id="stats"' in page.text
    assert 'role="alert"' not in page.text


def test_served_over_https_the_cookies_are_secure_and_a_wide_bind_needs_https() -> None:
    from starlette.testclient import TestClient

    from webapp.app import create_app

    config = WebConfig(https_cert=Path("cert.pem"), https_key=Path("key.pem"))  # read by uvicorn only
    with TestClient(create_app(config), base_url="https://127.0.0.1") as client:
        login = client.get("/login")
    assert "Secure" in login.headers["set-cookie"] and "HttpOnly" in login.headers["set-cookie"]
    assert login.headers["strict-transport-security"] == "max-age=31536000"
    with pytest.raises(ValueError, match="without HTTPS would send API keys"):
        WebConfig(host="0.0.0.0")
    assert WebConfig(host="0.0.0.0", allow_plain_http=True).host == "0.0.0.0"
