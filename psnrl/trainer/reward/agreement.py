"""Agreement of :func:`verify` with Hugging Face ``math-verify`` on perturbed MATH-500 references.

Each distinct shipped MATH-500 reference answer gets rewrites of known truth, equivalent (``(a)/(b)``
for ``\\frac{a}{b}``, exact decimals, spacing, reordered sums and sets, ``x = 5``, percent, ...) and
not (off-by-one numbers, rounded decimals, sign flips, dropped terms, swapped tuples); both verifiers
score each (variant, reference) pair, both seeing ``\\boxed{answer}``. math-verify runs in this process
under its own SIGALRM limits; a pair that still takes ``MV_TIMEOUT_S`` or more is left out. Fixed seed.

    pip install -e .[compare]   # math-verify
    python -m psnrl.trainer.reward.agreement [--limit N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import time
from collections import Counter
from fractions import Fraction
from typing import Callable, Optional

from psnrl.trainer.datasets import DATA_DIR

from . import verify

SEED = 0
MV_TIMEOUT_S = 5
N_SAMPLE = 20
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
FRAC = re.compile(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}")
THOUSANDS = re.compile(r"(?<=\d),(?=(?:\\!\s*)?\d{3}(?![\d.]))")   # "10,\!080", "58,500": one number


def top_level(s: str, seps: str) -> list[tuple[str, str]]:
    """Split ``s`` at the characters in ``seps`` outside all brackets: [(separator, piece)]."""
    parts, depth, start, sep = [], 0, 0, ""
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and c in seps and i > start and s[i - 1] not in "^_{(\\" and not THOUSANDS.match(s, i):
            parts.append((sep, s[start:i].strip()))
            sep, start = c, i + 1
    parts.append((sep, s[start:].strip()))
    return parts


def is_scalar(s: str) -> bool:
    return ("\\text" not in s and "\\cup" not in s and "\\begin" not in s and len(top_level(s, ",=")) == 1
            and not s.startswith(("(", "[", "\\{", "\\left")))


def terms(s: str) -> Optional[list[tuple[str, str]]]:
    """The top-level terms of a scalar sum with at least two, else None."""
    parts = top_level(s, "+-") if is_scalar(s) and "\\pm" not in s else []
    return parts if len(parts) >= 2 and all(p for _, p in parts) else None


def items(s: str) -> Optional[tuple[str, str, list[str]]]:
    """(open, close, items) of a comma list: bare, ``\\{...\\}``, or bracketed (tuple/interval)."""
    for o, c in (("\\{", "\\}"), ("\\left(", "\\right)"), ("(", ")"), ("[", "]"), ("[", ")"), ("(", "]")):
        inner = s[len(o):-len(c)]
        # one bracketed group (no top-level comma or union outside it) holding a comma list
        if (s.startswith(o) and s.endswith(c) and "\\cup" not in s and len(top_level(s, ",")) == 1
                and len(top_level(inner, ",")) >= 2):
            return o, c, [p for _, p in top_level(inner, ",")]
    parts = top_level(s, ",")
    return ("", "", [p for _, p in parts]) if len(parts) >= 2 and "=" not in s else None


def join_terms(parts: list[tuple[str, str]]) -> str:
    return parts[0][1] + "".join(sep + p for sep, p in parts[1:])


def frac_decimal(s: str, exact: bool) -> Optional[str]:
    """An integer fraction as its exact decimal (if it terminates) or rounded to 4 places (if not)."""
    m = FRAC.fullmatch(s)
    if not m or int(m.group(3)) == 0:
        return None
    f = Fraction(int(m.group(2)), int(m.group(3)))
    k = next((k for k in range(12) if (f * 10 ** k).denominator == 1), None)
    if exact and k is not None:
        q = f.numerator * 10 ** k // f.denominator
        return f"{m.group(1)}{q // 10 ** k}.{q % 10 ** k:0{k}d}" if k else None
    return None if exact or k is not None else f"{m.group(1)}{float(f):.4f}"


def as_inequality(s: str) -> Optional[str]:
    """An interval as an inequality in x; only unmistakable intervals (\\infty or a square bracket)."""
    it = items(s)
    if it is None or len(it[2]) != 2 or it[0] == "\\{" or not ("\\infty" in s or "[" in s or "]" in s):
        return None
    (lo, hi), lo_op, hi_op = it[2], {"(": "<"}.get(it[0][-1], "\\le"), {")": "<"}.get(it[1][-1], "\\le")
    if lo == "-\\infty":
        return None if "infty" in hi else f"x {hi_op} {hi}"
    if "infty" in hi:
        return "x " + {"<": ">"}.get(lo_op, "\\ge") + " " + lo
    return f"{lo} {lo_op} x {hi_op} {hi}"


def sum_reorder(s):
    p = terms(s)
    if p is None:
        return None
    head = ("-" if p[1][0] == "-" else "") + p[1][1]
    first = p[0][1] if p[0][1].startswith("-") else "+" + p[0][1]
    return join_terms([("", head)] + p[2:]) + first


def reverse_items(s, ordered: bool):
    """The items in reverse order, of a set or bare list (ordered False) or a tuple / interval."""
    it = items(s)
    if it is None or (it[0] in ("(", "[", "\\left(")) != ordered or len(set(it[2])) < 2:
        return None
    return it[0] + ",".join(reversed(it[2])) + it[1]


def off_by_one(s, rng):
    runs = [m for m in re.finditer(r"\d+", s)] if "\\text" not in s else []
    if not runs:
        return None
    m = rng.choice(runs)
    return s[:m.start()] + f"{int(m.group()) + 1:0{len(m.group())}d}" + s[m.end():]


def sign_flip(s):
    if not is_scalar(s) or (NUMBER.fullmatch(s) and float(s) == 0):
        return None
    if s.startswith("-") and terms(s) is None:
        return s[1:]
    return "-(" + s + ")" if terms(s) else "-" + s


def dropped(s):
    p, it = terms(s), items(s)
    if p is not None:
        return join_terms(p[:-1])
    if it is not None and len(set(it[2])) == len(it[2]):
        return it[0] + ",".join(it[2][:-1]) + it[1]
    return None


def rounded_irrational(s, mv):
    if not is_scalar(s) or NUMBER.fullmatch(s):
        return None
    parsed = mv.parse("\\boxed{" + s + "}")
    x = parsed[0] if parsed else None
    if getattr(x, "is_number", False) and getattr(x, "is_rational", None) is False and x.is_real:
        return f"{float(x.evalf(30)):.4f}"
    return None


def kinds(mv, rng) -> dict[str, tuple[bool, Callable[[str], Optional[str]]]]:
    """Perturbation kind -> (intended label, rewrite or None when the kind does not apply)."""
    slash = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
    return {
        "frac_to_slash": (True, lambda s: slash.sub(r"(\1)/(\2)", s)   # not in mixed numbers (1\frac{4}{5})
                          if slash.search(s) and not re.search(r"\d\s*\\[dt]?frac", s) else None),
        "frac_to_decimal": (True, lambda s: frac_decimal(s, exact=True)),
        "neg_in_numerator": (True, lambda s: re.sub(r"^-\\([dt]?frac)\{([\w\\]+)\}", r"\\\1{-\2}", s)
                             if re.match(r"-\\[dt]?frac\{[\w\\]+\}", s) else None),
        "sci_notation": (True, lambda s: re.sub(r"^(-?\d*[1-9])(0{2,})$",
                                                lambda m: f"{m[1]} \\times 10^{{{len(m[2])}}}", s)),
        "sqrt_as_power": (True, lambda s: re.sub(r"\\sqrt\{([^{}]+)\}", r"(\1)^{1/2}", s)),
        "explicit_cdot": (True, lambda s: re.sub(r"(?<=\d)\s*(?=\\sqrt|\\pi|[a-z](?![a-z\d])|\()", r" \\cdot ", s)),
        "pm_expanded": (True, lambda s: s.replace("\\pm", "+", 1) + ", " + s.replace("\\pm", "-", 1)
                        if s.count("\\pm") == 1 and is_scalar(s) else None),
        "interval_as_inequality": (True, as_inequality),
        "int_as_frac": (True, lambda s: f"\\frac{{{2 * int(s)}}}{{2}}" if re.fullmatch(r"-?\d+", s) else None),
        "dfrac": (True, lambda s: s.replace("\\frac", "\\dfrac") if "\\frac" in s else None),
        "spaces": (True, lambda s: re.sub(r"(?<=\d)(?=\\(?!d?frac)[a-z])", r"\\,",   # not 1\,\frac45
                                          re.sub(r"\s*([+=]|,(?!(?:\\!\s*)?\d{3}(?![\d.])))\s*", r" \1 ", s))),
        "left_right": (True, lambda s: s.replace("(", "\\left(").replace(")", "\\right)")
                       if "(" in s and "\\left" not in s else None),
        "sum_reorder": (True, sum_reorder),
        "units_text": (True, lambda s: s + "\\text{ cm}" if NUMBER.fullmatch(s) else None),
        "x_equals": (True, lambda s: "x = " + s   # only for constants: letters only in commands (\\pi)
                     if is_scalar(s) and not re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", s)) else None),
        "percent": (True, lambda s: s + "\\%" if NUMBER.fullmatch(s) else None),
        "set_reorder": (True, lambda s: reverse_items(s, False)),
        "union_reorder": (True, lambda s: "\\cup".join(reversed(s.split("\\cup"))) if "\\cup" in s else None),
        "off_by_one": (False, lambda s: off_by_one(s, rng)),
        "rounded_irrational": (False, lambda s: rounded_irrational(s, mv)),
        "rounded_fraction": (False, lambda s: frac_decimal(s, exact=False)),
        "swapped_fraction": (False, lambda s: FRAC.sub(r"\1\\frac{\3}{\2}", s) if FRAC.fullmatch(s) else None),
        "sign_flip": (False, sign_flip),
        "dropped_term": (False, dropped),
        "tuple_swap": (False, lambda s: reverse_items(s, True)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="only the first N references")
    ap.add_argument("--json", default=None, help="write every scored pair here")
    args = ap.parse_args()
    import math_verify as mv

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    rng = random.Random(SEED)
    with open(DATA_DIR / "math500.jsonl", encoding="utf-8") as f:
        refs = list(dict.fromkeys(json.loads(line)["answer"] for line in f if line.strip()))[:args.limit]
    table = kinds(mv, rng)
    rows, skipped = [], Counter()
    for ref in refs:
        gold = None
        for kind, (label, rewrite) in table.items():
            variant = rewrite(ref)
            if variant is None or variant == ref:
                continue
            ours = verify(variant, ref)
            t0 = time.perf_counter()
            if gold is None:
                gold = mv.parse("\\boxed{" + ref + "}", parsing_timeout=MV_TIMEOUT_S)
            pred = mv.parse("\\boxed{" + variant + "}", parsing_timeout=MV_TIMEOUT_S)
            theirs = bool(mv.verify(gold, pred, timeout_seconds=MV_TIMEOUT_S))
            if time.perf_counter() - t0 >= MV_TIMEOUT_S:
                skipped[kind] += 1
                continue
            rows.append({"kind": kind, "label": label, "ref": ref, "variant": variant,
                         "ours": ours, "theirs": theirs})
    print(f"{len(refs)} distinct MATH-500 reference answers, {len(rows)} pairs scored, "
          f"{sum(skipped.values())} left out (math-verify over {MV_TIMEOUT_S} s)\n")
    print("| kind | label | pairs | both true | both false | ours only | theirs only | ours right | theirs right |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in [*table, "all equivalent", "all non-equivalent", "all"]:
        sel = [r for r in rows if r["kind"] == kind or kind == "all"
               or kind.startswith("all ") and r["label"] == (kind == "all equivalent")]
        if not sel:
            continue
        c = Counter((r["ours"], r["theirs"]) for r in sel)
        label = ("equal" if table[kind][0] else "not equal") if kind in table else ""
        right = [sum(r[side] == r["label"] for r in sel) for side in ("ours", "theirs")]
        print(f"| {kind} | {label} | {len(sel)} | {c[True, True]} | {c[False, False]} | {c[True, False]} | "
              f"{c[False, True]} | {right[0]} | {right[1]} |")
    disagree = [r for r in rows if r["ours"] != r["theirs"]]
    by_kind: dict[str, list] = {}
    for r in random.Random(SEED).sample(disagree, len(disagree)):
        by_kind.setdefault(r["kind"], []).append(r)
    sample: list[dict] = []   # round-robin over the kinds, so one kind cannot fill the sample
    while len(sample) < min(N_SAMPLE, len(disagree)):
        sample += [group.pop() for group in by_kind.values() if group][:N_SAMPLE - len(sample)]
    sample.sort(key=lambda r: (r["kind"], r["ref"]))
    print(f"\n{len(disagree)} disagreements; a sample of {len(sample)} (right = the side matching the label):\n")
    print("| kind | reference | variant | label | ours | theirs | right |")
    print("|---|---|---|---|---|---|---|")
    for r in sample:
        right = "ours" if r["ours"] == r["label"] else "theirs"
        cells = [r["kind"], f"`{r['ref']}`", f"`{r['variant']}`", r["label"], r["ours"], r["theirs"], right]
        print("| " + " | ".join(str(x) for x in cells) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "skipped": skipped}, f, indent=1)


if __name__ == "__main__":
    main()
