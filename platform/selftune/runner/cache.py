"""The stage cache: a stage whose effective inputs equal an already computed stage is not run again.

A stage's *key* hashes everything its outputs depend on: its own resolved config, its position
(it seeds the initial weights), the pipeline's seed, data, model and the parts of the resources
that change numerics, and the keys of the upstream stages whose artifacts it reads. Two trials
that sample the same supervised config therefore share one supervised stage, and everything
downstream of a difference gets a new key.

Entries live in ``<root>/<stage name>-<key>/`` (the stage's output folder, ``summary.json``
written last marks it complete). A per-entry file lock makes concurrent trials that need the same
stage wait for one computation instead of duplicating it; the lock works across processes on one
machine and on shared filesystems that support ``flock`` (NFS v4 does).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from selftune.config import PipelineConfig
from selftune.stages import SUMMARY

KEY_LENGTH = 16


def stage_key(pipeline: PipelineConfig, index: int, upstream_keys: dict[str, str]) -> str:
    """The cache key of stage ``index`` given the keys of the stages it reads (role -> key)."""
    stage = pipeline.stages[index]
    resources = pipeline.resources
    identity = {
        "stage": stage.model_dump(mode="json"),
        "index": index,
        "seed": pipeline.seed,
        "data": pipeline.data.model_dump(mode="json"),
        "model": pipeline.model.model_dump(mode="json"),
        # Worker count changes batch composition; precision changes numerics. CPUs per worker do not.
        "numerics": {"workers": resources.workers, "use_gpu": resources.use_gpu, "precision": resources.precision},
        "upstream": dict(sorted(upstream_keys.items())),
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def stage_keys(pipeline: PipelineConfig) -> list[str]:
    """Every stage's key, in order, as the runner computes them (each on its upstream's keys)."""
    keys: dict[str, str] = {}
    for index, stage in enumerate(pipeline.stages):
        keys[stage.name] = stage_key(pipeline, index, {role: keys[name] for role, name in stage.upstream().items()})
    return list(keys.values())


@dataclass(frozen=True)
class CacheEntry:
    folder: Path

    @property
    def complete(self) -> bool:
        return (self.folder / SUMMARY).is_file()


class RunFolders:
    """A pipeline run's own stage folders ``<out>/<index>-<name>/``: nothing is reused."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @contextmanager
    def claim(self, index: int, stage_name: str, key: str) -> Iterator[tuple[Path, bool]]:
        folder = self.root / f"{index}-{stage_name}"
        folder.mkdir(parents=True)
        yield folder, False


class StageCache:
    """Stage folders keyed by ``stage_key``: a stage computed once is reused wherever its key recurs."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def entry(self, stage_name: str, key: str) -> CacheEntry:
        return CacheEntry(self.root / f"{stage_name}-{key}")

    @contextmanager
    def claim(self, index: int, stage_name: str, key: str) -> Iterator[tuple[Path, bool]]:
        """Hold the entry's lock; yields ``(folder, hit)``. On a miss the folder is empty and the
        caller computes into it while other claimants wait; a failed computation leaves no
        ``summary.json``, so the next claimant starts afresh."""
        entry = self.entry(stage_name, key)
        lock_path = entry.folder.with_name(entry.folder.name + ".lock")
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another trial computes this stage
            try:
                if entry.complete:
                    yield entry.folder, True
                    return
                if entry.folder.exists():
                    shutil.rmtree(entry.folder)  # leftovers of a failed or interrupted computation
                entry.folder.mkdir(parents=True)
                yield entry.folder, False
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
