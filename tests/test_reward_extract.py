"""Tests of answer extraction (psnrl/trainer/reward/extract.py): the last box, else "the answer is"."""
from __future__ import annotations

import pytest

from psnrl.trainer.reward import extract_answer
from psnrl.trainer.reward.extract import _brace_end, _brace_matches


@pytest.mark.parametrize("text,expected", [
    (r"so the answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{\frac{\sqrt{3}}{\left(2+\frac{1}{2}\right)}}", r"\frac{\sqrt{3}}{\left(2+\frac{1}{2}\right)}"),
    (r"first \boxed{1} then \boxed{2}", "2"),                   # the last box wins
    (r"\boxed{3} and a truncated \boxed{\frac{1}{", "3"),       # an unbalanced last box is skipped
    (r"\fbox{7}", "7"),
    (r"\boxed 5 is it", "5"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),                          # escaped braces inside
    (r"\boxed{}", None),
    ("The answer is 42.", "42"),
    ("Final answer: $x = 5$, as shown.", "x = 5"),
    ("**Answer:** 17", "17"),
    ("the answer is \\(\\frac{2}{3}\\) indeed", "\\frac{2}{3}"),
    ("no answer here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("the answer is $$7$$", "7"),                               # display math span
    (r"the answer is \[x^2\] as claimed", "x^2"),
    (r"\boxed {5}", "5"),                                       # space before the brace
    (r"\boxed{1} \boxed{}", "1"),                               # an empty last box is skipped
    (r"\boxed{2}. The answer is 3.", "2"),                      # a box beats "the answer is"
    ("The answer is: 12. Then more text.", "12"),                 # up to the end of the sentence
])
def test_extract_answer_more_forms(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_searches_only_the_tail_and_never_raises():
    # the box lies before the last max_completion_chars (200k) characters
    assert extract_answer(r"\boxed{1}" + "x" * 200_000) is None
    assert extract_answer("x" * 200_000 + r"\boxed{1}") == "1"
    for bad in (None, 5, b"\\boxed{1}", ["\\boxed{1}"]):
        assert extract_answer(bad) is None


def test_brace_helpers():
    assert _brace_end("{a{b}c}", 0) == 6
    assert _brace_end("{a", 0) == -1
    assert _brace_end(r"{\}}", 0) == 3                          # an escaped brace is skipped
    assert _brace_matches(r"a{b\{c}d}") == {1: 6}
    assert _brace_matches("{{}}") == {0: 3, 1: 2}
