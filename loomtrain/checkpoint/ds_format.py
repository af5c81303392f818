"""Reading DeepSpeed's checkpoint files without DeepSpeed (the runtime must not need it); the
import into loomtrain's format is `checkpoint/deepspeed.py`.

What is where (DeepSpeed 0.19; `deepspeed/utils/zero_to_fp32.py` and `deepspeed/checkpoint/` are
the source):

* `DS_DIR/latest` names the tag directory (`global_stepN`) of the newest `save_checkpoint`.
* `*_model_states.pt` (`mp_rank_00_...` for ZeRO-0/1/2, one `zero_pp_rank_R_mp_rank_00_...` per
  rank for ZeRO-3): `param_shapes` (per optimizer group: HF name -> shape, in flattening order),
  `shared_params` (tied name -> source), `buffer_names` + `module` (buffers), frozen parameters,
  `global_steps`, `global_samples`, `ds_version`.
* `[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`, one per data-parallel rank R:
  ZeRO-1/2 `single_partition_of_fp32_groups[g]` is rank R's contiguous slice of group g's flat
  fp32 vector (parameters laid end to end in `param_shapes[g]` order, `param_alignment_paddings`
  after each, the group padded to a multiple of 2 x world size); the torch optimizer's own state
  (`base_optimizer_state`) holds exp_avg/exp_avg_sq flat over the same slice. ZeRO-3
  `fp32_flat_groups[k]`: every parameter split in `ceil(numel / world)` pieces, piece R on rank R
  (the last one zero-padded); `optimizer_state_dict` holds the matching flat state.
* universal (`ds_to_universal`): `DIR/zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`, whole
  tensors (a `{"param": tensor}` dict, or flat for ZeRO-3), plus `zero/optimizer_state.pt`.

Each flat vector is cut back into whole parameters by name (`read_deepspeed`). Everything is held
in memory at once, as `zero_to_fp32` does (inputs are mmap'ed; one fp32 copy of the state out).

Files are read with `torch.load(weights_only=True)`. DeepSpeed's optimizer files also pickle
three small records (the ZeRO stage enum, the loss scaler, fragment addresses); they are mapped to
inert local classes through torch's weights-only allow-list (no DeepSpeed code runs). Anything else
is refused with the name of what the file wanted to construct.
"""
from __future__ import annotations

import glob
import math
import os
import pickle
import re
from dataclasses import dataclass, field

import torch

from loomtrain.checkpoint.integrity import open_regular
from loomtrain.errors import LoomError


class DeepSpeedImportError(LoomError):
    """A DeepSpeed checkpoint cannot be found, read or mapped onto the model."""


class _Record:
    """Inert stand-in for a DeepSpeed record class: unpickling only fills its __dict__."""


class _LossScaler(_Record):
    pass


class _FragmentAddress(_Record):
    pass


class _ZeroStage(int):
    """Stand-in for `ZeroStageEnum` (an int enum pickled as a call with its value)."""


