"""Answer extraction and equivalence for AGIEval's cloze tasks (math, gaokao-mathcloze).

The conventions are AGIEval's (which takes them from the MATH benchmark): take the last \\boxed{}
answer, else the last $...$ expression, else what follows the last '=', else the last number; two
answers are equal when they match after a fixed LaTeX normalisation. Written from those rules.
"""
from __future__ import annotations

import re
from typing import Optional

FEW_SHOT_PREFIXES = ("The answer is therefore", "答案是")
_DOLLAR = re.compile(r"\$(.*)\$")  # greedy within one line: first $ to last $
_NUMBER = re.compile(r"(?:\$)?\d+(?:\.\d+)?(?![\w\d])")
_SIMPLE_SUBSTITUTIONS = (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                         ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""))


def _after_prefix(text: str) -> str:
    for prefix in FEW_SHOT_PREFIXES:
        at = text.rfind(prefix)
        if at >= 0:
            text = text[at + len(prefix):].strip()
    return text


def _last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces, or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
    if start < 0:
        return None
    open_at = text.find("{", start)
    if open_at < 0:
        return None
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            inner = text[open_at + 1:i]
            return inner.split("=")[-1].lstrip(" ") if "=" in inner else inner
    return None


def extract_math_answer(text: str) -> Optional[str]:
    """The final answer written in a model's free-form solution, or None."""
    text = _after_prefix(text)
    if "\\boxed" in text or "\\fbox" in text:
        return _last_boxed(text)
    dollars = _DOLLAR.findall(text)
    if dollars and dollars[-1]:
        answer = dollars[-1]
        return answer.split("=")[-1].lstrip(" ") if "=" in answer else answer
    if "=" in text:
        answer = text.split("=")[-1].lstrip(" ").rstrip(".")
        return answer.split("\\n")[0]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _braced_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{b} -> \\frac{1}{b}."""
    head, *pieces = s.split("\\frac")
    out = [head]
    for piece in pieces:
        out.append("\\frac")
        if piece.startswith("{"):
            out.append(piece)
        elif len(piece) < 2:
            return s  # malformed: leave the whole string alone
        elif piece[1] == "{":
            out.append("{" + piece[0] + "}" + piece[1:])
        else:
            out.append("{" + piece[0] + "}{" + piece[1] + "}" + piece[2:])
    return "".join(out)


def _braced_sqrt(s: str) -> str:
    """\\sqrt3 -> \\sqrt{3}."""
    head, *pieces = s.split("\\sqrt")
    return head + "".join("\\sqrt" + (p if p.startswith("{") or not p else "{" + p[0] + "}" + p[1:])
                          for p in pieces)


def _slash_to_frac(s: str) -> str:
    """'3/4' (two integers only) -> \\frac{3}{4}."""
    parts = s.split("/")
    if len(parts) == 2 and all(re.fullmatch(r"-?\d+", p) for p in parts) and str(int(parts[0])) == parts[0] \
            and str(int(parts[1])) == parts[1]:
        return "\\frac{" + parts[0] + "}{" + parts[1] + "}"
    return s


def normalize_math(s: str) -> str:
    """The fixed normalisation under which two cloze answers are compared."""
    for old, new in _SIMPLE_SUBSTITUTIONS:
        s = s.replace(old, new)
    if "\\text{ " in s:  # a unit written after the value
        s = s.split("\\text{ ")[0]
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 3" -> "3"
        s = sides[1]
    s = _braced_sqrt(s).replace(" ", "")
    s = _braced_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_to_frac(s)


def math_equal(prediction: Optional[str], gold: Optional[str]) -> bool:
    """AGIEval's cloze equivalence: equal after normalisation (a missing prediction is wrong)."""
    if prediction is None or gold is None:
        return prediction is None and gold is None
    try:
        return normalize_math(prediction) == normalize_math(gold)
    except Exception:  # a pathological string: fall back to exact comparison
        return prediction == gold
