"""Each generating suite end to end on the demo model with tiny inputs, and resuming a killed run, on both
backends (torch, llama.cpp); answers are checked against each backend's own reference (tests/backends.py)."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from backends import BACKENDS, demo, reference
from bayling.eval.answer import answer_rows
from bayling.eval.cli import main
from bayling.eval.data import load_questions
from bayling.eval.engine import EvalModel
from bayling.eval.exam import run_exam
from bayling.eval.translate import run_constrained, run_translate
from bayling.params import GenerationParams
from eval_helpers import PYTHON, ROOT, read_jsonl

SAMPLES = ROOT / "data" / "samples"
MAX_NEW = 16
KILL_TIMEOUT_S = 240


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def engine(backend):
    return EvalModel.from_loaded(demo(backend), GenerationParams(temperature=0, max_new_tokens=MAX_NEW),
                                 batch_size=2, show_progress=False)


def test_answer_multi_turn_uses_the_history_and_matches_the_reference(engine, backend, tmp_path):
    rows = load_questions(str(SAMPLES / "questions.multiturn.en.jsonl"))
    out = tmp_path / "res.multiturn.jsonl"
    assert answer_rows(engine, rows, out) == 2
    answers = read_jsonl(out)
    tok, ref = engine.loaded.tokenizer, reference(backend)
    for row, ans in zip(rows, answers):
        assert {k: ans[k] for k in row} == row and len(ans["response"]) == 2
        # Turn 2 is answered after turn 1 and its answer, as the backend's own greedy generation would.
        conv = engine.conversation(row["text"], [ans["response"][0]])
        assert ans["response"][1] == ref.greedy(conv.prompt_for_reply(tok), MAX_NEW).text
        first = engine.conversation(row["text"][:1])
        assert ans["response"][0] == ref.greedy(first.prompt_for_reply(tok), MAX_NEW).text


def test_translate_then_score_translation(engine, tmp_path, capsys):
    hyp = tmp_path / "hyp.zh"
    assert run_translate(engine, SAMPLES / "translate.en-zh.en", hyp, "zh") == 3
    lines = hyp.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and all("\n" not in x for x in lines)
    assert main(["score-translation", "--hyp", str(hyp), "--ref", str(SAMPLES / "translate.en-zh.zh"),
                 "--tgt-lang", "zh", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= result["bleu"] <= 100 and result["segments"] == 3 and "tok:zh" in result["bleu_signature"]


def test_constrained_then_score_constrained(engine, tmp_path, capsys):
    out = tmp_path / "hypo.en-zh.zh.jsonl"
    assert run_constrained(engine, SAMPLES / "constrained.en-zh.jsonl", out, "zh", "zh") == 3
    rows = read_jsonl(out)
    assert [set(r) for r in rows] == [{"src", "tgt", "constraint", "hypo"}] * 3
    assert main(["score-constrained", "--hyp", str(out), "--tgt-lang", "zh", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["constraint_words"] == 6 and set(result["by_constraint_count"]) == {"1", "2", "3"}


def test_exam_then_score_exam(engine, tmp_path, capsys):
    written = run_exam(engine, SAMPLES / "agieval", tmp_path, ["logiqa-en", "gaokao-physics", "math"])
    assert [p.name for p in written.values()] == [f"predict.{engine.name}.{t}.zero-shot.jsonl"
                                                 for t in ("logiqa-en", "gaokao-physics", "math")]
    for path in written.values():
        rows = read_jsonl(path)
        assert len(rows) == 2 and all(set(r) == {"text", "usage", "finish_reason", "model"} for r in rows)
    assert main(["score-exam", "--pred-dir", str(tmp_path), "--gold-dir", str(SAMPLES / "agieval"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(scores) == {"logiqa-en", "gaokao-physics", "math"}
    assert all(v in (0.0, 50.0, 100.0) for v in scores.values())


def test_answer_resumes_after_the_process_is_killed(engine, backend, tmp_path):
    """Kill `answer` after its first row, leave a half-written row, run it again: same file as one run."""
    out = tmp_path / "res.jsonl"
    args = [PYTHON, "-m", "bayling.eval", "answer", "--questions", str(SAMPLES / "questions.singleturn.en.jsonl"),
            "--output", str(out), "--device", "cpu", "--max-new-tokens", str(MAX_NEW), "--batch-size", "1",
            "--no-progress", "--backend", backend]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while not (out.exists() and out.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no row written in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = out.read_text().count("\n")
    assert 1 <= done < 4
    with open(out, "a") as f:
        f.write('{"question_id": 99, "te')  # as if killed mid-write

    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=KILL_TIMEOUT_S)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "4 rows in" in again.stdout

    reference = tmp_path / "one-run.jsonl"
    rows = load_questions(str(SAMPLES / "questions.singleturn.en.jsonl"))
    single = EvalModel.from_loaded(engine.loaded, GenerationParams(temperature=0, max_new_tokens=MAX_NEW),
                                batch_size=1, show_progress=False)
    answer_rows(single, rows, reference)
    assert read_jsonl(out) == read_jsonl(reference)
