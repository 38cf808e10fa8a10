"""`answer`: BayLing-80 (or any file in its format) -> each row plus `response`, one answer per turn."""
from __future__ import annotations

from pathlib import Path

from .data import turns_of
from .engine import Engine
from .io import ResumableWriter, check_rows_match, progress, windows


def answer_rows(engine: Engine, rows: list[dict], output: Path) -> int:
    """Answer rows[done:] and append them to output; multi-turn rows are answered turn by turn.

    Within a window of --batch-size rows, every row's first turn is decoded in one batch, then
    every second turn with its own history, and so on.
    """
    writer = ResumableWriter(output)
    check_rows_match(writer.existing(), rows, "question_id", output)
    todo = rows[writer.done:]
    total_turns = sum(len(turns_of(r)) for r in rows)
    bar = progress(total_turns, total_turns - sum(len(turns_of(r)) for r in todo), f"answer {output.name}",
                   engine.show_progress, unit="answer")
    with bar, writer:
        for _, window in windows(rows, engine.batch_size, writer.done):
            turns = [turns_of(r) for r in window]
            answers: list[list[str]] = [[] for _ in window]
            for t in range(max(len(ts) for ts in turns)):
                active = [i for i, ts in enumerate(turns) if t < len(ts)]
                convs = [engine.conversation(turns[i][:t + 1], answers[i]) for i in active]
                for i, chunk in zip(active, engine.reply(convs, on_row_done=lambda _i: bar.update(1))):
                    answers[i].append(chunk.text)
            for row, response in zip(window, answers):
                writer.write({**row, "response": response})
    return writer.done

