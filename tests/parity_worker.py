"""Runs several training cases inside one torchrun launch (start-up dominates test time).

Usage (under torchrun): parity_worker.py CASES.json OUT_DIR
CASES.json: {"name": ["dotted.key=value", ...], ...}. For each case rank 0 writes
OUT_DIR/name.json (losses, grad norms) and OUT_DIR/name.safetensors (final full parameters).
"""
import json
import os
import sys

import torch.distributed as dist

from harness import save_result
from loomtrain.config import load_config
from loomtrain.runtime.trainer import Trainer


def main() -> None:
    cases_path, out_dir = sys.argv[1], sys.argv[2]
    with open(cases_path, encoding="utf-8") as fh:
        cases = json.load(fh)
    dist.init_process_group("gloo")
    for name, overrides in cases.items():
        cfg = load_config(None, overrides + [f"train.output_dir={os.path.join(out_dir, name)}"])
        trainer = Trainer(cfg)
        result = trainer.fit()
        params = trainer.full_state_dict()
        if dist.get_rank() == 0:
            save_result(out_dir, name, result, params)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
