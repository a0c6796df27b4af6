r"""Answer checking: is the final answer of a model's text the reference answer?

    >>> check("<think>7 or 8?</think>So the answer is \\boxed{2\\sqrt{2}}.", "\\sqrt{8}").verified
    True
    >>> check("**(B)**", "B").verified, check("yes.", "Yes").verified, check("1000001", "1000000").verified
    (True, True, False)

Used by `distill build` (rejection sampling against references) and by `distill eval` (scoring the
student and the teacher), so both stages agree on what "correct" means.

Only the final answer counts: the `<think>` trace is cut off first (pipeline/reasoning.py). From it,
the answer is, first hit wins: the caller's regexes (group 1, else the whole match; the last match),
the last `\boxed{...}`, the last "The answer is ..." / "Answer: ...", else the whole final answer.

Modes (`verify:`): `auto` (default) compares as math when the reference reads as math, else as
text; `math` insists on math (a reference that is not math is a ConfigError); `text` never uses
math; `regex` takes the answer from the caller's patterns only; `module:function` or
`path/to/file.py:function` calls your `fn(final_answer, reference) -> bool | None`.

Cheap exact checks come first and settle most rows: plain numbers (`1,234.5`, `3/4`, `\frac{3}{4}`,
`-7 °C`, `$5`, `50%` = 50 or 0.5, `6.02 \times 10^{23}`; units are ignored, not converted) compare
exactly when both are integers, else within rel_tol/abs_tol; a multiple-choice letter (`B`, `(B)`,
`B) Paris`) or yes/no reference compares with the letter or word the answer starts with; anything
else compares as text after normalisation (case, spaces, punctuation, `$...$`, `\text{}`).
Only then math-verify (Hugging Face; sympy) decides: roots, sets, intervals, expressions, equations.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.reasoning import final_answer

MODES = ("auto", "math", "text", "regex")
MATH_TIMEOUT_S = 5  # per parse or comparison; sympy can hang on adversarial input


def check_mode(mode: str) -> str:
    """`mode` if it names a check (one of MODES, or 'module:function'); else ValueError."""
    if mode not in MODES and ":" not in mode:
        raise ValueError(
            f"verify {mode!r}: expected one of {', '.join(MODES)} or 'module:function'"
        )
    return mode


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check."""

    verified: bool | None  # None: no answer found in the text
    reason: str  # a few words, for build's report ("wrong answer", "no final answer found")
    answer: str | None = None  # the answer that was compared


# -- extraction -----------------------------------------------------------------------------------

# "The answer is 42." / "Final answer: 42" / "**Answer:** 42"; the rest of the sentence is captured.
_PHRASE = re.compile(
    r"(?:\bthe\s+)?(?:\bfinal\s+)?\banswer\s*(?:is\s*:?|:|=)\s*\**\s*(?P<ans>.+?)\s*(?:\.\s|\.$|\n|$)",
    re.IGNORECASE,
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


def _by_patterns(text: str, patterns: list[str] | None) -> str | None:
    for pattern in patterns or []:
        matches = list(compile_pattern(pattern).finditer(text))
        if matches:
            got = matches[-1].group(1) if matches[-1].re.groups else matches[-1].group(0)
            if got is not None and got.strip():
                return got.strip()
    return None


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
    """The answer in the final answer of `text` (trace removed); None when there is none."""
    text = final_answer(text or "").replace("\u2212", "-")
    boxed = _last_boxed(text)
    phrases = [m.group("ans") for m in _PHRASE.finditer(text) if m.group("ans").strip(" *.")]
    for got in (_by_patterns(text, patterns), boxed, phrases[-1] if phrases else None, text):
        if got is not None and got.strip(" *"):
            return got.strip().strip("*").strip()
    return None


# -- cheap comparison: numbers, letters, words ------------------------------------------------------

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
_FRAC = re.compile(r"^(-)?\\[dt]?frac\s*(?:\{([^{}]+)\}|(\d))\s*(?:\{([^{}]+)\}|(\d))$")
_TIMES_TEN = re.compile(r"\s*(?:\\times|\\cdot|×|·)\s*10\s*\^\s*\{?\s*([+-]?\d+)\s*\}?")
_LETTER = re.compile(r"^\(([A-J])\)|^([A-J])(?:[.:)]|$)")
_YES_NO = {"yes", "no", "true", "false"}


def _strip_punct(s: str) -> str:
    """Strip surrounding punctuation, but keep the point of a leading decimal (".5")."""
    s = s.strip(_PUNCT).rstrip(".").strip(_PUNCT)
    while s.startswith(".") and not s[1:2].isdigit():
        s = s[1:].strip(_PUNCT)
    return s


def _unwrap(s: str) -> str:
    """Strip LaTeX and markdown dressing that never changes the value."""
    s = s.strip().replace("\u2212", "-").replace("\\%", "%").replace("\\$", "$")
    s = s.replace("{,}", ",").replace("\\,", "").replace("\\!", "").replace("\\ ", " ")
    s = _TIMES_TEN.sub(r"e\1", re.sub(r"\\(?:left|right|displaystyle)\b", "", s))
    for _ in range(5):  # nested wrappers, innermost first
        s, unwrapped = _WRAPPERS.subn(r"\1", s)
        if not unwrapped:
            break
    while True:
        s = _strip_punct(s)
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : -len(right)]
                break
        else:
            break
    m = re.match(r"^[A-Za-z]\s*=\s*(.+)$", s)  # "x = 5" -> "5"
    return _strip_punct(m.group(1)) if m else s


