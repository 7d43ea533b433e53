"""The partner node's training round: everything a `train` message needs (data, model,
budget, DP training, receipts). Imported by the ClientApp (client_app.py) only when a
`train` message arrives: torch, transformers and Opacus take seconds to import, and a
deployed node starts a fresh process per message, most of which (secure-aggregation key
setup, shares, unmasking) need none of them.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from confide import wire as W
from confide.clients import secure_client
from confide.clients.disclosure import reply_metrics, reported_rows
from confide.clients.dp_training import clipped_example_gradients, padded_batches, train_dp
from confide.clients.node_state import NodeState, load_node_state, save_node_state
from confide.clients.opacus_compat import resolve_grad_sample_mode
from confide.clients.policy import PartnerPolicy, node_policy, partner_node_config
from confide.clients.progress import counting_calls, progress_writer
from confide.clients.state_location import node_state_dir
from confide.config import RunConfig, from_flat_record
from confide.data import TextDataset
from confide.model import (
    ModelSpec,
    compute_delta,
    frozen_digest,
    load_trainable_state,
    resolve_device,
    trainable_state,
)
from confide.privacy.accountant import BudgetExhausted, Spend, calibrate_noise
from confide.privacy.ledger_events import weights_digest
from confide.privacy.mechanisms import ExampleLevelMechanism, SampledGaussian
from confide.privacy.receipts import binding, dp_receipt_payload, sign_receipt, update_digest
from confide.privacy.refusals import sign_refusal
from confide.privacy.sampling import plan_round, poisson_rate
from confide.privacy.secagg import SecAggRefusal
from confide.privacy.secagg.shared_noise import (
    ExampleSumEncoder,
    SharedNoiseConfig,
    padded_slots,
)
from confide.tasks import build_model, get_task
from confide.tasks.inputs import data_reader_config, federated_data, model_spec


class NodeConfigError(ValueError):
    """The partner's node configuration is unusable."""


def handle_train(msg: Message, context: Context) -> Message:
    """One `train` message: budget check, local DP training (or the shared-noise gradient
    sum), signed receipt, and the reply (through secure aggregation when the run uses it)."""
    config_record = msg.content[W.CONFIG]
    cfg = from_flat_record(dict(config_record))
    server_round = int(config_record[W.ROUND])
    # the partner's own floors, before anything is loaded or spent (a delta the server
    # chose must not become the node's pinned delta)
    policy = node_policy(context, cfg)
    policy.check_run(cfg, len(partner_data(cfg, context)))
    max_epsilon = _node_max_epsilon(cfg, context)
    state_dir = node_state_dir(context, cfg.out)
    state = load_node_state(context, delta=cfg.delta, max_epsilon=max_epsilon,
                            state_dir=state_dir)
    # Flower's message id is the content hash (incl. creation time): a replayed message has
    # the same id, a re-sent round (e.g. after a server resume) a new one.
    message_id = msg.metadata.message_id or msg.object_id
    if state.seen(message_id):
        return _status_reply(msg, state, W.STALE, f"message {message_id} was already handled")
    secure = cfg.privacy_mode.secure and W.SECAGG in msg.content.config_records
    if secure and (dropped := secure_client.injected_dropout(msg, context, cfg)) is not None:
        return dropped
    data = partner_data(cfg, context)
    run_key = str(config_record.get(W.RUN_KEY, ""))
    if secure and cfg.privacy_mode.shared_noise:
        # one clipped per-example gradient sum + a share of the noise, into the secure sum
        reply, encoded = _shared_round(msg, cfg, server_round, run_key, data, state, context)
        state.mark_handled(message_id)
        reply = secure_client.secure_reply(msg, context, cfg, reply, None, encoded=encoded)
        return _sealed(msg, reply, state, run_key, server_round, context, state_dir,
                       policy)
    reply = _train_round(msg, cfg, server_round, run_key, data, state, context)
    state.mark_handled(message_id)
    if secure:
        # The delta goes into the secure sum (clipped, quantized, noised, masked) instead
        # of travelling in plaintext; status, metrics and DP receipt travel as before.
        delta = (W.from_array_record(reply.content[W.ARRAYS])
                 if W.ARRAYS in reply.content.array_records else None)
        reply = secure_client.secure_reply(msg, context, cfg, reply, delta)
    return _sealed(msg, reply, state, run_key, server_round, context, state_dir,
                       policy)


