"""BayLing's translation instruction and language names: one source for the web page and the eval.

The wording is upstream's (scripts/translate.py and scripts/constrained_translate.py in ictnlp/BayLing):
"Provide the {tgt} translation for this sentence: {src}" and "提供这句话的{tgt}翻译：{src}", plus
"\\nMake sure to include these words: ..." / "\\n确保包含这些词：..." with the words joined by ", " in
both languages. Upstream takes the target language's name verbatim from --tgt-lang and fixes no table
of Chinese names; its published runs only use Chinese and English. The Chinese names below are ours:
中文/英文, and the 语 form for every other language (德语, 法语, 日语), the form the eval used; the
page's former 德文/法文/日文 are gone.
"""
from __future__ import annotations

INSTRUCTIONS = {
    "en": "Provide the {tgt} translation for this sentence: {src}",
    "zh": "提供这句话的{tgt}翻译：{src}",
}
CONSTRAINT_SUFFIX = {
    "en": "\nMake sure to include these words: {constraints}",
    "zh": "\n确保包含这些词：{constraints}",
}
CONSTRAINT_SEPARATOR = ", "  # upstream joins the words the same way for both instruction languages

# English name -> Chinese name, as the instructions spell them (the page's dropdowns list the keys).
LANGUAGES = {
    "English": "英文", "Chinese": "中文", "German": "德语", "French": "法语", "Japanese": "日语",
    "Korean": "韩语", "Russian": "俄语", "Spanish": "西班牙语", "Italian": "意大利语", "Portuguese": "葡萄牙语",
    "Arabic": "阿拉伯语", "Vietnamese": "越南语", "Thai": "泰语", "Czech": "捷克语", "Ukrainian": "乌克兰语",
    "Croatian": "克罗地亚语", "Livonian": "利沃尼亚语", "Yakut": "雅库特语",
}
# Language code (WMT / ISO 639) -> English name.
CODES = {
    "en": "English", "zh": "Chinese", "de": "German", "fr": "French", "ja": "Japanese", "ko": "Korean",
    "ru": "Russian", "es": "Spanish", "it": "Italian", "pt": "Portuguese", "ar": "Arabic", "vi": "Vietnamese",
    "th": "Thai", "cs": "Czech", "uk": "Ukrainian", "hr": "Croatian", "liv": "Livonian", "sah": "Yakut",
}


def check_instruction_lang(lang: str) -> None:
    if lang not in INSTRUCTIONS:
        raise ValueError(f"--instruction-lang must be one of {', '.join(INSTRUCTIONS)}, got {lang!r}")


def language_name(language: str, instruction_lang: str = "en") -> str:
    """A language (code such as 'de', or English name) as an instruction in instruction_lang names it.

    An unknown language is used as given, as upstream does with --tgt-lang.
    """
    english = CODES.get(language.lower(), language)
    if english not in LANGUAGES:
        return language
    return LANGUAGES[english] if instruction_lang == "zh" else english


def instruction(src: str, target: str, instruction_lang: str = "en") -> str:
    """`Provide the Chinese translation for this sentence: ...` (or its Chinese form)."""
    check_instruction_lang(instruction_lang)
    return INSTRUCTIONS[instruction_lang].format(tgt=language_name(target, instruction_lang), src=src)


def constrained_instruction(src: str, constraints: list[str], target: str, instruction_lang: str = "en") -> str:
    """The translation instruction plus `Make sure to include these words: ...`."""
    return (instruction(src, target, instruction_lang)
            + CONSTRAINT_SUFFIX[instruction_lang].format(constraints=CONSTRAINT_SEPARATOR.join(constraints)))


def translation_instruction(text: str, source: str, target: str) -> str:
    """The web page's Translate tab: in Chinese for a Chinese source, in English otherwise (names as keys)."""
    if target not in LANGUAGES:
        raise ValueError(f"unknown target language {target!r}; choose one of: {', '.join(LANGUAGES)}")
    return instruction(text.strip(), target, "zh" if source == "Chinese" else "en")
