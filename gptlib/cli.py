"""`gptlib` command line: train | prepare (more subcommands join as the workbook grows)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptlib.checkpoint import CheckpointError
from gptlib.config import ConfigError
from gptlib.data import DataError

# Errors whose message is the whole story: printed as one line, no traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError)


def _nproc(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nproc {value!r}: allowed: auto or an integer >= 1") \
            from None


def cmd_train(args: argparse.Namespace) -> int:
    from gptlib.launch import LaunchError, run_training

    try:
        run_training(args.scale, args.intervention, args.seed, args.set, args.nproc,
                     args.run_dir, args.resume, args.overwrite)
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from gptlib.data import prepare_dataset

    stats = prepare_dataset(args.inputs, args.out, args.validation_fraction, args.workers)
    print(f"wrote {args.out}: {stats}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one run under torchrun")
    train.add_argument("--scale", default="tiny", help="a file of parameters/scales (default tiny)")
    train.add_argument("--intervention", default="baseline",
                       help="interventions joined by + (default baseline)")
    train.add_argument("--seed", type=int, default=None, help="train.random_seed (default 42)")
    train.add_argument("--nproc", type=_nproc, default=None, help="processes: N or auto")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.microbatch_size=4")
    train.add_argument("--resume", default=None, help="latest, best or step-N")
    train.add_argument("--run-dir", type=Path, default=None,
                       help="default outputs/<scale>/<run-name>")
    train.add_argument("--overwrite", action="store_true",
                       help="replace a run already in the run directory")
    train.set_defaults(func=cmd_train)

    prepare = sub.add_parser("prepare", help="tokenise text or parquet files into a dataset")
    prepare.add_argument("inputs", nargs="+", type=Path, help=".txt or .parquet (text column)")
    prepare.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    prepare.add_argument("--validation-fraction", type=float, default=0.01)
    prepare.add_argument("--workers", type=int, default=None)
    prepare.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
