"""Final-answer extraction and matching for verifiable tasks (maths, calculator).

``extract_answer`` takes the last ``\\boxed{...}``, else an ``answer: X`` / ``answer is X`` phrase,
else the last number of the text. ``answers_match`` compares after normalisation: exact string match,
else exact rational match (integers, decimals, fractions ``a/b`` and ``\\frac{a}{b}``, thousands
separators), else floats within a relative tolerance (scientific notation, inexact numbers).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1: j]
    return None


def extract_answer(text: str | None) -> str | None:
    """The final answer stated in ``text`` (see the module docstring), or None."""
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    m = list(re.finditer(r"answer\s*(?:is|:|=)\s*\$?([^\n$]+)", text, flags=re.IGNORECASE))
    if m:
        return m[-1].group(1).strip().rstrip(".").strip()
    flat = _FRAC.sub(r"\1/\2", text).replace(",", "")
    nums = re.findall(rf"{_NUM}(?:\s*/\s*\d+)?", flat)
    return nums[-1].strip() if nums else None


def normalize(ans: str) -> str:
    """Canonical text of an answer: no LaTeX wrappers, spaces, ``$``, trailing dot; fractions as a/b."""
    s = ans.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(left|right|displaystyle|!|,|;|quad)", "", s)
    for _ in range(3):
        s = _FRAC.sub(r"(\1)/(\2)", s)
    s = _FRAC_SHORT.sub(r"\1/\2", s)
    s = s.replace("\\%", "%").replace("\\cdot", "*").replace("\\times", "*").replace("−", "-")
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"\((" + _NUM + r")\)", r"\1", s)
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s.lower()


def to_number(ans: str) -> Fraction | float | None:
    """Exact value of a normalised number (int, decimal, a/b, percent as given), float when inexact."""
    s = ans.rstrip("%")
    m = re.fullmatch(rf"({_NUM})/({_NUM})", s)
    try:
        if m:
            den = Fraction(m.group(2))
            return Fraction(m.group(1)) / den if den != 0 else None
        if re.fullmatch(_NUM, s):
            if "e" in s.lower():
                return float(s)
            return Fraction(s)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def answers_match(pred: str | None, gold: str, rel_tol: float = 1e-6) -> bool:
    """True when ``pred`` states the same answer as ``gold`` (normalised text or numeric value)."""
    if pred is None:
        return False
    p, g = normalize(pred), normalize(gold)
    if p == g:
        return True
    pv, gv = to_number(p), to_number(g)
    if pv is None or gv is None:
        return False
    if isinstance(pv, Fraction) and isinstance(gv, Fraction):
        return pv == gv
    return math.isclose(float(pv), float(gv), rel_tol=rel_tol, abs_tol=1e-12)
