"""`translate` and `constrained`: upstream BayLing's translation instructions (bayling.translation), in batches."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..translation import check_instruction_lang, constrained_instruction, instruction
from .engine import EvalModel
from .io import ResumableWriter, check_rows_match, read_jsonl, read_lines


def translation_instruction(src: str, tgt_lang: str, instruction_lang: str = "en") -> str:
    """`Provide the Chinese translation for this sentence: ...` (or its Chinese form); tgt_lang is a code."""
    return instruction(src, tgt_lang, instruction_lang)


def run_translate(engine: EvalModel, source: Path, output: Path, tgt_lang: str, instruction_lang: str = "en") -> int:
    """One hypothesis line per source line (inner line breaks become spaces); resumable."""
    check_instruction_lang(instruction_lang)
    segments = read_lines(source)
    writer = ResumableWriter(output, jsonl=False)
    if writer.done > len(segments):
        raise ValueError(f"{output} has {writer.done} lines but {source} only {len(segments)}; "
                         "it was written for another source: choose another --output")
    return engine.run_single_turn(
        segments, writer, lambda src: translation_instruction(src, tgt_lang, instruction_lang),
        lambda _src, chunk: chunk.text, f"translate {output.name}")


def load_constrained(path: Path) -> list[dict]:
    rows = read_jsonl(path)
    for n, row in enumerate(rows, 1):
        if not (isinstance(row, dict) and isinstance(row.get("src"), str)
                and isinstance(row.get("constraint"), list) and all(isinstance(c, str) for c in row["constraint"])):
            raise ValueError(f"{path}:{n}: expected {{\"src\": str, \"tgt\": str, \"constraint\": [str, ...]}}")
    return rows


def run_constrained(engine: EvalModel, source: Path, output: Path, tgt_lang: str, instruction_lang: str = "en") -> int:
    """Each {src, tgt, constraint} row plus `hypo`; resumable."""
    check_instruction_lang(instruction_lang)
    rows: list[Any] = load_constrained(source)
    writer = ResumableWriter(output)
    check_rows_match(writer.existing(), rows, "src", output)
    return engine.run_single_turn(
        rows, writer, lambda r: constrained_instruction(r["src"], r["constraint"], tgt_lang, instruction_lang),
        lambda r, chunk: {**r, "hypo": chunk.text}, f"constrained {output.name}")
