"""Tokenizer and the name tables of the parsed subset (functions, Greek letters, relations)."""

from __future__ import annotations

import re
from fractions import Fraction

from .config import RewardConfig, _ParseError, _Reject

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
