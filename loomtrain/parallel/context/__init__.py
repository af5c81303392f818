"""Context parallelism: one sequence split across the ranks of a cp group, through HF's own
`AttentionInterface`, so any model that dispatches attention through it gains it unchanged.

Each cp rank holds a slice of every sequence (input ids, labels and the *global* position ids,
so rotary embeddings are right). Everything but attention is per token and needs nothing else.
Attention gets the missing context one of two ways:

- **Ulysses** (DeepSpeed-Ulysses, Jacobs et al. 2023): an all-to-all turns [heads, S/cp] into
  [heads/cp, S], attention runs over the whole sequence for a subset of heads, and a second
  all-to-all turns it back. Slices are contiguous. KV heads fewer than cp are repeated first.
- **Ring** (Liu et al. 2023): KV blocks travel around the group (`ring.py`);
  slices are zig-zag (chunks r and 2cp-1-r) so causal work is balanced across ranks.

HF calls a custom attention function with `attention_mask=None`; both derive the document
boundaries themselves from the position ids (a new document starts wherever the position does not
continue the previous one), which arrive as a keyword argument, and run the memory-linear packed
kernel of `loomtrain.kernels` (no S x S mask anywhere): Ulysses once over the whole sequence after
the all-to-all, ring once per ring step, merged by log-sum-exp.

Modules: `common` (token slices, position gathering, the group an attention module uses), `ulysses`,
`ring`, and `apply` (`apply_cp`, which registers both with transformers).
"""
