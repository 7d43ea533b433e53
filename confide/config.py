"""One typed, validated configuration for a Confide run.

The same schema serves the config file (TOML), the CLI flags, `--set key=value`, Flower's
`run_config` (`flwr run .`) and the per-round message config sent to clients. Keys are
kebab-case everywhere outside Python; each is validated once at the edge and a bad value
fails with a message that names the key and the allowed range.

Each key is defined once, as a RunConfig field declared with `option(...)`; everything else
that lists keys (SCHEMA, the README table, pyproject.toml's [tool.flwr.app.config], the
audit's reading of a recorded config) is derived from the fields:
`python -m confide.config` prints the README table, `--pyproject` the Flower table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w

from confide.errors import ConfideError
from confide.modes import ModeError, PrivacyMode
from confide.run_layout import canonical_json


class ConfigError(ConfideError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class KeySpec:
    """What one configuration key accepts (derived from its RunConfig field)."""

    kind: type
    allowed: str  # human-readable allowed range, used in error messages and the README
    check: Callable[[Any], bool]
    help: str
    default: Any  # as declared (example-dp-noise: 'auto', which a RunConfig resolves)


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


def option(default: Any, allowed: str, check: Callable[[Any], bool], help: str) -> Any:
    """A RunConfig field that is a configuration key: its declared default, the allowed
    range in words (error messages, README), the range check and the README's meaning.

    The key's type is the field's annotation. Typed Any so that `x: int = option(...)`
    type-checks like `x: int = field(...)`."""
    return field(default=default,
                 metadata={"allowed": allowed, "check": check, "help": help})


# Grad-sample modes that give only the sum of clipped per-example gradients, never one
# example's gradient (which the shared-noise mode must round)
SUM_ONLY_GRAD_SAMPLE_MODES = ("ghost", "bookkeeping")


@dataclass(frozen=True)
class RunConfig:
    """The resolved configuration of one run, and the one definition of every key.

    Each field is a configuration key (kebab-case outside Python): its annotation is the
    key's type, its default the declared default, and its metadata (`option`) what the key
    accepts and means. SCHEMA, the README table, pyproject's [tool.flwr.app.config] and the
    audit's reading of a recorded config are all derived from these fields.
    """

    # Federation
    rounds: int = option(3, "integer >= 1", _range(1), "number of federated rounds")
    clients: int = option(
        4, "integer >= 1", _range(1), "number of partners (virtual SuperNodes in simulation)")
    fraction_train: float = option(
        1.0, "0 < x <= 1", _range(0, 1, lo_open=True), "fraction of partners sampled each round")
    min_clients: int = option(
        1, "integer >= 1", _range(1), "fewest replies a round needs to be aggregated")
    seed: int = option(42, "integer >= 0", _range(0), "seed for sampling, splits and init")
    # Model
    task: str = option(
        "classification", "'classification' or 'causal-lm'", _one_of("classification", "causal-lm"),
        "what the model learns: text,label classification or prompt,completion language modelling")
    model: str = option(
        "minilm", "'minilm', 'tiny', 'smollm2' (causal-lm) or a local Hugging Face model folder",
        _any, "shared transformer")
    fine_tune: str = option(
        "lora", "'lora', 'full', 'head' or 'bitfit'", _one_of("lora", "full", "head", "bitfit"),
        "which parameters train (and travel); bitfit: bias terms + head")
    freeze_embeddings: bool = option(
        False, "true or false", _any,
        "fine-tune = 'full': keep the word/position/token-type embeddings frozen")
    lora_rank: int = option(8, "1 <= r <= 256", _range(1, 256), "LoRA rank")
    lora_alpha: float = option(16.0, "x > 0", _range(0, lo_open=True), "LoRA alpha")
    lora_dropout: float = option(0.0, "0 <= x < 1", _range(0, 1, hi_open=True), "LoRA dropout")
    lora_targets: str = option(
        "query,value", "comma-separated module names, e.g. 'query,value', or "
        "'all-linear' (every encoder Linear layer)", lambda v: bool(v.strip()),
        "modules that get LoRA adapters")
    lora_freeze_a: bool = option(
        False, "true or false", _any,
        "FFA-LoRA: keep the LoRA A matrices at their seeded "
        "initialisation and train only B (half the noise dimension)")
    pooling: str = option(
        "auto", "'auto', 'mean' or 'cls'", _one_of("auto", "mean", "cls"),
        "sentence representation the head reads ('auto': mean for "
        "sentence-transformers models and tiny, else CLS + pooler)")
    max_length: int = option(64, "8 <= n <= 512", _range(8, 512), "tokens per example")
    # Data
    data: str = option(
        "", "'' (synthetic demo), a text,label file or a folder of them", _any, "training data")
    eval_data: str = option(
        "", "'' or a text,label file", _any,
        "central evaluation data ('' = held-out part of the demo/data)")
    partitioner: str = option(
        "iid", "'iid', 'dirichlet' or 'column'", _one_of("iid", "dirichlet", "column"),
        "how one data file is split among partners")
    dirichlet_alpha: float = option(
        1.0, "x > 0", _range(0, lo_open=True),
        "label skew of the Dirichlet partitioner (smaller = more skew)")
    partition_column: str = option(
        "domain", "a column name", lambda v: bool(v), "column the 'column' partitioner groups by")
    num_labels: int = option(
        0, "0 (infer) or integer >= 2", lambda v: v == 0 or v >= 2, "number of classes")
    max_train_examples: int = option(
        0, "0 (all) or integer >= 1", _range(0),
        "cap on the training rows read (for quick experiments)")
    max_eval_examples: int = option(
        0, "0 (all) or integer >= 1", _range(0), "cap on the evaluation rows read")
    prompt_column: str = option(
        "prompt", "a column name", lambda v: bool(v),
        "task = 'causal-lm': column holding the prompt")
    completion_column: str = option(
        "completion", "a column name", lambda v: bool(v),
        "task = 'causal-lm': column holding the completion (the loss covers its tokens only)")
    # Local training
    local_epochs: float = option(
        1.0, "0 < x <= 100", _range(0, 100, lo_open=True),
        "passes over the local data per round (fractional allowed)")
    batch_size: int = option(
        64, "1 <= n <= 65536", _range(1, 65536),
        "expected logical batch size (Poisson sampling under DP); with "
        "example-dp-noise = 'shared': of the whole federation per round")
    physical_batch_size: int = option(
        64, "1 <= n <= 4096", _range(1, 4096), "largest batch put through the model at once")
    optimizer: str = option(
        "adam", "'sgd', 'adam' or 'adamw'", _one_of("sgd", "adam", "adamw"), "local optimizer")
    # measured best under DP: benchmarks/results/dp_recipe_search.md
    learning_rate: float = option(
        1e-2, "0 < x <= 10", _range(0, 10, lo_open=True), "local learning rate")
    head_learning_rate: float = option(
        0.02, "0 (= learning-rate) or 0 < x <= 10", _range(0, 10),
        "local learning rate of the classifier head")
    weight_decay: float = option(0.0, "0 <= x < 1", _range(0, 1, hi_open=True), "weight decay")
    device: str = option(
        "auto", "'auto', 'cpu' or 'cuda[:N]'",
        lambda v: v in ("auto", "cpu") or v.startswith("cuda"), "torch device")
    client_cpus: float = option(
        1.0, "0 < x <= 1024", _range(0, 1024, lo_open=True),
        "simulation: Ray CPUs reserved per virtual partner (partners "
        "training at once = cluster CPUs / client-cpus)")
    client_gpus: float = option(
        0.25, "0 <= x <= 1 (0 = CPU only)", _range(0, 1),
        "simulation: fraction of a GPU per virtual partner, used when Ray "
        "sees GPUs and device is not 'cpu'")
    # Example-level DP (per partner, Opacus)
    example_dp: bool = option(True, "true or false", _any, "DP-SGD on each partner")
    noise_multiplier: float = option(
        0.0, "0 (derive from target-epsilon) or x > 0", _range(0), "DP-SGD noise multiplier")
    target_epsilon: float = option(
        8.0, "x > 0", _range(0, lo_open=True),
        "per-partner epsilon the noise is calibrated to over all rounds")
    max_epsilon: float = option(
        10.0, "x > 0", _range(0, lo_open=True),
        "hard per-partner budget: a node refuses a round that would pass it")
    delta: float = option(
        1e-5, "0 < x < 1", _range(0, 1, lo_open=True, hi_open=True), "delta of (epsilon, delta)-DP")
    allow_large_delta: bool = option(
        False, "true or false", _any,
        "accept delta >= 1/(rows of the smallest partner), which is refused otherwise (one "
        "published record could meet such a guarantee); every statement of the guarantee "
        "then says so")
    max_grad_norm: float = option(1.0, "x > 0", _range(0, lo_open=True), "per-sample clip norm")
    grad_sample_mode: str = option(
        "auto", "'auto', 'hooks', 'ghost' or 'bookkeeping'",
        _one_of("auto", "hooks", "ghost", "bookkeeping"),
        "how per-example gradients are clipped: 'auto' = book-keeping "
        "(one backward pass) for fine-tune = 'full' where the model allows it, else ghost "
        "clipping; hooks otherwise")
    example_dp_noise: str = option(
        "auto", "'auto', 'local' or 'shared'", _one_of("auto", "local", "shared"),
        "where the DP-SGD noise is added: 'local' = each partner "
        "adds all of it to its own update; 'shared' = each partner "
        "adds a share inside the secure sum (needs "
        "secure-aggregation; one noisy gradient per round); 'auto' "
        "= 'shared' with secure-aggregation (unless distributed-dp "
        "or local-epochs != 1), else 'local'")
    dp_colluders: int = option(
        0, "integer >= 0", _range(0),
        "example-dp-noise = 'shared': partners assumed to collude with "
        "the server (their noise shares are not counted)")
    # Server
    server_learning_rate: float = option(
        1.0, "0 < x <= 10", _range(0, 10, lo_open=True), "step size applied to the averaged delta")
    server_optimizer: str = option(
        "sgd", "'sgd', 'adam' or 'yogi'", _one_of("sgd", "adam", "yogi"),
        "server step on the averaged delta (FedAvg(M), FedAdam, "
        "FedYogi; post-processing: free in privacy)")
    server_momentum: float = option(
        0.0, "0 <= x < 1", _range(0, 1, hi_open=True),
        "server momentum: heavy-ball for sgd (FedAvgM), beta1 for adam/yogi")
    server_beta2: float = option(
        0.99, "0 <= x < 1", _range(0, 1, hi_open=True), "second-moment decay of server adam/yogi")
    server_tau: float = option(
        1e-3, "x > 0", _range(0, lo_open=True),
        "adaptivity of server adam/yogi (added to sqrt of the 2nd moment)")
    server_head_learning_rate: float = option(
        0.0, "0 (= server-learning-rate) or 0 < x <= 10", _range(0, 10),
        "server step size of the classifier head")
    server_bias_correction: bool = option(
        False, "true or false", _any,
        "adam/yogi: Adam's bias correction (moments start at 0; torch.optim.Adam's step with "
        "eps = server-tau); false: FedAdam as in Reddi et al.")
    server_lr_schedule: str = option(
        "constant", "'constant' or 'cosine'", _one_of("constant", "cosine"),
        "server learning rate over the rounds: 'cosine' decays it to 0 by the last round")
    client_dp: bool = option(
        False, "true or false", _any,
        "client-level DP: clip each update, Gaussian noise on the sum")
    client_dp_noise_multiplier: float = option(
        1.0, "x > 0", _range(0, lo_open=True), "client-level noise multiplier")
    client_dp_clipping_norm: float = option(
        1.0, "x > 0", _range(0, lo_open=True), "client-level L2 clip of each update")
    # Secure aggregation and distributed DP
    secure_aggregation: bool = option(
        False, "true or false", _any, "SecAgg+: the server sees only the sum of updates")
    distributed_dp: bool = option(
        False, "true or false", _any, "clients add discrete Gaussian noise inside the secure sum")
    secagg_threshold: float = option(
        0.6, "0.5 < x <= 1 (more than half of each closed neighbourhood)",
        _range(0.5, 1, lo_open=True),
        "Shamir threshold t = ceil(x (k+1)) of each partner's k neighbours and itself; above "
        "one half, so that a malicious server never gets both secrets of a partner")
    secagg_neighbours: int = option(
        0, "0 (about 2 log2 n) or integer >= 2", lambda v: v == 0 or v >= 2,
        "neighbours per client")
    secagg_bits: int = option(32, "16 <= b <= 62", _range(16, 62), "ring Z_2^b bit width")
    secagg_clip: float = option(
        1.0, "x > 0", _range(0, lo_open=True), "per-coordinate clip range of quantised updates")
    secagg_max_weight: int = option(
        100_000, "integer >= 1", _range(1),
        "local-noise and non-DP secure rounds: an update counts with its rows (at most this "
        "many), as in the plaintext mean; distributed DP counts each update once")
    dropout_rate: float = option(
        0.0, "0 <= p < 1", _range(0, 1, hi_open=True),
        "fault injection: chance a client drops (simulation)")
    dropout_stage: str = option(
        "masked-input", "'share-keys', 'masked-input' or 'unmask'",
        _one_of("share-keys", "masked-input", "unmask"),
        "protocol stage at which injected dropouts happen")
    verify_secagg: bool = option(
        False, "true or false", _any,
        "simulation only: also compute the plaintext sum, record error")
    # Pre-flight check (never changes privacy settings)
    preflight: str = option(
        "warn", "'warn', 'error' or 'off'", _one_of("warn", "error", "off"),
        "before round 1, estimate noise vs largest signal of the aggregate; "
        "'warn' logs a configuration that cannot learn, 'error' refuses it")
    # Output
    out: str = option("", "a folder path ('' = runs/<time>)", _any, "run folder")
    resume: bool = option(
        False, "true or false", _any, "continue the run in `out` from its last checkpointed round")
    eval_batch_size: int = option(128, "1 <= n <= 4096", _range(1, 4096), "evaluation batch")
    generate_every: int = option(
        0, "0 (only after the last round) or integer >= 1", _range(0),
        "task = 'causal-lm': greedy generation with BLEU and ROUGE-L "
        "every k rounds (always after the last)")
    generate_prompts: int = option(
        50, "0 (all) or integer >= 1", _range(0),
        "task = 'causal-lm': distinct evaluation prompts generated for BLEU and ROUGE-L")
    max_new_tokens: int = option(
        64, "1 <= n <= 1024", _range(1, 1024), "task = 'causal-lm': longest generated completion")
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
        if self.example_dp_noise == "shared":
            self._check_shared_noise()
        try:  # the privacy mode, resolved and validated once (confide.modes)
            PrivacyMode.of(self)
        except ModeError as exc:
            raise ConfigError(str(exc)) from None
        if self.min_clients > self.clients:
            raise ConfigError(f"min-clients ({self.min_clients}) exceeds clients "
                              f"({self.clients}); allowed: 1 <= min-clients <= clients")
        if self.physical_batch_size > self.batch_size and not self.example_dp:
            object.__setattr__(self, "physical_batch_size", self.batch_size)

    @property
    def privacy_mode(self) -> PrivacyMode:
        """What the privacy flags amount to (confide.modes): what every module
        outside this one asks instead of reading the flags."""
        return PrivacyMode.of(self)

    @property
    def secure_sum_weighted(self) -> bool:
        """Whether the secure sum weights each update by its rows (capped at
        secagg-max-weight), as the plaintext mean does (PrivacyMode.weighted_sum)."""
        return self.privacy_mode.weighted_sum

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
        if self.grad_sample_mode in SUM_ONLY_GRAD_SAMPLE_MODES:
            raise ConfigError(f"{why} rounds each per-example gradient and needs them "
                              f"materialised: grad-sample-mode = '{self.grad_sample_mode}' is "
                              "not supported, use 'auto' or 'hooks'")

    # -- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Kebab-case key -> value, for TOML, Flower run_config and message configs."""
        return {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "extra"}

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the configuration (recorded in the ledger).

        `resume` is left out: a resumed run is the same run."""
        return config_digest(self.to_dict())

    def write_toml(self, path: Path) -> None:
        path.write_text(tomli_w.dumps(self.to_dict()))

    def replace(self, **changes: Any) -> RunConfig:
        return build_config(self.to_dict() | {_key(k): v for k, v in changes.items()})


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _schema() -> dict[str, KeySpec]:
    kinds = get_type_hints(RunConfig)  # annotations are strings (`from __future__`)
    return {_key(f.name): KeySpec(kinds[f.name], f.metadata["allowed"], f.metadata["check"],
                                  f.metadata["help"], f.default)
            for f in dataclasses.fields(RunConfig) if "allowed" in f.metadata}


# Every configuration key, in RunConfig's field order (the README table's order).
SCHEMA: dict[str, KeySpec] = _schema()


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
    # the step of central DP-SGD with Adam (bias correction, beta2 0.999, eps 1e-8, the head
    # at twice the adapters' rate): 81.4% vs 79.2% for FedAdam's form at 3,000 SST-2 rows,
    # epsilon 8 (central Opacus DP 81.1%)
    "server-bias-correction": True, "server-beta2": 0.999, "server-tau": 1e-8,
    "server-head-learning-rate": 0.02,
    # a finer quantisation grid: at 32 bits the discrete-vs-continuous Gaussian slack
    # (~d / (24 s^2) per round) would add ~3e-4 to delta over 30 rounds at epsilon 8; from
    # 40 bits on only the sampler's ~1e-17 per coordinate remains (shared_noise.tv_slack)
    "secagg-bits": 48,
}


def _auto_example_dp_noise(kwargs: Mapping[str, Any]) -> str:
    """What `example-dp-noise = 'auto'` means for these settings.

    Shared noise wherever secure aggregation makes it possible: at the same epsilon it
    reaches the accuracy of central DP-SGD, where local noise carries about sqrt(N) times
    the noise on the average (benchmarks/results/shared_noise_search.md). Settings that exclude it
    (distributed-dp, several local steps, ghost or book-keeping clipping) keep local noise,
    as before.
    """
    value = {f.name: kwargs.get(f.name, f.default) for f in dataclasses.fields(RunConfig)}
    shared = (value["secure_aggregation"] and value["example_dp"]
              and not value["distributed_dp"] and value["local_epochs"] == 1.0
              and value["grad_sample_mode"] not in SUM_ONLY_GRAD_SAMPLE_MODES)
    return "shared" if shared else "local"


def normalise_key(raw_key: str) -> str:
    """The one rule for spelling a key: case and `_` / `-` do not matter
    (`Target_Epsilon`, `target_epsilon` and `target-epsilon` are one key)."""
    return str(raw_key).strip().lower().replace("_", "-")


def did_you_mean(key: str) -> list[str]:
    """Known keys close to an unknown one: similar spelling, or the same first word."""
    import difflib

    close = difflib.get_close_matches(key, list(SCHEMA), n=3, cutoff=0.75)
    same_start = [k for k in SCHEMA if k.split("-")[0] == key.split("-")[0]]
    return list(dict.fromkeys([*close, *same_start]))


def build_config(values: Mapping[str, Any]) -> RunConfig:
    """Validate the keys (spelt any way `normalise_key` accepts) and build a RunConfig.

    Unknown keys are an error naming the key and the known keys it resembles (a typo must
    not silently fall back to a default, least of all for a privacy parameter); one key
    spelt two ways with different values is an error too.
    """
    kwargs: dict[str, Any] = {}
    spelt: dict[str, str] = {}  # key -> how it was spelt
    for raw_key, value in values.items():
        key = normalise_key(raw_key)
        if key not in SCHEMA:
            close = did_you_mean(key)
            hint = f" (did you mean {', '.join(close)}?)" if close else \
                " (python -m confide.config lists every key)"
            raise ConfigError(f"unknown configuration key {raw_key!r}{hint}")
        coerced = _coerce(key, value)
        name = key.replace("-", "_")
        if name in kwargs and kwargs[name] != coerced:
            raise ConfigError(f"{key} is given twice with different values: "
                              f"{spelt[key]} = {kwargs[name]!r} and {raw_key} = {coerced!r}; "
                              "give it once")
        kwargs[name], spelt[key] = coerced, str(raw_key)
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
    defaults = declared_defaults()  # what pyproject_table() writes as the app's defaults
    for key in SHARED_NOISE_DEFAULTS:
        if key in values and values[key] == defaults[key]:
            del values[key]
    return build_config(values)


def declared_defaults() -> dict[str, Any]:
    """Key -> declared default, unresolved ('auto' stays 'auto'; RunConfig() resolves it)."""
    return {key: spec.default for key, spec in SCHEMA.items()}


# What a key meant in a recorded configuration (config.toml, the ledger's run_started) that
# lacks it: the version that wrote it predates the key. Such a run behaved as that version
# did, which is not always today's declared default; only those keys need a row here, every
# other missing key reads as its declared default.
LEGACY_MEANINGS: dict[str, Any] = {
    # Before example-dp-noise existed every partner added all of its DP-SGD noise locally;
    # today's default 'auto' would read an old secure-aggregation run as 'shared'. (The
    # audit reads this one; the rows below matter to rebuilding an old run's RunConfig.)
    "example-dp-noise": "local",
    # Before pooling existed the classifier read CLS + pooler (AutoModelForSequence-
    # Classification); 'auto' now means mean pooling for sentence-transformers models.
    "pooling": "cls",
    # Before head-learning-rate existed the head trained at learning-rate (0 means that).
    "head-learning-rate": 0.0,
    # Before grad-sample-mode existed per-example gradients always came from hooks.
    "grad-sample-mode": "hooks",
    # Before preflight existed no pre-flight check ran.
    "preflight": "off",
}


def recorded_value(config: Mapping[str, Any], key: str) -> Any:
    """The value of `key` in a recorded configuration, as the run that wrote it meant it.

    Kebab-case keys, snake_case accepted. The value is returned as recorded (not coerced
    or range-checked: the audit reads what was written, tampered or not). A key unknown
    to SCHEMA is a programming error (KeyError)."""
    spec = SCHEMA[key]
    for name in (key, key.replace("-", "_")):
        if name in config:
            return config[name]
    return LEGACY_MEANINGS.get(key, spec.default)


def config_digest(values: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of a configuration's kebab-case values, as
    `run_started` records it: `resume` left out (a resumed run is the same run)."""
    kept = {k: v for k, v in values.items() if k != "resume"}
    return hashlib.sha256(canonical_json(kept, ascii_escaped=True)).hexdigest()


