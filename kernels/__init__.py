"""psnrl's Triton kernels and their torch references.

This package imports nothing else of psnrl. Its name is the same as a PyPI package
that ``transformers`` probes for; it defines no ``__version__`` and no
distribution called ``kernels``, so ``transformers`` never takes it for that one
(tests/test_transformers_isolation.py checks it).
"""
