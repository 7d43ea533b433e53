"""`confide` command line: simulate, audit, generate, export, predict, deploy."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from confide.config import (
    SCHEMA,
    ConfigError,
    RunConfig,
    build_config,
    key_help,
    load_toml,
    normalise_key,
    parse_set_items,
)
from confide.errors import ConfideError

# flag -> config key; each flag is a shortcut for --set key=value
SIMULATE_FLAGS: dict[str, str] = {
    "--rounds": "rounds", "--clients": "clients", "--model": "model", "--data": "data",
    "--eval-data": "eval-data", "--partitioner": "partitioner",
    "--target-epsilon": "target-epsilon", "--max-epsilon": "max-epsilon", "--delta": "delta",
    "--fine-tune": "fine-tune", "--seed": "seed", "--out": "out",
    "--secagg-threshold": "secagg-threshold", "--secagg-neighbours": "secagg-neighbours",
    "--secagg-bits": "secagg-bits", "--dropout-rate": "dropout-rate",
    "--dropout-stage": "dropout-stage",
}
SIMULATE_SWITCHES: dict[str, str] = {
    "--secure-aggregation": "secure-aggregation", "--distributed-dp": "distributed-dp",
    "--verify-secagg": "verify-secagg", "--no-example-dp": "example-dp",
    "--resume": "resume",
}


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Config file, then --set, then the named flags (later wins); validated once."""
    values: dict[str, Any] = {}
    resumed = _resumed_run(args)
    source = Path(args.config) if args.config else \
        None if resumed is None else resumed / "config.toml"
    if source is not None:
        # keys normalised here, so that --set and the flags override the file's spelling
        values.update({normalise_key(k): v for k, v in load_toml(source).items()})
    if resumed is not None:  # --resume RUN: RUN is the run folder, wherever it was written
        values["out"] = str(resumed)
    set_items = {normalise_key(k): v for k, v in parse_set_items(args.set or []).items()}
    values.update(set_items)
    named: dict[str, tuple[str, Any]] = {}
    for flag, key in SIMULATE_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            named[key] = (flag, value)
    for flag, key in SIMULATE_SWITCHES.items():
        if getattr(args, flag[2:].replace("-", "_")):
            named[key] = (flag, flag != "--no-example-dp")
    for key, (flag, value) in named.items():
        # `--target-epsilon 3 --set target-epsilon=8`: which one was meant? Never guess.
        if key in set_items and not _same_value(value, set_items[key]):
            raise ConfigError(f"{key} is given twice with different values: {flag} "
                              f"{value} and --set {key}={set_items[key]}; give it once")
        values[key] = value
    return build_config(values)


def _resumed_run(args: argparse.Namespace) -> Path | None:
    """The run folder of `--resume RUN` (or `--out RUN --resume`) when it holds the run's
    config.toml: the run's own settings, so that resuming needs nothing else."""
    resume = getattr(args, "resume", None)
    if not resume:
        return None
    if isinstance(resume, str):
        if args.out is not None and Path(args.out) != Path(resume):
            raise ConfigError(f"--resume {resume} and --out {args.out} name different run "
                              "folders; give the run folder once: --resume RUN")
        if not (Path(resume) / "config.toml").is_file():
            raise FileNotFoundError(f"--resume {resume}: no {Path(resume) / 'config.toml'}, "
                                    "so it is not a run folder of confide simulate")
        return Path(resume)
    if args.out is not None and (Path(args.out) / "config.toml").is_file():
        return Path(args.out)
    return None


def _same_value(a: Any, b: Any) -> bool:
    if str(a).strip().lower() == str(b).strip().lower():
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def flag_help(flag: str) -> str:
    """The help of a config-backed `simulate` flag, generated from the key's definition
    (RunConfig's `option`): what it does, its default and its allowed values."""
    if flag in SIMULATE_FLAGS:
        key = SIMULATE_FLAGS[flag]
        text = f"{key_help(key)}; config key {key}"
    else:
        key = SIMULATE_SWITCHES[flag]
        value = flag != "--no-example-dp"  # the one switch that turns its key off
        text = (f"turn {'on' if value else 'off'} {key} ({SCHEMA[key].help}): sets {key} = "
                f"{str(value).lower()} (default: {str(SCHEMA[key].default).lower()}; allowed: "
                f"{SCHEMA[key].allowed}, also as --set {key}=VALUE)")
        if key == "resume":
            text += ("; nothing already recorded is trained again. confide simulate "
                     "--resume RUN continues the run in folder RUN with its own settings "
                     "(RUN/config.toml: the same as --config RUN/config.toml --resume); "
                     "settings given with it must match the run's")
    return text.replace("%", "%%")  # argparse formats help with %


