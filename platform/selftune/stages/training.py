"""What every training stage shares: the network it starts from, and ``train_network``: ``fit``
with the standard hooks — val mIoU after each epoch, the best checkpoint kept, metrics logged and
reported, one progress line per epoch — and the stage summary.

A training stage only says which network to train, which batches to draw and how to turn a batch
into loss terms, plus any hooks of its own (an EMA teacher, snapshots, online label quality).
Standard hooks run after the stage's own, in this order: ``EvaluateOnVal``, the stage's hooks,
``KeepBest``, ``ReportEpoch``, ``EpochProgress``, ``LogEpoch``: an epoch is reported (on a worker group, with the
checkpoint a restarted group resumes from) before its metrics are logged, so a restart never logs
an epoch twice.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from selftune.config import ClassWeighting
from selftune.data import read_mask
from selftune.engine.context import WorkerContext
from selftune.engine.loop import Batch, Hook, LossFn, TrainState, evaluate, fit, unwrap
from selftune.engine.progress import EpochProgress
from selftune.methods.auxnet import enet_class_weights
from selftune.metrics import ConfusionMatrix, plot_confusion_matrix
from selftune.models import build_model, load_checkpoint, save_checkpoint
from selftune.stages.data import StageData, evaluation_loader
from selftune.stages.job import CHECKPOINT, StageJob

ModelConfig = dict[str, Any]  # build_model's arguments: {name, num_classes, options} (what model.json holds)


def pipeline_model_config(job: StageJob, num_classes: int) -> ModelConfig:
    config = job.pipeline.model
    return {"name": config.name, "num_classes": num_classes, "options": dict(config.options)}


def fresh_network(job: StageJob, model_config: ModelConfig) -> nn.Module:
    """A new network drawn with the stage's seed (the same weights on every rank)."""
    torch.manual_seed(job.init_seed)
    return build_model(model_config["name"], model_config["num_classes"], **model_config["options"])


def initial_model(job: StageJob, num_classes: int) -> tuple[nn.Module, ModelConfig]:
    """The ``init`` stage's best checkpoint, or fresh weights from the pipeline's model config."""
    if "init" in job.inputs:
        torch.manual_seed(job.init_seed)
        return load_checkpoint(Path(job.inputs["init"]))
    model_config = pipeline_model_config(job, num_classes)
    return fresh_network(job, model_config), model_config


# --------------------------------------------------------------------------------------------
# The standard hooks
# --------------------------------------------------------------------------------------------


class EvaluateSplits(Hook):
    """After each epoch: ``select/miou`` on the selection images (what ranks checkpoints) and
    ``val/miou`` on the reported val images (val minus the selection). Under the papers' protocol
    (``data.selection: val``) the two sets are one, evaluated once; both names carry the value."""

    def __init__(self, data: StageData, config, ctx: WorkerContext):
        self.ctx, self.num_classes = ctx, data.num_classes
        self.reported = evaluation_loader(data, data.reported, config, ctx)
        self.selection = None if data.selects_on_val else evaluation_loader(data, data.selection, config, ctx)
        self.confusion: ConfusionMatrix | None = None  # the reported set's, of the last epoch

    def after_epoch(self, state: TrainState, model: nn.Module) -> None:
        self.confusion = evaluate(model, self.reported, self.num_classes, self.ctx)
        state.metrics.update({"val/miou": self.confusion.miou(), "val/pixel_accuracy": self.confusion.pixel_accuracy()})
        if self.selection is None:
            state.metrics["select/miou"] = state.metrics["val/miou"]
            return
        selected = evaluate(model, self.selection, self.num_classes, self.ctx)
        state.metrics.update({"select/miou": selected.miou(), "select/pixel_accuracy": selected.pixel_accuracy()})


