"""Compute kernels (attention, fused loss, norms): fast paths on CUDA, with a pure-torch fallback
that is the reference in tests.

Attention: `attention.packed_attention` is memory-linear packed variable-length causal attention
(documents given by cu_seqlens / global-index intervals, `blockplan`), returning the output and its
log-sum-exp so pieces can be merged (ring attention). `blockwise` is the pure-torch kernel with its
own backward, `hf` registers it with transformers as `loomtrain_packed`, and `select` decides when
`model.attn_implementation=auto` uses it.

May import: `loomtrain.errors` only; the parallel layer calls into it.
"""