def _simulate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "simulate", help="run a federation in Flower's simulation engine",
        epilog="Settings apply in this order, later winning: --config, then --set, then the "
               "flags above. Every configuration key, with its default, allowed values and "
               "meaning: README's configuration table, or python -m confide.config.")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file with configuration keys (README's configuration table; a "
                   "run folder's config.toml repeats that run)")
    for flag in SIMULATE_FLAGS:
        p.add_argument(flag, help=flag_help(flag))
    for flag in SIMULATE_SWITCHES:
        if flag == "--resume":  # optionally names the run folder
            p.add_argument(flag, nargs="?", const=True, default=None, metavar="RUN",
                           help=flag_help(flag))
        else:
            p.add_argument(flag, action="store_true", help=flag_help(flag))
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any configuration key, e.g. --set local-epochs=2 (repeatable; "
                   "python -m confide.config lists every key)")
    p.add_argument("--partner-config", action="append", metavar="KEY=VALUE",
                   help="a policy key every virtual partner holds in its node config, as a "
                   "deployed partner sets it on its SuperNode: max-delta, max-epsilon, "
                   "max-run-epsilon, min-partners, dp-colluders, min-noise-multiplier "
                   "(repeatable; the server cannot lower them)")
    p.add_argument("--verbose", action="store_true", help="show Flower's own log")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="run on the existing Ray cluster at ADDRESS (host:port of a head "
                   "started with `ray start --head`; default: the RAY_ADDRESS variable, else "
                   "a Ray instance of this process)")


def _audit_parser(sub: Any) -> None:
    p = sub.add_parser("audit", help="check a run's privacy record")
    asub = p.add_subparsers(dest="audit_command", required=True)
    from confide.audit.verify import add_arguments as add_verify_arguments

    add_verify_arguments(asub.add_parser(
        "verify", help="verify ledger chain, signatures, receipts, epsilons"))
    from confide.audit.partner import add_arguments as add_partner_arguments

    add_partner_arguments(asub.add_parser(
        "partner", help="a partner: compare your node's own record (receipts, countersigned "
        "ledger heads, accountant) with a published run folder"))
    r = asub.add_parser("report", help="write report.html and report.md")
    r.add_argument("run_dir")
    r.add_argument("--out", help="HTML path (default RUN_DIR/report.html)")
    e = asub.add_parser("empirical", help="empirical privacy audit: one-run membership "
                        "inference (Steinke et al.), or canary exposure for causal-lm "
                        "(Carlini et al.)")
    e.add_argument("--config", help="TOML file with configuration keys")
    e.add_argument("--set", action="append", metavar="KEY=VALUE")
    e.add_argument("--canaries", type=int, default=None,
                   help="classification: membership canaries (default 200; --white-box "
                   "20000); causal-lm: secrets inserted per repeat count (default 5)")
    e.add_argument("--out", default="")
    e.add_argument("--white-box", action="store_true",
                   help="gradient canaries through the partners' DP-SGD (Steinke et al. "
                   "white-box): every guess right on a noise-free run")
    e.add_argument("--guess-fraction", type=float, default=None,
                   help="black-box: share of the canaries guessed, half in, half out "
                   "(default 0.2)")
    e.add_argument("--confidence", type=float, default=None,
                   help="confidence of the lower bound (default 0.95)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    c = e.add_argument_group("causal-lm canary exposure")
    c.add_argument("--repeats", default="1,10",
                   help="times each inserted secret is repeated, comma-separated counts")
    c.add_argument("--controls", type=int, default=20, help="secrets never inserted")
    c.add_argument("--candidates", type=int, default=2000,
                   help="random sequences of the format each secret is ranked against")
    c.add_argument("--canary-partner", type=int, default=0,
                   help="index of the partner whose data gets the secrets (--white-box: "
                   "the gradient canaries)")
    c.add_argument("--canary-prefix", default="my secret code is")
    c.add_argument("--canary-slots", type=int, default=6, help="random symbols per secret")
    c.add_argument("--canary-alphabet", default="0123456789", help="one symbol per character")
    c.add_argument("--audit-seed", type=int, default=None,
                   help="seed of the secrets and their insertion (default: fresh entropy)")


def _use_parsers(sub: Any) -> None:
    """Using a finished run's model (confide.tasks.use)."""
    g = sub.add_parser("generate", help="completions from a causal-lm run's final model")
    g.add_argument("run_dir")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts", help="file: one prompt per line, or a CSV/JSONL prompt column")
    g.add_argument("--max-new-tokens", type=int, default=0, help="default: the run's")
    g.add_argument("--device", default="cpu")
    x = sub.add_parser("export", help="write a standard Hugging Face folder (LoRA merged)")
    x.add_argument("run_dir")
    x.add_argument("dest")
    x.add_argument("--force", action="store_true",
                   help="replace the files of a non-empty DEST (never the run folder)")
    pr = sub.add_parser("predict", help="predictions of a classification run (CSV)")
    pr.add_argument("run_dir")
    pr.add_argument("--data", required=True, help="CSV/JSONL file with a text column")
    pr.add_argument("--out", help="default RUN_DIR/predictions.csv")
    pr.add_argument("--force", action="store_true",
                    help="replace an existing --out file (never the input data)")


def _use(args: argparse.Namespace) -> int:
    from confide.tasks import use

    if args.command == "generate":
        prompts = args.prompt or use.read_prompts(Path(args.prompts))
        for prompt, text in zip(prompts, use.generate_from_run(
                Path(args.run_dir), prompts, max_new_tokens=args.max_new_tokens,
                device=args.device), strict=True):
            print(f"prompt: {prompt}\ncompletion: {text}\n")
        return 0
    if args.command == "export":
        dest = use.export_run(Path(args.run_dir), Path(args.dest), force=args.force)
        print(f"exported to {dest}")
        return 0
    out = use.predict_run(Path(args.run_dir), Path(args.data),
                          Path(args.out) if args.out else None, force=args.force)
    print(f"predictions written: {out}")
    return 0


def _final_table(run_dir: Path, summary: dict[str, Any]) -> None:
    """A completed deployed run's table, as `confide simulate` ends (colour on a terminal)."""
    from rich.console import Console

    from confide.simulation.runner import final_table

    Console().print(final_table(run_dir, summary))


def _deploy_parser(sub: Any) -> None:
    from confide.deploy.commands import add_parser

    add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="confide", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, title="commands")
    _simulate_parser(sub)
    _audit_parser(sub)
    _use_parsers(sub)
    _deploy_parser(sub)
    return parser


