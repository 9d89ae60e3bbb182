"""Calibrate the built-in synthetic dataset and the quickstart recipe: does self-training beat the
supervised baseline, by how much, and at what compute?

Bare PyTorch (no Ray, no MLflow), mirroring what the quickstart's three stages do:

1. supervised: cross-entropy on a seeded labelled subset (the same subset ``data.labelled: N``
   picks: a seeded permutation of the sorted train ids), weak augmentation (random rescale, pad
   with ignore, random crop, horizontal flip), Adam + poly LR, val mIoU every ``--eval-every``
   steps, the best-val weights kept (the platform keeps the best epoch's checkpoint);
2. pseudo-label: argmax of the softmax on the un-augmented unlabelled images, pixels whose
   confidence is below the threshold set to 255; reports the pseudo labels' mIoU against the
   ground truth and the kept fraction;
3. self-train: one forward over [labelled batch; pseudo-labelled batch] (shared BN statistics),
   CE on each part, from scratch or fine-tuned from the supervised weights (``--variants``).

Several self-training variants share one supervised run and one labelling pass:
``--variants scratch:0.9,finetune:0.9`` (init:threshold). ``--oracle`` adds a run trained on the
ground truth of the unlabelled images instead of pseudo labels (the ceiling self-training aims at).
Prints steps, images through the network and wall time per phase; the machine may be shared, so
compare step counts, and time steps with ``--threads 2`` on an idle machine to extrapolate.

    PYTHONPATH=platform python benchmarks/synthetic_calibration.py --seed 0 --labelled 12 \\
        --sup-steps 400 --st-steps 400 --variants scratch:0.9,finetune:0.9 --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "platform"))

from selftune.data.synthetic import SyntheticDesign, default_cache_dir, ensure_synthetic, generate_synthetic  # noqa: E402
from selftune.models.small import small_segnet  # noqa: E402

IGNORE = 255
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet statistics, as the platform
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------- data


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, H, W) uint8
    masks: torch.Tensor  # (N, H, W) long, 255 = ignore


def read_folder(root: Path, split: str) -> tuple[list[str], Split]:
    ids = sorted((root / "splits" / f"{split}.txt").read_text().split())
    images = np.stack([np.asarray(Image.open(root / "images" / f"{i}.png").convert("RGB")) for i in ids])
    masks = np.stack([np.asarray(Image.open(root / "masks" / f"{i}.png")) for i in ids])
    return ids, Split(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(masks).long())


def subset(split: Split, index) -> Split:
    return Split(split.images[index], split.masks[index])


def normalise(images: torch.Tensor) -> torch.Tensor:  # uint8 (B, 3, H, W) -> float
    return (images.float() / 255 - MEAN) / STD


def weak_augment(batch: Split, scale_range: tuple[float, float], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The platform's weak augmentation, vectorised: rescale by s ~ U(scale_range) (bilinear image,
    nearest mask), pad to the crop size centred (image black, mask 255), random crop of the input
    size, horizontal flip with p = 0.5. Returns (normalised images, masks)."""
    n, _, h, w = batch.images.shape
    s = torch.empty(n).uniform_(*scale_range, generator=gen)
    # Crop offset in the rescaled image's pixels: random where it is larger, centred padding where smaller.
    def offset(size: int) -> torch.Tensor:
        room = size * s - size
        return torch.where(room > 0, torch.rand(n, generator=gen) * room, room / 2)

    ox, oy = offset(w), offset(h)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    # Output pixel centre j+0.5 samples the source at (j + 0.5 + offset) / s, in normalised coordinates.
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = flip / s
    theta[:, 0, 2] = 1 / s + 2 * ox / (s * w) - 1
    theta[:, 1, 1] = 1 / s
    theta[:, 1, 2] = 1 / s + 2 * oy / (s * h) - 1
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    images = F.grid_sample(batch.images.float() / 255, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Masks: shift by one so zero padding reads as -1, then map it to ignore.
    masks = F.grid_sample((batch.masks + 1).float().unsqueeze(1), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False).squeeze(1).long() - 1
    masks[masks < 0] = IGNORE
    return (images - MEAN) / STD, masks


class Batches:
    """Endless batches of a split like a shuffled DataLoader with drop_last (a short final batch
    is kept when the split is smaller than one batch, as the platform does)."""

    def __init__(self, split: Split, batch_size: int, gen: torch.Generator):
        self.split, self.gen = split, gen
        self.n = len(split.images)
        self.batch_size = min(batch_size, self.n)
        self.order, self.pos = torch.empty(0, dtype=torch.long), 0

    def __next__(self) -> Split:
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        index = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return subset(self.split, index)


# ---------------------------------------------------------------------------------------- metrics


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    valid = target != IGNORE
    index = target[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes**2).view(num_classes, num_classes)


def miou(matrix: torch.Tensor) -> float:
    """Mean IoU over classes present in the ground truth or the predictions."""
    tp = matrix.diag().double()
    union = matrix.sum(0).double() + matrix.sum(1).double() - tp
    iou = tp / union
    return float(iou[union > 0].mean())


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, C, H, W) softmax probabilities."""
    model.eval()
    out = [model(normalise(images[i : i + batch_size])).softmax(1) for i in range(0, len(images), batch_size)]
    model.train()
    return torch.cat(out)


def class_iou(matrix: torch.Tensor) -> list[float]:
    tp = matrix.diag().double()
    return (tp / (matrix.sum(0).double() + matrix.sum(1).double() - tp)).tolist()


def evaluate(model, split: Split, num_classes: int, *, per_class: bool = False):
    pred = predict(model, split.images).argmax(1)
    matrix = confusion(pred, split.masks, num_classes)
    return (miou(matrix), class_iou(matrix)) if per_class else miou(matrix)


# --------------------------------------------------------------------------------------- training


@dataclass
class Phase:
    name: str
    steps: int = 0
    images: int = 0  # images through the network (forward+backward when training)
    seconds: float = 0.0
    best_miou: float = float("nan")
    last_miou: float = float("nan")
    extra: dict | None = None


def train(model, next_batch, *, steps: int, lr: float, weight_decay: float, val: Split, num_classes: int,
          eval_every: int, phase: Phase, pseudo_weight: float = 1.0, verbose: bool = False):
    """Adam + poly(0.9) LR; val mIoU every ``eval_every`` steps; returns the best-val weights."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=steps, power=0.9)
    best_state, started = None, time.perf_counter()
    phase.best_miou = -1.0
    model.train()
    for step in range(1, steps + 1):
        images, masks, n_labelled = next_batch()
        logits = model(images)  # (B, C, H, W)
        loss = F.cross_entropy(logits[:n_labelled], masks[:n_labelled], ignore_index=IGNORE)
        if n_labelled < len(images):
            target = masks[n_labelled:]
            pseudo = F.cross_entropy(logits[n_labelled:], target, ignore_index=IGNORE, reduction="sum")
            loss = loss + pseudo_weight * pseudo / (target != IGNORE).sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        phase.steps += 1
        phase.images += len(images)
        if step % eval_every == 0 or step == steps:
            score = evaluate(model, val, num_classes)
            phase.last_miou = score
            if verbose:
                print(f"  [{phase.name}] step {step}/{steps}  val mIoU {score:.4f}  "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
            if score > phase.best_miou:
                phase.best_miou = score
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    phase.seconds = time.perf_counter() - started
    model.load_state_dict(best_state)
    phase.extra = {"iou": [round(x, 3) for x in evaluate(model, val, num_classes, per_class=True)[1]]}
    return model


def pseudo_label(model, unlabelled: Split, num_classes: int, threshold: float, phase: Phase) -> Split:
    started = time.perf_counter()
    probs = predict(model, unlabelled.images)
    confidence, labels = probs.max(1)
    labels[confidence < threshold] = IGNORE
    phase.images = len(unlabelled.images)
    phase.seconds = time.perf_counter() - started
    kept = labels != IGNORE
    predicted = probs.argmax(1)
    phase.extra = {
        "kept": float(kept.float().mean()),
        # mIoU of the kept pixels against the ground truth
        "pl_miou": miou(confusion(labels.masked_fill(~kept, 0), unlabelled.masks.masked_fill(~kept, IGNORE), num_classes)),
        "argmax_miou": miou(confusion(predicted, unlabelled.masks, num_classes)),
    }
    phase.best_miou = phase.last_miou = phase.extra["pl_miou"]
    return Split(unlabelled.images, labels)


# ------------------------------------------------------------------------------------------- main


def row(p: Phase) -> str:
    extra = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in (p.extra or {}).items())
    return f"{p.name:<28}{p.steps:>6}{p.images:>8}{p.seconds:>9.1f}{p.best_miou:>11.4f}{p.last_miou:>11.4f}  {extra}"


