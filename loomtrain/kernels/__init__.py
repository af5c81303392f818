"""Triton kernels with pure-torch fallbacks. Not implemented yet."""
