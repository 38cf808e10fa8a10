"""`score-exam`: accuracy per AGIEval task, under one of two answer-extraction rules.

`agieval` (default) is the convention of AGIEval's post_process.py, which produced the BayLing
paper's exam tables: a single answer is the first capital A-F anywhere in the reply after deleting
the case-sensitive substrings "Answer" and "Choice" (a capital inside a word counts); a
multi-answer reply is every capital A-F in it, as a set; cloze answers use math_equiv.

`strict` is this project's closer reading, which reads replies better but does not reproduce
published numbers. Choice questions: the option letter that follows an answer phrase ("Answer is choice (B)",
"The answer is C", "答案是选项(A)", "答案：B", "应选择D"); without one, the first option
letter standing on its own (AGIEval's zero-shot rule of "first capital letter", but a letter
inside a word such as the A of "Answer" or of "DNA" does not count). Multi-answer tasks
(jec-qa-kd, jec-qa-ca, gaokao-physics) collect every option letter and compare the set.
Cloze tasks use math_equiv. Prediction rows may be ours ({"text": ...}) or raw OpenAI
completions (choices[0].message.content or choices[0].text), as upstream's gpt-3.5-turbo files.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .exam import CHINESE_CLOZE, ENGLISH_CLOZE, MULTI_ANSWER, SETTING, task_kind
from .io import read_jsonl
from .math_equiv import extract_math_answer, math_equal

LETTERS = "ABCDEFG"
# A run of option letters not touching other Latin letters: "(B)", "B.", "选B", "AC" but not "Answer", "DNA".
_LETTER_RUN = re.compile(r"(?<![A-Za-z])([A-G]+)(?![A-Za-z])")
_ANSWER_PHRASE = re.compile(
    r"answer\s*(?:is|:|：)\s*(?:choice|option)?\s*[:：]?"  # English
    r"|答案\s*(?:是|为|：|:)\s*(?:选项)?"  # Chinese
    r"|应选择?|选择\s*(?:选项)?",
    re.IGNORECASE)
_PREDICTION_NAME = re.compile(r"^predict\.(?P<model>.+)\.(?P<task>[^.]+)\." + re.escape(SETTING) + r"\.jsonl$")


def prediction_text(row: Any) -> str:
    """The answer text of one prediction row, whichever format wrote it."""
    if row is None or row == "null":
        return ""
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        if isinstance(row.get("text"), str):
            return row["text"]
        choices = row.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            first = choices[0]
            if isinstance(first.get("message"), dict):
                return first["message"].get("content") or ""
            if isinstance(first.get("text"), str):
                return first["text"]
    return ""


def _after_phrase(text: str) -> Optional[str]:
    """The rest of the line after the first answer phrase, or None."""
    match = _ANSWER_PHRASE.search(text)
    if match is None:
        return None
    return text[match.end():].split("\n", 1)[0]


def extract_choice(text: str) -> str:
    """The single option letter a free-form answer picks, or '' when it names none."""
    tail = _after_phrase(text)
    if tail is not None:
        run = _LETTER_RUN.search(tail)
        if run:
            return run.group(1)[0]
    for run in _LETTER_RUN.finditer(text):
        if len(run.group(1)) == 1:
            return run.group(1)
    return ""


def extract_choices(text: str) -> set[str]:
    """Every option letter a multi-answer reply names (all letters on the answer line, else in the text)."""
    tail = _after_phrase(text)
    scope = tail if tail is not None and _LETTER_RUN.search(tail) else text
    return {letter for run in _LETTER_RUN.finditer(scope) for letter in run.group(1)}


def gold_answer(row: dict) -> Any:
    """label (a letter or a list of letters) for choice tasks, answer for cloze tasks."""
    label = row.get("label")
    return label if label not in (None, "", []) else row.get("answer")


_AGIEVAL_LETTER = re.compile(r"[A-F]")
_AGIEVAL_LETTERS = re.compile(r"\(*([A-F])\)*")


def agieval_choice(text: str) -> str:
    """AGIEval's zero-shot single answer: first capital A-F once "Answer" and "Choice" are deleted."""
    match = _AGIEVAL_LETTER.search(text.replace("Answer", "").replace("Choice", ""))
    return match.group(0) if match else ""


