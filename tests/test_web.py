"""The web page: its pure pieces, then the real stack (controller + worker + web server) in headless Chromium."""
import asyncio
import json
import os
import signal
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from bayling.params import GenerationParams
from bayling.serve.web import parse_auth
from bayling.serve.web_state import (Session, Streams, append_log, build_payload, log_path,
                                     message_at, read_params, render_chat, translation_instruction, vote_record)
from bayling.serve.web_store import (empty_store, export_json, export_markdown, import_json, normalise_store, put,
                                     rename, sidebar_choices)
from bayling.demo import DEMO_NAME
from bayling.serve.web_client import (CONTROLLER_DOWN, WORKER_GONE, ControllerClient, ServeError, generate_stream,
                                      parse_chunk, split_stream, until_set)
from browser import CHROMIUM, ChatPage, launch_chromium, start_web_server, wait_until, worker_busy
from stack import free_port, http_json, start_controller, start_worker, stop_all

# ---- pure pieces --------------------------------------------------------------------------------------------


def test_translation_instruction_follows_bayling_upstream():
    assert (translation_instruction(" Hello, world. ", "English", "Chinese")
            == "Provide the Chinese translation for this sentence: Hello, world.")
    assert translation_instruction("今天天气很好", "Chinese", "English") == "提供这句话的英文翻译：今天天气很好"
    assert translation_instruction("Guten Tag", "German", "French").startswith("Provide the French translation")
    with pytest.raises(ValueError, match="unknown target language 'Klingon'"):
        translation_instruction("x", "English", "Klingon")


def test_payload_sends_messages_and_template_default_system():
    params = read_params(0.0, 0.9, 64.0)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "more"}]
    payload = build_payload("m", messages, "  ", params)
    assert payload == {"model": "m", "messages": messages, "system": None, "temperature": 0.0, "top_p": 0.9,
                       "max_new_tokens": 64, "echo": False}
    assert build_payload("m", messages, "Be brief.", params)["system"] == "Be brief."
    assert isinstance(payload["max_new_tokens"], int)


def test_bad_sampling_values_are_rejected_with_a_message():
    with pytest.raises(ValueError, match="top_p"):
        read_params(0.7, 0.0, 16)
    assert read_params(0.7, 1.0, 512) == GenerationParams(temperature=0.7, top_p=1.0, max_new_tokens=512)


def test_render_chat_shows_notice_but_never_sends_it():
    session = Session(messages=[{"role": "user", "content": "hi"}], notice="*(a note)*")
    shown = render_chat(session)
    assert shown[-1] == {"role": "assistant", "content": "*(a note)*"}
    assert build_payload("m", session.messages, None, read_params(0.7, 1, 16))["messages"] == session.messages


