"""Many partners: 100 and 1,000 virtual partners, 10% sampled per round, side by side.

Each cell is one `confide simulate` run (the product's `simulate()`, tiny model, LoRA,
example-level DP) in a process of its own, so that its peak RSS is the driver's: the
ServerApp, Flower's in-memory link state for every registered node and the Ray driver (the
partners train in Ray's actor processes). Cells:
  plain   FedAvg of the sampled partners' updates
  secure  secure aggregation (SecAgg+, sparse neighbour graph) + distributed DP
per round: seconds (metrics.jsonl `seconds`), bytes the server sent and received (every
message's arrays and byte values, counted at Flower's in-memory grid in the driver), and
the neighbours each secure-aggregation client had (ledger). Partitioning: `federated_data`
for the partner count (the synthetic demo corpus, 400 rows per partner), timed alone.

    nice python benchmarks/scale.py                       # 100 and 1,000 partners, 2 rounds
    nice python benchmarks/scale.py --partners 100 --rounds 1

Data: the synthetic demo corpus (generated template reviews, `confide.data`), 2,000 rows
or 400 per partner, 1/6 held out for evaluation (capped at 300 rows by --max-eval).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = {"plain": {}, "secure": {"secure-aggregation": True, "distributed-dp": True}}


def message_bytes(message: Any) -> int:
    """Bytes of a message's content: arrays and byte values of its config records."""
    total = 0
    content = message.content
    for record in content.array_records.values():
        total += sum(a.numpy().nbytes for a in record.values())
    for record in content.config_records.values():
        for value in record.values():
            if isinstance(value, bytes | str):
                total += len(value)
    return total


def child(partners: int, mode: str, rounds: int, out: Path, max_eval: int) -> dict[str, Any]:
    """One cell, in this process: partitioning time, then the simulation."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from confide.config import build_config
    from confide.simulation.runner import simulate
    from confide.tasks.inputs import federated_data

    counted = {"sent": 0, "received": 0}
    push, pull = InMemoryGrid.push_messages, InMemoryGrid.pull_messages

    def counting_push(self: InMemoryGrid, messages: Any) -> Any:
        messages = list(messages)
        counted["sent"] += sum(message_bytes(m) for m in messages)
        return push(self, messages)

    def counting_pull(self: InMemoryGrid, ids: Any) -> Any:
        replies = list(pull(self, ids))
        counted["received"] += sum(message_bytes(m) for m in replies if not m.has_error())
        return replies

    InMemoryGrid.push_messages = counting_push  # type: ignore[method-assign]
    InMemoryGrid.pull_messages = counting_pull  # type: ignore[method-assign,assignment]
    cfg = build_config({"model": "tiny", "clients": partners, "rounds": rounds,
                        "fraction-train": 0.1, "min-clients": 2, "max-length": 16,
                        "batch-size": 32, "physical-batch-size": 32, "local-epochs": 1.0,
                        "max-eval-examples": max_eval, "preflight": "off", "seed": 1,
                        "out": str(out), **MODES[mode]})
    t0 = time.perf_counter()
    fed = federated_data(cfg)
    partition_s = time.perf_counter() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    simulate(cfg)
    total_s = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    neighbours = []
    for line in (out / "ledger.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("type") == "secure_aggregation":
            neighbours.append(int(entry["payload"]["neighbours"]))
    return {"partners": partners, "mode": mode, "rounds": rounds,
            "partition_s": partition_s, "rows": sum(len(p) for p in fed.partitions),
            "round_s": [r["seconds"] for r in rows],
            "sampled": [r["num_clients_sampled"] for r in rows],
            "aggregated": [r["num_clients_aggregated"] for r in rows],
            "bytes_uploaded": [r["bytes_uploaded"] for r in rows],
            "server_sent": counted["sent"], "server_received": counted["received"],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_sim_mib": rss_before / 1024, "total_s": total_s,
            "neighbours": neighbours}


def run_cell(partners: int, mode: str, rounds: int, max_eval: int, timeout: float
             ) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="scale") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", str(partners), mode, str(rounds),
               str(Path(tmp) / "run"), str(result), str(max_eval)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"partners": partners, "mode": mode, "error": f"timeout {timeout:.0f} s"}
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or proc.stdout)[-1500:]
            return {"partners": partners, "mode": mode,
                    "error": f"exit {proc.returncode}: {tail}"}
        out: dict[str, Any] = json.loads(result.read_text())
        out["process_s"] = time.perf_counter() - t0
        return out


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| partners | mode | sampled/round | s/round (each round) | server peak RSS MiB | "
             "server sent MiB | server received MiB | neighbours | partitioning s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['partners']} | {r['mode']} | - | {r['error'][:200]} | | | | | |")
            continue
        rounds = max(1, len(r["round_s"]))
        lines.append(
            f"| {r['partners']} | {r['mode']} | {'/'.join(map(str, r['sampled']))} | "
            f"{' / '.join(f'{s:.1f}' for s in r['round_s'])} | {r['peak_rss_mib']:.0f} | "
            f"{mib(r['server_sent'] / rounds)} per round | "
            f"{mib(r['server_received'] / rounds)} per round | "
            f"{'/'.join(map(str, r['neighbours'])) or '-'} | {r['partition_s']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        partners, mode, rounds, out, result, max_eval = sys.argv[2:8]
        res = child(int(partners), mode, int(rounds), Path(out), int(max_eval))
        Path(result).write_text(json.dumps(res))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partners", default="100,1000")
    ap.add_argument("--modes", default="plain,secure")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-eval", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", type=Path, default=None, help="append each cell as a JSON line")
    args = ap.parse_args()
    results = []
    for n in (int(x) for x in args.partners.split(",")):
        for mode in args.modes.split(","):
            r = run_cell(n, mode, args.rounds, args.max_eval, args.timeout)
            results.append(r)
            print(json.dumps(r), flush=True)
            if args.json:
                with args.json.open("a") as fh:
                    fh.write(json.dumps(r) + "\n")
    print(table(results))
    print(f"(machine: {os.cpu_count()} CPUs; load average at the end "
          f"{os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
