"""A partner's own privacy policy: floors the partner sets on its node and the server cannot
lower. The node computes its noise and its epsilon only from values it has checked against
this policy, refuses any round that would break it, and signs the policy into its receipts.

Keys (deployment: the SuperNode's node config, `confide deploy supernode` flags; simulation:
the same keys in `RUN/partners/partition-N/node-config.toml`, which `confide simulate
--partner-config KEY=VALUE` writes for every virtual partner):

| key | meaning | default |
| --- | --- | --- |
| `max-delta` | the largest delta the partner accepts for a run | 1 / (10 x its rows) |
| `max-epsilon` | lifetime budget over all runs (the node's accountant) | the run's |
| `max-run-epsilon` | budget of any one run | none |
| `min-partners` | fewest verified partners in a secure round | 2 |
| `dp-colluders` | partners it assumes collude with the server (shared noise) | 0 |
| `min-noise-multiplier` | the smallest noise multiplier it applies | 0 |
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context

from confide.config import RunConfig

if TYPE_CHECKING:  # the accountant imports Opacus: not for the secure-aggregation stages
    from confide.privacy.accountant import PartnerAccountant, Spend

MAX_SPENDS_PER_ROUND = 2  # the round itself, and one retry after a lost reply
NODE_CONFIG_FILE = "node-config.toml"  # simulation: a virtual partner's node config
POLICY_KEYS = ("max-delta", "max-epsilon", "max-run-epsilon", "min-partners", "dp-colluders",
               "min-noise-multiplier")


class PolicyRefusal(ValueError):
    """A round this partner's policy forbids (the message names the key and both values)."""


class PolicyError(ValueError):
    """A policy value is unusable (names the key and what is allowed)."""


def _number(config: Mapping[str, Any], key: str, *, integer: bool = False,
            positive: bool = True) -> float | None:
    if key not in config:
        return None
    value = config[key]
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = value > 0 if positive else value >= 0
    if not ok:
        kind = "an integer" if integer else "a number"
        raise PolicyError(f"node config {key} = {value!r}: allowed {kind} "
                          f"{'> 0' if positive else '>= 0'}")
    return float(value)