class KeepBest(Hook):
    """Save the network whenever ``metric`` improves (rank 0); ``export`` turns the trained network
    into the one to save (e.g. DSBN's back into the plain network). NaN ranks below any value."""

    def __init__(
        self, folder: Path, model_config: ModelConfig, ctx: WorkerContext, *, metric: str = "select/miou",
        export: Callable[[nn.Module], nn.Module] | None = None, on_best: Callable[[TrainState], None] | None = None,
        save: Callable[[Path, nn.Module, dict[str, Any]], None] | None = None,
    ):
        self.folder, self.model_config, self.ctx, self.metric = folder, model_config, ctx, metric
        self.export, self.on_best, self.save = export, on_best, save
        self.best: float | None = None
        self.best_epoch = 0
        self.best_metrics: dict[str, float] = {}

    def after_epoch(self, state: TrainState, model: nn.Module) -> None:
        value = state.metrics[self.metric]
        score = value if value == value else -float("inf")
        if self.best is not None and score <= self.best:
            return
        self.best, self.best_epoch, self.best_metrics = score, state.epoch, dict(state.metrics)
        if self.on_best:
            self.on_best(state)
        if self.ctx.is_main:
            network = unwrap(model)
            network = self.export(network) if self.export else network
            facts = {self.metric.replace("/", "_"): value, "epoch": state.epoch}
            if self.save:
                self.save(self.folder, network, facts)
            else:
                save_checkpoint(self.folder, network, self.model_config, extra=facts)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "best_metrics": dict(self.best_metrics)}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # the best network's file is already saved
        self.best, self.best_epoch, self.best_metrics = state["best"], state["best_epoch"], dict(state["best_metrics"])


class BestConfusion(Hook):
    """The reported set's confusion matrix at the best epoch (the summary's per-class IoU); a hook
    only so that a restarted worker group gets it back."""

    def __init__(self) -> None:
        self.matrix: torch.Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"matrix": self.matrix}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.matrix = state["matrix"]


class LogEpoch(Hook):
    """The epoch's metrics to the stage's MLflow run (step = epoch) and one line on the console,
    with the epoch's time and images/s from ``progress`` (the hook that shows its steps)."""

    def __init__(self, ctx: WorkerContext, stage_name: str, shown: str = "val/miou", progress: EpochProgress | None = None):
        self.ctx, self.stage_name, self.shown = ctx, stage_name, shown
        self.progress = progress
        self.started = time.perf_counter()
        self.logged: set[int] = set()  # epochs an earlier attempt of this worker group logged

    def before_train(self, state: TrainState, model: nn.Module) -> None:
        """A restarted worker group: each epoch's metrics stay logged once. Ray Train registers a
        reported checkpoint asynchronously, so the group may restart from the epoch before the
        last one it logged (that epoch is then trained again, and not logged again); and the last
        attempt may have died between reporting an epoch and logging it (logged now)."""
        if self.ctx.attempt <= 1 or not self.ctx.is_main:
            return
        self.logged = self.ctx.tracker.logged_steps("train/loss")
        if state.epoch and state.epoch not in self.logged and state.metrics:
            self.ctx.tracker.log_metrics(state.metrics, step=state.epoch)
            self.logged.add(state.epoch)

    def before_epoch(self, state: TrainState, model: nn.Module) -> None:
        self.started = time.perf_counter()

    def after_epoch(self, state: TrainState, model: nn.Module) -> None:
        if state.epoch not in self.logged:
            self.ctx.tracker.log_metrics(state.metrics, step=state.epoch)
        value = state.metrics.get(self.shown, float("nan"))
        label = {"val/miou": "val mIoU"}.get(self.shown, self.shown)
        timing = self.progress.epoch_rate() if self.progress else f"{time.perf_counter() - self.started:.1f}s"
        self.ctx.log(
            f"  [{self.stage_name}] epoch {state.epoch}/{state.epochs}  loss {state.losses['loss']:.4f}  "
            f"{label} {value:.4f}  ({timing})"
        )


def epoch_lines(ctx: WorkerContext, stage_name: str, shown: str = "val/miou") -> list[Hook]:
    """The last hooks of a stage: its steps' progress line, erased (after evaluation) just before
    ``LogEpoch`` logs the epoch and prints its line."""
    progress = EpochProgress(stage_name, enabled=ctx.is_main, workers=ctx.world_size)
    return [progress, LogEpoch(ctx, stage_name, shown, progress=progress)]


