"""Training FLOPs of a HF causal LM, derived from its config rather than guessed from hidden size.

MFU is only as honest as the FLOP count in its numerator, so the count is built from the model's
real geometry (GQA key/value heads, gated vs. plain MLP, explicit `head_dim`, tied lm_head,
learned position tables) and checked in the tests against a walk of the model itself.

Two conventions are reported, because both are in common use and they answer different questions:

* `palm_flops_per_token(S) = 6*N + 12*L*H*Dh*S` -- PaLM (Chowdhery et al. 2022, appendix B), as
  implemented by torchtitan (`get_num_flop_per_token`). 6*N: one multiply-add (2 FLOPs) per
  parameter per token in the forward pass, twice that in the backward pass (input and weight
  gradients). 12*L*H*Dh*S: the two attention matmuls (Q K^T and A V), 2*H*Dh*S FLOPs each per token
  and layer in the forward pass, times 3 for forward+backward, over the full S x S score matrix
  (no causal discount, documents in a packed row are not separated). This is the number other
  frameworks quote MFU with, so it is the one to compare against.
  N is the parameter count less the parameters that are only looked up, never multiplied: the
  input token table of an untied model (torchtitan: `nparams - nparams_embedding`) and learned
  position tables. A tied token table *is* the lm_head weight and does a vocab x hidden matmul
  per token, so it stays in N (nanoGPT's `get_num_params(non_embedding=True)` makes the same call).
* `exact_step_flops(doc_lengths)` -- what the matmuls really cost for packed variable-length
  documents under causal masking, with Megatron-LM's accounting (Narayanan et al. 2021, "Efficient
  Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", section 5.1: an
  (m x k) @ (k x n) matmul costs 2mkn FLOPs, the backward pass twice the forward): training =
  3 x forward; forward = 2*matmul_params per token plus, per layer and per document of length L,
  2 matmuls x 2 FLOPs x H*Dh x L(L+1)/2 causal query-key pairs (a varlen/flash kernel computes
  only those; the paper's own formula counts the full S x S square). Biases, norms, softmax, rotary and the loss are ignored (all O(hidden) per token).
  Sliding-window attention is counted as full causal attention.

`flop_model(hf_config)` knows llama, mistral, qwen2 and gpt2 by formula; any other `model_type`
is measured by building the model on the meta device (no memory, no weights) and walking it:
every `nn.Linear` / HF `Conv1D` weight is a matmul weight, every `nn.Embedding` weight a lookup.
The walk builds the model with eager attention: the count does not depend on the attention
kernel, and some families refuse sdpa at construction (Gemma-2 soft-caps its attention logits).

Mixture-of-experts models (`models.moe`) count *active* parameters, the convention of Switch,
Mixtral and DeepSeek reports: a token multiplies by its top-k experts' weights, so k/E of every
expert matrix is a matmul weight and the other (E-k)/E is `inactive_params`, left out of the PaLM
N too; the router (E x hidden) multiplies every token. Expert weights are found by shape and name
(grouped `gate_up_proj`/`down_proj` [E, ...], or a per-expert `experts` ModuleList of length E).

A FLOP count is a metric, not a precondition: a config that cannot be counted (the meta build
fails, the config lacks the attention geometry) gives `FlopModel.unknown()`, and the run trains
with MFU reported as unknown rather than being refused.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from loomtrain.errors import LoomError
from loomtrain.models.moe import MoeSpec, expert_params


@dataclass(frozen=True)
class FlopModel:
    """Parameter counts and attention geometry that determine the FLOPs of one training token."""

    n_layers: int
    n_heads: int  # query heads; key/value heads only change matmul_params, not the score matmuls
    head_dim: int
    # Weights that take part in a matmul once per token: q/k/v/o (GQA-aware), MLP, lm_head
    # (vocab x hidden, counted even when tied to the input embedding).
    matmul_params: int
    # Input token (and learned position) embedding tables: looked up, no FLOPs.
    embedding_params: int
    # All parameters, a tied table counted once (= sum(p.numel() for p in model.parameters())).
    total_params: int
    # The part of embedding_params that is also the lm_head weight (vocab x hidden when tied):
    # it does a matmul per token, so the PaLM count keeps it in N.
    tied_embedding_params: int = 0
    # Mixture of experts: expert weights a token does not use (all experts' minus the top-k's
    # share, (E - k) / E of them). They are in total_params but neither in matmul_params nor in
    # the PaLM N: FLOPs and MFU count active parameters.
    inactive_params: int = 0
    source: str = "config"  # "config" (family formula) or "meta" (walk of a meta-device model)
    # False when the config could not be counted: every count is NaN and MFU is unknown.
    known: bool = True
    reason: str = ""  # why the count is unknown (one line), shown once at start-up

    @classmethod
    def unknown(cls, reason: str) -> "FlopModel":
        """The count of a model that cannot be counted: NaN FLOPs, so MFU comes out unknown."""
        return cls(n_layers=0, n_heads=0, head_dim=0, matmul_params=0, embedding_params=0, total_params=0,
                   source="unknown", known=False, reason=reason)

    @property
    def palm_params(self) -> int:
        """N of the PaLM formula: all parameters except lookup-only embedding tables."""
        return self.total_params - self.embedding_params + self.tied_embedding_params - self.inactive_params

    def palm_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, PaLM appendix B / torchtitan: 6*N + 12*L*H*Dh*S."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        if not self.known:
            return float("nan")
        return 6.0 * self.palm_params + 12.0 * self.n_layers * self.n_heads * self.head_dim * seq_len

    def palm_step_flops(self, num_tokens: int, seq_len: int) -> float:
        """PaLM training FLOPs of a step that trains `num_tokens` tokens in rows of `seq_len`."""
        return float(num_tokens) * self.palm_flops_per_token(seq_len)

    def exact_step_flops(self, doc_lengths: Iterable[int]) -> float:
        """Megatron-style training FLOPs of packed causal documents of the given lengths.

        3 x forward, forward = 2*matmul_params*tokens + n_layers * sum over documents of
        2 (QK^T, AV) * 2 (multiply-add) * H*Dh * L(L+1)/2 (causal query-key pairs).
        """
        tokens = 0
        pairs = 0
        for length in doc_lengths:
            length = int(length)
            if length < 0:
                raise ValueError(f"document lengths must not be negative, got {length}")
            tokens += length
            pairs += length * (length + 1) // 2
        if not self.known:
            return float("nan")
        forward = (2.0 * self.matmul_params * tokens
                   + self.n_layers * 2.0 * 2.0 * self.n_heads * self.head_dim * pairs)
        return 3.0 * forward


# --------------------------------------------------------------------------- config formulas

_GATED_FAMILIES = ("llama", "mistral", "qwen2")


def _heads(cfg) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) the way the HF attention modules compute them."""
    n_heads = int(cfg.num_attention_heads)
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return n_heads, int(n_kv), int(head_dim)


