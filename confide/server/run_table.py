"""The final table of a run, as every console that ran it ends: `confide simulate`, a
`flwr run` in the simulation engine (the ServerApp prints it), `confide deploy run`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from confide.privacy.statements import LARGE_DELTA_NOTE, over_target_text
from confide.server.run_folder import RunFolder

PARTNER_ROWS_MAX = 20  # above this many partners the console shows a summary instead


def final_table(out: Path, summary: dict[str, Any]) -> Group:
    """Per round: accuracy, loss, participation, epsilon range, bytes; then per partner (or,
    with more than PARTNER_ROWS_MAX partners, their spread). Fits an 80-column terminal."""
    rows = [json.loads(line) for line in RunFolder(out).metrics.read_text().splitlines()]
    synthetic = " [SYNTHETIC demo data]" if summary.get("synthetic_data") else ""
    rounds = Table(title=f"Confide run {out}{synthetic}")
    for name in ("round", "accuracy", "loss", "agg.", "eps min-max", "client eps",
                 "bytes up"):
        rounds.add_column(name, justify="right", no_wrap=True)
    priv = summary["privacy"]
    example_dp = priv.get("example_dp", True)
    for r in rows:
        eps = list(r["epsilon_example_level"].values())
        span = f"{min(eps):.2f}-{max(eps):.2f}" if eps and example_dp else "-"
        client = r.get("epsilon_client_level")
        rounds.add_row(str(r["round"]), f"{r['accuracy']:.4f}", f"{r['loss']:.4f}",
                       f"{r['num_clients_aggregated']}/{r['num_clients_sampled']}", span,
                       "-" if client is None else f"{client:.2f}",
                       _bytes(r["bytes_uploaded"]))
    rounds.caption = "agg. = updates aggregated / partners sampled; eps = example-level " \
        "epsilon (cumulative, PLD)"
    if any(r.get("perplexity") is not None for r in rows):  # causal-lm
        rounds.caption += "; causal-lm: accuracy = next-token accuracy, loss = mean NLL of " \
            "completion tokens; " + "; ".join(
                f"round {r['round']}: perplexity {r['perplexity']:.2f}"
                + (f", BLEU {r['bleu']:.1f}, ROUGE-L {r['rouge_l']:.1f}"
                   if r.get("bleu") is not None else "") for r in rows)
    if not example_dp:
        return Group(rounds, Text(
            "Example-level DP is OFF (example-dp = false): this run gives the partners' "
            "records no example-level guarantee, so there is no epsilon to report."))
    second = priv.get("example_level_rdp") or {}
    refused = {p: [str(r["round"]) for r in rows if p in r.get("refused", [])]
               for p in priv["example_level"]}
    if len(priv["example_level"]) > PARTNER_ROWS_MAX:
        partners = _partner_spread(priv["example_level"], second, refused, rows)
    else:
        partners = Table(title="Example-level epsilon per partner (cumulative over the run)")
        for name in ("partner", "eps (PLD)", "RDP (2nd)", "rounds", "refused"):
            partners.add_column(name, justify="right", no_wrap=True)
        for p, eps in sorted(priv["example_level"].items()):
            trained = sum(1 for r in rows if p in r["epsilon_example_level"]
                          and p not in r.get("refused", []))
            rdp = second.get(p)
            partners.add_row(p, f"{eps:.3f}", "-" if rdp is None else f"{rdp:.3f}",
                             str(trained), ", ".join(refused[p]) or "-")
    large = f" ({LARGE_DELTA_NOTE})" if priv.get("allow_large_delta") else ""
    partners.caption = (f"delta = {priv['delta']}{large}; example-level DP per partner, "
                        f"add/remove-one-record adjacency, cumulative over the run; "
                        f"{priv['accountant']}. Check it: confide audit verify {out}")
    above = priv.get("above_target_epsilon") or {}
    if above:  # said in words, below the numbers: the run spent more than it planned
        return Group(rounds, partners, Text(over_target_text(above, priv["target_epsilon"]),
                                            style="bold red"))
    return Group(rounds, partners)


def _partner_spread(claimed: dict[str, float], second: dict[str, float],
                    refused: dict[str, list[str]], rows: list[dict[str, Any]]) -> Table:
    """Many partners: the spread of their epsilons and who refused or dropped; the full
    per-partner table is in summary.json and the report."""
    import statistics

    table = Table(title=f"Example-level epsilon of {len(claimed)} partners (cumulative; "
                        "per partner: summary.json, report.html)")
    for name in ("", "min", "median", "max"):
        table.add_column(name, justify="right", no_wrap=True)
    for label, values in (("eps (PLD)", list(claimed.values())),
                          ("RDP (2nd)", list(second.values()))):
        if values:
            table.add_row(label, f"{min(values):.3f}", f"{statistics.median(values):.3f}",
                          f"{max(values):.3f}")
    dropped = sum(int(r.get("secagg_dropouts") or 0) for r in rows)
    table.add_row("refused (budget)", str(sum(1 for v in refused.values() if v)),
                  "partners", "")
    table.add_row("dropped", str(dropped), "updates", "")
    return table


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
