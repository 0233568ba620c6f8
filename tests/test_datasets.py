"""Problem loading (shipped sets, JSONL, Parquet) and prompt formatting."""

import json
from pathlib import Path

import pytest

from psnrl.trainer import datasets
from psnrl.trainer.datasets import (
    CHAT_INSTRUCTION,
    DATA_DIR,
    EVAL_SETS,
    PLAIN_TEMPLATE,
    SHIPPED,
    Problem,
    format_prompt,
    load_problems,
)


EXPECTED_ROWS = {  # psnrl/trainer/data/SOURCES.md
    "math500": 500,
    "aime24": 30,
    "aime25": 30,
    "amc23": 40,
    "minerva": 272,
    "olympiadbench": 675,
    "gsm8k_test": 1319,
    "gsm8k_train": 7473,
    "train_math_l35": 8521,
}


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- shipped sets


@pytest.fixture(scope="module")
def shipped():
    return {name: load_problems(name) for name in EXPECTED_ROWS}


def test_shipped_names_and_eval_sets():
    assert set(SHIPPED) == set(EXPECTED_ROWS)
    assert EVAL_SETS == ("math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench")
    assert not (DATA_DIR / "__init__.py").exists()  # a data folder, not a package


@pytest.mark.parametrize("name", list(EXPECTED_ROWS))
def test_shipped_set_loads(shipped, name):
    problems = shipped[name]
    assert len(problems) == EXPECTED_ROWS[name]
    assert len({p.id for p in problems}) == len(problems)
    for p in problems:
        assert isinstance(p, Problem)
        assert p.problem.strip() and p.answer.strip()
        assert "id" not in p.meta and "problem" not in p.meta and "answer" not in p.meta


def test_shipped_fields(shipped):
    first = shipped["math500"][0]
    assert first.id == "test/precalculus/807.json"
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert isinstance(first.meta["level"], int)
    assert "solution" in first.meta and "type" in first.meta
    assert shipped["aime25"][0].id == "aime2025-I-1" and shipped["aime25"][0].answer == "70"
    assert shipped["amc23"][0].answer == "27" and shipped["amc23"][0].meta["answer_raw"] == "27.0"
    assert {p.meta["level"] for p in shipped["train_math_l35"]} == {3, 4, 5}


def test_gsm8k_answers_are_final_numbers(shipped):
    # SOURCES.md: answer = text after "####" (commas removed); the full solution is in meta.
    for name in ("gsm8k_train", "gsm8k_test"):
        for p in shipped[name]:
            assert "####" not in p.answer
            assert "," not in p.answer
            float(p.answer)  # a bare number
            tail = p.meta["solution"].rsplit("####", 1)[1].strip().replace(",", "")
            assert tail == p.answer
    assert shipped["gsm8k_test"][0].answer == "18"



def test_limit():
    assert [p.id for p in load_problems("gsm8k_train", limit=3)] == [
        "gsm8k-train-0",
        "gsm8k-train-1",
        "gsm8k-train-2",
    ]
    assert load_problems("aime24", limit=0) == []
    assert len(load_problems("aime24", limit=1000)) == 30
    with pytest.raises(ValueError, match="limit"):
        load_problems("aime24", limit=-1)


# ---------------------------------------------------------------------------- files and errors


def test_jsonl_path_ids_meta_and_blank_lines(tmp_path):
    path = write_lines(
        tmp_path / "mine.jsonl",
        [
            json.dumps({"problem": "1+1?", "answer": "2", "level": 1}),
            "",
            json.dumps({"id": "x", "problem": "2+2?", "answer": 4}),
            json.dumps({"problem": "3+3?", "answer": "6"}),
        ],
    )
    probs = load_problems(str(path))
    assert [p.id for p in probs] == ["mine-1", "x", "mine-4"]  # generated from the line number
    assert probs[0].meta == {"level": 1}
    assert probs[1].answer == "4"  # numeric answers become strings
    assert probs == load_problems(path)  # a Path works too
    assert hash(probs[0]) == hash(load_problems(path)[0])