def _sealed(msg: Message, reply: Message, state: NodeState, run_key: str, server_round: int,
            context: Context, state_dir: Path | None, policy: PartnerPolicy) -> Message:
    """The reply as it will travel, sealed: the round's receipt signed now, binding the run,
    the update as sent (the masked vector under secure aggregation, else the plain delta;
    none when masking was refused) and the model the node trained from; the ledger head
    the message names countersigned; the receipts no countersigned head covers yet
    attached. The node's state (spend, receipts, heads) is saved before the reply leaves."""
    record = reply.content.config_records.get(W.RECEIPT)
    if record is not None:
        unsigned = str(record.pop(_UNSIGNED, ""))
        bound = _is_run_key(run_key)
        head = W.ledger_head(msg.content[W.CONFIG]) if bound else None
        if head is not None:
            record[W.RECEIPT_HEAD] = state.countersign(run_key, *head, server_round).to_json()
        _attach_unrecorded(msg, state, run_key, record, None if head is None else head[0])
        if unsigned:
            payload = json.loads(unsigned)
            payload["policy"] = policy.to_json()  # the floors this spend was made under
            if bound:
                payload.update(binding(
                    run=run_key, update_sha256=_sent_update_digest(reply),
                    model_sha256=weights_digest(W.from_array_record(msg.content[W.ARRAYS]))))
            receipt_json = json.dumps(sign_receipt(payload, state.signing_key).to_dict())
            record[W.RECEIPT_JSON] = receipt_json
            state.remember_receipt(run_key, receipt_json)
    save_node_state(context, state, state_dir)
    return reply


def _is_run_key(run_key: str) -> bool:
    # servers of every version send their ledger key (64 hex digits); an empty one is a
    # message outside a run: its receipt cannot name one
    return len(run_key) == 64 and all(c in "0123456789abcdef" for c in run_key)


def _sent_update_digest(reply: Message) -> str | None:
    """SHA-256 of the update the reply carries: the masked vector, else the plain delta."""
    if W.MASKED in reply.content.array_records:
        return update_digest({"vector": reply.content[W.MASKED]["vector"].numpy()})
    if W.ARRAYS in reply.content.array_records:
        return update_digest(W.from_array_record(reply.content[W.ARRAYS]))
    return None


def _train_round(msg: Message, cfg: RunConfig, server_round: int, run_key: str,
                 data: TextDataset, state: NodeState, context: Context) -> Message:
    n = len(data)
    rows = reported_rows(cfg, n)  # under DP the public (rounded) count: rate and divisor
    plan = plan_round(cfg.batch_size, rows, cfg.local_epochs)
    sample_rate, steps = plan.sample_rate, plan.steps
    noise = _noise_multiplier(cfg, state, sample_rate, steps, run_key)
    planned = Spend(SampledGaussian(noise, sample_rate, steps), server_round, run_key)
    if cfg.privacy_mode.example_dp:
        policy = node_policy(context, cfg)
        policy.check_noise(noise)
        policy.check_run_budget(state.accountant, planned)
        try:
            state.accountant.check(planned)
        except BudgetExhausted as exc:
            return _refusal_reply(msg, cfg, state, server_round, run_key, exc, planned)

    spec = model_spec(cfg, _num_labels(cfg))
    model = _cached_model(spec)
    if msg.content[W.CONFIG].get(W.FROZEN_DIGEST) not in (None, _cached_frozen_digest(spec)):
        raise NodeConfigError("this node's frozen base model differs from the server's "
                              "(different model files or versions?)")
    global_state = {k: v.numpy() for k, v in msg.content[W.ARRAYS].items()}
    load_trainable_state(model, global_state)
    tensors = _encoded(cfg, data)
    device = resolve_device(str(context.node_config.get("device", cfg.device)))
    start = time.perf_counter()
    result = train_dp(
        model, tensors, noise_multiplier=noise, max_grad_norm=cfg.max_grad_norm,
        batch_size=cfg.batch_size, physical_batch_size=cfg.physical_batch_size,
        epochs=cfg.local_epochs, optimizer=cfg.optimizer, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, device=device,
        head_learning_rate=cfg.head_learning_rate or None,
        seed=cfg.seed * 100_003 + server_round * 1009 + _partition_id(context),
        dp=cfg.privacy_mode.example_dp, round_id=server_round,
        grad_sample_mode=resolve_grad_sample_mode(cfg.grad_sample_mode, cfg.fine_tune,
                                                  model),
        objective=get_task(cfg).objective, public_rows=rows,
        # steps done / planned into the partner's own folder (never sent: see the module)
        on_step=progress_writer(node_state_dir(context, cfg.out), server_round, steps))
    delta = compute_delta(trainable_state(model), global_state)
    for name, value in delta.items():
        if not np.all(np.isfinite(value)):
            raise FloatingPointError(f"local update of {name} is not finite; not sent")

    spent = SampledGaussian(result.noise_multiplier, result.sample_rate, result.steps)
    epsilon = 0.0
    receipt_json = ""
    if cfg.privacy_mode.example_dp:
        epsilon = state.accountant.record(Spend(spent, server_round, run_key))
        receipt_json = _receipt_payload(cfg, state, server_round, spent, epsilon)
    receipt = _receipt_record(msg, state, run_key, receipt_json)
    log(INFO, "partner %s round %d: %d examples, %d steps, sigma %.3f, epsilon %.3f",
        state.pseudonym, server_round, n, result.steps, result.noise_multiplier, epsilon)
    content = RecordDict({
        W.ARRAYS: W.to_array_record(delta),
        # under DP no loss and no time (confide.clients.disclosure)
        W.METRICS: MetricRecord(reply_metrics(
            cfg, rows=rows, epsilon=epsilon, mechanism=spent, train_loss=result.mean_loss,
            train_seconds=time.perf_counter() - start)),
        W.STATUS: state.status(W.OK, ""),
        W.RECEIPT: receipt,
    })
    return Message(content=content, reply_to=msg)


