"""Tests of the perturbations in psnrl/trainer/reward/agreement.py (math-verify itself not needed)."""
from __future__ import annotations

import random

import pytest

from psnrl.trainer.reward import verify
from psnrl.trainer.reward.agreement import as_inequality, frac_decimal, items, kinds, top_level

KINDS = kinds(mv=None, rng=random.Random(0))   # rounded_irrational, the one user of mv, is not called


def test_top_level_split_and_items():
    assert top_level(r"\frac{1}{2}+x-(y+1)", "+-") == [("", r"\frac{1}{2}"), ("+", "x"), ("-", "(y+1)")]
    assert top_level("-2+3", "+-") == [("", "-2"), ("+", "3")]      # a leading sign is no separator
    assert len(top_level(r"10,\!080", ",")) == 1                    # thousands, not a list
    assert items(r"\{1,2\}") == (r"\{", r"\}", ["1", "2"])
    assert items("(1,2)") == ("(", ")", ["1", "2"])
    assert items(r"(1,2)\cup(3,4)") is None
    assert frac_decimal(r"\frac{3}{8}", exact=True) == "0.375" and frac_decimal(r"\frac{1}{3}", exact=True) is None
    assert frac_decimal(r"-\frac{1}{3}", exact=False) == "-0.3333" and frac_decimal("1/2", exact=False) is None
    assert as_inequality(r"(-\infty, 2]") == r"x \le 2" and as_inequality("[1,3)") == "1 \\le x < 3"
    assert as_inequality("(1,3)") is None       # a point or an interval: unknown


@pytest.mark.parametrize("kind,ref,variant", [
    ("frac_to_slash", r"\frac{x+1}{2}", "(x+1)/(2)"),
    ("frac_to_slash", r"1\frac{4}{5}", None),                        # a mixed number stays
    ("sum_reorder", "6 - 5i", "-5i+6"),
    ("spaces", r"3\sqrt{13}", r"3\,\sqrt{13}"),
    ("x_equals", "x^2+1", None),                                   # not for a variable expression
    ("set_reorder", "1,-2", "-2,1"),
    ("tuple_swap", "[2,5)", "[5,2)"),
    ("sign_flip", "x+1", "-(x+1)"),
    ("dropped_term", "3, 5, 7", "3,5"),
])
def test_perturbations(kind, ref, variant):
    assert KINDS[kind][1](ref) == variant


def test_equivalent_kinds_hold_on_a_few_references():
    # every applicable equivalent rewrite of these references verifies (our side of the table)
    for ref in ("42", r"\frac{3}{8}", "6 - 5i", "1,-2", r"(-\infty,2)\cup(3,\infty)"):
        for name, (label, rewrite) in KINDS.items():
            variant = rewrite(ref) if name != "rounded_irrational" else None
            if variant is not None and variant != ref:
                assert verify(variant, ref) is label, (name, ref, variant)