@dataclass(frozen=True)
class PartnerPolicy:
    max_delta: float | None = None  # None: 1 / (10 x the partner's rows)
    max_run_epsilon: float | None = None
    min_partners: int = 2
    dp_colluders: int = 0
    min_noise_multiplier: float = 0.0

    @classmethod
    def from_node_config(cls, config: Mapping[str, Any]) -> PartnerPolicy:
        max_delta = _number(config, "max-delta")
        if max_delta is not None and max_delta >= 1:
            raise PolicyError(f"node config max-delta = {max_delta}: allowed 0 < x < 1")
        partners = _number(config, "min-partners", integer=True)
        if partners is not None and partners < 2:
            raise PolicyError(f"node config min-partners = {int(partners)}: allowed an "
                              "integer >= 2")
        colluders = _number(config, "dp-colluders", integer=True, positive=False)
        noise = _number(config, "min-noise-multiplier", positive=False)
        return cls(max_delta=max_delta, max_run_epsilon=_number(config, "max-run-epsilon"),
                   min_partners=int(partners or 2), dp_colluders=int(colluders or 0),
                   min_noise_multiplier=noise or 0.0)

    def delta_cap(self, rows: int) -> float:
        return self.max_delta if self.max_delta is not None else 1.0 / (10 * max(rows, 1))

    def check_run(self, cfg: RunConfig, rows: int) -> None:
        """Before anything is spent: the run's delta and colluders assumption."""
        cap = self.delta_cap(rows)
        if cfg.delta > cap:
            source = "max-delta" if self.max_delta is not None else \
                f"the default cap 1/(10 x {rows} rows); set node config max-delta to change it"
            raise PolicyRefusal(f"the run's delta {cfg.delta:g} is above this partner's "
                                f"{cap:g} ({source})")

    def check_noise(self, noise_multiplier: float) -> None:
        if noise_multiplier < self.min_noise_multiplier * (1 - 1e-12):
            raise PolicyRefusal(f"noise multiplier {noise_multiplier:.4g} is below this "
                                f"partner's min-noise-multiplier {self.min_noise_multiplier:g}")

    def check_colluders(self, colluders: int) -> None:
        if colluders < self.dp_colluders:
            raise PolicyRefusal(f"the round assumes {colluders} colluding partners, fewer than "
                                f"this partner's dp-colluders {self.dp_colluders}")

    def check_run_budget(self, accountant: PartnerAccountant, planned: Spend) -> None:
        """A round of a run is trained at most twice (once more after a lost reply, e.g. a
        resumed server): a server re-sending a round cannot drain the budget through it.
        Then the run's own epsilon, this round included, against max-run-epsilon."""
        earlier = sum(1 for s in accountant.history
                      if s.run == planned.run and s.round == planned.round)
        if earlier >= MAX_SPENDS_PER_ROUND:
            raise PolicyRefusal(f"round {planned.round} of this run was trained {earlier} "
                                "times already; this partner spends on a round at most "
                                f"{MAX_SPENDS_PER_ROUND} times (a re-sent round drains "
                                "budget)")
        if self.max_run_epsilon is None:
            return
        from confide.privacy.accountant import PartnerAccountant

        mine = [s for s in accountant.history if s.run == planned.run] + [planned]
        would_be = PartnerAccountant(accountant.delta, math.inf, accountant.accountant)
        would_be.history = mine
        epsilon = would_be.epsilon()
        if epsilon > self.max_run_epsilon:
            raise PolicyRefusal(f"round {planned.round} would take this run to epsilon "
                                f"{epsilon:.3f}, above this partner's max-run-epsilon "
                                f"{self.max_run_epsilon:g}")

    def to_json(self) -> dict[str, Any]:
        """What the partner signs into its receipts."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


def partner_node_config(context: Context, cfg: RunConfig) -> dict[str, Any]:
    """The node config, plus in simulation the virtual partner's own node-config file."""
    config = dict(context.node_config)
    if "partition-id" in config and cfg.out:
        path = Path(cfg.out) / "partners" / f"partition-{int(config['partition-id'])}" \
            / NODE_CONFIG_FILE
        if path.is_file():
            try:
                extra = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as exc:
                raise PolicyError(f"{path}: {exc}") from None
            unknown = sorted(set(extra) - set(POLICY_KEYS))
            if unknown:
                raise PolicyError(f"{path}: unknown keys {unknown}; allowed "
                                  f"{', '.join(POLICY_KEYS)}")
            config.update(extra)
    return config


def parse_policy_setting(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` (a policy key, a TOML value) -> (key, value); PolicyError names the key."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or key not in POLICY_KEYS:
        raise PolicyError(f"partner config {text!r}: allowed KEY=VALUE with KEY one of "
                          f"{', '.join(POLICY_KEYS)}")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        raise PolicyError(f"partner config {key} = {value!r} is not a number") from None
    PartnerPolicy.from_node_config({key: parsed})  # the value's own check, named
    return key, parsed


def write_simulated_policies(run_out: str | Path, num_partitions: int,
                             values: Mapping[str, Any]) -> None:
    """Simulation: every virtual partner's node config holds these policy keys."""
    PartnerPolicy.from_node_config(values)
    text = "".join(f"{k} = {v!r}\n" for k, v in values.items())
    for partition in range(num_partitions):
        folder = Path(run_out) / "partners" / f"partition-{partition}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / NODE_CONFIG_FILE).write_text(text)


def node_policy(context: Context, cfg: RunConfig) -> PartnerPolicy:
    return PartnerPolicy.from_node_config(partner_node_config(context, cfg))


class NodeConfigError(ValueError):
    """The partner's node configuration is unusable."""


def node_max_epsilon(cfg: RunConfig, context: Context) -> float:
    """The partner's lifetime cap: its own (node config; in simulation also its node-config
    file) wins when it is lower than the run's."""
    node_cap = partner_node_config(context, cfg).get("max-epsilon")
    if node_cap is None:
        return cfg.max_epsilon
    try:
        cap = float(node_cap)
    except (TypeError, ValueError):
        raise NodeConfigError(f"node config max-epsilon = {node_cap!r} is not a number") \
            from None
    if not cap > 0:
        raise NodeConfigError(f"node config max-epsilon = {cap} must be > 0")
    return min(cap, cfg.max_epsilon)
