"""Scorers and prompt builders against hand-computed expectations; no model needed."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bayling.eval.cli import main
from bayling.eval.exam import exam_prompt, prediction_path
from bayling.eval.exam_score import extract_choice, extract_choices, is_correct, prediction_text
from bayling.eval.judge import LOSS, TIE, UNPARSEABLE, WIN, judge_messages, parse_review, result_of
from bayling.eval.math_equiv import extract_math_answer, math_equal
from bayling.eval.mt_scores import bleu_chrf, constraint_hits
from bayling.eval.summarize import summarize
from bayling.eval.translate import constrained_instruction, translation_instruction
from eval_helpers import PYTHON, write_jsonl

SACREBLEU = str(Path(PYTHON).parent / "sacrebleu")


# --- prompts: upstream's wording ------------------------------------------------------------------

def test_translation_instructions_are_upstreams():
    assert translation_instruction("Good morning.", "zh") == \
        "Provide the Chinese translation for this sentence: Good morning."
    assert translation_instruction("早上好。", "en", "zh") == "提供这句话的英文翻译：早上好。"
    assert constrained_instruction("Nice day.", ["天气", "很好"], "zh") == \
        "Provide the Chinese translation for this sentence: Nice day.\nMake sure to include these words: 天气, 很好"
    assert constrained_instruction("天气很好。", ["nice", "day"], "en", "zh") == \
        "提供这句话的英文翻译：天气很好。\n确保包含这些词：nice, day"  # upstream joins with ", "
    with pytest.raises(ValueError, match="instruction-lang"):
        translation_instruction("x", "zh", "fr")


def test_exam_prompts_follow_upstream_inputs():
    row = {"passage": "P.", "question": "Q?", "options": ["(A)a", "(B)b"], "label": "A"}
    assert exam_prompt(row, "logiqa-en") == ('P.\n\nQuestion:\nQ?\nChoices:\n(A)a\n(B)b\n\nAnswer:\n'
                                             'Output the correct answer in this format: "Answer is choice ()"')
    assert exam_prompt({**row, "passage": None}, "gaokao-biology") == \
        '问题：\nQ?\n选项：\n(A)a\n(B)b\n\n答案：\n按照此格式输出正确答案："答案是选项()"'
    assert exam_prompt({"passage": None, "question": "1+1?"}, "math") == "Question: 1+1?\nAnswer: The answer is"
    assert exam_prompt({"passage": None, "question": "1+1?"}, "gaokao-mathcloze") == "问题：1+1?\n答案："
    assert prediction_path(Path("o"), "M-1", "math").name == "predict.M-1.math.zero-shot.jsonl"
    with pytest.raises(ValueError, match="unknown AGIEval task"):
        exam_prompt(row, "no-such-task")


# --- exam answer extraction --------------------------------------------------------------------------

@pytest.mark.parametrize("text, letter", [
    ("Answer is choice (B)", "B"),
    ("Answer is C.", "C"),
    ("Answer is (D) The microwave only heats the water.", "D"),
    ("The answer is: E", "E"),
    ("答案是选项(A)", "A"),
    ("正确答案：C。因为……", "C"),
    ("我们应选择D", "D"),
    ("C)原子弹是根据核裂变原理研制的", "C"),  # gpt-3.5-turbo style: no phrase, the first lone letter
    ("DNA replication is semiconservative.", ""),  # letters inside words do not count
    ("Answer is choice ()", ""),
    ("", ""),
])
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_extract_choices_for_multi_answer_tasks():
    assert extract_choices("答案是AD") == {"A", "D"}
    assert extract_choices("答案是选项(A)(C)\n解析：(B)错误") == {"A", "C"}  # the answer line wins
    assert extract_choices("C)火星……\n\n解析：(A)不对") == {"A", "C"}  # no answer line: every letter
    assert is_correct("gaokao-physics", "答案是选项(A)(D)", ["A", "D"])
    assert not is_correct("gaokao-physics", "答案是选项(A)", ["A", "D"])
    assert is_correct("gaokao-physics", "答案是选项(C)", "C")


def test_math_cloze_extraction_and_equivalence():
    assert extract_math_answer("So we get $x = \\frac{1}{2}$.") == "\\frac{1}{2}"
    assert extract_math_answer("Thus \\boxed{y=\\frac{3}{4}} is it") == "\\frac{3}{4}"
    assert extract_math_answer("The answer is 56") == "56"
    assert extract_math_answer("x = 7.") == "7"
    assert extract_math_answer("no number here") is None
    assert math_equal("0.5", "\\frac{1}{2}")
    assert math_equal("\\dfrac12", "\\frac{1}{2}")
    assert math_equal("3/4", "\\frac{3}{4}")
    assert math_equal("90^\\circ", "90")
    assert math_equal("k = 3", "3")
    assert math_equal("\\sqrt2", "\\sqrt{2}")
    assert not math_equal("2", "3")
    assert not math_equal(None, "3")


def test_prediction_rows_of_every_format():
    assert prediction_text({"text": "Answer is (A)", "usage": {}}) == "Answer is (A)"
    assert prediction_text({"choices": [{"message": {"role": "assistant", "content": "B)x"}}]}) == "B)x"
    assert prediction_text({"choices": [{"text": " C"}]}) == " C"
    assert prediction_text(None) == "" and prediction_text("null") == ""


def test_score_exam_json_matches_hand_count(tmp_path, capsys):
    gold, pred = tmp_path / "gold", tmp_path / "pred"
    write_jsonl(gold / "logiqa-en.jsonl", [{"passage": "", "question": "q", "options": [], "label": "A"},
                                           {"passage": "", "question": "q", "options": [], "label": "B"},
                                           {"passage": "", "question": "q", "options": [], "label": "C"}])
    write_jsonl(gold / "gaokao-physics.jsonl", [{"question": "q", "label": ["A", "D"]},
                                                {"question": "q", "label": "C"}])
    write_jsonl(gold / "math.jsonl", [{"question": "q", "label": None, "answer": "\\frac{3}{4}"},
                                      {"question": "q", "label": None, "answer": "56"}])
    write_jsonl(pred / "predict.m.logiqa-en.zero-shot.jsonl", [
        {"text": "Answer is choice (A)"},  # right
        {"choices": [{"message": {"content": "C) because ..."}}]},  # raw OpenAI object, wrong
        {"text": "Answer is choice C. Answer is choice A."}])  # the first answer phrase counts: right
    write_jsonl(pred / "predict.m.gaokao-physics.zero-shot.jsonl", [{"text": "答案是选项(A)(D)"},
                                                                    {"text": "答案是选项(A)"}])
    write_jsonl(pred / "predict.m.math.zero-shot.jsonl", [{"text": "so it is $\\dfrac{3}{4}$"},
                                                          {"text": " 56, since 7 times 8 is 56"}])
    assert main(["score-exam", "--pred-dir", str(pred), "--gold-dir", str(gold), "--json", "--rule", "strict"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == {"gaokao-physics": 50.0, "logiqa-en": 66.67, "math": 100.0}
    assert any(line.startswith("average") for line in out)


def test_score_exam_refuses_mismatched_counts_and_mixed_models(tmp_path, capsys):
    gold, pred = tmp_path / "gold", tmp_path / "pred"
    write_jsonl(gold / "math.jsonl", [{"question": "q", "answer": "1"}] * 2)
    write_jsonl(pred / "predict.m.math.zero-shot.jsonl", [{"text": "1"}])
    assert main(["score-exam", "--pred-dir", str(pred), "--gold-dir", str(gold)]) == 2
    err = capsys.readouterr().err
    assert "1 predictions" in err and "2 questions" in err
    write_jsonl(pred / "predict.other.math.zero-shot.jsonl", [{"text": "1"}] * 2)
    assert main(["score-exam", "--pred-dir", str(pred), "--gold-dir", str(gold)]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["score-exam", "--pred-dir", str(pred), "--gold-dir", str(gold), "--model", "other", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"math": 100.0}


# --- translation scores ---------------------------------------------------------------------------

@pytest.mark.parametrize("lang, refs, hyps", [
    ("zh", ["今天天气很好。", "请给我一杯茶。", "图书馆早上九点开门。"], ["今天的天气很好。", "请给我一杯水。", "图书馆九点开门"]),
    ("en", ["The weather is nice today.", "A cup of tea, please.", "The library opens at nine."],
     ["Today the weather is nice.", "A cup of tea please.", "The library opens at 9 o'clock."]),
])
def test_score_translation_equals_sacrebleu_cli(tmp_path, capsys, lang, refs, hyps):
    ref, hyp = tmp_path / "ref.txt", tmp_path / "hyp.txt"
    ref.write_text("\n".join(refs) + "\n", encoding="utf-8")
    hyp.write_text("\n".join(hyps) + "  \n", encoding="utf-8")  # trailing spaces: the CLI strips them too
    cli = subprocess.run([SACREBLEU, str(ref), "-i", str(hyp), "-m", "bleu", "chrf", "-l", f"xx-{lang}",
                          "-f", "json", "-w", "4"], capture_output=True, text=True, check=True)
    expected = {m["name"]: m["score"] for m in json.loads(cli.stdout)}
    assert main(["score-translation", "--hyp", str(hyp), "--ref", str(ref), "--tgt-lang", lang, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert round(result["bleu"], 4) == expected["BLEU"]
    assert round(result["chrf"], 4) == expected["chrF2"]
    assert ("tok:zh" if lang == "zh" else "tok:13a") in result["bleu_signature"]
    assert result["comet"] is None and "unbabel-comet" in result["comet_note"] and "COMET" in "\n".join(out)


def test_score_constrained_by_hand(tmp_path, capsys):
    rows = [{"src": "s1", "tgt": "今天天气很好。", "constraint": ["天气"], "hypo": "今天天气很好。"},
            {"src": "s2", "tgt": "请给我一杯茶。", "constraint": ["一杯茶", "请"], "hypo": "请给我一杯水。"},
            {"src": "s3", "tgt": "图书馆早上九点开门。", "constraint": ["图书馆", "九点", "开门"], "hypo": "图书馆九点开门"}]
    path = write_jsonl(tmp_path / "hypo.jsonl", rows)
    assert main(["score-constrained", "--hyp", str(path), "--tgt-lang", "zh", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["constraint_words"] == 6
    assert result["constraint_rate"] == pytest.approx(500 / 6)
    assert {n: g["rate"] for n, g in result["by_constraint_count"].items()} == {"1": 100.0, "2": 50.0, "3": 100.0}
    assert result["bleu"] == pytest.approx(bleu_chrf([r["hypo"] for r in rows], [r["tgt"] for r in rows], "zh")["bleu"])
    assert constraint_hits("Cat and dog", ["cat", "dog"]) == 1  # exact, case-sensitive


# --- judge parsing and summary ------------------------------------------------------------------

def test_parse_review_on_hand_written_reviews():
    good = "Evaluation evidence: Assistant 1 is right.\nScore of the Assistant 1: 8\nScore of the Assistant 2: 6"
    assert parse_review(good) == (8.0, 6.0) and result_of(parse_review(good)) == WIN
    assert parse_review("score of assistant 1: 7.5\nScore of the Assistant 2: **7.5**") == (7.5, 7.5)
    assert result_of((7.5, 7.5)) == TIE and result_of((3, 9)) == LOSS
    assert parse_review("Score of the Assistant 1: 8\n(no second score)") is None
    assert parse_review("Score of the Assistant 1: 11\nScore of the Assistant 2: 6") is None  # out of range
    assert parse_review("Score of the Assistant 1: 8\nScore of the Assistant 2: 6\n"
                        "Score of the Assistant 1: 5") is None  # contradicts itself: not guessed
    assert parse_review("Assistant 1 deserves 8 and Assistant 2 deserves 6.") is None
    assert result_of(None) == UNPARSEABLE
    messages = judge_messages(["Hi", "And?"], ["a1", "a2"], ["b"])
    assert messages[1]["content"].startswith("[Question]\n[Turn 1] Hi\n\n[Turn 2] And?\n\n"
                                             "[The Start of Assistant 1's Answer]\n[Turn 1] a1")
    assert "Score of the Assistant 1: <score>" in messages[1]["content"]


def review(qid, category, order, score, result=None):
    a, b = {"name": "alpha", "response": ["x"]}, {"name": "beta", "response": ["y"]}
    first, second = (a, b) if order == "AB" else (b, a)
    return {"question_id": qid, "question": "q", "category": category, "order": order, "system1": first,
            "system2": second, "review": "...", "score": score,
            "result": result or result_of(tuple(score) if score else None)}


def test_summarize_adds_both_orders_and_counts_unparseable(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [
        review(1, "math", "AB", [8, 6]), review(1, "math", "BA", [7, 7]),  # alpha 15 vs 13: win
        review(2, "math", "AB", [5, 6]), review(2, "math", "BA", [9, 4]),  # alpha 9 vs 15: loss
        review(3, "writing", "AB", [6, 6]), review(3, "writing", "BA", [6, 6]),  # tie
        review(4, "writing", "AB", [9, 1]), review(4, "writing", "BA", None),  # unparseable, not a win
    ])
    system, opponent, table = summarize([path])
    assert (system, opponent) == ("alpha", "beta")
    assert table["math"] == {WIN: 1, TIE: 0, LOSS: 1, UNPARSEABLE: 0}
    assert table["writing"] == {WIN: 0, TIE: 1, LOSS: 0, UNPARSEABLE: 1}
    assert table["overall"] == {WIN: 1, TIE: 1, LOSS: 1, UNPARSEABLE: 1}
    assert list(table)[-1] == "overall"
    _, _, flipped = summarize([path], system="beta")
    assert flipped["overall"] == {WIN: 1, TIE: 1, LOSS: 1, UNPARSEABLE: 1}
    assert flipped["math"][WIN] == 1 and flipped["math"][LOSS] == 1
