"""``pseudo_label``: a trained model labels the unlabelled images.

Label = argmax of the softmax; pixels whose max probability is below ``threshold`` become 255
(not kept). One index PNG per image goes to ``<stage output>/pseudo_labels/<id>.png``. Where the
unlabelled images have ground truth (the benchmark datasets do), their quality is measured here —
the only place selftune reads unlabelled masks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from selftune.config import PseudoLabelStage
from selftune.data import IGNORE_INDEX, read_image
from selftune.engine.context import WorkerContext
from selftune.engine.loop import predict, to_device
from selftune.metrics import PseudoLabelQuality
from selftune.models import load_checkpoint
from selftune.stages.data import StageData, evaluation_loader, prepare_data
from selftune.stages.job import PSEUDO_LABELS, StageJob, register_stage
from selftune.tracking.pictures import save_overlay

OVERLAYS = 4  # pictures logged per labelling step


def label(probs: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """(B, C, H, W) probabilities -> (B, H, W) labels, 255 where confidence < threshold."""
    confidence, labels = probs.max(dim=1)
    if threshold is not None:
        labels[confidence < threshold] = IGNORE_INDEX
    return labels


def write_label_png(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)


@register_stage("pseudo_label")
def run_pseudo_label(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: PseudoLabelStage = job.stage  # type: ignore[assignment]
    data = prepare_data(job.pipeline.data, job.seed)
    model, _ = load_checkpoint(Path(job.inputs["model"]))
    model = model.to(ctx.device).eval()
    has_truth = all(sample.mask is not None for sample in data.unlabelled)
    loader = evaluation_loader(
        data, data.unlabelled, job.pipeline.data, ctx, masks="ground_truth" if has_truth else "none",
    )
    out = job.output(PSEUDO_LABELS)
    quality = PseudoLabelQuality(data.num_classes)
    for batch in loader:
        batch = to_device(batch, ctx.device)
        labels = label(predict(model, batch["image"], ctx), stage.threshold)
        for sample_id, sample_labels, (height, width) in zip(batch["id"], labels.cpu().numpy(), batch["size"].tolist()):
            write_label_png(out / f"{sample_id}.png", sample_labels[:height, :width])  # drop the batch padding
        if has_truth:
            quality.update(labels, batch["mask"])
    quality.all_reduce()
    ctx.report({"labelled": len(data.unlabelled)})  # a barrier: every worker's PNGs are written
    summary = quality_summary(quality, data) if has_truth else {}
    if ctx.is_main:
        ctx.tracker.log_metrics(_loggable(summary), step=0)
        log_overlays(job, ctx, data, out)
        job.write_summary(summary)
    ctx.log(_describe(stage.name, summary, len(data.unlabelled)))
    return summary


def quality_summary(quality: PseudoLabelQuality, data: StageData) -> dict[str, Any]:
    result = quality.compute()
    per_class = dict(zip(data.class_names, result["per_class_iou"]))
    return {
        "pseudo_label/miou": result["miou"],
        "pseudo_label/kept_fraction": result["kept_fraction"],
        "pseudo_label/class_coverage": result["class_coverage"],
        "pseudo_label/iou": {f"pseudo_label/iou/{name}": iou for name, iou in per_class.items()},
    }


def _loggable(summary: dict[str, Any]) -> dict[str, float]:
    flat = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    flat.update({k: v for k, v in summary.get("pseudo_label/iou", {}).items() if v == v})
    return flat


def log_overlays(job: StageJob, ctx: WorkerContext, data: StageData, labels_dir: Path) -> None:
    """A few pictures of image | ground truth | pseudo label (white = not kept)."""
    folder = job.output("overlays")
    folder.mkdir(parents=True, exist_ok=True)
    for sample in data.unlabelled[:OVERLAYS]:
        pseudo = np.array(Image.open(labels_dir / f"{sample.id}.png"))
        panels = [pseudo]
        if sample.mask is not None:
            from selftune.data import read_mask

            panels.insert(0, read_mask(sample.mask, data.num_classes, data.index.label_map))
        name = sample.id.replace("/", "_")
        path = save_overlay(folder / f"{name}.png", read_image(sample.image), panels, data.num_classes, scale=2)
        ctx.tracker.log_artifact(path, "pseudo_label_overlays")


def _describe(name: str, summary: dict[str, Any], count: int) -> str:
    if not summary:
        return f"  [{name}] labelled {count} images (no ground truth to measure quality)"
    return (
        f"  [{name}] labelled {count} images  pseudo-label mIoU {summary['pseudo_label/miou']:.4f}  "
        f"kept {100 * summary['pseudo_label/kept_fraction']:.1f}%"
    )
