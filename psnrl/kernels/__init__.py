"""psnrl's Triton kernels, each beside its torch reference (see README.md here).

This package imports nothing else of psnrl, so the kernels can be used on their own.
"""
