"""Compute kernels (attention, fused loss, norms): fast paths on CUDA, with a pure-torch fallback
that is the reference in tests.

Attention: `attention.packed_attention` is memory-linear packed variable-length causal attention
(documents given by cu_seqlens / global-index intervals, `blockplan`), returning the output and its
log-sum-exp so pieces can be merged (ring attention). `blockwise` is the pure-torch kernel with its
own backward, `hf` registers it with transformers as `loomtrain_packed`, and `select` decides when
`model.attn_implementation=auto` uses it.

Fused loss: `fused_loss.fused_linear_cross_entropy` is linear + cross-entropy chunked over tokens
(never the whole [tokens, vocab] logits), forward and backward, also across a tensor-parallel
vocabulary-split head (log-sum-exp and target logit combined over the shards per chunk); on CUDA
liger-kernel's Triton kernel takes the unsharded case when installed. `loss_select` decides from
`kernels.fused_loss` which families and layouts use it, and `head_loss` runs an HF model for its
final hidden states and applies the head through it.

Norms and MLPs: `modules` swaps HF's RMSNorm and gated-MLP instances for liger-kernel's Triton
modules (`kernels.rmsnorm`, `kernels.swiglu`; CUDA only, untested on a GPU so far), never by
patching classes process-wide.

May import: `loomtrain.errors` only; the parallel and runtime layers call into it.
"""
