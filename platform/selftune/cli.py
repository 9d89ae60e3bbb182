"""``selftune`` command line. Bad input ends with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from selftune.errors import SelftuneError
from selftune.interrupts import sigterm_as_interrupt

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
PROGRESS_SWITCH = "SELFTUNE_PROGRESS"  # selftune.engine.progress.ENV_SWITCH (not imported: it pulls in torch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selftune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one pipeline end to end")
    run.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/quickstart.yaml")
    _add_common(run)
    run.add_argument("--out", help="output folder (must be new or empty); default runs/<name>-<time>")
    _add_no_progress(run)

    search = commands.add_parser("search", help="search a pipeline's values with Ray Tune + Optuna")
    search.add_argument("space", help="search space YAML, e.g. search_spaces/quickstart.yaml")
    _add_common(search)
    search.add_argument("--resume", action="store_true", help="continue the latest interrupted search of this space")
    search.add_argument("--out", default=os.environ.get("SELFTUNE_STORAGE") or "runs",
                        help="folder that holds search folders (default: $SELFTUNE_STORAGE if set, else runs)")

    show = commands.add_parser("show", help="print a search's trial table from MLflow")
    show.add_argument("reference", help="an MLflow experiment name (its latest search) or a search run id")
    show.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")

    final = commands.add_parser("final", help="run a pipeline with a search's best values (a tuned final run)")
    source = final.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="source", help="an MLflow experiment name (its latest search) or a search run id")
    source.add_argument("--params", help="a YAML file of dotted pipeline keys -> values (needs PIPELINE)")
    final.add_argument("pipeline", nargs="?", help="pipeline YAML (with --params; default with --from: the searched pipeline)")
    _add_common(final)
    final.add_argument("--out", help="output folder (must be new or empty); default runs/<name>-final-<time>")
    _add_no_progress(final)

    store = commands.add_parser("store", help="the stage store runs, searches and finals share: list, prune")
    store_commands = store.add_subparsers(dest="store_command", required=True)
    listing = store_commands.add_parser("list", help="every stored stage: key, size, last use, users, what needs it")
    listing.add_argument("--store", help=STORE_HELP)
    pruning = store_commands.add_parser("prune", help="delete stored stages by age or to a size budget "
                                                      "(never one a run holds, a registered model or a search's best trial needs)")
    pruning.add_argument("--store", help=STORE_HELP)
    pruning.add_argument("--older-than", metavar="AGE", help="delete stages unused for AGE, e.g. 30d, 12h")
    pruning.add_argument("--max-size", metavar="SIZE", help="then the least recently used until the store holds at most SIZE, e.g. 50G")
    pruning.add_argument("--dry-run", action="store_true", help="say what would be deleted; delete nothing")

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
    parser.add_argument("--store", help=STORE_HELP)
    parser.add_argument("--no-cache", action="store_true",
                        help="compute every stage again, into this run's (or trial's) own folders; the store is neither read nor written")


STORE_HELP = "stage store folder (default: $SELFTUNE_STAGE_STORE, else $SELFTUNE_STORAGE/stages, else runs/stages)"


def _add_no_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no step progress lines, only one line per epoch (same as SELFTUNE_PROGRESS=0)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "no_progress", False):
        os.environ[PROGRESS_SWITCH] = "0"  # before Ray starts: its local workers inherit it
    _quiet_libraries()
    sigterm_as_interrupt()  # `ray job stop` and schedulers send SIGTERM: end runs as KILLED, like Ctrl-C
    try:
        return COMMANDS[args.command](args)
    except SelftuneError as error:
        print(f"selftune: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as interrupt:
        detail = f" ({interrupt})" if str(interrupt) else ""
        print(f"selftune: interrupted{detail}; MLflow runs were ended as KILLED", file=sys.stderr)
        return EXIT_INTERRUPTED


def _quiet_libraries() -> None:
    """Keep the terminal for selftune's progress: library chatter only from WARNING up."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("mlflow", "alembic", "ray", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def command_run(args: argparse.Namespace) -> int:
    from selftune.config import load_pipeline
    from selftune.runner import run_pipeline
    from selftune.report import print_stage_table, stage_header
    from selftune import tracking
    from selftune.tracking import resolve_tracking_uri

    pipeline = load_pipeline(args.pipeline, args.overrides)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    print(f"selftune run {args.pipeline}: {len(pipeline.stages)} stages, "
          f"{pipeline.resources.workers or 'local-mode'} worker(s); MLflow {tracking_uri}", flush=True)
    if pipeline.resources.workers > 0:
        # Start Ray now rather than at the first stage: its start replaces our SIGTERM handler.
        from selftune.engine.cluster import ensure_ray

        ensure_ray()
        sigterm_as_interrupt()
    result = run_pipeline(
        pipeline, out=args.out, tracking_uri=tracking_uri, experiment=args.experiment,
        store=args.store, use_store=not args.no_cache, on_stage_start=lambda i, stage: print(stage_header(i, len(pipeline.stages), stage), flush=True),
    )
    print_stage_table(result)
    print(f"\noutputs: {result.output_dir}\nMLflow run {result.run_id}; browse with: mlflow ui --backend-store-uri {tracking_uri}")
    missed = tracking.not_logged()  # the tracking server went away mid-run: say what it did not get
    if missed:
        tracking.write_not_logged(Path(result.output_dir) / tracking.NOT_LOGGED, missed)
        print(tracking.describe_not_logged(missed, tracking_uri, Path(result.output_dir) / tracking.NOT_LOGGED))
    return 0


