"""``selftune`` command line. Bad input ends with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from selftune.errors import SelftuneError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selftune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one pipeline end to end")
    run.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/quickstart.yaml")
    _add_common(run)
    run.add_argument("--out", help="output folder (must be new or empty); default runs/<name>-<time>")

    datasets = commands.add_parser("datasets", help="built-in datasets")
    datasets_commands = datasets.add_subparsers(dest="dataset_command", required=True)
    synth = datasets_commands.add_parser("synth", help="write the built-in synthetic dataset in the folder format")
    synth.add_argument("--out", required=True, help="folder to write")
    synth.add_argument("--seed", type=int, default=0)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a pipeline value by dotted key, e.g. stages.supervised.epochs=5")
    parser.add_argument("--experiment", help="MLflow experiment (default: the pipeline name)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    signal.signal(signal.SIGTERM, _interrupt)  # `ray job stop` and schedulers send SIGTERM: end runs as KILLED
    try:
        return COMMANDS[args.command](args)
    except SelftuneError as error:
        print(f"selftune: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("selftune: interrupted; MLflow runs were ended as KILLED", file=sys.stderr)
        return EXIT_INTERRUPTED


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _quiet_libraries() -> None:
    """Keep the terminal for selftune's progress: library chatter only from WARNING up."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("mlflow", "alembic", "ray", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def command_run(args: argparse.Namespace) -> int:
    from selftune.config import load_pipeline
    from selftune.engine.pipeline import run_pipeline
    from selftune.report import print_stage_table, stage_header
    from selftune.tracking import resolve_tracking_uri

    import selftune.stages  # noqa: F401  (registers every stage kind before the YAML is validated)

    pipeline = load_pipeline(args.pipeline, args.overrides)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    print(f"selftune run {args.pipeline}: {len(pipeline.stages)} stages, "
          f"{pipeline.resources.workers or 'local-mode'} worker(s); MLflow {tracking_uri}", flush=True)
    result = run_pipeline(
        pipeline, out=args.out, tracking_uri=tracking_uri, experiment=args.experiment,
        on_stage_start=lambda i, stage: print(stage_header(i, len(pipeline.stages), stage), flush=True),
    )
    print_stage_table(result)
    print(f"\noutputs: {result.output_dir}\nMLflow run {result.run_id}; browse with: mlflow ui --backend-store-uri {tracking_uri}")
    return 0


def command_datasets(args: argparse.Namespace) -> int:
    from selftune.data.synthetic import generate_synthetic

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SelftuneError(f"--out {out}: folder exists and is not empty")
    path = generate_synthetic(out, seed=args.seed)
    print(f"wrote the synthetic dataset (seed {args.seed}) to {path}")
    return 0


COMMANDS = {"run": command_run, "datasets": command_datasets}

if __name__ == "__main__":
    sys.exit(main())
