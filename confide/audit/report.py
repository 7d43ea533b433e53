"""`confide audit report RUN_DIR`: a self-contained HTML report (and a Markdown one).

Contents: the verification verdict first, then epsilon per partner over rounds (the
dp-accounting replay, i.e. what the ledger proves, not what the run claimed), accuracy and
loss over rounds, participation and dropouts per round, the mechanisms and their
parameters, and the model digests; for a causal-lm run audited by `confide audit empirical`,
the canary exposure of inserted vs never-inserted secrets. The HTML embeds its plots as
base64 PNG data URIs; the Markdown links PNG files written next to it (Markdown viewers
rarely show data URIs).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in CI
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from confide.audit.verify import (
    FAIL,
    PASS,
    VerifyResult,
    delta_statement,
    not_a_run,
    over_target,
    over_target_text,
    render_verdict,
    verify_run,
)
from confide.errors import ConfideError
from confide.logs import plural
from confide.privacy import ledger_events as ev
from confide.run_layout import (
    CANARY_EXPOSURE_FILE,
    EXAMPLES_FILE,
    METRICS_FILE,
    REPORT_HTML_FILE,
    REPORT_MD_FILE,
    SUMMARY_FILE,
    atomic_write_bytes,
)

EPSILON_HEADER = ["partner", "claimed", "independent replay", "PLD", "RDP", "rounds trained",
                  "refused rounds"]
PLOT_PARTNERS_MAX = 20  # above this many partners the epsilon plot shows their spread
# Click-to-sort for tables of class 'sortable' (numeric where the cell starts with a number)
SORT_SCRIPT = """<script>(function(){var t=document.currentScript.previousElementSibling;
t.querySelectorAll('th').forEach(function(th,i){th.style.cursor='pointer';th.onclick=function(){
var b=t.tBodies[0],rs=Array.from(b.rows),asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
rs.sort(function(x,y){var p=x.cells[i].textContent,q=y.cells[i].textContent,
m=parseFloat(p),n=parseFloat(q),c=(isNaN(m)||isNaN(n))?p.localeCompare(q):m-n;
return asc?c:-c;});rs.forEach(function(r){b.appendChild(r);});};});})();</script>"""
PREFLIGHT_HEADER = ["mechanism", "verdict", "noise/signal per round", "why", "would help"]
GENERATION_METRICS = ("perplexity", "bleu", "rouge_l")
GENERATION_HEADER = ["round", "prompt", "generated", "references (up to 3)"]
CANARY_TITLE = "Canary exposure (Carlini et al. 2019, 'The Secret Sharer'), bits"
CANARY_HEADER = ["secrets", "n", "mean exposure (rank)", "median (rank)",
                 "mean exposure (extrapolated)", "max (extrapolated)"]
SYNTHETIC_NOTE = ("Trained on the SYNTHETIC demo corpus (generated template reviews, not "
                  "real data).")


@dataclass
class _Figure:
    name: str
    title: str
    png: bytes


@dataclass
class _Tables:
    participation: list[list[str]] = field(default_factory=list)
    mechanisms: list[list[str]] = field(default_factory=list)
    digests: list[list[str]] = field(default_factory=list)


class RunReport:
    """Collects what the report shows from a verified run folder."""

    def __init__(self, run_dir: Path | str, result: VerifyResult | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.result = result or verify_run(self.run_dir)
        self.events = [ev.parse_payload(e["type"], e["payload"]) for e in self.result.entries
                       if e is not None and _parses(e)]
        self.metrics = _read_metrics(self.run_dir / METRICS_FILE)

    # -- figures ------------------------------------------------------------------------
    def figures(self) -> list[_Figure]:
        figs = []
        if self.result.example_level or self.result.client_level:
            figs.append(_Figure("epsilon", "Epsilon per partner over rounds (independent "
                                "replay of the ledger; dotted: RDP second opinion)",
                                self._epsilon_plot()))
        if any(m.get("accuracy") is not None or m.get("loss") is not None
               for m in self.metrics):
            figs.append(_Figure("accuracy", "Accuracy and loss over rounds (metrics.jsonl)",
                                self._accuracy_plot()))
        if any(m.get(k) is not None for m in self.metrics for k in GENERATION_METRICS):
            figs.append(_Figure("generation", "Perplexity, BLEU and ROUGE-L over rounds "
                                "(causal-lm, metrics.jsonl)", self._generation_plot()))
        return figs

    def _generation_plot(self) -> bytes:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, style in (("bleu", "o-"), ("rouge_l", "s-")):
            pts = [(m["round"], m[key]) for m in self.metrics if m.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=key)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.set_ylabel("BLEU / ROUGE-L (0-100)")
        pts = [(m["round"], m["perplexity"]) for m in self.metrics
               if m.get("perplexity") is not None]
        if pts:
            ax2 = ax.twinx()
            ax2.plot(*zip(*pts, strict=True), "^--", color="tab:red", label="perplexity")
            ax2.set_ylabel("held-out perplexity")
        fig.legend(loc="upper right", fontsize="small")
        ax.grid(alpha=0.3)
        return _png(fig)

    def generation_rows(self, limit: int = 10) -> list[list[str]]:
        """Example generations of the last generating round (examples.jsonl)."""
        path = self.run_dir / EXAMPLES_FILE
        if not path.is_file():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        last = max((r.get("round", 0) for r in rows), default=0)
        return [[str(r.get("round")), r.get("prompt", ""), r.get("generated", ""),
                 " | ".join(r.get("references", [])[:3])]
                for r in rows if r.get("round") == last][:limit]

    def canary_exposure(self) -> tuple[str, list[list[str]]] | None:
        """(note, rows) of the canary exposure audit (canary_exposure.json, written by
        `confide audit empirical` on a causal-lm run; numbers only, never the secrets)."""
        from confide.audit.canary import summary_note, summary_rows

        try:
            record = json.loads((self.run_dir / CANARY_EXPOSURE_FILE).read_text())
            return summary_note(record), summary_rows(record)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _epsilon_plot(self) -> bytes:
        fig, ax = plt.subplots(figsize=(7, 4))
        partners = self.result.example_level
        if len(partners) > PLOT_PARTNERS_MAX:  # a band, not one line (and legend) each
            rounds = sorted({r for rep in partners.values() for r in rep.rounds})
            at = [[_step_value(rep.rounds, rep.epsilons, r) for rep in partners.values()]
                  for r in rounds]
            ax.fill_between(rounds, [min(v) for v in at], [max(v) for v in at], step="post",
                            alpha=0.3, label=f"{len(partners)} partners: min-max")
            ax.step(rounds, [float(np.median(v)) for v in at], where="post", marker="o",
                    label="median partner")
        for partner, rep in sorted(partners.items()) if len(partners) <= PLOT_PARTNERS_MAX \
                else ():
            line = ax.step(rep.rounds, rep.epsilons, where="post", marker="o",
                           label=f"{partner} ({rep.method})")[0]
            if rep.method != "rdp":
                ax.step(rep.rounds, rep.rdp_epsilons, where="post", linestyle=":",
                        color=line.get_color())
        client = self.result.client_level
        if client is not None and client.epsilons:
            ax.plot(client.rounds, client.epsilons, "k--", marker="s", label="client-level")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.set_ylabel("cumulative epsilon")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        return _png(fig)

    def _accuracy_plot(self) -> bytes:
        fig, ax = plt.subplots(figsize=(7, 4))
        rounds = [m["round"] for m in self.metrics]
        # None (not evaluated) plots as a gap; the stubs do not list None
        accuracy = [m.get("accuracy") for m in self.metrics]
        ax.plot(rounds, accuracy, "o-", label="accuracy")  # type: ignore[arg-type]  # gaps
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.set_ylabel("accuracy")
        ax2 = ax.twinx()
        loss = [m.get("loss") for m in self.metrics]
        ax2.plot(rounds, loss, "s--", color="tab:red", label="loss")  # type: ignore[arg-type]  # gaps
        ax2.set_ylabel("loss")
        fig.legend(loc="upper right", fontsize="small")
        ax.grid(alpha=0.3)
        return _png(fig)

    # -- tables -------------------------------------------------------------------------
    def tables(self) -> _Tables:
        t = _Tables()
        secagg = {e.round: e for e in self.events if isinstance(e, ev.SecureAggregationEvent)}
        for e in self.events:
            if isinstance(e, ev.RoundCompleted):
                sa = secagg.get(e.round)
                t.participation.append([
                    str(e.round), str(len(e.replied)), str(len(e.aggregated)),
                    ", ".join(e.dropped) or "-",
                    "-" if sa is None else f"{len(sa.participants)} / {len(sa.dropouts)}",
                    _num(e.accuracy), _num(e.loss)])
            elif isinstance(e, ev.ExampleDpEvent | ev.ClientDpEvent):
                # each mechanism names and describes itself (confide.privacy.mechanisms)
                who = e.partner if isinstance(e, ev.ExampleDpEvent) else "all"
                late = getattr(e, "recorded_in_round", None)  # a lost reply, recorded later
                t.mechanisms.append([
                    str(e.round) if late is None else f"{e.round} (recorded in {late})",
                    f"{e.mechanism.title} [{e.mechanism.kind}]", who,
                    f"{e.mechanism.describe()}, delta={e.delta:g}", _num(e.epsilon_claimed)])
            elif isinstance(e, ev.SecureAggregationEvent):
                t.mechanisms.append([
                    str(e.round), "secure aggregation", f"{len(e.participants)} clients",
                    f"threshold={e.threshold}, bits={e.bits}, neighbours={e.neighbours}, "
                    f"dropouts={len(e.dropouts)}", "-"])
            elif isinstance(e, ev.BudgetRefusal):
                t.mechanisms.append([
                    str(e.round), "budget refusal", e.partner,
                    f"spent={e.spent_epsilon:.4g}, would be={e.would_be_epsilon:.4g}, "
                    f"max={e.max_epsilon:g}", "-"])
            elif isinstance(e, ev.ModelDigest):
                t.digests.append([str(e.round), e.sha256])
        return t

    def synthetic(self) -> bool:
        """Whether the run trained on the generated demo corpus (summary.json says so)."""
        path = Path(self.run_dir) / SUMMARY_FILE
        try:
            return bool(json.loads(path.read_text()).get("synthetic_data"))
        except (OSError, ValueError):
            return False

    def preflight(self) -> tuple[str, str, list[list[str]]] | None:
        """(verdict, note, rows) of the pre-flight check in summary.json; None when the run
        has none (preflight = 'off', or an older run)."""
        try:
            pre = json.loads((self.run_dir / SUMMARY_FILE).read_text()).get("preflight")
        except (OSError, ValueError):
            return None
        if not isinstance(pre, dict):
            return None
        rows = [[str(m.get("mechanism")), str(m.get("verdict")), _num(m.get("ratio")),
                 str(m.get("reason", "")), "; ".join(m.get("suggestions") or []) or "-"]
                for m in pre.get("mechanisms") or []]
        note = (f"d = {pre.get('trainable_parameters')}, {pre.get('partners_per_round')} "
                f"partners per round, {plural(int(pre.get('rounds') or 0), 'round')}; "
                f"{pre.get('note', '')}")
        return str(pre.get("verdict")), note, rows

    # -- output -------------------------------------------------------------------------
    def over_target_note(self) -> str | None:
        """In words, when a partner's replayed epsilon is above the run's target."""
        r = self.result
        over = over_target({p: rep.final for p, rep in r.example_level.items()},
                           r.target_epsilon)
        return over_target_text(over, r.target_epsilon) if over and r.target_epsilon \
            is not None else None

    def guarantee_line(self) -> str:
        """What the final-epsilon table states: (epsilon, delta), and delta's override."""
        return ("Example-level DP per partner, cumulative over the run: (epsilon, delta) "
                f"with {delta_statement(self.result.delta, self.result.large_delta)}.")

    def html(self) -> str:
        r = self.result
        verdict = r.verdict
        colour = {PASS: "#1a7f37", FAIL: "#cf222e"}.get(verdict, "#9a6700")
        t = self.tables()
        parts = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<title>Confide privacy report: {_e(str(self.run_dir))}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
            "padding:3px 8px;font-size:13px;text-align:left}pre{background:#f6f8fa;"
            "padding:1em;overflow-x:auto}code{font-size:12px}</style></head><body>",
            f"<h1>Confide privacy report</h1><p>{_e(str(self.run_dir))}</p>",
            *([f"<p style='color:#9a6700'><b>{_e(SYNTHETIC_NOTE)}</b></p>"]
              if self.synthetic() else []),
            f"<h2>Verification: <span style='color:{colour}'>{verdict}</span></h2>",
            f"<pre>{_e(render_verdict(r))}</pre>"]
        if (pre := self.preflight()) is not None:
            parts.append(f"<h2>Pre-flight check: {_e(pre[0])}</h2><p>{_e(pre[1])}</p>"
                         + _html_table(PREFLIGHT_HEADER, pre[2]))
        for fig in self.figures():
            data = base64.b64encode(fig.png).decode("ascii")
            parts.append(f"<h2>{_e(fig.title)}</h2><img alt='{fig.name}' "
                         f"src='data:image/png;base64,{data}'>")
        if gen := self.generation_rows():
            parts.append("<h2>Example generations (greedy, evaluation prompts)</h2>"
                         + _html_table(GENERATION_HEADER, gen))
        if (canary := self.canary_exposure()) is not None:
            parts.append(f"<h2>{CANARY_TITLE}</h2><p>{_e(canary[0])}</p>"
                         + _html_table(CANARY_HEADER, canary[1]))
        eps_rows = self._epsilon_rows()
        if (note := self.over_target_note()) is not None:
            parts.append(f"<p style='color:#cf222e'><b>{_e(note)}</b></p>")
        parts.append(f"<h2>Final epsilon per partner ({len(eps_rows)} partners; click a "
                     f"column to sort)</h2><p>{_e(self.guarantee_line())}</p>"
                     + _html_table(EPSILON_HEADER, eps_rows, sortable=True,
                                   scroll=len(eps_rows) > PLOT_PARTNERS_MAX))
        parts.append("<h2>Participation and dropouts</h2>" + _html_table(
            ["round", "replied", "aggregated", "dropped", "secagg participants / dropouts",
             "accuracy", "loss"], t.participation))
        parts.append("<h2>Mechanisms and parameters</h2>" + _html_table(
            ["round", "mechanism", "who", "parameters", "epsilon claimed"], t.mechanisms))
        parts.append("<h2>Model digests (SHA-256)</h2>" + _html_table(
            ["round", "sha256"], t.digests))
        parts.append("</body></html>")
        return "\n".join(parts)

    def markdown(self, asset_dir: Path, md_path: Path) -> str:
        r = self.result
        t = self.tables()
        lines = [f"# Confide privacy report: `{self.run_dir}`", "",
                 *([f"**{SYNTHETIC_NOTE}**", ""] if self.synthetic() else []),
                 f"## Verification: **{r.verdict}**", "", "```",
                 render_verdict(r), "```", ""]
        if (pre := self.preflight()) is not None:
            lines += [f"## Pre-flight check: {pre[0]}", "", pre[1], "",
                      *_md_table(PREFLIGHT_HEADER, pre[2]), ""]
        asset_dir.mkdir(parents=True, exist_ok=True)
        for fig in self.figures():
            path = asset_dir / f"{fig.name}.png"
            atomic_write_bytes(path, fig.png)
            rel = path.relative_to(md_path.parent) if path.is_relative_to(md_path.parent) \
                else path
            lines += [f"## {fig.title}", "", f"![{fig.name}]({rel.as_posix()})", ""]
        if gen := self.generation_rows():
            lines += ["## Example generations (greedy, evaluation prompts)", "",
                      *_md_table(GENERATION_HEADER, gen), ""]
        if (canary := self.canary_exposure()) is not None:
            lines += [f"## {CANARY_TITLE}", "", canary[0], "",
                      *_md_table(CANARY_HEADER, canary[1]), ""]
        if (note := self.over_target_note()) is not None:
            lines += [f"**{note}**", ""]
        lines += ["## Final epsilon per partner", "", self.guarantee_line(), "",
                  *_md_table(EPSILON_HEADER, self._epsilon_rows()), "",
                  "## Participation and dropouts", "",
                  *_md_table(["round", "replied", "aggregated", "dropped",
                              "secagg participants / dropouts", "accuracy", "loss"],
                             t.participation), "",
                  "## Mechanisms and parameters", "",
                  *_md_table(["round", "mechanism", "who", "parameters", "epsilon claimed"],
                             t.mechanisms), "",
                  "## Model digests (SHA-256)", "", *_md_table(["round", "sha256"], t.digests),
                  ""]
        return "\n".join(lines)

    def _epsilon_rows(self) -> list[list[str]]:
        """Every partner (the full table; the console shows a summary above 20): claimed
        and replayed epsilon, rounds it trained in and rounds it refused (ledger)."""
        trained: dict[str, set[int]] = {}
        refused: dict[str, list[int]] = {}
        for e in self.events:
            if isinstance(e, ev.ExampleDpEvent):
                trained.setdefault(e.partner, set()).add(e.round)
            elif isinstance(e, ev.BudgetRefusal):
                refused.setdefault(e.partner, []).append(e.round)
        rows = []
        for p in sorted({*self.result.example_level, *refused}):
            rounds = ", ".join(map(str, sorted(refused.get(p, [])))) or "-"
            rep = self.result.example_level.get(p)
            if rep is None:  # refused every round it was asked: no release, no epsilon
                rows.append([p, "-", "-", "-", "-", "0", rounds])
                continue
            rows.append([p, _num(self.result.claimed_example.get(p)),
                         f"{_num(rep.final)} ({rep.method})", _num(rep.pld_epsilon),
                         _num(rep.final_rdp), str(len(trained.get(p, ()))), rounds])
        client = self.result.client_level
        if client is not None and client.final is not None:
            rows.append(["client-level", "-", _num(client.final), "-", "-", "-", "-"])
        return rows


