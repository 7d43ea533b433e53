"""The run's privacy mode: resolved and validated once from the configuration's flags
(`example-dp`, `example-dp-noise`, `client-dp`, `secure-aggregation`, `distributed-dp`),
then the one thing every other module asks.

A mode is three independent choices, in the combinations the system supports:

| example level | client level | aggregation | name |
| --- | --- | --- | --- |
| off | off | plain or secure | no DP |
| local noise | off | plain or secure | local example noise |
| shared noise | off | secure | shared example noise |
| off / local noise | central (trusted server) | plain | client-level DP |
| off / local noise | distributed (noise in the secure sum) | secure | distributed DP |

What the mode says: which mechanisms a run composes, how the secure sum is weighted,
whether a node's replies are held to the disclosure rules under DP, and its name in
consoles and reports. What each mode decides (its calibration, ledger events, pre-flight
estimate and reply fields) is its rules object: `confide.privacy.mode_rules.rules_of`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

# ledger entry types of the mechanisms (confide.privacy.ledger_events; equal, by test): this
# module sits beside the configuration, below the privacy package, and imports nothing
EXAMPLE_DP, CLIENT_DP, SECURE_AGGREGATION = "example_dp", "client_dp", "secure_aggregation"
# the accountants' names (confide.privacy.accountant; equal, by test), for the same reason:
# the secure-aggregation stages read the mode without importing dp-accounting
PLD, RDP = "pld", "rdp"


class ModeError(ValueError):
    """A combination of privacy settings the system does not support (names the keys)."""


class ExampleNoise(enum.Enum):
    OFF = "off"
    LOCAL = "local"  # each partner's DP-SGD adds all of its noise
    SHARED = "shared"  # each partner adds a share of it inside the secure sum


class ClientLevel(enum.Enum):
    OFF = "off"
    CENTRAL = "central"  # the server clips and noises the mean (trusted server)
    DISTRIBUTED = "distributed"  # discrete Gaussian shares inside the secure sum


class PrivacyFlags(Protocol):
    """The configuration's privacy keys (a RunConfig), read only."""

    @property
    def example_dp(self) -> bool: ...
    @property
    def example_dp_noise(self) -> str: ...
    @property
    def client_dp(self) -> bool: ...
    @property
    def secure_aggregation(self) -> bool: ...
    @property
    def distributed_dp(self) -> bool: ...


@dataclass(frozen=True)
class PrivacyMode:
    example: ExampleNoise
    client: ClientLevel
    secure: bool

    @classmethod
    def of(cls, flags: PrivacyFlags) -> PrivacyMode:
        """The mode of a configuration whose `example-dp-noise` is resolved ('local' or
        'shared'); ModeError naming the keys for an unsupported combination."""
        if flags.distributed_dp and not flags.secure_aggregation:
            raise ModeError("distributed-dp needs secure-aggregation = true (the noise is "
                            "only private inside the secure sum)")
        if flags.client_dp and flags.secure_aggregation:
            raise ModeError("client-dp (central noise on the server) and secure-aggregation "
                            "exclude each other; use distributed-dp = true for client-level "
                            "DP without trusting the server")
        if flags.client_dp and flags.distributed_dp:
            raise ModeError("client-dp and distributed-dp exclude each other: one "
                            "client-level mechanism per run")
        if not flags.example_dp:
            example = ExampleNoise.OFF
        elif flags.example_dp_noise == "shared":
            example = ExampleNoise.SHARED
        elif flags.example_dp_noise == "local":
            example = ExampleNoise.LOCAL
        else:
            raise ModeError(f"example-dp-noise = {flags.example_dp_noise!r} is not resolved: "
                            "allowed 'local' or 'shared'")
        if example is ExampleNoise.SHARED and not flags.secure_aggregation:
            raise ModeError("example-dp-noise = 'shared' needs secure-aggregation = true")
        if example is ExampleNoise.SHARED and flags.distributed_dp:
            raise ModeError("example-dp-noise = 'shared' and distributed-dp exclude each "
                            "other: the secure sum carries one kind of noise")
        client = (ClientLevel.DISTRIBUTED if flags.distributed_dp
                  else ClientLevel.CENTRAL if flags.client_dp else ClientLevel.OFF)
        return cls(example, client, bool(flags.secure_aggregation))

    # -- what the mode decides -------------------------------------------------------
    @property
    def example_dp(self) -> bool:
        return self.example is not ExampleNoise.OFF

    @property
    def shared_noise(self) -> bool:
        return self.example is ExampleNoise.SHARED

    @property
    def client_level(self) -> bool:
        return self.client is not ClientLevel.OFF

    @property
    def any_dp(self) -> bool:
        """Some mechanism protects the partners' records: replies then follow the
        disclosure rules (no un-noised statistic of the records)."""
        return self.example_dp or self.client_level

    @property
    def weighted_sum(self) -> bool:
        """The secure sum weights each update by its rows (capped), as the plaintext mean
        does; distributed DP counts each update once (its bounded contribution), and shared
        noise sums clipped gradients, not updates."""
        return self.secure and self.client is not ClientLevel.DISTRIBUTED \
            and not self.shared_noise

    @property
    def name(self) -> str:
        parts = []
        if self.example is ExampleNoise.LOCAL:
            parts.append("example-level DP, local noise")
        elif self.example is ExampleNoise.SHARED:
            parts.append("example-level DP, noise shared inside the secure sum")
        if self.client is ClientLevel.CENTRAL:
            parts.append("client-level DP on the server")
        elif self.client is ClientLevel.DISTRIBUTED:
            parts.append("distributed client-level DP")
        if not parts:
            parts.append("no DP")
        return "; ".join(parts) + ("; secure aggregation" if self.secure else "")
