"""The bad-input table must only cite tests that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bad_inputs_table_cites_existing_tests() -> None:
    doc = (ROOT / "docs" / "BAD_INPUTS.md").read_text()
    rows = [line for line in doc.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert len(rows) >= 25
    cited = re.findall(r"`([\w/]+\.py)::(test_\w+)", doc)
    assert len(cited) >= 25
    for path, name in cited:
        source = (ROOT / "tests" / path).read_text()
        assert f"def {name}(" in source, f"docs/BAD_INPUTS.md cites missing test {path}::{name}"


def test_docs_state_the_refused_node_exit_status() -> None:
    """A refused node exits with status 1 (Flower's `flwr_exit` maps every
    error code to 1) and logs `Exit Code: 305`; the docs said it exits with code 305."""
    for name in ("OPERATORS.md", "PARTNERS.md"):
        doc = " ".join((ROOT / "docs" / name).read_text().split())
        assert "exit code 305" not in doc.lower() and "exits with code 305" not in doc
        assert "status 1" in doc and "`Exit Code: 305`" in doc, name


def test_deployment_docs_use_the_launcher_and_explain_budgets() -> None:
    """The documented run command has a meaningful exit status, and
    the docs explain lifetime vs per-run budgets, the node's files and its threads."""
    operators = " ".join((ROOT / "docs" / "OPERATORS.md").read_text().split())
    partners = " ".join((ROOT / "docs" / "PARTNERS.md").read_text().split())
    assert "flwr run /srv" not in operators and "confide deploy run /srv" in operators
    assert "lifetime" in operators and "lifetime budget" in partners
    assert "FLWR_HOME" in partners and "--threads" in partners
    rows = [int(m) for m in re.findall(r"^\| (\d+) \|", (ROOT / "docs" / "BAD_INPUTS.md")
                                       .read_text(), re.MULTILINE)]
    assert rows == list(range(1, len(rows) + 1))


def test_deployment_docs_describe_a_causal_lm_run() -> None:
    """The run config of a deployed causal-lm run and what a partner's file
    must hold (the deployment test runs it through `flwr run` on text,label files that also
    carry prompt and completion columns)."""
    operators = " ".join((ROOT / "docs" / "OPERATORS.md").read_text().split())
    partners = " ".join((ROOT / "docs" / "PARTNERS.md").read_text().split())
    for doc in (operators, partners):
        assert "prompt-column" in doc and "completion-column" in doc
        assert "text,label,prompt,completion" in doc
    assert "task='causal-lm'" in operators and "causal-lm" in partners
