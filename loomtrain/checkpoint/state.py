"""What a checkpoint holds, taken from and put back into a live training job.

Tensors are gathered as references to the live objects (FSDP2 DTensor shards, DDP replicas,
ZeRO-1's owned optimizer state), keyed by the model's own parameter names (see `format`); the
rest (step, data position, RNG, LR schedule, optimizer hyper-parameters) is plain JSON.
"""
from __future__ import annotations

import random
import sys
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import transformers
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.optim import ZeroRedundancyOptimizer

from loomtrain.version import __version__
from loomtrain.checkpoint.format import MODEL_PREFIX, OPTIM_PREFIX, CheckpointError

# Wrapper modules that put a segment into parameter names but not into the model's own names.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def clean_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that holds this rank's state (ZeRO-1: the wrapped local AdamW)."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def _parts(model) -> list[nn.Module]:
    """A model, or the list of this rank's pipeline stages (each keeps the HF names it owns)."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def param_names(model) -> dict[int, str]:
    """id(parameter) -> its first (cleaned) name in the model's (or stages') `named_parameters()`."""
    out: dict[int, str] = {}
    for part in _parts(model):
        for n, p in part.named_parameters():
            out.setdefault(id(p), clean_name(n))
    return out


def model_entries(model) -> list[tuple[str, torch.Tensor]]:
    """`model.<name>` -> the live tensor (a DTensor shard under FSDP/TP), for every state-dict
    entry of the model or of each of this rank's pipeline stages."""
    out, seen = [], set()
    for part in _parts(model):
        for k, v in get_model_state_dict(part).items():
            key = MODEL_PREFIX + clean_name(k)
            if key not in seen:
                seen.add(key)
                out.append((key, v))
    return out


def optim_entries(model, optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """`optim.state.<name>.<field>` -> the live state tensor, for the parameters this rank steps."""
    inner = local_optimizer(optimizer)
    names = param_names(model)
    out = []
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state.get(p)
            if not state:
                continue
            name = names.get(id(p))
            if name is None:
                raise CheckpointError("the optimizer steps a parameter that is not in the model; cannot name its state")
            for field, value in state.items():
                if not torch.is_tensor(value):
                    raise CheckpointError(f"optimizer state {name}.{field} is a {type(value).__name__}, not a "
                                          "tensor; only tensor optimizer state can be checkpointed")
                out.append((f"{OPTIM_PREFIX}{name}.{field}", value))
    return out


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors (so that a checkpoint can be loaded into them) with one
    step of zero gradients at lr 0, as DCP does; the values are overwritten by the load."""
    inner = local_optimizer(optimizer)
    if inner.state:
        return
    params = [p for g in inner.param_groups for p in g["params"] if p.requires_grad]
    if not params:
        return
    saved = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in inner.param_groups]
    for g in inner.param_groups:
        g["lr"] = torch.tensor(0.0) if torch.is_tensor(g["lr"]) else 0.0
    with torch.no_grad():
        inner.step()
    for g, lr in zip(inner.param_groups, lrs):
        g["lr"] = lr
    for p, g in zip(params, saved):
        p.grad = g


def jsonable(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def optimizer_groups(model, optimizer: torch.optim.Optimizer) -> list[dict]:
    names = param_names(model)
    return [{**{k: jsonable(v) for k, v in g.items() if k != "params"},
             "params": [names.get(id(p), "?") for p in g["params"]]} for g in optimizer.param_groups]


def scheduler_state(scheduler) -> dict:
    return {k: jsonable(v) for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def restore_scheduler(scheduler, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Put the schedule back where it was (its step counter and the lr of the next step) and the
    optimizer's lr with it (LambdaLR's `load_state_dict` does not touch the groups).

    The number of parameter groups depends on the layout (plain tensors and DTensors are grouped
    apart), while every group follows the same schedule: per-group lists of another length are
    resized with their first value. `base_lrs` stay the current config's."""
    n = len(optimizer.param_groups)
    sd = scheduler.state_dict()
    for key, value in state.items():
        if key in ("lr_lambdas", "base_lrs") or key not in sd:
            continue
        if isinstance(value, list) and isinstance(sd[key], list) and len(sd[key]) == n and len(value) != n and value:
            value = [value[0]] * n
        sd[key] = value
    scheduler.load_state_dict(sd)
    last = getattr(scheduler, "_last_lr", None)
    if isinstance(last, list) and len(last) == n:
        for group, lr in zip(optimizer.param_groups, last):
            group["lr"] = float(lr)


# ---------------------------------------------------------------------------------------- RNG
def capture_rng(device: torch.device) -> dict:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": torch.cuda.get_rng_state().tolist() if device.type == "cuda" else None,
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_internal), py_gauss],
    }


def restore_rng(entry: dict, device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(entry["torch"], dtype=torch.uint8))
    if entry.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(entry["cuda"], dtype=torch.uint8))
    name, keys, pos, has_gauss, gauss = entry["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = entry["python"]
    random.setstate((version, tuple(internal), py_gauss))


def restore_or_derive_rng(meta: dict, env, degrees: dict, *, seed: int, dp_rank: int) -> None:
    """Each rank's RNG streams after a resume: restored exactly when the checkpoint was written by
    the same layout (same world size and degrees, one stream per rank); on any other layout the
    per-rank streams cannot carry over, so they are derived from the seed, data-parallel rank and
    step, the same way on every rank that shares them."""
    per_rank = (meta.get("rng") or {}).get("per_rank") or []
    layout = meta.get("layout") or {}
    if (layout.get("world_size") == env.world_size and layout.get("degrees") == degrees
            and len(per_rank) == env.world_size):
        restore_rng(per_rank[env.rank], env.device)
    else:
        torch.manual_seed(seed + 7919 * dp_rank + 104729 * int(meta["step"]))


def layout_degrees(dims) -> dict:
    """The parallel degrees a checkpoint's layout records (and a resume compares)."""
    degrees = {"dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "cp": dims.cp, "tp": dims.tp,
               "pp": dims.pp}
    # ep only when on, so a layout without expert parallelism records what it always did
    return {**degrees, "ep": dims.ep} if getattr(dims, "ep", 1) > 1 else degrees


def versions() -> dict:
    return {"loomtrain": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0]}


def mismatch(have: dict[str, list], mine: dict[str, list]) -> str | None:
    """Compare the checkpoint's tensors (`have`: key -> global shape) with what the job needs
    (`mine`); None when they match, else one line naming up to five tensors per problem: missing
    ones, model parameters the model does not have, and shapes that differ."""
    model_keys = {k for k in mine if k.startswith(MODEL_PREFIX)}
    missing = sorted(k for k in mine if k not in have)
    unexpected = sorted(k for k in have if k.startswith(MODEL_PREFIX) and k not in model_keys)
    wrong = sorted(k for k in mine if k in have and have[k] != mine[k])
    if not (missing or unexpected or wrong):
        return None

    def name(key: str) -> str:
        if key.startswith(MODEL_PREFIX):
            return key[len(MODEL_PREFIX):]
        return "optimizer state " + key[len(OPTIM_PREFIX):]

    def first_five(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    parts = []
    if missing:
        parts.append("missing from the checkpoint: " + first_five([name(k) for k in missing]))
    if unexpected:
        parts.append("parameters the model does not have: " + first_five([name(k) for k in unexpected]))
    if wrong:
        parts.append("shapes differ: " + first_five([f"{name(k)} (checkpoint {have[k]}, model {mine[k]})"
                                                      for k in wrong]))
    return "; ".join(parts)
