"""Makes real DeepSpeed checkpoints for test_checkpoint_io.py (launched with torchrun, gloo, CPU).

    torchrun --nproc-per-node 3 tests/ds_worker.py OUT_DIR STAGE[:bf16] [STAGE[:bf16] ...]

For each ZeRO stage: a tiny HF Llama of the same geometry as loomtrain's test config (so the
import can be resumed by loomtrain), two AdamW groups (decay / no decay, as loomtrain builds them),
two optimizer steps on random tokens, `save_checkpoint(OUT_DIR/NAME, tag="global_step2")` where
NAME is `zeroS` (fp32) or `zeroS_bf16` (bf16 weights, fp32 master copy in the optimizer). Then
DeepSpeed's own views of that state, the references the importer is checked against:
OUT_DIR/NAME.live.safetensors (the live fp32 master weights, `safe_get_full_fp32_param`) and
OUT_DIR/NAME.fp32.safetensors (`get_fp32_state_dict_from_zero_checkpoint`). Rank 0 also converts
each checkpoint with DeepSpeed's `ds_to_universal` into OUT_DIR/NAME_universal/global_step2: the
universal format to import, and DeepSpeed's per-parameter exp_avg/exp_avg_sq to compare with
(its `safe_get_full_optimizer_state` loses the second parameter group's state under ZeRO-1/2 in
0.19, so it cannot serve as the reference).
"""
import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def tiny_llama():
    from harness import case
    from loomtrain.config import load_config
    from loomtrain.models.build import build_hf_config
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, case("llama"))
    hf = build_hf_config(cfg.model, vocab_size=258, seq_len=cfg.data.seq_len, eos_id=256)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(hf, dtype=torch.float32)


def run_stage(out: str, stage: int, bf16: bool) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    model = tiny_llama()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    ds_config = {"train_batch_size": 2 * dist.get_world_size(), "train_micro_batch_size_per_gpu": 2,
                 "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
                 "gradient_clipping": 1.0, "steps_per_print": 1000, "wall_clock_breakdown": False,
                 "bf16": {"enabled": bf16}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    gen = torch.Generator().manual_seed(100 + dist.get_rank())
    for _ in range(2):
        ids = torch.randint(0, 256, (ds_config["train_micro_batch_size_per_gpu"], 32), generator=gen)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    name = f"zero{stage}" + ("_bf16" if bf16 else "")
    ckpt_dir = os.path.join(out, name)
    engine.save_checkpoint(ckpt_dir, tag="global_step2")
    # The live fp32 master weights at save time (a collective under ZeRO-3).
    ref = {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in engine.module.named_parameters()}
    dist.barrier()
    if dist.get_rank() == 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        from safetensors.torch import save_file

        save_file(ref, os.path.join(out, f"{name}.live.safetensors"))
        offline = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag="global_step2")
        save_file({k: v.contiguous() for k, v in offline.items()}, os.path.join(out, f"{name}.fp32.safetensors"))
        from deepspeed.checkpoint.ds_to_universal import main as to_universal

        args = argparse.Namespace(input_folder=os.path.join(ckpt_dir, "global_step2"),
                                  output_folder=os.path.join(out, f"{name}_universal", "global_step2"),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                  strict=True, inject_missing_state=True)
        to_universal(args)
    dist.barrier()
    engine.destroy()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("stages", nargs="+", help="ZeRO stages, e.g. 1 2 3 2:bf16")
    args = p.parse_args()
    import importlib

    import deepspeed

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at start (a C++ build of
    # about a minute, and a compiler needed); gloo alone is all these runs need. (By module path:
    # the attribute `deepspeed.comm.torch` is the torch package itself.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    for spec in args.stages:
        stage, _, dtype = spec.partition(":")
        run_stage(args.out, int(stage), dtype == "bf16")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
