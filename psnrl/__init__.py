"""psnrl: rollouts and GRPO training of LLM reasoners with parameter-space noise.

The public API, loaded on first use so that ``import psnrl`` stays cheap (no torch,
Triton or transformers import until a name below is touched)::

    from psnrl import LLM, SamplingParams, NoiseSpec   # generation (psnrl.engine)
    from psnrl import PSNTrainer, load_config           # training (psnrl.trainer)

The components are subpackages: ``psnrl.kernels`` (Triton kernels with their torch
references), ``psnrl.engine`` (the paged-attention rollout engine), ``psnrl.trainer``
(the GRPO learner, loop and CLI) and ``psnrl.bench`` (the benchmarks).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "LLM": "psnrl.engine.llm",
    "SamplingParams": "psnrl.engine.sampling",
    "NoiseSpec": "psnrl.engine.noise_spec",
    "PSNTrainer": "psnrl.trainer.loop",
    "load_config": "psnrl.trainer.config",
}
__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from psnrl.engine.llm import LLM as LLM
    from psnrl.engine.noise_spec import NoiseSpec as NoiseSpec
    from psnrl.engine.sampling import SamplingParams as SamplingParams
    from psnrl.trainer.config import load_config as load_config
    from psnrl.trainer.loop import PSNTrainer as PSNTrainer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'psnrl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
