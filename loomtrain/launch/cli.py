"""The `loomtrain` command line (console script `loomtrain.launch.cli:main`, or `python -m loomtrain.launch`).

    loomtrain run [CONFIG.yaml|-] [section.key=value ...] [--nproc-per-node N] [--nnodes N|MIN:MAX]
                  [--node-rank R] [--rdzv-endpoint HOST:PORT] [--rdzv-id ID] [--max-restarts K]
    loomtrain report RUN_DIR [--plot]
    loomtrain ckpt inspect|verify|export-hf|import-deepspeed ...   (see launch/ckpt.py)

`run` validates the config (`load_config` + `preflight`) and then starts the workers through torch's
elastic agent (see `agent.py`); each worker runs `python -m loomtrain.launch run CONFIG [overrides]`,
sees the env torchrun sets and trains (`Trainer(cfg).fit()`) instead of launching again. The same
happens under a user's own `torchrun -m loomtrain.launch run ...`.

Errors the user can fix (`LoomError`) end in one line `loomtrain: error: <message>` and exit code 2
(1 when a worker raised it, with `rank R:` in front). Nothing here imports torch until it launches,
so `--help` and config errors are instant.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass

from loomtrain.errors import LoomError

COMMANDS = {
    "run": "train: validate CONFIG.yaml, then start the workers (or train, inside a worker)",
    "report": "summarize RUN_DIR/metrics.jsonl (steps, loss, tokens/s, MFU, memory); --plot draws it",
    "plan": "predict step times of static, best single-degree and heterogeneous sequence parallelism",
    "ckpt": "checkpoint tools: inspect, verify, export-hf, import-deepspeed",
}
_WORKER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE")
_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)+=")


class UsageError(LoomError):
    """Bad command-line usage (printed as one line, exit code 2, like any LoomError)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage+error, as one `loomtrain: error:` line
        raise UsageError(f"{message} (see '{self.prog} --help')")


def in_worker(env=None) -> bool:
    """True when torchrun (ours or the user's) started this process."""
    env = os.environ if env is None else env
    return any(name in env for name in _WORKER_ENV)


# ----------------------------------------------------------------------------------- parsing
def _top_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="loomtrain", description="loomtrain: distributed training of HF causal LMs.",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Run 'loomtrain COMMAND --help' for the options of one command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    return p


def _add_launch_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launch (torchrun elastic agent)")
    g.add_argument("--nproc-per-node", "--nproc_per_node", default="1", metavar="N",
                   help="worker processes per node: an int, or auto|cpu|gpu (default 1)")
    g.add_argument("--nnodes", default="1", metavar="N|MIN:MAX", help="number of nodes (default 1)")
    g.add_argument("--node-rank", "--node_rank", type=int, default=None, metavar="R",
                   help="this node's rank (static rendezvous; needs a fixed --nnodes)")
    g.add_argument("--rdzv-endpoint", "--rdzv_endpoint", default=None, metavar="HOST:PORT",
                   help="rendezvous endpoint (required for more than one node; "
                        "default for one node: 127.0.0.1:<free port>)")
    g.add_argument("--rdzv-id", "--rdzv_id", default=None, metavar="ID", help="rendezvous/job id")
    g.add_argument("--max-restarts", "--max_restarts", type=int, default=0, metavar="K",
                   help="restart the worker group up to K times on failure (default 0)")
    g.add_argument("--log-dir", default=None, metavar="DIR",
                   help="per-rank logs (default: {train.output_dir}/logs)")
    g.add_argument("-v", "--verbose", action="store_true", help="show the elastic agent's own logs")