def agieval_choices(text: str) -> set[str]:
    """AGIEval's multi-answer reading: every capital A-F in the reply."""
    return set(_AGIEVAL_LETTERS.findall(text))


RULES = {"agieval": (agieval_choice, agieval_choices), "strict": (extract_choice, extract_choices)}
DEFAULT_RULE = "agieval"


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown scoring rule {rule!r}; choose one of: {', '.join(RULES)}")


def is_correct(task: str, text: str, gold: Any, rule: str = DEFAULT_RULE) -> bool:
    """The per-task comparison of one prediction with its gold answer, under `rule`."""
    check_rule(rule)
    single, multi = RULES[rule]
    if task in ENGLISH_CLOZE or task in CHINESE_CLOZE:
        return math_equal(extract_math_answer(text), None if gold is None else str(gold))
    if task in MULTI_ANSWER:
        want = set(gold) if isinstance(gold, list) else {gold}
        return multi(text) == want
    want = gold[0] if isinstance(gold, list) and len(gold) == 1 else gold
    return single(text) == want


@dataclass(frozen=True)
class TaskScore:
    task: str
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.total if self.total else 0.0


def find_predictions(pred_dir: Path, model: Optional[str] = None) -> dict[str, Path]:
    """task -> predict.<MODEL>.<task>.zero-shot.jsonl in pred_dir (one model per directory, or --model)."""
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(pred_dir.glob(f"predict.*.{SETTING}.jsonl")):
        m = _PREDICTION_NAME.match(path.name)
        if m:
            found.setdefault(m.group("model"), {})[m.group("task")] = path
    if model is not None:
        if model not in found:
            raise FileNotFoundError(f"no predict.{model}.<task>.{SETTING}.jsonl files in {pred_dir}")
        return found[model]
    if len(found) > 1:
        raise ValueError(f"{pred_dir} holds predictions of several models ({', '.join(sorted(found))}); "
                         "choose one with --model")
    if not found:
        raise FileNotFoundError(f"no prediction files (predict.<MODEL>.<task>.{SETTING}.jsonl) in {pred_dir}")
    return next(iter(found.values()))


def score_task(task: str, predictions: Path, gold: Path, rule: str = DEFAULT_RULE) -> TaskScore:
    task_kind(task)
    preds, golds = read_jsonl(predictions), read_jsonl(gold)
    if len(preds) != len(golds):
        raise ValueError(f"{task}: {len(preds)} predictions in {predictions.name} but {len(golds)} questions in "
                         f"{gold}; the gold file must be the version the predictions were made from")
    correct = sum(is_correct(task, prediction_text(p), gold_answer(g), rule) for p, g in zip(preds, golds))
    return TaskScore(task, correct, len(golds))


def score_exam(pred_dir: Path, gold_dir: Path, model: Optional[str] = None,
               rule: str = DEFAULT_RULE) -> list[TaskScore]:
    """Scores for every task that has both a prediction file and a gold file; others are reported."""
    check_rule(rule)
    scores = []
    for task, path in find_predictions(pred_dir, model).items():
        gold = gold_dir / f"{task}.jsonl"
        try:
            task_kind(task)
        except ValueError:
            print(f"warning: skipping {path.name}: {task!r} is not an AGIEval task", file=sys.stderr)
            continue
        if not gold.exists():
            print(f"warning: skipping {task}: no {gold}", file=sys.stderr)
            continue
        try:
            scores.append(score_task(task, path, gold, rule))
        except ValueError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    return scores


def format_scores(scores: list[TaskScore]) -> str:
    width = max([len("task")] + [len(s.task) for s in scores])
    lines = [f"{'task':<{width}}  correct  total  accuracy"]
    lines += [f"{s.task:<{width}}  {s.correct:>7}  {s.total:>5}  {s.accuracy:7.2f}%" for s in scores]
    if scores:
        mean = sum(s.accuracy for s in scores) / len(scores)
        lines.append(f"{'average':<{width}}  {'':>7}  {'':>5}  {mean:7.2f}%")
    return "\n".join(lines)


def scores_json(scores: list[TaskScore]) -> dict[str, float]:
    """{task: accuracy_percent} rounded to 2 decimals."""
    return {s.task: round(s.accuracy, 2) for s in scores}
