"""`exam`: AGIEval v1 task files -> zero-shot predictions, with upstream BayLing's prompt wording."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from .engine import EvalModel
from .io import ResumableWriter, read_jsonl

# AGIEval v1's tasks by kind (facts from AGIEval's dataset loader).
ENGLISH_QA = ("lsat-ar", "lsat-lr", "lsat-rc", "logiqa-en", "sat-math", "sat-en", "aqua-rat",
              "sat-en-without-passage", "gaokao-english")
CHINESE_QA = ("logiqa-zh", "jec-qa-kd", "jec-qa-ca", "gaokao-chinese", "gaokao-geography", "gaokao-history",
              "gaokao-biology", "gaokao-chemistry", "gaokao-physics", "gaokao-mathqa")
ENGLISH_CLOZE = ("math",)
CHINESE_CLOZE = ("gaokao-mathcloze",)
MULTI_ANSWER = ("jec-qa-kd", "jec-qa-ca", "gaokao-physics")  # gold label is a list of letters
TASKS = ENGLISH_QA + CHINESE_QA + ENGLISH_CLOZE + CHINESE_CLOZE
SETTING = "zero-shot"

# Upstream BayLing's zero-shot wording (exp/examination/*/inputs): passage, question, options, format request.
EN_QA = ("{passage}Question:\n{question}\nChoices:\n{options}\n\nAnswer:\n"
         "Output the correct answer in this format: \"Answer is choice ()\"")
ZH_QA = "{passage}问题：\n{question}\n选项：\n{options}\n\n答案：\n按照此格式输出正确答案：\"答案是选项()\""
EN_CLOZE = "{passage}Question: {question}\nAnswer: The answer is"
ZH_CLOZE = "{passage}问题：{question}\n答案："
PASSAGE_SEPARATOR = "\n\n"


def task_kind(task: str) -> str:
    """'en-qa', 'zh-qa', 'en-cloze' or 'zh-cloze'; unknown tasks are a one-line error."""
    for names, kind in ((ENGLISH_QA, "en-qa"), (CHINESE_QA, "zh-qa"), (ENGLISH_CLOZE, "en-cloze"),
                        (CHINESE_CLOZE, "zh-cloze")):
        if task in names:
            return kind
    raise ValueError(f"unknown AGIEval task {task!r}; known tasks: {', '.join(TASKS)}")


def exam_prompt(row: dict, task: str) -> str:
    """The zero-shot instruction for one AGIEval row."""
    kind = task_kind(task)
    passage = row.get("passage") or ""
    fields = {"passage": passage + PASSAGE_SEPARATOR if passage else "", "question": row.get("question") or "",
              "options": "\n".join(row.get("options") or [])}
    template = {"en-qa": EN_QA, "zh-qa": ZH_QA, "en-cloze": EN_CLOZE, "zh-cloze": ZH_CLOZE}[kind]
    return template.format(**fields)


def prediction_path(output_dir: Path, model: str, task: str) -> Path:
    """predict.<MODEL>.<task>.zero-shot.jsonl, as upstream's exp/examination names them."""
    return output_dir / f"predict.{model}.{task}.{SETTING}.jsonl"


def find_tasks(task_dir: Path, tasks: Optional[Sequence[str]] = None) -> list[str]:
    """The requested tasks (checked to exist), or every known task that has a file in task_dir."""
    if tasks:
        for task in tasks:
            task_kind(task)
            if not (task_dir / f"{task}.jsonl").exists():
                raise FileNotFoundError(f"no {task}.jsonl in {task_dir}")
        return list(tasks)
    found = [t for t in TASKS if (task_dir / f"{t}.jsonl").exists()]
    if not found:
        raise FileNotFoundError(f"no AGIEval task files (<task>.jsonl, e.g. logiqa-en.jsonl) in {task_dir}")
    return found


def run_exam(engine: EvalModel, task_dir: Path, output_dir: Path, tasks: Optional[Sequence[str]] = None,
             limit: Optional[int] = None) -> dict[str, Path]:
    """Predict every task; each prediction file is resumable on its own."""
    written = {}
    for task in find_tasks(task_dir, tasks):
        rows: list[Any] = read_jsonl(task_dir / f"{task}.jsonl")[:limit]
        path = prediction_path(output_dir, engine.name, task)
        writer = ResumableWriter(path)
        engine.run_single_turn(
            rows, writer, lambda row, t=task: exam_prompt(row, t),
            lambda _row, chunk: {"text": chunk.text, "usage": chunk.usage, "finish_reason": chunk.finish_reason,
                                 "model": engine.name},
            f"exam {task}")
        written[task] = path
    return written
