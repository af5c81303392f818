"""Where checkpoints go and which one a run resumes from; checks cheap enough for preflight
(directory listings and JSON, no tensor is read)."""
from __future__ import annotations

import os

from loomtrain.checkpoint import format as fmt
from loomtrain.errors import ConfigError


def checkpoint_root(cfg) -> str:
    """`checkpoint.dir`, by default `{train.output_dir}/checkpoints`."""
    return cfg.checkpoint.dir if cfg.checkpoint.dir is not None else os.path.join(cfg.train.output_dir, "checkpoints")


def saving_enabled(cfg) -> bool:
    """A run saves checkpoints when `checkpoint.every > 0` or `checkpoint.dir` is set."""
    return cfg.checkpoint.every > 0 or cfg.checkpoint.dir is not None


def is_checkpoint_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, fmt.MANIFEST_FILE))


def resume_candidates(cfg) -> tuple[list[tuple[int, str]], bool]:
    """Checkpoints to try, newest first, and whether the user named exactly one (then a damaged
    one is an error instead of a fallback). `resume=auto` with nothing committed yet -> []."""
    resume = cfg.checkpoint.resume
    if resume == "none":
        return [], False
    if resume == "auto":
        return fmt.list_committed(checkpoint_root(cfg)), False
    path = os.path.abspath(resume)
    if not os.path.exists(path):
        raise ConfigError(f"checkpoint.resume: no checkpoint at {resume} (path does not exist)")
    if is_checkpoint_dir(path):
        step = fmt.parse_step_dir(os.path.basename(path))
        return [(-1 if step is None else step, path)], True
    committed = fmt.list_committed(path)
    if committed:
        return committed, False
    if fmt.parse_step_dir(os.path.basename(path)) is not None or ".tmp-" in os.path.basename(path):
        raise ConfigError(f"checkpoint.resume: {resume} is not a committed checkpoint (no {fmt.MANIFEST_FILE}: "
                          "its save never finished)")
    raise ConfigError(f"checkpoint.resume: no committed checkpoint at {resume} (expected a step_NNNNNNNN "
                      f"directory with {fmt.MANIFEST_FILE}, or a checkpoint.dir holding such directories)")


def check_config(cfg) -> None:
    """Preflight: a resume path that holds no checkpoint, or a run that would start from scratch
    into a directory that already holds another run's checkpoints."""
    resume_candidates(cfg)
    if saving_enabled(cfg) and cfg.checkpoint.resume == "none":
        root = checkpoint_root(cfg)
        committed = fmt.list_committed(root)
        if committed:
            raise ConfigError(
                f"checkpoint.dir {root} already holds checkpoints (newest {os.path.basename(committed[0][1])}) "
                "but checkpoint.resume=none; set checkpoint.resume=auto to continue that run, or use another "
                "checkpoint.dir")
