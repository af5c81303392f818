"""`resilience.straggler=restart`: the arithmetic that decides whether a confirmed straggler is
worth an elastic restart without its node (`loomtrain.resilience.restart.restart_worth_it`)."""
from __future__ import annotations

import pytest

from loomtrain.resilience.restart import RestartPlan, process_age_s, restart_worth_it, straggler_restart

# 4 ranks on 2 nodes of 2; --nnodes 1:2 and one restart left, unless a case says otherwise
BASE = dict(step_s=1.0, world=4, excluded=2, nodes=2, min_nodes=1, restarts_left=1)


def test_a_much_slower_rank_with_many_steps_left_is_worth_a_restart():
    # rank 3x slow: the others' pace is 1/3 s/step; on 2 ranks instead of 4 that is 2/3 s/step
    plan = restart_worth_it(slowdown=2.0, remaining_steps=1000, cost_s=60.0, **BASE)
    assert plan.restart
    assert plan.step_s_after == pytest.approx(2 / 3)
    assert plan.saved_s == pytest.approx(1000 / 3)
    assert "1000 steps left" in plan.why and "> 60.0 s restart cost" in plan.why


def test_not_worth_it_when_the_steps_left_do_not_pay_for_the_restart():
    plan = restart_worth_it(slowdown=2.0, remaining_steps=150, cost_s=60.0, **BASE)  # 50 s saved
    assert not plan.restart and plan.saved_s == pytest.approx(50.0) and "<= 60.0 s" in plan.why


def test_half_the_ranks_cost_more_than_a_2x_slow_rank_does():
    # excluding 2 of 4 ranks doubles the others' per-step work: a 2x slow rank (slowdown 1.0)
    # is break-even, and a 30% slow one makes the job slower without it
    assert restart_worth_it(slowdown=1.0, remaining_steps=10**6, cost_s=0.0, **BASE).saved_s == pytest.approx(0.0)
    plan = restart_worth_it(slowdown=0.3, remaining_steps=10**6, cost_s=0.0, **BASE)
    assert not plan.restart and plan.saved_s < 0
    # one rank of 8 (one node per rank): a 30% slowdown pays off
    plan = restart_worth_it(slowdown=0.3, remaining_steps=1000, cost_s=60.0, step_s=1.0, world=8, excluded=1,
                            nodes=8, min_nodes=1, restarts_left=1)
    assert plan.restart and plan.step_s_after == pytest.approx(8 / 7 / 1.3)


def test_never_without_a_restart_left_or_below_the_rendezvous_minimum():
    plan = restart_worth_it(slowdown=5.0, remaining_steps=10**6, cost_s=1.0, **{**BASE, "restarts_left": 0})
    assert plan == RestartPlan(False, "no restart left (--max-restarts)")
    plan = restart_worth_it(slowdown=5.0, remaining_steps=10**6, cost_s=1.0, **{**BASE, "min_nodes": 2})
    assert not plan.restart and "needs 2 node(s) and only 1 would be left" in plan.why
    plan = restart_worth_it(slowdown=5.0, remaining_steps=10**6, cost_s=1.0,
                            **{**BASE, "nodes": 1, "excluded": 4})
    assert not plan.restart


def test_process_age_is_measured_on_linux():
    age = process_age_s()
    assert age is None or age > 0


def test_the_straggler_s_whole_node_is_excluded_and_the_event_says_why():
    env = {"LOOMTRAIN_MIN_NODES": "1", "TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_RESTART_COUNT": "1"}
    kw = dict(step=24, max_steps=1024, rank=3, slowdown=3.0, step_s=0.4, nodes=["0", "0", "1", "1"],
              hosts=["h0", "h0", "h1", "h1"], cost_s=60.0)
    plan, excluded, line, rec = straggler_restart(env=env, **kw)
    assert plan.restart and excluded == [2, 3]
    assert line.startswith("loomtrain: straggler restart: rank 3 is 300% slow; committing step 24 and restarting "
                           "without node 1 (h1, ranks 2,3): 1000 steps left x (0.400 s/step now - 0.200 s/step on "
                           "2 ranks"), line
    assert rec["event"] == "restart" and rec["reason"] == "straggler" and rec["exclude"] == [2, 3]
    assert rec["host"] == "h1" and rec["saved_s"] == pytest.approx(200.0) and rec["cost_s"] == 60.0
    # the one restart torchelastic allowed is used up: keep reporting
    plan, _, line, rec = straggler_restart(env={**env, "TORCHELASTIC_RESTART_COUNT": "2"}, **kw)
    assert not plan.restart and rec == {} and "not now, node 1 (h1, ranks 2,3) stays: no restart left" in line
