"""Shared helpers for the multi-process parity tests: tiny model configs, launching torchrun,
the single-process reference, and the comparison with the tolerances the issues ask for."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-4

# A tiny Llama and friends; data is synthetic long-tailed documents packed into rows, so document
# masks and per-document position ids are exercised by every parity test.
TINY = {
    "llama": ["model.architecture=llama", "model.config.hidden_size=64", "model.config.intermediate_size=128",
              "model.config.num_hidden_layers=2", "model.config.num_attention_heads=4",
              "model.config.num_key_value_heads=2"],
    "mistral": ["model.architecture=mistral", "model.config.hidden_size=64", "model.config.intermediate_size=128",
                "model.config.num_hidden_layers=2", "model.config.num_attention_heads=4",
                "model.config.num_key_value_heads=2"],
    "qwen2": ["model.architecture=qwen2", "model.config.hidden_size=64", "model.config.intermediate_size=128",
              "model.config.num_hidden_layers=2", "model.config.num_attention_heads=4",
              "model.config.num_key_value_heads=2"],
    "gpt2": ["model.architecture=gpt2", "model.config.n_embd=64", "model.config.n_layer=2", "model.config.n_head=4",
             "model.config.n_positions=64", "model.config.resid_pdrop=0.0", "model.config.embd_pdrop=0.0",
             "model.config.attn_pdrop=0.0"],
}
# what torchrun sets in a worker: a test run inside one (or after one) must not pass it on to the
# launches it starts, or they would take themselves for workers of the outer job
TORCHRUN_ENV = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "LOCAL_RANK", "RANK", "WORLD_SIZE",
                "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOOMTRAIN_LAUNCHER")


def launch_env() -> dict:
    """The environment for a `python -m loomtrain.launch ...` child: the repository on the path,
    one thread per rank, and nothing of an outer torchrun job."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV and not k.startswith("PET_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    return env


BASE = ["data.source=synthetic", "data.lengths=longtail", "data.seq_len=32", "data.global_batch_size=8",
        "data.micro_batch_size=2", "train.max_steps=5", "train.progress=false", "train.tensorboard=false",
        "train.peak_tflops=1.0", "optim.lr=0.003", "optim.warmup_steps=2"]


def case(model: str = "llama", *extra: str) -> list[str]:
    return TINY[model] + BASE + list(extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cases(nproc: int, cases: dict[str, list[str]], out_dir: str, timeout: int = 600,
              worker: str = "parity_worker.py") -> None:
    """Run every case in one torchrun launch of `nproc` gloo ranks of `worker` (a script in tests/
    taking CASES.json OUT_DIR); raise with the log on failure. A worker that records a case's
    exception in OUT_DIR/name.error and goes on gets those names listed if the launch times out
    (a case that raised on some ranks only leaves the others waiting)."""
    os.makedirs(out_dir, exist_ok=True)
    cases_path = os.path.join(out_dir, "cases.json")
    with open(cases_path, "w", encoding="utf-8") as fh:
        json.dump(cases, fh)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
           os.path.join(ROOT, "tests", worker), cases_path, out_dir]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        errors = sorted(f for f in os.listdir(out_dir) if f.endswith(".error"))
        raise AssertionError(f"torchrun timed out after {timeout} s; cases that raised: {errors}") from None
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


def save_result(out_dir: str, name: str, result, params: dict[str, torch.Tensor]) -> None:
    """What a worker's rank 0 writes for one case; `load_result` reads it back."""
    with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as fh:
        json.dump({"losses": result.losses, "grad_norms": result.grad_norms}, fh)
    save_file({k: v.contiguous() for k, v in params.items()}, os.path.join(out_dir, f"{name}.safetensors"))


def train_and_save(name: str, overrides: list[str], out_dir: str, hooks=()):
    """One case of a multi-case worker: train it (with `hooks` added), and rank 0 writes its
    losses and final parameters with `save_result`; returns the Trainer."""
    import torch.distributed as dist
    from loomtrain.config import load_config
    from loomtrain.runtime.trainer import Trainer

    trainer = Trainer(load_config(None, overrides + [f"train.output_dir={os.path.join(out_dir, name)}"]))
    for hook in hooks:
        trainer.add_hook(hook)
    result = trainer.fit()
    params = trainer.full_state_dict()
    if dist.get_rank() == 0:
        save_result(out_dir, name, result, params)
    return trainer


def run_worker(run_case) -> None:
    """The body of a worker script under torchrun (`worker.py CASES.json OUT_DIR`): one gloo
    process group, `run_case(name, overrides, out_dir)` for every case, a barrier after each."""
    import torch.distributed as dist

    cases_path, out_dir = sys.argv[1], sys.argv[2]
    with open(cases_path, encoding="utf-8") as fh:
        cases = json.load(fh)
    dist.init_process_group("gloo")
    for name, overrides in cases.items():
        run_case(name, overrides, out_dir)
        dist.barrier()
    dist.destroy_process_group()


def load_result(out_dir: str, name: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    with open(os.path.join(out_dir, f"{name}.json"), encoding="utf-8") as fh:
        losses = json.load(fh)["losses"]
    return losses, load_file(os.path.join(out_dir, f"{name}.safetensors"))


def reference(overrides: list[str], out_dir: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same config trained in this process, with no process group at all."""
    from loomtrain.config import load_config
    from loomtrain.runtime.trainer import Trainer

    trainer = Trainer(load_config(None, overrides + [f"train.output_dir={out_dir}"]))
    result = trainer.fit()
    return result.losses, trainer.full_state_dict()


def assert_parity(got: tuple, ref: tuple, what: str) -> None:
    """Losses equal to relative 1e-5 at every step; final parameters to 1e-4 absolute."""
    losses, params = got
    ref_losses, ref_params = ref
    assert len(losses) == len(ref_losses), f"{what}: {len(losses)} steps vs {len(ref_losses)}"
    for step, (a, b) in enumerate(zip(losses, ref_losses), start=1):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"{what}: step {step} loss {a!r} vs reference {b!r}"
    assert set(params) == set(ref_params), f"{what}: parameter names differ: {set(params) ^ set(ref_params)}"
    for name, ref_t in ref_params.items():
        diff = (params[name].float() - ref_t.float()).abs().max().item()
        assert diff <= PARAM_ATOL, f"{what}: parameter {name} differs by {diff:.3g} (> {PARAM_ATOL})"
    # Training must actually have moved the weights and the loss, or parity would prove nothing.
    assert ref_losses[-1] < ref_losses[0], f"{what}: reference loss did not fall: {ref_losses}"