def test_vote_log_is_one_jsonl_file_per_day(tmp_path):
    session = Session(messages=[{"role": "user", "content": "你好"},
                                {"role": "assistant", "content": "hi", "stats": {"tokens": 1}}],
                      model="m", system="sys", params={"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 32})
    day = datetime(2024, 5, 1, 12, 30)
    assert log_path(tmp_path, day) == tmp_path / "2024-05-01-conv.json"
    append_log(tmp_path, vote_record("upvote", session, 1, "127.0.0.1", day), day)
    path = append_log(tmp_path, vote_record("flag", session, 1, None, day, " rude ", "upvote"), day)
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["type"] for r in lines] == ["upvote", "flag"]
    assert lines[0]["state"]["messages"] == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"}]
    assert lines[0]["model"] == "m" and lines[0]["ip"] == "127.0.0.1" and "ip" not in lines[1]
    assert lines[1]["comment"] == "rude" and lines[1]["replaces"] == "upvote" and lines[1]["answer"] == 1
    assert "你好" in path.read_text(encoding="utf-8")  # readable, not \u-escaped
    with pytest.raises(ValueError, match="vote must be one of"):
        vote_record("meh", session, 1, None, day)


def test_failed_message_is_shown_with_retry_but_never_sent():
    session = Session(messages=[{"role": "user", "content": "a", "failed": "the worker died"},
                                {"role": "user", "content": "b"}])
    shown = render_chat(session)
    assert [m["role"] for m in shown] == ["user", "assistant", "user"] and "Retry" in shown[1]["content"]
    assert build_payload("m", session.messages, None, read_params(0.7, 1, 16))["messages"] == [
        {"role": "user", "content": "b"}]
    assert message_at(session, 2) == 1 and message_at(session, 1) == 0


def test_answers_show_their_stats_and_translation_bubbles_the_users_text():
    session = Session(messages=[{"role": "user", "content": "Provide the English translation for this sentence: x",
                                 "shown": "x"},
                                {"role": "assistant", "content": "y", "current": 1,
                                 "versions": [{"content": "z", "stats": {}}, {"content": "y", "stats": {}}],
                                 "stats": {"tokens": 7, "tokens_per_s": 3.25, "ttft_s": 0.5, "finish": "length"}}],
                      pending=True)
    shown = render_chat(session)
    assert shown[0]["content"] == "x" and shown[1]["content"] == "y"
    assert all(s in shown[2]["content"] for s in ("7 tokens", "3.2 tokens/s", "first token 0.50 s",
                                                 "length limit reached", "version 2 of 2"))
    assert "bayling-pending" in shown[3]["content"]
    assert message_at(session, 2) == 1  # a vote on the stats line is a vote on the answer


def test_conversations_export_import_round_trip_and_bad_files_lose_nothing():
    store = empty_store()
    a = Session(messages=[{"role": "user", "content": "First question, which is quite long indeed and goes on"},
                          {"role": "assistant", "content": "answer"}], updated=1.0)
    b = Session(messages=[{"role": "user", "content": "second"}], updated=2.0)
    put(store, a.to_stored()), put(store, b.to_stored())
    assert [t for t, _ in sidebar_choices(store)] == ["second", "First question, which is quite long indeed and…"]
    exported = export_json(store)
    assert "**User:**" in export_markdown(store) and "second" in export_markdown(store)
    restored, count = import_json(empty_store(), exported)
    assert count == 2 and restored["conversations"] == normalise_store(store)["conversations"]
    assert import_json(restored, exported)[1] == 2 and len(restored["conversations"]) == 2  # no duplicates
    for bad, why in (("{", "not JSON"), ('{"format": "x"}', "not a conversation export"),
                     ('{"format": "bayling-conversations", "conversations": [{"messages": [{"role": "x"}]}]}',
                      "role")):
        with pytest.raises(ValueError, match=why):
            import_json(restored, bad)
    assert len(restored["conversations"]) == 2
    rename(store, a.id, "  My   chat ")
    assert store["conversations"][a.id]["title"] == "My chat"
    assert normalise_store({"conversations": {"x": "junk", b.id: store["conversations"][b.id]}})[
        "conversations"].keys() == {b.id}


def test_parse_auth():
    assert parse_auth("ann:se:cret") == ("ann", "se:cret")
    assert parse_auth(None) is None
    for bad in ("ann", "ann:", ":pw"):
        with pytest.raises(ValueError, match="USER:PASSWORD"):
            parse_auth(bad)


def test_stream_chunks_split_on_nul_across_reads():
    a = json.dumps({"text": "Hel", "error_code": 0}).encode()
    b = json.dumps({"text": "Hello", "error_code": 0, "finish_reason": "stop", "usage": {"completion_tokens": 2}})
    data = a + b"\0" + b.encode() + b"\0"
    chunks, buffer = [], b""
    for i in range(0, len(data), 7):  # arbitrary network reads
        pieces, buffer = split_stream(buffer, data[i:i + 7])
        chunks += [parse_chunk(p) for p in pieces]
    assert buffer == b""
    assert [c.text for c in chunks] == ["Hel", "Hello"]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage == {"completion_tokens": 2}
    with pytest.raises(ServeError, match="malformed chunk"):
        parse_chunk(b"{not json")


def test_stop_ends_a_silent_stream_at_once_and_only_its_own():
    async def scenario():
        streams = Streams()
        chat, other = streams.start(("tab", "chat")), streams.start(("tab", "translate"))
        assert streams.start(("tab", "chat")) is None  # one answer per panel at a time

        async def silent_worker():  # never sends another chunk
            yield 1
            await asyncio.sleep(3600)
            yield 2

        got = []

        async def consume():
            async for item in until_set(chat.stopped, silent_worker()):
                got.append(item)
            streams.finish(("tab", "chat"), chat)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        assert await streams.stop(("tab", "chat"), wait_s=5)  # returns once the stream is done
        assert time.monotonic() - t0 < 1 and task.done() and got == [1] and chat.reason == "stop"
        assert not other.stopped.is_set() and streams.busy(("tab", "translate"))
        assert not await streams.stop(("tab", "chat"))

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_unreachable_controller_and_worker_fail_fast_with_a_message():
    async def probe():
        url = f"http://127.0.0.1:{free_port()}"
        with pytest.raises(ServeError, match="cannot reach the controller") as e:
            await ControllerClient(url).list_models()
        assert e.value.kind == CONTROLLER_DOWN
        with pytest.raises(ServeError, match="cannot reach the worker") as e:
            async with generate_stream(url, {"model": "m", "messages": []}) as chunks:
                async for _ in chunks:
                    pass
        assert e.value.kind == WORKER_GONE

    asyncio.run(asyncio.wait_for(probe(), 10))


# ---- the real stack in a real browser -----------------------------------------------------------------------

READ_TIMEOUT_S = 8  # the page's --timeout: how long a silent worker is waited for


def _need_chromium() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")


@pytest.fixture(scope="module")
def web_stack(tmp_path_factory):
    """FastChat's controller, our worker on the demo model and web_server.py, as real processes."""
    _need_chromium()
    log_dir = tmp_path_factory.mktemp("web-stack")
    services = []
    try:
        ctl = start_controller(log_dir)
        services.append(ctl)
        worker = start_worker(ctl.url, log_dir)
        services.append(worker)
        web = start_web_server(ctl.url, log_dir, "--timeout", str(READ_TIMEOUT_S))
        services.append(web)
        yield SimpleNamespace(ctl=ctl, worker=worker, web=web, log_dir=log_dir)
    finally:
        stop_all(reversed(services))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    _need_chromium()
    with sync_playwright() as p:
        chromium = launch_chromium(p)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, web_stack):
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    try:
        chat = ChatPage(context.new_page(), web_stack.web.url).open()
        wait_until(lambda: chat.model() == DEMO_NAME, 30, "the model picker to offer the demo model")
        wait_until(chat.system_prompt, 15, "the model's default system prompt in the editable box")
        yield chat
    finally:
        context.close()


