"""Exception types of the secure-aggregation core.

Every failure of the protocol surfaces as one of these, so an adapter (Flower or a test) can
tell "the input was malformed" from "a party misbehaved" from "too many clients dropped".
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every error raised by :mod:`confide.privacy.secagg`."""


class SecAggValidationError(SecAggError, ValueError):
    """A local input (update vector, weight, configuration value) is malformed."""


class SecAggProtocolError(SecAggError):
    """A protocol message is invalid: wrong session/round/stage, replayed, misaddressed,
    tampered with, or a request a client must refuse.

    ``sender``/``receiver`` name the parties involved where known, so an operator can see
    which link or which party is at fault.
    """

    def __init__(
        self,
        message: str,
        *,
        sender: int | None = None,
        receiver: int | None = None,
        stage: str | None = None,
    ) -> None:
        parts = [message]
        if stage is not None:
            parts.append(f"stage={stage}")
        if sender is not None:
            parts.append(f"sender={sender}")
        if receiver is not None:
            parts.append(f"receiver={receiver}")
        super().__init__(" | ".join(parts) if len(parts) > 1 else message)
        self.sender = sender
        self.receiver = receiver
        self.stage = stage


class SecAggDecryptionError(SecAggProtocolError):
    """An encrypted share failed AEAD authentication (tampered, forged or wrong key)."""


class SecAggRefusal(SecAggProtocolError):
    """A client refused a request that would break the protocol's secrecy invariant
    (e.g. releasing both the self-mask share and the mask-key share of one client)."""


class SecAggAbort(SecAggError):
    """The round cannot complete without weakening privacy (too few survivors).

    Raised instead of returning a partial result; nothing unmasked is revealed. ``stage`` is
    the stage at which the shortfall was detected, ``available`` how many parties (or shares)
    were present and ``required`` how many the threshold needs.
    """

    def __init__(self, stage: str, available: int, required: int, detail: str = "") -> None:
        msg = (
            f"secure aggregation aborted at stage '{stage}':"
            f" {available} available < {required} required"
        )
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)
        self.stage = stage
        self.available = available
        self.required = required
