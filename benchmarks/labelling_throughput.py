"""Labelling throughput: images/s of a labelling pass over the unlabelled images vs the bare model's inference.

Three arms over the same unlabelled images of the pipeline's dataset (default: the quickstart's
synthetic set; ``--unlabelled 400`` of its 64x64 train images, ``0`` for the pipeline's own 976), with the same small_segnet weights and torch threads:

inference: the physical limit — ``model(images)`` alone on batches decoded beforehand (untimed).
bare: a plain labelling script — load the checkpoint, the evaluation loader (decode PNGs),
forward, softmax, max/argmax with the stage's threshold, one PNG per image, serially.
selftune: ``selftune_arm`` — the labelling stage itself (default ``pseudo_label``), run through
Ray Train as ``selftune run`` runs it (local mode at ``workers: 0``), MLflow logging to a
temporary SQLite store, ground-truth quality and overlays included.

Rounds alternate the order (ABC, CBA, …) after one untimed call of each; min / median / max
images/s per arm and the ratio of medians to ``inference`` are printed (goal for a labelling
stage: >= 0.9), with the process's CPU time per image (all threads): on a machine shared with
other work, wall-clock rates drift, the CPU time each image costs much less. A breakdown follows,
timed in the same rounds: ``pass`` is the stage's labelling loop alone (``label_samples``: decode
on a thread, labeller, PNGs and quality counts on ``LabelWriter``'s threads), ``decode`` the
loader alone, ``finish`` the PNG writes and quality counts alone (on labels computed beforehand);
the stage minus ``pass`` is its fixed cost (Ray Train, MLflow, overlays). Peak memory: RSS above the level before each timed call (so one-off imports of
the warm-up are not counted), sampled every millisecond by a thread, the largest over the rounds. The decode cache is off by default (``--decode-cache-mb 0``): a one-pass labeller
reads every PNG once, and with the cache on whichever arm went first would fill it for the others.
The model is trained for ``--train-steps`` steps on the labelled images first (untimed, a few
seconds), so its labels pass the threshold in part as a real labeller's do and the PNGs are not
all 255; ``--checkpoint`` labels with a model of your own instead.

    PYTHONPATH=platform python benchmarks/labelling_throughput.py [--repeats 3] [--stage pseudo_label]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from selftune.config import load_pipeline
from selftune.data import IGNORE_INDEX
from selftune.data.io import DECODE_CACHE_ENV
from selftune.engine.context import WorkerContext
from selftune.models import build_model, load_checkpoint, save_checkpoint
from selftune.stages import StageJob
from selftune.data import cycle
from selftune.stages.data import StageData, evaluation_loader, prepare_data, training_loader
from selftune.tracking import KIND_STAGE, create_run, ensure_experiment, finish_run

from _measure import alternating_times, peak_rss_above_baseline  # benchmarks/, the script's own folder

REPO = Path(__file__).resolve().parent.parent


def inference_arm(model: torch.nn.Module, batches: list[torch.Tensor]) -> int:
    """The physical limit: forward passes over images already in memory. Returns the image count."""
    with torch.inference_mode():
        for images in batches:
            model(images)
    return sum(len(images) for images in batches)


def bare_arm(checkpoint: Path, data: StageData, pipeline, threshold: float | None, out: Path) -> int:
    """A plain labelling script: checkpoint, loader, forward, softmax, max/argmax, PNG writes."""
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    loader = evaluation_loader(data, data.unlabelled, pipeline.data, WorkerContext.local(device="cpu"), masks="none")
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    with torch.inference_mode():
        for batch in loader:
            confidence, labels = F.softmax(model(batch["image"]), dim=1).max(dim=1)
            if threshold is not None:
                labels[confidence < threshold] = IGNORE_INDEX
            for sample_id, sample_labels, (height, width) in zip(batch["id"], labels.numpy(), batch["size"].tolist()):
                Image.fromarray(sample_labels[:height, :width].astype(np.uint8), mode="L").save(out / f"{sample_id}.png")
            count += len(batch["id"])
    return count


def selftune_arm(pipeline, stage_index: int, checkpoint: Path, out: Path, tracking_uri: str, experiment_id: str) -> int:
    """The labelling stage as ``selftune run`` runs it, on ``checkpoint``'s model.

    Today: the stage's own function (``pseudo_label``, ``class_balanced_label``, …) through
    ``runner.in_process`` (the stage runner's executor), one MLflow run per call. When the unified labelling pass
    exists, call it here instead (same inputs: the pipeline, the stage, the model checkpoint, an
    output folder); the function must return the number of images it labelled.
    """
    from selftune.runner import in_process

    out.mkdir(parents=True, exist_ok=False)
    run_id = create_run(tracking_uri, experiment_id, name="labelling-throughput", kind=KIND_STAGE)
    job = StageJob(pipeline=pipeline, stage_index=stage_index, output_dir=str(out),
                   inputs={"model": str(checkpoint)}, tracking_uri=tracking_uri, run_id=run_id)
    status = "FAILED"
    try:
        in_process(pipeline.resources, storage=lambda _job: out.parent / "ray")(job)
        status = "FINISHED"
    finally:
        finish_run(tracking_uri, run_id, status)
    return len(list((out / "pseudo_labels").rglob("*.png")))


def pass_arm(model: torch.nn.Module, data: StageData, pipeline, stage_index: int, out: Path) -> int:
    """The stage's labelling loop alone, without Ray Train, MLflow or overlays."""
    from selftune.stages.labelling import label_samples, threshold_labels

    threshold = getattr(pipeline.stages[stage_index], "threshold", None)
    job = StageJob(pipeline=pipeline, stage_index=stage_index, output_dir=str(out))
    ctx = WorkerContext.local(device="cpu")
    label_samples(model, data.unlabelled, data, job, ctx, out,
                  lambda m, batch: threshold_labels(F.softmax(m(batch["image"]), dim=1), threshold))
    return len(data.unlabelled)


def decode_arm(data: StageData, pipeline) -> int:
    """The labelling loader alone (one-pass reads, ground-truth masks as the stage reads them)."""
    loader = evaluation_loader(data, data.unlabelled, pipeline.data, WorkerContext.local(device="cpu"),
                               masks="ground_truth", one_pass=True)
    return sum(len(batch["id"]) for batch in loader)


def finish_arm(finished: list[tuple[list[str], np.ndarray, list, np.ndarray]], out: Path) -> int:
    """``LabelWriter`` alone: PNGs and quality counts of labels computed beforehand."""
    from selftune.stages.labelling import LabelWriter

    out.mkdir(parents=True)
    with LabelWriter(out) as writer:
        for ids, labels, sizes, masks in finished:
            writer.submit(ids, labels, sizes, masks)
        writer.finish()
    return sum(len(ids) for ids, *_ in finished)


def labelled_batches(model: torch.nn.Module, data: StageData, pipeline, threshold: float | None):
    loader = evaluation_loader(data, data.unlabelled, pipeline.data, WorkerContext.local(device="cpu"), masks="ground_truth")
    with torch.inference_mode():
        return [(batch["id"], threshold_labels_of(model, batch, threshold).numpy(), batch["size"].tolist(),
                 batch["mask"].numpy()) for batch in loader]


def threshold_labels_of(model: torch.nn.Module, batch, threshold: float | None) -> torch.Tensor:
    confidence, labels = F.softmax(model(batch["image"]), dim=1).max(dim=1)
    if threshold is not None:
        labels[confidence < threshold] = IGNORE_INDEX
    return labels


def quickly_trained(model: torch.nn.Module, data: StageData, pipeline, steps: int) -> torch.nn.Module:
    """``steps`` Adam steps of cross-entropy on the labelled images (weakly augmented batches)."""
    loader = training_loader(data, data.labelled, pipeline.data, WorkerContext.local(device="cpu"),
                             batch_size=16, seed=pipeline.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    batches = cycle(loader)
    model.train()
    for _ in range(steps):
        batch = next(batches)
        loss = F.cross_entropy(model(batch["image"]), batch["mask"], ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def decoded_batches(data: StageData, pipeline) -> list[torch.Tensor]:
    loader = evaluation_loader(data, data.unlabelled, pipeline.data, WorkerContext.local(device="cpu"), masks="none")
    return [batch["image"] for batch in loader]


def stage_index_of(pipeline, name: str, source: str) -> int:
    names = [stage.name for stage in pipeline.stages]
    if name not in names:
        print(f"{source}: no stage named {name!r}; stages are {', '.join(names)}", file=sys.stderr)
        sys.exit(2)
    return names.index(name)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", default=str(REPO / "pipelines" / "quickstart.yaml"))
    parser.add_argument("--stage", default="pseudo_label", help="the labelling stage of the pipeline to run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unlabelled", type=int, default=400,
                        help="images to label (data.labelled becomes the rest of train); 0: the pipeline's split")
    parser.add_argument("--train-steps", type=int, default=60, help="untimed training before labelling")
    parser.add_argument("--checkpoint", help="a checkpoint folder (model.pt + model.json) to label with instead")
    parser.add_argument("--decode-cache-mb", default="0", help=f"{DECODE_CACHE_ENV} for every arm")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="pipeline override KEY=VALUE")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ[DECODE_CACHE_ENV] = args.decode_cache_mb
    pipeline = load_pipeline(args.pipeline, args.overrides)
    if args.unlabelled:  # the rest of train becomes the labelled set
        train = len(prepare_data(pipeline.data, pipeline.seed).index.train)
        pipeline = load_pipeline(args.pipeline, [*args.overrides, f"data.labelled={train - args.unlabelled}"])
    index = stage_index_of(pipeline, args.stage, args.pipeline)
    stage = pipeline.stages[index]
    threshold = getattr(stage, "threshold", None)
    data = prepare_data(pipeline.data, pipeline.seed)
    if args.checkpoint:
        model, _ = load_checkpoint(Path(args.checkpoint))
        model.eval()
    else:
        torch.manual_seed(pipeline.seed)
        model = build_model(pipeline.model.name, data.num_classes, **pipeline.model.options)
        model = quickly_trained(model, data, pipeline, args.train_steps)
    batches = decoded_batches(data, pipeline)
    print(f"stage {stage.name!r} ({stage.kind}), {len(data.unlabelled)} unlabelled images, model {pipeline.model.name}, "
          f"batch {pipeline.data.eval_batch_size}, workers={pipeline.resources.workers}, torch threads "
          f"{torch.get_num_threads()}, {DECODE_CACHE_ENV}={args.decode_cache_mb}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else save_checkpoint(
            root / "model", model, {"name": pipeline.model.name, "num_classes": data.num_classes, "options": pipeline.model.options})
        tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        experiment_id = ensure_experiment(tracking_uri, "labelling-throughput")
        calls = iter(range(10**6))  # a fresh output folder per call
        finished = labelled_batches(model, data, pipeline, threshold)
        arms = {
            "inference": lambda: inference_arm(model, batches),
            "bare": lambda: bare_arm(checkpoint, data, pipeline, threshold, root / f"bare-{next(calls)}"),
            "selftune": lambda: selftune_arm(pipeline, index, checkpoint, root / f"stage-{next(calls)}",
                                             tracking_uri, experiment_id),
            "pass": lambda: pass_arm(model, data, pipeline, index, root / f"pass-{next(calls)}"),
            "decode": lambda: decode_arm(data, pipeline),
            "finish": lambda: finish_arm(finished, root / f"finish-{next(calls)}"),
        }
        counts = {name: fn() for name, fn in arms.items()}  # warm-up: imports, Ray Train, MLflow schema
        memory: dict[str, int] = {name: 0 for name in arms}
        cpu: dict[str, list[float]] = {name: [] for name in arms}

        def sampled(name: str):
            def call() -> None:
                started = time.process_time()
                memory[name] = max(memory[name], peak_rss_above_baseline(arms[name])[1])
                cpu[name].append(time.process_time() - started)
            return call

        times = alternating_times({name: sampled(name) for name in arms}, args.repeats, warm_up=False)

    limit = statistics.median(counts["inference"] / s for s in times["inference"])
    print(f"{'arm':>10} {'images':>7} {'min img/s':>10} {'median':>8} {'max':>8} {'/inference':>11} "
          f"{'CPU ms/img':>11} {'peak MiB':>9}")
    for name, seconds in times.items():
        rates = [counts[name] / s for s in seconds]
        median = statistics.median(rates)
        cpu_ms = 1000 * statistics.median(cpu[name]) / counts[name]
        print(f"{name:>10} {counts[name]:>7} {min(rates):>10.0f} {median:>8.0f} {max(rates):>8.0f} "
              f"{median / limit:>10.2f}x {cpu_ms:>11.2f} {memory[name] / 2**20:>9.1f}")
    print("/inference = median images/s over inference's median (goal for a labelling stage: >= 0.9); CPU ms/img = "
          "median process CPU time (all threads) per image; peak MiB = largest RSS above the level before a timed "
          "call, 1 ms sampling; pass/decode/finish: the breakdown (see the docstring)")
    wall_ms = {name: 1000 * statistics.median(seconds) / counts[name] for name, seconds in times.items()}
    print(f"wall ms/img: stage {wall_ms['selftune']:.2f} = pass {wall_ms['pass']:.2f} + fixed "
          f"{wall_ms['selftune'] - wall_ms['pass']:.2f}; pass - inference {wall_ms['pass'] - wall_ms['inference']:.2f} "
          f"(decode alone {wall_ms['decode']:.2f}, PNGs + quality alone {wall_ms['finish']:.2f})")


if __name__ == "__main__":
    main()
