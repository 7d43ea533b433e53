"""The final console tables stay readable: 80 columns, no cut headers, and a summary
instead of one row per partner when there are many."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from confide.server.run_table import PARTNER_ROWS_MAX, final_table


def _run_folder(tmp_path: Path, partners: int) -> tuple[Path, dict]:
    names = [f"p-{i:012x}" for i in range(partners)]
    rows = [{"round": r, "accuracy": 0.5 + r / 10, "loss": 0.7, "num_clients_sampled":
             partners, "num_clients_aggregated": partners - 1,
             "epsilon_example_level": {n: r * (1 + i / partners) for i, n in enumerate(names)},
             "epsilon_client_level": None, "bytes_uploaded": 2_979_920 * r,
             "refused": names[:3] if r == 2 else [], "secagg_dropouts": 1}
            for r in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"privacy": {"delta": 1e-5, "accountant": "PLD",
                           "example_level": rows[-1]["epsilon_example_level"],
                           "example_level_rdp": {n: 1.1 * e for n, e in
                                                 rows[-1]["epsilon_example_level"].items()}}}
    return tmp_path, summary


def _render(group: object) -> str:
    console = Console(width=80, record=True, color_system=None)
    console.print(group)
    return console.export_text()


@pytest.mark.parametrize("partners", [4, 100])
def test_tables_fit_80_columns_without_cut_headers(tmp_path: Path, partners: int) -> None:
    text = _render(final_table(*_run_folder(tmp_path, partners)))
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    for header in ("round", "accuracy", "eps min-max", "client eps", "bytes up"):
        assert header in text


def test_many_partners_get_a_summary_not_a_row_each(tmp_path: Path) -> None:
    text = _render(final_table(*_run_folder(tmp_path, 100)))
    assert PARTNER_ROWS_MAX < 100
    assert "p-000000000063" not in text  # no per-partner rows
    assert "median" in text and "refused (budget)" in text and "dropped" in text
    few = _render(final_table(*_run_folder(tmp_path, 4)))
    assert "p-000000000003" in few


def test_a_run_without_example_dp_shows_no_epsilon(tmp_path: Path) -> None:
    """Its partners' accountants hold no events (epsilon 0.0 in the rows): printed, that
    would read as perfect privacy where there is no guarantee at all."""
    folder, summary = _run_folder(tmp_path, 4)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r["epsilon_example_level"] = dict.fromkeys(r["epsilon_example_level"], 0.0)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary["privacy"]["example_dp"] = False
    text = _render(final_table(folder, summary))
    assert "0.00-0.00" not in text and "0.000" not in text
    assert "Example-level DP is OFF" in text
    assert "p-000000000003" not in text  # no per-partner epsilon rows
    summary["privacy"]["example_dp"] = True
    assert "0.00-0.00" in _render(final_table(folder, summary))


def test_known_flower_and_ray_notices_are_filtered_and_nothing_else() -> None:
    import logging
    import warnings

    from confide.logs import quiet_known_messages

    quiet_known_messages()
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    flwr_log = logging.getLogger("flwr")
    handler = Keep()
    flwr_log.addHandler(handler)
    try:
        flwr_log.warning("DEPRECATED FEATURE: The `run_simulation` function is deprecated")
        flwr_log.warning("fraction_evaluate is set to 0.0. Federated evaluation will be "
                         "skipped.")
        flwr_log.warning("node 3 failed: out of memory")
    finally:
        flwr_log.removeHandler(handler)
    assert seen == ["node 3 failed: out of memory"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # pytest's own config ignores FutureWarning
        quiet_known_messages()
        warnings.warn("Tip: In future versions of Ray, Ray will no longer override "
                      "accelerator visible devices", FutureWarning, stacklevel=1)
        warnings.warn("something else changes", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else changes"]
