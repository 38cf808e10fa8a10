"""chat.py and api.py driven end to end on the demo model, as a user would run them, on both backends;
answers are checked against each backend's own greedy reference (tests/backends.py)."""
import json
import subprocess
import sys
import time

import pytest

from backends import BACKENDS, demo, reference
from bayling.templates import Conversation, Message, get_template
from conftest import ROOT

QUESTION = "What is the capital of France?"
GOLDEN = "The capital of France is Paris."  # the demo model's greedy answer through transformers (float32)
CHAT_TOKENS = 48


def golden(backend, max_new_tokens, system=None):
    """The backend's own greedy answer to QUESTION, as chat.py renders it (the tokenizer's template)."""
    conv = Conversation(get_template("tokenizer"), system, [Message("user", QUESTION)])
    ref = reference(backend).greedy(conv.prompt_for_reply(demo(backend).tokenizer), max_new_tokens)
    if backend == "torch":
        assert ref.text == GOLDEN
    return ref


def run_script(script, args, stdin="", timeout=240):
    return subprocess.run([sys.executable, str(ROOT / script), *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module", params=BACKENDS)
def programmatic_session(request, tmp_path_factory):
    """One chat.py process per backend that goes through every command (the model loads once)."""
    backend = request.param
    tmp = tmp_path_factory.mktemp("chat")
    saved = tmp / "conv.json"
    turns = [
        QUESTION,                       # 1: golden answer
        "!!save " + str(saved),
        "!!regen",                      # 2: same answer again (greedy)
        "!!remove",
        json.dumps({"content": QUESTION}),  # 3: a JSON turn gets a JSON line
        "!!reset",
        "!!system You always answer in French.",
        json.dumps("Hello"),            # 4: a JSON string turn, answered as one JSON line
        "q",
        "!!load " + str(saved),
        "!!bogus",
        "!!exit",
        "never read",
    ]
    result = run_script("chat.py", ["--style", "programmatic", "--temperature", "0", "--max-new-tokens",
                                    str(CHAT_TOKENS), "--debug", "--backend", backend], "\n".join(turns) + "\n")
    return result, saved, golden(backend, CHAT_TOKENS)


def test_golden_answer_and_commands(programmatic_session):
    result, saved, want = programmatic_session
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines[0] == want.text
    assert lines[1] == want.text  # !!regen, greedy
    record = json.loads(lines[2])
    assert record["content"] == want.text and record["finish_reason"] == want.finish_reason
    assert record["usage"]["completion_tokens"] > 0
    assert json.loads(lines[3])["role"] == "assistant"
    assert len(lines) == 4  # nothing after !!exit
    err = result.stderr
    assert "Using the demo model" in err and "--model-path" in err
    assert "history cleared" in err and "removed the last turn" in err
    assert "system prompt set" in err and "unknown command !!bogus" in err
    assert "loaded 2 messages" in err
    assert "You always answer in French." in err  # --debug prints the prompt
    assert "tokens_per_s" in err


def test_saved_conversation_file(programmatic_session):
    _, saved, want = programmatic_session
    data = json.loads(saved.read_text())
    assert data["template"] == "tokenizer" and data["system"] is None
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert data["messages"][1]["content"] == want.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_simple_style_empty_line_exits(backend):
    result = run_script("chat.py", ["--temperature", "0", "--max-new-tokens", "24", "--backend", backend],
                        f"{QUESTION}\n\nnot read\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"ASSISTANT: {golden(backend, 24).text}" in result.stdout
    assert result.stdout.count("ASSISTANT:") == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_api_json_from_stdin(backend):
    result = run_script("api.py", ["--message", "-", "--json", "--temperature", "0", "--max-new-tokens", "24",
                                   "--backend", backend], QUESTION)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    want = golden(backend, 24)
    assert out["text"] == want.text and out["finish_reason"] == want.finish_reason
    assert out["usage"]["completion_tokens"] == len(want.token_ids) + (want.finish_reason == "stop")
    assert out["usage"]["prompt_tokens"] > 0 and out["usage"]["total_tokens"] == (
        out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"])


@pytest.mark.parametrize("backend,path", [("torch", "/no/such/model"), ("llama.cpp", "/no/such/model.gguf")])
def test_bad_model_path_fails_fast_with_one_line(backend, path):
    start = time.monotonic()
    result = run_script("chat.py", ["--model-path", path, "--backend", backend], "hi\n")
    elapsed = time.monotonic() - start
    assert result.returncode == 2
    if backend == "torch":
        assert result.stderr.strip() == f"error: model path {path} does not exist"
    else:
        assert result.stderr.strip().startswith("error: ") and path in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert elapsed < 5, elapsed


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "error: temperature must be a number >= 0"),
    (["--conv-template", "nope"], "error: unknown conversation template 'nope'"),
])
def test_bad_flags_fail_before_loading(args, message):
    result = run_script("api.py", ["-m", "hi", *args])
    assert result.returncode == 2 and result.stderr.strip().startswith(message)


def test_folder_that_is_not_a_model(tmp_path):
    result = run_script("api.py", ["-m", "hi", "--model-path", str(tmp_path), "--backend", "torch"])
    assert result.returncode == 2 and "not a Hugging Face model folder" in result.stderr