def write_report(run_dir: Path | str, out_html: Path | str | None = None,
                 out_md: Path | str | None = None, result: VerifyResult | None = None
                 ) -> tuple[Path, Path]:
    """Write RUN_DIR/report.html and RUN_DIR/report.md (or the given paths); the Markdown's
    PNGs go to `<md stem>_assets/`. Returns (html path, markdown path)."""
    run_dir = Path(run_dir)
    html_path = Path(out_html) if out_html else run_dir / REPORT_HTML_FILE
    md_path = Path(out_md) if out_md else run_dir / REPORT_MD_FILE
    report = RunReport(run_dir, result)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(html_path, report.html().encode())
    md_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(md_path, report.markdown(md_path.parent / f"{md_path.stem}_assets",
                                           md_path).encode())
    return html_path, md_path


class ReportWriteError(ConfideError, RuntimeError):
    """A finished run's report could not be written (disk full, permissions). The run's
    results stand; the message names the command that writes the report later."""

    exit_status = 1


def write_report_after_run(run_dir: Path | str, rounds_completed: int,
                           warn: Callable[[str], None]) -> tuple[Path, Path] | None:
    """A driver's last step once its run has completed: RUN_DIR/report.html and report.md.

    The ServerApp does not write them (a run started with plain `flwr run` gets its report
    from `confide audit report RUN_DIR`). An OSError is a ReportWriteError; any other
    failure goes to `warn` and returns None: the ledger, summary and model are complete
    and verify without the plots."""
    try:
        return write_report(run_dir)
    except OSError as exc:
        raise ReportWriteError(
            f"the run finished ({plural(rounds_completed, 'round')}: ledger, summary.json and "
            f"model/ are written), but its report could not be: {exc}. After freeing "
            f"space: confide audit report {run_dir}") from exc
    except Exception as exc:  # the run's results stand even if plotting fails
        warn(f"report.html could not be written: {exc} (later: confide audit report "
             f"{run_dir})")
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="confide audit report",
                                     description="Write an HTML + Markdown privacy report.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--html", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args(argv)
    if (problem := not_a_run(args.run_dir)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    html_path, md_path = write_report(args.run_dir, args.html, args.md)
    print(f"wrote {html_path} and {md_path}")
    return 0


# -- helpers ----------------------------------------------------------------------------

def _parses(entry: dict[str, Any]) -> bool:
    try:
        ev.parse_payload(entry["type"], entry["payload"])
    except (ev.PayloadError, KeyError, TypeError):
        return False
    return True


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows: dict[int, dict[str, Any]] = {}
    for text in path.read_text().splitlines():
        try:
            row = json.loads(text)
            rows[int(row["round"])] = row
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return [rows[r] for r in sorted(rows)]


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _html_table(header: list[str], rows: list[list[str]], *, sortable: bool = False,
                scroll: bool = False) -> str:
    """sortable: a click on a header sorts by that column (numbers as numbers; inline
    script, the report stays one file); scroll: a fixed-height box for long tables."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    attrs = " class='sortable'" if sortable else ""
    table = f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if sortable:
        table += SORT_SCRIPT
    return f"<div style='max-height:480px;overflow:auto'>{table}</div>" if scroll else table


def _step_value(rounds: list[int], values: list[float], at: int) -> float:
    """A cumulative curve's value at round `at` (its last value at or before it)."""
    out = 0.0
    for r, v in zip(rounds, values, strict=True):
        if r > at:
            break
        out = v
    return out


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return out if rows else [*out, "| " + " | ".join("-" for _ in header) + " |"]


if __name__ == "__main__":
    sys.exit(main())
