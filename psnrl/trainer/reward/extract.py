"""Extraction: the final answer of a completion (last ``\\boxed{}``, else "the answer is")."""

from __future__ import annotations

import re
from typing import Optional

from .config import DEFAULT_CONFIG

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
