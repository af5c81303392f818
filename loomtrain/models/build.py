"""Building the HF model: config, construction on the meta device, and materialisation.

A model is built with its parameters on the meta device (buffers such as rotary frequencies are
real: they are computed from the config and are small), then parallelised, then materialised
parameter by parameter into each rank's local shard. No rank ever holds more than one full
parameter at a time, so a model larger than one device's memory can be started.

Random initialisation is layout-independent by construction: every module is initialised by the
model's own HF `_init_weights` on full-size temporary tensors under a seed derived from
(train.seed, module name), and each rank keeps only its slice. One process and any mix of
dp/zero/tp/pp therefore start from bit-identical weights.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import zlib
from typing import Callable, Iterator

import torch
import torch.nn as nn
from huggingface_hub.errors import StrictDataclassError
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

from loomtrain.config import ModelConfig
from loomtrain.errors import ConfigError, LoomError
from loomtrain.models.attn_support import hf_attention
from loomtrain.models.weights import SafetensorsSource, one_line

# Geometry of the demo model. Filled into model.config for keys the user did not set, so that
# `architecture: llama` alone gives a model a CPU can train (HF's defaults are 7B parameters).
DEMO_GEOMETRY = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


# model.attn_implementation values chosen after the build, by the parallel layer.
DEFERRED_ATTENTION = ("auto", "loomtrain_packed")

# Sizes of the model's geometry (under any of their HF names): each must be a positive integer.
_SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim",
                "n_embd", "n_layer", "n_head", "n_positions", "n_inner")
# What HF's config classes raise for a value they cannot take (ArithmeticError: a zero size in a
# config.json reaches a division in the class's own __init__).
_HF_CONFIG_ERRORS = (StrictDataclassError, TypeError, ValueError, KeyError, AttributeError, ArithmeticError)


def _read_config_json(path: str) -> dict:
    """`model.path`'s config.json as a mapping with a model_type transformers knows."""
    file = os.path.join(path, "config.json")
    try:
        with open(file, "rb") as fh:
            fields = json.loads(fh.read().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"model.path: cannot read {file} ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"model.path: {file} is not UTF-8 text (offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model.path: {file} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise ConfigError(f"model.path: {file} is nested too deeply") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"model.path: {file} must hold a JSON object, got {type(fields).__name__}")
    model_type = fields.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        raise ConfigError(f"model.path: {file} has model_type={model_type!r}, which this transformers does not know"
                          + (f" (did you mean {', '.join(close)}?)" if close else "")
                          if model_type is not None else f"model.path: {file} has no model_type")
    return fields


def _bad_size(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31


def _check_given_sizes(given: dict, aliases: dict) -> None:
    """The user's size overrides, before the config class sees them: its __init__ derives fields
    from them (Llama: head_dim = hidden_size // num_attention_heads) and would divide by zero."""
    for key, value in given.items():
        if (key in _SIZE_FIELDS or aliases.get(key) in _SIZE_FIELDS) and value is not None and _bad_size(value):
            raise ConfigError(f"model.config.{key}={value!r}: must be a positive integer (at most 2**31)")


def _check_geometry(hf, given: dict) -> None:
    """Positive integer sizes, finite numbers: HF accepts hidden_size=-64 and fails much later."""
    aliases = getattr(hf, "attribute_map", None) or {}
    for name in _SIZE_FIELDS:
        value = getattr(hf, name, None)
        if value is None:
            continue
        if _bad_size(value):
            user = [k for k in given if aliases.get(k, k) == aliases.get(name, name)]
            key = f"model.config.{user[0]}" if user else f"the model's {name}"
            raise ConfigError(f"{key}={value!r}: must be a positive integer (at most 2**31)")
    for key, value in given.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"model.config.{key}={value}: must be finite")


def _make_config(cls, path: str | None, fields: dict):
    try:
        return cls.from_dict(fields) if path is not None else cls(**fields)
    except _HF_CONFIG_ERRORS as exc:
        where = f"model.path={path} (config.json + model.config)" if path is not None else "model.config"
        raise ConfigError(f"{where}: {cls.__name__} refuses the values: {one_line(exc)}") from None


def build_hf_config(mcfg: ModelConfig, *, vocab_size: int, seq_len: int, eos_id: int | None = None):
    """The HF config for `model.path` or `model.architecture` + `model.config` overrides."""
    if mcfg.path is not None:
        cls = CONFIG_MAPPING[_read_config_json(mcfg.path)["model_type"]]
        try:
            base = AutoConfig.from_pretrained(mcfg.path, local_files_only=True)
        except (OSError, *_HF_CONFIG_ERRORS) as exc:
            raise ConfigError(f"model.path: {mcfg.path}/config.json: {one_line(exc)}") from None
        cls, overrides = type(base), dict(mcfg.config)
    else:
        arch = mcfg.architecture
        if arch not in CONFIG_MAPPING:
            close = difflib.get_close_matches(arch, list(CONFIG_MAPPING.keys()), n=3)
            raise ConfigError(f"model.architecture={arch!r} is not an HF model_type"
                              + (f" (did you mean {', '.join(close)}?)" if close else ""))
        cls = CONFIG_MAPPING[arch]
        base = cls()
        defaults = {k: v for k, v in DEMO_GEOMETRY.items() if hasattr(base, k)}
        defaults["vocab_size"] = vocab_size
        if hasattr(base, "max_position_embeddings"):
            defaults["max_position_embeddings"] = max(seq_len, 128)
        if eos_id is not None:
            # Not pad_token_id: HF makes it the embedding's padding_idx, which zeroes that row and
            # freezes it; EOS is a real input token. Packed training never pads.
            for key in ("bos_token_id", "eos_token_id"):
                defaults[key] = eos_id
            defaults["pad_token_id"] = None
        # Only keys the config class has (CodeGen has no pad_token_id): a default is loomtrain's,
        # not the user's, and must never trip the unknown-key check below.
        defaults = {k: v for k, v in defaults.items() if hasattr(base, k)}
        # A user key may be another name of a default's key (GPT-2's n_embd is hidden_size,
        # n_positions is max_position_embeddings): the default must then not override it.
        aliases = getattr(base, "attribute_map", None) or {}
        given = {aliases.get(k, k) for k in mcfg.config}
        overrides = {k: v for k, v in defaults.items() if aliases.get(k, k) not in given}
        overrides.update(mcfg.config)
    for key in overrides:
        if not hasattr(base, key):
            known = [k for k in base.to_dict() if not k.startswith("_")]
            close = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f"model.config.{key}: not a field of {cls.__name__}"
                              + (f" (did you mean '{close[0]}'?)" if close else ""))
    _check_given_sizes(dict(mcfg.config), getattr(base, "attribute_map", None) or {})
    # Build the config class with the overrides rather than setting attributes afterwards: fields
    # derived in __init__ (Llama's head_dim = hidden_size / num_attention_heads) must see them.
    if mcfg.path is not None:
        fields = base.to_dict()
        fields.update(overrides)
        hf = _make_config(cls, mcfg.path, fields)
    else:
        hf = _make_config(cls, None, overrides)
    _check_geometry(hf, dict(mcfg.config))
    # `auto` and `loomtrain_packed` are resolved once the model exists (`parallel.compose`, through
    # the kernel layer, which registers the implementation with transformers); until then HF builds
    # the model with sdpa, or eager for a model that soft-caps attention logits or whose class has
    # no sdpa path (HF refuses to build those with sdpa; `auto` then keeps eager).
    placeholder = hf_attention(hf)
    hf._attn_implementation = placeholder if mcfg.attn_implementation in DEFERRED_ATTENTION else mcfg.attn_implementation
    if hf.vocab_size < vocab_size:
        raise ConfigError(f"model vocab_size={hf.vocab_size} is smaller than the tokenizer's {vocab_size}; "
                          "raise model.config.vocab_size or use a matching data.tokenizer")
    max_pos = getattr(hf, "n_positions", None) if hf.model_type == "gpt2" else None
    if max_pos is not None and max_pos < seq_len:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the model's learned positions ({max_pos}); "
                          f"set model.config.n_positions >= {seq_len}")
    return hf