def recorded_config(values: Mapping[str, Any]) -> RunConfig:
    """The RunConfig of a recorded configuration (a run folder's config.toml): keys its
    version did not have take their LEGACY_MEANINGS, not today's defaults."""
    present = {k.replace("_", "-") for k in values}
    legacy = {k: v for k, v in LEGACY_MEANINGS.items() if k not in present}
    return build_config({**legacy, **values})


def _shown(value: Any) -> str:
    """A default as the README table shows it (TOML-like: strings quoted, lower-case bools)."""
    if isinstance(value, str):
        return f'"{value}"'
    return str(value).lower() if isinstance(value, bool) else str(value)


def shown_default(key: str) -> str:
    """A key's declared default in words, with the shared-noise mode's own default where it
    has one (that mode fills it unless the key is set)."""
    spec = SCHEMA[key]
    text = _shown(spec.default)
    if key in SHARED_NOISE_DEFAULTS:
        text += (f", or {_shown(SHARED_NOISE_DEFAULTS[key])} when example-dp-noise = "
                 "'shared', which secure-aggregation turns on by default")
    return text


def key_help(key: str) -> str:
    """One key's meaning, default and allowed values in one sentence (the CLI's help)."""
    spec = SCHEMA[key]
    return f"{spec.help} (default: {shown_default(key)}; allowed: {spec.allowed})"


def markdown_table() -> str:
    """The README's configuration table, generated from SCHEMA (a test keeps them equal)."""
    # the declared defaults (a RunConfig resolves 'auto' values, the table shows them)
    lines = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for key, spec in SCHEMA.items():
        lines.append(f"| `{key}` | `{_shown(spec.default)}` | {spec.allowed} | {spec.help} |")
    return "\n".join(lines)


PYPROJECT_TABLE = "[tool.flwr.app.config]"


def pyproject_table() -> str:
    """pyproject.toml's `[tool.flwr.app.config]`: every key with its declared default.

    `flwr run --run-config` may only override keys listed there, so all of them are; a test
    keeps pyproject.toml equal to this text (regenerate: python -m confide.config --pyproject).
    """
    return f"{PYPROJECT_TABLE}\n{tomli_w.dumps(declared_defaults())}"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m confide.config",
        description="Print what is generated from the configuration definition: the "
                    "README's table (default) or pyproject.toml's [tool.flwr.app.config].")
    parser.add_argument("--pyproject", action="store_true",
                        help="print the [tool.flwr.app.config] table instead")
    print(pyproject_table() if parser.parse_args().pyproject else markdown_table(), end="")
    print()