def _receipt_payload(cfg: RunConfig, state: NodeState, server_round: int,
                     mechanism: ExampleLevelMechanism, epsilon: float) -> str:
    """What the partner's receipt of the mechanism it ran this round states, as JSON; it
    is signed when the reply is final (`_sealed`: it then binds the update sent)."""
    payload = dp_receipt_payload(mechanism, round_=server_round, partner=state.pseudonym,
                                 delta=cfg.delta, epsilon=epsilon,
                                 accountant=state.accountant.accountant)
    return json.dumps(payload)


def _receipt_record(msg: Message, state: NodeState, run_key: str, payload_json: str
                    ) -> ConfigRecord:
    """The reply's receipt record, its receipt still unsigned (`_sealed` signs it and
    attaches this run's receipts the ledger may lack). Empty without example-level DP:
    nothing spent, nothing to sign."""
    record = ConfigRecord({W.RECEIPT_JSON: ""})
    if payload_json:
        record[_UNSIGNED] = payload_json  # never leaves the node: `_sealed` takes it out
    return record


# the receipt record's key for the round's receipt until `_sealed` signs it
_UNSIGNED = "unsigned"


def _attach_unrecorded(msg: Message, state: NodeState, run_key: str,
                       record: ConfigRecord, countersigned: int | None) -> None:
    """Put this run's receipts that no head the node countersigned covers yet (a reply lost
    when the server died or in transit: a real spend the ledger must record) into the
    reply's receipt record. `countersigned`: the head index the reply countersigns."""
    earlier = state.unrecorded_receipts(run_key, W.acknowledged_at(msg), countersigned)
    if earlier:
        record[W.RECEIPT_EARLIER] = json.dumps(earlier)