def build_meta_model(hf_config) -> nn.Module:
    """An `AutoModelForCausalLM` of this config with every parameter on the meta device and its
    buffers real (on the CPU).

    The model is constructed under `torch.device("meta")` (a thread-local torch function mode, so
    nothing outside this call is affected); HF ties the shared weights as usual and skips its
    weight initialisation on meta. Buffers (rotary `inv_freq`, ...) come out on meta as well;
    `_compute_buffers` gives them storage and values.
    """
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    except ValueError as exc:
        raise ConfigError(f"model: transformers cannot build a causal LM for "
                          f"model_type={hf_config.model_type!r}: {exc}") from None
    except (TypeError, ArithmeticError) as exc:
        # A config class that leaves a size unset (MinistralConfig's head_dim=None) fails inside
        # the modeling code's arithmetic: name the unset sizes instead of the traceback.
        unset = [n for n in _SIZE_FIELDS if n in hf_config.to_dict() and getattr(hf_config, n, 0) is None]
        hint = f"; set {', '.join(f'model.config.{n}' for n in unset)}" if unset else ""
        raise ConfigError(f"model: {type(hf_config).__name__} cannot build its model ({one_line(exc)})"
                          f"{hint}") from None
    _compute_buffers(model)
    return model


def _unset(buf: torch.Tensor) -> torch.Tensor:
    """A CPU tensor like `buf` filled with a value no computed buffer holds (NaN, or the integer minimum)."""
    if buf.dtype.is_floating_point or buf.dtype.is_complex:
        return torch.full(buf.shape, math.nan, dtype=buf.dtype)
    if buf.dtype == torch.bool:
        return torch.zeros(buf.shape, dtype=buf.dtype)
    return torch.full(buf.shape, torch.iinfo(buf.dtype).min, dtype=buf.dtype)


