"""`loomtrain ckpt export-hf|import-deepspeed`: convert checkpoints to and from other formats.

    loomtrain ckpt export-hf PATH OUT_DIR [--dtype float32|bfloat16] [--max-shard-size 5GB] [--overwrite]
    loomtrain ckpt import-deepspeed DS_DIR OUT_DIR --config CONFIG.yaml [--tag TAG] [section.key=value ...]

Both build the HF model skeleton, so they import torch and transformers (unlike `inspect`/`verify`).
"""
from __future__ import annotations

import argparse

from loomtrain.checkpoint.deepspeed import import_deepspeed
from loomtrain.checkpoint.hf import export_hf, parse_size
from loomtrain.config import load_config
from loomtrain.launch.ckpt_command import human


def cmd_export_hf(ns: argparse.Namespace) -> int:
    s = export_hf(ns.path, ns.out_dir, dtype=ns.dtype, max_shard_bytes=parse_size(ns.max_shard_size),
                  overwrite=ns.overwrite)
    print(f"exported step {s['step']} of {s['checkpoint']} to {s['out_dir']}: {s['model']}, {s['tensors']} tensors, "
          f"{human(s['bytes'])} {s['dtype']} in {', '.join(s['files'])}"
          + (f"; tied {', '.join(s['tied'])} written once" if s["tied"] else "")
          + ("; tokenizer copied" if s["tokenizer"] else ""))
    return 0


def cmd_import_deepspeed(ns: argparse.Namespace) -> int:
    cfg = load_config(None if ns.config == "-" else ns.config, ns.overrides)
    s = import_deepspeed(ns.ds_path, ns.out_dir, cfg, tag=ns.tag)
    src = s["source"]
    print(f"imported DeepSpeed {src['kind']} ZeRO-{src['zero_stage']} checkpoint ({src['dp_world_size']} ranks, "
          f"step {s['step']}, deepspeed {src['ds_version']}) into {s['checkpoint']}: {s['model_tensors']} model "
          f"tensors, optimizer state {s['optimizer_state']}; resume with checkpoint.resume={ns.out_dir}")
    return 0
