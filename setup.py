"""Build script. Metadata lives in pyproject.toml; C++ extensions (the engine's
block manager) are declared here as they are added."""
from setuptools import setup

setup()
