"""Flower apps for `benchmarks/secagg.py`: one round-time measurement in the simulation
runtime (Ray backend), in a process of its own so that each cell starts Ray afresh.

Three ways to aggregate a float32 vector of length d from n nodes (no training):

  plain   Message API ServerApp: send the global vector to every node, each ClientApp
          replies with a random float32 delta, the server averages.
  ours    Confide's secure path: the product's server adapter (`SecureRounds.run_round`,
          the same object `Federation` drives) and node adapter (`secure_client.secure_reply`,
          what `client_app.train` / `secagg_stage` call), with a random delta in place of
          local training.
  flower  Flower's legacy API: FedAvg + DefaultWorkflow(fit_workflow=SecAggPlusWorkflow),
          NumPyClient with `secaggplus_mod` returning a random vector.

Round time is measured in the ServerApp the same way for all three: `warmup` rounds are run
first (ours: they include the two key-setup exchanges), then the wall time from the start of
the first timed round to the end of the last one, divided by the number of timed rounds.

    python benchmarks/_secagg_apps.py MODE N D OUT.json [--rounds 3] [--warmup 1] [--dp]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters
from flwr.serverapp import Grid, ServerApp

# Ray actors per simulation: one per core (2 on the benchmark machine); any n fits, nodes
# queue for the actors.
BACKEND = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"logging_level": "error", "log_to_driver": False},
}
PLAIN_KEY = "bench-vector"


def random_delta(d: int) -> np.ndarray:
    rng = np.random.default_rng()
    return (rng.random(d, dtype=np.float32) - np.float32(0.5)) * np.float32(0.02)


def _nodes(grid: Grid, n: int) -> list[int]:
    deadline = time.monotonic() + 120
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n or time.monotonic() > deadline:
            return nodes
        time.sleep(0.2)


def _result(out: Path, marks: list[tuple[float, float]], warmup: int, **extra: Any) -> None:
    timed = marks[warmup:]
    per_round = (timed[-1][1] - timed[0][0]) / len(timed)
    out.write_text(
        json.dumps(
            {
                "s_per_round": per_round,
                "round_seconds": [b - a for a, b in marks],
                "warmup": warmup,
                **extra,
            }
        )
    )


# -- plain -------------------------------------------------------------------------------
plain_client = ClientApp()


@plain_client.train()
def plain_train(msg: Message, context: Context) -> Message:
    d = msg.content[PLAIN_KEY]["w"].numpy().size
    return Message(
        RecordDict({PLAIN_KEY: ArrayRecord({"w": Array(random_delta(d))})}), reply_to=msg
    )


def plain_server(n: int, d: int, rounds: int, warmup: int, out: Path) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = _nodes(grid, n)
        weights = np.zeros(d, dtype=np.float32)
        marks, uploads = [], []
        for _ in range(warmup + rounds):
            t0 = time.perf_counter()
            messages = [
                Message(
                    RecordDict({PLAIN_KEY: ArrayRecord({"w": Array(weights)})}),
                    dst_node_id=node,
                    message_type="train",
                )
                for node in nodes
            ]
            replies = [r for r in grid.send_and_receive(messages) if not r.has_error()]
            total = np.zeros(d, dtype=np.float64)
            up = 0
            for reply in replies:
                v = reply.content[PLAIN_KEY]["w"].numpy()
                up += v.nbytes
                total += v
            weights = weights + (total / max(1, len(replies))).astype(np.float32)
            marks.append((t0, time.perf_counter()))
            uploads.append(up / max(1, len(replies)))
            assert len(replies) == n, f"{len(replies)} of {n} replied"
        _result(out, marks, warmup, upload_per_client=float(np.mean(uploads[warmup:])))

    return app


# -- ours --------------------------------------------------------------------------------
ours_client = ClientApp()


def _ours_reply(msg: Message, context: Context, train: bool) -> Message:
    from confide import wire as W
    from confide.clients import secure_client as S
    from confide.config import from_flat_record

    t0 = time.perf_counter()
    cfg = from_flat_record(dict(msg.content[W.CONFIG]))
    if not train:  # what client_app.secagg_stage does
        reply = S.secure_reply(msg, context, cfg, None, None)
        _client_seconds("secagg", t0)
        return reply
    # what client_app.train does after local training, with a random delta
    d = sum(a.numpy().size for a in msg.content[W.ARRAYS].values())
    delta = {"w": random_delta(d)}
    node = context.node_id
    plain = Message(
        RecordDict(
            {
                W.ARRAYS: W.to_array_record(delta),
                # the rows the weighted secure sum weights the update by
                W.METRICS: MetricRecord({W.NUM_EXAMPLES: 100}),
                W.STATUS: ConfigRecord(
                    {
                        W.STATUS_CODE: W.OK,
                        W.STATUS_DETAIL: "",
                        W.PARTNER: f"p{node}",
                        W.PUBLIC_KEY: f"k{node}",
                    }
                ),
            }
        ),
        reply_to=msg,
    )
    reply = S.secure_reply(msg, context, cfg, plain, delta)
    _client_seconds("train", t0)
    return reply


def _client_seconds(kind: str, t0: float) -> None:
    """--profile: append this ClientApp call's seconds to a file the runner reads."""
    path = os.environ.get("SECAGG_BENCH_PROFILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{kind} {time.perf_counter() - t0:.6f}\n")


