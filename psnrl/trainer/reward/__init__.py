"""Math answer reward: extract the final answer, normalize it, and check it against a reference.

Model output is hostile text (docs/design.md, "Rewards and evaluation"). Nothing in this package
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
The worker loads this package's modules by path (not via the ``trainer`` package, whose
``__init__`` may grow heavy), imports sympy once, and answers length-prefixed pickled jobs (the parent trusts its
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

from .config import DEFAULT_CONFIG, RewardConfig
from .extract import extract_answer
from .normalize import normalize
from .pool import shutdown_workers, warmup
from .score import math_reward, score_batch, verify

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

