"""Recursive-descent parser: normalized answer string -> AST of plain tuples (see :mod:`.nodes`)."""

from __future__ import annotations

from fractions import Fraction

from .config import RewardConfig, _ParseError, _Reject
from .lexer import _DECORATORS, _FUNCS, _GREEK, _INVERSE, _MATRIX_ENVS, _RELOPS, _num_value, _tokenize
from .nodes import _STRUCT


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

    def nested_items(self) -> list:
        """The comma-separated items inside a group, one nesting level deeper."""
        self.enter()
        try:
            return self.parse_items()
        finally:
            self.depth -= 1

    def parse_bracket(self):
        _, open_ = self.peek()
        self.advance()
        items = self.nested_items()
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
        items = self.nested_items()
        self.expect_op("}")
        if len(items) == 1:
            return items[0]
        return self.mk("set", *items)

    def parse_set(self):
        self.advance()  # \{
        if self.is_cmd("\\}"):
            self.advance()
            return self.mk("set")
        items = self.nested_items()
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
