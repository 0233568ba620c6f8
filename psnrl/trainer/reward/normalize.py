"""Normalization: the canonical answer string (exact-match key and the parser's input)."""

from __future__ import annotations

import re

from .config import DEFAULT_CONFIG
from .extract import _brace_end
from .lexer import _FUNCS

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
