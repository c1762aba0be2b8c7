"""Command line: ``python -m reflow_core {params,prepare,train,sample,inspect,book,bench,offline,steer} ...``.

Errors a user can fix (bad config, missing data, divergence, corrupt checkpoint, a busy run folder: every
:class:`~reflow_core.errors.UserError`) are printed as ``reflow_core: error: <message>`` with no traceback and exit
code 2; :func:`reflow_core.launch.launch` looks for that prefix to put the child's own explanation at the top of its
LaunchError.  Anything else is a bug: it keeps its traceback and exits 1.  Ctrl-C prints one line saying what was
interrupted and exits 130 (128 + SIGINT, what a shell reports for it).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from reflow_core.config import TrainConfig, train_field_types, type_name
from reflow_core.errors import run_command


def add_params_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("preset", help="a preset name: reflow-1-big, gpt2, reflow@smoke, …")
    parser.add_argument("--breakdown", action="store_true", help="also print parameters per component")
    return parser


def run_params_cli(args: argparse.Namespace) -> None:
    """Print the exact parameter count, built on the meta device so no weights are allocated."""
    from reflow_core.config import get_config
    from reflow_core.model import build_model, parameter_breakdown

    model = build_model(get_config(args.preset), "meta")
    print(model.num_params())
    if args.breakdown:
        for part, n in parameter_breakdown(model).items():
            print(f"  {part:<11} {n:>13,}")


def _train_fields_help() -> str:
    defaults = TrainConfig(model="reflow@test").to_dict()
    defaults["model"] = TrainConfig.model
    return "config fields (--set KEY=VALUE; defaults in brackets):\n" + "\n".join(
        f"  {name:<18} {type_name(tp):<14} [{defaults[name]!r}]" for name, tp in train_field_types().items())


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _train_fields_help()
    parser.add_argument("--config", type=Path, default=None, help="a TrainConfig as JSON (e.g. from launch())")
    parser.add_argument("--preset", default=None, help="model preset, e.g. reflow@smoke (sets 'model')")
    parser.add_argument("--data-dir", default=None, help="prepared dataset directory (sets 'data_dir')")
    parser.add_argument("--out-dir", default=None, help="run directory (sets 'out_dir')")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, parsed with its type; repeatable "
                             "(e.g. --set max_steps=200 --set lr=3e-4 --set model_overrides.dropout=0.1)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    config = TrainConfig.from_json(args.config) if args.config else TrainConfig()
    changes = {k: v for k, v in (("model", args.preset), ("data_dir", args.data_dir), ("out_dir", args.out_dir))
               if v is not None}
    return config.replace(**changes).with_overrides(args.overrides)


def run_train_cli(args: argparse.Namespace) -> dict:
    from reflow_core.train import train

    config = config_from_args(args)
    try:
        summary = train(config)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"training in {config.out_dir} was interrupted; a rerun resumes from its last "
                                "checkpoint") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print("summary: " + json.dumps(summary), flush=True)
    return summary


def build_parser() -> argparse.ArgumentParser:
    from reflow_core.bench import add_bench_arguments, run_bench_cli
    from reflow_core.sweep import add_sweep_arguments, run_sweep_cli
    from reflow_core.book import add_book_arguments, run_book_cli
    from reflow_core.data import add_prepare_arguments, run_prepare
    from reflow_core.offline import add_offline_arguments, run_offline_cli
    from reflow_core.sample import add_inspect_arguments, add_sample_arguments, run_inspect_cli, run_sample_cli
    from reflow_core.steer_app import add_steer_arguments, run_steer_cli

    parser = argparse.ArgumentParser(prog="python -m reflow_core", description="reFlow Book tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="exact parameter count of a preset (meta device, instant)")
    add_params_arguments(p).set_defaults(func=run_params_cli)
    p = sub.add_parser("prepare", help="tokenise a corpus into verified train/val token files")
    add_prepare_arguments(p).set_defaults(func=run_prepare)
    p = sub.add_parser("train", help="train or resume a model (single process or one rank under torchrun)")
    add_train_arguments(p).set_defaults(func=run_train_cli)
    p = sub.add_parser("sample", help="generate text from a checkpoint")
    add_sample_arguments(p).set_defaults(func=run_sample_cli)
    p = sub.add_parser("inspect", help="a checkpoint's parameter table")
    add_inspect_arguments(p).set_defaults(func=run_inspect_cli)
    p = sub.add_parser("book", help="execute the chapters with papermill at a scale and build the HTML")
    add_book_arguments(p).set_defaults(func=run_book_cli)
    p = sub.add_parser("bench", help="time training steps and inference; compare with the reference loop")
    add_bench_arguments(p).set_defaults(func=run_bench_cli)
    p = sub.add_parser("sweep", help="learning rate × batch size at one token budget (the smoke recipe's evidence)")
    add_sweep_arguments(p).set_defaults(func=run_sweep_cli)
    p = sub.add_parser("offline", help="a scale on an offline GPU host: build the bundle, run the job, unpack results")
    add_offline_arguments(p).set_defaults(func=run_offline_cli)
    p = sub.add_parser("steer", help="serve the live steering panel (Voilà) on 127.0.0.1 for any prompt; Ctrl-C stops it")
    add_steer_arguments(p).set_defaults(func=run_steer_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args))  # exit codes and messages: reflow_core.errors


if __name__ == "__main__":
    raise SystemExit(main())
