"""Runs several training cases in one torchrun launch and counts each step's collectives.

Usage (under torchrun): accum_worker.py CASES.json OUT_DIR
Like parity_worker.py (rank 0 writes OUT_DIR/name.json and name.safetensors), plus
OUT_DIR/name.counts.json: per step, this rank's collectives by operation and in total (from
torch's flight recorder, switched on here before the process group exists).
"""
import json
import os

os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "4000")

import torch.distributed as dist  # noqa: E402

from harness import run_worker, train_and_save  # noqa: E402
from loomtrain.runtime.collectives import StepCollectives  # noqa: E402


def run_case(name: str, overrides: list[str], out_dir: str) -> None:
    counter = StepCollectives()
    try:
        train_and_save(name, overrides, out_dir, hooks=[counter])
    except Exception as exc:
        with open(os.path.join(out_dir, f"{name}.error"), "w", encoding="utf-8") as fh:
            fh.write(repr(exc))
        raise
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, f"{name}.counts.json"), "w", encoding="utf-8") as fh:
            json.dump([{"total": c.total, "p2p": c.p2p, "by_op": c.by_op, "by_group": c.by_group, "complete": c.complete}
                       for c in counter.counts], fh)


if __name__ == "__main__":
    run_worker(run_case)