def _aborted(worker_url: str) -> int:
    return int(http_json(worker_url + "/worker_get_status").get("batching", {}).get("aborted", 0))


def _wait_streaming(page: ChatPage, panel: str = "chat", timeout: float = 60) -> str:
    """Wait until the answer has been seen growing (two different non-empty texts); returns the latest."""
    seen = set()

    def grown():
        messages = page.messages(panel)
        if messages and messages[-1][0] == "assistant" and messages[-1][1]:
            seen.add(messages[-1][1])
        return len(seen) >= 2 and messages[-1][1]

    return wait_until(grown, timeout, "the answer to stream into the page")


def _stop_visible(page: ChatPage) -> bool:
    return page.page.locator("#chat-stop").is_visible() and not page.page.locator("#chat-send").is_visible()


def test_pending_then_stop_on_a_frozen_worker_ends_within_a_second(web_stack, page):
    worker = web_stack.worker
    os.kill(worker.proc.pid, signal.SIGSTOP)  # alive but silent: it cannot send a single token
    try:
        page.type_and_send("chat-input", "Tell me a **long** story about a dragon.")
        assert page.page.locator("#chat-chatbot .message.user strong").first.inner_text() == "long"  # Markdown
        wait_until(lambda: page.page.locator("#chat-chatbot .bayling-pending").is_visible(), 15,
                   "the pending indicator in the assistant's bubble")
        assert page.messages()[-1] == ("assistant", "")  # nothing but the indicator: no token yet
        wait_until(lambda: _stop_visible(page), 10, "Send to turn into Stop")
        assert page.page.get_by_role("button", name="Stop", exact=True).is_visible()  # named for screen readers
        page.type_and_send("chat-input", "A second message meanwhile")  # refused with a note, kept in the box
        wait_until(lambda: "press **Stop** first" in page.page.inner_text("#chat-status")
                   or "press Stop first" in page.page.inner_text("#chat-status"), 10, "the busy note")
        assert page.page.input_value("#chat-input textarea") == "A second message meanwhile"
        t0 = time.monotonic()
        page.click("chat-stop")
        wait_until(lambda: not page.page.locator("#chat-chatbot .bayling-pending").count()
                   and page.page.locator("#chat-send").is_visible(), 5, "Stop to end the answer", 0.02)
        assert time.monotonic() - t0 < 1.0, "Stop must end the answer at once, without waiting for the worker"
        assert not page.page.locator("#chat-stop").is_visible()
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    wait_until(lambda: worker_busy(worker.url) == 0, 30, "the worker to drop the abandoned request")