def normalize_text(text: str) -> str:
    """The form two text answers are compared in: unwrapped, lower case, single spaces."""
    return _strip_punct(re.sub(r"\s+", " ", _unwrap(text))).lower()


def _fraction(s: str) -> Fraction | None:
    try:
        return Fraction(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def to_number(text: str) -> Fraction | None:
    """The value of `text` if it reads as a plain number (see the module docstring), else None."""
    s = _CURRENCY.sub("", _unwrap(text)).strip()
    m = _FRAC.match(s)
    if m:
        a, b = to_number(m.group(2) or m.group(3)), to_number(m.group(4) or m.group(5))
        if a is None or not b:
            return None
        return -a / b if m.group(1) else a / b
    m = _NUM_UNIT.match(s)
    num = _fraction(m.group("num")) if m else None
    if m is None or num is None or m.group("den") is None:
        return num
    den = _fraction(m.group("den"))
    return num / den if den else None


def _values(text: str) -> list[Fraction]:
    """The values a number may stand for: '50%' is 50 or 0.5."""
    n = to_number(text)
    return [] if n is None else [n, n / 100] if "%" in text else [n]


def _same_number(a: Fraction, b: Fraction, rel_tol: float, abs_tol: float) -> bool:
    if a.denominator == 1 and b.denominator == 1:  # integers: exactly, whatever the tolerance
        return a == b
    return a == b or math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=abs_tol)


def _is_choice(ref: str) -> bool:
    return re.fullmatch(r"\(?[A-J]\)?", _unwrap(ref)) is not None


def _quick(answer: str, ref: str, rel_tol: float, abs_tol: float) -> Verdict | None:
    """A verdict from plain numbers, letters, yes/no or equal text; None: math must decide."""
    pa, pr = _values(answer), _values(ref)
    if pa and pr:
        same = any(_same_number(a, b, rel_tol, abs_tol) for a in pa for b in pr)
        return Verdict(same, "same number" if same else "wrong answer", answer)
    norm = normalize_text(answer)
    if norm == normalize_text(ref):
        return Verdict(True, "same text", answer)
    if _is_choice(ref):
        got = _LETTER.match(_unwrap(answer))
        if got is None:
            return Verdict(None, "no choice letter found", answer)
        same = (got.group(1) or got.group(2)) == _unwrap(ref).strip("()")
        return Verdict(same, "same choice" if same else "wrong answer", answer)
    if normalize_text(ref) in _YES_NO:
        word = re.split(r"[\s,.;:!]", norm, maxsplit=1)[0]
        if word not in _YES_NO:
            return Verdict(None, "no yes/no found", answer)
        same = word == normalize_text(ref)
        return Verdict(same, "same answer" if same else "wrong answer", answer)
    return None


# -- math-verify ------------------------------------------------------------------------------------


def _timeout() -> int | None:
    # math-verify times out with signal.alarm, which only works in the main thread; elsewhere
    # (a thread pool) it would raise, so there we run without its timeout.
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=65536)
def _parse_math(text: str) -> tuple[Any, ...]:
    """math-verify's parse of `text` (sympy objects first, then the raw match); () if none.

    A bare expression (`2\\sqrt{2}`, `x^2+1`: no words) is wrapped in `$...$`, which math-verify
    needs to read it as LaTeX instead of picking the first number out of it.
    """
    from math_verify import parse

    bare = not re.search(r"[A-Za-z]{3,}", re.sub(r"\\[A-Za-z]+", "", text))
    if bare and not re.search(r"\$|\\\(|\\\[|\\boxed", text):
        text = f"${text}$"
    return tuple(parse(text, parsing_timeout=_timeout()))  # type: ignore[arg-type]


