"""The run's ledger as the round's parts see it: they hand it events, `Federation` alone
appends them (aggregation.RoundHost extends this)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from confide.privacy.ledger_events import LedgerEvent


class RunRecord(Protocol):
    """The run's ledger as those that hand it events see it: `Federation` alone appends
    (`record`); partners' receipts and countersignatures are checked against its key and
    entries."""

    @property
    def run_key(self) -> str:
        """The ledger's public key (hex): the run a partner's signed statement names."""
        ...

    def record(self, event: LedgerEvent) -> int:
        """Append `event` to the ledger now (durably); returns its entry index."""
        ...

    def entry_hash_at(self, index: int) -> str | None:
        """The entry_hash of ledger entry `index` (None: no such entry)."""
        ...
