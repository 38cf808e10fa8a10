"""`judge` end to end against a real OpenAI-compatible server on 127.0.0.1 serving the demo model.

The endpoint is FastChat's stack as real processes: FastChat's controller, our model_worker.py
(demo model, CPU) and FastChat's OpenAI API server. The demo model rarely writes parseable
scores: the test checks that every review is kept and that unparseable ones are counted as such
(the parser itself is tested on hand-written reviews in test_eval_scorers.py).
"""
from __future__ import annotations

import json

import pytest

from bayling.eval.cli import main
from bayling.eval.judge import FORWARD, REVERSE, UNPARSEABLE, parse_review, result_of
from eval_helpers import read_jsonl, write_jsonl
from stack import free_port, http_json, start_controller, start_openai_server, start_worker, stop_all

MAX_TOKENS = "24"


@pytest.fixture(scope="module")
def judge_endpoint(tmp_path_factory):
    """(base_url, model name) of FastChat's OpenAI server in front of our worker; stopped after the module."""
    log_dir = tmp_path_factory.mktemp("judge-servers")
    services = []
    try:
        controller = start_controller(log_dir)
        services.append(controller)
        services.append(start_worker(controller.url, log_dir))
        services.append(start_openai_server(controller.url, log_dir))
        base = services[-1].url + "/v1"
        yield base, http_json(base + "/models", method="GET")["data"][0]["id"]
    finally:
        stop_all(reversed(services))


def answer_files(tmp_path):
    a = write_jsonl(tmp_path / "sys-a.jsonl", [
        {"question_id": 1, "text": "What is 2 + 2?", "category": "math", "response": ["2 + 2 = 4."]},
        {"question_id": 2, "text": ["Name a fruit.", "What colour is it?"], "category": "generic",
         "response": ["An apple.", "It is usually red or green."]},
    ])
    b = write_jsonl(tmp_path / "sys-b.jsonl", [
        {"question_id": 2, "text": ["Name a fruit.", "What colour is it?"], "category": "generic",
         "response": ["Banana.", "Blue."]},
        {"question_id": 1, "text": "What is 2 + 2?", "category": "math", "response": ["It is 5."]},
    ])
    return a, b


def test_judge_both_orders_keeps_unparseable_reviews_and_resumes(judge_endpoint, tmp_path, capsys):
    base, model = judge_endpoint
    a, b = answer_files(tmp_path)
    out = tmp_path / "review.jsonl"
    args = ["judge", "--answers", str(a), str(b), "--names", "alpha", "beta", "--output", str(out),
            "--judge-base-url", base, "--judge-model", model, "--judge-max-tokens", MAX_TOKENS,
            "--judge-api-key-env", "BAYLING_TEST_NO_SUCH_KEY", "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err

    rows = read_jsonl(out)
    assert [(r["question_id"], r["order"]) for r in rows] == [(1, FORWARD), (1, REVERSE), (2, FORWARD), (2, REVERSE)]
    for r in rows:
        assert r["review"].strip(), "empty review"
        assert set(r) >= {"question_id", "question", "category", "system1", "system2", "review", "score", "result"}
        # The stored result is exactly what the review says; nothing is guessed.
        assert r["result"] == result_of(parse_review(r["review"]))
        if r["result"] == UNPARSEABLE:
            assert r["score"] is None
    assert rows[0]["system1"] == {"name": "alpha", "response": ["2 + 2 = 4."]}
    assert rows[1]["system1"] == {"name": "beta", "response": ["It is 5."]}
    assert rows[3]["system2"]["response"] == ["An apple.", "It is usually red or green."]
    unparseable = sum(r["result"] == UNPARSEABLE for r in rows)
    assert f"unparseable {unparseable}" in capsys.readouterr().out

    # A second run finds every row done and asks nothing.
    assert main(args) == 0
    assert read_jsonl(out) == rows

    chart = tmp_path / "chart.png"
    assert main(["summarize", "--reviews", str(out), "--chart", str(chart), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    overall = summary["categories"]["overall"]
    assert sum(overall.values()) == 2
    bad_questions = {r["question_id"] for r in rows if r["result"] == UNPARSEABLE}
    assert overall[UNPARSEABLE] == len(bad_questions)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_judge_endpoint_errors_are_one_line(tmp_path, capsys):
    a, b = answer_files(tmp_path)
    code = main(["judge", "--answers", str(a), str(b), "--output", str(tmp_path / "r.jsonl"),
                 "--judge-base-url", f"http://127.0.0.1:{free_port()}/v1", "--judge-model", "x",
                 "--judge-retries", "0", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: judge endpoint" in err and "Traceback" not in err
