"""The shared labelling pass: one-pass reads past the decode cache, PNGs written off the loop
exactly as a serial write makes them, quality counts equal to the per-batch update, write failures
as one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from selftune.config import load_pipeline
from selftune.data import io, prefetched
from selftune.engine.context import WorkerContext
from selftune.errors import DataError
from selftune.metrics import PseudoLabelQuality
from selftune.metrics.pseudo_labels import value_pair_counts
from selftune.stages.data import evaluation_loader, prepare_data
from selftune.stages.job import StageJob
from selftune.stages.labelling import label_samples, threshold_labels
from support import REPO

CTX = WorkerContext.local("cpu")


class Striped(nn.Module):
    """No weights: class logits from the image's channels, so labels vary per pixel and image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, -x.sum(dim=1, keepdim=True)], dim=1) * 4  # (B, 4, H, W)


def labeller(model: nn.Module, batch: dict) -> torch.Tensor:
    return threshold_labels(torch.softmax(model(batch["image"]), dim=1), 0.6)


@pytest.fixture
def job(tmp_path, small_synthetic) -> StageJob:
    pipeline = load_pipeline(REPO / "pipelines" / "quickstart.yaml", [
        f"data.root={small_synthetic}", "data.dataset=folder", "data.labelled=20", "data.eval_batch_size=8",
    ])
    return StageJob(pipeline=pipeline, stage_index=1, output_dir=str(tmp_path / "stage"))


def test_labelling_reads_past_the_decode_cache_and_validation_still_fills_it(job, monkeypatch):
    monkeypatch.setattr(io, "_decoded", {})
    monkeypatch.setattr(io, "_decoded_bytes", 0)
    data = prepare_data(job.pipeline.data, job.seed)
    label_samples(Striped(), data.unlabelled, data, job, CTX, Path(job.output_dir), labeller)
    assert len(list(Path(job.output_dir).glob("*.png"))) == len(data.unlabelled) == 40
    assert io.decode_cache_bytes() == 0 and not io._decoded
    list(evaluation_loader(data, data.reported, job.pipeline.data, CTX))  # read every epoch: cached
    assert io.decode_cache_bytes() > 0


def test_pngs_and_quality_equal_a_serial_pass(job, tmp_path):
    data = prepare_data(job.pipeline.data, job.seed)
    out = tmp_path / "threaded"
    quality = label_samples(Striped(), data.unlabelled, data, job, CTX, out, labeller)
    serial_dir = tmp_path / "serial"
    serial_dir.mkdir()
    serial = PseudoLabelQuality(data.num_classes)
    with torch.no_grad():
        for batch in evaluation_loader(data, data.unlabelled, job.pipeline.data, CTX):
            labels = labeller(Striped(), batch)
            serial.update(labels, batch["mask"])
            for sample_id, sample_labels, (h, w) in zip(batch["id"], labels.numpy(), batch["size"].tolist()):
                Image.fromarray(sample_labels[:h, :w].astype(np.uint8), mode="L").save(serial_dir / f"{sample_id}.png")
    names = sorted(p.name for p in serial_dir.glob("*.png"))
    assert names == sorted(p.name for p in out.glob("*.png")) and len(names) == 40
    for name in names:
        assert (out / name).read_bytes() == (serial_dir / name).read_bytes(), name
    assert torch.equal(quality.kept.matrix, serial.kept.matrix)
    assert torch.equal(quality.ground_truth_counts, serial.ground_truth_counts)
    assert 0 < quality.compute()["kept_fraction"] < 1  # some pixels kept, some not: the threshold mattered


def test_a_failed_write_fails_the_stage_with_one_line_naming_the_file(job, tmp_path, monkeypatch):
    data = prepare_data(job.pipeline.data, job.seed)
    real_save = Image.Image.save
    failing = tmp_path / "out" / f"{data.unlabelled[12].id}.png"

    def save(self, path, *args, **kwargs):
        if Path(path) == failing:
            raise OSError(28, "No space left on device")
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(DataError) as caught:
        label_samples(Striped(), data.unlabelled, data, job, CTX, tmp_path / "out", labeller)
    message = str(caught.value)
    assert "\n" not in message
    assert message == f"cannot write pseudo label {failing}: No space left on device"


def test_pair_counts_reject_values_that_are_not_classes():
    quality = PseudoLabelQuality(3)
    truth = np.array([[0, 1, 255, 2]], dtype=np.uint8)
    quality.add_pair_counts(value_pair_counts(np.array([[0, 2, 7, 255]], dtype=np.uint8), truth))  # 7: gt ignored
    assert quality.kept.matrix.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0]]
    assert quality.ground_truth_counts.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="prediction holds class 5"):
        quality.add_pair_counts(value_pair_counts(np.array([[5]], dtype=np.uint8), np.array([[1]], dtype=np.uint8)))
    with pytest.raises(ValueError, match="ground truth holds class 4"):
        quality.add_pair_counts(value_pair_counts(np.array([[1]], dtype=np.uint8), np.array([[4]], dtype=np.uint8)))


def test_prefetched_keeps_order_and_raises_the_producers_error():
    assert list(prefetched(iter(range(5)))) == [0, 1, 2, 3, 4]

    def failing():
        yield 1
        raise DataError("cannot read image x.png: truncated")

    with pytest.raises(DataError, match="truncated"):
        list(prefetched(failing()))