def _votes(web_stack) -> list[dict]:
    log = web_stack.log_dir / "votes" / f"{datetime.now():%Y-%m-%d}-conv.json"
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []


def test_stats_continue_votes_and_conversations_that_survive_a_reload(web_stack, page, tmp_path):
    worker = web_stack.worker.url
    page.set_number("max-new-tokens", 12)
    page.set_number("temperature", 0)
    page.type_and_send("chat-input", "Tell me a long story about a dragon who learns to cook.")
    wait_until(lambda: _stop_visible(page), 15, "Send to turn into Stop")
    first = page.wait_answer_done(worker)
    wait_until(lambda: page.page.locator("#chat-send").is_visible(), 10, "Stop to turn back into Send")
    for part in ("12 tokens", "tokens/s", "first token", "length limit reached"):
        assert part in first, f"{part!r} missing under the answer: {first!r}"
    cut = first.split("12 tokens")[0].strip()

    page.click("chat-continue")  # the cut-off answer goes on in the same bubble
    wait_until(lambda: "24 tokens" in page.last_text(), 90, "the continued answer's stats")
    longer = page.wait_answer_done(worker)
    assert longer.startswith(cut) and len(longer.split("24 tokens")[0].strip()) > len(cut)
    assert [role for role, _ in page.messages()] == ["user", "assistant"]

    before = len(_votes(web_stack))
    like = page.page.locator("#chat-chatbot").get_by_label("Like", exact=True)
    page.page.fill("#chat-comment textarea", "nice story")
    like.last.click()
    wait_until(lambda: "upvote is logged" in page.page.inner_text("#chat-status"), 10, "the vote's receipt")
    status = page.page.inner_text("#chat-status")
    assert "votes" not in status and str(web_stack.log_dir) not in status  # the log path stays private
    page.page.locator("#chat-chatbot").get_by_label("Dislike", exact=True).last.click()
    wait_until(lambda: "replaces your upvote" in page.page.inner_text("#chat-status"), 10, "the changed vote")
    votes = _votes(web_stack)[before:]
    assert [v["type"] for v in votes] == ["upvote", "downvote"] and votes[0]["comment"] == "nice story"
    assert votes[1]["replaces"] == "upvote" and votes[0]["answer"] == 1 and votes[0]["model"] == DEMO_NAME
    assert votes[0]["state"]["messages"][0]["content"].startswith("Tell me a long story")

    page.page.locator("#chat-chatbot").get_by_label("Retry", exact=True).last.click()  # another version
    wait_until(lambda: "version 2 of 2" in page.last_text(), 90, "a second version of the answer")
    page.wait_answer_done(worker)
    page.page.locator("#chat-selected").get_by_text("Selected message").click()
    page.page.locator("#chat-chatbot .message.bot").last.click()  # select the answer: raw text and versions
    wait_until(lambda: "version 2 of 2" in page.page.inner_text("#chat-selected-info"), 10, "the selected answer")
    page.click("chat-older")
    wait_until(lambda: "version 1 of 2" in page.last_text(), 10, "the earlier version back on screen")
    raw = page.page.input_value("#chat-raw textarea")
    assert raw.startswith(cut.split("\n")[0][:20]) and "tokens/s" not in raw

    page.page.reload()  # the conversation and the settings come back from the browser's storage
    page.open()
    wait_until(lambda: len(page.messages()) == 2, 20, "the conversation after the reload")
    assert page.last_text().startswith(cut)
    assert page.page.input_value("#max-new-tokens input") == "12"
    titles = page.page.locator("#conversations label")
    wait_until(lambda: "Tell me a long story" in titles.first.inner_text(), 10, "the conversation in the sidebar")

    page.click("new-chat")
    wait_until(lambda: page.messages() == [], 10, "New chat to empty the chat")
    page.type_and_send("chat-input", "Hi")
    page.wait_answer_done(worker)
    wait_until(lambda: titles.count() == 2 and titles.first.inner_text().strip() == "Hi", 15, "newest first")
    titles.nth(1).click()  # switch back
    wait_until(lambda: page.last_text().startswith(cut), 10, "the first conversation again")

    page.click("export-chats")
    link = page.page.locator("#export-files a[download]").first
    link.wait_for(timeout=15000)
    with page.page.expect_download() as download:
        page.page.locator("#export-files a[href*='.json']").first.click()
    exported = tmp_path / "export.json"
    download.value.save_as(exported)
    assert len(json.loads(exported.read_text(encoding="utf-8"))["conversations"]) == 2

    for expected in (1, 0):  # delete both, then import restores them
        page.click("delete-chat")
        wait_until(lambda: titles.count() == expected, 10, f"{expected} conversation(s) left")
        if expected:
            titles.first.click()
            wait_until(lambda: page.messages(), 10, "the remaining conversation")
    page.page.locator("#import-chats input[type=file], input[type=file]").first.set_input_files(str(exported))
    wait_until(lambda: titles.count() == 2, 20, "the imported conversations in the sidebar")
    assert "Imported 2" in page.page.inner_text("#sidebar-note")


