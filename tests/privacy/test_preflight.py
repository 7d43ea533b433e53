"""The pre-flight check's numbers: noise vs the largest possible signal of the aggregate."""

from __future__ import annotations

import json
import math

import pytest

from confide.config import ConfigError, RunConfig, build_config
from confide.privacy import preflight as P
from confide.privacy.accountant import calibrate_noise
from confide.privacy.mode_rules import estimates as PE
from confide.wire import session_config

D_MINILM_LORA = 74_498  # all-MiniLM-L6-v2, LoRA rank 8 on query,value + the 2-class head


def hopeless_distributed() -> RunConfig:
    # the example: 10 partners, distributed DP at multiplier 1, clip 1
    return build_config({"clients": 10, "secure-aggregation": True, "distributed-dp": True,
                         "client-dp-noise-multiplier": 1.0, "client-dp-clipping-norm": 1.0,
                         "noise-multiplier": 1.0, "secagg-threshold": 0.51})


def test_hopeless_distributed_dp_cannot_learn_and_says_what_would_help() -> None:
    report = P.check(hopeless_distributed(), D_MINILM_LORA, [300] * 10)
    assert report.verdict == P.CANNOT_LEARN and report.cannot_learn
    ddp = next(m for m in report.mechanisms if m.mechanism == "distributed-dp")
    # noise calibrated for m = 6 survivors of 10 (threshold 5 of k + 1 = 9): sigma C/sqrt(m)
    # per client, so the mean of all 10 has std sigma C/sqrt(60): at least sigma*sqrt(d)/n
    assert ddp.min_survivors == 6
    assert ddp.ratio == pytest.approx(math.sqrt(D_MINILM_LORA / 60))
    assert ddp.ratio > math.sqrt(D_MINILM_LORA) / 10 > 27  # the issue's ~27x
    assert ddp.ratio_if_min_survivors == pytest.approx(math.sqrt(D_MINILM_LORA) / 6)
    assert ddp.verdict == P.CANNOT_LEARN
    text = "\n".join(report.lines())
    assert "35.2x the largest possible signal" in text
    assert "with 100 partners per round the ratio would be" in text
    assert "example-level DP instead" in text and "a larger budget" in text
    assert "fewer trainable parameters" in text and "preflight = 'off'" in text
    # the suggested number of partners does bring the ratio to about 1
    needed = int(next(s for s in ddp.suggestions if s.startswith("more partners"))
                 .split("about ")[1].split(" ")[0].replace(",", ""))
    cfg = hopeless_distributed()
    m = P.min_survivors(cfg, needed, D_MINILM_LORA)
    assert math.sqrt(D_MINILM_LORA / (m * needed)) <= 1.0


def test_good_example_dp_is_ok_and_quiet() -> None:
    # example DP, epsilon 8 (calibrated as the node does), 300 rows per partner, LoRA on the
    # default d, batch 64: each round's mean is signal-dominated
    cfg = build_config({"clients": 10, "target-epsilon": 8.0, "batch-size": 64})
    report = P.check(cfg, D_MINILM_LORA, [300] * 10)
    assert report.verdict == P.OK and not report.needs_attention
    (ex,) = report.mechanisms
    assert ex.mechanism == "example-dp" and ex.suggestions == ()
    assert ex.expected_batch == pytest.approx(64) and ex.steps_per_round == 5
    assert 0.3 < ex.noise_multiplier < 2  # calibrated by confide.privacy.accountant
    assert ex.ratio == pytest.approx(ex.ratio_per_step / math.sqrt(5) / math.sqrt(10))
    assert ex.ratio < 1
    assert report.lines()[0].startswith("pre-flight: OK")