def _shared_round(msg: Message, cfg: RunConfig, server_round: int, run_key: str,
                  data: TextDataset, state: NodeState, context: Context
                  ) -> tuple[Message, np.ndarray | None]:
    """Shared-noise example-level DP (confide.privacy.secagg.shared_noise): one Poisson
    sample at rate q = min(1, batch-size / n), per-example gradients clipped to
    max-grad-norm, each rounded, summed, plus this node's share of the noise. The node
    recomputes every derived parameter itself and checks the server's against its own
    session and run configuration; its budget guard uses the effective multiplier."""
    down = msg.content.config_records[W.SECAGG]
    key = f"{W.SHARED}/{server_round}"
    if key not in down:
        raise NodeConfigError(f"round {server_round}: no shared-noise parameters in the "
                              "message (server and node disagree on example-dp-noise)")
    shared = SharedNoiseConfig.from_json(str(down[key]))
    session = secure_client.ClientStore(context).config(server_round)
    policy = node_policy(context, cfg)
    # colluders: at least the run's and the partner's own assumption (more is safer)
    policy.check_colluders(shared.colluders)
    policy.check_noise(shared.noise_multiplier)
    problems = [f"{name} {got} != {want}" for name, got, want in (
        ("colluders", shared.colluders, max(cfg.dp_colluders, shared.colluders)),
        ("clip", shared.clip, cfg.max_grad_norm),
        ("min_survivors", shared.min_survivors, session.min_survivors),
        ("num_clients", shared.num_clients, session.num_clients),
        ("bits", shared.bits, session.bits),
        ("vector_length", shared.vector_length, session.vector_length)) if got != want]
    if problems:
        raise SecAggRefusal(f"round {server_round}: shared-noise parameters differ from this "
                            f"node's session and run configuration: {'; '.join(problems)}")
    n = len(data)
    rows = reported_rows(cfg, n)  # the public (rounded) count the server was told
    # The run's common rate, set by the server: the node's own budget guard below decides
    # whether it can afford it, whatever the server chose.
    sample_rate = shared.sample_rate or poisson_rate(cfg.batch_size, rows)
    # a fixed physical budget from public values, so the round's work does not depend on
    # its sample; the chance a sample exceeds it is added to the round's TV slack
    slots, truncation_tail = padded_slots(rows, sample_rate)
    mechanism = shared.mechanism(sample_rate, truncation_tail)
    # the guard and the history compose the sampled Gaussian the shared noise amounts to
    planned = Spend(mechanism.sampled_gaussian, server_round, run_key)
    policy.check_run_budget(state.accountant, planned)
    try:
        state.accountant.check(planned)
    except BudgetExhausted as exc:
        return _refusal_reply(msg, cfg, state, server_round, run_key, exc, planned), None

    spec = model_spec(cfg, _num_labels(cfg))
    model = _cached_model(spec)
    if msg.content[W.CONFIG].get(W.FROZEN_DIGEST) not in (None, _cached_frozen_digest(spec)):
        raise NodeConfigError("this node's frozen base model differs from the server's "
                              "(different model files or versions?)")
    load_trainable_state(model, {k: v.numpy() for k, v in msg.content[W.ARRAYS].items()})
    device = resolve_device(str(context.node_config.get("device", cfg.device)))
    encoder = ExampleSumEncoder(shared)
    progress = progress_writer(node_state_dir(context, cfg.out), server_round,  # never sent
                               padded_batches(slots, cfg.physical_batch_size))
    result = clipped_example_gradients(
        model, _encoded(cfg, data), sample_rate=sample_rate, max_grad_norm=cfg.max_grad_norm,
        physical_batch_size=cfg.physical_batch_size,
        on_rows=counting_calls(encoder.add_examples, progress), device=device,
        round_id=server_round, objective=get_task(cfg).objective, slots=slots)
    if result.truncated:
        log(WARNING, "round %d: the Poisson sample exceeded the round's %d slots and was "
            "truncated (accounted: probability %.2g, in the round's TV slack)", server_round,
            slots, truncation_tail)
    encoded = encoder.encode()
    epsilon = state.accountant.record(planned)
    receipt_json = _receipt_payload(cfg, state, server_round, mechanism, epsilon)
    receipt = _receipt_record(msg, state, run_key, receipt_json)
    log(INFO, "partner %s round %d: %d examples, shared noise sigma %.3f over m=%d shares, "
        "epsilon %.3f", state.pseudonym, server_round, n, mechanism.noise_multiplier,
        mechanism.noise_shares, epsilon)
    # no loss, no time: statistics of this round's sample are not private
    content = RecordDict({
        W.METRICS: MetricRecord(reply_metrics(cfg, rows=rows, epsilon=epsilon,
                                              mechanism=mechanism)),
        W.STATUS: state.status(W.OK, ""),
        W.RECEIPT: receipt,
    })
    return Message(content=content, reply_to=msg), encoded


def _refusal_reply(msg: Message, cfg: RunConfig, state: NodeState, server_round: int,
                   run_key: str, exc: BudgetExhausted, planned: Spend) -> Message:
    """A budget refusal (local and shared noise alike). The spend is the node's lifetime one
    (earlier runs included): signed, with the events behind it, so the run's audit can check
    a refusal it cannot replay."""
    log(WARNING, "partner %s refuses round %d: %s", state.pseudonym, server_round, exc)
    refusal = sign_refusal(
        round_=server_round, run=run_key, delta=cfg.delta,
        accountant=state.accountant.accountant, spent_epsilon=exc.spent,
        would_be_epsilon=exc.would_be, max_epsilon=exc.max_epsilon,
        lifetime_events=state.accountant.history, planned=planned,
        private_key=state.signing_key)
    reply = _status_reply(msg, state, W.BUDGET_EXHAUSTED, str(exc), spent=exc.spent,
                          would_be=exc.would_be, max_epsilon=exc.max_epsilon)
    # lost receipts of this run reach the ledger with a refusal too (its signed spend
    # includes them): `_sealed` attaches them
    reply.content[W.RECEIPT] = ConfigRecord({W.RECEIPT_JSON: refusal.to_json()})
    return reply