def test_refresh_keeps_the_system_prompt_and_bad_settings_are_shown_not_corrected(web_stack, page):
    page.page.fill("#system-prompt textarea", "Answer in one word.")
    page.click("reload-models")
    time.sleep(3)  # the refresh has answered by now (the controller is local)
    assert page.system_prompt() == "Answer in one word." and page.model() == DEMO_NAME
    page.set_number("top-p", 1.5)
    wait_until(lambda: "top_p must be in (0, 1]" in page.page.inner_text("#settings-error"), 10,
               "the error next to the settings")
    page.type_and_send("chat-input", "Hello")
    wait_until(lambda: "fix it under Settings" in page.last_text(), 10, "sending to refuse the bad value")
    assert page.page.input_value("#top-p input") == "1.5"  # not silently corrected


def test_phone_layout_puts_the_chat_and_message_box_first(browser, web_stack):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        chat = ChatPage(context.new_page(), web_stack.web.url).open()
        box = chat.page.locator("#chat-input textarea")
        wait_until(lambda: chat.page.evaluate("document.activeElement?.closest('#chat-input') !== null"), 10,
                   "the cursor in the message box")
        wait_until(lambda: not chat.page.locator("#system-prompt").is_visible(), 10, "the settings folded away")
        rect = box.bounding_box()
        assert rect["y"] + rect["height"] <= 844, f"the message box is below the first screen: {rect}"
        assert chat.page.evaluate("document.documentElement.lang") == "en"
        assert "Chat with" in chat.page.inner_text("#chat-chatbot")  # the welcome state, with examples
        assert "Translate into Chinese" in chat.page.inner_text("#chat-chatbot")
    finally:
        context.close()


