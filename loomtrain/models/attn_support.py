"""Which attention implementations an HF model class can run, read from the class transformers
would build for a config (no model is built).

Two facts decide `model.attn_implementation=auto` (`kernels.select`) and the implementation a
model is first built with (`models.build`):
- whether the class's attention goes through transformers' attention interface at all: only then
  does a registered implementation such as loomtrain's packed kernel replace it. Bloom and Falcon
  compute attention (with ALiBi biases) in their own code; setting another implementation there
  is silently ignored or refused, so it must not be chosen.
- whether the class supports sdpa (`_supports_sdpa`); if not, eager is what it runs.
"""
from __future__ import annotations

import inspect

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

EAGER = "eager"
SDPA = "sdpa"


def causal_lm_class(hf_config) -> type | None:
    """The `AutoModelForCausalLM` class for this config, or None if transformers has none."""
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    except KeyError:
        return None


def uses_attention_interface(hf_config) -> bool:
    """True if the model dispatches attention through transformers' attention interface, so a
    registered implementation runs in its place. The class flag `_supports_attention_backend` is
    not set by every model that does (StableLM), so the modeling module's use of the interface
    registry counts as well. An unknown class counts as yes (nothing to judge by)."""
    cls = causal_lm_class(hf_config)
    if cls is None or getattr(cls, "_supports_attention_backend", False):
        return True
    return hasattr(inspect.getmodule(cls), "ALL_ATTENTION_FUNCTIONS")


def hf_attention(hf_config) -> str:
    """The HF implementation a model runs when loomtrain's kernel does not: eager for a model that
    soft-caps attention logits (sdpa cannot) or whose class does not support sdpa (Bloom), else sdpa."""
    if getattr(hf_config, "attn_logit_softcapping", None):
        return EAGER
    cls = causal_lm_class(hf_config)
    if cls is not None and not getattr(cls, "_supports_sdpa", False):
        return EAGER
    return SDPA
