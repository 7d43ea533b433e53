"""Run README's CPU-sized examples exactly as written and check each reaches what it states.

Every command example in README.md and docs/*.md that runs something carries, on the comment
line(s) right above it inside its code block, its expected time and result:

    # about 4 min on 2 CPU cores; expect: accuracy >= 0.70 (0.75 measured, epsilon 5.44)
    confide simulate ...

An optional tag before the time says the example is not one a single 2-core machine runs
as written: `GPU-sized:` (the time on 2 CPU cores is stated too), `cluster-sized:` (needs
a Ray cluster) or `template:` (names files of your own, e.g. a second run). This script
parses README.md (never a copy of its commands), runs every untagged example in README order
in a scratch copy of the repository (its files, ignored ones left out, with `../shared`
linked beside it, as a fresh clone has it; HOME and Flower's ports are the script's own, so
nothing touches `~/.flwr` or another local SuperLink), checks each stated result, and prints
a table:

    python benchmarks/readme_examples.py [--only SUBSTRING ...] [--markdown FILE]

Checks an `expect:` clause may state (comma-separated, before any parenthesis):
`METRIC >= X` / `METRIC <= X` (the run's summary.json `final_metrics`), `METRIC below round 0`
(the untrained model's value, evaluated here with the run's own evaluator, is higher),
`PASS`, `exit N`, `writes PATH` and `prints "TEXT"` (alternatives joined by `or`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# programs whose command lines are examples that run something (set-up lines such as
# `pip install` and `python3 -m venv` are not)
RUNNABLE = re.compile(r"^(confide|flwr|ray)\s")
TIME = re.compile(r"\babout ([\d.,]+) ?(s|min|h)\b")
TAGS = ("GPU-sized", "cluster-sized", "template")
UNIT_SECONDS = {"s": 1.0, "min": 60.0, "h": 3600.0}
# the forms of a stated result this script can check (see the module docstring)
CHECKS = (r"[\w-]+ (>=|<=) [\d.]+", r"[\w-]+ below round 0", r"PASS", r"exit \d+",
          r"writes \S+", r"prints \"[^\"]+\"( or \"[^\"]+\")*")
OFFLINE = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}


@dataclass
class Example:
    """One command of a documented code block, with the comment above it."""

    doc: str
    line: int  # 1-based line of the command's first line
    command: str  # continuation lines joined, as bash reads it
    comments: list[str]  # the comment lines right above it
    exports: list[str] = field(default_factory=list)  # `export ...` lines before it

    @property
    def comment(self) -> str:
        """The statement: the last comment line above the command stating a result or a
        time (earlier ones may continue the previous command's trailing comment)."""
        stating = [c for c in self.comments if "expect:" in c or TIME.search(c)]
        return stating[-1] if stating else ""

    @property
    def tag(self) -> str:
        head = self.comment.split(";")[0]
        return next((t for t in TAGS if head.startswith(t)), "")

    @property
    def stated_seconds(self) -> float | None:
        m = TIME.search(self.comment)
        if not m:
            return None
        return float(m.group(1).replace(",", "")) * UNIT_SECONDS[m.group(2)]

    @property
    def states_cpu_time(self) -> bool:
        return self.stated_seconds is not None and "on 2 CPU cores" in self.comment

    @property
    def expect(self) -> str:
        """The stated result: the `expect:` clause up to its first parenthesis."""
        if "expect:" not in self.comment:
            return ""
        clause = self.comment.split("expect:", 1)[1]
        return clause.split(" (", 1)[0].strip().rstrip(";.")

    @property
    def checks(self) -> list[str]:
        return [c.strip() for c in re.split(r",\s*(?![^\"]*\"(?:[^\"]*\"[^\"]*\")*[^\"]*$)",
                                             self.expect) if c.strip()]

    @property
    def cpu_sized(self) -> bool:
        """Run by this script: a stated 2-core time and no tag."""
        return self.states_cpu_time and not self.tag

    @property
    def label(self) -> str:
        return f"{self.doc}:{self.line} {self.command}"

    def problems(self) -> list[str]:
        """What the example fails to state (empty: it states its time and result)."""
        where = f"{self.doc}:{self.line} `{self.command[:60]}`"
        found = []
        if self.stated_seconds is None:
            found.append(f"{where}: no time ('# about N s|min|h on 2 CPU cores; ...')")
        elif not self.states_cpu_time and self.tag not in ("cluster-sized", "template"):
            found.append(f"{where}: its time does not say 'on 2 CPU cores'")
        if not self.expect:
            found.append(f"{where}: no stated result ('; expect: ...')")
        elif self.cpu_sized and self.doc == "README.md":
            found += [f"{where}: the benchmark cannot check {c!r}" for c in self.checks
                      if not any(re.fullmatch(form, c) for form in CHECKS)]
        return found


def code_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(line of the first content line, info string, lines) of each fenced block."""
    blocks: list[tuple[int, str, list[str]]] = []
    current: list[str] | None = None
    info, start = "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if current is None:
                current, info, start = [], line[3:].strip(), n + 1
            else:
                blocks.append((start, info, current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def examples(doc: str, text: str) -> list[Example]:
    """Every runnable command of the shell blocks of one document, in order."""
    out: list[Example] = []
    for start, info, lines in code_blocks(text):
        if info not in ("bash", "sh", "shell", "console"):
            continue
        comment: list[str] = []
        exports: list[str] = []
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            first = start + i
            joined = line
            while joined.endswith("\\") and i + 1 < len(lines):
                i += 1
                joined = joined[:-1].rstrip() + " " + lines[i].strip()
            i += 1
            if not joined:
                continue
            if joined.startswith("#"):
                comment.append(joined.lstrip("#").strip())
                continue
            if joined.startswith("export "):
                exports.append(joined)
                continue
            if RUNNABLE.match(joined):
                out.append(Example(doc, first, joined, list(comment), list(exports)))
            comment = []
    return out


def documents(root: Path = ROOT) -> list[Path]:
    """README.md and every page of docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def documented_examples(root: Path = ROOT) -> list[Example]:
    found: list[Example] = []
    for path in documents(root):
        found += examples(str(path.relative_to(root)), path.read_text())
    return found


def readme_cpu_examples(root: Path = ROOT) -> list[Example]:
    """The README examples this script runs."""
    return [e for e in examples("README.md", (root / "README.md").read_text()) if e.cpu_sized]


# -- running ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scratch_clone(base: Path) -> Path:
    """This working tree's files (not the ignored ones) in base/clone, `../shared` linked
    beside it. The copy is the code that runs: Ray's workers import `confide` from the
    directory a simulation starts in."""
    clone = base / "clone"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / name)
    (base / "shared").symlink_to(ROOT.parent / "shared")
    return clone


