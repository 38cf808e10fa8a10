"""chat.py --style programmatic for scripts: JSON turns are text, bad turns get one error line, !!save and
!!load failures keep the session."""
import io
import json

from bayling.chat.io import ProgrammaticChatIO
from bayling.chat.loop import handle_command
from bayling.templates import Conversation, Message, get_template


def turns(text):
    out = io.StringIO()
    chatio = ProgrammaticChatIO(io.StringIO(text), out)
    got = []
    while (t := chatio.read_user()) is not None:
        got.append((t, chatio.text_only))
    return got, [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_turns_are_text_and_bad_turns_get_one_error_line_each():
    got, errors = turns('{"content": "!!save /tmp/x"}\n{"content": \n[1, 2]\n{"command": "!!reset"}\nhello\n')
    assert got == [("!!save /tmp/x", True), ("!!reset", False), ("hello", False)]
    assert len(errors) == 2 and all("error" in e for e in errors)


class _Session:
    def __init__(self):
        self.conv = Conversation(get_template("tokenizer"), None, [Message("user", "hi"), Message("assistant", "yo")])


class _IO:
    def __init__(self):
        self.lines = []

    def info(self, text):
        self.lines.append(text)


def test_save_and_load_failures_keep_the_session(tmp_path):
    session, chatio = _Session(), _IO()
    for line in (f"!!save {tmp_path}/missing/dir/x.json", f"!!save {tmp_path}"):
        assert handle_command(session, line, chatio) == "handled"
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2, 3]")
    assert handle_command(session, f"!!load {bad}", chatio) == "handled"
    assert len(chatio.lines) == 3 and all(line.startswith("could not") for line in chatio.lines), chatio.lines
    assert [m.content for m in session.conv.messages] == ["hi", "yo"]
