"""Math problem sets: loading (JSONL, Parquet, shipped names) and prompt formatting.

A problem file holds one record per problem with at least ``problem`` (the question text) and
``answer`` (the reference final answer, compared by the grader); ``id`` is optional and is
generated from the line number when absent. Any other fields are kept in :attr:`Problem.meta`.

The shipped sets live in ``psnrl/trainer/data`` (see ``psnrl/trainer/data/SOURCES.md`` for where each file
comes from and how its fields were mapped) and are loaded by name::

    load_problems("math500")            # the MATH500 benchmark, 500 problems
    load_problems("gsm8k_train", 64)    # the first 64 GSM8K training problems
    load_problems("/path/to/mine.jsonl")
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "Problem",
    "DATA_DIR",
    "SHIPPED",
    "EVAL_SETS",
    "TRAIN_SETS",
    "PLAIN_TEMPLATE",
    "CHAT_INSTRUCTION",
    "TEMPLATES",
    "load_problems",
    "shipped_path",
    "format_prompt",
]

DATA_DIR = Path(__file__).parent / "data"

# Shipped name -> file name inside DATA_DIR.
SHIPPED: dict[str, str] = {
    "math500": "math500.jsonl",
    "aime24": "aime24.jsonl",
    "aime25": "aime25.jsonl",
    "amc23": "amc23.jsonl",
    "minerva": "minerva.jsonl",
    "olympiadbench": "olympiadbench.jsonl",
    "gsm8k_test": "gsm8k_test.jsonl",
    "gsm8k_train": "gsm8k_train.jsonl",
    "train_math_l35": "train_math_l35.jsonl",
}

# The six evaluation benchmarks (docs/design.md, "Rewards and evaluation"), in the order the paper reports them.
EVAL_SETS: tuple[str, ...] = ("math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench")
TRAIN_SETS: tuple[str, ...] = ("gsm8k_train", "train_math_l35")

_REQUIRED = ("problem", "answer")


@dataclass(frozen=True)
class Problem:
    """One math problem. ``answer`` is the reference final answer as a string."""

    id: str
    problem: str
    answer: str
    # Extra source fields (solution, level, type, ...). Not hashed: a dict is unhashable.
    meta: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)


def shipped_path(name: str) -> Path:
    """The file of a shipped set; KeyError naming the shipped sets for an unknown name."""
    try:
        return DATA_DIR / SHIPPED[name]
    except KeyError:
        raise KeyError(f"unknown data set {name!r}; shipped: {', '.join(SHIPPED)}") from None


def _resolve(path_or_name: str | os.PathLike) -> Path:
    if isinstance(path_or_name, str) and path_or_name in SHIPPED:
        path = shipped_path(path_or_name)
        if not path.is_file():
            raise FileNotFoundError(
                f"shipped data set {path_or_name!r} is missing: {path} does not exist "
                f"(the package was installed without psnrl/trainer/data/*.jsonl)"
            )
        return path
    path = Path(path_or_name).expanduser()
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"problem file {str(path)!r} {what}; give a .jsonl/.parquet path or a shipped "
            f"name: {', '.join(SHIPPED)}"
        )
    return path


def _iter_jsonl(path: Path) -> Iterator[tuple[str, int, Any]]:
    """Yield ("line N", N, record) per non-blank line, N counting from 1."""
    # Binary read, decoded per line, so a decoding error names its own line.
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # byte-order mark
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: line {lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            yield f"line {lineno}", lineno, rec


def _iter_parquet(path: Path) -> Iterator[tuple[str, int, Any]]:
    """Yield ("row N", N, record) per row, N counting from 0."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"{path}: reading Parquet needs pyarrow, which is not installed; "
            f"install it (pip install pyarrow) or convert the file to JSONL "
            f"(one JSON object per line with 'problem' and 'answer')"
        ) from None
    rows = pq.read_table(path).to_pylist()
    return ((f"row {i}", i, rec) for i, rec in enumerate(rows))