def _leave(code: int, argv: list[str] | None) -> int:
    """The `confide simulate` program (argv None: the command line) exits here once its run
    folder is complete: the interpreter's teardown of torch, Ray and transformers would
    take seconds more (tens on a busy machine) and write nothing. Called with argv (a test,
    another program), it returns the code."""
    if argv is not None:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "simulate":
            cfg = resolve_config(args)
            from confide.clients.policy import PolicyError, parse_policy_setting
            from confide.simulation.runner import simulate

            try:
                partner = dict(parse_policy_setting(t) for t in args.partner_config or [])
            except PolicyError as exc:
                raise ConfigError(str(exc)) from None
            simulate(cfg, verbose=args.verbose, ray_address=args.ray_address,
                     partner_config=partner)
            return _leave(0, argv)
        if args.command == "audit":
            return _audit(args)
        if args.command in ("generate", "export", "predict"):
            return _use(args)
        if args.command == "deploy":
            from confide.deploy.commands import run as deploy_run

            return deploy_run(args, show_finished=_final_table)
    except ConfideError as exc:  # what the user can act on: its message, its status
        print(f"confide: {exc.label}{exc}", file=sys.stderr)
        return _leave(exc.exit_status, argv) if exc.exit_status == 130 else exc.exit_status
    except (FileExistsError, FileNotFoundError) as exc:
        print(f"confide: error: {exc}", file=sys.stderr)
        return 2
    return 1


def _audit(args: argparse.Namespace) -> int:
    if args.audit_command == "verify":
        from confide.audit.verify import run as verify
        return verify(args)
    if args.audit_command == "partner":
        from confide.audit.partner import run as partner
        return partner(args)
    if args.audit_command == "report":
        from confide.audit.report import write_report
        from confide.audit.verify import not_a_run

        if (problem := not_a_run(Path(args.run_dir))) is not None:
            print(f"confide: error: {problem}", file=sys.stderr)
            return 2
        paths = write_report(Path(args.run_dir), out_html=Path(args.out) if args.out else None)
        print("report written:")
        for path in paths:  # HTML, then Markdown
            print(f"  {path}")
        return 0
    if args.audit_command == "empirical":
        from confide.empirical.one_run import main as empirical_main

        return empirical_main(args)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
