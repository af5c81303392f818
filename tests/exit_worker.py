"""Under torchrun: a run whose data fails on every rank after step 4 must commit step 4 (the
ranks agree through the job's store, not a collective). Twice: once with the process group
created by the Trainer, once with one the caller created.

Usage: exit_worker.py OUT_DIR OVERRIDE...
"""
import json
import os
import sys

import torch.distributed as dist

from loomtrain.checkpoint import format as fmt
from loomtrain.config import load_config
from loomtrain.runtime.trainer import Trainer


def run(out: str, overrides: list[str]) -> list[int]:
    trainer = Trainer(load_config(None, overrides + [f"train.output_dir={out}", f"checkpoint.dir={out}/ck"]))
    trainer.setup()
    real = trainer.loader.next_step

    def failing():
        if trainer.step == 4:
            raise RuntimeError("injected data failure")
        return real()

    trainer.loader.next_step = failing
    try:
        trainer.fit()
    except RuntimeError:
        pass
    committed = [s for s, _ in fmt.list_committed(f"{out}/ck")]
    trainer.close()
    return committed


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    result = {"trainer_group": run(os.path.join(out, "own"), overrides)}
    dist.init_process_group("gloo")
    result["caller_group"] = run(os.path.join(out, "caller"), overrides)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "exit.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
