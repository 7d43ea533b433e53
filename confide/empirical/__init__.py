"""Empirical privacy audits: train through the simulation driver, then measure what a model
reveals (`confide audit empirical`). A driver above `simulation/` and `audit/`: it runs the
one and reports through the other, so neither of those imports it.

- `one_run.py`: the one-run lower bound on epsilon (Steinke, Nasr and Jagielski 2023) for
  classification runs, and what the audit can certify at most.
- `white_box.py`: its white-box variant, gradient canaries through the node's DP-SGD
  (`confide.clients.dp_training.train_dp`).
- `canaries.py`: the canary exposure audit (Carlini et al. 2019) for causal-LM runs.
"""
