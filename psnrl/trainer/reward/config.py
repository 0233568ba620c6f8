"""The verifier's knobs (:class:`RewardConfig`) and its internal errors."""

from __future__ import annotations

from dataclasses import dataclass

# Rational vs irrational-looking values (a decimal answer vs pi): equal only this close, far
# below any decimal an answer would be rounded to.
EXACT_REL_TOL = 1e-25


@dataclass(frozen=True)
class RewardConfig:
    """Knobs of the verifier; the defaults are the policy documented in the package docstring (__init__.py)."""

    rel_tol: float = 1e-6            # numeric comparison: |a-b| <= rel_tol * max(|a|, |b|)
    timeout_s: float = 1.0           # wall-clock limit of one symbolic check (worker process)
    max_answer_chars: int = 2000     # longer extracted answers score 0
    max_completion_chars: int = 200_000  # only this tail of a completion is searched
    max_tokens: int = 800
    max_depth: int = 40              # nesting of groups / arguments
    max_nodes: int = 1000            # AST nodes per answer
    max_items: int = 64              # elements of a tuple / list / set / matrix
    max_exponent: int = 10_000       # |exponent| of any power with a numeric exponent
    max_bits: int = 20_000           # size of every exact rational intermediate
    max_pm: int = 3                  # \pm occurrences per value (2**3 expansions)
    n_points: int = 3                # evaluation points when free symbols are present
    symbolic: bool = True            # run the sympy check for undecided pairs
    exact_match: bool = True         # the canonical-string shortcut (off only to test the rest)
    n_workers: int = 2               # symbolic worker processes


DEFAULT_CONFIG = RewardConfig()


# ----------------------------------------------------------------------------------------------
# errors (internal; never leave the public functions)


class _ParseError(Exception):
    """Not in the parsed subset."""


class _Reject(Exception):
    """A bound was hit or the value is undefined (division by exact zero): score 0."""


class _Unsure(Exception):
    """The numeric check cannot decide this value (nan, infinity arithmetic, rounding)."""


class _Overflow(_Unsure):
    """The value is too large for a float (a finite reasonable value cannot equal it)."""