def environment(base: Path) -> dict[str, str]:
    home = base / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "FLWR_"))}
    # the venv's programs first, as after README's `. .venv/bin/activate`
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # a HOME of its own: Flower's local SuperLink and config, not the user's; the model
    # cache stays the user's (the dequantised SmolLM2 is built once per machine)
    cache = os.environ.get("CONFIDE_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "confide")
    env.update(HOME=str(home), FLWR_HOME=str(home / ".flwr"), CONFIDE_CACHE_DIR=cache,
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
               FLWR_LOCAL_CONTROL_API_PORT=str(free_port()), TERM="dumb", COLUMNS="200")
    return env


def stop_processes_under(home: Path) -> None:
    """What `flwr run` started and left running for this HOME (its local SuperLink)."""
    import psutil

    procs = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(proc.info["cmdline"] or [])
            env = proc.info["environ"] or {}
            if proc.pid != os.getpid() and (str(home) in cmd or env.get("HOME") == str(home)):
                procs += [proc, *proc.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


@dataclass
class Outcome:
    example: Example
    seconds: float
    returncode: int
    output: str
    results: list[str]
    ok: bool


def run_folder(example: Example, output: str, clone: Path) -> Path | None:
    """The run folder a command wrote or read."""
    m = re.search(r"Confide: run folder (\S+)", output) or re.search(
        r"run folder (\S+)", output)
    argv = shlex.split(example.command, comments=True)
    for flag in ("--out", "--resume"):
        if flag in argv and argv.index(flag) + 1 < len(argv):
            return clone / argv[argv.index(flag) + 1]
    if m:
        return clone / m.group(1).rstrip(",.")
    positional = [a for a in argv[1:] if not a.startswith("-")]
    for word in positional:
        if (clone / word / "config.toml").exists():
            return clone / word
    return None


def round_zero(run: Path, metric: str, clone: Path) -> float:
    """The untrained model's `metric` on the run's evaluation set, by the run's evaluator."""
    from confide.config import from_flat_record, load_toml
    from confide.model import resolve_device
    from confide.tasks import build_model, get_task
    from confide.tasks.inputs import model_spec

    old = Path.cwd()
    os.chdir(clone)  # the run's data paths are relative to where it ran
    try:
        cfg = from_flat_record(load_toml(run / "config.toml"))
        if not cfg.eval_data:
            raise ValueError(f"{run}: round 0 is evaluated on the run's eval-data; it has none")
        evaluation = get_task(cfg).read(cfg.eval_data, num_labels=cfg.num_labels,
                                        max_rows=cfg.max_eval_examples)
        labels = max(2, cfg.num_labels or evaluation.num_labels)
        cfg = cfg.replace(num_labels=labels)
        model = build_model(model_spec(cfg, labels))
        result = get_task(cfg).evaluator(evaluation)(model, resolve_device(cfg.device),
                                                     round_=0, final=False)
    finally:
        os.chdir(old)
    return float(result.metrics[metric])


def check(example: Example, rc: int, output: str, clone: Path) -> tuple[list[str], bool]:
    results, ok = [], True
    summary: dict[str, Any] = {}
    run = run_folder(example, output, clone)
    if run is not None and (run / "summary.json").exists():
        summary = json.loads((run / "summary.json").read_text())
    final = summary.get("final_metrics", {})
    for item in example.checks:
        if m := re.fullmatch(r"([\w-]+) (>=|<=) ([\d.]+)", item):
            value = final.get(m.group(1))
            good = value is not None and (value >= float(m.group(3)) if m.group(2) == ">="
                                          else value <= float(m.group(3)))
            results.append(f"{m.group(1)} {value:.3f}" if value is not None
                           else f"{m.group(1)} missing")
        elif m := re.fullmatch(r"([\w-]+) below round 0", item):
            value = final.get(m.group(1))
            zero = round_zero(run, m.group(1), clone) if run is not None else None
            good = value is not None and zero is not None and value < zero
            results.append(f"{m.group(1)} {zero:.2f} -> {value:.2f}"
                           if value is not None and zero is not None
                           else f"{m.group(1)} missing")
        elif item == "PASS":
            good = rc == 0 and re.search(r"\bPASS\b", output) is not None
            results.append("PASS" if good else f"not PASS (exit {rc})")
        elif m := re.fullmatch(r"exit (\d+)", item):
            good = rc == int(m.group(1))
            results.append(f"exit {rc}")
        elif m := re.fullmatch(r"writes (\S+)", item):
            good = (clone / m.group(1).strip("`")).exists()
            results.append(f"{m.group(1)} {'written' if good else 'missing'}")
        elif item.startswith("prints "):
            texts = re.findall(r"\"([^\"]+)\"", item)
            hit = next((t for t in texts if t in output), None)
            good = hit is not None
            results.append(f'printed "{hit}"' if hit else "not printed")
        else:
            good = False
            results.append(f"unknown check {item!r}")
        ok = ok and good
    return results, ok


def run_example(example: Example, clone: Path, env: dict[str, str],
                timeout: float) -> Outcome:
    script = "\n".join([*example.exports, example.command])
    start = time.monotonic()
    try:
        proc = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True,
                              text=True, timeout=timeout)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = 124
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (
            exc.stdout or "")
    seconds = time.monotonic() - start
    results, ok = check(example, rc, output, clone)
    return Outcome(example, seconds, rc, output, results, ok)


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def table(outcomes: list[Outcome]) -> str:
    rows = ["| example | seconds | result | stated | ok |", "| --- | --- | --- | --- | --- |"]
    for o in outcomes:
        e = o.example
        command = e.command.split("  #")[0].strip()
        stated = f"{fmt_seconds(e.stated_seconds)}; {e.expect}".replace("|", "\\|")
        rows.append(f"| README.md:{e.line} `{command}` | {o.seconds:.0f} | "
                    f"{'; '.join(o.results)} (exit {o.returncode}) | {stated} | "
                    f"{'yes' if o.ok else 'NO'} |")
    return "\n".join(rows)


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM ends like Ctrl-C: subprocess.run kills the running example, `finally` stops
    # what `flwr run` left behind
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[],
                        help="run only examples whose command contains one of these")
    parser.add_argument("--list", action="store_true", help="list the examples and exit")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per example, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the scratch clone")
    args = parser.parse_args()
    chosen = readme_cpu_examples()
    if args.list:
        for e in chosen:
            print(f"{e.label}\n    {fmt_seconds(e.stated_seconds)}; expect: {e.expect}")
        return 0
    base = Path(tempfile.mkdtemp(prefix="confide-readme-"))
    clone = scratch_clone(base)
    env = environment(base)
    outcomes: list[Outcome] = []
    started = datetime.datetime.now(datetime.UTC)
    try:
        for e in chosen:
            if args.only and not any(s in e.command for s in args.only):
                continue
            print(f"running {e.label}", flush=True)
            outcome = run_example(e, clone, env, args.timeout)
            outcomes.append(outcome)
            print(f"  {outcome.seconds:.0f} s, exit {outcome.returncode}: "
                  f"{'; '.join(outcome.results)} -> {'ok' if outcome.ok else 'NOT REACHED'}",
                  flush=True)
            if not outcome.ok:
                print(outcome.output[-3000:], flush=True)
    finally:
        stop_processes_under(base / "home")
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"scratch clone kept: {clone}")
    text = table(outcomes)
    print(text)
    if args.markdown:
        load = os.getloadavg()
        only = f" --only {' '.join(args.only)}" if args.only else ""
        args.markdown.write_text(
            "# README examples, run as written\n\n"
            f"    python benchmarks/readme_examples.py{only} --markdown {args.markdown}\n\n"
            f"{started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPU cores, load average at the end "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other jobs share the machine)."
            "\n\n" + text + "\n")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
