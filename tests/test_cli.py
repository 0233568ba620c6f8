"""The psnrl command line."""
import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from psnrl.trainer.cli import main


def test_generate_writes_json_lines(tmp_path):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=64))
    model.save_pretrained(tmp_path / "m")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": [3, 4, 5]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(tmp_path / "m"), "--prompts-file", str(prompts), "--n", "2",
                 "--max-tokens", "5", "--sigma", "0.01", "--seed", "1", "--dtype", "float32",
                 "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    assert all(len(r["token_ids"]) == 5 and r["finish_reason"] == "length" for r in rows)


def test_generate_reports_bad_input(tmp_path, capsys):
    for argv, message in ((["--prompt", "hi"], "config.json"), ([], "--prompt"),
                          (["--prompt", "x", "--temperature", "-1"], "temperature")):
        assert main(["generate", str(tmp_path), *argv]) != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        main(["nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_eval_prints_a_table_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # torch paths: this checks the command, not kernels
    from psnrl.trainer.tiny import build_checkpoint
    path = build_checkpoint(tmp_path / "tiny")
    out = tmp_path / "eval.json"
    assert main(["eval", str(path), "--sets", "tiny-arith", "--n", "4", "--limit", "16", "--max-tokens", "4",
                 "--dtype", "float32", "--embedder", "hidden", "--output", str(out),
                 "--plot", str(tmp_path / "passk.png")]) == 0
    assert (tmp_path / "passk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # no matplotlib needed
    result = json.loads(out.read_text())
    assert result["sets"]["tiny-arith"]["problems"] == 16
    assert set(result["average"]) == {"pass@1", "pass@2", "pass@4"}
    assert {"operation_diversity", "semantic_similarity"} <= set(result["sets"]["tiny-arith"])
    assert "| tiny-arith | 16 |" in capsys.readouterr().out
    assert main(["eval", str(path), "--sets", "tiny-arith", "--n", "2", "--ks", "4"]) == 1
    assert "every k" in capsys.readouterr().err


def test_operation_diversity_counts_distinct_operations():
    from psnrl.trainer.evaluate import operation_diversity, operations
    assert operations(r"12 + 7 = 19, then 3\times 4 = 12 and 3 \cdot 4; 10/2=5") == {"12+7", "3*4", "10/2"}
    # problem 1: two correct samples using {1+2, 2*3} and {1+2}; problem 2: none correct
    assert operation_diversity([["1+2 then 2*3", "1 + 2"], []]) == 2.0
    assert operation_diversity([[], []]) is None
