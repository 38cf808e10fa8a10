"""The web page: its pure pieces, then the real stack (controller + worker + web server) in headless Chromium."""
import asyncio
import json
from datetime import datetime

import pytest

from bayling.params import GenerationParams
from bayling.serve.web import (STOPPED_NOTE, Session, Streams, build_payload, log_path, parse_auth, read_params,
                               render_chat, translation_instruction, vote_record, append_log)
from browser import unused_port
from bayling.serve.web_client import (CONTROLLER_DOWN, WORKER_GONE, ControllerClient, ServeError, generate_stream,
                                      parse_chunk, split_stream)

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
    session = Session(messages=[{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"}],
                      model="m", system="sys", params={"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 32})
    day = datetime(2024, 5, 1, 12, 30)
    assert log_path(tmp_path, day) == tmp_path / "2024-05-01-conv.json"
    append_log(tmp_path, vote_record("upvote", session, "127.0.0.1", day), day)
    path = append_log(tmp_path, vote_record("flag", session, None, day), day)
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["type"] for r in lines] == ["upvote", "flag"]
    assert lines[0]["state"] == {"system": "sys", "messages": session.messages, "params": session.params}
    assert lines[0]["model"] == "m" and lines[0]["ip"] == "127.0.0.1" and "ip" not in lines[1]
    assert "你好" in path.read_text(encoding="utf-8")  # readable, not \u-escaped
    with pytest.raises(ValueError, match="vote must be one of"):
        vote_record("meh", session, None, day)


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


def test_streams_stop_only_the_current_answer():
    streams = Streams()
    first = streams.start(("tab", "chat"))
    second = streams.start(("tab", "chat"))  # a new answer replaces (and stops) the old one
    other = streams.start(("tab", "translate"))
    assert first.cancelled and not second.cancelled
    assert streams.stop(("tab", "chat")) and second.cancelled and not other.cancelled
    assert not streams.stop(("tab", "chat"))
    streams.finish(("tab", "translate"), other)
    assert not streams.stop(("tab", "translate"))


def test_unreachable_controller_and_worker_fail_fast_with_a_message():
    async def probe():
        url = f"http://127.0.0.1:{unused_port()}"
        with pytest.raises(ServeError, match="cannot reach the controller") as e:
            await ControllerClient(url).list_models()
        assert e.value.kind == CONTROLLER_DOWN
        with pytest.raises(ServeError, match="cannot reach the worker") as e:
            async with generate_stream(url, {"model": "m", "messages": []}) as chunks:
                async for _ in chunks:
                    pass
        assert e.value.kind == WORKER_GONE

    asyncio.run(asyncio.wait_for(probe(), 10))
