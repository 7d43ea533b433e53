"""One typed, validated configuration for a Confide run.

The same schema serves the config file (TOML), the CLI flags, `--set key=value`, Flower's
`run_config` (`flwr run .`) and the per-round message config sent to clients. Keys are
kebab-case everywhere outside Python; each is validated once at the edge and a bad value
fails with a message that names the key and the allowed range.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class KeySpec:
    """What one configuration key accepts."""

    kind: type
    allowed: str  # human-readable allowed range, used in error messages and the README
    check: Callable[[Any], bool]
    help: str


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))

    return check


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda v: v in choices


def _any(_: Any) -> bool:
    return True


SCHEMA: dict[str, KeySpec] = {
    # Federation
    "rounds": KeySpec(int, "integer >= 1", _range(1), "number of federated rounds"),
    "clients": KeySpec(int, "integer >= 1", _range(1),
                       "number of partners (virtual SuperNodes in simulation)"),
    "fraction-train": KeySpec(float, "0 < x <= 1", _range(0, 1, lo_open=True),
                              "fraction of partners sampled each round"),
    "min-clients": KeySpec(int, "integer >= 1", _range(1),
                           "fewest replies a round needs to be aggregated"),
    "seed": KeySpec(int, "integer >= 0", _range(0), "seed for sampling, splits and init"),
    # Model
    "task": KeySpec(str, "'classification' or 'causal-lm'",
                    _one_of("classification", "causal-lm"),
                    "what the model learns: text,label classification or prompt,completion "
                    "language modelling"),
    "model": KeySpec(str, "'minilm', 'tiny', 'smollm2' (causal-lm) or a local Hugging Face "
                     "model folder", _any, "shared transformer"),
    "fine-tune": KeySpec(str, "'lora', 'full', 'head' or 'bitfit'",
                         _one_of("lora", "full", "head", "bitfit"),
                         "which parameters train (and travel); bitfit: bias terms + head"),
    "freeze-embeddings": KeySpec(bool, "true or false", _any,
                                 "fine-tune = 'full': keep the word/position/token-type "
                                 "embeddings frozen"),
    "lora-rank": KeySpec(int, "1 <= r <= 256", _range(1, 256), "LoRA rank"),
    "lora-alpha": KeySpec(float, "x > 0", _range(0, lo_open=True), "LoRA alpha"),
    "lora-dropout": KeySpec(float, "0 <= x < 1", _range(0, 1, hi_open=True), "LoRA dropout"),
    "lora-targets": KeySpec(str, "comma-separated module names, e.g. 'query,value', or "
                            "'all-linear' (every encoder Linear layer)",
                            lambda v: bool(v.strip()), "modules that get LoRA adapters"),
    "lora-freeze-a": KeySpec(bool, "true or false", _any,
                             "FFA-LoRA: keep the LoRA A matrices at their seeded "
                             "initialisation and train only B (half the noise dimension)"),
    "pooling": KeySpec(str, "'auto', 'mean' or 'cls'", _one_of("auto", "mean", "cls"),
                       "sentence representation the head reads ('auto': mean for "
                       "sentence-transformers models and tiny, else CLS + pooler)"),
    "max-length": KeySpec(int, "8 <= n <= 512", _range(8, 512), "tokens per example"),
    # Data
    "data": KeySpec(str, "'' (synthetic demo), a text,label file or a folder of them", _any,
                    "training data"),
    "eval-data": KeySpec(str, "'' or a text,label file", _any,
                         "central evaluation data ('' = held-out part of the demo/data)"),
    "partitioner": KeySpec(str, "'iid', 'dirichlet' or 'column'",
                           _one_of("iid", "dirichlet", "column"),
                           "how one data file is split among partners"),
    "dirichlet-alpha": KeySpec(float, "x > 0", _range(0, lo_open=True),
                               "label skew of the Dirichlet partitioner (smaller = more skew)"),
    "partition-column": KeySpec(str, "a column name", lambda v: bool(v),
                                "column the 'column' partitioner groups by"),
    "num-labels": KeySpec(int, "0 (infer) or integer >= 2", lambda v: v == 0 or v >= 2,
                          "number of classes"),
    "max-train-examples": KeySpec(int, "0 (all) or integer >= 1", _range(0),
                                  "cap on the training rows read (for quick experiments)"),
    "max-eval-examples": KeySpec(int, "0 (all) or integer >= 1", _range(0),
                                 "cap on the evaluation rows read"),
    "prompt-column": KeySpec(str, "a column name", lambda v: bool(v),
                             "task = 'causal-lm': column holding the prompt"),
    "completion-column": KeySpec(str, "a column name", lambda v: bool(v),
                                 "task = 'causal-lm': column holding the completion (the "
                                 "loss covers its tokens only)"),
    # Local training
    "local-epochs": KeySpec(float, "0 < x <= 100", _range(0, 100, lo_open=True),
                            "passes over the local data per round (fractional allowed)"),
    "batch-size": KeySpec(int, "1 <= n <= 65536", _range(1, 65536),
                          "expected logical batch size (Poisson sampling under DP); with "
                          "example-dp-noise = 'shared': of the whole federation per round"),
    "physical-batch-size": KeySpec(int, "1 <= n <= 4096", _range(1, 4096),
                                   "largest batch put through the model at once"),
    "optimizer": KeySpec(str, "'sgd', 'adam' or 'adamw'", _one_of("sgd", "adam", "adamw"),
                         "local optimizer"),
    "learning-rate": KeySpec(float, "0 < x <= 10", _range(0, 10, lo_open=True),
                             "local learning rate"),
    "head-learning-rate": KeySpec(float, "0 (= learning-rate) or 0 < x <= 10", _range(0, 10),
                                  "local learning rate of the classifier head"),
    "weight-decay": KeySpec(float, "0 <= x < 1", _range(0, 1, hi_open=True), "weight decay"),
    "device": KeySpec(str, "'auto', 'cpu' or 'cuda[:N]'",
                      lambda v: v in ("auto", "cpu") or v.startswith("cuda"), "torch device"),
    "client-cpus": KeySpec(float, "0 < x <= 1024", _range(0, 1024, lo_open=True),
                           "simulation: Ray CPUs reserved per virtual partner (partners "
                           "training at once = cluster CPUs / client-cpus)"),
    "client-gpus": KeySpec(float, "0 <= x <= 1 (0 = CPU only)", _range(0, 1),
                           "simulation: fraction of a GPU per virtual partner, used when Ray "
                           "sees GPUs and device is not 'cpu'"),
    # Example-level DP (per partner, Opacus)
    "example-dp": KeySpec(bool, "true or false", _any, "DP-SGD on each partner"),
    "noise-multiplier": KeySpec(float, "0 (derive from target-epsilon) or x > 0", _range(0),
                                "DP-SGD noise multiplier"),
    "target-epsilon": KeySpec(float, "x > 0", _range(0, lo_open=True),
                              "per-partner epsilon the noise is calibrated to over all rounds"),
    "max-epsilon": KeySpec(float, "x > 0", _range(0, lo_open=True),
                           "hard per-partner budget: a node refuses a round that would pass it"),
    "delta": KeySpec(float, "0 < x < 1", _range(0, 1, lo_open=True, hi_open=True),
                     "delta of (epsilon, delta)-DP"),
    "max-grad-norm": KeySpec(float, "x > 0", _range(0, lo_open=True), "per-sample clip norm"),
    "grad-sample-mode": KeySpec(str, "'auto', 'hooks' or 'ghost'",
                                _one_of("auto", "hooks", "ghost"),
                                "how per-example gradients are clipped: 'auto' = ghost "
                                "clipping for fine-tune = 'full', hooks otherwise"),
    "example-dp-noise": KeySpec(str, "'auto', 'local' or 'shared'",
                                _one_of("auto", "local", "shared"),
                                "where the DP-SGD noise is added: 'local' = each partner "
                                "adds all of it to its own update; 'shared' = each partner "
                                "adds a share inside the secure sum (needs "
                                "secure-aggregation; one noisy gradient per round); 'auto' "
                                "= 'shared' with secure-aggregation (unless distributed-dp "
                                "or local-epochs != 1), else 'local'"),
    "dp-colluders": KeySpec(int, "integer >= 0", _range(0),
                            "example-dp-noise = 'shared': partners assumed to collude with "
                            "the server (their noise shares are not counted)"),
    # Server
    "server-learning-rate": KeySpec(float, "0 < x <= 10", _range(0, 10, lo_open=True),
                                    "step size applied to the averaged delta"),
    "server-optimizer": KeySpec(str, "'sgd', 'adam' or 'yogi'", _one_of("sgd", "adam", "yogi"),
                                "server step on the averaged delta (FedAvg(M), FedAdam, "
                                "FedYogi; post-processing: free in privacy)"),
    "server-momentum": KeySpec(float, "0 <= x < 1", _range(0, 1, hi_open=True),
                               "server momentum: heavy-ball for sgd (FedAvgM), beta1 for "
                               "adam/yogi"),
    "server-beta2": KeySpec(float, "0 <= x < 1", _range(0, 1, hi_open=True),
                            "second-moment decay of server adam/yogi"),
    "server-tau": KeySpec(float, "x > 0", _range(0, lo_open=True),
                          "adaptivity of server adam/yogi (added to sqrt of the 2nd moment)"),
    "client-dp": KeySpec(bool, "true or false", _any,
                         "client-level DP: clip each update, Gaussian noise on the sum"),
    "client-dp-noise-multiplier": KeySpec(float, "x > 0", _range(0, lo_open=True),
                                          "client-level noise multiplier"),
    "client-dp-clipping-norm": KeySpec(float, "x > 0", _range(0, lo_open=True),
                                       "client-level L2 clip of each update"),
    # Secure aggregation and distributed DP
    "secure-aggregation": KeySpec(bool, "true or false", _any,
                                  "SecAgg+: the server sees only the sum of updates"),
    "distributed-dp": KeySpec(bool, "true or false", _any,
                              "clients add discrete Gaussian noise inside the secure sum"),
    "secagg-threshold": KeySpec(float, "0 < x <= 1 (fraction of the sampled clients)",
                                _range(0, 1, lo_open=True),
                                "Shamir threshold t as a fraction of sampled clients"),
    "secagg-neighbours": KeySpec(int, "0 (about 2 log2 n) or integer >= 2",
                                 lambda v: v == 0 or v >= 2, "neighbours per client"),
    "secagg-bits": KeySpec(int, "16 <= b <= 62", _range(16, 62), "ring Z_2^b bit width"),
    "secagg-clip": KeySpec(float, "x > 0", _range(0, lo_open=True),
                           "per-coordinate clip range of quantised updates"),
    "dropout-rate": KeySpec(float, "0 <= p < 1", _range(0, 1, hi_open=True),
                            "fault injection: chance a client drops (simulation)"),
    "dropout-stage": KeySpec(str, "'share-keys', 'masked-input' or 'unmask'",
                             _one_of("share-keys", "masked-input", "unmask"),
                             "protocol stage at which injected dropouts happen"),
    "verify-secagg": KeySpec(bool, "true or false", _any,
                             "simulation only: also compute the plaintext sum, record error"),
    # Pre-flight check (never changes privacy settings)
    "preflight": KeySpec(str, "'warn', 'error' or 'off'", _one_of("warn", "error", "off"),
                         "before round 1, estimate noise vs largest signal of the aggregate; "
                         "'warn' logs a configuration that cannot learn, 'error' refuses it"),
    # Output
    "out": KeySpec(str, "a folder path ('' = runs/<time>)", _any, "run folder"),
    "resume": KeySpec(bool, "true or false", _any,
                      "continue the run in `out` from its last checkpointed round"),
    "eval-batch-size": KeySpec(int, "1 <= n <= 4096", _range(1, 4096), "evaluation batch"),
    "generate-every": KeySpec(int, "0 (only after the last round) or integer >= 1", _range(0),
                              "task = 'causal-lm': greedy generation with BLEU and ROUGE-L "
                              "every k rounds (always after the last)"),
    "generate-prompts": KeySpec(int, "0 (all) or integer >= 1", _range(0),
                                "task = 'causal-lm': distinct evaluation prompts generated "
                                "for BLEU and ROUGE-L"),
    "max-new-tokens": KeySpec(int, "1 <= n <= 1024", _range(1, 1024),
                              "task = 'causal-lm': longest generated completion"),
}


@dataclass(frozen=True)
class RunConfig:
    """The resolved configuration of one run. Field names mirror SCHEMA's kebab-case keys."""

    rounds: int = 3
    clients: int = 4
    fraction_train: float = 1.0
    min_clients: int = 1
    seed: int = 42
    task: str = "classification"
    model: str = "minilm"
    fine_tune: str = "lora"
    freeze_embeddings: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "query,value"
    lora_freeze_a: bool = False
    pooling: str = "auto"
    max_length: int = 64
    data: str = ""
    eval_data: str = ""
    partitioner: str = "iid"
    dirichlet_alpha: float = 1.0
    partition_column: str = "domain"
    num_labels: int = 0
    max_train_examples: int = 0
    max_eval_examples: int = 0
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    local_epochs: float = 1.0
    batch_size: int = 64
    physical_batch_size: int = 64
    optimizer: str = "adam"
    learning_rate: float = 1e-2  # measured best under DP: benchmarks/results/dp_recipe_search.md
    head_learning_rate: float = 0.02
    weight_decay: float = 0.0
    device: str = "auto"
    client_cpus: float = 1.0
    client_gpus: float = 0.25
    example_dp: bool = True
    noise_multiplier: float = 0.0
    target_epsilon: float = 8.0
    max_epsilon: float = 10.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "auto"
    example_dp_noise: str = "auto"
    dp_colluders: int = 0
    server_learning_rate: float = 1.0
    server_optimizer: str = "sgd"
    server_momentum: float = 0.0
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    client_dp: bool = False
    client_dp_noise_multiplier: float = 1.0
    client_dp_clipping_norm: float = 1.0
    secure_aggregation: bool = False
    distributed_dp: bool = False
    secagg_threshold: float = 0.5
    secagg_neighbours: int = 0
    secagg_bits: int = 32
    secagg_clip: float = 1.0
    dropout_rate: float = 0.0
    dropout_stage: str = "masked-input"
    verify_secagg: bool = False
    preflight: str = "warn"
    out: str = ""
    resume: bool = False
    eval_batch_size: int = 128
    generate_every: int = 0
    generate_prompts: int = 50
    max_new_tokens: int = 64
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.example_dp_noise == "auto":  # a RunConfig always holds the resolved mode
            object.__setattr__(self, "example_dp_noise", _auto_example_dp_noise(
                {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}))
        if self.max_epsilon < self.target_epsilon and self.example_dp \
                and self.noise_multiplier == 0:
            raise ConfigError(
                f"max-epsilon ({self.max_epsilon}) is below target-epsilon "
                f"({self.target_epsilon}): the calibrated noise would exhaust the budget; "
                "allowed: max-epsilon >= target-epsilon")
        if self.distributed_dp and not self.secure_aggregation:
            raise ConfigError("distributed-dp needs secure-aggregation = true "
                              "(the noise is only private inside the secure sum)")
        if self.example_dp_noise == "shared":
            self._check_shared_noise()
        if self.min_clients > self.clients:
            raise ConfigError(f"min-clients ({self.min_clients}) exceeds clients "
                              f"({self.clients}); allowed: 1 <= min-clients <= clients")
        if self.physical_batch_size > self.batch_size and not self.example_dp:
            object.__setattr__(self, "physical_batch_size", self.batch_size)

    def _check_shared_noise(self) -> None:
        """Shared noise is private only inside the secure sum, and its guarantee is that of
        one noisy gradient per round (confide.privacy.secagg.shared_noise)."""
        why = "example-dp-noise = 'shared'"
        if not self.secure_aggregation:
            raise ConfigError(f"{why} needs secure-aggregation = true: each partner adds only "
                              "a share of the noise, so its update is private only inside the "
                              "secure sum; use example-dp-noise = 'local' without secure "
                              "aggregation")
        if not self.example_dp:
            raise ConfigError(f"{why} needs example-dp = true")
        if self.distributed_dp:
            raise ConfigError(f"{why} and distributed-dp = true exclude each other: both put "
                              "noise into the same secure sum with different clipping "
                              "(per record vs per client); choose one")
        if self.local_epochs != 1.0:
            raise ConfigError(f"{why} takes exactly one noisy gradient per round (local "
                              "steps on a share of the noise would not be private); "
                              f"local-epochs = {self.local_epochs} is not allowed, leave it 1")
        if self.grad_sample_mode == "ghost":
            raise ConfigError(f"{why} rounds each per-example gradient and needs them "
                              "materialised: grad-sample-mode = 'ghost' is not supported, use "
                              "'auto' or 'hooks'")

    # -- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Kebab-case key -> value, for TOML, Flower run_config and message configs."""
        return {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "extra"}

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the configuration (recorded in the ledger).

        `resume` is left out: a resumed run is the same run."""
        values = {k: v for k, v in self.to_dict().items() if k != "resume"}
        blob = json.dumps(values, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def write_toml(self, path: Path) -> None:
        path.write_text(tomli_w.dumps(self.to_dict()))

    def replace(self, **changes: Any) -> RunConfig:
        return build_config(self.to_dict() | {_key(k): v for k, v in changes.items()})


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _coerce(key: str, value: Any) -> Any:
    spec = SCHEMA[key]
    kind = spec.kind
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = text.lower() in ("true", "1", "yes")
            elif kind is int:
                value = int(text)
            else:
                value = float(text)
        except ValueError:
            raise ConfigError(f"{key} = {value!r} is not a valid {kind.__name__}; "
                              f"allowed: {spec.allowed}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key} = {value!r} has type {type(value).__name__}, expected "
                          f"{kind.__name__}; allowed: {spec.allowed}")
    if not spec.check(value):
        raise ConfigError(f"{key} = {value!r} is out of range; allowed: {spec.allowed}")
    return value


# Defaults of the shared-noise mode where they differ from local noise: one noisy gradient
# per round, so many rounds and a large federation-wide batch, with the step taken by a
# server optimizer (measured: benchmarks/results/shared_noise_search.md).
SHARED_NOISE_DEFAULTS: dict[str, Any] = {
    "rounds": 30, "batch-size": 1024, "server-optimizer": "adam",
    "server-learning-rate": 0.01, "server-momentum": 0.9,
    # a finer quantisation grid: at 32 bits the discrete-vs-continuous Gaussian slack
    # (~d / (24 s^2) per round) would add ~3e-4 to delta over 30 rounds at epsilon 8; from
    # 40 bits on only the sampler's ~1e-17 per coordinate remains (shared_noise.tv_slack)
    "secagg-bits": 48,
}


def _auto_example_dp_noise(kwargs: Mapping[str, Any]) -> str:
    """What `example-dp-noise = 'auto'` means for these settings.

    Shared noise wherever secure aggregation makes it possible: at the same epsilon it
    reaches the accuracy of central DP-SGD, where local noise carries about sqrt(N) times
    the noise on the average (benchmarks/results/utility_sst2.md). Settings that exclude it
    (distributed-dp, several local steps, ghost clipping) keep local noise, as before.
    """
    value = {f.name: kwargs.get(f.name, f.default) for f in dataclasses.fields(RunConfig)}
    shared = (value["secure_aggregation"] and value["example_dp"]
              and not value["distributed_dp"] and value["local_epochs"] == 1.0
              and value["grad_sample_mode"] != "ghost")
    return "shared" if shared else "local"


def build_config(values: Mapping[str, Any]) -> RunConfig:
    """Validate kebab-case (or snake_case) keys and build a RunConfig.

    Unknown keys are an error naming the key (a typo must not silently fall back to a
    default, least of all for a privacy parameter).
    """
    kwargs: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = raw_key.replace("_", "-")
        if key not in SCHEMA:
            close = [k for k in SCHEMA if k.split("-")[0] == key.split("-")[0]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown configuration key {raw_key!r}{hint}")
        kwargs[key.replace("-", "_")] = _coerce(key, value)
    if kwargs.get("example_dp_noise", "auto") == "auto":
        kwargs["example_dp_noise"] = _auto_example_dp_noise(kwargs)
    if kwargs["example_dp_noise"] == "shared":
        # Choosing the mode alone gives a well-tuned run: its measured defaults fill every
        # key the caller did not set (what is set explicitly wins; config.toml records all).
        for key, value in SHARED_NOISE_DEFAULTS.items():
            kwargs.setdefault(key.replace("-", "_"), value)
    return RunConfig(**kwargs)


def load_toml(path: Path) -> dict[str, Any]:
    """Read a config file; a top-level [confide] table is accepted too."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return dict(data.get("confide", data))