def test_missing_file_names_shipped_sets(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as e:
        load_problems(str(missing))
    assert str(missing) in str(e.value)
    assert "math500" in str(e.value) and "train_math_l35" in str(e.value)
    with pytest.raises(FileNotFoundError, match="shipped"):
        load_problems("math501")


def test_invalid_json_names_line(tmp_path):
    path = write_lines(
        tmp_path / "bad.jsonl",
        [json.dumps({"problem": "a", "answer": "1"}), json.dumps({"problem": "b", "answer": "2"}), '{"problem": "c",'],
    )
    with pytest.raises(ValueError, match=r"line 3: invalid JSON") as e:
        load_problems(path)
    assert str(path) in str(e.value)
    # limit stops before the bad line
    assert len(load_problems(path, limit=2)) == 2


def test_not_an_object_and_bad_utf8(tmp_path):
    path = write_lines(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        load_problems(path)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"problem": "a", "answer": "1"}\n{"problem": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(ValueError, match="line 2: not valid UTF-8"):
        load_problems(path)


@pytest.mark.parametrize(
    "record,message",
    [
        ({"answer": "1"}, r"line 2: missing field 'problem'"),
        ({"problem": "q"}, r"line 2: missing field 'answer'"),
        ({"problem": "  ", "answer": "1"}, r"line 2: field 'problem' is empty"),
        ({"problem": "q", "answer": ""}, r"line 2: field 'answer' is empty"),
        ({"problem": "q", "answer": None}, r"line 2: field 'answer' is null"),
        ({"problem": "q", "answer": ["1"]}, r"line 2: field 'answer' must be a string"),
        ({"problem": 3, "answer": "1"}, r"line 2: field 'problem' must be a string"),
    ],
)
def test_missing_or_empty_fields_name_line(tmp_path, record, message):
    path = write_lines(tmp_path / "f.jsonl", [json.dumps({"problem": "ok", "answer": "1"}), json.dumps(record)])
    with pytest.raises(ValueError, match=message) as e:
        load_problems(path)
    assert str(path) in str(e.value)


def test_duplicate_ids(tmp_path):
    path = write_lines(
        tmp_path / "dup.jsonl",
        [
            json.dumps({"id": "a", "problem": "p", "answer": "1"}),
            json.dumps({"id": "b", "problem": "p", "answer": "1"}),
            json.dumps({"id": "a", "problem": "q", "answer": "2"}),
        ],
    )
    with pytest.raises(ValueError, match=r"line 3: duplicate id 'a' \(first at line 1\)"):
        load_problems(path)


def test_unsupported_suffix(tmp_path):
    path = write_lines(tmp_path / "f.json", ['{"problem": "q", "answer": "1"}'])
    with pytest.raises(ValueError, match="unsupported file type"):
        load_problems(path)


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="pyarrow") as e:
        load_problems(path)
    assert "JSONL" in str(e.value)


def test_parquet_with_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"problem": ["1+1?", "2+2?"], "answer": ["2", "4"], "level": [1, 2]}), path)
    probs = load_problems(path)
    assert [(p.id, p.answer, p.meta) for p in probs] == [("t-0", "2", {"level": 1}), ("t-1", "4", {"level": 2})]


# ---------------------------------------------------------------------------- prompts


PROBLEM = Problem(id="t", problem="What is $\\frac{1}{2} + {x}$ when $x = 1/2$?", answer="1")


def test_plain_prompt():
    text = format_prompt(PROBLEM)
    assert PROBLEM.problem in text
    assert "\\boxed{}" in text
    assert text == format_prompt(PROBLEM, "plain")
    assert "{problem}" in PLAIN_TEMPLATE and "{problem}" not in text
    assert text.index("\\boxed") < text.index(PROBLEM.problem)  # instruction first


def tiny_tokenizer(chat_template=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "what": 1, "is": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_chat_prompt():
    text = format_prompt(PROBLEM, "chat", tokenizer=tiny_tokenizer(CHAT_TEMPLATE))
    assert text == f"<|user|>\n{PROBLEM.problem}\n{CHAT_INSTRUCTION}<|end|>\n<|assistant|>\n"
    assert "\\boxed{}" in text


def test_chat_prompt_errors():
    with pytest.raises(ValueError, match="tokenizer"):
        format_prompt(PROBLEM, "chat")
    with pytest.raises(ValueError, match="chat template"):
        format_prompt(PROBLEM, "chat", tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="plain.*chat"):
        format_prompt(PROBLEM, "fewshot")


def test_module_constants():
    assert datasets.DATA_DIR == Path(datasets.__file__).parent / "data"
