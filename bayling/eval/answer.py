"""`answer`: BayLing-80 (or any file in its format) -> each row plus `response`, one answer per turn."""
from __future__ import annotations

from pathlib import Path

from .data import turns_of
from .engine import EvalModel
from .io import ResumableWriter, check_rows_match


def answer_rows(model: EvalModel, rows: list[dict], output: Path) -> int:
    """Answer rows[done:] and append them to output; a row's turns are answered in order, each with
    the history so far, while other rows' turns run alongside in the engine."""
    writer = ResumableWriter(output)
    check_rows_match(writer.existing(), rows, "question_id", output)
    return model.run_rows(rows, writer, turns_of, lambda row, answers: {**row, "response": [a.text for a in answers]},
                          f"answer {output.name}")
