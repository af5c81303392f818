"""Heterogeneous sequence parallelism: a cost model of Ulysses SP groups and a per-step planner
that mixes group degrees (long sequences on wide groups, short ones packed on single ranks).

The executor calls `plan_batch` on every rank, checks `Plan.fingerprint64` agrees across ranks
(`verify_same_plan`), pre-creates the groups of `aligned_blocks`, and runs `Plan.for_rank`.
"""
from loomtrain.parallel.hetero.costmodel import CostModel, calibrate
from loomtrain.parallel.hetero.plan_types import Group, MicroStep, Plan, PlanError, Slot, aligned_blocks, verify_same_plan
from loomtrain.parallel.hetero.planner import Comparison, compare_plans, plan_batch, plan_homogeneous

__all__ = ["CostModel", "calibrate", "Group", "MicroStep", "Plan", "PlanError", "Slot",
           "aligned_blocks", "Comparison", "compare_plans", "plan_batch",
           "plan_homogeneous", "verify_same_plan"]
