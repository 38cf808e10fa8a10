"""chat.py and api.py driven end to end on the demo model, as a user would run them."""
import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT

QUESTION = "What is the capital of France?"
GOLDEN = "The capital of France is Paris."  # the demo model's greedy answer


def run_script(script, args, stdin="", timeout=240):
    return subprocess.run([sys.executable, str(ROOT / script), *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def programmatic_session(tmp_path_factory):
    """One chat.py process that goes through every command (the model loads once)."""
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
    result = run_script("chat.py", ["--style", "programmatic", "--temperature", "0", "--max-new-tokens", "48",
                                    "--debug"], "\n".join(turns) + "\n")
    return result, saved


def test_golden_answer_and_commands(programmatic_session):
    result, saved = programmatic_session
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines[0] == GOLDEN
    assert lines[1] == GOLDEN  # !!regen, greedy
    record = json.loads(lines[2])
    assert record["content"] == GOLDEN and record["finish_reason"] == "stop"
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
    _, saved = programmatic_session
    data = json.loads(saved.read_text())
    assert data["template"] == "tokenizer" and data["system"] is None
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert data["messages"][1]["content"] == GOLDEN


def test_simple_style_empty_line_exits():
    result = run_script("chat.py", ["--temperature", "0", "--max-new-tokens", "24"], f"{QUESTION}\n\nnot read\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"ASSISTANT: {GOLDEN}" in result.stdout
    assert result.stdout.count("ASSISTANT:") == 1


def test_api_json_from_stdin():
    result = run_script("api.py", ["--message", "-", "--json", "--temperature", "0"], QUESTION)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["text"] == GOLDEN and out["finish_reason"] == "stop"
    assert out["usage"]["prompt_tokens"] > 0 and out["usage"]["total_tokens"] == (
        out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"])


def test_bad_model_path_fails_fast_with_one_line():
    start = time.monotonic()
    result = run_script("chat.py", ["--model-path", "/no/such/model"], "hi\n")
    elapsed = time.monotonic() - start
    assert result.returncode == 2
    assert result.stderr.strip() == "error: model path /no/such/model does not exist"
    assert elapsed < 5, elapsed


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "error: temperature must be a number >= 0"),
    (["--conv-template", "nope"], "error: unknown conversation template 'nope'"),
])
def test_bad_flags_fail_before_loading(args, message):
    result = run_script("api.py", ["-m", "hi", *args])
    assert result.returncode == 2 and result.stderr.strip().startswith(message)


def test_folder_that_is_not_a_model(tmp_path):
    result = run_script("api.py", ["-m", "hi", "--model-path", str(tmp_path)])
    assert result.returncode == 2 and "not a Hugging Face model folder" in result.stderr
