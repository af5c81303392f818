"""`StragglerMonitor`: per-rank timing each step, one side-group all-gather per window, and the
detector's findings reported to the console, `{train.output_dir}/events.jsonl` and the summary.

What is measured, and why:

* compute: the training thread's CPU time over the step (`clock.compute_cpu_s` says why that
  clock), minus the CPU time spent fetching data. It is divided by the rank's work (1 for packed rows, which every rank gets alike; the
  heterogeneous planner's predicted seconds for the rank's groups), so uneven work by design is
  not mistaken for a slow rank; pipeline stages, whose work differs by design, are compared only
  within themselves.
* data wait: timed separately (`TimedLoader`), reported as evidence, never blamed on compute.
* links: every window each mesh dimension's groups are probed at once (one barrier on the side
  group, then `probe_reps` small all-reduces; the minimum counts, which drops scheduling noise),
  and a group's figure is the median over its members.

Each rank reduces a window to one compute rate (`window_rate`: the lower quartile of its steps,
as a GC pause or a noisy neighbour only ever adds time; the ratio of sums when its work varies by
step) and the median of the other figures; the first `warmup_steps` steps and steps that saved a checkpoint are left out. The
figures travel in one all-gather on a gloo group of their own, so nothing is added to the
training collectives; every rank runs `Detector` on the same table (so that under
`resilience.straggler=rebalance` every rank reaches the same speed factors, `rebalance.py`),
rank 0 reports. The window's per-step figures of every rank (compute, wall, work) ride in the same
all-gather into `straggler_windows.jsonl`, for `loomtrain report --plot`'s heat-map; the first
step planned with new speed factors is left out of the statistics. Active at 3+ ranks on CPU (CUDA work is not in
process CPU time: on CUDA the monitor says so and stays off). Under `resilience.straggler=restart`
a reported straggler whose node is worth excluding (`restart.restart_worth_it`) stops the loop
on every rank at once; `restart.leave_for_restart` then takes the job to the elastic agent.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

from loomtrain.config import ResilienceConfig
from loomtrain.hooks import Hook, LoopState
from loomtrain.parallel.hetero.plan_types import Plan
from loomtrain.resilience.detect import DetectConfig, Detector, Finding, low_quartile
from loomtrain.resilience.clock import compute_cpu_s
from loomtrain.resilience.faults import Faults
from loomtrain.resilience.rebalance import Rebalancer, eased_factors, speed_factors
from loomtrain.resilience.restart import RENDEZVOUS_S, RestartPlan, process_age_s, straggler_restart


class TimedLoader:
    """The data loader with the time this rank spends fetching batches counted (wall and CPU);
    everything else is the loader's own."""

    def __init__(self, loader):
        self._loader = loader
        self.wait_s = 0.0
        self.cpu_s = 0.0

    def _timed(self, fn):
        wall, cpu = time.perf_counter(), compute_cpu_s()
        try:
            return fn()
        finally:
            self.wait_s += time.perf_counter() - wall
            self.cpu_s += compute_cpu_s() - cpu

    def next_step(self):
        return self._timed(self._loader.next_step)

    def next_sequences(self):
        return self._timed(self._loader.next_sequences)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def hetero_work(plan: Plan | None, index: int) -> float:
    """Predicted seconds of the groups rank `index` (of the planner's pool) runs in `plan`."""
    if plan is None:
        return 1.0
    return sum(g.time for step in plan.steps for g in step.groups if g.start <= index < g.start + g.degree)


def mesh_groups(root) -> list[tuple[str, tuple[int, ...]]]:
    """Every group of every mesh dimension of size > 1, as (dimension, ranks), in mesh order."""
    if root is None:
        return []
    table = root.mesh
    out = []
    for d, name in enumerate(root.mesh_dim_names):
        if table.shape[d] > 1:
            rows = table.movedim(d, -1).reshape(-1, table.shape[d])
            out += [(name, tuple(sorted(int(r) for r in row.tolist()))) for row in rows]
    return out