def command_search(args: argparse.Namespace) -> int:
    from selftune.search.driver import format_outcome, run_search
    from selftune.search.space import load_search_space
    from selftune.tracking import resolve_tracking_uri

    # --no-cache: the space's stage_cache: false (each trial computes every stage, in its own folder)
    space = load_search_space(args.space, args.overrides + (["stage_cache=false"] if args.no_cache else []))
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    outcome = run_search(space, tracking_uri=tracking_uri, out_root=args.out, resume=args.resume, store=args.store,
                         experiment=args.experiment, progress=lambda line: print(line, flush=True))
    print(format_outcome(outcome, tracking_uri))
    return 0


def command_show(args: argparse.Namespace) -> int:
    from selftune.search.summary import best_line, best_row, find_search_run, format_rows, trial_rows
    from selftune.tracking import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    run = find_search_run(tracking_uri, args.reference)
    print(f"search run {run.info.run_id} ({run.info.status}), {run.data.tags.get('selftune.space', '')}")
    rows = trial_rows(tracking_uri, run)
    print(format_rows(rows))
    best = best_row(rows, run.data.tags.get("selftune.mode", "max"))
    if best:
        print("\n" + best_line(best))
    return 0


def command_final(args: argparse.Namespace) -> int:
    from selftune.search.final import run_final
    from selftune.tracking import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    run_final(source=args.source, params_file=args.params, pipeline_file=args.pipeline, overrides=args.overrides,
              tracking_uri=tracking_uri, experiment=args.experiment, out=args.out,
              progress=lambda line: print(line, flush=True), store=args.store, use_store=not args.no_cache)
    return 0


def command_store(args: argparse.Namespace) -> int:
    from selftune.report import format_table
    from selftune.runner.cache import default_store_root
    from selftune.runner.store import human_size, parse_age, parse_size, prune, store_rows, stored_stages

    root = default_store_root(args.store)
    if args.store_command == "list":
        stages = stored_stages(root)
        if not stages:
            print(f"stage store {root}: empty")
            return 0
        print(format_table(["stage", "key", "size", "last use", "users (count: latest)", "needed by"], store_rows(stages)))
        print(f"\n{len(stages)} stages, {human_size(sum(s.size for s in stages))} in {root}")
        return 0
    if args.older_than is None and args.max_size is None:
        raise SelftuneError("selftune store prune: give --older-than AGE (e.g. 30d) and/or --max-size SIZE (e.g. 50G)")
    older_than = parse_age(args.older_than) if args.older_than is not None else None
    max_size = parse_size(args.max_size) if args.max_size is not None else None
    report = prune(root, older_than_s=older_than, max_size=max_size, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for stored in report.deleted:
        print(f"{verb} {stored.entry.folder.name} ({human_size(stored.size)})")
    for stored in report.held:
        print(f"kept {stored.entry.folder.name}: a running run or search holds it")
    print(f"stage store {root}: {verb} {len(report.deleted)} stages; {human_size(report.size_after)} left")
    if max_size is not None and report.size_after > max_size:
        print(f"still above --max-size {args.max_size}: the rest is pinned (registered models, best trials) or in use")
    return 0


def command_datasets(args: argparse.Namespace) -> int:
    from selftune.data.synthetic import generate_synthetic

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SelftuneError(f"--out {out}: folder exists and is not empty")
    path = generate_synthetic(out, seed=args.seed)
    print(f"wrote the synthetic dataset (seed {args.seed}) to {path}")
    return 0


COMMANDS = {"run": command_run, "search": command_search, "show": command_show, "final": command_final,
            "store": command_store, "datasets": command_datasets}

if __name__ == "__main__":
    sys.exit(main())