def _gated_decoder(cfg) -> FlopModel:
    """llama / mistral / qwen2: pre-norm RMSNorm blocks, GQA attention, gate/up/down MLP.

    Mirrors modeling_{llama,mistral,qwen2}.py: q (d x H*Dh), k and v (d x KV*Dh), o (H*Dh x d);
    MLP gate/up (d x I) and down (I x d); RMSNorm weights (d) twice per layer plus a final one;
    embed_tokens (V x d); lm_head (d x V, shared with embed_tokens when tie_word_embeddings).
    Biases: llama has optional `attention_bias` (q/k/v/o) and `mlp_bias`; qwen2 always has q/k/v
    biases; mistral has none. Biases are parameters but not matmul weights.
    """
    mt = cfg.model_type
    d, inter, vocab, layers = (int(cfg.hidden_size), int(cfg.intermediate_size),
                               int(cfg.vocab_size), int(cfg.num_hidden_layers))
    n_heads, n_kv, head_dim = _heads(cfg)
    q_out, kv_out = n_heads * head_dim, n_kv * head_dim
    attn = d * q_out + 2 * d * kv_out + q_out * d
    mlp = 3 * d * inter
    bias = 0
    if mt == "llama":
        if getattr(cfg, "attention_bias", False):
            bias += q_out + 2 * kv_out + d
        if getattr(cfg, "mlp_bias", False):
            bias += 2 * inter + d
    elif mt == "qwen2":
        bias += q_out + 2 * kv_out
    norms = 2 * d
    embed = vocab * d
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    total = layers * (attn + mlp + bias + norms) + d + embed + (0 if tied else embed)
    return FlopModel(n_layers=layers, n_heads=n_heads, head_dim=head_dim,
                     matmul_params=layers * (attn + mlp) + embed, embedding_params=embed,
                     total_params=total, tied_embedding_params=embed if tied else 0)


def _gpt2(cfg) -> FlopModel:
    """GPT-2: LayerNorm (weight+bias), fused c_attn, c_proj, c_fc/c_proj MLP, all HF Conv1D with bias.

    Mirrors modeling_gpt2.py: c_attn d x 3d (+3d), attn c_proj d x d (+d), c_fc d x I (+I),
    mlp c_proj I x d (+d) with I = n_inner or 4d; ln_1, ln_2, ln_f (2d each); wte V x d and
    wpe n_positions x d (a learned lookup table, no FLOPs); lm_head tied to wte by default.
    """
    d, layers, n_heads = int(cfg.n_embd), int(cfg.n_layer), int(cfg.n_head)
    inter = int(cfg.n_inner) if getattr(cfg, "n_inner", None) else 4 * d
    vocab, positions = int(cfg.vocab_size), int(cfg.n_positions)
    per_layer_matmul = 3 * d * d + d * d + d * inter + inter * d
    per_layer_other = 3 * d + d + inter + d + 2 * 2 * d  # biases + ln_1 + ln_2
    wte, wpe = vocab * d, positions * d
    tied = bool(getattr(cfg, "tie_word_embeddings", True))
    total = layers * (per_layer_matmul + per_layer_other) + 2 * d + wte + wpe + (0 if tied else wte)
    return FlopModel(n_layers=layers, n_heads=n_heads, head_dim=d // n_heads,
                     matmul_params=layers * per_layer_matmul + wte, embedding_params=wte + wpe,
                     total_params=total, tied_embedding_params=wte if tied else 0)


