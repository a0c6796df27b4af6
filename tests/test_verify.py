"""Answer extraction and comparison (pipeline/verify.py), shared by build and eval."""

from __future__ import annotations

import doctest

import pytest

import pipeline.verify
from pipeline.errors import ConfigError
from pipeline.verify import answers_match, extract_answer, normalize_text, to_number, verify


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2 + 3 = 5. The answer is 5.", "5"),
        ("First \\boxed{1}, then \\boxed{\\frac{3}{4}} at last.", "\\frac{3}{4}"),
        ("nested \\boxed{{1}+\\sqrt{2}} ok", "{1}+\\sqrt{2}"),
        ("unclosed at the end \\boxed{7} and \\boxed{8", "7"),
        ("**Answer:** 17", "17"),
        ("Final answer: -3", "-3"),
        ("The answer is 3.5.\nThanks", "3.5"),
        ("The answer is: Paris.", "Paris"),
        ("I think the answer is 4. No wait, the answer is 6.", "6"),
        ("We count 1,234,567 stars and then 12", "12"),
        ("We count 12 then 1,234,567 stars", "1,234,567"),
        ("half of it is .5", ".5"),
        ("it is 3/4 of the cake", "3/4"),
        ("x-3 has no negative number", "3"),
        ("temperature fell to -7 degrees", "-7"),
        ("no digits at all", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_extract_answer_patterns_come_first_and_last_match_wins() -> None:
    text = "The answer is 1. #### 42\n#### 43\n\\boxed{9}"
    assert extract_answer(text, [r"####\s*(\d+)"]) == "43"
    assert extract_answer(text, [r"#### \d+"]) == "#### 43"  # no group: the whole match
    assert extract_answer(text, [r"NOPE(\d)"]) == "9"  # no match: fall back to \boxed
    assert extract_answer(text, [r"NOPE(\d)", r"The answer is (\d)"]) == "1"


def test_bad_pattern_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"'\(\[' does not compile"):
        extract_answer("x", ["(["])


@pytest.mark.parametrize(
    "predicted, reference",
    [
        ("42", "42"),
        ("42.0", "42"),
        ("-5", "-5"),
        ("−5", "-5"),  # unicode minus
        ("0.75", "3/4"),
        ("\\frac{3}{4}", "0.75"),
        ("\\dfrac34", "3/4"),
        ("-\\frac{1}{2}", "-0.5"),
        ("\\frac{-1}{2}", "-1/2"),
        ("1,234,567", "1234567"),
        ("1{,}000", "1000"),
        ("12 cm", "12"),
        ("$5", "5"),
        ("$5.00", "5"),
        ("€5", "5"),
        ("5 €", "5"),
        ("\\$5", "5 dollars"),
        ("50%", "50"),
        ("50\\%", "50"),
        ("$\\boxed{7}$", "7"),
        ("x = 7", "7"),
        ("7.", "7"),
        (".5", "0.5"),
        ("0.3333333333", "1/3"),  # within rel_tol 1e-6
        ("1.5e3", "1500"),
        ("\\text{Paris}", "paris"),
        ("  The   Red  Fox. ", "the red fox"),
        ("$x^2$", "x^2"),
    ],
)
def test_answers_match(predicted: str, reference: str) -> None:
    assert answers_match(predicted, reference)


@pytest.mark.parametrize(
    "predicted, reference",
    [
        ("41", "42"),
        ("-5", "5"),
        ("0.74", "3/4"),
        ("1,5", "15"),  # not a thousands separator: compared as text
        ("5 + x", "5"),  # an expression, not a number with a unit
        ("2^10", "2"),
        ("London", "Paris"),
        (None, "5"),
        ("", "5"),
        ("0.333", "1/3"),
    ],
)
def test_answers_do_not_match(predicted: str | None, reference: str) -> None:
    assert not answers_match(predicted, reference)


def test_tolerances_are_the_callers() -> None:
    assert not answers_match("100.5", "100")
    assert answers_match("100.5", "100", rel_tol=0.01)
    assert answers_match("0.001", "0", abs_tol=0.01)
    assert not answers_match("0.001", "0")


def test_to_number_and_normalize() -> None:
    assert to_number("1,234.5 USD") == pytest.approx(1234.5)
    assert to_number("\\frac{1}{0}") is None
    assert to_number("3/0") is None
    assert to_number("five") is None
    assert normalize_text("**\\textbf{Yes}**.") == "yes"


def test_verify_end_to_end() -> None:
    assert verify("12 * 12 = 144, so the answer is \\boxed{144}.", "144")
    assert not verify("12 * 12 = 124, so the answer is \\boxed{124}.", "144")
    assert verify("The train covers 1,200 km in total.", "1200")
    assert verify("Result: ANSWER=7/8 (checked)", "0.875", [r"ANSWER=(\S+)"])


def test_module_docstring_examples_run() -> None:
    result = doctest.testmod(pipeline.verify)
    assert result.attempted >= 2 and result.failed == 0
