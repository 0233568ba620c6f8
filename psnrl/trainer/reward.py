"""Math answer reward: extract the final answer, normalize it, and check it against a reference.

Model output is hostile text (docs/design.md, "Rewards and evaluation"). Nothing in this module
hands model text to ``eval``, ``exec``, ``sympify``, ``parse_expr`` or a LaTeX front end that
evaluates Python. The pipeline is::

    completion --extract_answer--> answer string --normalize--> canonical string
               --_Parser--> small AST of plain tuples (bounded: length, tokens, depth, nodes)
               --compare--> 1) exact: canonical strings equal
                            2) numeric: exact rationals (fractions.Fraction) where the value is
                               rational, complex floats otherwise; free symbols are evaluated at
                               a few fixed pseudo-random points
                            3) symbolic: only when (2) cannot decide; the AST is sent to a
                               worker process that builds sympy objects through constructors
                               (Integer, Rational, Symbol, Add, Mul, Pow, sin, ...) and runs
                               simplify(a - b) == 0 / a.equals(b) under a time limit.

Public API: :func:`extract_answer`, :func:`normalize`, :func:`verify`, :func:`math_reward`,
:func:`score_batch`, :class:`RewardConfig`, :func:`warmup`, :func:`shutdown_workers`.

Parsed subset (LaTeX and plain text): integers, decimals, scientific notation (``4.5e33``),
thousands separators (``1,000,000``, ``10,\\!080``; only when the whole answer is one such number,
so ``1,2`` stays a list), ``+ - * / ^``, ``\\cdot \\times \\div``, implicit multiplication
(``2\\sqrt{3}``, ``3x``, ``(a+5)(b+2)``), mixed numbers (``1\\frac{4}{5}`` = 9/5),
``\\frac \\dfrac \\tfrac`` (also ``\\frac12``), ``\\sqrt{}``, ``\\sqrt[n]{}``, ``\\binom``, ``!``,
``| |``, floor/ceil, ``\\sin \\cos \\tan \\cot \\sec \\csc`` and inverses, hyperbolic functions,
``\\log`` (natural unless ``\\log_b``), ``\\ln``, ``\\exp``, ``\\pi``, ``e``, ``i``, ``\\infty``,
single-letter and Greek variables with subscripts (``C_1``, ``\\omega_{n}``), ``f(x)``-style
atoms, ``\\pm``/``\\mp`` (expanded into the list of values), tuples ``(a,b)``, intervals
``[a,b)``, unions ``\\cup``, sets ``\\{a,b\\}``, bare lists ``a, b``, relations
``= < > \\leq \\geq \\neq \\in``, matrices (``pmatrix``/``bmatrix``). Anything else fails to
parse and can then only match by the exact path.

Policies (all deliberate, all tested):

* percent: ``%`` is stripped, so ``10\\%`` == ``10``; when exactly one side carried a percent
  sign, value/100 is also accepted (``10\\%`` == ``0.1``); ``10`` != ``0.1``.
* degrees (``^\\circ``, ``\\degree``, ``\\text{degrees}``), dollars, ``\\text{...}`` units and
  trailing plain unit words (``5 cm``) are stripped, and so are plain words after a lone number
  (``1920 ways``); unit mismatches are not detected.
* a subscript base on a number (``204_5``) is dropped: ``204_5`` == ``204``.
* equations: ``x=5`` == ``5`` when the left side is a name (``x``, ``f(x)``, ``k``); two
  equations match side by side, or when their differences are proportional (``y=2x+3`` ==
  ``2x-y+3=0``).
* bare lists and sets are unordered (``1,2`` == ``2,1``); tuples, intervals and matrices are
  ordered and their brackets must agree (``[2,5)`` != ``(2,5)``).
* numeric tolerance: relative 1e-6 (``RewardConfig.rel_tol``); exact rationals compare exactly
  under the same tolerance, so ``0.333`` != ``1/3`` but ``0.3333333`` == ``1/3``. A rational
  (a decimal answer) equals an irrational-looking value (``\\pi``, ``\\sqrt{2}``,
  ``\\sin 1``) only if it is exactly equal (``0.5`` == ``\\sin(\\pi/6)``): no rounded
  decimal of a constant is accepted, however many digits (``3.14159`` != ``\\pi``).
* free symbols are positive reals in the numeric test (three fixed points in (0.5, 2)) and
  ``positive=True`` in sympy, so ``\\sqrt{x^2}`` == ``x``.
* words: answers that are plain words (``\\text{Evelyn}``) compare exactly, case-insensitively.

Bounds (any bound hit scores 0): answer length (2000 chars), tokens (800), nesting depth (40
nested groups: brackets, braces, arguments; ``RewardConfig.max_depth``),
AST nodes (1000), list items (64), |exponent| <= 10000 and every exact intermediate value <= 20000
bits (so ``9^{9^{9^9}}`` and ``10^{10^{10}}`` are refused before anything is computed), factorial
and binomial arguments, ``\\pm`` count (3), the tail of the completion searched (200k chars), and
the symbolic check's wall time (``timeout_s``, 1 s by default). Division by an exact zero scores 0.

Worker processes: the symbolic check runs in a small pool of persistent workers, each a fresh
``python -c`` interpreter started with :mod:`subprocess` (never ``fork``: the trainer has torch,
CUDA and OpenMP threads, and forking a threaded process can deadlock the child on a lock some other
thread held; never ``multiprocessing`` spawn/forkserver either: they re-import the user's
``__main__``, which breaks scripts without a main guard and cannot run inside daemonic processes).
The worker loads this file by path (not the ``trainer`` package, whose ``__init__`` may grow
heavy), imports sympy once, and answers length-prefixed pickled jobs (the parent trusts its
own worker; the worker answers with one ASCII byte). Each job carries its time limit: the worker
interrupts itself with SIGALRM at the limit (a BaseException, so sympy's ``except Exception``
cannot swallow it) and stays alive; the parent scores 0 at the limit and kills and replaces a
worker that has not answered 0.5 s later (stuck inside C code). A worker takes ~0.5 s to start
(import sympy), once per process; :func:`warmup` starts them early. Exact and numeric checks run
in-process and decide almost every pair (~40 us each), so only a few pairs pay the 1-2 ms round
trip to a worker.
A pool that cannot start (no ``sys.executable``, no ``select`` on pipes) scores undecided pairs 0.
"""

from __future__ import annotations

import atexit
import cmath
import math
import os
import pickle
import random
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import deque
from dataclasses import astuple, dataclass, replace
from fractions import Fraction
from functools import lru_cache
from typing import Iterable, Optional, Sequence

__all__ = [
    "RewardConfig",
    "DEFAULT_CONFIG",
    "extract_answer",
    "normalize",
    "verify",
    "math_reward",
    "score_batch",
    "warmup",
    "shutdown_workers",
]


# Rational vs irrational-looking values (a decimal answer vs pi): equal only this close, far
# below any decimal an answer would be rounded to.
EXACT_REL_TOL = 1e-25


@dataclass(frozen=True)
class RewardConfig:
    """Knobs of the verifier; the defaults are the policy documented in the module docstring."""

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


# ----------------------------------------------------------------------------------------------
# extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS_RE = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:is\s*:?|:|=)\s*", re.IGNORECASE)


def _brace_matches(text: str) -> dict:
    """Index of every ``{`` -> index of its matching ``}`` (escaped ``\\{ \\}`` skipped); O(n)."""
    match = {}
    stack = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            match[stack.pop()] = i
        i += 1
    return match


def _last_boxed(text: str) -> Optional[str]:
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    if not starts:
        return None
    matches = None
    for pos in reversed(starts):
        j = pos
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            end = None
            if matches is None:   # usually the last box closes soon: scan a bounded window first
                end = _brace_end(text[j:j + 16_384], 0)
                end = j + end if end >= 0 else None
                if end is None:
                    matches = _brace_matches(text)
            if matches is not None:
                end = matches.get(j)
            if end is None:
                continue  # unbalanced (e.g. truncated): try the previous box
            content = text[j + 1:end].strip()
        else:  # \boxed 5
            m = re.match(r"[^\s$]+", text[j:j + 200])
            content = m.group(0) if m else ""
        if content:
            return content
    return None


