"""score-exam's two answer-extraction rules on hand-written replies that tell them apart.

The `agieval` expectations follow AGIEval's post_process.py convention as the issue states it:
delete the case-sensitive "Answer" and "Choice", take the first capital A-F (multi-answer: every
capital A-F, as a set).
"""
from __future__ import annotations

import json

import pytest

from bayling.eval.cli import main
from bayling.eval.exam_score import agieval_choice, agieval_choices, is_correct
from eval_helpers import write_jsonl

# (reply, gold, correct under agieval, correct under strict)
SINGLE = [
    ("Answer: B", "B", True, True),  # "Answer" deleted, so its A does not count
    ("Choice (C) is right", "C", True, True),
    ("The DNA strand is copied, so the answer is C", "C", False, True),  # D of "DNA" wins under agieval
    ("Since \\Delta = 4, the answer is B", "B", False, True),  # D of \Delta (LaTeX) wins under agieval
    ("I think it is b, maybe (B)", "B", True, True),
    ("answer: A", "A", True, True),  # lower-case "answer" is not deleted, its letters are not capitals
    ("Because Bob left early, option A", "A", False, True),  # B of "Bob"
]


@pytest.mark.parametrize("reply,gold,agieval,strict", SINGLE)
def test_single_answer_rules_differ(reply, gold, agieval, strict):
    assert is_correct("logiqa-en", reply, gold, "agieval") is agieval
    assert is_correct("logiqa-en", reply, gold, "strict") is strict


def test_agieval_single_answer_is_first_capital_after_deletions():
    assert agieval_choice("Answer: B") == "B"
    assert agieval_choice("The DNA strand ... C") == "D"
    assert agieval_choice("\\Delta = 4 so B") == "D"
    assert agieval_choice("no letter here") == ""
    assert agieval_choice("AnswerChoice E") == "E"


def test_agieval_multi_answer_is_every_capital():
    assert agieval_choices("答案是(A)(D)") == {"A", "D"}
    assert agieval_choices("答案是选项(A)(C)\n解析：(B)错误") == {"A", "B", "C"}  # strict keeps the answer line
    assert is_correct("gaokao-physics", "答案是选项(A)(C)\n解析：(B)错误", ["A", "C"], "strict")
    assert not is_correct("gaokao-physics", "答案是选项(A)(C)\n解析：(B)错误", ["A", "C"], "agieval")
    assert is_correct("gaokao-physics", "AD", ["A", "D"], "agieval")


def test_cloze_is_the_same_under_both_rules():
    for rule in ("agieval", "strict"):
        assert is_correct("math", "so it is $\\dfrac{3}{4}$", "\\frac{3}{4}", rule)
        assert not is_correct("math", "so it is $5$", "\\frac{3}{4}", rule)


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown scoring rule 'loose'"):
        is_correct("logiqa-en", "A", "A", "loose")


@pytest.mark.parametrize("rule,expected", [(None, 25.0), ("agieval", 25.0), ("strict", 100.0)])
def test_cli_prints_the_rule_and_scores_with_it(rule, expected, tmp_path, capsys):
    gold, pred = tmp_path / "gold", tmp_path / "pred"
    cases = [c for c in SINGLE if c[2] != c[3]][:3] + [SINGLE[0]]
    write_jsonl(gold / "logiqa-en.jsonl", [{"passage": "", "question": "q", "options": [], "label": g}
                                           for _, g, _, _ in cases])
    write_jsonl(pred / "predict.m.logiqa-en.zero-shot.jsonl", [{"text": r} for r, _, _, _ in cases])
    argv = ["score-exam", "--pred-dir", str(pred), "--gold-dir", str(gold), "--json"]
    assert main(argv + (["--rule", rule] if rule else [])) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith(f"scoring rule: {rule or 'agieval'}")
    assert json.loads(out[-1]) == {"logiqa-en": expected}