def _text(value: Any, key: str, where: str, *, allow_number: bool) -> str:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: field {key!r} is empty")
        return value
    if allow_number and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if value is None:
        raise ValueError(f"{where}: field {key!r} is null")
    raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")


def load_problems(path_or_name: str | os.PathLike, limit: int | None = None) -> list[Problem]:
    """Load problems from a shipped set name, a ``.jsonl`` file or a ``.parquet`` file.

    ``limit`` keeps the first ``limit`` problems (reading stops there, so rows after it are not
    validated). Raises FileNotFoundError for a missing file (naming the shipped sets) and
    ValueError naming the file and line for invalid JSON, a record that is not an object, a
    missing/empty ``problem`` or ``answer``, or a duplicate ``id``. Numeric answers and ids
    (``42``) are accepted and turned into strings; blank lines are skipped. A record without an
    ``id`` gets ``"<file stem>-<N>"``, N its line number (JSONL, from 1) or row index (Parquet,
    from 0).
    """
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int or None, got {type(limit).__name__}")
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
    path = _resolve(path_or_name)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _iter_jsonl(path)
    elif suffix == ".parquet":
        records = _iter_parquet(path)
    else:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")

    problems: list[Problem] = []
    seen: dict[str, str] = {}
    if limit == 0:
        return problems
    for loc, index, rec in records:
        where = f"{path}: {loc}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for key in _REQUIRED:
            if key not in rec:
                raise ValueError(f"{where}: missing field {key!r}")
        problem = _text(rec["problem"], "problem", where, allow_number=False)
        answer = _text(rec["answer"], "answer", where, allow_number=True)
        if rec.get("id") is None:
            pid = f"{path.stem}-{index}"
        else:
            pid = _text(rec["id"], "id", where, allow_number=True)
        if pid in seen:
            raise ValueError(f"{where}: duplicate id {pid!r} (first at {seen[pid]})")
        seen[pid] = loc
        meta = {k: v for k, v in rec.items() if k not in ("id", "problem", "answer")}
        problems.append(Problem(id=pid, problem=problem, answer=answer, meta=meta))
        if limit is not None and len(problems) >= limit:
            break
    return problems


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

# For base models (plain text completion). "{problem}" is substituted literally (no str.format),
# so braces in problems and in \boxed{} need no escaping.
PLAIN_TEMPLATE = (
    "Solve the following math problem. Reason step by step, showing your work, and put only "
    "your final answer within \\boxed{}.\n"
    "\n"
    "Problem: {problem}\n"
    "\n"
    "Solution:"
)

# The user message for chat models: the problem, then the Qwen2.5-Math style instruction.
CHAT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

TEMPLATES: tuple[str, ...] = ("plain", "chat")


def format_prompt(problem: Problem, template: str = "plain", tokenizer: Any = None) -> str:
    """The prompt text for one problem.

    ``"plain"``: :data:`PLAIN_TEMPLATE` with the problem filled in. ``"chat"``: one user turn
    (problem + :data:`CHAT_INSTRUCTION`) rendered by ``tokenizer.apply_chat_template`` with the
    generation prompt appended; ValueError when there is no tokenizer or it has no chat template.
    """
    if template == "plain":
        return PLAIN_TEMPLATE.replace("{problem}", problem.problem)
    if template == "chat":
        if tokenizer is None:
            raise ValueError("template 'chat' needs a tokenizer with a chat template; got tokenizer=None")
        if getattr(tokenizer, "chat_template", None) is None or not hasattr(tokenizer, "apply_chat_template"):
            raise ValueError(
                f"template 'chat' needs a tokenizer with a chat template; "
                f"{type(tokenizer).__name__} has none (use template='plain' for base models)"
            )
        content = f"{problem.problem}\n{CHAT_INSTRUCTION}"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(text, str):
            raise ValueError(f"apply_chat_template returned {type(text).__name__}, expected str")
        return text
    raise ValueError(f"unknown prompt template {template!r}; valid: {', '.join(TEMPLATES)}")
