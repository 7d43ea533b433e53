"""The partner node: a Flower ClientApp (Message API) doing local DP-SGD.

Each train message carries the global trainable weights and the run configuration. The
node loads its own data, checks its budget, trains with Opacus, and replies with the delta
of the trainable weights, its example count, metrics, and a DP receipt it signs itself.
Data, budget and accountant never leave the node; only the (noised) delta does. Under DP a
reply carries no un-noised statistic of the records, and a rounded row count only
(`confide.clients.disclosure`).

This module only registers the handlers and imports nothing heavy: the training round
(`confide.clients.local_round`, torch and friends) is imported when a `train` message
arrives, so the secure-aggregation stages answer without it.
"""

from __future__ import annotations

import json
import signal
from logging import INFO

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from confide import wire as W
from confide.clients import secure_client
from confide.clients.budget import advertise_guard
from confide.clients.threads import apply_threads, node_threads
from confide.config import from_flat_record
from confide.logs import deployed_process_logging

app = ClientApp()


def _ignore_terminal_interrupt() -> None:
    """In a simulation worker (a Ray process in the terminal's process group), Ctrl-C is
    for the driver: it stops the run between rounds. A worker killed mid-round could have
    spent budget whose reply never arrives."""
    import sys
    import threading

    ray = sys.modules.get("ray")
    if ray is None or threading.current_thread() is not threading.main_thread():
        return
    if getattr(ray._private.worker.global_worker, "mode", None) == ray.WORKER_MODE:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@app.train()
def train(msg: Message, context: Context) -> Message:
    _ignore_terminal_interrupt()
    _deployed_node_setup(context)
    from confide.clients.local_round import handle_train

    return handle_train(msg, context)


def _deployed_node_setup(context: Context) -> None:
    """Every node: each log line once, known notices filtered (`--verbose` keeps them; a
    simulated partner's lines reach the console under `flwr run`). A deployed node (it
    reads its own data-path): its CPU threads too (confide.clients.threads); in
    simulation Ray gives each partner one CPU."""
    deployed_process_logging()
    if not context.node_config.get("data-path"):
        return
    threads = node_threads(context.node_config.get("threads"))
    apply_threads(threads)
    log(INFO, "confide: this node trains with %d CPU threads", threads)


@app.train("receipts")
def receipts(msg: Message, context: Context) -> Message:
    """The receipts of this run the server has not acknowledged (message type
    `train.receipts`, sent in a run's last round to nodes whose reply may have been lost):
    no training, nothing spent, the node's state unchanged."""
    from confide.clients.node_state import load_node_state
    from confide.clients.state_location import node_state_dir

    cfg = from_flat_record(dict(msg.content[W.CONFIG]))
    state = load_node_state(context, delta=cfg.delta, max_epsilon=cfg.max_epsilon,
                            state_dir=node_state_dir(context, cfg.out))
    acknowledged = W.acknowledged_receipts(msg)
    earlier = state.unrecorded_receipts(str(msg.content[W.CONFIG].get(W.RUN_KEY, "")),
                                        acknowledged)
    return Message(content=RecordDict({
        W.STATUS: state.status(W.OK, "receipts"),
        W.RECEIPT: ConfigRecord({W.RECEIPT_JSON: "", W.RECEIPT_EARLIER: json.dumps(earlier)}),
    }), reply_to=msg)


@app.train("secagg")
def secagg_stage(msg: Message, context: Context) -> Message:
    """Secure-aggregation exchanges without local training: the run's key setup, key
    shares for a round this node is sampled for, and unmasking (message type
    `train.secagg`)."""
    cfg = from_flat_record(dict(msg.content[W.CONFIG]))
    if (dropped := secure_client.injected_dropout(msg, context, cfg)) is not None:
        return dropped
    extra = None
    down = msg.content.config_records.get(W.SECAGG)
    if down is not None and bool(down.get(W.SHARED_INFO, False)):
        # shared noise: the server sets the run's one rate q from the partners' row counts
        # and divides the sum by sum_i q n_i: it learns each partner's public (rounded)
        # count only (confide.clients.disclosure), which the node computes with too
        from confide.clients.disclosure import reported_rows
        from confide.clients.partner_data import partner_data
        from confide.privacy.sampling import poisson_rate

        rows = reported_rows(cfg, len(partner_data(cfg, context)))
        extra = {W.SHARED_INFO: json.dumps(
            {"examples": rows, "sample_rate": poisson_rate(cfg.batch_size, rows)})}
    return secure_client.secure_reply(msg, context, cfg, None, None, extra_up=extra,
                                      budget=advertise_guard(msg, context, cfg))


