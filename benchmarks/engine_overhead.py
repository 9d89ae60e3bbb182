"""Engine overhead: one supervised stage run through selftune vs a bare PyTorch loop doing the
same work, measured side by side in one process.

selftune side: ``runner.in_process`` — Ray Train (local mode by default), the worker context, the shared
training loop, per-epoch MLflow logging to a temporary SQLite store, best-checkpoint saving and
the confusion-matrix picture.
bare side: the same model (same initial weights), the same data loaders, optimizer, LR schedule,
number of steps, per-epoch evaluation and best-checkpoint ``torch.save``, written as a plain loop.

Runs alternate, each side going first in every other repeat, and the medians are compared. Goals:
ratio <= 1.05 at the default (``workers: 0``, Ray Train's local mode), <= 1.25 on a worker group
(``--set resources.workers=1``; the bare loop then runs as many torch threads as the worker has
CPUs, ``resources.cpus_per_worker``). On a worker group the script also times empty ``fit()``s of
the same resources and breaks a stage's start-up down: the controller and placement (``fit()``
called until the worker's process exists), the worker's start (its Python, Ray, torch and process
group until the stage function runs) and the teardown (the function's end until ``fit()`` returns).

    python benchmarks/engine_overhead.py [--epochs 8] [--steps 50] [--repeats 3] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from selftune.config import load_pipeline
from selftune.data import IGNORE_INDEX
from selftune.engine.context import WorkerContext
from selftune.data import cycle
from selftune.engine.loop import make_lr_schedule, make_optimizer
from selftune.metrics import ConfusionMatrix
from selftune.models import build_model
from selftune.stages import StageJob
from selftune.stages.data import evaluation_loader, prepare_data, training_loader
from selftune.tracking import KIND_STAGE, create_run, ensure_experiment, finish_run

REPO = Path(__file__).resolve().parent.parent


def bare_pytorch(pipeline, out: Path) -> float:
    """The same work as the supervised stage, as a plain loop."""
    stage = pipeline.stages[0]
    ctx = WorkerContext.local(device="cpu")
    data = prepare_data(pipeline.data, pipeline.seed)
    started = time.perf_counter()
    torch.manual_seed(pipeline.seed)
    model = build_model(pipeline.model.name, data.num_classes, **pipeline.model.options)
    optimizer = make_optimizer(model, stage.optimizer)
    schedule = make_lr_schedule(optimizer, stage.optimizer, stage.epochs * stage.steps_per_epoch)
    batches = cycle(training_loader(data, data.labelled, pipeline.data, ctx, batch_size=stage.batch_size, seed=pipeline.seed))
    val = evaluation_loader(data, data.index.val, pipeline.data, ctx)
    best = -1.0
    for _ in range(stage.epochs):
        model.train()
        for _ in range(stage.steps_per_epoch):
            batch = next(batches)
            loss = F.cross_entropy(model(batch["image"]), batch["mask"], ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        confusion = ConfusionMatrix(data.num_classes)
        with torch.no_grad():
            for batch in val:
                confusion.update(model(batch["image"]).argmax(1), batch["mask"])
        if confusion.miou() > best:
            best = confusion.miou()
            torch.save(model.state_dict(), out / "bare.pt")
    return time.perf_counter() - started


def warm_decode_cache(pipeline) -> None:
    """Generate the dataset if needed and decode every file both sides read, once, untimed."""
    data = prepare_data(pipeline.data, pipeline.seed)
    ctx = WorkerContext.local(device="cpu")
    for samples in (data.labelled, data.index.val):
        for _ in evaluation_loader(data, samples, pipeline.data, ctx):
            pass


def through_selftune(pipeline, out: Path, tracking_uri: str, experiment_id: str, repeat: int) -> float:
    from selftune.runner import in_process

    stage_dir = out / f"stage-{repeat}"
    stage_dir.mkdir()
    run_id = create_run(tracking_uri, experiment_id, name="overhead", kind=KIND_STAGE)
    job = StageJob(pipeline=pipeline, stage_index=0, output_dir=str(stage_dir), tracking_uri=tracking_uri, run_id=run_id)
    started = time.perf_counter()
    in_process(pipeline.resources, storage=lambda _job: out / "ray")(job)
    seconds = time.perf_counter() - started
    finish_run(tracking_uri, run_id, "FINISHED")
    return seconds


def _process_started() -> float:
    """This process's start, in ``time.time()`` seconds (Linux: /proc)."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = float(Path("/proc/stat").read_text().split("btime ")[1].split()[0])
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def mark_times(path: str, ctx: WorkerContext) -> None:
    """An empty stage: rank 0 writes when its process started and when the function ran."""
    if ctx.is_main:
        now = time.time()
        Path(path).write_text(json.dumps({"process": _process_started(), "entry": now, "end": time.time()}))


