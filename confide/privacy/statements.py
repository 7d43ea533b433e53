"""Words every final statement of a run uses (the console's final table, `confide audit
verify`, the report), in one place so that they cannot drift apart."""

from __future__ import annotations

LARGE_DELTA_NOTE = ("allow-large-delta = true: delta may be >= 1/(rows of the smallest "
                    "partner), a guarantee that publishing one record could meet")


def over_target_text(over: dict[str, float], target: float) -> str:
    """The words every final statement uses for a spend above the target."""
    who = "; ".join(f"partner {p} spent epsilon {e:.4g}" for p, e in over.items())
    return (f"ABOVE TARGET: {who}, more than the run's target-epsilon {target:g}. The noise "
            "was calibrated to reach the target in the planned rounds; the ledger records "
            "more releases than that (a round trained again, e.g. after a resume).")
