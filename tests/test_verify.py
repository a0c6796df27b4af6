"""Answer checking (pipeline/verify.py), shared by build and eval: one table of cases, then the edges."""

from __future__ import annotations

import doctest
import threading
from pathlib import Path

import pytest

import pipeline.verify
from pipeline.errors import ConfigError
from pipeline.verify import answers_match, check, extract_answer, verify

THINK = "<think>\nIs it 41? 12*3=36, so maybe 99. The answer is 41.\n</think>\n\n"

# (prediction, reference, expected `verified`); mode auto, default tolerances.
CASES = [
    # math-verify's own ground: LaTeX, \boxed, roots, sets, intervals, equations, expressions
    ("\\boxed{\\frac{3}{4}}", "0.75", True),
    ("\\dfrac34", "3/4", True),
    ("$\\frac{1}{3}$", "\\frac13", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\sqrt{3}", "\\sqrt{2}", False),
    ("\\boxed{3, 2}", "2, 3", True),
    ("$\\{1,2\\}$", "\\{2,1\\}", True),
    ("$\\{1,3\\}$", "\\{2,1\\}", False),
    ("$(1,2]$", "(1,2]", True),
    ("$[1,2]$", "(1,2]", False),
    ("$[0, \\infty)$", "[0,\\infty)", True),
    ("$x \\in (1, 2]$", "(1,2]", True),
    ("$x=\\frac{-1}{2}$", "-0.5", True),
    ("x = 7", "7", True),
    ("$x^2+2x+1$", "(x+1)^2", True),
    ("$x^2+2x$", "(x+1)^2", False),
    ("The answer is $\\frac{\\pi}{2}$.", "\\frac{\\pi}{2}", True),
    ("\\pi/2", "\\frac{\\pi}{2}", True),
    ("3.14", "\\pi", False),
    ("5 + x", "5", False),
    ("2^10", "2", False),
    ("\\sqrt{2}", "1.41421356", True),
    # percentages and scientific notation
    ("50%", "50", True),
    ("50\\%", "0.5", True),
    ("40%", "0.5", False),
    ("1.5e3", "1500", True),
    ("$1.5 \\times 10^{3}$", "1500", True),
    ("6.02 \\times 10^{23}", "6.02e23", True),
    ("6.02 \\times 10^{22}", "6.02e23", False),
    # plain numbers: separators, currency, units, decimals
    ("1,234,567", "1234567", True),
    ("1{,}000", "1000", True),
    ("$5.00", "5", True),
    ("5 €", "5", True),
    ("12 cm", "12", True),
    (".5", "0.5", True),
    ("0.3333333333", "1/3", True),
    ("0.333", "1/3", False),
    ("0.74", "3/4", False),
    ("1,5", "15", False),
    ("The train covers 1,200 km in total.", "1200", True),
    # integers exactly, whatever the tolerance
    ("1000001", "1000000", False),
    ("123456790", "123456789", False),
    ("123456789", "123456789", True),
    ("\\boxed{1000001}", "1000000", False),
    ("41", "42", False),
    # Unicode minus anywhere
    ("−7 °C", "-7", True),
    ("It fell to −7 °C overnight. The answer is −7 °C.", "-7", True),
    ("−7 °C", "7", False),
    ("−5", "−5", True),
    ("5", "−5", False),
    # short text answers
    ("Paris", "Paris", True),
    ("paris", "Paris", True),
    ("The answer is: Paris.", "Paris", True),
    ("\\text{Paris}", "paris", True),
    ("  The   Red  Fox. ", "the red fox", True),
    ("London", "Paris", False),
    ("Not Paris", "Paris", False),
    ("H2O", "H2O", True),
    # multiple-choice letters
    ("B", "B", True),
    ("(B)", "B", True),
    ("**B**", "B", True),
    ("The answer is B", "B", True),
    ("The answer is (B).", "(B)", True),
    ("B) Paris", "B", True),
    ("C", "B", False),
    ("The answer is (C).", "B", False),
    ("I think so", "I", None),  # "I" followed by a word is not a choice
    # yes/no
    ("Yes", "yes", True),
    ("yes.", "Yes", True),
    ("No, because it is odd.", "no", True),
    ("No", "Yes", False),
    ("True", "false", False),
    ("Perhaps", "Yes", None),
    # the trace is never read: misleading numbers and answers inside <think>
    (THINK + "The answer is 42.", "42", True),
    (THINK + "The answer is 42.", "41", False),
    (THINK + "Paris", "Paris", True),
    (THINK + "Paris", "41", None),  # a text answer to a number: the 41 in the trace is not found
    (THINK + "\\boxed{B}", "B", True),
    ("<think>\\boxed{7}</think>\\boxed{8}", "7", False),
    ("<think>cut off while thinking, 7", "7", None),
    # nothing to find
    ("", "5", None),
    ("   ", "Paris", None),
]


@pytest.mark.parametrize("prediction, reference, expected", CASES)
def test_check_table(prediction: str, reference: str, expected: bool | None) -> None:
    got = check(prediction, reference)
    assert got.verified is expected, got


def test_table_is_big_and_covers_both_outcomes() -> None:
    assert len(CASES) >= 60
    assert {e for *_, e in CASES} == {True, False, None}


@pytest.mark.parametrize(
    "prediction, reference, mode, expected",
    [
        ("\\sqrt{8}", "2\\sqrt{2}", "math", True),
        ("2.0", "2", "math", True),
        ("Paris", "Paris", "text", True),
        ("\\sqrt{8}", "2\\sqrt{2}", "text", False),  # text never calls sympy
        ("\\boxed{3, 2}", "2, 3", "text", False),
        ("42", "42", "text", True),
        ("Result: ANSWER=7/8 (checked) \\boxed{1}", "0.875", "regex", True),
        ("\\boxed{0.875}", "0.875", "regex", None),  # regex mode: the patterns or nothing
        ("ANSWER=Paris", "paris", "regex", True),
    ],
)
def test_modes(prediction: str, reference: str, mode: str, expected: bool | None) -> None:
    assert check(prediction, reference, mode=mode, patterns=[r"ANSWER=(\S+)"]).verified is expected


@pytest.mark.parametrize("reference", ["Paris", "B", "yes", "the red fox"])
def test_math_mode_on_a_text_reference_is_a_one_line_config_error(reference: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"verify 'math': reference {reference!r} is not a math"
    ) as e:
        check("anything", reference, mode="math")
    assert "\n" not in str(e.value)


def test_regex_mode_needs_patterns() -> None:
    with pytest.raises(ConfigError, match="needs answer_patterns"):
        check("42", "42", mode="regex")


def test_tolerances_are_the_callers() -> None:
    assert check("100.5", "100").verified is False
    assert check("100.5", "100", rel_tol=0.01).verified is True
    assert check("0.001", "0", abs_tol=0.01).verified is True
    assert check("0.001", "0").verified is False
    # integers stay exact even under a loose tolerance
    assert check("1000001", "1000000", rel_tol=0.01).verified is False


def test_custom_function_from_a_file(tmp_path: Path) -> None:
    f = tmp_path / "myverify.py"
    f.write_text(
        "def same_length(answer, reference):\n"
        "    return None if not answer else len(answer) == len(reference)\n"
        "def bad(answer, reference):\n"
        "    return 'yes'\n"
    )
    spec = f"{f}:same_length"
    assert check("<think>long trace</think>abc", "xyz", mode=spec).verified is True
    assert check("abcd", "xyz", mode=spec).verified is False
    assert check("<think>only a trace</think>", "xyz", mode=spec).verified is None
    with pytest.raises(ConfigError, match="returned 'yes'"):
        check("a", "b", mode=f"{f}:bad")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        check("a", "b", mode=f"{f}:nope")
    with pytest.raises(ConfigError, match=r"verify 'mathh': expected auto, math, text, regex or"):
        check("a", "b", mode="mathh")


def test_custom_function_from_a_module() -> None:
    # any importable module works; the function gets (final answer, reference)
    assert check("x", "y", mode="operator:ne").verified is True
    assert check("x", "x", mode="operator:ne").verified is False


def test_missing_reference_is_no_verdict_not_an_error() -> None:
    assert check("42", None).verified is None


def test_verdict_says_why_and_what() -> None:
    v = check(THINK + "So the answer is \\boxed{43}.", "42")
    assert (v.verified, v.reason, v.answer) == (False, "wrong answer", "43")
    assert check("", "42").reason == "no final answer found"
    assert check("\\boxed{\\sqrt{8}}", "2\\sqrt{2}").reason == "equal by math-verify"


def test_works_outside_the_main_thread() -> None:
    # math-verify's signal-based timeout cannot run in a thread; we must not crash there
    got: list[bool | None] = []
    t = threading.Thread(target=lambda: got.append(check("\\sqrt{18}", "3\\sqrt{2}").verified))
    t.start()
    t.join()
    assert got == [True]


def test_extract_answer_reads_the_final_answer_only() -> None:
    text = "<think>The answer is 1. #### 41</think>The answer is 1. #### 42\n#### 43\n\\boxed{9}"
    assert extract_answer(text, [r"####\s*(\d+)"]) == "43"
    assert extract_answer(text, [r"#### \d+"]) == "#### 43"  # no group: the whole match
    assert extract_answer(text, [r"NOPE(\d)"]) == "9"  # no match: fall back to \boxed
    assert extract_answer("The answer is 1. Then more.") == "1"
    assert extract_answer("Paris") == "Paris"
    assert extract_answer("<think>42</think>") is None
    with pytest.raises(ConfigError, match=r"'\(\[' does not compile"):
        extract_answer("x", ["(["])


def test_old_entry_points_keep_working() -> None:
    assert verify("12 * 12 = 144, so the answer is \\boxed{144}.", "144")
    assert not verify("12 * 12 = 124, so the answer is \\boxed{124}.", "144")
    assert verify("Result: ANSWER=7/8 (checked)", "0.875", [r"ANSWER=(\S+)"])
    assert answers_match("\\frac{3}{4}", "0.75") and not answers_match(None, "5")
    assert answers_match("100.5", "100", rel_tol=0.01) and not answers_match("100.5", "100")


def test_module_docstring_examples_run() -> None:
    result = doctest.testmod(pipeline.verify)
    assert result.attempted >= 2 and result.failed == 0