def _status_reply(msg: Message, state: NodeState, code: str, detail: str, **extra: float
                  ) -> Message:
    return Message(content=RecordDict({W.STATUS: state.status(code, detail, **extra)}),
                   reply_to=msg)


def _noise_multiplier(cfg: RunConfig, state: NodeState, sample_rate: float, steps: int,
                      run_key: str) -> float:
    if not cfg.privacy_mode.example_dp:
        return 0.0
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    if state.noise_multiplier is None or state.noise_run != run_key:
        # Calibrated once per run over all its planned rounds (as if sampled every round:
        # the conservative choice when fraction-train < 1), then kept fixed for that run;
        # with the node's own (tight, PLD) accountant, the one its claims and guard use.
        state.noise_multiplier = calibrate_noise(cfg.target_epsilon, cfg.delta, sample_rate,
                                                 steps * cfg.rounds,
                                                 accountant=state.accountant.accountant)
        state.noise_run = run_key
    return state.noise_multiplier


def _node_max_epsilon(cfg: RunConfig, context: Context) -> float:
    """The partner's own cap (node config; in simulation also its node-config file) wins
    when it is lower than the run's."""
    node_cap = partner_node_config(context, cfg).get("max-epsilon")
    if node_cap is None:
        return cfg.max_epsilon
    try:
        cap = float(node_cap)
    except (TypeError, ValueError):
        raise NodeConfigError(f"node config max-epsilon = {node_cap!r} is not a number") \
            from None
    if not cap > 0:
        raise NodeConfigError(f"node config max-epsilon = {cap} must be > 0")
    return min(cap, cfg.max_epsilon)


def _partition_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


def partner_data(cfg: RunConfig, context: Context) -> TextDataset:
    """Deployment: the node's own `data-path`. Simulation: its partition of the run data."""
    path = context.node_config.get("data-path")
    if path:
        return _read_cached(str(path), cfg.num_labels, cfg.max_train_examples,
                            data_reader_config(cfg))
    pid = _partition_id(context)
    # Flower's simulation says how many virtual partners there are; `clients` may differ
    # (e.g. `flwr run .` with the engine's default number of SuperNodes).
    num = int(context.node_config.get("num-partitions", cfg.clients))
    parts = _simulation_partitions(cfg.replace(clients=num) if num != cfg.clients else cfg)
    if not 0 <= pid < len(parts):
        raise NodeConfigError(f"partition-id {pid} is outside 0..{len(parts) - 1}")
    return parts[pid]


@lru_cache(maxsize=4)
def _read_cached(path: str, num_labels: int, max_rows: int,
                 reader_cfg: RunConfig | None = None) -> TextDataset:
    # the task reads its own file format (text,label or prompt,completion)
    return get_task(reader_cfg or RunConfig()).read(Path(path), num_labels=num_labels,
                                                    max_rows=max_rows)


def _simulation_partitions(cfg: RunConfig) -> list[TextDataset]:
    return federated_data(cfg).partitions


def _num_labels(cfg: RunConfig) -> int:
    if cfg.num_labels < 2:
        # The server resolves num-labels from the data before the first round.
        raise NodeConfigError("num-labels missing from the round configuration")
    return cfg.num_labels


@lru_cache(maxsize=2)
def _cached_model(spec: ModelSpec):
    # Built once per process: every round loads the global trainable weights over it,
    # and frozen weights never change.
    return build_model(spec)


@lru_cache(maxsize=2)
def _cached_frozen_digest(spec: ModelSpec) -> str:
    return frozen_digest(_cached_model(spec))


_ENCODED: dict[tuple, dict] = {}


def _encoded(cfg: RunConfig, data: TextDataset) -> dict:
    key = (cfg.task, cfg.model, cfg.max_length, data.source, len(data))
    if key not in _ENCODED:
        _ENCODED.clear()
        _ENCODED[key] = dict(get_task(cfg).encode(data))
    return _ENCODED[key]
