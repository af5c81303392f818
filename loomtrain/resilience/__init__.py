"""Resilience: name the slow rank, never hang.

Components on the training loop's hook points (`loomtrain.hooks`), built by the trainer:

  detect.py     pure statistics over one window's per-rank figures (median/MAD outliers, the
                3-of-5 persistence rule, rank vs link attribution); no torch
  clock.py      the compute clock: the training thread's CPU time, and why
  straggler.py  `StragglerMonitor`: per-rank timing and one side-group all-gather per window,
                reported to the console, `{train.output_dir}/events.jsonl` and the summary
  rebalance.py  `resilience.straggler=rebalance`: a reported straggler's speed factor goes to the
                heterogeneous scheduler, whose plans then give its groups less work
  runlog.py     reading events.jsonl and the per-step figures back (`loomtrain report`)
  heatmap.py    `loomtrain report --plot`: the rank x step heat-map with the events marked
  faults.py     the `fault.*` keys: injected slowness (extra CPU work), slow links, hangs, and a
                rank that SIGKILLs itself in the first attempt (for `--max-restarts` recovery,
                which resumes from the last committed checkpoint: `loomtrain.launch.run_command`)
  watchdog.py   start-up / step / checkpoint deadlines; on expiry every rank dumps its stacks and
                last collectives, the dumps are lined up through the job's store, one line names
                the rank that never entered, and the job exits 3
  orphan.py     a worker exits when its launcher dies
  build.py      which of these a run gets, built from its config (the trainer only says when)
  restart.py    a restarted group's `restart` event (attempt, resumed step, world size before and
                after), and `resilience.straggler=restart`'s cost arithmetic

The layer sits between runtime (which registers the components) and checkpoint; it imports only
the layers below it.
"""
