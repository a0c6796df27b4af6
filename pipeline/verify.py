r"""Answer checking: pull the final answer out of a model's text and compare it with a reference.

    >>> verify("3 + 4 = 7, so the answer is \\boxed{7}.", "7")
    True
    >>> answers_match("1,234.50 USD", "1234.5"), answers_match("\\frac{3}{4}", "0.75")
    (True, True)

Used by `distill build` (rejection sampling against references) and by `distill eval` (scoring the
student), so both stages agree on what "correct" means.

Extraction, first hit wins: the caller's regexes (group 1, else the whole match; the last match in
the text), then the last `\boxed{...}`, then the last "The answer is ..." / "Answer: ..." /
"final answer: ...", then the last number in the text.

Comparison: numerically when both sides read as numbers (integers, decimals, negatives, fractions
`3/4` and `\frac{3}{4}`, thousands separators `1,234,567`, a currency sign, a percent sign or a
trailing unit word like "12 cm"; units are ignored, not converted), else as text after
normalisation (case, whitespace, surrounding punctuation, LaTeX wrappers such as `$...$`, `\text{}`).
"""

from __future__ import annotations

import functools
import math
import re
from fractions import Fraction

from pipeline.errors import ConfigError

# -- extraction -----------------------------------------------------------------------------------

# "The answer is 42." / "Final answer: 42" / "**Answer:** 42"; the rest of the sentence is captured.
_PHRASE = re.compile(
    r"(?:\bthe\s+)?(?:\bfinal\s+)?\banswer\s*(?:is\s*:?|:|=)\s*\**\s*(?P<ans>.+?)\s*(?:\.\s|\.$|\n|$)",
    re.IGNORECASE,
)
# The last number: 1,234,567.5 / -12 / 0.5 / .5 / 3/4. A '-' counts as a sign only when it does
# not follow a word character ("x-3" is not -3).
_NUMBER = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?(?![\d,]*\d)"
    r"|(?<![\w.])-?\.\d+"
)


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a user's answer regex; a bad one is a ConfigError naming it."""
    try:
        return re.compile(pattern, re.MULTILINE)
    except re.error as e:
        raise ConfigError(
            f"answer pattern {pattern!r} does not compile ({e}); fix the regex in answer_patterns"
        ) from None


def _last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`), nested braces allowed."""
    found = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end() : i - 1]
    return found


def extract_answer(text: str, patterns: list[str] | None = None) -> str | None:
    """The final answer in `text`, or None if nothing looks like one."""
    if not text:
        return None
    for pattern in patterns or []:
        matches = list(compile_pattern(pattern).finditer(text))
        if matches:
            last = matches[-1]
            got = last.group(1) if last.re.groups else last.group(0)
            if got is not None and got.strip():
                return got.strip()
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    phrases = [m.group("ans") for m in _PHRASE.finditer(text) if m.group("ans").strip(" *.")]
    if phrases:
        return phrases[-1].strip(" *")
    numbers = _NUMBER.findall(text)
    if numbers:
        return str(numbers[-1]).replace(" ", "")
    return None


# -- normalisation and comparison -------------------------------------------------------------------

_WRAPPERS = re.compile(
    r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname|boxed|fbox)\s*\{([^{}]*)\}"
)
_PUNCT = " \t\n,;:!?\"'`*"
_CURRENCY = re.compile(r"^(?:US\$|\$|€|£|¥|₹|usd\s|eur\s|gbp\s)\s*", re.IGNORECASE)
# A number, then optionally a unit: letters, degrees, percent, '/', '.', spaces; never a digit or
# an operator, so "5 + x" and "2^10" are not read as numbers.
_NUM_BODY = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[+-]?\d+)?|-?\.\d+"
_NUM_UNIT = re.compile(
    rf"^(?P<num>{_NUM_BODY})(?:\s*/\s*(?P<den>{_NUM_BODY}))?"
    r"\s*(?P<unit>[%°A-Za-zµ€£¥₹$][A-Za-z°µ²³%/.\s$-]*)?$",
    re.IGNORECASE,
)
_FRAC = re.compile(
    r"^(?P<sign>-)?\\[dt]?frac\s*(?:\{(?P<a>[^{}]+)\}|(?P<a1>\d))\s*(?:\{(?P<b>[^{}]+)\}|(?P<b1>\d))$"
)


def _unwrap(s: str) -> str:
    """Strip LaTeX and markdown dressing that never changes the value."""
    s = s.strip().replace("\u2212", "-").replace("\\%", "%").replace("\\$", "$")
    s = s.replace("{,}", ",").replace("\\,", "").replace("\\!", "").replace("\\ ", " ")
    s = re.sub(r"\\(?:left|right|displaystyle)\b", "", s)
    for _ in range(5):  # nested wrappers, innermost first
        new = _WRAPPERS.sub(r"\1", s)
        if new == s:
            break
        s = new
    while True:
        s = _strip_punct(s)
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : -len(right)]
                break
        else:
            break
    # "x = 5" -> "5": a single variable being assigned the answer.
    m = re.match(r"^[A-Za-z]\s*=\s*(.+)$", s)
    return _strip_punct(m.group(1)) if m else s


def _strip_punct(s: str) -> str:
    """Strip surrounding punctuation, but keep the point of a leading decimal (".5")."""
    s = s.strip(_PUNCT).rstrip(".").strip(_PUNCT)
    while s.startswith(".") and not s[1:2].isdigit():
        s = s[1:].strip(_PUNCT)
    return s


def _plain_number(s: str) -> Fraction | None:
    s = s.replace(",", "")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def to_number(text: str) -> Fraction | None:
    """The value of `text` if it reads as a number (see the module docstring), else None."""
    s = _unwrap(text)
    s = _CURRENCY.sub("", s).strip()
    m = _FRAC.match(s)
    if m:
        a = to_number(m.group("a") or m.group("a1"))
        b = to_number(m.group("b") or m.group("b1"))
        if a is None or b is None or b == 0:
            return None
        return -a / b if m.group("sign") else a / b
    m = _NUM_UNIT.match(s)
    if not m:
        return None
    num = _plain_number(m.group("num"))
    if num is None:
        return None
    if m.group("den") is not None:
        den = _plain_number(m.group("den"))
        if den is None or den == 0:
            return None
        num = num / den
    return num


def normalize_text(text: str) -> str:
    """The form two non-numeric answers are compared in: unwrapped, lower case, single spaces."""
    return _strip_punct(re.sub(r"\s+", " ", _unwrap(text))).lower()


def answers_match(
    predicted: str | None, reference: str, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9
) -> bool:
    """True when `predicted` is the same answer as `reference` (numerically, else as text)."""
    if predicted is None or reference is None:
        return False
    a, b = to_number(predicted), to_number(reference)
    if a is not None and b is not None:
        return a == b or math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=abs_tol)
    return normalize_text(predicted) == normalize_text(reference)


def verify(text: str, reference: str, patterns: list[str] | None = None) -> bool:
    """Does the final answer in `text` match `reference`?"""
    return answers_match(extract_answer(text, patterns), reference)
