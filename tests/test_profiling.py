"""NVTX ranges: fixed names, no-ops while off, nested pushes and pops while on."""
import pytest

from psnrl.kernels import profiling
from psnrl.kernels.profiling import RANGES, nvtx_range


@pytest.fixture
def recorded(monkeypatch):
    events = []
    monkeypatch.setattr(profiling._State, "enabled", True)
    monkeypatch.setattr(profiling._State, "push", lambda name: events.append(("push", name)))
    monkeypatch.setattr(profiling._State, "pop", lambda: events.append(("pop",)))
    return events


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown NVTX range"):
        nvtx_range("rolout")


def test_off_by_default_and_a_no_op(monkeypatch):
    monkeypatch.setattr(profiling._State, "push", lambda name: pytest.fail("pushed while off"))
    assert not profiling.nvtx_enabled()
    with nvtx_range("rollout"):
        pass


def test_ranges_nest_as_context_and_decorator(recorded):
    @nvtx_range("sample")
    def sample():
        return 3

    with nvtx_range("rollout"):
        assert sample() == 3
    assert recorded == [("push", "rollout"), ("push", "sample"), ("pop",), ("pop",)]


def test_the_engine_and_loop_emit_their_phases(recorded, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from psnrl.trainer.config import load_config
    from psnrl.trainer.loop import PSNTrainer
    cfg = load_config(None, ["rollout.prompts_per_iter=4", "rollout.group_size=2", "train.mini_batch_prompts=4",
                             "train.sft_warmup_steps=0", "train.iterations=1", "eval.every=0",
                             "checkpoint.every=0", "noise.scheduler=var1", f"log.dir={tmp_path}"])
    PSNTrainer(cfg).run()
    names = {e[1] for e in recorded if e[0] == "push"}
    assert {"rollout", "scheduler", "prefill", "decode_step", "sample", "reward", "learner/forward",
            "learner/backward", "optimizer", "sigma_scheduler"} <= names <= set(RANGES)
    assert sum(e[0] == "push" for e in recorded) == sum(e[0] == "pop" for e in recorded)


def test_enabling_uses_the_nvtx_package_when_installed(monkeypatch):
    pytest.importorskip("nvtx")
    monkeypatch.setattr(profiling._State, "enabled", False)
    profiling.enable_nvtx()
    try:
        with nvtx_range("reward"):
            pass
    finally:
        profiling.enable_nvtx(False)


def test_torch_ranges_show_up_in_a_torch_profiler_trace():
    import torch
    from torch.profiler import ProfilerActivity, profile

    profiling.enable_torch_ranges()
    try:
        assert profiling.nvtx_enabled()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with nvtx_range("learner/forward"):
                with nvtx_range("sample"):
                    torch.ones(4).sum()
    finally:
        profiling.enable_torch_ranges(False)
    assert not profiling.nvtx_enabled()
    names = {e.key for e in prof.key_averages()}
    assert {"learner/forward", "sample"} <= names
    assert profiling._State.open_records == []
