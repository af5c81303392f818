"""Heterogeneous sequence parallelism: a cost model of Ulysses SP groups and a per-step planner
that mixes group degrees (long sequences on wide groups, short ones packed on single ranks).

* `costmodel`     predicted time and memory of a sequence on a group of degree d
* `plan_types`    Plan, MicroStep, Group, Slot; aligned blocks; the cross-rank plan check
* `packer`        a batch's per-degree times and tokens; packs given degrees into micro-step groups
* `planner`       `plan_batch`: which degrees and step counts to pack (greedy + homogeneous
                  portfolio); `local_search` polishes the winner
* `executor`      runs a plan: pre-created aligned groups, packed rows, zero-weight filler steps
* `scheduler`     `HeteroScheduler`, what a training run holds: cost model + planning + executor
* `memory`        the linear memory model: fixed state + tokens x bytes per token -> tokens per rank
* `bound`         a lower bound on any plan's step time (analytic + `milp`, SciPy's HiGHS): the gap

Every rank plans the same batch itself; `Plan.fingerprint64` is all-gathered before a plan runs,
so a rank that planned differently is an error, never a hang.
"""
from loomtrain.parallel.hetero.bound import Bound, lower_bound
from loomtrain.parallel.hetero.costmodel import CostModel, calibrate
from loomtrain.parallel.hetero.plan_types import Group, MicroStep, Plan, PlanError, Slot, aligned_blocks, verify_same_plan
from loomtrain.parallel.hetero.planner import Comparison, compare_plans, plan_batch, plan_homogeneous

__all__ = ["Bound", "lower_bound", "CostModel", "calibrate", "Group", "MicroStep", "Plan", "PlanError", "Slot",
           "aligned_blocks", "Comparison", "compare_plans", "plan_batch",
           "plan_homogeneous", "verify_same_plan"]
