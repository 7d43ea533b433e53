"""End to end on loopback with Flower's real processes: a SuperLink with TLS and node
authentication, partner SuperNodes started by `confide deploy supernode`, `confide deploy
run` (the docs' `flwr run --stream`) of the signed app, and the refusals that matter
(unregistered node key, untrusted app publisher). The operational checks ride along on the
same federation: the streamed log, the node's state folder and threads, the exit status of runs
that fail, a run with no partner budget left, and stopping the SuperLink during a run.
The restart test's run is a causal-lm run on the same nodes (each partner's
file carries both tasks' columns), so language-model deployment costs no extra federation.

One federation serves the module (starting it costs ~20 s); tests run in file order.
Each ClientApp call is a fresh `flwr-clientapp` process that imports torch, so a round takes
tens of seconds on 2 cores even with the tiny model.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from confide.cli import main as confide_main
from confide.clients.node_state import STATE_FILE, NodeState
from confide.data import synthetic_sentiment
from confide.server.faults import CRASH_AFTER_ROUND_ENV, CRASH_RUN_DIR_ENV

ROOT = Path(__file__).resolve().parents[2]
PARTNERS = ("alpha", "beta", "gamma")
RUN_TIMEOUT = 600  # seconds for one run (2 rounds are ~2 min on 2 busy cores; 7 under a load of 15)
BASE_CONFIG = ("model='tiny' clients=3 max-length=16 batch-size=16 target-epsilon=4.0 "
               "max-epsilon=50.0 num-labels=2 data='partner-nodes' device='cpu' seed=7")
# The same nodes and files, the other task: the columns travel in the run config only.
CAUSAL_LM_CONFIG = (f"{BASE_CONFIG} task='causal-lm' prompt-column='request' "
                    "completion-column='reply' generate-prompts=4 max-new-tokens=4")
SENTIMENT = ("negative", "positive")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def _write_csv(path: Path, rows: int, seed: int) -> Path:
    """Both tasks' columns in one file, so the same nodes serve classification (text,label)
    and causal-lm runs (request,reply: mapped by prompt-column / completion-column)."""
    data = synthetic_sentiment(rows, seed=seed)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label", "request", "reply"])
        for text, label in zip(data.texts, (int(v) for v in data.labels), strict=True):
            writer.writerow([text, label, f"review: {text}", SENTIMENT[label]])
    return path


@dataclass
class Federation:
    root: Path
    env: dict[str, str]
    port: int
    app: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    node_args: dict[str, list[str]] = field(default_factory=dict)
    node_pgid: dict[str, int] = field(default_factory=dict)

    def confide(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "confide.cli", *args]

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("ab")
        # Own session: teardown can end the process with everything it spawned.
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def start_node(self, name: str, trusted: Path, extra: tuple[str, ...] = (),
                   roster: Path | None = None) -> None:
        args = self.node_args.setdefault(name, self.confide(
            "deploy", "supernode", "--superlink", f"127.0.0.1:{self.port}",
            "--ca", str(self.root / "pki" / "ca.crt"),
            "--key", str(self.root / "nodes" / name),
            "--data-path", str(self.root / f"{name}.csv"),
            "--state-dir", str(self.root / "state" / name),
            "--max-epsilon", "50", "--device", "cpu",
            "--trusted-publishers", str(trusted),
            "--roster", str(roster or self.root / "roster.txt"),
            "--runtime-port", str(_free_port()), *extra))
        self.node_pgid[name] = self.start(name, args).pid  # its own session and group
        _wait_for(lambda: "SuperNode ID" in self.log(name) or self.procs[name].poll()
                  is not None, 90, f"SuperNode {name} to connect")
        assert self.procs[name].poll() is None, self.log(name)[-3000:]

    def run_argv(self, out: Path, config: str) -> list[str]:
        """The docs' command: `flwr run --stream` with a filtered log and an exit status."""
        return self.confide("deploy", "run", str(self.app), "confide",
                            "--run-config", f"out='{out}' {config}")

    def flwr_run(self, out: Path, config: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.run_argv(out, config), env=self.env, capture_output=True,
                              text=True, timeout=RUN_TIMEOUT, check=False)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("deploy")
    env = {**os.environ, "FLWR_HOME": str(root / "flwr-home"), "COLUMNS": "200",
           # fault injection for the resume test: the ServerApp of that one run dies after
           # round 1 like `kill -9`
           CRASH_AFTER_ROUND_ENV: "1", CRASH_RUN_DIR_ENV: str(root / "run-resume"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    port = _free_port()
    pki_dir, nodes = root / "pki", root / "nodes"
    assert confide_main(["deploy", "init-ca", str(pki_dir)]) == 0
    assert confide_main(["deploy", "server-cert", str(pki_dir), "--name", "confide.test"]) == 0
    assert confide_main(["deploy", "publisher-key", str(pki_dir)]) == 0
    assert confide_main(["deploy", "publisher-key", str(root / "other-publisher")]) == 0
    for name in (*PARTNERS, "untrusting", "rogue"):
        assert confide_main(["deploy", "node-key", str(nodes), name]) == 0
        _write_csv(root / f"{name}.csv", 48, seed=len(name))
    _write_csv(root / "eval.csv", 64, seed=99)
    trusted, other = root / "trusted.yaml", root / "other.yaml"
    assert confide_main(["deploy", "trust-publisher", str(trusted),
                         str(pki_dir / "publisher.pub")]) == 0
    assert confide_main(["deploy", "trust-publisher", str(other),
                         str(root / "other-publisher" / "publisher.pub")]) == 0
    assert confide_main(["deploy", "stage-app", str(root / "app"),
                         "--key", str(pki_dir / "publisher.key")]) == 0
    fed = Federation(root, env, port, root / "app")
    # each partner creates its identity and sends its roster line; the operator hands every
    # partner the roster of them all
    lines = [subprocess.run(fed.confide("deploy", "partner-identity", "--state-dir",
                                        str(root / "state" / name)), env=env,
                            capture_output=True, text=True, check=True).stdout.strip()
             for name in (*PARTNERS, "untrusting")]
    (root / "roster.txt").write_text("\n".join(lines) + "\n")
    try:
        fed.start("superlink", fed.confide("deploy", "superlink", "--certs", str(pki_dir),
                                           "--state", str(root / "superlink"),
                                           "--port", str(port)))
        _wait_for(lambda: _port_open(port) or fed.procs["superlink"].poll() is not None, 60,
                  "the SuperLink port")
        assert fed.procs["superlink"].poll() is None, fed.log("superlink")
        assert confide_main(["deploy", "connection", "--flwr-home", env["FLWR_HOME"],
                             "--address", f"127.0.0.1:{port}",
                             "--ca", str(pki_dir / "ca.crt")]) == 0
        keys = [str(nodes / f"{n}.pub") for n in (*PARTNERS, "untrusting")]
        reg = subprocess.run(fed.confide("deploy", "register", *keys), env=env,
                             capture_output=True, text=True, timeout=120, check=False)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        assert reg.stdout.count("registered successfully") == 4, reg.stdout
        for name in PARTNERS:
            fed.start_node(name, trusted)
        # Registered, but trusts only another publisher: must refuse this app's bundle.
        fed.start_node("untrusting", other)
        yield fed
    finally:
        for name in list(fed.procs):
            fed.stop(name)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_run_folder(run_dir: Path, rounds: int) -> dict:
    for name in ("config.toml", "metrics.jsonl", "summary.json", "ledger.jsonl",
                 "report.html", "model"):
        assert (run_dir / name).exists(), f"{name} missing from {sorted(os.listdir(run_dir))}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == rounds
    assert [m["round"] for m in _metrics(run_dir)] == list(range(1, rounds + 1))
    assert confide_main(["audit", "verify", str(run_dir)]) == 0
    return summary


def _node_state(fed: Federation, name: str) -> NodeState:
    text = (fed.root / "state" / name / STATE_FILE).read_text()
    return NodeState.from_json(text, delta=1e-5, max_epsilon=50.0)


def test_two_rounds_over_tls_with_node_auth(fed: Federation) -> None:
    # An unregistered key is refused by the SuperLink and the node gives up.
    rogue = fed.start("rogue", fed.confide(
        "deploy", "supernode", "--superlink", f"127.0.0.1:{fed.port}",
        "--ca", str(fed.root / "pki" / "ca.crt"), "--key", str(fed.root / "nodes" / "rogue"),
        "--data-path", str(fed.root / "rogue.csv"), "--state-dir", str(fed.root / "rogue-st"),
        "--max-epsilon", "5", "--trusted-publishers", str(fed.root / "trusted.yaml"),
        "--runtime-port", str(_free_port()), "--max-wait-time", "20"))
    run_dir = fed.root / "run-plain"
    result = fed.flwr_run(run_dir, f"{BASE_CONFIG} rounds=2 eval-data='{fed.root}/eval.csv'")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = _check_run_folder(run_dir, rounds=2)
    assert summary["secure_aggregation"] is False
    for m in _metrics(run_dir):
        # 4 registered nodes sampled; the untrusting node refused the bundle.
        assert m["num_clients_sampled"] == 4, m
        assert m["num_clients_aggregated"] == 3, m
        assert len(m["epsilon_example_level"]) == 3, m
    for name in PARTNERS:
        assert len(_node_state(fed, name).accountant.state_dict()["history"]) == 2
    # The refused bundle's code never ran on the untrusting node: its state is the one its
    # `partner-identity` wrote (no message handled, nothing spent).
    untrusting = _node_state(fed, "untrusting")
    assert untrusting.handled == [] and untrusting.accountant.state_dict()["history"] == []
    # the docs say what really happens: status 1, Flower's code 305 in the log
    assert rogue.wait(90) == 1, fed.log("rogue")
    assert "Exit Code: 305" in fed.log("rogue"), fed.log("rogue")[-3000:]
    assert "Failed to activate SuperNode" in fed.log("rogue"), fed.log("rogue")[-3000:]
    assert "No SuperNode found with the given public key" in fed.log("superlink")
    # one line per round with its result; every line once; no known notices
    log = result.stdout
    for r in (1, 2):
        assert log.count(f"Confide round {r}/2: accuracy ") == 1, log[-4000:]
    assert "example-level epsilon max" in log
    assert log.count("sampled 4 of 4 connected nodes") == 2, log[-4000:]  # was 4
    assert "fraction_evaluate" not in log and "Traceback" not in log, log[-4000:]
    for name in PARTNERS:
        node_log = fed.log(name)
        assert "UserWarning" not in node_log, node_log[-3000:]
        # no heartbeat meets a revoked task token at the end of a ClientApp's task
        assert "1008" not in node_log and "401 Unauthorized" not in node_log, node_log[-3000:]
        # the ClientApp's lines in a redirected log carry no colour codes
        ours = [line for line in node_log.splitlines() if "this node trains with" in line]
        assert ours and not any("\x1b[" in line for line in ours), ours
        assert len(re.findall(r"partner p-\w+ round 1: ", node_log)) == 1, node_log[-3000:]
        # threads divided between the nodes on this machine
        assert re.search(r"this node trains with \d+ CPU threads", node_log), node_log[-3000:]
        # Flower's files (the app bundles) stay in the node's state folder
        assert any((fed.root / "state" / name / "flwr" / "apps").iterdir())


def test_restarted_node_remembers_spent_budget_across_tasks(fed: Federation) -> None:
    # A causal-lm run on the same nodes: `flwr run` carries the task and
    # the column mapping to the nodes, which read their own request,reply columns; the
    # budget a partner spent on classification counts against the language-model run.
    fed.stop("untrusting")  # done with it; frees CPU
    before = _node_state(fed, "alpha")
    spent_before = before.accountant.epsilon()
    fed.stop("alpha")
    fed.start_node("alpha", fed.root / "trusted.yaml")
    run_dir = fed.root / "run-after-restart"
    result = fed.flwr_run(run_dir, f"{CAUSAL_LM_CONFIG} rounds=1 "
                                   f"eval-data='{fed.root}/eval.csv'")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = _check_run_folder(run_dir, rounds=1)  # includes `confide audit verify`
    assert 'task = "causal-lm"' in (run_dir / "config.toml").read_text()
    (row,) = _metrics(run_dir)
    assert row["num_clients_aggregated"] == 3, row
    assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1, row
    assert {"bleu", "rouge_l"} <= set(row), row  # generation at the end, on the server
    assert set(row["epsilon_example_level"]) == set(summary["privacy"]["example_level"])
    assert len(row["epsilon_example_level"]) == 3, row
    generated = [json.loads(x) for x in (run_dir / "examples.jsonl").read_text().splitlines()]
    assert len(generated) == 4 and all(g["references"][0] in SENTIMENT for g in generated)
    assert "Confide round 1/1: perplexity " in result.stdout, result.stdout[-4000:]
    after = _node_state(fed, "alpha")
    assert after.pseudonym == before.pseudonym  # same node identity, reloaded from disk
    assert len(after.accountant.state_dict()["history"]) == 3
    # A run reports its own share; the budget guard composes everything the node spent.
    reported = row["epsilon_example_level"][before.pseudonym]
    total = after.accountant.epsilon()
    assert total > spent_before > 0 and total > reported + 1e-6


def test_secure_aggregation_round_trip(fed: Federation) -> None:
    # the plain round trip is the first test's run; this one differs only in the key
    run_dir = fed.root / "run-secure"
    result = fed.flwr_run(run_dir, f"{BASE_CONFIG} rounds=2 secure-aggregation=true "
                                   f"eval-data='{fed.root}/eval.csv'")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = _check_run_folder(run_dir, rounds=2)
    assert summary["secure_aggregation"] is True
    # with secure aggregation, example DP defaults to noise shared inside the secure sum
    # (example-dp-noise = 'auto'); the audit above replayed its events
    assert "example-dp-noise = \"shared\"" in (run_dir / "config.toml").read_text()
    assert all(m["shared_noise_shares"] >= 1 for m in _metrics(run_dir))


def test_killed_server_resumes_with_continuous_ledger_and_same_epsilon(fed: Federation) -> None:
    run_dir = fed.root / "run-resume"
    config = f"{BASE_CONFIG} rounds=2 eval-data='{fed.root}/eval.csv'"
    fed.flwr_run(run_dir, config)  # the ServerApp process dies after round 1
    assert not (run_dir / "summary.json").exists()
    assert [m["round"] for m in _metrics(run_dir)] == [1]
    result = fed.flwr_run(run_dir, f"{config} resume=true")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    _check_run_folder(run_dir, rounds=2)  # includes `confide audit verify` on the chain
    entries = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert [e["index"] for e in entries] == list(range(len(entries)))
    assert [e["type"] for e in entries].count("run_resumed") == 1
    # each run reports its own share; the same mechanism events give the same epsilon as
    # the uninterrupted 2-round run of the first test
    plain = _metrics(fed.root / "run-plain")[-1]["epsilon_example_level"]
    resumed = _metrics(run_dir)[-1]["epsilon_example_level"]
    assert set(resumed) == set(plain)
    for partner, eps in resumed.items():
        assert eps == pytest.approx(plain[partner], rel=1e-9)


def test_runs_that_cannot_proceed_exit_non_zero_with_one_message(fed: Federation) -> None:
    # `flwr run` exited 0 and showed the message inside a traceback, twice
    taken = fed.flwr_run(fed.root / "run-plain", f"{BASE_CONFIG} rounds=1 "
                                                 f"eval-data='{fed.root}/eval.csv'")
    shown = taken.stdout + taken.stderr
    assert taken.returncode == 1, shown[-4000:]
    assert shown.count("already holds a run") == 1, shown[-4000:]
    assert "confide deploy run: error: run" in taken.stderr and "Traceback" not in shown
    assert (fed.root / "run-plain" / "summary.json").exists()  # the finished run untouched
    # every partner has spent more than this run allows (the run's max-epsilon 1 is
    # below what each spent in the runs above: as with `--max-epsilon 8` after one default
    # run): the run stops at round 1, says why, and exits non-zero
    spent = {n: _node_state(fed, n).accountant.epsilon() for n in PARTNERS}
    assert min(spent.values()) > 1.0
    config = BASE_CONFIG.replace("target-epsilon=4.0", "target-epsilon=1.0").replace(
        "max-epsilon=50.0", "max-epsilon=1.0")
    run_dir = fed.root / "run-no-budget"
    result = fed.flwr_run(run_dir, f"{config} rounds=3 eval-data='{fed.root}/eval.csv'")
    shown = result.stdout + result.stderr
    assert result.returncode == 1, shown[-4000:]
    assert shown.count("every partner refused round 1") == 1, shown[-4000:]
    assert "smallest remaining budget" in result.stderr and "Traceback" not in shown
    assert "Confide round" not in shown  # no round was completed
    assert not (run_dir / "summary.json").exists()
    # a consistent record of a run that stopped before run_finished: INCOMPLETE (exit 3)
    assert confide_main(["audit", "verify", str(run_dir)]) == 3
    assert {n: _node_state(fed, n).accountant.epsilon() for n in PARTNERS} == spent


def test_an_operator_partner_not_on_the_roster_gets_nothing(fed: Federation) -> None:
    """The operator registers a node of its own (an impostor with an identity of its own and
    a roster that lists it) to sit in the honest partners' neighbourhoods: every honest
    partner refuses the key directory, signed, and nothing is unmasked."""
    nodes = fed.root / "nodes"
    assert confide_main(["deploy", "node-key", str(nodes), "impostor"]) == 0
    _write_csv(fed.root / "impostor.csv", 48, seed=3)
    reg = subprocess.run(fed.confide("deploy", "register", str(nodes / "impostor.pub")),
                         env=fed.env, capture_output=True, text=True, timeout=120, check=False)
    assert reg.returncode == 0, reg.stdout + reg.stderr
    line = subprocess.run(fed.confide("deploy", "partner-identity", "--state-dir",
                                      str(fed.root / "state" / "impostor")), env=fed.env,
                          capture_output=True, text=True, check=True).stdout.strip()
    own_roster = fed.root / "impostor-roster.txt"
    own_roster.write_text((fed.root / "roster.txt").read_text() + line + "\n")
    fed.start_node("impostor", fed.root / "trusted.yaml", roster=own_roster)
    try:
        run_dir = fed.root / "run-impostor"
        result = fed.flwr_run(run_dir, f"{BASE_CONFIG} rounds=1 secure-aggregation=true "
                                       f"eval-data='{fed.root}/eval.csv'")
        shown = result.stdout + result.stderr
        entries = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
        rounds = [e["payload"] for e in entries if e["type"] == "secure_aggregation"]
        assert rounds and rounds[0]["aborted"] is not None, shown[-4000:]
        refusals = rounds[0].get("refusals", [])
        honest = {_node_state(fed, n).public_key.hex() for n in PARTNERS}
        assert {r["identity"] for r in refusals} == honest, refusals
        assert all("not on this partner's federation roster" in r["reason"]
                   for r in refusals)
        # the audit checks each refusal's signature
        assert confide_main(["audit", "verify", str(run_dir)]) in (0, 3)
    finally:
        fed.stop("impostor")


# A malicious server (tests only): its secure round tells the first half of the survivors
# "the others dropped" and the second half the reverse, to get a self-mask seed from some
# holders and the mask key from others. Patched into a copy of the app, which the
# federation's trusted publisher signs: the partners run it as they would any release.
_EQUIVOCATION_ANCHOR = "        train = train or set()\n        messages = []\n"
_EQUIVOCATION = _EQUIVOCATION_ANCHOR + """\
        for _node, _part in parts.items():
            for _key in [k for k in _part if k.startswith(W.UNMASK_REQUEST + "/")]:
                _session = self.sessions[int(_key.split("/")[1])]
                _honest = UnmaskRequest.from_bytes(bytes(_part[_key]))
                _ids = sorted(_honest.survivors)
                _a, _b = set(_ids[:len(_ids) // 2]), set(_ids[len(_ids) // 2:])
                _mine, _other = (_a, _b) if _session.ids[_node] in _a else (_b, _a)
                _part[_key] = UnmaskRequest(
                    _honest.session_id, _honest.round, survivors=tuple(sorted(_mine)),
                    dropped=tuple(sorted(_other)), votes=_honest.votes).to_bytes()
"""


def test_an_equivocating_server_gets_no_share_over_tls(fed: Federation) -> None:
    """The secure round of a staged, signed app whose server equivocates on the survivor
    list: every partner refuses to unmask (signed), and the round releases nothing."""
    import shutil

    source = fed.root / "malicious-source"
    shutil.copytree(ROOT / "confide", source / "confide",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", source / "pyproject.toml")
    secure_round = source / "confide" / "server" / "secure_round.py"
    text = secure_round.read_text()
    assert _EQUIVOCATION_ANCHOR in text
    secure_round.write_text(text.replace(_EQUIVOCATION_ANCHOR, _EQUIVOCATION, 1))
    app = fed.root / "malicious-app"
    assert confide_main(["deploy", "stage-app", str(app), "--key",
                         str(fed.root / "pki" / "publisher.key"), "--source", str(source)]) == 0
    run_dir = fed.root / "run-equivocation"
    argv = fed.confide("deploy", "run", str(app), "confide", "--run-config",
                       f"out='{run_dir}' {BASE_CONFIG} rounds=1 secure-aggregation=true "
                       f"eval-data='{fed.root}/eval.csv'")
    result = subprocess.run(argv, env=fed.env, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT, check=False)
    shown = result.stdout + result.stderr
    entries = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    rounds = [e["payload"] for e in entries if e["type"] == "secure_aggregation"]
    assert rounds and rounds[0]["aborted"] is not None, shown[-4000:]
    refusals = [r for r in rounds[0].get("refusals", []) if r["stage"] == "unmask"]
    honest = {_node_state(fed, n).public_key.hex() for n in PARTNERS}
    assert {r["identity"] for r in refusals} == honest, (refusals, shown[-3000:])


def test_a_server_chosen_delta_is_refused_by_every_partner_over_tls(fed: Federation) -> None:
    """The operator asks for delta 0.5 (and overrides its own check): each partner's
    policy caps delta at 1/(10 x its rows) and refuses before loading or spending
    anything, so the run stops and no partner's accountant takes that delta."""
    before = {n: _node_state(fed, n).accountant.state_dict() for n in PARTNERS}
    run_dir = fed.root / "run-large-delta"
    result = fed.flwr_run(run_dir, f"{BASE_CONFIG} rounds=1 delta=0.5 allow-large-delta=true "
                                   f"eval-data='{fed.root}/eval.csv'")
    shown = result.stdout + result.stderr
    assert result.returncode != 0, shown[-4000:]
    assert not (run_dir / "summary.json").exists()
    for name in PARTNERS:
        # still pinned to 1e-5 (from_json refuses another delta), nothing spent
        assert _node_state(fed, name).accountant.state_dict() == before[name]


def _serverapps(port: int) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if any(a.endswith((b"flwr-serverapp", b"flower-superexec")) for a in argv[:2]) \
                    and f"127.0.0.1:{port}".encode() in b" ".join(argv):
                found.append(int(cmdline.parent.name))
    return found


def _group(pgid: int) -> dict[int, str]:
    """Live processes of process group `pgid`: pid -> command line."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
                found[int(stat.parent.name)] = b" ".join(argv).decode(errors="replace")
    return found


def _clientapps(fed: Federation, name: str) -> list[int]:
    return [pid for pid, cmd in _group(fed.procs[name].pid).items() if "flwr-clientapp" in cmd]


def test_superlink_stops_within_15_s_of_sigterm_during_a_run(fed: Federation) -> None:
    # Flower's SuperLink waited for the run's log stream and never stopped; a partner's
    # ClientApp of the round in flight then outlived its SuperNode (hung, reparented to
    # init). Last test of the module: the federation is gone afterwards.
    log = (fed.root / "run-sigterm.log").open("w")
    run = subprocess.Popen(fed.run_argv(fed.root / "run-sigterm",
                                        f"{BASE_CONFIG} rounds=2 eval-data='{fed.root}/"
                                        "eval.csv'"),
                           env=fed.env, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        _wait_for(lambda: "round 1: sampled" in fed.log("run-sigterm")
                  or run.poll() is not None, 120, "round 1 of the run to start")
        assert run.poll() is None and _serverapps(fed.port), fed.log("run-sigterm")[-3000:]
        # mid-round: every partner's ClientApp is working on it
        _wait_for(lambda: all(_clientapps(fed, n) for n in PARTNERS), 120,
                  "every partner's ClientApp of round 1")
        superlink = fed.procs.pop("superlink")
        start = time.monotonic()
        os.killpg(superlink.pid, signal.SIGTERM)  # as a service manager stops it
        superlink.wait(15)
        assert time.monotonic() - start < 15
        assert "stopped on request" in fed.log("superlink")
        time.sleep(0.5)
        assert _serverapps(fed.port) == []  # the ServerApp's own session is stopped too
        # each partner stops its SuperNode alone (`kill PID`, a service manager stopping
        # its main process): nothing of that node may remain, its ClientApps included
        for name in PARTNERS:
            node = fed.procs.pop(name)
            node.send_signal(signal.SIGTERM)
            node.wait(20)
        deadline = time.monotonic() + 20
        left = {}
        while time.monotonic() < deadline:
            left = {n: _group(fed.node_pgid[n]) for n in PARTNERS}
            if not any(left.values()):
                break
            time.sleep(0.5)
        assert not any(left.values()), f"stray processes after their SuperNode: {left}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        run.wait(10)
        log.close()