def _command_parser(command: str) -> argparse.ArgumentParser:
    if command == "run":
        p = _Parser(prog="loomtrain run",
                    usage="loomtrain run [CONFIG.yaml|-] [section.key=value ...] [options]",
                    description=COMMANDS["run"] + ". CONFIG may be omitted or '-' (all defaults); "
                    "overrides are dotted keys, e.g. train.max_steps=5 model.config.hidden_size=64. "
                    "Options may come before or after the config and the overrides.",
                    epilog="other commands: " + ", ".join(c for c in COMMANDS if c != "run")
                    + " (loomtrain --help lists them)")
        p.add_argument("args", nargs="*", metavar="CONFIG.yaml|- key=value",
                       help="config file, then overrides")
        _add_launch_flags(p)
    elif command == "report":
        p = _Parser(prog="loomtrain report", description=COMMANDS["report"])
        p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (or its metrics.jsonl)")
        p.add_argument("--plot", action="store_true", help="also draw the curves to a PNG")
        p.add_argument("--png", default=None, metavar="PATH",
                       help="where --plot writes (default RUN_DIR/metrics.png)")
    elif command == "plan":  # options and body live in launch/plan.py
        from loomtrain.launch.plan_command import add_arguments

        p = _Parser(prog="loomtrain plan", description=COMMANDS["plan"])
        add_arguments(p)
    elif command == "ckpt":  # actions, options and bodies live in launch/ckpt.py
        from loomtrain.launch.ckpt_command import make_parser

        p = make_parser(_Parser)
    elif command == "_selfcheck":  # hidden: a 2-line torchrun smoke test, used by tests
        p = _Parser(prog="loomtrain _selfcheck")
        p.add_argument("--fail-rank", type=int, default=None, help="this rank raises a LoomError")
        p.add_argument("--crash-rank", type=int, default=None, help="this rank raises RuntimeError")
        _add_launch_flags(p)
    else:
        raise UsageError(f"unknown command '{command}' (commands: {', '.join(COMMANDS)})")
    return p


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG|-] [overrides]` -> (config path or None, overrides)."""
    if args and (args[0] == "-" or not _OVERRIDE.match(args[0])):
        config, overrides = args[0], args[1:]
    else:
        config, overrides = None, list(args)
    for item in overrides:
        if not _OVERRIDE.match(item):
            raise UsageError(f"'{item}' is not an override of the form section.key=value "
                             "(only one CONFIG file may be given, and it comes first)")
    return (None if config == "-" else config), overrides


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a full command line (without the program name); `.command` names the subcommand."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help(None if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    if argv[0].startswith("-") and argv[0] != "-":
        raise UsageError(f"expected a command first ({', '.join(COMMANDS)}), got '{argv[0]}'")
    command = argv[0]
    ns = _command_parser(command).parse_intermixed_args(argv[1:])
    ns.command = command
    if command == "run":
        ns.config, ns.overrides = split_config_args(ns.args)
    return ns


# --------------------------------------------------------------------------------------- run
def _preflight(cfg, world_size: int) -> None:
    try:
        from loomtrain.runtime.preflight import preflight
    except ModuleNotFoundError as exc:
        if exc.name not in ("loomtrain.runtime.preflight", "loomtrain.runtime", "loomtrain"):
            raise
        # runtime.preflight not there (yet): at least the layout must fit the world size.
        from loomtrain.config import resolve_degrees

        resolve_degrees(cfg.parallel, world_size)
        return
    preflight(cfg, world_size=world_size)


def _local_world_size(nproc: str) -> int:
    try:
        n = int(nproc)
    except ValueError:
        if nproc not in ("auto", "cpu", "gpu"):
            raise UsageError(f"--nproc-per-node={nproc}: expected an int, auto, cpu or gpu") from None
        from torch.distributed.run import determine_local_world_size

        try:
            n = determine_local_world_size(nproc)
        except ValueError as exc:
            raise UsageError(f"--nproc-per-node={nproc}: {exc}") from None
    if n < 1:
        raise UsageError(f"--nproc-per-node={nproc}: must be at least 1")
    return n


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class LaunchSpec:
    """The launch flags, checked (see `agent.torchrun_argv` for how they become torchrun's)."""

    nproc_per_node: int
    nnodes: str = "1"  # N or MIN:MAX
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    max_restarts: int = 0
    log_dir: str | None = None
    verbose: bool = False


def _launch_spec(ns: argparse.Namespace, default_log_dir: str | None):
    """Check the launch flags (before any config work) -> (LaunchSpec, world size to plan for)."""
    nproc = _local_world_size(ns.nproc_per_node)
    min_nodes, max_nodes = parse_nnodes(ns.nnodes)
    if max_nodes > 1 and not ns.rdzv_endpoint:
        raise UsageError(f"--nnodes={ns.nnodes}: more than one node needs --rdzv-endpoint HOST:PORT")
    if ns.node_rank is not None and min_nodes != max_nodes:
        raise UsageError("--node-rank needs a fixed --nnodes N (elastic MIN:MAX ranks nodes itself)")
    if ns.max_restarts < 0:
        raise UsageError(f"--max-restarts={ns.max_restarts}: must not be negative")
    spec = LaunchSpec(nproc_per_node=nproc, nnodes=ns.nnodes, node_rank=ns.node_rank,
                      rdzv_endpoint=ns.rdzv_endpoint, rdzv_id=ns.rdzv_id,
                      max_restarts=ns.max_restarts, log_dir=ns.log_dir or default_log_dir,
                      verbose=ns.verbose)
    return spec, nproc * min_nodes


def parse_nnodes(nnodes: str) -> tuple[int, int]:
    parts = str(nnodes).split(":")
    try:
        lo, hi = int(parts[0]), int(parts[-1])
    except ValueError:
        lo = hi = 0
    if len(parts) > 2 or not 0 < lo <= hi:
        raise UsageError(f"--nnodes={nnodes}: expected N or MIN:MAX with 0 < MIN <= MAX")
    return lo, hi


def _set_omp_threads(nproc: int) -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, _cpu_count() // nproc))


def _train(config: str | None, overrides: list[str]) -> None:
    """Worker body of `run`: load the config and train (the Trainer runs `preflight` itself)."""
    from loomtrain.config import load_config
    from loomtrain.runtime.trainer import Trainer

    Trainer(load_config(config, overrides)).fit()


def cmd_run(ns: argparse.Namespace) -> int:
    if in_worker():
        from loomtrain.launch.agent import worker_main

        return worker_main(_train, ns.config, ns.overrides)
    from loomtrain.config import load_config

    cfg = load_config(ns.config, ns.overrides)
    spec, world_size = _launch_spec(ns, os.path.join(cfg.train.output_dir, "logs"))
    _preflight(cfg, world_size=world_size)
    _set_omp_threads(spec.nproc_per_node)
    from loomtrain.launch.agent import launch

    return launch(spec, ["run", ns.config or "-", *ns.overrides])


def cmd_selfcheck(ns: argparse.Namespace) -> int:
    if in_worker():
        from loomtrain.launch.agent import selfcheck, worker_main

        return worker_main(selfcheck, ns.fail_rank, ns.crash_rank)
    worker_args = ["_selfcheck"]
    if ns.fail_rank is not None:
        worker_args += ["--fail-rank", str(ns.fail_rank)]
    if ns.crash_rank is not None:
        worker_args += ["--crash-rank", str(ns.crash_rank)]
    spec, _ = _launch_spec(ns, None)
    _set_omp_threads(spec.nproc_per_node)
    from loomtrain.launch.agent import launch

    return launch(spec, worker_args)


# ------------------------------------------------------------------------------------ report
def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise LoomError(f"no metrics file at {path} (is this a run's train.output_dir?)")
    rows, bad = [], 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1  # e.g. a line cut short by a crash
                continue
            if isinstance(row, dict):
                rows.append(row)
    if not rows:
        raise LoomError(f"{path}: no metrics records" + (f" ({bad} unreadable lines)" if bad else ""))
    return rows


def _values(rows: list[dict], key: str) -> list[float]:
    out = []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def summarize(rows: list[dict]) -> list[tuple[str, str]]:
    """(label, value) rows: steps, first/last loss, mean tokens/s and MFU, peak memory.

    A resumed run may log a step twice; the later record wins. Means leave out the first step
    (start-up, allocator warm-up) when there are more.
    """
    by_step: dict = {}
    for i, row in enumerate(rows):
        step = row.get("step", i + 1)
        by_step.pop(step, None)
        by_step[step] = row
    rows = list(by_step.values())
    steps = _values(rows, "step")
    losses = [(r.get("step", "?"), float(r["loss"])) for r in rows
              if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    timed = rows[1:] if len(rows) > 1 else rows
    tps, mfu = _values(timed, "tokens_per_s"), _values(timed, "mfu")
    mem = _values(rows, "peak_mem_gb")
    na, note = "n/a", " (first step excluded)" if len(rows) > 1 else ""
    span = f" (step {int(min(steps))} to {int(max(steps))})" if steps else ""
    return [
        ("steps", f"{len(rows)}{span}"),
        ("loss first", f"{losses[0][1]:.4f} (step {losses[0][0]})" if losses else na),
        ("loss last", f"{losses[-1][1]:.4f} (step {losses[-1][0]})" if losses else na),
        ("tokens/s mean", f"{sum(tps) / len(tps):,.0f}{note}" if tps else na),
        # `mfu` is a fraction; a value above 1 can only be a percentage already
        ("MFU mean", (f"{sum(mfu) / len(mfu) * (100 if max(mfu) <= 1.0 else 1):.2f}%{note}"
                      if mfu else na)),
        ("peak memory", f"{max(mem):.2f} GB" if mem else na),
    ]


def cmd_report(ns: argparse.Namespace) -> int:
    run_dir = ns.run_dir
    jsonl = run_dir if os.path.isfile(run_dir) else os.path.join(run_dir, "metrics.jsonl")
    rows = read_metrics(jsonl)
    print(f"run: {os.path.dirname(os.path.abspath(jsonl))}")
    table = summarize(rows)
    width = max(len(k) for k, _ in table)
    for key, value in table:
        print(f"  {key:<{width}}  {value}")
    if ns.plot:
        png = ns.png or os.path.join(os.path.dirname(jsonl) or ".", "metrics.png")
        try:
            from loomtrain.runtime.metrics import plot_metrics
        except ImportError as exc:
            raise LoomError(f"--plot is not available: {exc}") from None
        out = plot_metrics(jsonl, png)
        print(f"plot: {out if isinstance(out, (str, os.PathLike)) else png}")
    return 0


def cmd_ckpt(ns: argparse.Namespace) -> int:  # body in launch/ckpt.py
    from loomtrain.launch.ckpt_command import cmd_ckpt as ckpt

    return ckpt(ns)


def cmd_plan(ns: argparse.Namespace) -> int:  # body in launch/plan.py (numpy, no torch)
    from loomtrain.launch.plan_command import cmd_plan as plan

    return plan(ns)


# -------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        ns = parse_args(argv)
        handler = {"run": cmd_run, "report": cmd_report, "_selfcheck": cmd_selfcheck,
                   "plan": cmd_plan, "ckpt": cmd_ckpt}[ns.command]
        return handler(ns)
    except LoomError as exc:
        msg = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        print(f"loomtrain: error: {msg}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("loomtrain: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
