"""The one labelling pass every labelling kind shares.

A labelling stage chooses a *labeller* — ``(model, batch) -> (B, H, W) labels, 255 = not kept``,
built from a tensor function of its method module — and ``label_and_measure`` does the rest:
this worker's shard of the images through the model, one index PNG per image in
``<stage>/pseudo_labels/<id>.png``, the quality against the unlabelled images' ground truth where
the dataset has it (the only place selftune reads unlabelled masks), overlays and MLflow metrics.
"""

from __future__ import annotations

from collections import deque
from contextlib import closing
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from selftune.data import IGNORE_INDEX, Sample, prefetched, read_image, read_mask
from selftune.engine.context import WorkerContext
from selftune.engine.loop import to_device
from selftune.engine.progress import counted
from selftune.errors import DataError
from selftune.metrics import PseudoLabelQuality
from selftune.metrics.pseudo_labels import value_pair_counts
from selftune.models import load_checkpoint
from selftune.stages.data import StageData, evaluation_loader, has_ground_truth
from selftune.stages.job import PSEUDO_LABELS_FOLDER, StageJob
from selftune.tracking.pictures import save_overlay

OVERLAYS = 4  # pictures logged per labelling step
Labeller = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def threshold_labels(probs: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """(B, C, H, W) probabilities -> (B, H, W) argmax labels, 255 where confidence < threshold."""
    confidence, labels = probs.max(dim=1)
    if threshold is not None:
        labels[confidence < threshold] = IGNORE_INDEX
    return labels


def load_model(path: str | Path, ctx: WorkerContext) -> nn.Module:
    """A stage's checkpoint, on this worker's device, in eval mode."""
    model, _ = load_checkpoint(Path(path))
    return model.to(ctx.device).eval()


def write_label_png(path: Path, labels: np.ndarray) -> None:
    """One index PNG; a failure (full disk, no permission) is a one-line DataError naming the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels.astype(np.uint8, copy=False), mode="L").save(path)
    except OSError as exc:
        raise DataError(f"cannot write pseudo label {path}: {exc.strerror or exc}") from None


class LabelWriter:
    """Finishes a labelled batch on a few threads, off the inference loop: one PNG per image
    (PIL's encoder releases the GIL) and the pseudo-label quality counts.

    ``submit`` hands over a batch's (B, H, W) class ids (0..C-1 or 255, any integer dtype); at most ``max_pending`` batches wait (memory
    stays bounded, and a failure surfaces while the loop runs). ``finish`` waits for every batch
    and raises the first failure; leaving the ``with`` block early drops what has not started.
    """

    def __init__(self, out: Path | None, threads: int = 2, max_pending: int = 4) -> None:
        self.out = out
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="label-png")
        self.pending: deque[Future] = deque()
        self.max_pending = max_pending
        self.counts: np.ndarray | None = None  # summed value_pair_counts of the finished batches

    def submit(self, ids: Sequence[str], labels: np.ndarray, sizes: Sequence[Sequence[int]], truth: np.ndarray | None) -> None:
        while len(self.pending) >= self.max_pending:
            self._collect(self.pending.popleft())
        self.pending.append(self.pool.submit(self._finish_batch, ids, labels, sizes, truth))

    def _finish_batch(self, ids, labels: np.ndarray, sizes, truth: np.ndarray | None) -> np.ndarray | None:
        # Class ids and 255 fit a byte; casting here keeps the copy off the inference thread.
        labels = labels.astype(np.uint8, copy=False)
        if self.out is not None:
            for sample_id, sample_labels, (height, width) in zip(ids, labels, sizes):
                write_label_png(self.out / f"{sample_id}.png", sample_labels[:height, :width])  # drop the batch padding
        return None if truth is None else value_pair_counts(labels, truth.astype(np.uint8, copy=False))

    def _collect(self, future: Future) -> None:
        counts = future.result()  # re-raises the thread's error here, in the stage
        if counts is not None:
            self.counts = counts if self.counts is None else self.counts + counts

    def finish(self) -> np.ndarray | None:
        """Wait for every batch; the summed pair counts (None without ground truth)."""
        while self.pending:
            self._collect(self.pending.popleft())
        return self.counts

    def __enter__(self) -> LabelWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for future in self.pending:
            future.cancel()
        self.pool.shutdown(wait=True)


@torch.no_grad()
def label_samples(
    model: nn.Module, samples: Sequence[Sample], data: StageData, job: StageJob, ctx: WorkerContext, out: Path | None,
    labeller: Labeller,
) -> PseudoLabelQuality | None:
    """Write ``out/<id>.png`` for this worker's shard of ``samples`` (``out`` None: measure only);
    return the quality against ground truth summed over all workers (None when the images have no
    ground truth). Every rank must call it (the quality is all-reduced).

    The images are read once, past the decode cache; the next batch is decoded on a thread while
    the model runs, and PNG writes and quality counts run on ``LabelWriter``'s threads."""
    model = model.to(ctx.device).eval()
    truth = has_ground_truth(samples)
    loader = evaluation_loader(data, samples, job.pipeline.data, ctx, masks="ground_truth" if truth else "none",
                               one_pass=True)
    quality = PseudoLabelQuality(data.num_classes)
    with LabelWriter(out) as writer, closing(prefetched(loader)) as batches:  # both stop if the loop fails
        for batch in counted(batches, f"  [{job.stage.name}] labelling", len(samples), enabled=ctx.is_main,
                             workers=ctx.world_size):
            masks = batch["mask"].numpy() if truth else None  # the loader's CPU copy
            labels = labeller(model, to_device(batch, ctx.device))  # (B, H, W), 255 = not kept
            if labels.device.type != "cpu":
                labels = labels.to(torch.uint8).cpu()  # an eighth of the transfer
            writer.submit(batch["id"], labels.numpy(), batch["size"].tolist(), masks)
        counts = writer.finish()
    if counts is not None:
        quality.add_pair_counts(counts)
    quality.all_reduce()
    return quality if truth else None


def label_and_measure(
    job: StageJob, ctx: WorkerContext, data: StageData, model: nn.Module, labeller: Labeller, *,
    samples: Sequence[Sample] | None = None, extra_metrics: dict[str, float] | None = None, what: str = "",
) -> dict[str, Any]:
    """Label ``samples`` (default: every unlabelled image), measure and log their quality.

    Metrics go to the stage run with the round as step (0 outside a ``rounds`` group). Returns the
    summary: pseudo-label quality + ``extra_metrics``.
    """
    samples = data.unlabelled if samples is None else list(samples)
    out = job.output(PSEUDO_LABELS_FOLDER)
    out.mkdir(parents=True, exist_ok=True)  # exists even when nothing is labelled
    quality = label_samples(model, samples, data, job, ctx, out, labeller)
    ctx.report({"labelled": len(samples)})  # a barrier: every worker's PNGs are written
    summary = {**(quality_summary(quality, data) if quality is not None else {}), **(extra_metrics or {})}
    if ctx.is_main:
        log_quality(ctx, summary, step=job.stage.round or 0)
        if samples:
            log_overlays(job, ctx, data.only_unlabelled(samples), out)
    ctx.log(describe(job.stage.name, what, summary, len(samples)))
    return summary


def quality_summary(quality: PseudoLabelQuality, data: StageData) -> dict[str, Any]:
    """The standard pseudo-label quality (seed 004's three numbers), with per-class IoU and
    per-class coverage ("class semi ratio": the share of a class's pixels that are kept)."""
    result = quality.compute()
    return {
        "pseudo_label/miou": result["miou"],
        "pseudo_label/kept_fraction": result["kept_fraction"],
        "pseudo_label/class_coverage": result["class_coverage"],
        "pseudo_label/iou": {f"pseudo_label/iou/{name}": v for name, v in zip(data.class_names, result["per_class_iou"])},
        "pseudo_label/coverage": {
            f"pseudo_label/coverage/{name}": v for name, v in zip(data.class_names, result["per_class_coverage"])
        },
    }


def loggable(summary: dict[str, Any]) -> dict[str, float]:
    """A quality summary as flat metrics (per-class values unpacked, NaN left out)."""
    flat = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    for per_class in (v for v in summary.values() if isinstance(v, dict)):
        flat.update({k: v for k, v in per_class.items() if v == v})
    return flat


def log_quality(ctx: WorkerContext, summary: dict[str, Any], step: int, prefix: str = "") -> None:
    """Log a ``quality_summary`` (flattened) at ``step``; ``prefix`` renames ``pseudo_label/`` keys."""
    flat = loggable(summary)
    if prefix:
        flat = {k.replace("pseudo_label/", prefix, 1): v for k, v in flat.items()}
    ctx.tracker.log_metrics(flat, step=step)


def log_overlays(job: StageJob, ctx: WorkerContext, data: StageData, labels_dir: Path) -> None:
    """A few pictures of image | ground truth | pseudo label (white = not kept)."""
    folder = job.output("overlays")
    folder.mkdir(parents=True, exist_ok=True)
    for sample in data.unlabelled[:OVERLAYS]:
        pseudo = np.array(Image.open(labels_dir / f"{sample.id}.png"))
        panels = [pseudo]
        if sample.mask is not None:
            panels.insert(0, read_mask(sample.mask, data.num_classes, data.index.label_map))
        name = sample.id.replace("/", "_")
        path = save_overlay(folder / f"{name}.png", read_image(sample.image), panels, data.num_classes, scale=2,
                            class_names=data.class_names)
        ctx.tracker.log_artifact(path, "pseudo_label_overlays")


def describe(name: str, what: str, summary: dict[str, Any], count: int) -> str:
    what = f" {what}:" if what else ""
    if "pseudo_label/miou" not in summary:
        return f"  [{name}]{what} labelled {count} images (no ground truth to measure quality)"
    return (
        f"  [{name}]{what} labelled {count} images  pseudo-label mIoU {summary['pseudo_label/miou']:.4f}  "
        f"kept {100 * summary['pseudo_label/kept_fraction']:.1f}%"
    )
