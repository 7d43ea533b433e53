"""The independent checks of `confide audit verify`.

Each check is a function of one `LoadedRun` (the run folder read once: ledger lines, key,
summary, metrics, paths) that returns its findings as a `CheckResult`. No check reads what
another check found: what several need (the typed events, the rounds, the independent
replay) is derived from the loaded run itself and cached on it. `confide.audit.verify`
runs them in order and combines their results into the verdict.

    integrity.py     chain, payloads, ordering
    completeness.py  completeness
    claims.py        receipts, replay
    outputs.py       summary, metrics, model
    cross_run.py     earlier-runs: signed refusals against earlier run folders (only when
                     the auditor gives them: `--earlier-run`)
"""
