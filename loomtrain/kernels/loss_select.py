"""Which loss a run uses: `kernels.fused_loss` = auto | on | off.

The fused path calls the model for its final hidden states (`logits_to_keep=1`, so HF's own head
runs on one position only) and applies the head itself, chunk by chunk (`kernels.head_loss`). That is only the same
model when loomtrain knows exactly what the family's `ForCausalLM.forward` does between the head
and the loss, so families are listed here with their post-processing, read from transformers'
code (`logits = lm_head(h)`, then Cohere `* logit_scale`, Granite `/ logits_scaling`, Gemma 2/3
`final_logit_softcapping`). A family not listed keeps the stock path under `auto` and is refused
under `on`: its forward may scale, cap or mask logits in a way the fused path would silently skip.

Where `auto` turns it on:
- CUDA: liger-kernel's Triton kernel when installed and the head is not vocabulary-parallel,
  else loomtrain's chunked torch kernel (the only one that spans tensor-parallel vocab shards).
- CPU: the stock path; `on` runs the chunked torch kernel. Measured (benchmarks/fused_loss.py,
  benchmarks/RESULTS.md): the fused path holds 2.6-6.0x less memory for the loss at 32K-128K
  vocabularies (1024 tokens) and is not slower within this shared machine's noise (fused/stock
  time 0.50-1.11 over three runs).
  `auto` still keeps the stock path on CPU: CPU runs here are tests and small models whose logits
  are small, and the fused path does not run the head module's forward, so a forward hook on
  `lm_head` (tests/test_nonfinite.py injects inf logits that way; a user may too) would see only
  the one unused position. The same holds wherever the fused path runs: use `off` to keep such
  hooks working.
Pipeline parallelism: the last stage returns its final hidden states and the schedule's loss
function applies the head through the fused path (`parallel.pipeline`).
Not built (stock path under `auto`, refused under `on`): the heterogeneous sequence scheduler.
"""
from __future__ import annotations

from dataclasses import dataclass

from loomtrain.errors import ConfigError
from loomtrain.kernels.fused_loss import LogitTransform, liger_available

MODES = ("auto", "on", "off")
STOCK, TORCH, LIGER = "stock", "torch", "liger"
# Families whose causal-LM forward is exactly `lm_head(final hidden)` (+ the transform below).
_PLAIN = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo2", "glm4", "gpt2", "gpt_neox",
          "starcoder2")
_SOFTCAPPED = ("gemma2", "gemma3_text")


@dataclass(frozen=True)
class LossChoice:
    path: str  # stock | torch | liger
    transform: LogitTransform
    chunk_tokens: int  # 0 = auto (about 128 MiB of fp32 logits per chunk)
    reason: str  # for the run banner

    @property
    def fused(self) -> bool:
        return self.path != STOCK


def logit_transform(hf_config) -> LogitTransform | None:
    """The family's post-processing of `lm_head(h)`, or None for a family loomtrain has not read."""
    kind = getattr(hf_config, "model_type", None)
    if kind in _PLAIN:
        return LogitTransform()
    if kind in _SOFTCAPPED:
        return LogitTransform(softcap=getattr(hf_config, "final_logit_softcapping", None) or None)
    if kind == "cohere":
        return LogitTransform(scale=float(hf_config.logit_scale))
    if kind == "granite":
        return LogitTransform(scale=1.0 / float(hf_config.logits_scaling))
    return None


def choose_loss(mode: str | bool, chunk_tokens: int, hf_config, *, device_type: str, vocab_parallel: bool,
                hetero: bool) -> LossChoice:
    """The loss path for `kernels.fused_loss=mode` (see the module docstring; YAML's true/false
    stand for on/off)."""
    mode = {True: "on", False: "off"}.get(mode, mode) if isinstance(mode, bool) else mode
    stock = LossChoice(STOCK, LogitTransform(), chunk_tokens, "")
    if mode == "off":
        return LossChoice(STOCK, stock.transform, chunk_tokens, "off")
    gaps = []
    if hetero:
        gaps.append("parallel.sequence_scheduler=hetero")
    transform = logit_transform(hf_config)
    if transform is None:
        gaps.append(f"model type {getattr(hf_config, 'model_type', '?')} (its logit post-processing is not known)")
    if gaps:
        if mode == "on":
            raise ConfigError(f"kernels.fused_loss=on is not built for {', '.join(gaps)}; "
                              "use kernels.fused_loss=auto or off")
        return LossChoice(STOCK, stock.transform, chunk_tokens, f"auto: fused loss lacks {', '.join(gaps)}")
    if mode == "auto" and device_type != "cuda":
        return LossChoice(STOCK, stock.transform, chunk_tokens, f"auto: stock on {device_type}")
    if device_type == "cuda" and not vocab_parallel and liger_available():
        return LossChoice(LIGER, transform, chunk_tokens, f"{mode}: liger-kernel")
    where = "tp vocab-parallel" if vocab_parallel else device_type
    return LossChoice(TORCH, transform, chunk_tokens, f"{mode}: chunked torch ({where})")
