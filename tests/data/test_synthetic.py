"""The synthetic dataset generator: folder format, determinism, and the cache's atomic first use.

Every dataset here is tiny (a few 16-32 px images); ``ensure_synthetic`` is pointed at a tiny
generator so that a test never writes a full-size dataset.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selftune.data import synthetic
from selftune.data.synthetic import CLASSES, FORMAT_VERSION, ensure_synthetic, generate_synthetic, is_dataset
from selftune.errors import DataError

TINY = dict(num_train=5, num_val=3, image_size=32)


def read(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ids = (root / "splits" / "train.txt").read_text().split() + (root / "splits" / "val.txt").read_text().split()
    return {i: (np.array(Image.open(root / "images" / f"{i}.png")), np.array(Image.open(root / "masks" / f"{i}.png")))
            for i in ids}


@pytest.fixture
def tiny_generator(monkeypatch) -> list[Path]:
    """``ensure_synthetic`` generates tiny datasets; returns the list of folders it generated into."""
    calls: list[Path] = []
    real = synthetic.generate_synthetic

    def generate(out_dir, **kwargs):
        calls.append(Path(out_dir))
        return real(out_dir, **{**kwargs, **TINY})

    monkeypatch.setattr(synthetic, "generate_synthetic", generate)
    return calls


def test_writes_the_folder_format(tmp_path):
    root = generate_synthetic(tmp_path / "d", seed=0, **TINY)
    assert (root / "splits" / "train.txt").read_text().split() == [f"train_{i:05d}" for i in range(5)]
    assert len((root / "splits" / "val.txt").read_text().split()) == 3
    classes = (root / "classes.txt").read_text().split()
    assert classes == list(CLASSES[: synthetic.SyntheticDesign().num_object_classes + 1])
    assert classes[0] == "background"
    assert is_dataset(root)
    values = set()
    for sample_id, (image, mask) in read(root).items():
        assert Image.open(root / "images" / f"{sample_id}.png").mode == "RGB"
        assert Image.open(root / "masks" / f"{sample_id}.png").mode == "L"
        assert image.shape == (32, 32, 3) and mask.shape == (32, 32) and mask.dtype == np.uint8
        values |= set(np.unique(mask).tolist())
    assert values <= set(range(len(classes))) | {255}
    assert {0, 255} <= values and len(values - {0, 255}) >= 2  # background, border band, some objects


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path):
    first = read(generate_synthetic(tmp_path / "a", seed=3, **TINY))
    again = read(generate_synthetic(tmp_path / "b", seed=3, **TINY))
    other = read(generate_synthetic(tmp_path / "c", seed=4, **TINY))
    assert first.keys() == again.keys() == other.keys()
    for key in first:
        np.testing.assert_array_equal(first[key][0], again[key][0])
        np.testing.assert_array_equal(first[key][1], again[key][1])
    assert not any(np.array_equal(first[k][0], other[k][0]) for k in first)
    # Train and val images differ from each other too.
    assert not np.array_equal(first["train_00000"][0], first["val_00000"][0])


def test_a_smaller_dataset_is_a_prefix_of_a_larger_one(tmp_path):
    small = read(generate_synthetic(tmp_path / "s", seed=1, num_train=2, num_val=1, image_size=32))
    large = read(generate_synthetic(tmp_path / "l", seed=1, num_train=5, num_val=3, image_size=32))
    for key, (image, mask) in small.items():
        np.testing.assert_array_equal(image, large[key][0])
        np.testing.assert_array_equal(mask, large[key][1])


def test_ensure_uses_the_cache_folder_and_reuses_it(tmp_path, monkeypatch, tiny_generator):
    monkeypatch.setenv("SELFTUNE_CACHE", str(tmp_path / "cache"))
    root = ensure_synthetic(seed=7)
    assert root == tmp_path / "cache" / f"synthetic-v{FORMAT_VERSION}-seed7"
    assert is_dataset(root) and len(tiny_generator) == 1
    before = read(root)
    assert ensure_synthetic(seed=7) == root
    assert len(tiny_generator) == 1  # reused, not regenerated
    assert read(root).keys() == before.keys()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [root.name]  # no temporary folder left


def test_ensure_uses_a_given_root_that_holds_a_dataset(tmp_path, tiny_generator):
    existing = generate_synthetic(tmp_path / "mine", seed=0, **TINY)
    assert ensure_synthetic(existing, seed=5) == existing
    assert tiny_generator == []
    assert ensure_synthetic(tmp_path / "new", seed=5) == tmp_path / "new"
    assert len(tiny_generator) == 1 and tiny_generator[0] != tmp_path / "new"  # generated aside, then renamed


def test_ensure_refuses_a_folder_with_something_else(tmp_path, tiny_generator):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a complete dataset"):
        ensure_synthetic(tmp_path / "junk")


def test_ensure_uses_the_winner_when_the_target_appears_meanwhile(tmp_path, monkeypatch):
    """Another process finishes first: our rename fails, we use its dataset and drop ours."""
    target = tmp_path / "cache" / "ds"
    real = synthetic.generate_synthetic

    def generate_while_another_process_wins(out_dir, **kwargs):
        real(target, seed=99, **TINY)  # the other process's complete dataset appears
        return real(out_dir, **{**kwargs, **TINY})

    monkeypatch.setattr(synthetic, "generate_synthetic", generate_while_another_process_wins)
    assert ensure_synthetic(target, seed=0) == target
    winner = read(target)
    np.testing.assert_array_equal(winner["train_00000"][0], read(real(tmp_path / "ref", seed=99, **TINY))["train_00000"][0])
    assert sorted(p.name for p in target.parent.iterdir()) == ["ds"]  # our temporary copy is gone


def test_ensure_is_safe_under_concurrent_callers(tmp_path, monkeypatch, tiny_generator):
    monkeypatch.setenv("SELFTUNE_CACHE", str(tmp_path / "cache"))
    barrier = threading.Barrier(4)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker():
        try:
            barrier.wait()
            results.append(ensure_synthetic(seed=1))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(results)) == 1 and is_dataset(results[0])
    assert len(read(results[0])) == TINY["num_train"] + TINY["num_val"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [results[0].name]


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size must be >= 8"):
        generate_synthetic(tmp_path / "x", image_size=4)
    with pytest.raises(ValueError, match=r"num_object_classes must be in \[1, 7\], but got 9"):
        generate_synthetic(tmp_path / "x", design=synthetic.SyntheticDesign(num_object_classes=9))
    with pytest.raises(ValueError, match=r"hue_spread must be in \[0, 180\] degrees, but got 200"):
        generate_synthetic(tmp_path / "x", design=synthetic.SyntheticDesign(hue_spread=200))


def test_fewer_object_classes(tmp_path):
    root = generate_synthetic(tmp_path / "d", seed=0, design=synthetic.SyntheticDesign(num_object_classes=3),
                              **TINY)
    assert (root / "classes.txt").read_text().split() == list(CLASSES[:4])
    values = set().union(*(np.unique(m).tolist() for _, m in read(root).values()))
    assert values <= {0, 1, 2, 3, 255}
