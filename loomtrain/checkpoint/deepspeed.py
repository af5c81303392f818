"""Import a DeepSpeed checkpoint (ZeRO-1/2/3, or DeepSpeed's universal format) as a loomtrain
checkpoint, which any loomtrain layout then resumes from:

    loomtrain ckpt import-deepspeed DS_DIR OUT_DIR --config run.yaml [section.key=value ...]
    loomtrain run run.yaml checkpoint.resume=OUT_DIR

Why a converter rather than a config key: the conversion needs the whole state in one process
(DeepSpeed shards flat vectors, not tensors), while a resume reads only each rank's slice; once
written in loomtrain's format, every layout, world size and ZeRO stage resumes from it through the
ordinary path (DCP resharding, verification, fallback), and the DeepSpeed files are read once.

`ds_format.read_deepspeed` cuts DeepSpeed's flat fp32 vectors and AdamW state back into tensors
by name; here they are matched to the model the loomtrain config builds (same HF names, an outer
wrapper prefix such as `module.` is dropped) and written as `model.<name>` and
`optim.state.<name>.{step,exp_avg,exp_avg_sq}`. What does not carry over, and what stands in:

* a parameter with no optimizer state (frozen in DeepSpeed) gets a fresh AdamW state (zeros,
  step 0), which AdamW treats exactly like a first step;
* the step is DeepSpeed's `global_steps`; the LR schedule resumes at that step of the *config's*
  schedule (DeepSpeed's own scheduler, if any, is not translated);
* the data position is DeepSpeed's `global_samples` (loomtrain's stream continues after as many
  samples: DeepSpeed's data order is its user's, not knowable here); the per-rank RNG streams are
  reseeded from (seed, rank, step), as on any change of layout.
"""
from __future__ import annotations

import os
import time

import torch

from loomtrain.checkpoint import format as fmt
from loomtrain.checkpoint import offline
from loomtrain.checkpoint.ds_format import DeepSpeedImportError, DeepSpeedState, read_deepspeed
from loomtrain.checkpoint.hf import build_skeleton, tied_duplicates
from loomtrain.checkpoint.state import versions
from loomtrain.optim.schedule import lr_lambda

__all__ = ["DeepSpeedImportError", "DeepSpeedState", "import_deepspeed", "read_deepspeed"]


def _prefix(st: DeepSpeedState, names: list[str]) -> str:
    """The wrapper prefix DeepSpeed's names carry over the model's own ('' or e.g. 'module.')."""
    have = set(st.params) | set(st.shared)
    if not names or all(n in have for n in names):
        return ""
    first = names[0]
    candidates = {k[:len(k) - len(first)] for k in have if k.endswith(first) and
                  (len(k) == len(first) or k[len(k) - len(first) - 1] == ".")}
    return max(candidates, key=lambda p: sum(p + n in have for n in names), default="")


def _names(keys, limit: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _model_tensors(st: DeepSpeedState, model, prefix: str) -> dict:
    sd = model.state_dict(keep_vars=True)
    tied = tied_duplicates(model)
    params = {id(p) for p in model.parameters()}
    used: set[str] = set()

    def source(name: str):
        ds = prefix + name
        for key in (ds, st.shared.get(ds)):
            if key is not None and key in st.params:
                used.add(key)
                return st.params[key]
        if name in tied:
            return source(tied[name])
        return st.buffers.get(ds)

    out, missing, wrong = {}, [], []
    for name, t in sd.items():
        value = source(name)
        if value is None and id(t) not in params and t.device.type != "meta":
            value = t.detach().clone()  # a buffer the model computes from its config
        if value is None:
            missing.append(name)
        elif tuple(value.shape) != tuple(t.shape):
            wrong.append(f"{name} {list(value.shape)} vs {list(t.shape)}")
        else:
            out[fmt.MODEL_PREFIX + name] = value.to(t.dtype).contiguous()
    extra = set(st.params) - used
    if missing or wrong or extra:
        parts = ([f"missing {_names(missing)}"] if missing else []) + \
                ([f"shape of {', '.join(wrong[:3])}"] if wrong else []) + \
                ([f"not in the model: {_names(extra)}"] if extra else [])
        raise DeepSpeedImportError(f"DeepSpeed checkpoint {st.path} does not match the {type(model).__name__} the "
                                   "config builds (check model.* against the DeepSpeed run): " + "; ".join(parts))
    return out


def _optim_tensors(st: DeepSpeedState, model, prefix: str) -> tuple[dict, list[str]]:
    out, fresh = {}, []
    for name, p in model.named_parameters():
        ds = prefix + name
        state = st.optim.get(ds) or st.optim.get(st.shared.get(ds, ""))
        if state is None:
            fresh.append(name)
            state = {"step": torch.tensor(0.0), "exp_avg": torch.zeros(p.shape), "exp_avg_sq": torch.zeros(p.shape)}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            out[f"{fmt.OPTIM_PREFIX}{name}.{key}"] = state[key].to(torch.float32).contiguous()
    return out, fresh


def import_deepspeed(ds_path: str, out_root: str, cfg, tag: str | None = None) -> dict:
    """Convert the DeepSpeed checkpoint `ds_path` into `out_root/step_N` for the model `cfg`
    builds (a loomtrain `Config`); returns a summary. See the module docstring."""
    st = read_deepspeed(ds_path, tag)
    _, model = build_skeleton(cfg)
    prefix = _prefix(st, [n for n, _ in model.named_parameters()])
    tensors = _model_tensors(st, model, prefix)
    optim, fresh = _optim_tensors(st, model, prefix)
    tensors.update(optim)
    samples = st.global_samples if isinstance(st.global_samples, int) else st.step * cfg.data.global_batch_size
    lr = cfg.optim.lr * lr_lambda(cfg.optim, cfg.train.max_steps)(st.step)
    strip = lambda n: n[len(prefix):] if n.startswith(prefix) else n  # noqa: E731
    groups = [{**g, "params": [strip(n) for n in g["params"]]} for g in st.groups]
    source = {"format": "deepspeed", "kind": st.kind, "path": os.path.abspath(st.path), "zero_stage": st.stage,
              "dp_world_size": st.dp_world_size, "ds_version": st.ds_version, "global_steps": st.step,
              "global_samples": st.global_samples, "fresh_optimizer_state": fresh}
    meta = {
        "created_unix": time.time(),
        "data": {"samples_consumed": int(samples), "tokens_consumed": int(samples) * cfg.data.seq_len},
        "scheduler": {"last_epoch": st.step, "_step_count": st.step + 1, "_is_initial": False,
                      "_last_lr": [lr] * max(1, len(groups))},
        "optim": {"class": "AdamW", "zero": st.stage, "param_groups": groups},
        "rng": {"per_rank": []},
        "config": cfg.to_dict(),
        "layout": {"world_size": st.dp_world_size, "dp_size": st.dp_world_size, "zero": st.stage, "device": None,
                   "degrees": {"dp_replicate": 1, "dp_shard": st.dp_world_size, "cp": 1, "tp": 1, "pp": 1},
                   "source": "deepspeed"},
        "versions": {**versions(), "deepspeed": st.ds_version},
        "imported_from": source,
    }
    path = offline.write_checkpoint(out_root, st.step, tensors, meta)
    n_model = sum(1 for k in tensors if k.startswith(fmt.MODEL_PREFIX))
    return {"checkpoint": path, "step": st.step, "source": source, "model_tensors": n_model,
            "optimizer_state": "fresh (none in the checkpoint)" if len(fresh) == len(optim) // 3 else
            (f"from DeepSpeed, fresh for {len(fresh)} parameters" if fresh else "from DeepSpeed")}
