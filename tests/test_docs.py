"""What the docs state must hold: cited tests exist, deployment facts, and every example
states its time and result (which benchmarks/readme_examples.py checks by running them)."""

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

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


def _readme_examples_module() -> Any:
    """benchmarks/readme_examples.py, which runs README's CPU-sized examples as written."""
    path = ROOT / "benchmarks" / "readme_examples.py"
    spec = importlib.util.spec_from_file_location("readme_examples", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("readme_examples", module)
    spec.loader.exec_module(module)
    return module


def test_every_documented_example_states_its_time_and_result() -> None:
    """Each command in README.md and docs/*.md that runs something says, on the comment line
    above it, about how long it takes on 2 CPU cores and what it should reach."""
    bench = _readme_examples_module()
    found = bench.documented_examples()
    docs = {e.doc for e in found}
    assert {"README.md", "docs/OPERATORS.md", "docs/PARTNERS.md"} <= docs
    problems = [p for e in found for p in e.problems()]
    assert not problems, "\n".join(problems)


def test_an_example_without_a_stated_time_or_result_is_caught() -> None:
    """The rule above fails a new example that states nothing, or only half."""
    bench = _readme_examples_module()
    doc = ("Text.\n\n```bash\nconfide simulate --rounds 1\n"
           "# about 2 min on 2 CPU cores\nconfide audit verify runs/x\n"
           "# about 1 s on 2 CPU cores; expect: looks good\nconfide audit report runs/x\n"
           "# expect: PASS\nflwr run .\n```\n")
    found = bench.examples("README.md", doc)
    assert [e.command for e in found] == ["confide simulate --rounds 1",
                                          "confide audit verify runs/x",
                                          "confide audit report runs/x", "flwr run ."]
    problems = [e.problems() for e in found]
    assert len(problems[0]) == 2  # neither time nor result
    assert problems[1] == ["README.md:6 `confide audit verify runs/x`: no stated result "
                           "('; expect: ...')"]
    assert "cannot check 'looks good'" in problems[2][0]  # README-style check it cannot run
    assert "no time" in problems[3][0]


def test_the_benchmark_runs_the_examples_the_readme_shows() -> None:
    """benchmarks/readme_examples.py parses README.md itself: the commands it runs are
    README's own lines (continuations joined), every untagged command of a README block,
    among them the real-model SST-2 and the CPU-sized SmolLM2 examples."""
    bench = _readme_examples_module()
    readme = (ROOT / "README.md").read_text()
    shown = [e for e in bench.examples("README.md", readme)]
    ran = bench.readme_cpu_examples()
    assert ran == [e for e in shown if not e.tag]
    flat = " ".join(readme.replace("\\\n", " ").split())
    for example in ran:
        assert " ".join(example.command.split()) in flat
        assert example.stated_seconds is not None and example.checks
    commands = [e.command for e in ran]
    sst2 = [e for e in ran if "../shared/data/sst2/train.csv" in e.command]
    assert len(sst2) == 1 and "tiny" not in sst2[0].command  # the packaged MiniLM
    assert any(re.fullmatch(r"accuracy >= 0\.[7-9]\d*", c) for c in sst2[0].checks)
    e2e = [e for e in ran if "model=smollm2" in e.command]
    assert len(e2e) == 1 and "perplexity below round 0" in e2e[0].checks
    assert e2e[0].stated_seconds <= 20 * 60  # CPU-sized: minutes, not hours
    gpu = [e for e in shown if e.tag == "GPU-sized"]
    assert any("model=smollm2" in e.command for e in gpu)  # the full-size run, marked
    assert any(c.startswith("confide audit verify runs/sst2") for c in commands)
    assert any(c.startswith("flwr run .") for c in commands)
