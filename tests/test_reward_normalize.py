"""Tests of answer normalization (psnrl/trainer/reward/normalize.py): the canonical answer string."""
from __future__ import annotations

import pytest

from psnrl.trainer.reward import normalize


def test_normalize_examples():
    assert normalize(r"\left( 3, \dfrac{\pi}{2} \right)") == r"(3,\frac{\pi}{2})"
    assert normalize(r"10,\!080") == "10080"
    assert normalize(r"\$32,\!348") == "32348"
    assert normalize(r"15\mbox{ cm}^2") == "15"
    assert normalize(r"90^{\circ}") == "90"
    assert normalize(r"\text{(B)}") == "(B)"
    assert normalize(r"\cot x") == r"\cot x"          # the space a command needs is kept
    assert normalize("1,2") == "1,2"
    assert normalize(None) == ""


@pytest.mark.parametrize("raw,expected", [
    ("\u22125", "-5"),                       # unicode minus
    ("\u03c0/2", r"\pi/2"),                  # unicode pi
    ("3 000 000", "3000000"),                # thousands separated by spaces, lone number only
    (r"2 \text{ and } 3", "2,3"),            # "and" / "or" between items become commas
    ("5 cm", "5"),                           # trailing plain unit word
    ("12 apples", "12"),                     # plain words after a lone number
    (r"\text{ 4 }", "4"),
    ("+7", "7"),                             # a leading plus is dropped
    (r"\le 3", r"\leq 3"),
    (r"5^{\prime}", "5'"),
    (r"x \in [1,2]", r"x\in[1,2]"),
    (r"\approx 8.24", "8.24"),
    (r"$\displaystyle \tfrac{1}{2}$", r"\frac{1}{2}"),
    (r"17.5\%", "17.5"),
])
def test_normalize_table(raw, expected):
    assert normalize(raw) == expected


def test_normalize_never_raises_and_bounds_length():
    assert normalize("x" * 9000) == ""        # over 4x max_answer_chars
    assert normalize(5) == ""
    assert normalize("1\x002") == "1 2"        # a control character becomes a space (verify rejects it)
    assert normalize(r"\text{" * 300) == r"\text{" * 300
