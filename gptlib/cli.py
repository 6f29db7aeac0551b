"""`gptlib` command line: train | prepare | eval | publish | sweep | spikes | bench."""

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
    """An integer when it looks like one; the config layer validates (and names) anything else."""
    return int(value) if value.lstrip("-").isdigit() else value


def cmd_train(args: argparse.Namespace) -> int:
    from gptlib.launch import LaunchError, launch, prepare_run

    cfg, run_dir, world_size = prepare_run(args.scale, args.intervention, args.seed, args.set,
                                           args.nproc, args.run_dir, args.resume, args.overwrite)
    try:
        launch(run_dir, world_size, args.resume)
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not args.no_eval:
        from gptlib.evals import evaluate_run

        print(f"Evaluating checkpoint {cfg.eval.checkpoint} on the test slice ...", flush=True)
        print("\n".join(evaluate_run(run_dir).lines()))
    print(f"Run folder: {run_dir}" + ("" if not args.no_eval else
                                      f" (evaluate it with: gptlib eval {run_dir})"))
    print(f"Compare the runs of scale {cfg.scale}: papermill notebooks/summary.ipynb "
          f"outputs/{cfg.scale}/summary.ipynb -p scale {cfg.scale}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from gptlib.prepare import prepare_dataset

    stats = prepare_dataset(args.inputs, args.out, args.validation_fraction, args.workers,
                            tokenizer=args.tokenizer)
    print(f"wrote {args.out}: {stats['documents']:,} documents, {stats['train_tokens']:,} train + "
          f"{stats['validation_tokens']:,} validation tokens, tokenizer {stats['tokenizer']} "
          f"(details in {args.out / 'meta.json'})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.device is not None:
        from gptlib.device import pick_device

        pick_device(args.device)  # one line for a device this machine lacks, before loading anything
    if args.scale is not None:  # any model source on a scale's test slice; nothing written
        from gptlib.hub import evaluate_source

        result = evaluate_source(args.run_dir, args.scale, args.checkpoint or "best", args.batches,
                                 args.device)
        print(f"Test loss: {result.test_loss:.6f} ({args.run_dir} on the {args.scale} test slice, "
              f"{result.eval_batches:,} batches, {result.eval_tokens:,} tokens, {result.eval_precision})")
        print("\n".join(result.lines()[1:]))
        return 0
    from gptlib.evals import evaluate_run
    from gptlib.rundir import read_summary

    result = evaluate_run(args.run_dir, args.checkpoint, args.batches, args.device)
    print("\n".join(result.lines()))
    recorded = read_summary(args.run_dir)
    if recorded.get("test_loss") != result.test_loss:
        kept = f"{recorded.get('test_loss', 'not measured')} ({recorded.get('eval_checkpoint', 'none')})"
        print(f"Recorded beside the run's result in summary.json (evaluations); the run's test loss "
              f"stays {kept}.")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from gptlib.publish import publish_run

    folder = publish_run(args.run_dir, args.repo_id, args.checkpoint, args.private, args.dry_run, args.out)
    files = ", ".join(sorted(p.name for p in folder.iterdir()))
    if args.dry_run:
        print(f"dry run: wrote {folder} ({files}); nothing uploaded")
    else:
        print(f"uploaded {folder} ({files}) to https://huggingface.co/{args.repo_id}")
    return 0


def _seeds(value: str) -> list[int]:
    try:
        return [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {value!r}: expected integers, e.g. 42,43") \
            from None


def cmd_sweep(args: argparse.Namespace) -> int:
    from gptlib.presets import parse_overrides
    from gptlib.sweep import report_lines, sweep

    outcomes = sweep(args.scale, args.interventions, args.seeds, args.force, parse_overrides(args.set),
                     args.nproc, args.outputs, every_seed=args.every_seed)
    lines = report_lines(outcomes)
    print("\n".join(lines), file=sys.stderr if len(lines) > 1 else sys.stdout)
    return 1 if len(lines) > 1 else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from gptlib.presets import list_interventions, list_scales

    train = sub.add_parser(
        "train", help="train one run under torchrun",
        description="Train one run (a scale + interventions + a seed) under torchrun into "
                    "outputs/<scale>/<run-name>, then score its test loss and smoke test. "
                    f"Scales: {', '.join(list_scales())}. Interventions (join several with +): "
                    f"{', '.join(list_interventions())}.")
    train.add_argument("--scale", default="tiny", help="a file of parameters/scales (default tiny)")
    train.add_argument("--intervention", default="baseline",
                       help="interventions joined by + (default baseline)")
    train.add_argument("--seed", type=int, default=None, help="train.random_seed (default 42)")
    train.add_argument("--nproc", type=_nproc, default=None, help="processes: N or auto")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.microbatch_size=4")
    train.add_argument("--resume", default=None, help="latest, best or step-N")
    train.add_argument("--run-dir", default=None,
                       help="default outputs/<scale>/<run-name>")
    train.add_argument("--no-eval", action="store_true",
                       help="skip the test loss and smoke test after training (gptlib eval does them)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace a run already in the run directory")
    train.set_defaults(func=cmd_train)

    prepare = sub.add_parser("prepare", help="tokenise text or parquet files into a dataset")
    prepare.add_argument("inputs", nargs="+", type=Path, help=".txt or .parquet (text column)")
    prepare.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    prepare.add_argument("--validation-fraction", type=float, default=0.01,
                         help="share of the tokens, as whole documents from the end, held out as the "
                              "validation split (default 0.01)")
    prepare.add_argument("--workers", type=int, default=None,
                         help="processes that tokenise GPT-2 ids in parallel (default: the CPU count)")
    prepare.add_argument("--tokenizer", default="gpt2",
                         help="gpt2 (default: GPT-2's ids) or bpe-<N>: a byte-level BPE of N tokens "
                              "fitted to the training documents, saved as tokenizer.json")
    prepare.set_defaults(func=cmd_prepare)

    evaluate = sub.add_parser("eval", help="test loss and smoke test of a run's checkpoint")
    evaluate.add_argument("run_dir", metavar="RUN_DIR|SOURCE",
                          help="a run directory, e.g. outputs/tiny/baseline; with --scale also a model "
                               "folder or Hub repo id, e.g. openai-community/gpt2")
    evaluate.add_argument("--scale", default=None,
                          help="score SOURCE on this scale's test slice (printed, not written)")
    evaluate.add_argument("--checkpoint", default=None,
                          help="best, latest or step-N (default: the run's eval.checkpoint; best for a "
                               "model source)")
    evaluate.add_argument("--batches", type=int, default=None,
                          help="test batches (default eval.batches; -1 = all that fit)")
    evaluate.add_argument("--device", default=None, help="cpu or cuda (default: as trained)")
    evaluate.set_defaults(func=cmd_eval)

    publish = sub.add_parser("publish", help="upload a run's model to the Hugging Face Hub")
    publish.add_argument("run_dir", type=Path, help="a run directory, e.g. outputs/tiny/baseline")
    publish.add_argument("repo_id", help="the model repo, <owner>/<name>")
    publish.add_argument("--checkpoint", default="best", help="best (default), latest or step-N")
    publish.add_argument("--private", action="store_true", help="create the repo private")
    publish.add_argument("--dry-run", action="store_true",
                         help="only write the folder (for inspection); upload nothing")
    publish.add_argument("--out", type=Path, default=None, help="the folder (default RUN_DIR/publish)")
    publish.set_defaults(func=cmd_publish)

    sweep = sub.add_parser("sweep", help="render notebooks/train.ipynb per run, then the summary")
    sweep.add_argument("--scale", default="tiny", help="a file of parameters/scales (default tiny)")
    sweep.add_argument("--interventions", default="all",
                       help="all (every intervention file) or names a,b,c (each may join with +)")
    sweep.add_argument("--seeds", type=_seeds, default=[42], help="e.g. 42,43,44 (default 42)")
    sweep.add_argument("--every-seed", default=None, metavar="A,B,C",
                       help="only these interventions run on every seed; the others on the first seed")
    sweep.add_argument("--force", action="store_true", help="retrain completed runs too")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key in every run")
    sweep.add_argument("--nproc", type=_nproc, default="auto", help="processes: N or auto")
    sweep.add_argument("--outputs", type=Path, default=None,
                       help="runs folder (default: the repository's outputs/)")
    sweep.set_defaults(func=cmd_sweep)

    from gptlib import bench, spikes  # each module owns its arguments

    spike = sub.add_parser("spikes", help="the loss spikes of a run and the data behind each")
    spikes.add_arguments(spike)
    spike.set_defaults(func=spikes.run)

    benchmark = sub.add_parser("bench", help="throughput, MFU and memory vs the book's code")
    bench.add_arguments(benchmark)
    benchmark.set_defaults(func=bench.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (gptlib.launch.Terminated)
        print("interrupted", file=sys.stderr)
        return 143 if type(interrupt).__name__ == "Terminated" else 130


if __name__ == "__main__":
    sys.exit(main())