@ours_client.train()
def ours_train(msg: Message, context: Context) -> Message:
    return _ours_reply(msg, context, True)


@ours_client.train("secagg")
def ours_secagg(msg: Message, context: Context) -> Message:
    return _ours_reply(msg, context, False)


class BenchFederation:
    """What `SecureRounds` reads from its host (confide.server.aggregation.RoundHost): no
    model, no evaluation, no ledger; replies are recorded by the product's PartnerBook."""

    first_round = True
    run_key = ""

    def __init__(self, grid: Grid, cfg: Any, d: int) -> None:
        from confide.server.partners import PartnerBook
        from confide.strategies.delta_fedavg import DeltaFedAvg

        self.grid, self.cfg, self.timeout = grid, cfg, 3600.0
        # fault injection's crash points name the run folder (never set off here)
        self.run_dir = Path(cfg.out or ".")
        self.global_state = {"w": np.zeros(d, dtype=np.float32)}
        self.book = PartnerBook(cfg)
        self.inner = DeltaFedAvg(server_learning_rate=1.0)
        self.entries = 0

    def record(self, event: Any) -> int:
        self.entries += 1
        return self.entries - 1

    def entry_hash_at(self, index: int) -> str | None:
        return None

    def server_step(self, mean_delta: Any) -> dict[str, np.ndarray]:
        return self.inner.step(self.global_state, mean_delta)

    def partner_rows_known(self, rows: list[int]) -> None:
        pass

    def exchange(self, messages: list[Message], what: str) -> list[Message]:
        from confide.server.exchange import exchange

        return exchange(self.grid, messages, timeout=self.timeout)


def ours_config(n: int, rounds: int, dp: bool, out: Path | None = None) -> Any:
    from confide.config import build_config

    values: dict[str, Any] = {
        "secure-aggregation": True,
        "example-dp": False,
        "rounds": rounds,
        "clients": n,
        "min-clients": n,
        "fraction-train": 1.0,
        "seed": 7,
    }
    if out is not None:  # a run folder: the virtual partners' identities and roster
        values["out"] = str(out)
    if dp:
        values.update(
            {
                "distributed-dp": True,
                "client-dp-noise-multiplier": 1.0,
                "client-dp-clipping-norm": 1.0,
            }
        )
    return build_config(values)