def math_reference(reference: str) -> tuple[Any, ...] | None:
    """The parsed reference if it reads as math, else None ("Paris", "B", "yes" are text)."""
    ref = reference.replace("\u2212", "-")
    if to_number(ref) is not None:
        return _parse_math(ref) or (ref,)
    if not re.search(r"[\d\\^_=+*/<>(){}\[\]|]", ref) or _is_choice(ref):
        return None
    parsed = _parse_math(ref)
    return parsed if parsed and not isinstance(parsed[0], str) else None


# -- the entry point --------------------------------------------------------------------------------


def check(
    prediction: str,
    reference: str | None,
    *,
    mode: str = "auto",
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
    patterns: list[str] | None = None,
) -> Verdict:
    """Does the final answer of `prediction` match `reference`? See the module docstring.

    Raises ConfigError (one line, naming the mode and reference) when `mode` cannot apply; the
    caller adds the prompt id: `raise ConfigError(f"prompt {pid}: {e}") from None`.
    """
    if reference is None:
        return Verdict(None, "no reference")
    ref = reference.strip()
    if mode not in MODES:
        if ":" not in mode:
            raise ConfigError(f"verify {mode!r}: expected {', '.join(MODES)} or 'module:function'")
        fn = load_function(mode, "verify")
        got = fn(final_answer(prediction or "").replace("\u2212", "-"), ref)
        if got is not None and not isinstance(got, bool):
            raise ConfigError(f"verify {mode!r} returned {got!r}; return True, False or None")
        return Verdict(got, f"{mode} said {got}")
    if mode == "regex":
        if not patterns:
            raise ConfigError("verify 'regex' needs answer_patterns; add at least one regex")
        answer = _by_patterns(final_answer(prediction or "").replace("\u2212", "-"), patterns)
    else:
        answer = extract_answer(prediction, patterns)
    gold = math_reference(ref) if mode != "text" else None
    if mode == "math" and gold is None:
        raise ConfigError(
            f"verify 'math': reference {ref[:60]!r} is not a math answer; use verify: auto or text"
        )
    if answer is None:
        return Verdict(None, "no final answer found")
    quick = _quick(answer, ref, rel_tol, abs_tol)
    if quick is not None or gold is None:
        return quick or Verdict(False, "wrong answer", answer)
    from math_verify import verify as math_equal

    parsed = _parse_math(answer)
    if not parsed:
        return Verdict(None, "no final answer found", answer)
    same = math_equal(list(gold), list(parsed), timeout_seconds=_timeout())
    return Verdict(same, "equal by math-verify" if same else "wrong answer", answer)


def check_prompt(
    prompt_id: str, prediction: str, reference: str | None, **settings: Any
) -> Verdict:
    """check() for one prompt's answer, as build and eval call it: any error names the prompt."""
    try:
        return check(prediction, reference, **settings)
    except ConfigError as e:
        raise ConfigError(f"prompt {prompt_id}: {e}") from None
    except Exception as e:  # a custom verify function may raise anything
        raise ConfigError(
            f"prompt {prompt_id}: verify {settings.get('mode')!r} raised {type(e).__name__}: {e}; "
            "fix the function"
        ) from None


def answers_match(
    predicted: str | None, reference: str, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9
) -> bool:
    """True when the answer `predicted` is the same as `reference` (mode auto)."""
    if not predicted:
        return False
    return check(predicted, reference, rel_tol=rel_tol, abs_tol=abs_tol).verified is True


def verify(text: str, reference: str, patterns: list[str] | None = None) -> bool:
    """Does the final answer in `text` match `reference`? (check() in mode auto, as a bool)"""
    return check(text, reference, patterns=patterns).verified is True


@functools.lru_cache(maxsize=32)  # a file is executed once, not once per row
def load_function(spec: str, key: str) -> Callable[..., Any]:
    """'module:function' or 'path/to/file.py:function' -> the function; errors are one line
    naming the config `key`. Shared by `verify:` and build's `custom_filter:`."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(
            f"{key} {spec!r}: expected 'module:function' or 'path/to/file.py:function'"
        )
    try:
        if target.endswith(".py") or "/" in target:
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"{key} {spec!r}: file {path} not found; fix the path")
            mspec = importlib.util.spec_from_file_location(f"distill_{key}_{path.stem}", path)
            if mspec is None or mspec.loader is None:
                raise ConfigError(f"{key} {spec!r}: {path} is not a Python file")
            module = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as e:  # the user's module may raise anything while importing
        raise ConfigError(
            f"{key} {spec!r}: cannot import {target} ({type(e).__name__}: {e}); "
            "give an importable module or a path to a .py file"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{key} {spec!r}: {target} has no function {name!r}")
    return fn  # type: ignore[no-any-return]
