"""`loomtrain bench` options: layouts, peers and the command's arguments. Imports nothing of torch,
so that `loomtrain bench --help` and usage errors stay instant.

A *layout* is a set of config overrides that one benchmark row runs under. It is given as a short
name (`zero0`..`zero3`, `ddp` = `zero0`; `+compile` for compiled blocks, e.g. `zero3+compile`) or as comma-separated `section.key=value` items
(`--layout parallel.zero=3,parallel.dp_replicate=2`), and is labelled by what was typed. The peers
(a plain FSDP2 loop, DeepSpeed, ...) run only layouts that are pure data parallelism at one ZeRO
stage, eager or compiled; any other layout is reported as skipped for them, with the reason.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from loomtrain.launch.spec import UsageError

SYSTEM = "loomtrain"
# Every peer `--vs` may name, in the order they run and are printed.
PEERS = ("fsdp2", "deepspeed", "hf", "torchtitan")
PEER_HELP = {
    "fsdp2": "a plain hand-written FSDP2 loop (fully_shard per block, same AdamW, same micro-batches)",
    "deepspeed": "DeepSpeed ZeRO-0/1/2/3 (deepspeed.initialize, gradient_accumulation_steps)",
    "hf": "HF Trainer / accelerate",
    "torchtitan": "torchtitan (its published package; CUDA only)",
}
_NAMED = {"ddp": 0, "zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3}
_ITEM = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)+=.*$")
# Keys a peer may see in a layout: anything else (tp, pp, cp, the hetero scheduler) is loomtrain's alone.
_PEER_KEYS = {"parallel.zero", "parallel.dp_shard", "parallel.compile"}


@dataclass(frozen=True)
class Layout:
    """One benchmark layout: its label and the overrides that select it."""

    name: str
    overrides: tuple[str, ...]

    def zero(self, default: int) -> int:
        """The ZeRO stage this layout asks for (the config's own when it does not say)."""
        for item in self.overrides:
            key, _, value = item.partition("=")
            if key == "parallel.zero":
                return int(value)
        return default

    def peer_reason(self) -> str | None:
        """Why a peer cannot run this layout (None when it can): peers do data parallelism only."""
        extra = [item.partition("=")[0] for item in self.overrides if item.partition("=")[0] not in _PEER_KEYS]
        if extra:
            return f"layout sets {', '.join(extra)}: the peers run data-parallel ZeRO stages only"
        return None


def parse_layout(text: str) -> Layout:
    """`zero2` | `zero3+compile` | `ddp` | `parallel.zero=3,parallel.dp_shard=-1` -> Layout (label =
    the text). `+compile` adds `parallel.compile=true` (every system compiles each decoder block)."""
    text = text.strip()
    base, plus, suffix = text.lower().partition("+")
    if base in _NAMED and (not plus or suffix == "compile"):
        return Layout(text.lower(), (f"parallel.zero={_NAMED[base]}",) + (("parallel.compile=true",) if plus else ()))
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items or any(not _ITEM.match(item) for item in items):
        raise UsageError(f"--layout '{text}': expected zero0..zero3 or ddp (+compile), or comma-separated "
                         "section.key=value overrides such as parallel.zero=3,parallel.tp=2")
    for item in items:
        key, _, value = item.partition("=")
        if key == "parallel.zero" and value not in ("0", "1", "2", "3"):
            raise UsageError(f"--layout '{text}': parallel.zero must be 0, 1, 2 or 3")
    return Layout(text, items)


def parse_layouts(texts: list[str] | None) -> list[Layout]:
    """The `--layout` options in order (labels must be unique); none = the config's own layout."""
    if not texts:
        return [Layout("config", ())]
    layouts = [parse_layout(t) for t in texts]
    names = [layout.name for layout in layouts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"--layout {dupes[0]} is given twice")
    return layouts


def parse_vs(value: str | None) -> list[str]:
    """`--vs` -> the peers to run: none without `--vs`, all with a bare `--vs`, or a comma list."""
    if value is None:
        return []
    if value in ("", "all"):
        return list(PEERS)
    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    names = ["fsdp2" if n in ("fsdp", "fsdp2") else n for n in names]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise UsageError(f"--vs {value}: unknown peer '{unknown[0]}' (peers: {', '.join(PEERS)}, or all)")
    return [p for p in PEERS if p in names]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `loomtrain bench` (the launch flags are added by the CLI, as for `run`)."""
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml|- key=value",
                   help="config file, then section.key=value overrides (as for 'loomtrain run')")
    p.add_argument("--layout", action="append", default=None, metavar="SPEC",
                   help="a layout to measure, repeatable: zero0|zero1|zero2|zero3|ddp, with +compile for compiled "
                        "blocks (zero3+compile), or comma-separated "
                        "overrides, e.g. --layout zero2 --layout parallel.zero=3,parallel.tp=2 "
                        "(default: the config's own layout)")
    p.add_argument("--vs", nargs="?", const="all", default=None, metavar="PEERS",
                   help="also run the same model and data through peers: --vs (every peer) or "
                        "--vs=fsdp2,deepspeed; peers: " + "; ".join(f"{k}: {v}" for k, v in PEER_HELP.items())
                        + ". A peer that is not installed is reported as skipped")
    p.add_argument("--steps", type=int, default=10, metavar="N", help="measured optimizer steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, metavar="N",
                   help="steps run first and left out of the figures (default 2)")
    p.add_argument("--repeat", type=int, default=1, metavar="R",
                   help="run every system R times, the order reversed every other round, and pool the steps "
                        "(evens out drift on a shared machine; default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--append", default=None, metavar="FILE.md",
                   help="also append a dated section (machine, versions, command, table) to FILE.md, "
                        "e.g. benchmarks/RESULTS.md")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="per-system results and worker logs (default {train.output_dir}/bench)")
    # Hidden: what the launcher passes to its workers.
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--plan", default=None, help=argparse.SUPPRESS)


def check_counts(steps: int, warmup: int, repeat: int = 1) -> None:
    if repeat < 1:
        raise UsageError(f"--repeat={repeat}: must be at least 1")
    if steps < 1:
        raise UsageError(f"--steps={steps}: must be at least 1")
    if warmup < 0:
        raise UsageError(f"--warmup={warmup}: must not be negative")
