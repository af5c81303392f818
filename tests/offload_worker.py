"""The offload tests' multi-case worker: `parity_worker`'s results, plus what FSDP2 was told.

Usage (under torchrun): offload_worker.py CASES.json OUT_DIR
Besides OUT_DIR/name.json and name.safetensors, rank 0 writes OUT_DIR/name.fsdp.json: for every
FSDP unit of the trained model, the class of its offload policy and whether each of its
parameters is marked for host offload. On a CPU machine host and device are the same memory, so
this is how a test sees that `offload.params` reached FSDP2 (it reads FSDP2's private state).
"""
import json
import os

import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from harness import run_worker, train_and_save


def fsdp_offload_state(modules) -> list[dict]:
    units = []
    for part in modules:
        for name, module in part.named_modules():
            if isinstance(module, FSDPModule):
                group = module._get_fsdp_state()._fsdp_param_group
                if group is not None:
                    units.append({"unit": name, "policy": type(group.offload_policy).__name__,
                                  "params_on_host": [p.offload_to_cpu for p in group.fsdp_params]})
    return units


def run_case(name: str, overrides: list[str], out_dir: str) -> None:
    trainer = train_and_save(name, overrides, out_dir)
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, f"{name}.fsdp.json"), "w", encoding="utf-8") as fh:
            json.dump(fsdp_offload_state(trainer.model_parts), fh)


if __name__ == "__main__":
    run_worker(run_case)
