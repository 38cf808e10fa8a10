"""Undo the anonymisation of released BayLing weights, safely while streaming."""
from __future__ import annotations

# The released weights emit these placeholders; users must never see them.
PLACEHOLDERS: dict[str, str] = {
    "[NAME]": "BayLing",
    "[INSTITUTE]": "NLP group of Institute of Computing Technology, Chinese Academy of Sciences (ICT/CAS)",
    "[CREATE_TIME]": "2023",
    "[名字]": "百聆",
    "[机构]": "中国科学院计算技术研究所自然语言处理研究组",
    "[开发时间]": "2023年",
    "\\n": "\n",  # the weights sometimes write a literal backslash-n
}


def deanonymize(text: str) -> str:
    """Replace every placeholder in a complete piece of text."""
    for key, value in PLACEHOLDERS.items():
        if key in text:
            text = text.replace(key, value)
    return text


def partial_suffix_len(text: str, patterns: tuple[str, ...] | list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of the patterns."""
    best = 0
    for p in patterns:
        for n in range(min(len(p) - 1, len(text)), best, -1):
            if text.endswith(p[:n]):
                best = n
                break
    return best


_KEYS = tuple(PLACEHOLDERS)


def safe_prefix_len(text: str) -> int:
    """How much of text can be de-anonymised now without cutting a placeholder in half."""
    return len(text) - partial_suffix_len(text, _KEYS)
