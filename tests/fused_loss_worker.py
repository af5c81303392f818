"""Fused-loss cases in one torchrun launch: `kernel_*` cases run the vocabulary-parallel kernel
on this rank's rows of a head and save what each rank got; every other case trains like
parity_worker.py. Usage (under torchrun): fused_loss_worker.py CASES.json OUT_DIR

A kernel case is {"kernel_name": ["tokens=N", "dim=D", "vocab=V", "chunk=C", "scale=S", "softcap=X"]};
its inputs come from `kernel_inputs` (seeded), so the test process rebuilds them for the reference.
"""
import json
import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from harness import run_worker, train_and_save
from loomtrain.kernels.fused_loss import LogitTransform, VocabShard, fused_linear_cross_entropy


def kernel_spec(args: list[str]) -> dict:
    spec = dict(a.split("=", 1) for a in args)
    return {"tokens": int(spec["tokens"]), "dim": int(spec["dim"]), "vocab": int(spec["vocab"]),
            "chunk": int(spec.get("chunk", 0)),
            "transform": LogitTransform(float(spec.get("scale", 1.0)), float(spec["softcap"]) if "softcap" in spec else None)}


def kernel_inputs(spec: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [2, tokens, dim], weight [vocab, dim], labels [2, tokens] with every third ignored."""
    g = torch.Generator().manual_seed(spec["tokens"] * 7 + spec["vocab"])
    hidden = torch.randn(2, spec["tokens"], spec["dim"], generator=g)
    weight = torch.randn(spec["vocab"], spec["dim"], generator=g) * 0.5
    labels = torch.randint(0, spec["vocab"], (2, spec["tokens"]), generator=g)
    labels[:, ::3] = -100
    return hidden, weight, labels


def run_kernel(name: str, args: list[str], out_dir: str) -> None:
    spec = kernel_spec(args)
    hidden, weight, labels = kernel_inputs(spec)
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = -(-spec["vocab"] // world)  # torch.chunk's split, as a DTensor Shard(0) head has it
    start = min(rank * rows, spec["vocab"])
    local_w = weight[start:start + rows].clone().requires_grad_(True)
    hidden.requires_grad_(True)
    loss = fused_linear_cross_entropy(hidden, local_w, labels, transform=spec["transform"],
                                      chunk_tokens=spec["chunk"], shard=VocabShard(dist.group.WORLD, start))
    (loss * 0.5).backward()
    save_file({"loss": loss.detach().reshape(1), "grad_hidden": hidden.grad, "grad_weight": local_w.grad,
               "start": torch.tensor([start])}, os.path.join(out_dir, f"{name}.rank{rank}.safetensors"))


def run_case(name: str, overrides: list[str], out_dir: str) -> None:
    if name.startswith("kernel_"):
        run_kernel(name, overrides, out_dir)
    else:
        trainer = train_and_save(name, overrides, out_dir)
        # Which loss ran: the path, and under pipelining whether this rank's last stage handed the
        # schedule's loss its final hidden states (the fused head) rather than logits.
        stages = trainer.pipeline.stages if trainer.pipeline is not None else []
        with open(os.path.join(out_dir, f"{name}.loss.rank{dist.get_rank()}.json"), "w", encoding="utf-8") as fh:
            json.dump({"path": trainer.loss_choice.path,
                       "last_stage_hidden": [bool(st.submod.extra) for st in stages if st.is_last]}, fh)


if __name__ == "__main__":
    run_worker(run_case)
