"""The partner's budget, asked before its secure set-up: can this node afford round q?

A node that takes part in a secure round first advertises its keys for it, one or two
rounds ahead (`confide.clients.secure_client`). A node whose budget cannot afford the round
refuses right there, signed, with the stage "budget" and the reason of its refusal: no keys,
so the server learns it at once instead of after the whole set-up. (The round's own budget
check, `confide.clients.local_round.node_round`, stays: it decides what is spent.)

The planned spend is the round's, as the node will plan it:

* local noise: from its own plan (its public row count, the run's batch size, epochs and
  noise: `confide.clients.update_producers.LocalNoiseDelta`);
* shared noise: sigma and the federation's one sampling rate reach the node only with the
  round's `train` message (the server fixes them from every partner's row count), so at
  this stage the cheapest round could cost next to nothing: the node refuses only when its
  budget is already exhausted (any further spend would pass a cap).

Imports nothing heavy: the accountant and the data are loaded only when a run with
example-level DP asks the node to advertise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.app import Context, Message

from confide import wire as W
from confide.clients.policy import PartnerPolicy, PolicyRefusal, node_max_epsilon, node_policy
from confide.clients.secure_client import BudgetRefusal
from confide.config import RunConfig
from confide.privacy.mechanisms import SampledGaussian

if TYPE_CHECKING:
    from confide.clients.node_state import NodeState


def advertise_guard(msg: Message, context: Context, cfg: RunConfig,
                    state: NodeState | None = None) -> Callable[[int], None] | None:
    """What `secure_reply` asks before advertising keys for round q (raises BudgetRefusal);
    None without example-level DP (nothing to afford). `state`: the node's state when the
    caller holds it (a training round, its spend recorded); else it is read once, when a
    round is first asked about, and never changed or saved."""
    if not cfg.privacy_mode.example_dp:
        return None
    held: list[NodeState] = [] if state is None else [state]

    def guard(q: int) -> None:
        if not held:
            held.append(_stored_state(context, cfg))
        refuse_unaffordable(msg, context, cfg, q, held[0])

    return guard


def _stored_state(context: Context, cfg: RunConfig) -> NodeState:
    from confide.clients.node_state import load_node_state
    from confide.clients.state_location import node_state_dir

    return load_node_state(context, delta=cfg.delta,
                           max_epsilon=node_max_epsilon(cfg, context),
                           state_dir=node_state_dir(context, cfg.out))


def refuse_unaffordable(msg: Message, context: Context, cfg: RunConfig, q: int,
                        state: NodeState) -> None:
    """BudgetRefusal when this node's budget (its lifetime accountant and max-epsilon, its
    policy's max-run-epsilon and spends per round) cannot afford round q of the run. (A
    local-noise run calibrated by target-epsilon reuses the sigma its state holds for the
    run; before its first training round the node calibrates here.)"""
    from confide.privacy.accountant import BudgetExhausted, Spend

    run_key = str(msg.content[W.CONFIG].get(W.RUN_KEY, ""))
    policy = node_policy(context, cfg)
    try:
        if cfg.privacy_mode.shared_noise:
            _refuse_exhausted(state, policy, q, run_key)
        else:
            planned = Spend(_local_plan(msg, context, cfg, q, run_key, state, policy),
                            q, run_key)
            policy.check_run_budget(state.accountant, planned)
            state.accountant.check(planned)
    except (BudgetExhausted, PolicyRefusal) as exc:
        raise BudgetRefusal(str(exc)) from None


def _local_plan(msg: Message, context: Context, cfg: RunConfig, q: int, run_key: str,
                state: NodeState, policy: PartnerPolicy) -> SampledGaussian:
    """The mechanism round q will run under local noise: the producer's own plan."""
    from confide.clients.partner_data import partner_data
    from confide.clients.update_producers import LocalNoiseDelta, NodeRound

    r = NodeRound(msg, cfg, q, run_key, partner_data(cfg, context), state, context, policy)
    return LocalNoiseDelta(r).planned_mechanism()


def _refuse_exhausted(state: NodeState, policy: PartnerPolicy, q: int, run_key: str) -> None:
    """Shared noise: refuse only what no round can fit (module docstring)."""
    from confide.privacy.accountant import Spend

    # the policy's caps (spends per round, the run's epsilon) asked with a spend of nothing
    policy.check_run_budget(state.accountant,
                            Spend(SampledGaussian(1.0, 0.0, 0), q, run_key))
    spent, cap = state.accountant.epsilon(), state.accountant.max_epsilon
    if spent >= cap:  # any spend at all would pass it
        raise BudgetRefusal(f"privacy budget exhausted: spent epsilon {spent:.4f} of "
                            f"max-epsilon {cap:.4f}; any further round would pass it")