def _answer_is(text: str) -> Optional[str]:
    last = None
    for last in _ANSWER_IS_RE.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end():last.end() + 8000]
    line = rest.split("\n", 1)[0].strip()
    line = line.replace("**", "").strip()
    if line.startswith("$$"):
        end = line.find("$$", 2)
        line = line[2:end] if end >= 0 else line[2:]
    elif line.startswith("$"):
        end = line.find("$", 1)
        line = line[1:end] if end >= 0 else line[1:]
    elif line.startswith("\\(") or line.startswith("\\["):
        close = "\\)" if line[1] == "(" else "\\]"
        end = line.find(close, 2)
        line = line[2:end] if end >= 0 else line[2:]
    else:
        m = re.search(r"\.(?:\s|$)", line)
        if m:
            line = line[:m.start()]
    line = line.strip().rstrip(".").strip()
    return line or None


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a completion, or None.

    The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces (nested braces
    are fine; an unbalanced, e.g. truncated, last box falls back to the previous one; empty boxes
    are skipped); without a box, the text after the last "final answer is" / "the answer is" /
    "answer:" on its line (first ``$...$`` math span, else up to the end of the sentence).
    Only the last ``max_completion_chars`` characters are searched. Never raises.
    """
    try:
        if not isinstance(text, str) or not text:
            return None
        text = text[-DEFAULT_CONFIG.max_completion_chars:]
        ans = _last_boxed(text)
        if ans is None:
            ans = _answer_is(text)
        return ans
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------
# normalization

_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00d7": "\\times ", "\u22c5": "\\cdot ",
    "\u00b7": "\\cdot ", "\u00f7": "/", "\u03c0": "\\pi ", "\u221e": "\\infty ", "\u00b0": "^\\circ ",
    "\u221a": "\\sqrt", "\u2264": "\\leq ", "\u2265": "\\geq ", "\u2260": "\\neq ", "\u00b1": "\\pm ",
    "\u2213": "\\mp ", "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\uff0c": ",", "\u222a": "\\cup ",
    "\u2208": "\\in ",
}
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)))
_CTRL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

_TEXT_CMD_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|textsf|texttt|textnormal|textup|mbox|hbox|mathrm|mathbf|"
    r"mathit|mathsf|mathtt|mathbb|mathcal|operatorname|boldsymbol|bm)\s*\{")

_UNIT_WORDS = frozenset("""
cm mm km m meter meters metre metres centimeter centimeters centimetre centimetres millimeter
millimeters kilometer kilometers in inch inches ft foot feet yd yard yards mile miles mi mph kph
kmh g kg mg gram grams kilogram kilograms lb lbs pound pounds ounce ounces oz ton tons s sec secs
second seconds min mins minute minutes h hr hrs hour hours day days week weeks month months year
years l liter liters litre litres ml gallon gallons cent cents dollar dollars euro euros degree
degrees deg radian radians rad unit units square sq cubic cu percent per
""".split())
# Unit words stripped from plain trailing text ("5 cm"): no one-letter or ambiguous words.
_PLAIN_UNIT_WORDS = frozenset(w for w in _UNIT_WORDS if len(w) >= 2) - {"in", "mi", "cu", "per"}

_CMD_TOKEN_RE = re.compile(r"\\(?:[A-Za-z]+|.)", re.DOTALL)
_CMD_MAP = {
    "\\!": "", "\\,": "", "\\:": "", "\\;": "", "\\ ": " ", "\\quad": " ", "\\qquad": " ",
    "\\enspace": " ", "\\thinspace": " ", "\\medspace": " ", "\\thickspace": " ",
    "\\$": " ", "\\%": " ", "\\(": " ", "\\)": " ", "\\[": " ", "\\]": " ",
    "\\displaystyle": " ", "\\textstyle": " ", "\\left": "", "\\right": "", "\\middle": "",
    "\\big": "", "\\Big": "", "\\bigg": "", "\\Bigg": "", "\\bigl": "", "\\bigr": "",
    "\\Bigl": "", "\\Bigr": "", "\\biggl": "", "\\biggr": "", "\\Biggl": "", "\\Biggr": "",
    "\\dfrac": "\\frac", "\\tfrac": "\\frac", "\\cfrac": "\\frac", "\\dbinom": "\\binom",
    "\\tbinom": "\\binom", "\\le": "\\leq", "\\leqslant": "\\leq", "\\ge": "\\geq",
    "\\geqslant": "\\geq", "\\ne": "\\neq", "\\lt": "<", "\\gt": ">",
}
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_THOUSANDS_SPACE_RE = re.compile(r"[-+]?\d{1,3}(?: \d{3})+(?:\.\d+)?")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|\\circ(?![A-Za-z])|"
                        r"\^\s*\{\s*\\degree\s*\}|\^\s*\\degree(?![A-Za-z])|\\degree(?![A-Za-z])")
_TRAILING_UNIT_RE = re.compile(r"([A-Za-z]+(?:/[A-Za-z]+)?)(\s*\^\s*\{?\s*[23]\s*\}?)?\s*$")


def _brace_end(s: str, i: int) -> int:
    """s[i] == '{': index of the matching '}', or -1."""
    depth = 0
    j, n = i, len(s)
    while j < n:
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    return -1


def _is_units(content: str) -> bool:
    """Only unit words ("cm", "square units", "km/h", "m^2"), no numbers or other words."""
    content = re.sub(r"\^\s*\{?\s*[23]\s*\}?", " ", content)
    words = [w for w in re.split(r"[\s/.]+", content.strip()) if w]
    return bool(words) and all(w.lower() in _UNIT_WORDS for w in words)


def _unwrap_text(s: str) -> str:
    for _ in range(200):
        m = _TEXT_CMD_RE.search(s)
        if not m:
            break
        end = _brace_end(s, m.end() - 1)
        if end < 0:
            break
        content = s[m.end():end]
        tail = s[end + 1:]
        stripped = content.strip()
        if not stripped:
            repl = " "
        elif stripped.lower() in ("or", "and"):
            repl = ","
        elif _is_units(stripped) and s[:m.start()].strip():
            repl = " "
            tail = re.sub(r"^\s*\^\s*\{?\s*[23]\s*\}?", "", tail)
        else:
            repl = " " + stripped + " " if re.fullmatch(r"[A-Za-z ]+", stripped) else stripped
        s = s[:m.start()] + repl + tail
    return s


_NUMBER_WORDS_RE = re.compile(r"([-+]?[0-9][0-9,]*(?:\.[0-9]+)?)\s+([A-Za-z]{3,}(?:\s+[A-Za-z]{2,}){0,3})")


def _strip_plain_units(s: str) -> str:
    s = s.rstrip(".").rstrip()
    m = _NUMBER_WORDS_RE.fullmatch(s)   # "1920 ways", "18 apples": a number and plain words
    if m and not any(w.lower() in _FUNCS or w.lower() in ("pi", "infty", "inf", "sqrt")
                     for w in m.group(2).split()):
        return m.group(1)
    out = s
    for _ in range(4):
        m = _TRAILING_UNIT_RE.search(out)
        if not m or m.start() == 0 or out[m.start() - 1] == "\\":
            break
        words = m.group(1).lower().split("/")
        if not all(w in _PLAIN_UNIT_WORDS for w in words):
            break
        out = out[:m.start()].rstrip()
    if out is not s and out and out[-1] in "0123456789})].":
        return out
    return s


def _normalize(s: str) -> str:
    s = _CTRL_RE.sub(" ", s)
    s = _UNICODE_RE.sub(lambda m: _UNICODE[m.group(0)], s)
    s = re.sub(r"\\(?:left|right)\s*\.", " ", s)
    s = re.sub(r"(?<=\d),\s*\\!\s*(?=\d{3}(?!\d))", "", s)   # MATH's thousands: 11,\\! 111
    s = _CMD_TOKEN_RE.sub(lambda m: _CMD_MAP.get(m.group(0), m.group(0)), s)
    s = s.replace("$", " ").replace("~", " ")
    s = re.sub(r"\\(?:hspace|phantom|vspace)\*?\s*\{[^{}]*\}", " ", s)
    s = re.sub(r"\^\s*\{\s*\\prime\s*\}|\^\s*\\prime(?![A-Za-z])|\\prime(?![A-Za-z])", "'", s)
    s = _DEGREE_RE.sub(" ", s)
    s = s.replace("%", " ")
    s = _unwrap_text(s)
    s = re.sub(r"\s+(?:and|or)\s+", ",", s)
    s = s.replace("{,}", ",")
    s = re.sub(r",\s*(?:,\s*)+", ",", s)          # "2, 3, \text{ and } 4"
    s = re.sub(r"^\s*(?:=|\\approx(?![A-Za-z]))", "", s)   # "= 5", "\approx 8.24"
    s = re.sub(r"\s+", " ", s).strip()
    s = _strip_plain_units(s)
    s = s.strip().rstrip(".;,").strip()
    s = re.sub(r"(?<!\\)\\\s*$", "", s).strip()
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    elif _THOUSANDS_SPACE_RE.fullmatch(s):
        s = s.replace(" ", "")
    # keep a space only between two letters or digits ("\cot x", "a b", "\log_2 8", "2^3 5");
    # drop it everywhere else
    s = re.sub(r"(?<![A-Za-z0-9])\s+|\s+(?![A-Za-z0-9])", "", s)
    if s.startswith("+") and len(s) > 1:
        s = s[1:]
    return s


def normalize(ans: str) -> str:
    """Canonical form of an answer string (the exact-match key and the parser's input).

    Drops ``$``, ``\\left``/``\\right``, spacing (``\\!``, ``\\,``, ``\\quad``), ``\\displaystyle``,
    degrees, percent, dollar signs, unit words (in ``\\text{}``/``\\mbox{}`` or trailing plain
    text); unwraps ``\\text{...}`` otherwise; maps ``\\dfrac``/``\\tfrac`` to ``\\frac``,
    ``\\le``/``\\leqslant`` to ``\\leq``; removes thousands separators of a lone number; keeps a
    space only between two letters or digits. Never raises (returns "" for non-strings and for strings
    over 4x ``max_answer_chars``).
    """
    try:
        if not isinstance(ans, str) or len(ans) > 4 * DEFAULT_CONFIG.max_answer_chars:
            return ""
        return _normalize(ans)
    except Exception:
        return ""


# ----------------------------------------------------------------------------------------------
# tokenizer and parser -> AST of plain tuples
#
# scalar nodes:  ('num', Fraction) ('sym', name) ('const', 'pi'|'E'|'I'|'oo')
#                ('add', t...) ('mul', f...) ('neg', x) ('pm', x) ('div', a, b) ('pow', a, b)
#                ('root', x) ('root', x, n) ('func', name, arg...)
# structures:    ('tuple', open, close, item...) ('set', item...) ('list', item...)
#                ('union', item...) ('rel', op, lhs, rhs) ('matrix', ncols, entry...)

_CHILD_START = {"add": 1, "mul": 1, "neg": 1, "pm": 1, "div": 1, "pow": 1, "root": 1, "func": 2,
                "tuple": 3, "set": 1, "list": 1, "union": 1, "rel": 2, "matrix": 2}
_STRUCT = frozenset(("tuple", "set", "list", "union", "rel", "matrix"))

_TOKEN_RE = re.compile(r"""
  (?P<ws>\s+)
| (?P<num>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[-+]?[0-9]+(?![A-Za-z0-9]))?)
| (?P<cmd>\\(?:[A-Za-z]+|.))
| (?P<word>[A-Za-z]+)
| (?P<op>[-+*/^_()\[\]{},;=<>|!'&:.])
""", re.VERBOSE | re.DOTALL)

_GREEK = frozenset("""
alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi
omicron rho varrho sigma varsigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda
Xi Pi Sigma Upsilon Phi Psi Omega hbar ell
""".split())
_FUNCS = {
    "sin": "sin", "cos": "cos", "tan": "tan", "cot": "cot", "sec": "sec", "csc": "csc",
    "arcsin": "asin", "arccos": "acos", "arctan": "atan", "arccot": "acot",
    "asin": "asin", "acos": "acos", "atan": "atan",
    "sinh": "sinh", "cosh": "cosh", "tanh": "tanh", "log": "log", "ln": "ln", "lg": "log10",
    "exp": "exp",
}
_INVERSE = {"sin": "asin", "cos": "acos", "tan": "atan", "cot": "acot"}
_RELOPS = {"=": "=", "\\leq": "<=", "\\geq": ">=", "\\neq": "!=", "\\in": "in",
           "\\approx": "=", "\\lt": "<", "\\gt": ">", "\\equiv": "="}
_DECORATORS = frozenset(("\\dot", "\\ddot", "\\bar", "\\hat", "\\vec", "\\tilde", "\\overline",
                         "\\widehat", "\\widetilde", "\\check", "\\acute", "\\grave"))
_MATRIX_ENVS = frozenset(("pmatrix", "bmatrix", "Bmatrix", "matrix", "smallmatrix"))


def _num_value(text: str) -> Fraction:
    m = re.fullmatch(r"([0-9]*)(?:\.([0-9]*))?(?:e([-+]?[0-9]+))?", text)
    if not m or not (m.group(1) or m.group(2)):
        raise _ParseError("bad number")
    ip, fp, ex = m.group(1) or "0", m.group(2) or "", m.group(3)
    val = Fraction(int(ip + fp), 10 ** len(fp))
    if ex is not None:
        e = int(ex)
        if abs(e) > 400:
            raise _Reject("exponent of a number literal")
        val = val * 10 ** e if e >= 0 else val / 10 ** (-e)
    return val


def _tokenize(s: str, cfg: RewardConfig) -> list:
    toks = []
    pos, n = 0, len(s)
    while pos < n:
        m = _TOKEN_RE.match(s, pos)
        if not m:
            raise _ParseError(f"unexpected character {s[pos]!r}")
        pos = m.end()
        kind = m.lastgroup
        if kind == "ws":
            continue
        toks.append((kind, m.group(kind)))
        if len(toks) > cfg.max_tokens:
            raise _Reject("too many tokens")
    return toks


class _Parser:
    """Recursive descent over the token list; every construct is bounded by the config."""

    def __init__(self, s: str, cfg: RewardConfig):
        self.toks = _tokenize(s, cfg)
        self.cfg = cfg
        self.i = 0
        self.off = 0       # characters already consumed from toks[i] (\frac12, \sqrt2, "ab")
        self.depth = 0
        self.nodes = 0

    # -- token access
    def peek(self, k: int = 0):
        j = self.i + k
        if j >= len(self.toks):
            return (None, None)
        kind, text = self.toks[j]
        if k == 0 and self.off:
            text = text[self.off:]
        return (kind, text)

    def advance(self):
        self.i += 1
        self.off = 0

    def consume_chars(self, n: int):
        self.off += n
        if self.off >= len(self.toks[self.i][1]):
            self.advance()

    def is_op(self, t: str) -> bool:
        k, x = self.peek()
        return k == "op" and x == t

    def is_cmd(self, t: str) -> bool:
        k, x = self.peek()
        return k == "cmd" and x == t

    def expect_op(self, t: str):
        if not self.is_op(t):
            raise _ParseError(f"expected {t!r}")
        self.advance()

    def mk(self, *node):
        self.nodes += 1
        if self.nodes > self.cfg.max_nodes:
            raise _Reject("too many nodes")
        return node

    def enter(self):
        self.depth += 1
        if self.depth > self.cfg.max_depth:
            raise _Reject("nesting too deep")

    @staticmethod
    def scalar(node):
        if node[0] in _STRUCT:
            raise _ParseError("structure used as a number")
        return node

    # -- grammar
    def parse(self):
        items = self.parse_items()
        if self.peek()[0] is not None:
            raise _ParseError("trailing input")
        return items[0] if len(items) == 1 else self.mk("list", *items)

    def parse_items(self):
        items = [self.parse_item()]
        while self.is_op(",") or self.is_op(";"):
            self.advance()
            items.append(self.parse_item())
            if len(items) > self.cfg.max_items:
                raise _Reject("too many items")
        return items

    def relop(self):
        k, t = self.peek()
        if k == "op" and t in ("=", "<", ">"):
            self.advance()
            if t in "<>" and self.is_op("="):
                self.advance()
                return t + "="
            return t
        if k == "cmd" and t in _RELOPS:
            self.advance()
            return _RELOPS[t]
        return None

    def parse_item(self):
        left = self.parse_union()
        op = self.relop()
        if op is None:
            return left
        right = self.parse_union()
        k, t = self.peek()
        if (k == "op" and t in ("=", "<", ">")) or (k == "cmd" and t in _RELOPS):
            raise _ParseError("chained relation")
        return self.mk("rel", op, left, right)

    def parse_union(self):
        first = self.parse_sum()
        if not self.is_cmd("\\cup"):
            return first
        items = [first]
        while self.is_cmd("\\cup"):
            self.advance()
            items.append(self.parse_sum())
            if len(items) > self.cfg.max_items:
                raise _Reject("too many items")
        return self.mk("union", *items)

    def take_sign(self):
        k, t = self.peek()
        if k == "op" and t in "+-":
            self.advance()
            return t
        if k == "cmd" and t in ("\\pm", "\\mp"):
            self.advance()
            return "pm"
        return None

    def parse_sum(self):
        # Not a nesting level of its own: the groups that contain a sum (brackets, braces,
        # arguments) count, so max_depth is the number of nested groups, as documented.
        lead = None
        if self.is_cmd("\\pm") or self.is_cmd("\\mp"):
            self.advance()
            lead = "pm"
        terms = [self.signed(lead, self.parse_term())]
        while True:
            sign = self.take_sign()
            if sign is None:
                break
            terms.append(self.signed(sign, self.parse_term()))
        if len(terms) == 1:
            return terms[0]
        for t in terms:
            self.scalar(t)
        return self.mk("add", *terms)

    def signed(self, sign, node):
        if sign is None or sign == "+":
            return node
        self.scalar(node)
        return self.mk("neg" if sign == "-" else "pm", node)

    def implicit_start(self) -> bool:
        k, t = self.peek()
        if k in ("num", "word"):
            return True
        if k == "op":
            return t in ("(", "[", "{")
        if k == "cmd":
            name = t[1:]
            return (t in ("\\frac", "\\sqrt", "\\binom", "\\pi", "\\infty", "\\lfloor", "\\lceil",
                          "\\exp", "\\imath", "\\lvert", "\\vert")
                    or name in _GREEK or name in _FUNCS or t in _DECORATORS)
        return False

    def parse_term(self):
        cur = self.parse_factor()
        while True:
            k, t = self.peek()
            if (k == "op" and t == "*") or (k == "cmd" and t in ("\\cdot", "\\times", "\\ast")):
                self.advance()
                cur = self.mul(cur, self.parse_factor())
            elif (k == "op" and t == "/") or (k == "cmd" and t == "\\div"):
                self.advance()
                rhs = self.parse_factor()
                cur = self.mk("div", self.scalar(cur), self.scalar(rhs))
            elif self.implicit_start():
                cur = self.mul(cur, self.parse_power())
            else:
                return cur

    def mul(self, a, b):
        self.scalar(a)
        self.scalar(b)
        if a[0] == "mul":
            return self.mk(*a, b)
        return self.mk("mul", a, b)

    def parse_factor(self):
        neg = 0
        while True:
            k, t = self.peek()
            if k == "op" and t in "+-":
                self.advance()
                neg += t == "-"
                if neg > 64:
                    raise _Reject("too many signs")
            else:
                break
        node = self.parse_power()
        if neg % 2:
            node = self.mk("neg", self.scalar(node))
        return node

    def parse_power(self):
        base = self.parse_postfix()
        if self.is_op("^"):
            self.advance()
            exp = self.parse_arg(split=False)
            base = self.mk("pow", self.scalar(base), self.scalar(exp))
            while self.is_op("!"):
                self.advance()
                base = self.mk("func", "factorial", base)
            if self.is_op("^"):
                raise _ParseError("double superscript")
        return base

    def sub_text(self) -> str:
        """Raw text of a subscript: a braced group or one character / command."""
        k, t = self.peek()
        if k == "op" and t == "{":
            self.advance()
            parts = []
            depth = 1
            while True:
                k, t = self.peek()
                if k is None:
                    raise _ParseError("unbalanced subscript")
                self.advance()
                if k == "op" and t == "{":
                    depth += 1
                elif k == "op" and t == "}":
                    depth -= 1
                    if depth == 0:
                        break
                parts.append(t)
                if len(parts) > 64:
                    raise _Reject("subscript too long")
            text = "".join(parts)
            if not text:
                raise _ParseError("empty subscript")
            return text
        if k in ("num", "word"):
            ch = t[0]
            self.consume_chars(1)
            return ch
        if k == "cmd":
            self.advance()
            return t
        raise _ParseError("bad subscript")

    def parse_postfix(self):
        node = self.parse_primary()
        while True:
            k, t = self.peek()
            if k != "op":
                return node
            if t == "_":
                self.advance()
                sub = self.sub_text()
                if node[0] == "sym":
                    node = self.mk("sym", f"{node[1]}_{sub}")
                elif node[0] == "num" and sub.isdigit():
                    pass  # 204_5: the base subscript is dropped
                else:
                    raise _ParseError("subscript on an expression")
            elif t == "!":
                if self.peek(1) == ("op", "="):
                    return node
                if node[0] == "func" and node[1] == "factorial" and node[2][0] == "func":
                    raise _Reject("iterated factorial")
                self.advance()
                node = self.mk("func", "factorial", self.scalar(node))
            elif t == "'":
                if node[0] != "sym":
                    raise _ParseError("prime on an expression")
                self.advance()
                node = self.mk("sym", node[1] + "'")
            elif t == "(" and node[0] == "sym" and self.off == 0:
                # f(x), u(t), I(0), \theta(t): an opaque atom; n(n+1) stays a product
                k1, t1 = self.peek(1)
                if self.peek(2) == ("op", ")") and (
                        k1 == "num" or (k1 == "word" and len(t1) == 1)
                        or (k1 == "cmd" and t1[1:] in _GREEK)):
                    self.i += 3
                    node = self.mk("sym", f"{node[1]}({t1})")
                else:
                    return node
            else:
                return node

    def letter(self, ch: str):
        if ch == "e":
            return self.mk("const", "E")
        if ch == "i":
            return self.mk("const", "I")
        return self.mk("sym", ch)

    def parse_arg(self, split: bool = True):
        """Argument of \\frac, \\sqrt, \\binom (split: one digit/letter) or of ^ (whole number)."""
        self.enter()
        try:
            return self._parse_arg(split)
        finally:
            self.depth -= 1

    def _parse_arg(self, split: bool):
        k, t = self.peek()
        if k == "op" and t == "{":
            self.advance()
            node = self.parse_item()
            self.expect_op("}")
            return node
        if k == "num":
            if split and len(t) > 1:
                if not t[0].isdigit():
                    raise _ParseError("bad argument")
                self.consume_chars(1)
                return self.mk("num", Fraction(int(t[0])))
            self.advance()
            return self.mk("num", _num_value(t))
        if k == "word":
            self.consume_chars(1)
            return self.letter(t[0])
        if k == "cmd":
            return self.parse_primary()
        if k == "op" and t in "+-" and not split:
            self.advance()
            node = self.parse_arg(split)
            return self.mk("neg", self.scalar(node)) if t == "-" else node
        if k == "op" and t in "([":
            return self.parse_primary()
        raise _ParseError("bad argument")

    def parse_primary(self):
        k, t = self.peek()
        if k is None:
            raise _ParseError("unexpected end")
        if k == "num":
            return self.parse_number(t)
        if k == "word":
            return self.parse_word(t)
        if k == "op":
            if t in "([":
                return self.parse_bracket()
            if t == "{":
                return self.parse_brace()
            if t == "|":
                self.advance()
                inner = self.parse_sum()
                self.expect_op("|")
                return self.mk("func", "abs", self.scalar(inner))
            raise _ParseError(f"unexpected {t!r}")
        return self.parse_cmd(t)

    def parse_number(self, t: str):
        full = self.off == 0
        self.advance()
        node = self.mk("num", _num_value(t))
        if full and t.isdigit() and self.is_cmd("\\frac"):
            # mixed number 1\frac{4}{5} = 9/5 (integer literal + proper fraction of literals)
            saved = (self.i, self.off, self.nodes)
            try:
                self.advance()
                a = self.parse_arg()
                b = self.parse_arg()
                if (a[0] == "num" and b[0] == "num" and a[1].denominator == 1
                        and b[1].denominator == 1 and 0 < a[1] < b[1]):
                    return self.mk("num", node[1] + a[1] / b[1])
            except _ParseError:
                pass
            self.i, self.off, self.nodes = saved
        return node

    def parse_word(self, t: str):
        if self.off == 0:
            if t in _FUNCS:
                self.advance()
                return self.parse_function(_FUNCS[t])
            if t == "pi":
                self.advance()
                return self.mk("const", "pi")
            if t in ("infty", "inf", "infinity"):
                self.advance()
                return self.mk("const", "oo")
            if t == "sqrt":
                self.advance()
                return self.mk("root", self.scalar(self.parse_arg()))
            if len(t) >= 4:   # a word ("Evelyn", "SRMC"): one opaque symbol
                self.advance()
                return self.mk("sym", t)
        self.consume_chars(1)
        return self.letter(t[0])

    def parse_bracket(self):
        _, open_ = self.peek()
        self.advance()
        self.enter()
        try:
            items = self.parse_items()
        finally:
            self.depth -= 1
        k, close = self.peek()
        if k != "op" or close not in (")", "]"):
            raise _ParseError("unclosed bracket")
        self.advance()
        if len(items) == 1:
            if (open_, close) in (("(", ")"), ("[", "]")):
                return items[0]
            raise _ParseError("mismatched brackets")
        return self.mk("tuple", open_, close, *items)

    def parse_brace(self):
        self.advance()
        self.enter()
        try:
            items = self.parse_items()
        finally:
            self.depth -= 1
        self.expect_op("}")
        if len(items) == 1:
            return items[0]
        return self.mk("set", *items)

    def parse_set(self):
        self.advance()  # \{
        if self.is_cmd("\\}"):
            self.advance()
            return self.mk("set")
        self.enter()
        try:
            items = self.parse_items()
        finally:
            self.depth -= 1
        if not self.is_cmd("\\}"):
            raise _ParseError("unclosed set")
        self.advance()
        return self.mk("set", *items)

    def parse_delimited(self, func: str, close: str):
        self.advance()
        inner = self.parse_sum()
        if not self.is_cmd(close):
            raise _ParseError(f"expected {close}")
        self.advance()
        return self.mk("func", func, self.scalar(inner))

    def parse_cmd(self, t: str):
        name = t[1:]
        if t == "\\frac":
            self.advance()
            a = self.scalar(self.parse_arg())
            b = self.scalar(self.parse_arg())
            return self.mk("div", a, b)
        if t == "\\binom":
            self.advance()
            a = self.scalar(self.parse_arg())
            b = self.scalar(self.parse_arg())
            return self.mk("func", "binom", a, b)
        if t == "\\sqrt":
            self.advance()
            index = None
            if self.is_op("["):
                self.advance()
                index = self.scalar(self.parse_sum())
                self.expect_op("]")
            arg = self.scalar(self.parse_arg())
            return self.mk("root", arg) if index is None else self.mk("root", arg, index)
        if t == "\\pi":
            self.advance()
            return self.mk("const", "pi")
        if t == "\\infty":
            self.advance()
            return self.mk("const", "oo")
        if t == "\\imath":
            self.advance()
            return self.mk("const", "I")
        if name in _GREEK:
            self.advance()
            return self.mk("sym", t)
        if name in _FUNCS:
            self.advance()
            return self.parse_function(_FUNCS[name])
        if t == "\\lfloor":
            return self.parse_delimited("floor", "\\rfloor")
        if t == "\\lceil":
            return self.parse_delimited("ceil", "\\rceil")
        if t in ("\\lvert", "\\vert"):
            return self.parse_delimited("abs", "\\rvert" if t == "\\lvert" else "\\vert")
        if t == "\\{":
            return self.parse_set()
        if t in ("\\emptyset", "\\varnothing"):
            self.advance()
            return self.mk("set")
        if t in _DECORATORS:
            self.advance()
            arg = self.parse_arg()
            if arg[0] != "sym":
                raise _ParseError("decorated expression")
            return self.mk("sym", f"{t}{{{arg[1]}}}")
        if t == "\\begin":
            return self.parse_matrix()
        raise _ParseError(f"unsupported command {t}")

    def parse_function(self, fname: str):
        power = base = None
        for _ in range(2):
            if self.is_op("^") and power is None:
                self.advance()
                power = self.scalar(self.parse_arg(split=False))
            elif self.is_op("_") and base is None and fname == "log":
                self.advance()
                base = self.scalar(self.parse_arg())
        if power is not None and fname in _INVERSE and power == ("neg", ("num", Fraction(1))):
            fname, power = _INVERSE[fname], None
        self.enter()
        try:
            if self.is_op("("):
                self.advance()
                arg = self.parse_sum()
                self.expect_op(")")
            elif self.is_op("{"):
                arg = self.parse_arg()
            else:
                arg = self.parse_implicit_arg()
        finally:
            self.depth -= 1
        arg = self.scalar(arg)
        node = self.mk("func", fname, arg) if base is None else self.mk("func", "log", arg, base)
        if power is not None:
            node = self.mk("pow", node, power)
        return node

    def parse_implicit_arg(self):
        """\\sin 2x, \\ln 2, \\sin \\theta(t): a product of factors, stopping at a function."""
        if self.is_op("-"):
            self.advance()
            return self.mk("neg", self.scalar(self.parse_implicit_arg()))
        node = self.parse_power()
        while True:
            k, t = self.peek()
            if k == "op" or (k == "cmd" and (t[1:] in _FUNCS or t in ("\\lfloor", "\\lceil"))):
                return node
            if k == "word" and self.off == 0 and t in _FUNCS:
                return node
            if not self.implicit_start():
                return node
            node = self.mul(node, self.parse_power())

    def parse_matrix(self):
        self.advance()
        self.expect_op("{")
        k, env = self.peek()
        if k != "word" or env not in _MATRIX_ENVS:
            raise _ParseError("unsupported environment")
        self.advance()
        self.expect_op("}")
        rows, row = [], []
        self.enter()
        try:
            while True:
                row.append(self.scalar(self.parse_sum()))
                if len(row) + sum(map(len, rows)) > self.cfg.max_items:
                    raise _Reject("matrix too large")
                if self.is_op("&"):
                    self.advance()
                    continue
                if self.is_cmd("\\\\"):
                    self.advance()
                    rows.append(row)
                    row = []
                    if self.is_cmd("\\end"):
                        break
                    continue
                if self.is_cmd("\\end"):
                    rows.append(row)
                    row = []
                    break
                raise _ParseError("bad matrix")
        finally:
            self.depth -= 1
        self.advance()  # \end
        self.expect_op("{")
        if self.peek() != ("word", env):
            raise _ParseError("mismatched environment")
        self.advance()
        self.expect_op("}")
        ncols = len(rows[0])
        if not rows or any(len(r) != ncols for r in rows):
            raise _ParseError("ragged matrix")
        return self.mk("matrix", ncols, *[e for r in rows for e in r])


# -- AST utilities


def _children(node):
    start = _CHILD_START.get(node[0])
    return () if start is None else node[start:]


def _count_pm(node) -> int:
    if node[0] == "pm":
        return 1 + _count_pm(node[1])
    return sum(_count_pm(c) for c in _children(node) if c is not None)


def _subst_pm(node, plus: bool):
    """Replace the first ``pm`` node (depth-first) by + or -; returns (new_node, replaced)."""
    if node[0] == "pm":
        return (node[1] if plus else ("neg", node[1])), True
    start = _CHILD_START.get(node[0])
    if start is None:
        return node, False
    parts = list(node)
    for j in range(start, len(parts)):
        if parts[j] is None:
            continue
        new, done = _subst_pm(parts[j], plus)
        if done:
            parts[j] = new
            return tuple(parts), True
    return node, False


def _variants(node, cfg: RewardConfig) -> list:
    n = _count_pm(node)
    if n == 0:
        return [node]
    if n > cfg.max_pm:
        raise _Reject("too many \\pm")
    out = [node]
    for _ in range(n):
        nxt = []
        for v in out:
            nxt.append(_subst_pm(v, True)[0])
            nxt.append(_subst_pm(v, False)[0])
        out = nxt
    return out


def _expand_pm(node, cfg: RewardConfig):
    """\\pm becomes an unordered list of values (at the top, in lists/sets, on a relation's rhs)."""
    k = node[0]
    if k in ("list", "set"):
        items = []
        for it in node[1:]:
            if it[0] in _STRUCT:
                items.append(_expand_pm(it, cfg))
            else:
                items.extend(_variants(it, cfg))
        if len(items) > 4 * cfg.max_items:
            raise _Reject("too many items")
        return (k, *items)
    if k == "rel":
        if _count_pm(node[2]):
            raise _ParseError("\\pm on the left of a relation")
        rhs = _expand_pm(node[3], cfg)
        return ("rel", node[1], node[2], rhs)
    if k in _STRUCT:
        if _count_pm(node):
            raise _ParseError("\\pm inside a structure")
        return node
    vs = _variants(node, cfg)
    return vs[0] if len(vs) == 1 else ("list", *vs)


def _free_symbols(node, acc=None) -> frozenset:
    if acc is None:
        acc = set()
        _free_symbols(node, acc)
        return frozenset(acc)
    if node[0] == "sym":
        acc.add(node[1])
    for c in _children(node):
        if c is not None:
            _free_symbols(c, acc)
    return acc


def _name_like(node) -> bool:
    if node[0] == "sym":
        return True
    return node[0] == "mul" and all(c[0] == "sym" for c in node[1:])


# ----------------------------------------------------------------------------------------------
# numeric evaluation (pure Python, bounded)


@lru_cache(maxsize=8192)
def _symval(name: str, point: int) -> float:
    seed = (zlib.crc32(name.encode("utf-8", "surrogatepass")) << 4) | point
    return 0.5 + 1.5 * random.Random(seed).random()


def _cx(v) -> complex:
    if isinstance(v, Fraction):
        try:
            return complex(float(v))
        except OverflowError:
            raise _Overflow("too large for a float") from None
    return v


def _fin(z: complex) -> complex:
    if cmath.isinf(z):
        raise _Overflow("infinite")
    if cmath.isnan(z):
        raise _Unsure("nan")
    if abs(z) > 1e300:
        raise _Overflow("too large")
    return z


def _is_real(z: complex) -> bool:
    return abs(z.imag) <= 1e-12 * max(1.0, abs(z.real))


_CMATH = {
    "sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "asin": cmath.asin, "acos": cmath.acos,
    "atan": cmath.atan, "sinh": cmath.sinh, "cosh": cmath.cosh, "tanh": cmath.tanh,
    "exp": cmath.exp, "ln": cmath.log, "log": cmath.log, "log10": cmath.log10,
    "cot": lambda z: 1 / cmath.tan(z), "sec": lambda z: 1 / cmath.cos(z),
    "csc": lambda z: 1 / cmath.sin(z), "acot": lambda z: cmath.atan(1 / z),
}


class _Numeric:
    """Evaluates scalar AST nodes at fixed points; results memoized per node (by identity)."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.rel = Fraction(repr(cfg.rel_tol))
        self.memo = {}
        self.keep = []     # keeps memoized temporary nodes alive (their ids must stay unique)

    def check(self, f: Fraction) -> Fraction:
        mb = self.cfg.max_bits
        if f.numerator.bit_length() > mb or f.denominator.bit_length() > mb:
            raise _Reject("exact value too large")
        return f

    # -- values
    def values(self, node):
        """Tuple of per-point results: a Fraction, a complex, or an _Unsure instance."""
        key = id(node)
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        npts = self.cfg.n_points if _free_symbols(node) else 1
        out = []
        for p in range(npts):
            try:
                out.append(self.ev(node, p))
            except _Unsure as e:
                out.append(e)
            except (ArithmeticError, ValueError) as e:
                out.append(_Unsure(str(e)))
        out = tuple(out)
        self.memo[key] = out
        self.keep.append(node)
        return out

    def ev(self, node, p: int):
        k = node[0]
        if k == "num":
            return node[1]
        if k == "sym":
            return complex(_symval(node[1], p))
        if k == "const":
            c = node[1]
            if c == "pi":
                return complex(math.pi)
            if c == "E":
                return complex(math.e)
            if c == "I":
                return 1j
            raise _Unsure("infinity in arithmetic")
        if k == "neg":
            return -self.ev(node[1], p)
        if k == "add":
            acc = Fraction(0)
            for c in node[1:]:
                acc = self.add(acc, self.ev(c, p))
            return acc
        if k == "mul":
            acc = Fraction(1)
            for c in node[1:]:
                acc = self.mul(acc, self.ev(c, p))
            return acc
        if k == "div":
            a, b = self.ev(node[1], p), self.ev(node[2], p)
            if isinstance(b, Fraction) and b == 0:
                raise _Reject("division by zero")
            if isinstance(a, Fraction) and isinstance(b, Fraction):
                return self.check(a / b)
            zb = _cx(b)
            if zb == 0:
                raise _Unsure("division by a float zero")
            return _fin(_cx(a) / zb)
        if k == "pow":
            return self.pow(self.ev(node[1], p), self.ev(node[2], p))
        if k == "root":
            x = self.ev(node[1], p)
            if len(node) == 2:
                return self.sqrt(x)
            return self.root(x, self.ev(node[2], p))
        if k == "func":
            return self.func(node[1], [self.ev(c, p) for c in node[2:]])
        raise _Reject(f"{k} used as a number")

    def add(self, a, b):
        if isinstance(a, Fraction) and isinstance(b, Fraction):
            return self.check(a + b)
        return _fin(_cx(a) + _cx(b))

    def mul(self, a, b):
        if isinstance(a, Fraction) and isinstance(b, Fraction):
            return self.check(a * b)
        if isinstance(a, Fraction) and a == 0 or isinstance(b, Fraction) and b == 0:
            return Fraction(0)
        return _fin(_cx(a) * _cx(b))

    def pow(self, a, b):
        cfg = self.cfg
        if isinstance(b, Fraction):
            if isinstance(a, Fraction) and a in (0, 1, -1) and b.denominator == 1:
                if a == 0 and b < 0:
                    raise _Reject("division by zero")
                return a ** int(b)
            if abs(b) > cfg.max_exponent:
                raise _Reject("exponent too large")
            if isinstance(a, Fraction):
                if b.denominator == 1:
                    n = int(b)
                    bits = max(a.numerator.bit_length(), a.denominator.bit_length())
                    if bits * abs(n) > cfg.max_bits:
                        raise _Reject("power too large")
                    return a ** n
                if a == 0:
                    if b > 0:
                        return Fraction(0)
                    raise _Reject("division by zero")
                if b.denominator == 2 and a > 0:
                    r = self.sqrt(a)
                    if isinstance(r, Fraction):
                        return self.pow(r, Fraction(b.numerator))
        elif abs(b) > cfg.max_exponent:
            raise _Reject("exponent too large")
        za, zb = _cx(a), _cx(b)
        if za == 0:
            if zb.real > 0:
                return Fraction(0)
            raise _Unsure("zero to a non-positive power")
        try:
            return _fin(za ** zb)
        except OverflowError:
            raise _Overflow("power overflow") from None
        except ZeroDivisionError:
            raise _Unsure("zero division") from None

    def sqrt(self, x):
        if isinstance(x, Fraction) and x >= 0:
            n, d = x.numerator, x.denominator
            rn, rd = math.isqrt(n), math.isqrt(d)
            if rn * rn == n and rd * rd == d:
                return Fraction(rn, rd)
        return _fin(cmath.sqrt(_cx(x)))

    def root(self, x, n):
        if not (isinstance(n, Fraction) and n.denominator == 1 and 1 <= n <= 1000):
            if isinstance(n, Fraction):
                if n == 0:
                    raise _Reject("zeroth root")
                return self.pow(x, self.check(1 / n))
            zn = _cx(n)
            if zn == 0:
                raise _Unsure("zeroth root")
            return self.pow(x, _fin(1 / zn))
        n = int(n)
        if n == 2:
            return self.sqrt(x)
        z = _cx(x)
        if _is_real(z) and z.real < 0 and n % 2 == 1:   # real odd root of a negative number
            return _fin(complex(-((-z.real) ** (1.0 / n))))
        if isinstance(x, Fraction) and x >= 0:
            r = round(float(x) ** (1.0 / n)) if float(x) < 1e300 else None
            if r is not None and Fraction(r) ** n == x:
                return Fraction(r)
        return _fin(z ** (1.0 / n))

    def func(self, name: str, args: list):
        if name in _CMATH:
            if name == "log" and len(args) == 2:
                num, base = self.func("ln", [args[0]]), self.func("ln", [args[1]])
                if _cx(base) == 0:
                    raise _Unsure("log base 1")
                return _fin(_cx(num) / _cx(base))
            x = args[0]
            if name in ("ln", "log") and isinstance(x, Fraction) and x == 1:
                return Fraction(0)
            try:
                return _fin(_CMATH[name](_cx(x)))
            except OverflowError:
                raise _Overflow(name) from None
            except (ValueError, ZeroDivisionError):
                raise _Unsure(name) from None
        if name == "abs":
            x = args[0]
            return abs(x) if isinstance(x, Fraction) else complex(abs(x))
        if name in ("floor", "ceil"):
            x = args[0]
            if isinstance(x, Fraction):
                return Fraction(math.floor(x) if name == "floor" else math.ceil(x))
            if not _is_real(x):
                raise _Unsure("floor of a complex number")
            r = x.real
            if abs(r - round(r)) < 1e-9:
                raise _Unsure("floor at an integer boundary")
            return Fraction(math.floor(r) if name == "floor" else math.ceil(r))
        if name == "factorial":
            x = args[0]
            if isinstance(x, Fraction) and x.denominator == 1:
                if x < 0:
                    raise _Reject("factorial of a negative integer")
                if x > 3000:
                    raise _Reject("factorial too large")
                return self.check(Fraction(math.factorial(int(x))))
            return self.gamma(_cx(x) + 1)
        if name == "binom":
            a, b = args
            if all(isinstance(v, Fraction) and v.denominator == 1 for v in (a, b)):
                if not 0 <= a <= 2000:
                    raise _Reject("binomial too large")
                return self.check(Fraction(math.comb(int(a), int(b)) if b >= 0 else 0))
            za, zb = _cx(a), _cx(b)
            return _fin(self.gamma(za + 1) / (self.gamma(zb + 1) * self.gamma(za - zb + 1)))
        raise _Reject(f"unknown function {name}")

    @staticmethod
    def gamma(z: complex) -> complex:
        if not _is_real(z):
            raise _Unsure("gamma of a complex number")
        try:
            return _fin(complex(math.gamma(z.real)))
        except OverflowError:
            raise _Overflow("gamma") from None
        except ValueError:
            raise _Unsure("gamma pole") from None

    # -- comparisons
    def close(self, a, b) -> Optional[bool]:
        if isinstance(a, _Unsure) or isinstance(b, _Unsure):
            ov_a, ov_b = isinstance(a, _Overflow), isinstance(b, _Overflow)
            if ov_a != ov_b:   # one side overflows, the other is a finite value
                other = None if isinstance(b if ov_a else a, _Unsure) else _cx_safe(b if ov_a else a)
                if other is not None and abs(other) < 1e290:
                    return False
            return None
        if isinstance(a, Fraction) and isinstance(b, Fraction):
            if a == b:
                return True
            return abs(a - b) <= self.rel * max(abs(a), abs(b))
        za, zb = _cx_safe(a), _cx_safe(b)
        if za is None or zb is None:   # an exact value beyond float range
            other = zb if za is None else za
            return False if other is not None and abs(other) < 1e290 else None
        d = abs(za - zb)
        m = max(abs(za), abs(zb))
        if d > self.cfg.rel_tol * m and m >= 1e-9:
            return False
        if isinstance(a, Fraction) or isinstance(b, Fraction):
            # An exact rational (a decimal answer, say) against a value known here only in
            # floating point (pi, sqrt(2), a trig value): agreeing, even to the last bit, is what
            # a rounded decimal does, not equality. The exact check decides.
            return None
        if d == 0:
            return True
        if m < 1e-9:   # rounding noise around zero (sin(pi) vs 0): let sympy decide
            return None
        return True

    def scalar_eq(self, a, b) -> Optional[bool]:
        ia, ib = _inf_sign(a), _inf_sign(b)
        if ia or ib:
            return ia == ib
        va, vb = self.values(a), self.values(b)
        n = max(len(va), len(vb))
        results = []
        for p in range(n):
            r = self.close(va[p % len(va)], vb[p % len(vb)])
            if r is False:
                return False
            results.append(r)
        return True if all(results) else None

    def equation_eq(self, pl, pr, rl, rr) -> Optional[bool]:
        """Equations whose differences are proportional: y=2x+3 vs 2x-y+3=0."""
        d1 = ("add", pl, ("neg", pr))
        d2 = ("add", rl, ("neg", rr))
        syms = _free_symbols(d1)
        if not syms or syms != _free_symbols(d2):
            return False
        v1, v2 = self.values(d1), self.values(d2)
        ratios = []
        for a, b in zip(v1, v2):
            if isinstance(a, _Unsure) or isinstance(b, _Unsure):
                return None
            za, zb = _cx_safe(a), _cx_safe(b)
            if za is None or zb is None or abs(za) < 1e-9 or abs(zb) < 1e-9:
                return None
            ratios.append(za / zb)
        q = ratios[0]
        if all(abs(r - q) <= self.cfg.rel_tol * max(abs(q), abs(r)) for r in ratios):
            return True
        return False


def _cx_safe(v) -> Optional[complex]:
    try:
        return _cx(v)
    except _Unsure:
        return None


def _inf_sign(node) -> int:
    if node == ("const", "oo"):
        return 1
    if node[0] == "neg" and node[1] == ("const", "oo"):
        return -1
    return 0


# ----------------------------------------------------------------------------------------------
# structural comparison (shared by the in-process check and the symbolic worker)


def _t_and(vals: Iterable) -> Optional[bool]:
    unsure = False
    for v in vals:
        if v is False:
            return False
        if v is None:
            unsure = True
    return None if unsure else True


def _matching(table, accept) -> bool:
    """Perfect bipartite matching of rows to columns through cells with accept(cell)."""
    n = len(table)
    owner = [-1] * n

    def augment(i, seen):
        for j in range(n):
            if accept(table[i][j]) and not seen[j]:
                seen[j] = True
                if owner[j] < 0 or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(augment(i, [False] * n) for i in range(n))


_FLIP = {"<": ">", "<=": ">="}


def _canon_rel(op, lhs, rhs):
    """a < b is written b > a, so the two forms compare equal."""
    if op in _FLIP:
        return _FLIP[op], rhs, lhs
    return op, lhs, rhs


class _Comparer:
    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.num = _Numeric(cfg)

    def scalar_eq(self, a, b) -> Optional[bool]:
        return self.num.scalar_eq(a, b)

    def equation_eq(self, pl, pr, rl, rr) -> Optional[bool]:
        return self.num.equation_eq(pl, pr, rl, rr)

    def ordered(self, ps, rs) -> Optional[bool]:
        if len(ps) != len(rs):
            return False
        return _t_and(self.cmp(p, r) for p, r in zip(ps, rs))

    def unordered(self, ps, rs) -> Optional[bool]:
        if len(ps) != len(rs):
            return False
        if not ps:
            return True
        table = []
        for p in ps:
            row = [self.cmp(p, r) for r in rs]
            if all(v is False for v in row):   # this element matches nothing
                return False
            table.append(row)
        if _matching(table, lambda v: v is True):
            return True
        if not _matching(table, lambda v: v is not False):
            return False
        return None

    def cmp(self, p, r) -> Optional[bool]:
        kp, kr = p[0], r[0]
        if kp == "rel" or kr == "rel":
            return self.cmp_rel(p, r)
        if kp in ("list", "set") and kr in ("list", "set"):
            return self.unordered(p[1:], r[1:])
        if kp == "tuple" and kr == "list" and p[1:3] == ("(", ")"):
            return self.unordered(p[3:], r[1:])
        if kr == "tuple" and kp == "list" and r[1:3] == ("(", ")"):
            return self.ordered(p[1:], r[3:])
        if kp == "tuple" and kr == "tuple":
            if p[1:3] != r[1:3]:
                return False
            return self.ordered(p[3:], r[3:])
        if kp == "union" and kr == "union":
            return self.unordered(p[1:], r[1:])
        if kp == "matrix" and kr == "matrix":
            if p[1] != r[1]:
                return False
            return self.ordered(p[2:], r[2:])
        if kp in _STRUCT or kr in _STRUCT:
            return False
        return self.scalar_eq(p, r)

    def cmp_rel(self, p, r) -> Optional[bool]:
        if p[0] != "rel":   # bare value vs  x = value
            if r[1] in ("=", "in") and _name_like(r[2]):
                return self.cmp(p, r[3])
            return False
        if r[0] != "rel":
            if p[1] in ("=", "in") and _name_like(p[2]):
                return self.cmp(p[3], r)
            return False
        op_p, pl, pr = _canon_rel(*p[1:])
        op_r, rl, rr = _canon_rel(*r[1:])
        if op_p != op_r:
            return False
        direct = _t_and((self.cmp(pl, rl), self.cmp(pr, rr)))
        if direct is True or op_p not in ("=", "!="):
            return direct
        swapped = _t_and((self.cmp(pl, rr), self.cmp(pr, rl)))
        if swapped is True:
            return True
        res = None if (direct is None or swapped is None) else False
        if op_p == "=" and all(x[0] not in _STRUCT for x in (pl, pr, rl, rr)):
            eq = self.equation_eq(pl, pr, rl, rr)
            if eq is True:
                return True
            if eq is None:
                res = None
        return res


def _compare(p, r, p_pct: bool, r_pct: bool, comparer: _Comparer) -> Optional[bool]:
    res = comparer.cmp(p, r)
    if res is True or p_pct == r_pct:
        return res
    # exactly one side had a percent sign: value/100 is accepted too
    hundred = ("num", Fraction(100))
    if p_pct and p[0] not in _STRUCT:
        alt = comparer.cmp(("div", p, hundred), r)
    elif r_pct and r[0] not in _STRUCT:
        alt = comparer.cmp(p, ("div", r, hundred))
    else:
        return res
    if alt is True:
        return True
    return None if (res is None or alt is None) else False


# ----------------------------------------------------------------------------------------------
# sympy (worker side): constructors only, with the same bounds


def _to_sympy(node, cfg: RewardConfig, cache: dict):
    import sympy as sp

    key = id(node)
    hit = cache.get(key)
    if hit is not None:
        return hit[1]
    k = node[0]
    rec = lambda c: _to_sympy(c, cfg, cache)  # noqa: E731
    if k == "num":
        out = sp.Rational(node[1].numerator, node[1].denominator)
    elif k == "sym":
        out = sp.Symbol(node[1], positive=True)
    elif k == "const":
        out = {"pi": sp.pi, "E": sp.E, "I": sp.I, "oo": sp.oo}[node[1]]
    elif k == "neg":
        out = sp.Mul(sp.Integer(-1), rec(node[1]))
    elif k == "add":
        out = sp.Add(*[rec(c) for c in node[1:]])
    elif k == "mul":
        out = sp.Mul(*[rec(c) for c in node[1:]])
    elif k == "div":
        a, b = rec(node[1]), rec(node[2])
        if b.is_zero:
            raise _Reject("division by zero")
        out = sp.Mul(a, sp.Pow(b, sp.Integer(-1)))
    elif k == "pow":
        b, e = rec(node[1]), rec(node[2])
        _check_sympy_pow(b, e, cfg)
        out = sp.Pow(b, e)
    elif k == "root":
        x = rec(node[1])
        if len(node) == 2:
            out = sp.sqrt(x)
        else:
            n = rec(node[2])
            if not (n.is_Integer and 1 <= int(n) <= 1000):
                _check_sympy_pow(x, sp.Pow(n, -1), cfg)
                out = sp.Pow(x, sp.Pow(n, -1))
            elif x.is_number and x.is_negative and int(n) % 2 == 1:
                out = sp.real_root(x, n)
            else:
                out = sp.root(x, n)
    elif k == "func":
        name, args = node[1], [rec(c) for c in node[2:]]
        if name == "factorial":
            if args[0].is_Integer and abs(int(args[0])) > 3000:
                raise _Reject("factorial too large")
            out = sp.factorial(args[0])
        elif name == "binom":
            if args[0].is_Integer and abs(int(args[0])) > 2000:
                raise _Reject("binomial too large")
            out = sp.binomial(args[0], args[1])
        elif name == "log" and len(args) == 2:
            out = sp.log(args[0], args[1])
        else:
            fn = {"sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "cot": sp.cot, "sec": sp.sec,
                  "csc": sp.csc, "asin": sp.asin, "acos": sp.acos, "atan": sp.atan,
                  "acot": sp.acot, "sinh": sp.sinh, "cosh": sp.cosh, "tanh": sp.tanh,
                  "exp": sp.exp, "ln": sp.log, "log": sp.log, "abs": sp.Abs,
                  "floor": sp.floor, "ceil": sp.ceiling,
                  "log10": lambda x: sp.log(x, 10)}.get(name)
            if fn is None:
                raise _Reject(f"unknown function {name}")
            out = fn(args[0])
    else:
        raise _Reject(f"{k} used as a number")
    cache[key] = (node, out)
    return out


def _check_sympy_pow(b, e, cfg: RewardConfig):
    if e.is_Number:
        if b.is_Number and b in (0, 1, -1) and e.is_Integer:
            return
        if abs(e) > cfg.max_exponent:
            raise _Reject("exponent too large")
        if b.is_Rational:
            bits = max(int(b.p).bit_length(), int(b.q).bit_length())
            if bits * abs(float(e)) > cfg.max_bits:
                raise _Reject("power too large")


class _SympyComparer(_Comparer):
    """The in-process checks first, then sympy for what they leave undecided."""

    def __init__(self, cfg: RewardConfig):
        super().__init__(cfg)
        self.cache = {}

    def sym(self, node):
        return _to_sympy(node, self.cfg, self.cache)

    def scalar_eq(self, a, b) -> Optional[bool]:
        res = super().scalar_eq(a, b)
        if res is not None:
            return res
        import sympy as sp

        A, B = self.sym(a), self.sym(b)
        if A == B:
            return True
        bad = (sp.zoo, sp.nan)
        if any(x.has(*bad) for x in (A, B)):
            return False
        d = sp.simplify(A - B)
        if d == 0:
            return True
        if d.is_number:   # within the tolerance at 30 digits (sympy floats do not overflow)
            va, vb = sp.N(A, 30), sp.N(B, 30)
            if any(v.has(*bad, sp.oo, -sp.oo) or not v.is_number for v in (va, vb)):
                return False
            diff = sp.N(sp.Abs(va - vb), 30)
            scale = max(sp.N(sp.Abs(va), 30), sp.N(sp.Abs(vb), 30))
            # A rational against an expression that did not simplify to it: only a difference
            # at the level of 30-digit rounding counts as equal, never a rounded decimal's.
            tol = EXACT_REL_TOL if (A.is_Rational or B.is_Rational) else self.cfg.rel_tol
            return bool(diff == 0 or diff <= sp.Float(tol) * scale)
        return bool(A.equals(B))

    def equation_eq(self, pl, pr, rl, rr) -> Optional[bool]:
        res = super().equation_eq(pl, pr, rl, rr)
        if res is not None:
            return res
        import sympy as sp

        d1 = sp.Add(self.sym(pl), sp.Mul(sp.Integer(-1), self.sym(pr)))
        d2 = sp.Add(self.sym(rl), sp.Mul(sp.Integer(-1), self.sym(rr)))
        if d2 == 0 or d1 == 0:
            return False
        q = sp.simplify(d1 / d2)
        return bool(q.is_number and q != 0 and q.is_finite)


# ----------------------------------------------------------------------------------------------
# preparation and the in-process verdict


class _Prep:
    __slots__ = ("key", "ast", "pct", "word", "reject")

    def __init__(self, key="", ast=None, pct=False, word=None, reject=False):
        self.key, self.ast, self.pct, self.word, self.reject = key, ast, pct, word, reject


_REJECTED = _Prep(reject=True)


def _prepare(s: str, cfg: RewardConfig) -> _Prep:
    # the length check comes before the cache, so hostile long strings are never kept
    if not isinstance(s, str) or len(s) > cfg.max_answer_chars or _CTRL_RE.search(s):
        return _REJECTED   # control characters (NUL, ESC, ...) never occur in a real answer
    return _prepare_cached(s, cfg)


@lru_cache(maxsize=8192)
def _prepare_cached(s: str, cfg: RewardConfig) -> _Prep:
    key = _normalize(s)
    if not key:
        return _REJECTED
    pct = "%" in s or "percent" in s.lower()
    word = key.lower() if re.fullmatch(r"[A-Za-z][A-Za-z ]*", key) else None
    ast = None
    try:
        ast = _expand_pm(_Parser(key, cfg).parse(), cfg)
    except (_ParseError, _Reject, ArithmeticError, ValueError, RecursionError, MemoryError):
        ast = None
    return _Prep(key, ast, pct, word)


def _fast_verdict(pred, ref, cfg: RewardConfig):
    """(verdict, job): verdict True/False, or None with a job for the symbolic worker."""
    P, R = _prepare(pred, cfg), _prepare(ref, cfg)
    if P.reject or R.reject:
        return False, None
    if cfg.exact_match and P.key == R.key:
        return True, None
    if P.word is not None and P.word == R.word:   # plain words compare case-insensitively
        return True, None
    if P.ast is None or R.ast is None:
        return False, None
    try:
        res = _compare(P.ast, R.ast, P.pct, R.pct, _Comparer(cfg))
    except (_Reject, _ParseError):
        return False, None
    if res is None:
        if not cfg.symbolic:
            return False, None
        return None, (P.ast, R.ast, P.pct, R.pct)
    return bool(res), None


# ----------------------------------------------------------------------------------------------
# worker pool (fresh interpreters over pipes; see the module docstring)

_WORKER_BOOT = (
    "import importlib.util,sys\n"
    "s=importlib.util.spec_from_file_location('_psnrl_reward_worker',sys.argv[1])\n"
    "m=importlib.util.module_from_spec(s);sys.modules[s.name]=m;s.loader.exec_module(m)\n"
    "m._worker_main()\n"
)
_GRACE_S = 0.5          # after a job's limit, how long a worker may take to interrupt itself
_STARTUP_S = 60.0       # how long a fresh worker may take to import sympy


class _WorkerTimeout(BaseException):
    """Raised by SIGALRM inside the worker; BaseException so ``except Exception`` misses it."""


def _worker_main():  # pragma: no cover - runs in the child interpreter
    import signal

    try:
        import resource

        lim = 4 << 30
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    except Exception:
        pass
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)   # stray prints from libraries cannot corrupt the protocol
    inp = sys.stdin.buffer
    import sympy  # noqa: F401
    from sympy.core.cache import clear_cache

    def on_alarm(signum, frame):
        raise _WorkerTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    out.write(b"R\n")
    done = 0
    while True:
        hdr = inp.read(4)
        if len(hdr) < 4:
            return
        (n,) = struct.unpack("<I", hdr)
        data = inp.read(n)
        answer = b"0"
        try:
            try:
                job = pickle.loads(data)
                signal.setitimer(signal.ITIMER_REAL, max(0.01, float(job[0])))
                if job[1] == "sleep":   # test hook: a job that overruns its limit
                    if job[3]:          # ... and cannot be interrupted (as if stuck in C code)
                        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                    time.sleep(float(job[2]))
                    answer = b"1"
                else:
                    p, r, ppct, rpct, fields = job[1:]
                    cfg = RewardConfig(*fields)
                    res = _compare(p, r, ppct, rpct, _SympyComparer(cfg))
                    answer = b"1" if res is True else b"0"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _WorkerTimeout:
            answer = b"T"
            clear_cache()
        except BaseException:
            answer = b"0"
        out.write(answer + b"\n")
        done += 1
        if done % 2000 == 0:
            clear_cache()


class _Worker:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            close_fds=True)
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.state = "starting"
        self.wake = time.monotonic() + _STARTUP_S
        self.job = None

    def send(self, payload: bytes):
        self.proc.stdin.write(struct.pack("<I", len(payload)) + payload)
        self.proc.stdin.flush()

    def read_lines(self):
        """Complete lines available now; None at EOF."""
        data = os.read(self.fd, 4096)
        if not data:
            return None
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return lines

    def kill(self):
        try:
            self.proc.kill()
        except Exception:
            pass
        try:
            self.proc.wait(timeout=5)
        except Exception:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass
        self.state = "dead"


class _Pool:
    def __init__(self):
        self.lock = threading.Lock()
        self.workers = []
        self.pid = os.getpid()
        self.disabled_until = 0.0

    def _fresh(self):
        if os.getpid() != self.pid:   # forked: the pipes belong to the parent's workers
            self.workers = []
            self.pid = os.getpid()
        self.workers = [w for w in self.workers if w.state != "dead"]

    def _spawn(self) -> Optional[_Worker]:
        if time.monotonic() < self.disabled_until or not sys.executable:
            return None
        try:
            return _Worker()
        except Exception:
            self.disabled_until = time.monotonic() + 60.0
            return None

    def start(self, n: int):
        with self.lock:
            self._fresh()
            while len(self.workers) < n:
                w = self._spawn()
                if w is None:
                    break
                self.workers.append(w)

    def close(self):
        with self.lock:
            if os.getpid() == self.pid:
                for w in self.workers:
                    w.kill()
            self.workers = []

    def run(self, payloads: Sequence[bytes], timeout_s: float, n_workers: int) -> list:
        """One bool per payload; False for timeouts, crashes, or no worker."""
        import select

        results = [False] * len(payloads)
        if not payloads:
            return results
        with self.lock:
            self._fresh()
            want = max(1, min(n_workers, len(payloads)))
            while len(self.workers) < want:
                w = self._spawn()
                if w is None:
                    break
                self.workers.append(w)
            pending = deque(range(len(payloads)))
            respawns = 0
            while True:
                now = time.monotonic()
                for w in self.workers:
                    if w.state == "idle" and pending:
                        j = pending.popleft()
                        try:
                            w.send(payloads[j])
                        except Exception:   # died since the last look: retry on another
                            w.kill()
                            pending.appendleft(j)
                            continue
                        w.state, w.job, w.wake = "busy", j, now + timeout_s
                live = [w for w in self.workers if w.state in ("starting", "busy", "grace")]
                if not live or (not pending and not any(w.state == "busy" for w in live)):
                    break
                delay = max(0.0, min(w.wake for w in live) - now)
                try:
                    ready, _, _ = select.select([w.fd for w in live], [], [], delay)
                except (OSError, ValueError):
                    for w in live:
                        w.kill()
                    break
                for w in live:
                    if w.fd not in ready:
                        continue
                    try:
                        lines = w.read_lines()
                    except OSError:
                        lines = None
                    if lines is None:   # the worker died (e.g. out of memory): the job scores 0
                        w.kill()
                        continue
                    for line in lines:
                        if w.state == "starting" and line == b"R":
                            w.state = "idle"
                        elif w.state == "busy":
                            results[w.job] = line == b"1"
                            w.state = "idle"
                        elif w.state == "grace":
                            w.state = "idle"
                now = time.monotonic()
                for w in live:
                    if w.state == "busy" and now >= w.wake:
                        w.state, w.wake = "grace", now + _GRACE_S   # the job scores 0
                    elif w.state in ("grace", "starting") and now >= w.wake:
                        w.kill()
                self.workers = [w for w in self.workers if w.state != "dead"]
                while len(self.workers) < want and pending and respawns < 4 * want + 8:
                    w = self._spawn()
                    if w is None:
                        break
                    respawns += 1
                    self.workers.append(w)
            return results


_POOL = _Pool()
atexit.register(_POOL.close)


def warmup(config: Optional[RewardConfig] = None) -> None:
    """Start the symbolic worker processes now (they import sympy, ~1 s) instead of lazily."""
    cfg = config or DEFAULT_CONFIG
    if cfg.symbolic:
        _POOL.start(cfg.n_workers)


def shutdown_workers() -> None:
    """Stop the symbolic workers (they are restarted on demand; also runs at exit)."""
    _POOL.close()


def _run_jobs(jobs: list, cfg: RewardConfig, timeout_s: float) -> list:
    fields = astuple(cfg)   # plain values: the worker does not import the trainer package
    payloads = [pickle.dumps((timeout_s,) + tuple(job) + (fields,), protocol=4) for job in jobs]
    return _POOL.run(payloads, timeout_s, cfg.n_workers)


# ----------------------------------------------------------------------------------------------
# public API


def _config(config: Optional[RewardConfig], timeout_s: Optional[float]) -> RewardConfig:
    cfg = config or DEFAULT_CONFIG
    if timeout_s is not None and timeout_s != cfg.timeout_s:
        cfg = replace(cfg, timeout_s=float(timeout_s))
    return cfg


def verify(pred: str, ref: str, timeout_s: Optional[float] = None,
           config: Optional[RewardConfig] = None) -> bool:
    """Whether the extracted answer ``pred`` equals the reference ``ref``. Never raises.

    Exact (canonical strings) first, then numeric, then (only if still undecided) symbolic in a
    worker process limited to ``timeout_s`` seconds (None: ``config.timeout_s``, 1.0 by
    default; a worker's one-time start-up is not counted).
    """
    try:
        cfg = _config(config, timeout_s)
        verdict, job = _fast_verdict(pred, ref, cfg)
        if verdict is not None:
            return verdict
        return bool(_run_jobs([job], cfg, cfg.timeout_s)[0])
    except Exception:
        return False


def math_reward(completion: str, ref_answer: str, *, timeout_s: Optional[float] = None,
                config: Optional[RewardConfig] = None) -> float:
    """1.0 when the completion's final answer equals ``ref_answer``, else 0.0. Never raises."""
    try:
        pred = extract_answer(completion)
        if pred is None:
            return 0.0
        cfg = _config(config, timeout_s)
        return 1.0 if verify(pred, ref_answer, cfg.timeout_s, cfg) else 0.0
    except Exception:
        return 0.0


def score_batch(completions: Sequence[str], refs: Sequence[str], *,
                timeout_s: Optional[float] = None,
                config: Optional[RewardConfig] = None) -> list:
    """Rewards (1.0 / 0.0) for many completions; ``len(completions) == len(refs)``.

    Extraction, exact and numeric checks run in this process (identical (answer, reference)
    pairs are decided once, e.g. the G samples of a group agreeing); the pairs they leave
    undecided go to the worker pool together, in parallel, each under its own time limit.
    Content never raises; mismatched lengths raise ValueError (a caller bug).
    """
    if len(completions) != len(refs):
        raise ValueError(f"{len(completions)} completions but {len(refs)} references")
    cfg = _config(config, timeout_s)
    out = [0.0] * len(completions)
    decided = {}
    jobs, job_keys = [], []
    waiting = {}
    for i, (comp, ref) in enumerate(zip(completions, refs)):
        try:
            pred = extract_answer(comp)
            if pred is None or not isinstance(ref, str):
                continue
            key = (pred, ref)
            if key in decided:
                out[i] = decided[key]
                continue
            if key in waiting:
                waiting[key].append(i)
                continue
            verdict, job = _fast_verdict(pred, ref, cfg)
            if verdict is None:
                waiting[key] = [i]
                jobs.append(job)
                job_keys.append(key)
            else:
                decided[key] = out[i] = 1.0 if verdict else 0.0
        except Exception:
            out[i] = 0.0
    if jobs:
        try:
            results = _run_jobs(jobs, cfg, cfg.timeout_s)
        except Exception:
            results = [False] * len(jobs)
        for key, ok in zip(job_keys, results):
            for i in waiting[key]:
                out[i] = 1.0 if ok else 0.0
    return out