_SAFE = [(_ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
         (_LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
         (_LossScaler, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
         (_FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address")]
_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)")


def load_file(path: str):
    """`torch.load(path, weights_only=True)` with DeepSpeed's inert records allowed; a file that
    wants anything else is refused with one line naming it."""
    try:
        with torch.serialization.safe_globals(_SAFE):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            unsafe = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - {n for _, n in _SAFE})
        except Exception:  # noqa: BLE001
            unsafe = []
        what = ", ".join(unsafe[:3]) or "objects outside torch's weights-only allow-list"
        raise DeepSpeedImportError(f"{path} cannot be read with torch.load(weights_only=True): it pickles {what}; "
                                   "loomtrain does not unpickle arbitrary objects") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise DeepSpeedImportError(f"{path} is not a readable torch.save file ({type(exc).__name__}: "
                                   f"{(str(exc).splitlines() or [''])[0][:160]})") from None


@dataclass
class DeepSpeedState:
    """Full fp32 tensors and optimizer state of a DeepSpeed checkpoint, by DeepSpeed's names."""

    path: str
    kind: str  # "zero" | "universal"
    stage: int
    dp_world_size: int
    step: int
    global_samples: int | None
    ds_version: str | None
    params: dict = field(default_factory=dict)  # name -> fp32 tensor
    optim: dict = field(default_factory=dict)  # name -> {"step", "exp_avg", "exp_avg_sq"}
    buffers: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)  # tied name -> source name
    groups: list = field(default_factory=list)  # [{hyper-parameters..., "params": [names]}]


def _natural(path: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


def _read_pointer(path: str) -> str | None:
    """The tag a `latest` file names (its first 4 KiB, stripped), None if unreadable."""
    try:
        fd = open_regular(path)
        with os.fdopen(fd, "rb") as fh:
            return fh.read(4096).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def locate(path: str, tag: str | None = None, _followed: bool = False) -> tuple[str, str]:
    """(kind, directory) of the DeepSpeed checkpoint `path` names: a tag directory, a universal
    directory, or a `save_checkpoint` root (its `latest`, or `tag`). A tag is a directory name of
    the root, followed once: a `latest` naming '.', '..', a path, or a directory that is itself
    only a pointer (a loop) is an error, not a recursion."""
    if not os.path.exists(path):
        raise DeepSpeedImportError(f"no DeepSpeed checkpoint at {path}: no such file or directory")
    if not os.path.isdir(path):
        raise DeepSpeedImportError(f"{path} is a file; name the DeepSpeed checkpoint directory")
    if os.path.isdir(os.path.join(path, "zero")) and glob.glob(os.path.join(path, "*model_states.pt")):
        return "universal", path
    if tag is None and glob.glob(os.path.join(path, "*_model_states.pt")):
        return "zero", path
    if tag is None and not _followed:
        for pointer in ("latest", "latest_universal"):
            tag = _read_pointer(os.path.join(path, pointer))
            if tag is not None:
                break
    if tag and (tag in (".", "..") or "/" in tag or os.sep in tag or "\0" in tag):
        raise DeepSpeedImportError(f"{path}: tag {tag[:80]!r} is not the name of one of its directories (its "
                                   "'latest' file, or --tag, must name a global_stepN directory)")
    if tag and os.path.isdir(os.path.join(path, tag)):
        return locate(os.path.join(path, tag), _followed=True)
    if tag:
        raise DeepSpeedImportError(f"{path}: tag {tag[:80]!r} names no directory")
    if _followed:
        raise DeepSpeedImportError(f"{path} holds no *_model_states.pt (a tag directory that only points further; "
                                   "name the directory that holds the checkpoint files)")
    raise DeepSpeedImportError(f"{path} is not a DeepSpeed checkpoint (no *_model_states.pt, no 'latest' file; "
                               "name a save_checkpoint directory or one of its tag directories)")


def _files(d: str, pattern: str) -> list[str]:
    return sorted((f for f in glob.glob(os.path.join(d, pattern)) if "_expert_" not in os.path.basename(f)),
                  key=_natural)


def _model_states(d: str) -> tuple[dict, list[dict]]:
    files = _files(d, "*model_states.pt")
    if not files:
        raise DeepSpeedImportError(f"{d}: no *_model_states.pt file")
    if glob.glob(os.path.join(d, "*_expert_*")):
        raise DeepSpeedImportError(f"{d}: mixture-of-experts DeepSpeed checkpoints are not supported")
    ms = load_file(files[0])  # ZeRO-3 writes one per rank; they agree on all but frozen fragments
    if not isinstance(ms, dict) or "param_shapes" not in ms:
        raise DeepSpeedImportError(f"{files[0]} is not a DeepSpeed ZeRO model-states file (no param_shapes)")
    if int(ms.get("mp_world_size") or 1) > 1:
        raise DeepSpeedImportError(f"{d}: tensor/pipeline-parallel DeepSpeed checkpoints (mp_world_size="
                                   f"{ms['mp_world_size']}) are not supported; convert it with DeepSpeed's "
                                   "ds_to_universal and import the universal checkpoint")
    shapes = ms["param_shapes"]
    return ms, [shapes] if isinstance(shapes, dict) else list(shapes)


def _groups_meta(param_groups, name_groups) -> list[dict]:
    out = []
    for i, names in enumerate(name_groups):
        hyper = param_groups[i] if param_groups and i < len(param_groups) else {}
        out.append({**{k: (list(v) if isinstance(v, tuple) else v) for k, v in hyper.items() if k != "params"
                       and isinstance(v, (int, float, str, bool, tuple, list, type(None)))}, "params": list(names)})
    return out


def _base_state(sd: dict) -> dict:
    base = sd.get("base_optimizer_state", sd.get("optimizer_state_dict"))
    if not isinstance(base, dict) or "state" not in base:
        return {"state": {}, "param_groups": []}
    return base


def _flat_states(base: dict, n: int) -> list[dict]:
    """The torch optimizer's state of its n flat parameters, in flat-group order."""
    ids = [p for g in base.get("param_groups", []) for p in g.get("params", [])] or list(range(n))
    return [base["state"].get(i, {}) for i in ids[:n]] + [{}] * max(0, n - len(ids))


def _step_tensor(value):
    return (value.detach().to(torch.float32).reshape(()) if torch.is_tensor(value)
            else torch.tensor(float(value), dtype=torch.float32))


def _read_zero(d: str, st: DeepSpeedState, ms: dict, shapes: list[dict]) -> None:
    files = _files(d, "*_optim_states.pt")
    if not files:
        raise DeepSpeedImportError(f"{d}: no *_optim_states.pt files (the fp32 weights live there)")
    osds = []
    for f in files:
        sd = load_file(f)
        if not isinstance(sd, dict) or not isinstance(sd.get("optimizer_state_dict"), dict):
            raise DeepSpeedImportError(f"{f} is not a DeepSpeed ZeRO optimizer-states file")
        osds.append(sd["optimizer_state_dict"])
    stage = int(osds[0].get("zero_stage", 0))
    world = osds[0].get("partition_count", len(files))
    world = max(world) if isinstance(world, (list, tuple)) else int(world)
    ranks = [int(m.group(1)) for m in (_RANK.search(os.path.basename(f)) for f in files) if m]
    if world != len(files) or sorted(ranks) != list(range(world)):
        raise DeepSpeedImportError(f"{d}: expected {world} *_optim_states.pt files (ranks 0..{world - 1}), found "
                                   f"{len(files)}: a rank's file is missing or from another save")
    st.stage, st.dp_world_size = stage, world
    bases = [_base_state(o) for o in osds]
    st.groups = _groups_meta(bases[0].get("param_groups"), [list(s) for s in shapes])
    if stage in (1, 2):
        key = "single_partition_of_fp32_groups"
        paddings = osds[0].get("param_alignment_paddings")
        for g, group in enumerate(shapes):
            flat = {"fp32": torch.cat([o[key][g].reshape(-1) for o in osds])}
            states = [_flat_states(b, len(osds[0][key]))[g] for b in bases]
            # The fp32 slices are saved without the group's end padding (on the last rank), the
            # optimizer's state with it: cut each state to its fp32 slice.
            for k in ("exp_avg", "exp_avg_sq"):
                if not all(torch.is_tensor(s.get(k)) for s in states):
                    continue  # no such state (not AdamW, or never stepped): a fresh one stands in
                if any(s[k].numel() < o[key][g].numel() for s, o in zip(states, osds)):
                    raise DeepSpeedImportError(f"{d}: the optimizer's {k} of group {g} is smaller than its fp32 "
                                               "weights; the files do not belong to one save")
                flat[k] = torch.cat([s[k].reshape(-1)[:o[key][g].numel()] for s, o in zip(states, osds)])
            offset = 0
            for i, (name, shape) in enumerate(group.items()):
                n = math.prod(shape)
                _put(st, name, shape, {k: v.narrow(0, offset, n) for k, v in flat.items()}, states[0].get("step"))
                offset += n + (paddings[g][i] if paddings else 0)
            align = 2 * world
            if math.ceil(offset / align) * align != math.ceil(flat["fp32"].numel() / align) * align:
                raise DeepSpeedImportError(f"{d}: group {g} holds {flat['fp32'].numel()} values but its parameters "
                                           f"take {offset}; the files do not belong to one save")
    elif stage == 3:
        flats = [o["fp32_flat_groups"] for o in osds]
        per_rank = {"fp32": [torch.cat([t.reshape(-1) for t in f]) for f in flats]}
        states = [_flat_states(b, len(flats[0])) for b in bases]
        for k in ("exp_avg", "exp_avg_sq"):
            if all(torch.is_tensor(s.get(k)) for r in states for s in r):
                per_rank[k] = [torch.cat([s[k].reshape(-1) for s in r]) for r in states]
                if any(a.numel() != w.numel() for a, w in zip(per_rank[k], per_rank["fp32"])):
                    raise DeepSpeedImportError(f"{d}: the optimizer's {k} does not cover the fp32 weights of "
                                               "every rank; the files do not belong to one save")
        step = states[0][0].get("step") if states[0] else None
        offset = 0
        for group in shapes:
            for name, shape in group.items():
                n = math.prod(shape)
                part = math.ceil(n / world)
                full = {k: torch.cat([v.narrow(0, offset, part) for v in vs]) for k, vs in per_rank.items()}
                _put(st, name, shape, full, step)
                offset += part
        if offset != per_rank["fp32"][0].numel():
            raise DeepSpeedImportError(f"{d}: each rank holds {per_rank['fp32'][0].numel()} values but the "
                                       f"parameters take {offset}; the files do not belong to one save")
    else:
        raise DeepSpeedImportError(f"{d}: ZeRO stage {stage} checkpoints are not supported (only 1, 2 and 3); "
                                   "a stage-0 checkpoint's weights are in mp_rank_00_model_states.pt")
    _frozen(st, ms, stage, d)


def _frozen(st: DeepSpeedState, ms: dict, stage: int, d: str) -> None:
    frozen = ms.get("frozen_param_shapes") or {}
    if not frozen:
        return
    if stage == 3:
        states = [load_file(f) for f in _files(d, "*model_states.pt")]
        for name, shape in frozen.items():
            flat = torch.cat([s["frozen_param_fragments"][name].reshape(-1) for s in states])
            st.params[name] = flat[:math.prod(shape)].reshape(tuple(shape)).float().clone()
    else:
        for name, shape in frozen.items():
            st.params[name] = ms["frozen_param_fragments"][name].reshape(tuple(shape)).float().clone()


def _put(st: DeepSpeedState, name: str, shape, flat: dict, step) -> None:
    shape = tuple(shape)
    short = [k for k, v in flat.items() if v.numel() < math.prod(shape)]
    if short:
        raise DeepSpeedImportError(f"{st.path}: {name} needs {math.prod(shape)} values of {short[0]} but the "
                                   f"checkpoint holds {flat[short[0]].numel()}")
    st.params[name] = flat["fp32"][:math.prod(shape)].reshape(shape).float().clone()
    if "exp_avg" in flat and "exp_avg_sq" in flat:
        st.optim[name] = {k: flat[k][:math.prod(shape)].reshape(shape).float().clone()
                          for k in ("exp_avg", "exp_avg_sq")}
        st.optim[name]["step"] = _step_tensor(step if step is not None else st.step)


def _read_universal(d: str, st: DeepSpeedState, ms: dict, shapes: list[dict]) -> None:
    zero = os.path.join(d, "zero")
    common = {}
    if os.path.isfile(os.path.join(zero, "optimizer_state.pt")):
        common = load_file(os.path.join(zero, "optimizer_state.pt"))
    st.stage = int(common.get("zero_stage", 0)) if isinstance(common, dict) else 0
    st.dp_world_size = int(ms.get("dp_world_size") or 1)
    inner = common.get("optimizer_state_dict") if isinstance(common, dict) else None
    groups = (common.get("param_groups") or (inner or {}).get("param_groups")) if isinstance(common, dict) else None
    st.groups = _groups_meta(groups, [list(s) for s in shapes])
    z3_step = None
    if isinstance(inner, dict) and inner.get("state"):
        z3_step = next(iter(inner["state"].values())).get("step")
    all_shapes = {n: tuple(s) for group in shapes for n, s in group.items()}
    all_shapes.update({n: tuple(s) for n, s in (ms.get("frozen_param_shapes") or {}).items()})
    for name, shape in all_shapes.items():
        pdir = os.path.join(zero, name)
        if not os.path.isfile(os.path.join(pdir, "fp32.pt")):
            raise DeepSpeedImportError(f"{d}: universal checkpoint has no zero/{name}/fp32.pt")
        flat = {}
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            f = os.path.join(pdir, f"{key}.pt")
            if os.path.isfile(f):
                obj = load_file(f)
                flat[key] = (obj["param"] if isinstance(obj, dict) else obj).reshape(-1)
        step = load_file(os.path.join(pdir, "step.pt")) if os.path.isfile(os.path.join(pdir, "step.pt")) else z3_step
        _put(st, name, shape, flat, step)


def read_deepspeed(path: str, tag: str | None = None) -> DeepSpeedState:
    """Read a DeepSpeed checkpoint (see the module docstring) into full fp32 tensors. Files that
    load but do not have DeepSpeed's structure are a one-line DeepSpeedImportError."""
    try:
        return _read(path, tag)
    except DeepSpeedImportError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OverflowError) as exc:
        raise DeepSpeedImportError(f"{path} is not a DeepSpeed checkpoint loomtrain can read ({type(exc).__name__}: "
                                   f"{(str(exc).splitlines() or [''])[0][:160]})") from None


def _read(path: str, tag: str | None) -> DeepSpeedState:
    kind, d = locate(path, tag)
    ms, shapes = _model_states(d)
    st = DeepSpeedState(path=d, kind=kind, stage=0, dp_world_size=1, step=int(ms.get("global_steps") or 0),
                        global_samples=ms.get("global_samples"), ds_version=ms.get("ds_version"))
    (_read_universal if kind == "universal" else _read_zero)(d, st, ms, shapes)
    module = ms.get("module") or {}
    st.buffers = {n: module[n].float().clone() for n in (ms.get("buffer_names") or []) if n in module}
    st.shared = dict(ms.get("shared_params") or {})
    return st
