"""`translate` and `constrained`: upstream BayLing's translation instructions, answered in batches."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .engine import EvalModel
from .io import ResumableWriter, check_rows_match, read_jsonl, read_lines

# Upstream's instructions (facts from the BayLing paper/repo); {tgt} is the target language's name.
INSTRUCTIONS = {
    "en": "Provide the {tgt} translation for this sentence: {src}",
    "zh": "提供这句话的{tgt}翻译：{src}",
}
CONSTRAINT_SUFFIX = {
    "en": "\nMake sure to include these words: {constraints}",
    "zh": "\n确保包含这些词：{constraints}",
}
CONSTRAINT_SEPARATOR = {"en": ", ", "zh": "，"}

# Language code -> (English name, Chinese name), as the instructions spell them.
LANGUAGES = {
    "en": ("English", "英文"), "zh": ("Chinese", "中文"), "de": ("German", "德语"), "fr": ("French", "法语"),
    "ja": ("Japanese", "日语"), "ru": ("Russian", "俄语"), "cs": ("Czech", "捷克语"), "uk": ("Ukrainian", "乌克兰语"),
    "es": ("Spanish", "西班牙语"), "it": ("Italian", "意大利语"), "ko": ("Korean", "韩语"), "ar": ("Arabic", "阿拉伯语"),
    "pt": ("Portuguese", "葡萄牙语"), "hr": ("Croatian", "克罗地亚语"), "liv": ("Livonian", "利沃尼亚语"),
    "sah": ("Yakut", "雅库特语"),
}


def language_name(code: str, instruction_lang: str) -> str:
    """The target language as the instruction names it; an unknown code is used as given."""
    names = LANGUAGES.get(code.lower())
    if names is None:
        return code
    return names[0] if instruction_lang == "en" else names[1]


def check_instruction_lang(lang: str) -> None:
    if lang not in INSTRUCTIONS:
        raise ValueError(f"--instruction-lang must be one of {', '.join(INSTRUCTIONS)}, got {lang!r}")


def translation_instruction(src: str, tgt_lang: str, instruction_lang: str = "en") -> str:
    """`Provide the Chinese translation for this sentence: ...` (or its Chinese form)."""
    check_instruction_lang(instruction_lang)
    return INSTRUCTIONS[instruction_lang].format(tgt=language_name(tgt_lang, instruction_lang), src=src)


def constrained_instruction(src: str, constraints: list[str], tgt_lang: str, instruction_lang: str = "en") -> str:
    """The translation instruction plus `Make sure to include these words: ...`."""
    joined = CONSTRAINT_SEPARATOR[instruction_lang].join(constraints) if instruction_lang in INSTRUCTIONS else ""
    return (translation_instruction(src, tgt_lang, instruction_lang)
            + CONSTRAINT_SUFFIX[instruction_lang].format(constraints=joined))


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
