"""Numeric evaluation of the AST (pure Python, bounded): exact rationals where the value is
rational, complex floats otherwise; free symbols at fixed pseudo-random points."""

from __future__ import annotations

import cmath
import math
import random
import zlib
from fractions import Fraction
from functools import lru_cache
from typing import Optional

from .config import RewardConfig, _Overflow, _Reject, _Unsure
from .nodes import _free_symbols


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