def test_translation_then_refinement_in_the_same_conversation(web_stack, page):
    page.page.get_by_role("tab", name="Translate").click()
    page.set_number("max-new-tokens", 24)
    page.set_number("temperature", 0)  # greedy: the same (non-empty) answers every run
    page.type_and_send("translate-source", "今天天气很好，我们去公园散步吧。", "translate-run")  # Chinese -> English
    page.wait_answer_done(web_stack.worker.url, "translate")
    messages = page.messages("translate")
    assert messages[0] == ("user", "今天天气很好，我们去公园散步吧。")  # the visitor's text, not the instruction
    assert len(messages) == 2 and messages[1][0] == "assistant" and messages[1][1]
    for what in (page.page.get_by_text("Make it more formal.").first, page.page.locator("#translate-refine-send"),
                 page.page.locator("#translate-chatbot").get_by_label("Like", exact=True).last):
        box = what.bounding_box()  # refine examples, Send/Stop and votes: all within the first screen
        assert box and box["y"] + box["height"] <= 900, f"below the first screen at 1366x900: {box}"

    page.type_and_send("translate-refine", "Make it more formal.")
    wait_until(lambda: len(page.messages("translate")) >= 3, 10, "the follow-up instruction in the chat")
    page.wait_answer_done(web_stack.worker.url, "translate")
    messages = page.messages("translate")
    assert [role for role, _ in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[2][1] == "Make it more formal." and messages[3][1]

    page.click("swap-langs")  # languages and texts
    wait_until(lambda: page.page.input_value("#source-lang input") == "English", 5, "the languages to swap")
    assert page.page.input_value("#target-lang input") == "Chinese"
    swapped = page.page.input_value("#translate-source textarea").strip()
    assert swapped and messages[3][1].startswith(swapped[:10])  # the last translation is the new source text
    page.page.click("#target-lang input")
    page.page.get_by_role("option", name="English", exact=True).click()
    page.click("translate-run")
    wait_until(lambda: "Both languages are English" in page.page.inner_text("#translate-status"), 10,
               "the same-language note")


def test_prompt_too_long_and_silent_worker_show_errors_within_seconds(web_stack, page):
    t0 = time.monotonic()
    page.type_and_send("chat-input", "word " * 12000)  # far beyond the demo model's 8192-token window
    wait_until(lambda: "Error" in page.last_text(), 15, "the prompt-too-long error")
    assert "context window" in page.last_text() and time.monotonic() - t0 < 15

    page.click("new-chat")
    wait_until(lambda: page.messages() == [], 10, "New chat to empty the chat")
    os.kill(web_stack.worker.proc.pid, signal.SIGSTOP)  # alive but silent: connections open, nothing answers
    try:
        t0 = time.monotonic()
        page.type_and_send("chat-input", "Hello?")
        wait_until(lambda: "Error" in page.last_text(), READ_TIMEOUT_S + 10, "the timeout error")
        assert f"sent nothing for {READ_TIMEOUT_S} s" in page.last_text()
        assert time.monotonic() - t0 < READ_TIMEOUT_S + 10
    finally:
        os.kill(web_stack.worker.proc.pid, signal.SIGCONT)
    wait_until(lambda: worker_busy(web_stack.worker.url) == 0, 30, "the worker to drop the abandoned request")


def test_killed_worker_shows_an_error_and_the_controller_drops_it(web_stack, page, tmp_path):
    ctl = web_stack.ctl
    doomed = start_worker(ctl.url, tmp_path, args=["--model-names", "doomed-demo"])
    try:
        page.click("reload-models")
        page.page.click("#model-picker input")
        page.page.get_by_role("option", name="doomed-demo").click()
        wait_until(lambda: page.model() == "doomed-demo", 10, "the doomed model to be picked")
        page.type_and_send("chat-input", "Write a very long poem about the sea.")
        _wait_streaming(page)
        t0 = time.monotonic()
        doomed.kill()
        wait_until(lambda: "Error" in page.last_text(), 10, "the dead worker's error")
        assert "may have died" in page.last_text() and time.monotonic() - t0 < 10
        wait_until(lambda: "doomed-demo" not in http_json(ctl.url + "/list_models")["models"], 15,
                   "the controller to drop the dead worker")
        wait_until(lambda: page.model() == DEMO_NAME, 15, "the model picker to fall back to a live model")
    finally:
        doomed.stop()


def test_login_then_an_unreachable_controller_is_reported_not_spun(browser, tmp_path):
    web = start_web_server(f"http://127.0.0.1:{free_port()}", tmp_path, "--auth", "ann:s3cret")
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(web.url)
        page.get_by_label("username").fill("ann")
        page.get_by_label("password").fill("s3cret")
        page.get_by_role("button", name="Login").click()
        chat = ChatPage(page, web.url)
        page.wait_for_selector("#chat-input textarea", timeout=20000)
        wait_until(lambda: "cannot reach the controller" in page.inner_text("#model-status"), 10,
                   "the model list's error")
        chat.type_and_send("chat-input", "Anyone there?")
        wait_until(lambda: "cannot reach the controller" in chat.last_text(), 10, "the error in the chat")
    finally:
        context.close()
        web.stop()
