"""RMSNorm and SwiGLU through liger-kernel's Triton kernels: `kernels.rmsnorm` and
`kernels.swiglu` = auto | on | off.

UNTESTED ON A GPU. Written in a session without one: what is tested (CPU) is the selection (`auto`
keeps HF's modules without CUDA, `on` without CUDA or liger-kernel is refused in one line) and
that `off`/`auto` leave the model untouched. That Liger's modules equal HF's on a GPU, and whether
they beat `torch.compile`'s own fusion there, is not measured yet.

How: by replacing module instances of the one model being built (each HF RMSNorm by a
`LigerRMSNorm` with its size and epsilon, each gated MLP by a `LigerSwiGLUMLP` of the config),
on the meta device before the weights are filled, so parameter names (`...input_layernorm.weight`,
`...mlp.gate_proj.weight`) and therefore initialisation, checkpoints and tensor-parallel plans stay
the model's own. Never Liger's `apply_liger_kernel_to_*`, which patch transformers' classes for the
whole process.

Where `auto` turns them on: CUDA, liger-kernel installed, and a family whose modules Liger's
compute exactly (`_FAMILIES`: RMSNorm `weight * (x / rms(x))` computed in fp32 and cast back, no
offset; MLP `down(silu(gate(x)) * up(x))` without biases). Elsewhere HF's modules; `on` refuses
what `auto` would skip. Under tensor parallelism they stay off (Liger's kernels take plain
tensors, the sharded MLP's are DTensors): `on` is refused there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from loomtrain.errors import ConfigError

try:  # optional: liger-kernel's Triton modules (CUDA only)
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
except ImportError:  # not installed (always the case on a CPU-only machine)
    LigerRMSNorm = LigerSwiGLUMLP = None

MODES = ("auto", "on", "off")
# Families whose RMSNorm is Llama's (fp32 normalisation, `weight * x`, no offset) and whose MLP is
# `down(silu(gate) * up)`, read from transformers' modeling code.
_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModuleKernels:
    """Which modules are swapped for Liger's, and why (for the run banner)."""

    rmsnorm: bool
    swiglu: bool
    reason: str


def liger_modules_available() -> bool:
    return LigerRMSNorm is not None and LigerSwiGLUMLP is not None


def _mode(value) -> str:
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


def _gaps(hf_config, device_type: str, tensor_parallel: bool, key: str) -> list[str]:
    gaps = []
    if device_type != "cuda":
        gaps.append(f"{device_type} (Liger's kernels are Triton, CUDA only)")
    elif not liger_modules_available():
        gaps.append("no liger-kernel installed (pip install liger-kernel)")
    kind = getattr(hf_config, "model_type", None)
    if kind not in _FAMILIES:
        gaps.append(f"model type {kind} (its {key} is not known to equal Liger's)")
    if key == "swiglu" and (getattr(hf_config, "hidden_act", None) not in ("silu", "swish")
                            or getattr(hf_config, "mlp_bias", False)):
        gaps.append("an MLP that is not silu-gated without biases")
    if tensor_parallel:
        gaps.append("tensor parallelism (Liger's modules take plain tensors)")
    return gaps


def choose_module_kernels(rmsnorm, swiglu, hf_config, *, device_type: str,
                          tensor_parallel: bool) -> ModuleKernels:
    """What `kernels.rmsnorm` / `kernels.swiglu` select here (see the module docstring); `on`
    where it cannot run raises one `ConfigError` line."""
    chosen, notes = {}, []
    for key, value in (("rmsnorm", rmsnorm), ("swiglu", swiglu)):
        mode = _mode(value)
        gaps = [] if mode == "off" else _gaps(hf_config, device_type, tensor_parallel, key)
        if mode == "on" and gaps:
            raise ConfigError(f"kernels.{key}=on needs Liger on CUDA; not available for {'; '.join(gaps)}; "
                              f"use kernels.{key}=auto or off")
        chosen[key] = mode != "off" and not gaps
        notes.append(f"{key} {'liger' if chosen[key] else 'hf'} ({mode})")
    return ModuleKernels(chosen["rmsnorm"], chosen["swiglu"], ", ".join(notes))


def apply_module_kernels(model: nn.Module, choice: ModuleKernels, hf_config) -> int:
    """Replace the chosen modules of `model` in place (on whatever device its parameters are,
    normally meta before materialising); returns how many were replaced."""
    if not (choice.rmsnorm or choice.swiglu):
        return 0
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            kind = type(child).__name__
            if choice.rmsnorm and kind.endswith("RMSNorm") and hasattr(child, "variance_epsilon"):
                swaps.append((parent, name, lambda c=child: LigerRMSNorm(
                    c.weight.shape[0], eps=c.variance_epsilon, offset=0.0, casting_mode="llama", in_place=False)))
            elif choice.swiglu and kind.endswith("MLP") and all(
                    hasattr(child, a) for a in ("gate_proj", "up_proj", "down_proj")):
                swaps.append((parent, name, lambda: LigerSwiGLUMLP(hf_config)))
    for parent, name, make in swaps:
        device = next(getattr(parent, name).parameters()).device
        with torch.device(device):
            setattr(parent, name, make())
    return len(swaps)
