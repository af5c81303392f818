"""Compute kernels (attention, fused loss, norms): Triton on CUDA, with a pure-torch fallback
that is the reference in tests.

May import: `loomtrain.errors` only; models and parallel layers call into it.
"""
