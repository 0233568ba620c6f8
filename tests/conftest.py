"""Test setup: Triton runs in its CPU interpreter where no GPU is present."""
import gc
import importlib
import os
import pkgutil

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before any @triton.jit function is defined: a kernel defined while it is off
    # stays compiled-only for the whole process, whatever a test sets later. So every kernel
    # module is imported here, once, before a test can switch the interpreter off for a while
    # (several tests do, to take the torch paths).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import psnrl.kernels

    for module in pkgutil.iter_modules(psnrl.kernels.__path__, "psnrl.kernels."):
        importlib.import_module(module.name)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    """Where kernel tests run: the GPU when there is one, else the interpreter on the CPU."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def release_cuda_memory():
    """After each test on a GPU: collect what it left and return the cached blocks, so tests
    running in parallel on one GPU (pytest -n 8) find the memory free again."""
    yield
    if HAS_CUDA:
        gc.collect()
        torch.cuda.empty_cache()
