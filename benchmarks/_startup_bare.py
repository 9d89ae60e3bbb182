"""The bare side of ``startup.py``: the 1-step quickstart's work as one plain script, run in a
fresh process. The same data and model code as the stages (selftune.data, selftune.models), no
Ray, no MLflow, no stage runner: supervised (1 step, one evaluation on val, a checkpoint), the
pseudo labels of the unlabelled images (one PNG each), self-training from the supervised weights
(1 step on labelled + pseudo-labelled images, one evaluation, a checkpoint).

    python benchmarks/_startup_bare.py OUT --set KEY=VALUE ...   (the overrides startup.py passes)
"""

from __future__ import annotations

import sys
import time

STARTED = time.perf_counter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from selftune.config import load_pipeline  # noqa: E402
from selftune.data import IGNORE_INDEX, cycle  # noqa: E402
from selftune.engine.context import WorkerContext  # noqa: E402
from selftune.metrics import ConfusionMatrix  # noqa: E402
from selftune.models import build_model, save_checkpoint  # noqa: E402
from selftune.stages.data import evaluation_loader, prepare_data, training_loader  # noqa: E402
from selftune.stages.labelling import threshold_labels, write_label_png  # noqa: E402

IMPORTED = time.perf_counter()


def train_steps(model, batches, optimizer, steps: int) -> None:
    model.train()
    for _ in range(steps):
        images, masks = next(batches)
        loss = F.cross_entropy(model(images), masks, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def val_miou(model, loader, num_classes: int) -> float:
    model.eval()
    confusion = ConfusionMatrix(num_classes)
    for batch in loader:
        confusion.update(model(batch["image"]).argmax(1), batch["mask"])
    return confusion.miou()


def images_and_masks(*loaders):
    """Endless (images, masks) batches, one batch of each loader concatenated per step."""
    streams = [cycle(loader) for loader in loaders]
    while True:
        batches = [next(stream) for stream in streams]
        yield torch.cat([b["image"] for b in batches]), torch.cat([b["mask"] for b in batches])


def main(out: str, overrides: list[str]) -> None:
    from pathlib import Path

    out_dir = Path(out)
    pipeline = load_pipeline(Path(__file__).resolve().parent.parent / "pipelines" / "quickstart.yaml", overrides)
    supervised, labelling, self_train = pipeline.stages
    ctx = WorkerContext.local(device="cpu")
    data = prepare_data(pipeline.data, pipeline.seed)
    config = {"name": pipeline.model.name, "num_classes": data.num_classes, "options": pipeline.model.options}
    val = evaluation_loader(data, data.index.val, pipeline.data, ctx)

    torch.manual_seed(pipeline.seed)
    model = build_model(pipeline.model.name, data.num_classes, **pipeline.model.options)
    optimizer = torch.optim.Adam(model.parameters(), lr=supervised.optimizer.lr)
    labelled = training_loader(data, data.labelled, pipeline.data, ctx, batch_size=supervised.batch_size, seed=pipeline.seed)
    train_steps(model, images_and_masks(labelled), optimizer, supervised.epochs * supervised.steps_per_epoch)
    print(f"supervised val mIoU {val_miou(model, val, data.num_classes):.4f}")
    save_checkpoint(out_dir / "supervised" / "model", model, config)

    labels_dir = out_dir / "pseudo_label" / "pseudo_labels"
    model.eval()
    with torch.no_grad():
        for batch in evaluation_loader(data, data.unlabelled, pipeline.data, ctx, masks="none", one_pass=True):
            labels = threshold_labels(F.softmax(model(batch["image"]), dim=1), labelling.threshold)
            for sample_id, sample_labels, (h, w) in zip(batch["id"], labels.numpy(), batch["size"].tolist()):
                write_label_png(labels_dir / f"{sample_id}.png", sample_labels[:h, :w])

    optimizer = torch.optim.Adam(model.parameters(), lr=self_train.optimizer.lr)
    labelled = training_loader(data, data.labelled, pipeline.data, ctx, batch_size=self_train.batch_size, seed=pipeline.seed)
    pseudo = training_loader(data, data.unlabelled, pipeline.data, ctx, batch_size=self_train.unlabelled_batch_size,
                             seed=pipeline.seed + 1, masks=str(labels_dir))
    train_steps(model, images_and_masks(labelled, pseudo), optimizer, self_train.epochs * self_train.steps_per_epoch)
    print(f"self_train val mIoU {val_miou(model, val, data.num_classes):.4f}")
    save_checkpoint(out_dir / "self_train" / "model", model, config)
    print(f"bare: imports {IMPORTED - STARTED:.2f}s, work {time.perf_counter() - IMPORTED:.2f}s")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    main(arguments[0], [value for flag, value in zip(arguments[1::2], arguments[2::2]) if flag == "--set"])
