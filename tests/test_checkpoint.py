"""Training checkpoints without pickle: safetensors for tensors, JSON for the rest; pickles refused."""
import pickle

import pytest
import torch

from psnrl.trainer.checkpoint import (CheckpointError, checkpoints, latest_checkpoint, load_checkpoint,
                                      old_checkpoints, save_checkpoint)


def test_a_state_round_trips_exactly(tmp_path):
    w = torch.randn(3, 4)
    state = {"iteration": 7, "model": {"a.weight": w, "tied": w}, "config": "model:\n  path: tiny\n",
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 4)}},
                           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]},
             "torch_rng": torch.get_rng_state(), "sigma": {"sigma": 0.004, "history": [1.0, 2.5]},
             "ref_model": None, "flag": True}
    path = save_checkpoint(tmp_path, 7, state, keep=0)
    back = load_checkpoint(path)
    assert back.keys() == state.keys() and back["iteration"] == 7 and back["ref_model"] is None
    assert torch.equal(back["model"]["a.weight"], w) and torch.equal(back["model"]["tied"], w)
    assert list(back["optimizer"]["state"]) == [0]  # int keys stay ints
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples
    assert torch.equal(back["torch_rng"], state["torch_rng"]) and back["flag"] is True
    assert latest_checkpoint(tmp_path) == path


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_a_pickled_checkpoint_is_refused_without_running_it(tmp_path, capsys):
    pt = tmp_path / "iter-000003.pt"
    torch.save({"iteration": 3, "x": Payload()}, pt)
    raw = tmp_path / "iter-000004.safetensors"  # a pickle under the right name
    raw.write_bytes(pickle.dumps({"x": Payload()}))
    for path in (pt, raw):
        with pytest.raises(CheckpointError, match="pickle"):
            load_checkpoint(path)
    assert "pickled code ran" not in capsys.readouterr().out
    assert old_checkpoints(tmp_path) == [pt]
    assert checkpoints(tmp_path) == [raw]  # named like one, refused when loaded


def test_damaged_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "iter-000001.safetensors")
    bad = tmp_path / "iter-000002.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(bad)
    from safetensors.torch import save_file
    foreign = tmp_path / "iter-000003.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a psnrl checkpoint"):
        load_checkpoint(foreign)
