"""Runs several training cases in one torchrun launch and counts each step's collectives.

Usage (under torchrun): accum_worker.py CASES.json OUT_DIR
Like parity_worker.py (rank 0 writes OUT_DIR/name.json and name.safetensors), plus
OUT_DIR/name.counts.json: per step, this rank's collectives by operation and in total (from
torch's flight recorder, switched on here before the process group exists).
"""
import json
import os
import sys

os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "4000")

import torch.distributed as dist  # noqa: E402

from harness import save_result  # noqa: E402
from loomtrain.config import load_config  # noqa: E402
from loomtrain.runtime.collectives import StepCollectives  # noqa: E402
from loomtrain.runtime.trainer import Trainer  # noqa: E402


def main() -> None:
    cases_path, out_dir = sys.argv[1], sys.argv[2]
    with open(cases_path, encoding="utf-8") as fh:
        cases = json.load(fh)
    dist.init_process_group("gloo")
    for name, overrides in cases.items():
        try:
            cfg = load_config(None, overrides + [f"train.output_dir={os.path.join(out_dir, name)}"])
            trainer = Trainer(cfg)
            counter = trainer.add_hook(StepCollectives())
            result = trainer.fit()
            params = trainer.full_state_dict()
        except Exception as exc:
            with open(os.path.join(out_dir, f"{name}.error"), "w", encoding="utf-8") as fh:
                fh.write(repr(exc))
            raise
        if dist.get_rank() == 0:
            save_result(out_dir, name, result, params)
            with open(os.path.join(out_dir, f"{name}.counts.json"), "w", encoding="utf-8") as fh:
                json.dump([{"total": c.total, "p2p": c.p2p, "by_op": c.by_op, "by_group": c.by_group, "complete": c.complete}
                           for c in counter.counts], fh)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
