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
from bayling.serve.web_state import (STOPPED_NOTE, Session, Streams, append_log, build_payload, log_path,
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
    session = Session(messages=[{"role": "user", "content": "hi"}], notice=STOPPED_NOTE)
    shown = render_chat(session)
    assert shown[-1] == {"role": "assistant", "content": STOPPED_NOTE}
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
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
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


def test_chat_streams_markdown_then_stop_regenerate_vote_clear(web_stack, page):
    worker = web_stack.worker.url
    assert "SmolLM" in page.system_prompt()  # prefilled from the worker's template
    page.type_and_send("chat-input", "Tell me a **long** story about a dragon who learns to cook.")
    assert page.page.locator("#chat-chatbot .message.user strong").first.inner_text() == "long"  # Markdown
    _wait_streaming(page)

    aborted = _aborted(worker)
    page.click("chat-stop")
    wait_until(lambda: "(stopped)" in page.last_text(), 10, "'(stopped)' under the partial answer")
    wait_until(lambda: worker_busy(worker) == 0, 10, "the worker to drop the stopped request")
    assert _aborted(worker) == aborted + 1, "Stop must abort the request on the worker"
    assert page.last_text().replace("(stopped)", "").strip(), "the partial answer stays"

    page.set_number("max-new-tokens", 16)
    page.click("chat-regenerate")
    wait_until(lambda: "(stopped)" not in page.last_text(), 10, "Regenerate to drop the stopped answer")
    _wait_streaming(page)
    answer = page.wait_answer_done(worker)
    assert [role for role, _ in page.messages()] == ["user", "assistant"]
    assert answer and "(stopped)" not in answer

    page.click("chat-upvote")
    wait_until(lambda: "Logged your upvote" in page.page.inner_text("#chat-vote-status"), 10, "the vote's receipt")
    log = web_stack.log_dir / "votes" / f"{datetime.now():%Y-%m-%d}-conv.json"
    record = json.loads(log.read_text(encoding="utf-8").splitlines()[-1])
    assert record["type"] == "upvote" and record["model"] == DEMO_NAME and record["ip"] == "127.0.0.1"
    state = record["state"]
    assert state["system"] == page.system_prompt() and state["params"]["max_new_tokens"] == 16
    assert [m["role"] for m in state["messages"]] == ["user", "assistant"]
    assert state["messages"][0]["content"].startswith("Tell me a **long** story")

    page.click("chat-clear")
    wait_until(lambda: page.messages() == [], 10, "Clear to empty the chat")
    page.click("chat-regenerate")
    wait_until(lambda: "Nothing to regenerate" in page.last_text(), 10, "Regenerate on an empty chat to say so")


def test_translation_then_refinement_in_the_same_conversation(web_stack, page):
    page.page.get_by_role("tab", name="Translate").click()
    page.set_number("max-new-tokens", 24)
    page.set_number("temperature", 0)  # greedy: the same (non-empty) answers every run
    page.type_and_send("translate-source", "今天天气很好，我们去公园散步吧。", "translate-run")  # Chinese -> English
    page.wait_answer_done(web_stack.worker.url, "translate")
    messages = page.messages("translate")
    assert messages[0] == ("user", "提供这句话的英文翻译：今天天气很好，我们去公园散步吧。")
    assert len(messages) == 2 and messages[1][0] == "assistant" and messages[1][1]

    page.type_and_send("translate-refine", "Make it more formal.")
    wait_until(lambda: len(page.messages("translate")) >= 3, 10, "the follow-up instruction in the chat")
    page.wait_answer_done(web_stack.worker.url, "translate")
    messages = page.messages("translate")
    assert [role for role, _ in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[2][1] == "Make it more formal." and messages[3][1]

    page.click("translate-flag")  # the log shows what the worker was sent: one four-turn conversation
    wait_until(lambda: "Logged your flag" in page.page.inner_text("#translate-vote-status"), 10, "the flag's receipt")
    log = web_stack.log_dir / "votes" / f"{datetime.now():%Y-%m-%d}-conv.json"
    record = json.loads(log.read_text(encoding="utf-8").splitlines()[-1])
    assert record["type"] == "flag" and len(record["state"]["messages"]) == 4

    page.click("swap-langs")
    wait_until(lambda: page.page.input_value("#source-lang input") == "English", 5, "the languages to swap")
    assert page.page.input_value("#target-lang input") == "Chinese"


def test_prompt_too_long_and_silent_worker_show_errors_within_seconds(web_stack, page):
    t0 = time.monotonic()
    page.type_and_send("chat-input", "word " * 12000)  # far beyond the demo model's 8192-token window
    wait_until(lambda: "Error" in page.last_text(), 15, "the prompt-too-long error")
    assert "context window" in page.last_text() and time.monotonic() - t0 < 15

    page.click("chat-clear")
    wait_until(lambda: page.messages() == [], 10, "Clear to empty the chat")
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
