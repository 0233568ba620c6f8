"""Build script. Metadata lives in pyproject.toml; C++ extensions (the engine's
block manager) are declared here as they are added."""
from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "psnrl.engine._block_manager",
        ["psnrl/engine/csrc/block_manager.cpp"],
        depends=["psnrl/engine/csrc/block_manager.hpp", "psnrl/engine/csrc/block_hash.hpp"],
        cxx_std=17,
        extra_compile_args=["-O2"],
    ),
]

setup(ext_modules=ext_modules)