def test_shared_noise_is_central_dp_sgd_on_the_union() -> None:
    """Shared noise: one rate q = batch / N for all, one noisy gradient per round with noise
    std sigma*C on the sum of the expected batch: ratio sigma*sqrt(d)/batch."""
    cfg = build_config({"clients": 10, "secure-aggregation": True, "rounds": 30,
                        "example-dp-noise": "shared", "batch-size": 1024,
                        "target-epsilon": 8.0})
    report = P.check(cfg, D_MINILM_LORA, [300] * 10)
    (ex,) = report.mechanisms
    assert ex.mechanism == "example-dp (shared noise)" and ex.steps_per_round == 1
    assert ex.expected_batch == pytest.approx(1024)
    sigma = calibrate_noise(8.0, 1e-5, 1024 / 3000, 30)
    assert ex.noise_multiplier == pytest.approx(sigma)
    assert ex.ratio == pytest.approx(sigma * math.sqrt(D_MINILM_LORA) / 1024)
    assert report.verdict == P.OK
    tiny_batch = P.check(cfg.replace(batch_size=8), D_MINILM_LORA, [300] * 10)
    assert tiny_batch.verdict in (P.WEAK, P.CANNOT_LEARN)
    assert "a larger batch-size" in "\n".join(tiny_batch.lines())


def test_example_dp_weighting_follows_the_servers_mean() -> None:
    sizes = [400, 100, 40]
    cfg = build_config({"clients": 3, "noise-multiplier": 1.0, "batch-size": 20})
    report = P.check(cfg, 10_000, sizes)
    per = []
    for rows in sizes:
        q = min(1.0, 20 / rows)
        steps = max(1, round(1.0 / q))
        per.append(1.0 * math.sqrt(10_000) / (q * rows * math.sqrt(steps)))
    weighted = math.sqrt(sum((n * r) ** 2 for n, r in zip(sizes, per, strict=True))) / sum(sizes)
    assert report.mechanisms[0].ratio == pytest.approx(weighted)
    # a (local-noise) secure sum weights as the plaintext mean, rows capped at max-weight
    secure = cfg.replace(secure_aggregation=True, example_dp_noise="local")
    assert P.check(secure, 10_000, sizes).mechanisms[0].ratio == pytest.approx(weighted)
    capped = P.check(secure.replace(secagg_max_weight=100), 10_000, sizes)
    assert capped.mechanisms[0].ratio == pytest.approx(math.sqrt(sum(
        (min(n, 100) * r) ** 2 for n, r in zip(sizes, per, strict=True))) / 240)
    # with distributed DP every survivor has weight 1
    dd = P.check(secure.replace(distributed_dp=True), 10_000, sizes)
    example = next(m for m in dd.mechanisms if m.mechanism == "example-dp")
    assert example.ratio == pytest.approx(math.sqrt(sum(r ** 2 for r in per)) / 3)


def test_client_level_dp_ratio_and_partners_per_round() -> None:
    cfg = build_config({"clients": 20, "fraction-train": 0.5, "client-dp": True,
                        "client-dp-noise-multiplier": 0.8, "example-dp": False})
    report = P.check(cfg, 40_000, None)
    (cdp,) = report.mechanisms
    assert report.partners_per_round == 10 and cdp.mechanism == "client-dp"
    assert cdp.ratio == pytest.approx(0.8 * 200 / 10)
    assert cdp.verdict == P.CANNOT_LEARN  # 16 per round, 9.2 over 3 rounds
    assert any("about 160 bring it to 1" in s for s in cdp.suggestions)
    # many rounds can average a moderately noisy round: weak, not hopeless
    weak = P.check(cfg.replace(client_dp_noise_multiplier=0.1, rounds=10), 40_000, None)
    assert weak.verdict == P.WEAK and weak.mechanisms[0].ratio == pytest.approx(2.0)


@pytest.mark.parametrize(("ratio", "rounds", "verdict"), [
    (0.9, 3, P.OK), (1.0, 1, P.OK), (2.0, 3, P.WEAK), (5.0, 3, P.WEAK), (6.0, 3, P.CANNOT_LEARN),
    (10.0, 100, P.WEAK), (None, 3, P.UNKNOWN)])