def parse_set_items(items: list[str]) -> dict[str, str]:
    """`key=value` strings from `--set`."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip().strip('"')
    return out


def from_flat_record(record: Mapping[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from Flower's run_config or a message ConfigRecord."""
    return build_config({k: v for k, v in record.items() if k.replace("_", "-") in SCHEMA})


def from_run_config(record: Mapping[str, Any]) -> RunConfig:
    """The RunConfig of a deployed run from Flower's run_config (`flwr run`).

    Flower merges the app's defaults (`[tool.flwr.app.config]`) with the user's overrides,
    so "not set" cannot be told from "set to the default": a mode-default key still at the
    app default is treated as not set, and the mode's measured default fills it (a value
    the user changed always wins)."""
    values = {k.replace("_", "-"): v for k, v in record.items()
              if k.replace("_", "-") in SCHEMA}
    defaults = RunConfig().to_dict()
    for key in SHARED_NOISE_DEFAULTS:
        if key in values and values[key] == defaults[key]:
            del values[key]
    return build_config(values)


def markdown_table() -> str:
    """The README's configuration table, generated from SCHEMA (a test keeps them equal)."""
    # the declared defaults (a RunConfig resolves 'auto' values, the table shows them)
    defaults = {_key(f.name): f.default for f in dataclasses.fields(RunConfig)
                if f.name != "extra"}
    lines = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for key, spec in SCHEMA.items():
        value = defaults[key]
        shown = (f'"{value}"' if isinstance(value, str)
                 else str(value).lower() if isinstance(value, bool) else str(value))
        lines.append(f"| `{key}` | `{shown}` | {spec.allowed} | {spec.help} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
