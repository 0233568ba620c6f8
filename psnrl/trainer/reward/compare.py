"""Comparison: structural matching of two ASTs with the numeric check (in-process) or sympy
(worker side), and the in-process verdict on a (prediction, reference) pair."""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache
from typing import Iterable, Optional

from .config import EXACT_REL_TOL, RewardConfig, _ParseError, _Reject
from .nodes import _STRUCT, _expand_pm, _name_like
from .normalize import _CTRL_RE, _normalize
from .numeric import _Numeric
from .parse import _Parser

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
