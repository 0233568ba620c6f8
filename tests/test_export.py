"""The trained policy as a Hugging Face folder: final/ and `psnrl export` load in transformers and
in psnrl with the trainer's log-probs; export refuses what would lose or misname work."""
import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from psnrl.engine.loader import load_model
from psnrl.trainer.checkpoint import checkpoint_path, load_checkpoint
from psnrl.trainer.cli import main
from psnrl.trainer.config import load_config
from psnrl.trainer.logprobs import response_logprobs
from psnrl.trainer.loop import PSNTrainer

FAST = ["rollout.prompts_per_iter=4", "rollout.group_size=2", "train.mini_batch_prompts=4",
        "train.sft_warmup_steps=2", "train.iterations=2", "eval.every=0", "checkpoint.every=1",
        "log.tensorboard=false", "log.plot=false"]


def test_an_exported_policy_gives_the_trainers_logprobs(tmp_path, capsys, monkeypatch):
    """final/ and `psnrl export` round-trip: the trainer's model, the exported folder read by
    transformers and by psnrl's loader give the same log-probs of the same tokens."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    run = tmp_path / "run"
    cfg = load_config(None, FAST + ["model.dtype=float32", f"log.dir={run}"])
    sequences = [[5, 9, 3, 11, 7, 2], [4, 4, 8, 1]]
    with PSNTrainer(cfg) as trainer:
        trainer.run()
        with torch.no_grad():
            want = response_logprobs(trainer.model, sequences, [2, 1]).logprobs
    assert main(["export", str(run), str(tmp_path / "iter1"), "--iteration", "1"]) == 0
    assert main(["export", str(run), str(tmp_path / "iter2")]) == 0  # the last checkpoint: the final policy
    for folder in (run / "final", tmp_path / "iter2"):
        with torch.no_grad():
            ours = response_logprobs(load_model(folder, dtype=torch.float32), sequences, [2, 1]).logprobs
            hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
            theirs = torch.cat([torch.log_softmax(hf(torch.tensor([s])).logits[0, p - 1:-1].float(), -1)
                                .gather(-1, torch.tensor(s[p:])[:, None])[:, 0]
                                for s, p in zip(sequences, [2, 1])])
        torch.testing.assert_close(ours, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(theirs, want, rtol=0, atol=1e-4)
    saved = load_checkpoint(checkpoint_path(run / "checkpoints", 1))["model"]
    exported = load_file(tmp_path / "iter1" / "model.safetensors")
    assert set(exported) <= set(saved) and all(torch.equal(exported[k], saved[k]) for k in exported)


def test_export_refuses_an_occupied_out_folder_and_a_missing_iteration(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    run = tmp_path / "run"
    assert main(["train", *FAST, f"log.dir={run}"]) == 0
    capsys.readouterr()
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    for argv, needle in (([str(run), str(full)], "not an empty folder"),
                         ([str(run), str(tmp_path / "x"), "--iteration", "7"], "iteration 7")):
        assert main(["export", *argv]) == 1
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert json.loads((run / "final" / "config.json").read_text())["model_type"]
