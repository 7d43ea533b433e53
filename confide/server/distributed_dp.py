"""Client-level DP of the distributed discrete Gaussian (Kairouz-Liu-Steinke 2021), as the
server accounts for it: each partner adds its share of the noise inside the secure sum."""

from __future__ import annotations

from typing import Any

from confide.config import RunConfig
from confide.privacy import ledger_events as E
from confide.privacy.secagg import DistributedDGAccountant, SecAggConfig
from confide.privacy.secagg.ddg_accounting import ddg_mechanism


class DistributedDpAccounting:
    """The run's composed distributed-DP releases (kept in the checkpoint)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.accountant = DistributedDGAccountant()

    def account(self, server_round: int, session: SecAggConfig, sampled: int, *,
                released: bool) -> tuple[E.ClientDpEvent, float]:
        """The round's client_dp event and the run's cumulative epsilon, accounted for the
        worst case the threshold allows: only min_survivors noise shares in the sum.
        Cohorts are fixed-size samples, so no amplification by sampling is claimed (rate
        1). An aborted round released nothing and composes nothing (recorded with
        released=false)."""
        cfg = self.cfg
        mechanism = ddg_mechanism(
            session, noise_multiplier=cfg.client_dp_noise_multiplier,
            clipping_norm=cfg.client_dp_clipping_norm,
            population=max(cfg.clients, sampled), sampled=sampled, released=released)
        self.accountant.record(mechanism)
        epsilon = self.accountant.epsilon(cfg.delta)
        return E.ClientDpEvent(round=server_round, mechanism=mechanism, delta=cfg.delta,
                               epsilon_claimed=epsilon), epsilon

    def state_dict(self) -> dict[str, Any]:
        return {"ddg_accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ddg_accountant" in state:
            self.accountant.load_state_dict(state["ddg_accountant"])
