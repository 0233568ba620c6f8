"""An engine gives back what it holds: ``LLM.close()`` / ``with LLM(...)`` free the KV cache,
the decode graphs and the weights, and a second engine in the same process works."""
from __future__ import annotations

import weakref

import pytest
import torch
from tiny_checkpoints import save_tiny_qwen2

from psnrl.engine.llm import LLM
from psnrl.engine.noise_spec import NoiseSpec
from psnrl.engine.sampling import SamplingParams
from psnrl.kernels import splitk_workspace as workspace

PROMPTS = [[5, 17, 33, 2, 9], [42, 7], [300, 301, 302]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
NOISE = [None, NoiseSpec(seed=3, sigma=0.05), None]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2-lifetime")
    save_tiny_qwen2(path, vocab=512, hidden=64, inter=96, max_pos=64)
    return path


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_close_frees_kv_cache_and_weights_and_a_second_engine_works(checkpoint):
    llm = LLM(checkpoint, dtype="float32", device="cpu", block_size=4, num_kv_blocks=32)
    first = tokens(llm.generate(PROMPTS, GREEDY, noise=NOISE, use_tqdm=False))
    kv = weakref.ref(llm.runner.kv_caches[0][0])
    weight = weakref.ref(llm.model.model.embed_tokens.weight)
    llm.close()
    assert kv() is None and weight() is None  # freed at once, not at the next garbage collection
    assert llm.closed
    llm.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    with pytest.raises(RuntimeError, match="closed"):
        llm.update_weights([])
    with LLM(checkpoint, dtype="float32", device="cpu", block_size=4, num_kv_blocks=32) as again:
        assert tokens(again.generate(PROMPTS, GREEDY, noise=NOISE, use_tqdm=False)) == first
    assert again.closed


def test_leaving_the_with_block_on_an_exception_closes(checkpoint):
    with pytest.raises(ValueError, match="boom"):
        with LLM(checkpoint, dtype="float32", device="cpu", block_size=4, num_kv_blocks=32) as llm:
            raise ValueError("boom")
    assert llm.closed and llm.runner.kv_caches == []


@pytest.mark.gpu
def test_gpu_close_returns_the_memory_and_the_next_engine_sizes_from_free_memory(checkpoint):
    """Two engines sized from free memory one after the other (the second failed with 0 KV
    blocks before engines could be closed); a small share, so parallel tests keep theirs."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    outs = []
    for _ in range(2):
        with LLM(checkpoint, dtype="float32", block_size=16, gpu_memory_utilization=0.05) as llm:
            assert llm.num_kv_blocks * 16 >= 64
            outs.append(tokens(llm.generate(PROMPTS, GREEDY, noise=NOISE, use_tqdm=False)))
            assert llm.runner.graphs is not None and llm.runner.graphs.num_replays > 0
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before
    assert outs[0] == outs[1]


def test_release_drops_the_shared_workspace():
    dev = torch.device("cpu")
    buf = workspace.splitk_workspace(64, dev)
    assert workspace.splitk_workspace(32, dev).data_ptr() == buf.data_ptr()  # reused
    shared = weakref.ref(workspace._WORKSPACE[dev])
    del buf
    workspace.release_workspace(dev)
    assert shared() is None
    assert workspace.splitk_workspace(16, dev).numel() == 16  # a new one on the next call


def test_a_capture_pins_the_workspace_it_used(monkeypatch):
    """During a (simulated) CUDA graph capture the split-K workspace goes into the innermost
    pin list, which the graph keeps, so releasing the shared buffer cannot free memory a live
    graph writes to; a capture outside any pin scope is refused."""
    cuda = torch.device("cuda")
    staged = torch.empty(128)  # stands in for a buffer a warm-up allocated on the GPU
    monkeypatch.setitem(workspace._WORKSPACE, cuda, staged)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="workspace_pins"):
        workspace.splitk_workspace(64, cuda)
    with workspace.workspace_pins() as pins:
        with pytest.raises(RuntimeError, match="before a CUDA graph capture"):
            workspace.splitk_workspace(256, cuda)  # cannot grow while capturing
        workspace.splitk_workspace(64, cuda)
        workspace.splitk_workspace(32, cuda)
    assert len(pins) == 1 and pins[0] is staged
    assert pins not in workspace._PINS
    kept = weakref.ref(staged)
    del staged
    workspace.release_workspace(cuda)
    assert kept() is pins[0]  # the graph's pin list keeps it alive


def test_a_closed_trainer_frees_its_engine_and_model_and_a_second_one_trains(tmp_path, monkeypatch):
    """Two trainers one after the other in one process (as ``psnrl bench step`` runs its modes)."""
    from psnrl.trainer.config import load_config
    from psnrl.trainer.loop import PSNTrainer

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU torch paths: fast
    overrides = ["rollout.prompts_per_iter=4", "rollout.group_size=2", "train.mini_batch_prompts=4",
                 "train.sft_warmup_steps=0", "train.iterations=1", "eval.every=0", "checkpoint.every=0",
                 "log.tensorboard=false", "log.plot=false"]
    rewards = []
    for name in ("first", "second"):
        with PSNTrainer(load_config(None, overrides + [f"log.dir={tmp_path / name}"])) as trainer:
            rewards.append(trainer.run()[0]["reward_mean"])
            weight = weakref.ref(trainer.llm.model.model.embed_tokens.weight)
        assert trainer.llm.closed and weight() is None
    assert rewards[0] == rewards[1]  # same seed, same run: nothing of the first leaked into the second