def _still_unset(buf: torch.Tensor) -> bool:
    if buf.dtype.is_floating_point or buf.dtype.is_complex:
        return bool(torch.isnan(buf).any())
    if buf.dtype == torch.bool:
        return False  # no value to tell "unset" by
    return bool((buf == torch.iinfo(buf.dtype).min).any())


def _compute_buffers(model: nn.Module) -> None:
    """Give the meta buffers real CPU storage and let the model's own `_init_weights` compute them,
    as transformers does after its own meta-device construction (`_init_weights` knows how each
    buffer is derived from the config, e.g. rotary frequencies). A buffer it leaves unset is an error
    rather than garbage."""
    owners = []
    for module in model.modules():
        names = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        for name in names:
            module._buffers[name] = _unset(module._buffers[name])
        if names:
            owners.append((module, names))
    with torch.no_grad():
        for module, _ in owners:
            model._init_weights(module)
    for module, names in owners:
        for name in names:
            if _still_unset(module._buffers[name]):
                raise LoomError(f"{type(model).__name__}._init_weights does not compute the buffer "
                                f"{name} of {type(module).__name__}, so it cannot be built on the meta device")


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated decoder blocks (`model.layers`, `transformer.h`, ...): the unit that FSDP
    wraps, activation checkpointing recomputes and pipeline stages split."""
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if block_names and type(module[0]).__name__ in block_names:
                return module
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise LoomError(f"{type(model).__name__}: no repeated decoder blocks (nn.ModuleList) found")
    return best


def _module_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _copy_full_into(param: torch.Tensor, full: torch.Tensor, name: str = "?") -> None:
    """Write the slice of `full` that this rank owns into `param` (a plain tensor or a DTensor)."""
    full = full.to(dtype=param.dtype)
    if tuple(full.shape) != tuple(param.shape):
        raise LoomError(f"shape mismatch for tensor {name}: {list(full.shape)} in the checkpoint, "
                        f"{list(param.shape)} in the model")
    with torch.no_grad():
        if isinstance(param, DTensor):
            local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements,
                                      src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)


def materialize(model: nn.Module, device: torch.device, fill: Callable[[nn.Module], None]) -> None:
    """Allocate the (possibly sharded) meta parameters on `device`, keep the real buffers, and let
    `fill(model)` write the values.

    `to_empty` gives every module its own new tensor, which would silently untie shared
    parameters (GPT-2's lm_head and wte); the ties are recorded first and restored after.
    """
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for pname, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, pname))
    model.to_empty(device=device)
    for places in owners.values():
        first_module, first_name = places[0]
        for module, pname in places[1:]:
            module._parameters[pname] = first_module._parameters[first_name]
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name])
    fill(model)


def _init_units(model: nn.Module) -> Iterator[tuple[str, nn.Module, list[nn.Module]]]:
    """(name, unit, modules to initialise children-first). A decoder block is one unit because
    HF's `_init_weights` of a parent may re-initialise a child's weights (GPT-2 scales `c_proj`
    from `GPT2Attention`); every other module with parameters of its own is a unit alone."""
    blocks = {id(b) for b in find_blocks(model)}
    inside: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        if id(module) in blocks:
            subtree = list(module.modules())
            inside.update(id(m) for m in subtree)
            yield name, module, subtree[::-1]  # reversed pre-order: children before parents
        elif any(True for _ in module.parameters(recurse=False)):
            yield name, module, [module]


def init_random(model: nn.Module, seed: int) -> None:
    """Initialise every parameter with the model's own `_init_weights` on full-size temporaries,
    one unit (a decoder block, or a single module) at a time under a seed derived from its name,
    and copy each rank's slice into place. Peak extra memory: one block, unsharded."""
    done: set[int] = set()
    rng_state = torch.get_rng_state()
    for unit_name, unit, order in _init_units(model):
        slots = [(m, n, p) for m in order for n, p in m._parameters.items()
                 if p is not None and id(p) not in done]
        if not slots:
            continue
        temps = {id(p): nn.Parameter(torch.full(p.shape, float("nan"), dtype=torch.float32)) for _, _, p in slots}
        for m, n, p in slots:
            m._parameters[n] = temps[id(p)]
        try:
            torch.manual_seed(_module_seed(seed, unit_name))
            for m in order:
                model._init_weights(m)
        finally:
            for m, n, p in slots:
                m._parameters[n] = p
        for m, n, p in slots:
            if id(p) in done:
                continue
            full = temps[id(p)].detach()
            if torch.isnan(full).any():
                raise LoomError(f"{type(model).__name__}._init_weights left {unit_name} parameter {n} "
                                "uninitialised; start from model.path or pass an initialised model instance")
            _copy_full_into(p, full, f"{unit_name}.{n}")
            done.add(id(p))
    torch.set_rng_state(rng_state)


def load_safetensors(model: nn.Module, path: str) -> None:
    """Fill every parameter from the HF directory (`check_weights` has vetted names and shapes)."""
    source = SafetensorsSource(path, getattr(model, "base_model_prefix", ""))
    for name, param in model.named_parameters():
        key = source.key_for(name)
        if key is None:
            raise LoomError(f"model.path={path}: parameter {name} has no tensor in the checkpoint")
        _copy_full_into(param, source.get(key), key)


def load_from_instance(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Fill the parallelised copy of a user's model instance from that instance's full tensors."""
    for name, param in model.named_parameters():
        _copy_full_into(param, state[name], name)