def dataset_root(args) -> Path:
    if args.root:
        return ensure_synthetic(args.root, seed=args.data_seed)
    if not args.design and args.num_train is None:
        return ensure_synthetic(seed=args.data_seed)
    # A variant design: its own cache folder, keyed by the design and sizes.
    design = SyntheticDesign(**json.loads(args.design or "{}"))
    sizes = {"num_train": args.num_train or 1000, "num_val": args.num_val}
    key = hashlib.sha1(json.dumps([repr(design), sizes], sort_keys=True).encode()).hexdigest()[:10]
    root = default_cache_dir() / f"calibration-{key}-seed{args.data_seed}"
    if not (root / "splits" / "val.txt").exists():
        generate_synthetic(root, seed=args.data_seed, design=design, **sizes)
    return root


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="labelled subset and training seed (and dataset seed unless --data-seed)")
    parser.add_argument("--data-seed", type=int, default=None)
    parser.add_argument("--root", default=None, help="dataset folder (default: the synthetic cache)")
    parser.add_argument("--design", default=None, help="JSON overrides of SyntheticDesign (a calibration variant)")
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--num-val", type=int, default=150)
    parser.add_argument("--labelled", type=int, default=12)
    parser.add_argument("--unlabelled", type=int, default=None, help="use only the first N unlabelled images")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="labelled images per supervised step")
    parser.add_argument("--st-labelled-batch", type=int, default=8, help="labelled images per self-training step")
    parser.add_argument("--st-unlabelled-batch", type=int, default=16, help="pseudo-labelled images per self-training step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--st-lr", type=float, default=None, help="self-training lr (default --lr)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--sup-steps", type=int, default=400)
    parser.add_argument("--st-steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--scale-range", type=float, nargs=2, default=(0.75, 1.5))
    parser.add_argument("--pseudo-weight", type=float, default=1.0)
    parser.add_argument("--variants", default="scratch:0.9,finetune:0.9", help="init:threshold,... with init in {scratch, finetune}")
    parser.add_argument("--oracle", action="store_true", help="also self-train on the unlabelled images' ground truth")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--verbose", action="store_true", help="print val mIoU at every evaluation")
    parser.add_argument("--json", default=None, help="append each finished phase as a JSON line to this file")
    parser.add_argument("--tag", default="", help="a label for this run in the JSON lines")
    args = parser.parse_args(argv)
    args.data_seed = args.seed if args.data_seed is None else args.data_seed
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    root = dataset_root(args)
    generated = time.perf_counter() - started
    classes = (root / "classes.txt").read_text().split()
    num_classes = len(classes)
    train_ids, train_split = read_folder(root, "train")
    _, val = read_folder(root, "val")
    order = np.random.default_rng(args.seed).permutation(len(train_ids))  # = selftune's split_labelled
    labelled_index = torch.from_numpy(order[: args.labelled])
    unlabelled_index = torch.from_numpy(np.sort(order[args.labelled :]))[: args.unlabelled]
    labelled, unlabelled = subset(train_split, labelled_index), subset(train_split, unlabelled_index)
    print(f"dataset {root} ({generated:.1f} s to open/generate): {num_classes} classes, {len(labelled.images)} labelled, "
          f"{len(unlabelled.images)} unlabelled, {len(val.images)} val", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    scale_range = tuple(args.scale_range)
    common = dict(weight_decay=args.weight_decay, val=val, num_classes=num_classes, eval_every=args.eval_every,
                  verbose=args.verbose)

    def supervised_batches(source: Batches):
        def next_batch():
            images, masks = weak_augment(next(source), scale_range, gen)
            return images, masks, len(images)
        return next_batch

    def paired_batches(first: Batches, second: Batches):
        def next_batch():
            a, b = next(first), next(second)
            images, masks = weak_augment(Split(torch.cat([a.images, b.images]), torch.cat([a.masks, b.masks])), scale_range, gen)
            return images, masks, len(a.images)
        return next_batch

    phases: list[Phase] = []

    def done(phase: Phase) -> None:
        phases.append(phase)
        if args.json:  # one line per phase, so a run cut short still leaves its finished phases
            with open(args.json, "a") as f:
                f.write(json.dumps({"tag": args.tag, "seed": args.seed, **vars(phase)}) + "\n")
        if args.verbose:
            print(row(phase), flush=True)
    torch.manual_seed(args.seed)
    sup = Phase("supervised")
    model = train(small_segnet(num_classes, args.width), supervised_batches(Batches(labelled, args.batch_size, gen)),
                  steps=args.sup_steps, lr=args.lr, phase=sup, **common)
    done(sup)
    sup_state = {k: v.clone() for k, v in model.state_dict().items()}

    labels_by_threshold: dict[float, Split] = {}
    variants = [(init, float(t)) for init, t in (v.split(":") for v in args.variants.split(",") if v)]
    runs = [(f"{init}:{t}", init, t) for init, t in variants] + ([("oracle:scratch", "scratch", None)] if args.oracle else [])
    for name, init, threshold in runs:
        if threshold is None:
            targets = unlabelled
        else:
            if threshold not in labels_by_threshold:
                pl = Phase(f"pseudo_label:{threshold}")
                labels_by_threshold[threshold] = pseudo_label(model, unlabelled, num_classes, threshold, pl)
                done(pl)
            targets = labels_by_threshold[threshold]
        torch.manual_seed(args.seed + 1)
        student = small_segnet(num_classes, args.width)
        if init == "finetune":
            student.load_state_dict(sup_state)
        elif init != "scratch":
            raise SystemExit(f"variant init must be scratch or finetune, got {init!r}")
        st = Phase(f"self_train:{name}")
        batches = paired_batches(Batches(labelled, args.st_labelled_batch, gen), Batches(targets, args.st_unlabelled_batch, gen))
        train(student, batches, steps=args.st_steps, lr=args.st_lr or args.lr, phase=st, pseudo_weight=args.pseudo_weight, **common)
        done(st)

    print_summary(phases, sup)
    return {"args": vars(args), "phases": [vars(p) for p in phases]}


def print_summary(phases: list[Phase], sup: Phase) -> None:
    print(f"{'phase':<28}{'steps':>6}{'images':>8}{'seconds':>9}{'best mIoU':>11}{'last mIoU':>11}  extra")
    for p in phases:
        print(row(p))
    for p in phases[1:]:
        if p.name.startswith("self_train"):
            print(f"gain {p.name}: {100 * (p.best_miou - sup.best_miou):+.1f} points (best val mIoU)")


if __name__ == "__main__":
    main()