def empty_fit(pipeline, out: Path, repeat: int) -> dict[str, float]:
    """One ``fit()`` of an empty function on the pipeline's resources, split into its phases."""
    from selftune.engine.ray_train import WorkOrder, run_on_ray_train

    marks = out / f"marks-{repeat}.json"
    called = time.time()
    run_on_ray_train(WorkOrder(mark_times, str(marks), str(out)), pipeline.resources, name=f"empty-{repeat}",
                     storage_path=out / "ray")
    returned = time.time()
    times = json.loads(marks.read_text())
    return {"total": returned - called, "controller and placement": times["process"] - called,
            "worker start": times["entry"] - times["process"], "teardown": returned - times["end"]}


def print_breakdown(fits: list[dict[str, float]], bare: float, engine: float) -> None:
    print("start-up of one stage on a worker group (empty fit(), median of "
          f"{len(fits)}; min..max):")
    for phase in fits[0]:
        values = [fit[phase] for fit in fits]
        print(f"  {phase:<26} {statistics.median(values):6.2f}s  ({min(values):.2f}..{max(values):.2f})")
    fixed = statistics.median(fit["total"] for fit in fits)
    print(f"  the stage's other overhead (selftune - bare - empty fit): {engine - bare - fixed:.2f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=str(REPO / "pipelines" / "quickstart.yaml"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    first = load_pipeline(args.pipeline).stages[0].name
    overrides = [f"stages.{first}.epochs={args.epochs}", f"stages.{first}.steps_per_epoch={args.steps}", *args.overrides]
    pipeline = load_pipeline(args.pipeline, overrides)
    pipeline = pipeline.model_copy(update={"stages": pipeline.stages[:1]})
    workers = pipeline.resources.workers
    if workers:  # like with like: the bare loop runs the threads a worker runs (one per CPU it holds)
        torch.set_num_threads(max(1, int(pipeline.resources.cpus_per_worker)))
    print(f"stage {first!r}: {args.epochs} epochs x {args.steps} steps, model {pipeline.model.name}, "
          f"workers={workers}, torch threads={torch.get_num_threads()} (both sides)")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
        experiment_id = ensure_experiment(tracking_uri, "engine-overhead")
        warm_decode_cache(pipeline)  # neither side should pay for the first decode of every file
        bare, engine = [], []
        for repeat in range(args.repeats):
            # Alternate which side goes first (ABBA...), so a drift in machine speed favours neither.
            if repeat % 2:
                engine.append(through_selftune(pipeline, out, tracking_uri, experiment_id, repeat))
                bare.append(bare_pytorch(pipeline, out))
            else:
                bare.append(bare_pytorch(pipeline, out))
                engine.append(through_selftune(pipeline, out, tracking_uri, experiment_id, repeat))
            print(f"  repeat {repeat + 1}: bare {bare[-1]:.2f}s  selftune {engine[-1]:.2f}s  "
                  f"ratio {engine[-1] / bare[-1]:.3f}")
        fits = [empty_fit(pipeline, out, repeat) for repeat in range(args.repeats)] if workers else []
    ratio = statistics.median(engine) / statistics.median(bare)
    print(f"bare PyTorch min {min(bare):.2f}s median {statistics.median(bare):.2f}s max {max(bare):.2f}s; "
          f"selftune stage min {min(engine):.2f}s median {statistics.median(engine):.2f}s max {max(engine):.2f}s")
    goal = 1.25 if workers else 1.05
    print(f"ratio selftune / bare = {ratio:.3f}  (goal <= {goal}: {'met' if ratio <= goal else 'NOT met'})")
    if fits:
        print_breakdown(fits, statistics.median(bare), statistics.median(engine))


if __name__ == "__main__":
    main()