def test_verdict_thresholds(ratio: float | None, rounds: int, verdict: str) -> None:
    assert P.verdict_of(ratio, rounds) == verdict


def test_deployment_without_row_counts_reports_what_it_can() -> None:
    report = P.check(hopeless_distributed(), D_MINILM_LORA, None)
    ex = next(m for m in report.mechanisms if m.mechanism == "example-dp")
    assert ex.verdict == P.UNKNOWN and ex.ratio is None and ex.unknown
    assert "not known to the server" in ex.reason
    assert report.verdict == P.CANNOT_LEARN  # the distributed-DP part needs no row counts
    assert not report.partition_rows_known
    only_example = P.check(RunConfig(), D_MINILM_LORA, None)
    assert only_example.verdict == P.UNKNOWN and not only_example.needs_attention


@pytest.mark.parametrize(("n", "threshold", "neighbours"), [
    (2, 0.6, 0), (3, 0.6, 0), (10, 0.6, 0), (10, 0.9, 0), (17, 0.7, 4), (50, 0.51, 0)])
def test_min_survivors_matches_the_secure_round(n: int, threshold: float,
                                                neighbours: int) -> None:
    cfg = build_config({"clients": n, "secure-aggregation": True, "distributed-dp": True,
                        "secagg-threshold": threshold, "secagg-neighbours": neighbours})
    session = session_config(cfg, session_id=bytes(16), num_clients=n, vector_length=100)
    assert P.min_survivors(cfg, n, 100) == session.min_survivors


def test_no_noise_no_mechanisms_and_json() -> None:
    report = P.check(build_config({"example-dp": False}), 1000, [10, 10])
    assert report.verdict == P.OK and report.mechanisms == ()
    data = report.to_json()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    full = P.check(hopeless_distributed(), D_MINILM_LORA, [300] * 10).to_json()
    assert full["verdict"] == "cannot-learn" and full["mode"] == "warn"
    assert full["mechanisms"][1]["mechanism"] == "distributed-dp"
    json.dumps(full, allow_nan=False)
    assert P._json_safe({"x": [math.inf, 1.0]}) == {"x": [None, 1.0]}


def test_refusal_message_and_config_key() -> None:
    assert RunConfig().preflight == "warn"
    assert build_config({"preflight": "error"}).preflight == "error"
    with pytest.raises(ConfigError, match="allowed: 'warn', 'error' or 'off'"):
        build_config({"preflight": "loud"})
    msg = P.refusal_message(P.check(hopeless_distributed(), D_MINILM_LORA, [300] * 10))
    assert "cannot learn" in msg and "no privacy budget was spent" in msg
    assert issubclass(P.PreflightRefused, ConfigError)  # the CLI prints it without traceback


def test_shared_noise_with_few_passes_suggests_more_rounds() -> None:
    """At 20,000 records the shared defaults (30 x 1,024) make 1.5 passes: signal-dominated
    rounds, too few of them (measured: 90 rounds gained 2.2 points). At 3,000 records the
    same settings make 10 passes and nothing is suggested."""
    cfg = build_config({"clients": 10, "secure-aggregation": True,
                        "example-dp-noise": "shared", "target-epsilon": 8.0})
    big = P.check(cfg, D_MINILM_LORA, [2000] * 10)
    (ex,) = big.mechanisms
    assert big.verdict == P.OK and "1.5 passes over the records in 30 rounds" in ex.reason
    (advice,) = ex.suggestions
    assert advice.startswith("more rounds if compute allows")
    rounds = int(advice.split("; at the same epsilon")[1].split("(")[1].split(" rounds")[0])
    assert rounds == math.ceil(30 * PE.FEW_PASSES / (30 * 1024 / 20000))
    sigma_more = calibrate_noise(8.0, 1e-5, 1024 / 20000, rounds)
    assert f"sigma {sigma_more:.3f} instead of {ex.noise_multiplier:.3f}" in advice
    assert ex.noise_multiplier < sigma_more < 1.2 * ex.noise_multiplier  # slow growth
    small = P.check(cfg, D_MINILM_LORA, [300] * 10)
    assert small.mechanisms[0].suggestions == ()
    assert "10.2 passes" in small.mechanisms[0].reason
    fixed = P.check(cfg.replace(noise_multiplier=0.7), D_MINILM_LORA, [2000] * 10)
    assert fixed.mechanisms[0].suggestions == ()  # more rounds would raise epsilon instead


