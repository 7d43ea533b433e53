"""One object per privacy mode: what each mode decides, in one place.

`confide.modes.PrivacyMode` says which mode a configuration is (its flags resolved and
validated once); `rules_of(mode)` gives that mode's rules, made of an example-level half
(`example_level.py`: none, local noise, shared noise) and a client-level half
(`client_level.py`: none, central, distributed). Together they own:

* the noise calibration (`example.noise_multiplier`, through the one rule of
  `confide.privacy.calibration`) and the client-level accountant (`client.accountant`);
* the ledger events a round records (`ledger_events`);
* the pre-flight estimate of each mechanism (`estimates`);
* the fields a node's training reply may carry (`reply_fields`: under any DP no loss and
  no time, `confide.clients.disclosure`).

The node's update producer and the server's decoding and step are the node's and the
server's own (layers import downward only), each picked once from the same mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from confide.config import RunConfig
from confide.modes import SECURE_AGGREGATION, PrivacyMode
from confide.privacy import reply_fields
from confide.privacy.mode_rules.client_level import CLIENT_LEVEL, ClientLevelRule
from confide.privacy.mode_rules.estimates import MechanismEstimate
from confide.privacy.mode_rules.example_level import EXAMPLE_LEVEL, ExampleLevelRule


@dataclass(frozen=True)
class ModeRules:
    mode: PrivacyMode
    example: ExampleLevelRule
    client: ClientLevelRule

    @property
    def ledger_events(self) -> tuple[str, ...]:
        """The mechanism events a round of this mode records, in the ledger's order."""
        return (*self.example.ledger_events, *self.client.ledger_events,
                *((SECURE_AGGREGATION,) if self.mode.secure else ()))

    @property
    def reply_fields(self) -> tuple[str, ...]:
        """The metrics a node's training reply may carry in this mode."""
        return reply_fields.PUBLIC + (() if self.mode.any_dp else reply_fields.RAW)

    def estimates(self, cfg: RunConfig, d: int, n: int, sizes: Sequence[int] | None
                  ) -> list[MechanismEstimate]:
        """The pre-flight estimate of each of this mode's mechanisms, for `d` trainable
        parameters, `n` partners per round and the partners' rows when known."""
        example = self.example.estimate(cfg, d, n, sizes)
        client = self.client.estimate(cfg, d, n, example)
        return [m for m in (example, client) if m is not None]


def rules_of(mode: PrivacyMode) -> ModeRules:
    return ModeRules(mode, EXAMPLE_LEVEL[mode.example], CLIENT_LEVEL[mode.client])


__all__ = ["MechanismEstimate", "ModeRules", "rules_of"]
