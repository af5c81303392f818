"""Which attention a run uses: `model.attn_implementation=auto` takes loomtrain's packed kernel
unless the model needs something the kernel does not do, in which case it keeps an HF path that
does it (`models.attn_support.hf_attention`): eager for logit soft-capping (HF's sdpa cannot
soft-cap, and Gemma 2 refuses to build with it) or for a class without sdpa (Bloom), sdpa for the rest.

The kernel lacks (and so `auto` falls back for):
- attention dropout > 0 (HF's `attention_dropout` / GPT-2's `attn_pdrop`),
- logit soft-capping (`attn_logit_softcapping`, Gemma 2),
- a sliding window shorter than the training sequence (`sliding_window` < data.seq_len; a window
  at least as long as the sequence never cuts anything off),
- ALiBi position biases (`alibi`, Falcon's option), which are added to the attention logits,
- a model whose attention does not go through transformers' attention interface at all (Bloom,
  Falcon: they compute attention, with their ALiBi biases, in their own code); setting the kernel
  there would be ignored, so the banner would name a kernel that never runs.
Asking for `loomtrain_packed` explicitly on such a model is refused before training starts: it
would silently train a different model.
"""
from __future__ import annotations

from dataclasses import dataclass

from loomtrain.errors import ConfigError
from loomtrain.models.attn_support import causal_lm_class, hf_attention, uses_attention_interface

PACKED = "loomtrain_packed"
AUTO = "auto"


@dataclass(frozen=True)
class AttentionChoice:
    name: str  # the HF attention implementation the model runs with
    reason: str  # why, for the run banner


def kernel_gaps(hf_config, seq_len: int) -> list[str]:
    """What this model needs that the packed kernel does not do (empty: the kernel fits)."""
    gaps = []
    for field in ("attention_dropout", "attn_pdrop"):
        value = getattr(hf_config, field, None)
        if isinstance(value, (int, float)) and value > 0:
            gaps.append(f"{field}={value}")
    softcap = getattr(hf_config, "attn_logit_softcapping", None)
    if softcap:
        gaps.append(f"attn_logit_softcapping={softcap}")
    window = getattr(hf_config, "sliding_window", None)
    if getattr(hf_config, "use_sliding_window", True) is False:
        window = None
    if isinstance(window, int) and 0 < window < seq_len:
        gaps.append(f"sliding_window={window} < data.seq_len={seq_len}")
    if getattr(hf_config, "alibi", False) is True:
        gaps.append("alibi=True")
    if not uses_attention_interface(hf_config):
        gaps.append(f"{causal_lm_class(hf_config).__name__} computes attention in its own code "
                    "(not through transformers' attention interface)")
    return gaps


def choose_attention(requested: str, hf_config, seq_len: int) -> AttentionChoice:
    """The implementation for `model.attn_implementation=requested` (see the module docstring)."""
    gaps = kernel_gaps(hf_config, seq_len)
    if requested == PACKED:
        if gaps:
            raise ConfigError(f"model.attn_implementation={PACKED} cannot run this model ({', '.join(gaps)}); "
                              "use model.attn_implementation=auto")
        return AttentionChoice(PACKED, "requested")
    if requested == AUTO:
        if gaps:
            return AttentionChoice(hf_attention(hf_config), f"auto: the packed kernel lacks {', '.join(gaps)}")
        return AttentionChoice(PACKED, "auto")
    return AttentionChoice(requested, "requested")