def shared_run(rounds: int, **keys: object) -> RunConfig:
    return build_config({"clients": 3, "secure-aggregation": True, "rounds": rounds,
                         "target-epsilon": 8.0, **keys})


def test_shared_noise_rate_reaching_one_and_too_few_rounds_are_flagged() -> None:
    """The mode's defaults (batch 1,024) on 900 records in 2 rounds: the noise ratio alone is
    small (q = 1, full batch), yet the run cannot learn; the pre-flight says why and what to
    set instead."""
    cfg = shared_run(2)
    assert cfg.example_dp_noise == "shared" and cfg.batch_size == 1024
    report = P.check(cfg, D_MINILM_LORA, [300] * 3)
    (ex,) = report.mechanisms
    assert ex.ratio is not None and ex.ratio < 1  # the ratio cannot see the schedule
    assert report.verdict == P.WEAK and report.needs_attention
    assert "q = batch-size / records reached 1: batch-size 1,024 >= the federation's 900" \
        in ex.reason
    assert "With 2 rounds the server optimizer takes 2 steps" in ex.reason
    batch_fix, rounds_fix = ex.suggestions[:2]
    assert batch_fix.startswith("a smaller batch-size: about 307 (q = 0.34)")
    assert rounds_fix.startswith(f"more rounds: at least {PE.MIN_SHARED_ROUNDS}")
    # taking both pieces of advice clears both flags
    fixed = P.check(cfg.replace(batch_size=307, rounds=PE.MIN_SHARED_ROUNDS), D_MINILM_LORA,
                    [300] * 3)
    assert fixed.verdict == P.OK and "reached 1" not in fixed.mechanisms[0].reason
    text = "\n".join(report.lines())
    assert text.startswith("pre-flight: WEAK") and "would help: a smaller batch-size" in text


@pytest.mark.parametrize(("rounds", "rows", "flags"), [
    (30, 300, ("reached 1",)),  # enough rounds, but the batch is every record
    (3, 3000, ("server optimizer takes 3 steps",)),  # q = 0.34, too few steps
    (PE.MIN_SHARED_ROUNDS, 3000, ())])
def test_shared_noise_schedule_flags_one_at_a_time(rounds: int, rows: int,
                                                   flags: tuple[str, ...]) -> None:
    (ex,) = P.check(shared_run(rounds), D_MINILM_LORA, [rows // 3] * 3).mechanisms
    for flag in ("reached 1", "server optimizer takes"):
        assert (flag in ex.reason) == any(flag in f for f in flags)
    assert ex.verdict == (P.WEAK if flags else P.OK)


def test_without_row_counts_the_report_is_one_line() -> None:
    shared = P.check(shared_run(30), D_MINILM_LORA, None)
    assert shared.verdict == P.UNKNOWN and not shared.needs_attention
    (line,) = shared.lines()
    assert line.startswith("pre-flight: not estimated: example-dp (shared noise): ")
    assert "before round 1" in line
    (line,) = P.check(RunConfig(), D_MINILM_LORA, None).lines()
    assert "example-dp: partners' row counts are not known to the server" in line
    # beside an estimated mechanism the unknown one still takes a single line
    mixed = P.check(hopeless_distributed(), D_MINILM_LORA, None).lines()
    at = [i for i, x in enumerate(mixed) if x.startswith("  example-dp")]
    assert len(at) == 1 and mixed[at[0]].startswith("  example-dp [unknown]: ")
    assert not mixed[at[0] + 1].startswith("    ")  # no sub-lines under it