# --------------------------------------------------------------------------- meta-model walk

def flop_model_from_module(model, hf_config) -> FlopModel:
    """Count matmul / embedding / total parameters by walking a (meta or real) module.

    Every `nn.Linear` and HF `Conv1D` weight is a matmul weight, counted once per module that
    applies it (so a tied lm_head counts although its weight is the embedding's); every
    `nn.Embedding` weight is a lookup table. Attention geometry comes from the config.
    """
    matmul = 0
    matmul_ids: set[int] = set()
    embeddings: dict[int, int] = {}
    spec = MoeSpec.of(hf_config)
    experts = expert_params(model, spec.num_experts) if spec is not None else {}
    for module in model.modules():
        if isinstance(module, (nn.Linear, Conv1D)) and id(module.weight) not in experts:
            matmul += module.weight.numel()
            matmul_ids.add(id(module.weight))
        elif isinstance(module, nn.Embedding):
            embeddings[id(module.weight)] = module.weight.numel()
    params = list(model.parameters())  # deduplicated: a tied table appears once
    total = sum(p.numel() for p in params)
    inactive = 0
    if spec is not None:
        # Expert matrices: each token multiplies by top_k of the E experts' slices. Routers: an
        # E x hidden matrix (a plain Parameter in transformers 5.x) multiplied by every token.
        hidden = int(getattr(hf_config, "hidden_size", 0))
        expert_matrices = [p for p in experts.values() if p.dim() >= 2]
        active = sum(p.numel() for p in expert_matrices) * spec.top_k // spec.num_experts
        matmul += active
        inactive = sum(p.numel() for p in experts.values()) * (spec.num_experts - spec.top_k) // spec.num_experts
        matmul_ids.update(id(p) for p in expert_matrices)
        for p in params:
            if p.dim() == 2 and tuple(p.shape) == (spec.num_experts, hidden) and id(p) not in matmul_ids:
                matmul += p.numel()
                matmul_ids.add(id(p))
    # Matrices that are neither Linear nor Embedding (fused MoE experts, custom projections) do
    # FLOPs this walk cannot see; say so instead of reporting a silently low MFU.
    unseen = sum(p.numel() for p in params
                 if p.dim() >= 2 and id(p) not in matmul_ids and id(p) not in embeddings and id(p) not in experts)
    if unseen > 0.01 * total:
        warnings.warn(f"{unseen} of {total} parameters of {type(model).__name__} sit in matrices that"
                      " are neither nn.Linear/Conv1D nor nn.Embedding; their FLOPs are not counted",
                      stacklevel=2)
    n_layers = int(getattr(hf_config, "num_hidden_layers"))
    n_heads, _, head_dim = _heads(hf_config)
    return FlopModel(n_layers=n_layers, n_heads=n_heads, head_dim=head_dim, matmul_params=matmul,
                     embedding_params=sum(embeddings.values()), total_params=total,
                     tied_embedding_params=sum(n for i, n in embeddings.items() if i in matmul_ids),
                     inactive_params=inactive, source="meta")


def flop_model_from_meta(hf_config) -> FlopModel:
    """Build the causal LM of `hf_config` on the meta device (no memory) and walk it, with eager
    attention (the parameters do not depend on it; Gemma-2 refuses sdpa at construction)."""
    counted = copy.deepcopy(hf_config)
    counted._attn_implementation = "eager"
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(counted)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot count this model"
        raise LoomError(
            f"cannot derive FLOPs for model_type '{getattr(hf_config, 'model_type', '?')}': building"
            f" it on the meta device failed ({type(exc).__name__}: {exc}); use a supported"
            f" architecture (llama, mistral, qwen2, gpt2) or one AutoModelForCausalLM can build"
        ) from None
    return flop_model_from_module(model, hf_config)


def flop_model(hf_config) -> FlopModel:
    """FlopModel of a HF config: closed-form for llama/mistral/qwen2/gpt2, meta-model walk otherwise;
    `FlopModel.unknown(reason)` when neither can count it (training goes on, MFU unknown)."""
    model_type = getattr(hf_config, "model_type", None)
    try:
        if model_type in _GATED_FAMILIES:
            return _gated_decoder(hf_config)
        if model_type == "gpt2" and not getattr(hf_config, "add_cross_attention", False):
            return _gpt2(hf_config)
        return flop_model_from_meta(hf_config)
    except (LoomError, AttributeError, TypeError, ValueError, ZeroDivisionError) as exc:
        return FlopModel.unknown(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