class ReportEpoch(Hook):
    """``ray.train.report`` after each epoch (a barrier under Ray Train: every rank calls it), with
    the training state a restarted worker group resumes from."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx

    def after_epoch(self, state: TrainState, model: nn.Module) -> None:
        self.ctx.report({"epoch": state.epoch, **state.metrics}, state.snapshot)


# --------------------------------------------------------------------------------------------
# A training stage
# --------------------------------------------------------------------------------------------


def train_network(
    job: StageJob,
    ctx: WorkerContext,
    data: StageData,
    network: nn.Module,
    model_config: ModelConfig,
    *,
    batches: Iterator[Batch],
    steps_per_epoch: int,
    compute_losses: LossFn,
    hooks: Sequence[Hook] = (),
    export: Callable[[nn.Module], nn.Module] | None = None,
) -> dict[str, Any]:
    """Train ``network`` for the stage's epochs with the standard hooks; return the stage summary."""
    stage = job.stage
    evaluation = EvaluateSplits(data, job.pipeline.data, ctx)
    best_confusion = BestConfusion()
    keep = KeepBest(
        job.output(CHECKPOINT), model_config, ctx, export=export,
        on_best=lambda state: setattr(best_confusion, "matrix", evaluation.confusion.matrix.cpu()),
    )
    state = fit(
        network, batches, epochs=stage.epochs, steps_per_epoch=steps_per_epoch, compute_losses=compute_losses,
        optimizer=stage.optimizer, ctx=ctx,
        hooks=[evaluation, *hooks, keep, best_confusion, ReportEpoch(ctx), *epoch_lines(ctx, stage.name)],
    )
    # Online labelling (U2PL) reports label quality per epoch; the stage summary keeps the last.
    labelling = {k: v for k, v in state.metrics.items()
                 if k.split("/")[0] in ("pseudo_label", "train_label") and k.count("/") == 1}
    return finish_training(job, ctx, data, keep, best_confusion.matrix, extra_summary=labelling)


def finish_training(
    job: StageJob, ctx: WorkerContext, data: StageData, keep: KeepBest, matrix: torch.Tensor,
    *, extra_summary: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Log the kept checkpoint's metrics (as the last ``select/miou`` and ``val/miou`` points: the
    epoch the selection images chose, measured on the reported images) and its confusion matrix."""
    confusion = ConfusionMatrix(data.num_classes)
    confusion.matrix = matrix
    per_class = {f"val/iou/{name}": iou for name, iou in zip(data.class_names, confusion.iou().tolist())}
    miou, selected = keep.best_metrics["val/miou"], keep.best_metrics["select/miou"]
    chosen = {"select/miou": selected, "val/miou": miou, "val/best_epoch": keep.best_epoch}
    final = {**chosen, **_finite(per_class)}
    summary = {**chosen, "val/iou": per_class, **(extra_summary or {})}
    if ctx.is_main:
        ctx.tracker.log_metrics(final, step=job.stage.epochs)
        picture = job.output("confusion_matrix.png")
        plot_confusion_matrix(confusion.matrix, data.class_names, picture, title=f"{job.stage.name}: val mIoU {miou:.4f} (epoch {keep.best_epoch})")
        ctx.tracker.log_artifact(picture)
    return summary


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """MLflow stores NaN, but a class never seen is better left out than charted as NaN."""
    return {k: v for k, v in metrics.items() if v == v}


def enet_weights(stage: ClassWeighting, data: StageData, ctx: WorkerContext) -> torch.Tensor | None:
    """The stage's ENet class weights from the labelled masks (logged as ``class_weight/<class>``),
    or None for plain cross-entropy. The same on every rank: every rank reads every labelled mask."""
    if stage.class_weights == "none":
        return None
    masks = (torch.from_numpy(read_mask(s.mask, data.num_classes, data.index.label_map)).long() for s in data.labelled)
    weights = enet_class_weights(masks, data.num_classes, c=stage.class_weight_c).float()
    ctx.tracker.log_metrics({f"class_weight/{name}": w for name, w in zip(data.class_names, weights.tolist())}, step=0)
    return weights


def steps_per_epoch(configured: int | None, dataset_size: int, batch_size: int, world_size: int) -> int:
    """``configured``, or one pass over this worker's shard of the main training set."""
    if configured is not None:
        return configured
    per_worker = -(-dataset_size // world_size)
    return max(1, -(-per_worker // batch_size))
