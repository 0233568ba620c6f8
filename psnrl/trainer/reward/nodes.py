"""The AST of plain tuples the parser builds, and walks over it (children, ``\\pm`` expansion, symbols).

scalar nodes:  ('num', Fraction) ('sym', name) ('const', 'pi'|'E'|'I'|'oo')
               ('add', t...) ('mul', f...) ('neg', x) ('pm', x) ('div', a, b) ('pow', a, b)
               ('root', x) ('root', x, n) ('func', name, arg...)
structures:    ('tuple', open, close, item...) ('set', item...) ('list', item...)
               ('union', item...) ('rel', op, lhs, rhs) ('matrix', ncols, entry...)
"""

from __future__ import annotations

from .config import RewardConfig, _ParseError, _Reject

_CHILD_START = {"add": 1, "mul": 1, "neg": 1, "pm": 1, "div": 1, "pow": 1, "root": 1, "func": 2,
                "tuple": 3, "set": 1, "list": 1, "union": 1, "rel": 2, "matrix": 2}
_STRUCT = frozenset(("tuple", "set", "list", "union", "rel", "matrix"))


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