def ours_server(n: int, d: int, rounds: int, warmup: int, out: Path, dp: bool) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from confide.server.secure_round import SecureRounds

        cfg = ours_config(n, warmup + rounds, dp, out.parent / "run")
        _nodes(grid, n)
        random.seed(cfg.seed)
        fed = BenchFederation(grid, cfg, d)
        secure = SecureRounds(fed, simulation=True)  # type: ignore[arg-type]
        exchanges: list[tuple[int, float]] = []
        send = grid.send_and_receive

        def timed_send(messages, timeout=None):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            replies = send(messages, timeout=timeout)
            exchanges.append((len(list(messages)), time.perf_counter() - t))
            return replies

        grid.send_and_receive = timed_send  # type: ignore[method-assign]
        marks, uploads, info = [], [], {}
        for server_round in range(1, warmup + rounds + 1):
            t0 = time.perf_counter()
            outcome = secure.run_round(server_round, ConfigRecord(cfg.to_dict()))
            aggregated, uploaded, extra = outcome.aggregated, outcome.uploaded, outcome.metrics
            if outcome.aggregate is not None:
                fed.global_state = outcome.aggregate
            marks.append((t0, time.perf_counter()))
            uploads.append(uploaded / max(1, len(aggregated)))
            assert len(aggregated) == n and extra["secagg_aborted"] is None, extra
            if not info:
                s = secure.sessions.get(server_round + 1)
                if s is not None:
                    info = {"k": s.config.degree, "t": s.config.threshold, "bits": s.config.bits}
        _result(
            out,
            marks,
            warmup,
            upload_per_client=float(np.mean(uploads[warmup:])),
            exchanges=exchanges,
            **info,
        )

    return app


# -- Flower SecAgg+ (legacy API) ---------------------------------------------------------
def flower_client() -> ClientApp:
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod

    class Client(NumPyClient):
        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return [random_delta(int(parameters[0].size))], 1, {}

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return Client().to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


def flower_server(
    n: int, d: int, rounds: int, warmup: int, out: Path, num_shares: int, threshold: int
) -> ServerApp:
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    marks: list[tuple[float, float]] = []

    class Timed(SecAggPlusWorkflow):
        def __call__(self, grid: Grid, context: Context) -> None:  # type: ignore[override]
            t0 = time.perf_counter()
            super().__call__(grid, context)
            marks.append((t0, time.perf_counter()))

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_evaluate_clients=0,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters([np.zeros(d, dtype=np.float32)]),
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=warmup + rounds), strategy=strategy
        )
        # comparable to ours: each share goes to k neighbours + self, threshold t, clip 1,
        # 32-bit ring (Flower's default modulus 2^32, quantization 2^22, max weight 1)
        fit = Timed(
            num_shares=num_shares,
            reconstruction_threshold=threshold,
            max_weight=1.0,
            clipping_range=1.0,
        )
        DefaultWorkflow(fit_workflow=fit)(grid, legacy)
        assert len(marks) == warmup + rounds, marks
        _result(out, marks, warmup, num_shares=num_shares, threshold=threshold)

    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["plain", "ours", "flower"])
    ap.add_argument("n", type=int)
    ap.add_argument("d", type=int)
    ap.add_argument("out", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dp", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    if args.mode == "plain":
        server, client = (
            plain_server(args.n, args.d, args.rounds, args.warmup, args.out),
            plain_client,
        )
    elif args.mode == "ours":
        server = ours_server(args.n, args.d, args.rounds, args.warmup, args.out, args.dp)
        client = ours_client
    else:
        cfg = ours_config(args.n, 2, False).replace(clients=args.n)
        from confide.wire import session_config

        sc = session_config(cfg, session_id=bytes(16), num_clients=args.n, vector_length=args.d)
        server = flower_server(
            args.n,
            args.d,
            args.rounds,
            args.warmup,
            args.out,
            int(sc.degree) + 1,
            int(sc.threshold),
        )  # type: ignore[arg-type]
        client = flower_client()
    run_simulation(
        server_app=server, client_app=client, num_supernodes=args.n, backend_config=BACKEND
    )  # type: ignore[arg-type]
    if not args.out.exists():
        raise SystemExit(f"{args.mode} n={args.n} d={args.d}: no result (see the log)")


if __name__ == "__main__":
    main()