def window_rate(cpu, work) -> float:
    """A window's compute seconds per unit of work. Same work every step (packed rows): the lower
    quartile of the steps, since interference only adds time. Work that varies by step (the
    heterogeneous planner's): the ratio of the sums, since then the planner's per-step prediction
    error, which averages out over a window, is what spreads single steps."""
    pairs = [(c, w) for c, w in zip(cpu, work) if w > 0]
    if not pairs:
        return float("nan")
    if max(w for _, w in pairs) - min(w for _, w in pairs) <= 1e-9 * max(w for _, w in pairs):
        return low_quartile([c / w for c, w in pairs])
    return sum(c for c, _ in pairs) / sum(w for _, w in pairs)


def stage_cohorts(root) -> list[tuple[int, ...]] | None:
    """Under pipeline parallelism, the ranks of each stage: only they do the same work."""
    if root is None or "pp" not in root.mesh_dim_names:
        return None
    table = root.mesh
    d = root.mesh_dim_names.index("pp")
    if table.shape[d] == 1:
        return None
    return [tuple(sorted(int(r) for r in table.select(d, i).flatten().tolist())) for i in range(table.shape[d])]


def _rounded(table: torch.Tensor) -> list[list[float | None]]:
    """Per rank, per step, rounded for the JSON line (NaN, which JSON lacks, as null)."""
    return [[round(v, 6) if v == v else None for v in row] for row in table.tolist()]


class StragglerMonitor(Hook):
    """See the module docstring. `work` returns this rank's work in the step just run."""

    def __init__(self, cfg: ResilienceConfig, *, rank: int, world_size: int, device_type: str, mesh_root,
                 output_dir: str, is_main: bool, work: Callable[[], float], loader: TimedLoader,
                 faults: Faults, checkpoint_every: int, rebalancer: Rebalancer | None = None):
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.active = (cfg.straggler != "off" and world_size >= 3 and device_type == "cpu"
                       and dist.is_initialized())
        self.cuda_off = cfg.straggler != "off" and world_size >= 3 and device_type != "cpu"
        self.mesh_root, self.output_dir, self.is_main = mesh_root, output_dir, is_main
        self.work, self.loader, self.faults, self.ckpt_every = work, loader, faults, checkpoint_every
        self.side = None
        self.groups: list[tuple[str, tuple[int, ...]]] = []
        self.dims: list[tuple[str, object, tuple[int, ...]]] = []  # (name, my group, its ranks)
        self.hosts: list[str] = []
        self.nodes: list[str] = []  # each rank's node (torchelastic's GROUP_RANK), for the restart policy
        self.startup_s: float | None = None  # process start to the first step: what a restart repeats
        self.restart: tuple[Finding, RestartPlan, list[int]] | None = None
        self.own_s, self.span = 0.0, [0.0, 0.0]  # the monitor's own seconds; the loop's first and last instant
        self.detector: Detector | None = None
        self.samples: list[tuple[float, float, float, float]] = []
        self.trace: list[tuple[int, float, float, float]] = []  # every step: (step, compute, wall, work)
        self.findings: list[tuple[int, Finding]] = []
        self.rebalancer = rebalancer if cfg.straggler == "rebalance" else None
        self.replan_step = 0  # the first step planned with new speed factors: left out of the statistics
        self.windows = 0
        self._start = (0.0, 0.0, 0.0, 0.0, None)
        self._end = (0.0, 0.0)

    # ---------------------------------------------------------------- hook points
    def after_setup(self, loop: LoopState) -> None:
        if self.cuda_off and self.is_main:
            print("loomtrain: straggler monitor off on CUDA (process CPU time does not measure GPU work)",
                  flush=True)
        if not self.active:
            return
        self.side = dist.new_group(backend="gloo")
        pairs = [None] * self.world
        host = socket.gethostname()
        dist.all_gather_object(pairs, (host, os.environ.get("GROUP_RANK", host)), group=self.side)
        self.hosts, self.nodes = [h for h, _ in pairs], [str(n) for _, n in pairs]
        self.groups = mesh_groups(self.mesh_root)
        if self.mesh_root is not None:
            for name in self.mesh_root.mesh_dim_names:
                if self.mesh_root[name].size() > 1:
                    group = self.mesh_root[name].get_group()
                    self.dims.append((name, group, tuple(sorted(dist.get_process_group_ranks(group)))))
        self.detector = Detector(groups=[ranks for _, ranks in self.groups],
                                 cfg=DetectConfig(min_slowdown=self.cfg.min_slowdown,
                                                 link_floor_s=self.cfg.link_floor_s),
                                 cohorts=stage_cohorts(self.mesh_root))
        if self.rebalancer is not None:
            self.rebalancer.setup(self.side, self.world)

    def before_step(self, loop: LoopState) -> None:
        if self.startup_s is None:
            self.startup_s = process_age_s() or 0.0
        if self.active:
            t0 = time.perf_counter()
            self.span[0] = self.span[0] or t0
            self._start = (compute_cpu_s(), time.perf_counter(), self.loader.cpu_s, self.loader.wait_s,
                           loop.last_checkpoint)
            self.own_s += time.perf_counter() - t0

    def after_optimizer_step(self, loop: LoopState) -> None:
        # the step's own work ends here: what after_step does (rank 0 logs metrics) is not compute
        if self.active:
            t0 = time.perf_counter()
            self._end = (compute_cpu_s(), t0)
            self.own_s += time.perf_counter() - t0

    def after_step(self, loop: LoopState, record: dict) -> bool:
        """The step's figures, and at a window's end the window; the time spent here and in the
        other two points is the monitor's own cost (`own_s`, against the loop's time `span`)."""
        if not self.active:
            return False
        t0 = time.perf_counter()
        try:
            return self._after_step(loop)
        finally:
            self.span[1] = time.perf_counter()
            self.own_s += self.span[1] - t0

    def _after_step(self, loop: LoopState) -> bool:
        cpu0, wall0, data_cpu0, wait0, ckpt0 = self._start
        cpu1, wall1 = self._end
        data_cpu = self.loader.cpu_s - data_cpu0
        compute = cpu1 - cpu0 - data_cpu
        wait = self.loader.wait_s - wait0
        saved = loop.last_checkpoint != ckpt0 or (self.ckpt_every and loop.step % self.ckpt_every == 0)
        work = float(self.work())
        self.trace.append((loop.step, compute, wall1 - wall0, work))
        if loop.step > self.cfg.warmup_steps and not saved and loop.step != self.replan_step:
            self.samples.append((compute, work, wait, wall1 - wall0))
        if loop.step % self.cfg.window_steps == 0:
            return self._window(loop.step, loop.max_steps)
        return False

    def end_fit(self, loop: LoopState, exc: BaseException | None) -> None:
        if not self.active:
            return
        loop.extra["resilience_reports"] = [self._record(step, f) for step, f in self.findings]
        cost = self.own_s / (self.span[1] - self.span[0]) if self.span[1] > self.span[0] else 0.0
        loop.extra["straggler_monitor_cost"] = cost
        if self.restart is not None:
            loop.stop_reason = "straggler restart"
            loop.extra["straggler_restart_exclude"] = self.restart[2]
        if self.is_main and exc is None:
            if self.findings:
                print(f"loomtrain: resilience: {len(self.findings)} report(s) in {self.windows} windows "
                      f"({', '.join(self._short(f) for _, f in self.findings)}); "
                      f"events in {os.path.join(self.output_dir, 'events.jsonl')}; the monitor took {cost:.2%} "
                      "of the loop's time", flush=True)
            else:
                print(f"loomtrain: resilience: no straggler or slow link in {self.windows} windows (the monitor "
                      f"took {cost:.2%} of the loop's time)", flush=True)
        if self.side is not None:
            dist.destroy_process_group(self.side)
            self.side = None

    # ---------------------------------------------------------------- one window
    def _probe(self) -> list[float]:
        """Per own mesh dimension: min seconds of `probe_reps` small all-reduces on my group,
        every dimension's groups probed at once after a barrier on the side group."""
        out = []
        buf = torch.zeros(8)
        for _, group, ranks in self.dims:
            delay = self.faults.link_delay(ranks)
            dist.barrier(group=self.side)
            best = float("inf")
            for _ in range(self.cfg.probe_reps):
                start = time.perf_counter()
                if delay:
                    time.sleep(delay)
                dist.all_reduce(buf, group=group)
                best = min(best, time.perf_counter() - start)
            out.append(best)
        return out

    def _window(self, step: int, max_steps: int) -> bool:
        """One window's all-gather, detection and response; True: stop for an elastic restart."""
        probes = self._probe()
        mine = [float("nan")] * 4 + [0.0]
        if self.samples:
            cols = list(zip(*self.samples))
            mine = [window_rate(cols[0], cols[1]), *(statistics.median(c) for c in cols[1:]),
                    float(len(self.samples))]
        self.samples.clear()
        # the window's steps, each rank's own figures (for `loomtrain report --plot`'s heat-map),
        # padded to a fixed length: a window after a resume may be short
        trace, pad = self.trace[-self.cfg.window_steps:], [float("nan")] * 3 * self.cfg.window_steps
        self.trace.clear()
        for i, (_, c, w, u) in enumerate(trace):
            pad[3 * i:3 * i + 3] = (c, w, u)
        vec = torch.tensor(mine + probes + pad, dtype=torch.float64)
        rows = [torch.zeros_like(vec) for _ in range(self.world)]
        dist.all_gather(rows, vec, group=self.side)
        self.windows += 1
        # every rank runs the detector on the same gathered table (deterministic), so that under
        # the rebalance policy every rank reaches the same speed factors without another collective
        table = torch.stack(rows)
        rate, work, wait = table[:, 0], table[:, 1], table[:, 2]
        ok = torch.isfinite(rate) & torch.isfinite(work) & (work > 0)
        med_work = float(work[ok].median()) if bool(ok.any()) else 1.0
        compute = torch.where(ok, rate * med_work, torch.full_like(rate, float("nan")))
        cpu = rate * work
        per_step = table[:, 5 + len(self.dims):].reshape(self.world, -1, 3)[:, :len(trace)]
        group_probes = []
        for name, ranks in self.groups:
            col = 5 + [d for d, _, _ in self.dims].index(name)
            group_probes.append(float(table[list(ranks), col].median()))
        if self.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "straggler_windows.jsonl"), "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "compute_s": [round(v, 6) for v in compute.tolist()],
                                     "cpu_s": [round(v, 6) for v in cpu.tolist()],
                                     "work": [round(v, 6) for v in work.tolist()],
                                     "data_wait_s": [round(v, 6) for v in wait.tolist()],
                                     "probe_s": {",".join(map(str, r)): round(v, 6)
                                                 for (_, r), v in zip(self.groups, group_probes)},
                                     "steps": [s for s, *_ in trace],
                                     "step_compute_s": _rounded(per_step[:, :, 0]),
                                     "step_wall_s": _rounded(per_step[:, :, 1]),
                                     "step_work": _rounded(per_step[:, :, 2])}) + "\n")
        findings = self.detector.update(compute.tolist(), group_probes if self.groups else None)
        for finding in findings:
            self._report(step, finding, float(wait.nanmedian()))
        if self.rebalancer is not None and any(f.kind == "straggler" for f in findings):
            self._rebalance(step, rate.tolist())
        elif self.rebalancer is not None and self.rebalancer.factors:
            eased = eased_factors(self.rebalancer.factors, speed_factors(rate.tolist(), self.cfg.min_slowdown),
                                  self.cfg.min_slowdown)
            if eased is not None:
                self._rebalance(step, rate.tolist(), eased)
        stragglers = [f for f in findings if f.kind == "straggler"]
        if self.cfg.straggler == "restart" and stragglers:
            return self._consider_restart(step, max(stragglers, key=lambda f: f.slowdown), max_steps,
                                          float(table[:, 3].nanmedian()))
        return False

    def _consider_restart(self, step: int, f: Finding, max_steps: int, step_s: float) -> bool:
        """`resilience.straggler=restart`: every rank works out the same plan from the same figures
        (the start-up time is rank 0's, which every rank agrees on through the side group)."""
        startup = torch.tensor([self.startup_s or 0.0], dtype=torch.float64)
        dist.broadcast(startup, src=0, group=self.side)
        plan, excluded, line, rec = straggler_restart(
            step=step, max_steps=max_steps, rank=f.rank, slowdown=f.slowdown, step_s=step_s, nodes=self.nodes,
            hosts=self.hosts, cost_s=self.cfg.restart_cost_s or float(startup) + RENDEZVOUS_S)
        if plan.restart:
            self.restart = (f, plan, excluded)
        if self.is_main:
            print(line, flush=True)
            if plan.restart:
                with open(os.path.join(self.output_dir, "events.jsonl"), "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec) + "\n")
        return plan.restart

    def _rebalance(self, step: int, rates: list[float], eased: list[float] | None = None) -> None:
        """Speed factors from this window's compute rates (or `eased` ones: a rank recovered) to the
        heterogeneous planner, from the next step on; that step re-plans and is left out of the statistics."""
        factors = eased if eased is not None else speed_factors(rates, self.cfg.min_slowdown)
        rec = {"event": "rebalance", "step": step, "from_step": step + 1, "factors": factors,
               "reason": "recovered" if eased is not None else "straggler", **self.rebalancer.apply(factors)}
        self.replan_step = step + 1
        if not self.is_main:
            return
        slow = ", ".join(f"rank {r} x{f:.2f}" for r, f in enumerate(factors) if f != 1.0) or "none"
        shares = ""
        if "work_share_after" in rec:
            worst = max(range(len(rec["speeds"])), key=lambda i: (rec["speeds"][i], -i))
            shares = (f"; on the last batch pool rank {worst}'s predicted work share "
                      f"{rec['work_share_before'][worst]:.1%} -> {rec['work_share_after'][worst]:.1%}, "
                      f"predicted step {rec['predicted_step_s_before'] * 1e3:.1f} -> "
                      f"{rec['predicted_step_s_after'] * 1e3:.1f} ms")
        print(f"loomtrain: rebalance: from step {step + 1} the heterogeneous plans use speed factors "
              f"({slow}){shares}", flush=True)
        with open(os.path.join(self.output_dir, "events.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")

    # ---------------------------------------------------------------- reports
    def _short(self, f: Finding) -> str:
        return f"rank {f.rank}" if f.kind == "straggler" else f"link {','.join(map(str, f.group))}"

    def _record(self, step: int, f: Finding) -> dict:
        rec = {"event": f.kind, "step": step, "slowdown": round(f.slowdown, 4), "evidence": f.evidence(),
               "z": round(f.z, 2), "windows": f.windows}
        if f.kind == "straggler":
            rec.update(rank=f.rank, host=self.hosts[f.rank] if self.hosts else None)
        else:
            rec.update(group=list(f.group), dim=next((n for n, r in self.groups if r == f.group), None),
                       hosts=sorted({self.hosts[r] for r in f.group}) if self.hosts else None)
        return rec

    def _report(self, step: int, f: Finding, data_wait_s: float) -> None:
        self.findings.append((step, f))
        rec = self._record(step, f)
        rec["data_wait_s"] = round(data_wait_s, 6)
        if f.kind == "straggler":
            line = (f"loomtrain: straggler: rank {f.rank} ({rec['host']}) computes {f.slowdown:.0%} slower "
                    f"than the others' median at step {step} ({f.evidence()})")
        else:
            line = (f"loomtrain: slow link: {rec['dim']} group of ranks {','.join(map(str, f.group))} "
                    f"is {f.slowdown:.0%} slower than the other groups of {len(f.group)}, while its ranks "
                    f"compute normally, at step {step} ({f.evidence()})")
        if not self.is_main:
            return
        print(line, flush=True)
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "events.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
