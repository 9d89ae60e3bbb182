"""The stage store: a stage whose effective inputs equal an already computed stage is not run again.

A stage's *key* hashes everything its outputs depend on: its own resolved config, its position
(it seeds the initial weights), the pipeline's seed, data, model and the parts of the resources
that change numerics, the keys of the upstream stages whose artifacts it reads, and the code and
data fingerprints (``runner.fingerprints``: selftune's version and the source its kind runs; the
dataset's files' names, sizes and mtimes and the resolved split). Two trials, searches or runs
that need the same supervised stage therefore share one, and everything downstream of a
difference (a config value, a changed line of a method, a touched mask) gets a new key.

One store serves ``selftune run``, every search and ``selftune final``: ``--store``, else
``$SELFTUNE_STAGE_STORE``, else ``$SELFTUNE_STORAGE/stages``, else ``runs/stages``. Entries live
in ``<root>/<stage name>-<key>/`` (the stage's output folder, ``summary.json`` written last marks
it complete), beside three small files:

* ``<entry>.lock``: the per-entry lock. Claimants of the same stage wait for one computation
  instead of duplicating it; ``flock`` works across processes on one machine and on shared
  filesystems that support it (NFS v4 does).
* ``<entry>.use``: held shared by every run that has claimed the entry, until its stages are done
  (or its process ends); ``selftune store prune`` deletes no entry whose ``.use`` it cannot lock.
* ``<entry>.json``: who used it and when (``users``), its size, and ``pins``: what needs it kept
  (a registered model's lineage, a search's best trial).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from selftune.config import PipelineConfig
from selftune.runner.fingerprints import Fingerprints, pipeline_fingerprints
from selftune.stages import SUMMARY

KEY_LENGTH = 16
STORE_ENV = "SELFTUNE_STAGE_STORE"
STORAGE_ENV = "SELFTUNE_STORAGE"


def default_store_root(explicit: str | Path | None = None) -> Path:
    """The stage store's folder: ``explicit`` (``--store``), else ``$SELFTUNE_STAGE_STORE``, else
    ``$SELFTUNE_STORAGE/stages`` (the compose stack's shared volume), else ``runs/stages``."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV]).expanduser().resolve()
    storage = os.environ.get(STORAGE_ENV)
    return (Path(storage).expanduser() / "stages" if storage else Path("runs") / "stages").resolve()


def stage_key(pipeline: PipelineConfig, index: int, upstream_keys: dict[str, str],
              fingerprints: Fingerprints | None = None) -> str:
    """The cache key of stage ``index`` given the keys of the stages it reads (role -> key).
    ``fingerprints``: the pipeline's, computed once per run (computed here when not given)."""
    stage = pipeline.stages[index]
    resources = pipeline.resources
    fingerprints = fingerprints or pipeline_fingerprints(pipeline)
    identity = {
        "stage": stage.model_dump(mode="json"),
        "index": index,
        "seed": pipeline.seed,
        "data": pipeline.data.model_dump(mode="json"),
        "model": pipeline.model.model_dump(mode="json"),
        # Worker count changes batch composition; precision changes numerics. CPUs per worker do not.
        "numerics": {"workers": resources.workers, "use_gpu": resources.use_gpu, "precision": resources.precision},
        "upstream": dict(sorted(upstream_keys.items())),
        "code": fingerprints.code[stage.kind],
        "files": fingerprints.data,
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def stage_keys(pipeline: PipelineConfig, fingerprints: Fingerprints | None = None) -> list[str]:
    """Every stage's key, in order, as the runner computes them (each on its upstream's keys)."""
    fingerprints = fingerprints or pipeline_fingerprints(pipeline)
    keys: dict[str, str] = {}
    for index, stage in enumerate(pipeline.stages):
        upstream = {role: keys[name] for role, name in stage.upstream().items()}
        keys[stage.name] = stage_key(pipeline, index, upstream, fingerprints)
    return list(keys.values())


@dataclass(frozen=True)
class CacheEntry:
    folder: Path

    @property
    def complete(self) -> bool:
        return (self.folder / SUMMARY).is_file()

    @property
    def lock_path(self) -> Path:
        return self.folder.with_name(self.folder.name + ".lock")

    @property
    def use_path(self) -> Path:
        return self.folder.with_name(self.folder.name + ".use")

    @property
    def record_path(self) -> Path:
        return self.folder.with_name(self.folder.name + ".json")

    def read_record(self) -> dict[str, Any]:
        try:
            return json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return {}

    def write_record(self, record: dict[str, Any]) -> None:
        """Atomically (a reader never sees half a file); callers hold the entry's lock."""
        temporary = self.record_path.with_name(f"{self.record_path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(record, indent=1, sort_keys=True))
        temporary.replace(self.record_path)


def open_locked(path: Path, operation: int) -> IO[str]:
    """``path`` opened and ``flock``-ed; retried when the file was replaced while waiting (a
    prune unlinks the lock files of an entry it deletes, so a waiter may lock an orphan)."""
    while True:
        handle = open(path, "a")
        try:
            fcntl.flock(handle, operation)
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        except OSError as error:
            handle.close()
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BlockingIOError(error.errno, f"{path} is locked") from None
            raise
        handle.close()


def now() -> float:
    return time.time()


class RunFolders:
    """A pipeline run's own stage folders ``<out>/<index>-<name>/``: nothing is reused."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @contextmanager
    def claim(self, index: int, stage_name: str, key: str, *, user: dict[str, Any] | None = None) -> Iterator[tuple[Path, bool]]:
        folder = self.root / f"{index}-{stage_name}"
        folder.mkdir(parents=True)
        yield folder, False

    def release(self) -> None:
        pass


class StageCache:
    """Stage folders keyed by ``stage_key``: a stage computed once is reused wherever its key recurs.

    ``owner`` names who claims through this object (``run <folder>``, ``search <folder>``) in the
    entries' ``users``; the entries it claims stay held (``.use``) until ``release()``."""

    def __init__(self, root: str | Path, owner: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.owner = owner
        self._held: dict[Path, IO[str]] = {}

    def entry(self, stage_name: str, key: str) -> CacheEntry:
        return CacheEntry(self.root / f"{stage_name}-{key}")

    @contextmanager
    def claim(self, index: int, stage_name: str, key: str, *, user: dict[str, Any] | None = None) -> Iterator[tuple[Path, bool]]:
        """Hold the entry's lock; yields ``(folder, hit)``. On a miss the folder is empty and the
        caller computes into it while other claimants wait; a failed computation leaves no
        ``summary.json``, so the next claimant starts afresh."""
        entry = self.entry(stage_name, key)
        lock = open_locked(entry.lock_path, fcntl.LOCK_EX)  # blocks while another claimant computes this stage
        try:
            self._hold(entry)  # never blocks: a prune holds the entry's lock while it holds .use
            hit = entry.complete
            if not hit:
                if entry.folder.exists():
                    shutil.rmtree(entry.folder)  # leftovers of a failed or interrupted computation
                entry.folder.mkdir(parents=True)
            self._record_use(entry, stage_name, key, user, computed=not hit)
            yield entry.folder, hit
            if not hit and entry.complete:
                self._record_size(entry)
        finally:
            lock.close()  # closing releases the flock

    def _hold(self, entry: CacheEntry) -> None:
        if entry.folder not in self._held:
            self._held[entry.folder] = open_locked(entry.use_path, fcntl.LOCK_SH)

    def release(self) -> None:
        """Let go of the entries this run claimed (a prune may delete them from now on)."""
        for handle in self._held.values():
            handle.close()
        self._held.clear()

    def _record_use(self, entry: CacheEntry, stage_name: str, key: str, user: dict[str, Any] | None, *, computed: bool) -> None:
        record = entry.read_record() or {"stage": stage_name, "key": key, "users": [], "pins": []}
        if computed:  # a new computation (or a failed one's retry): its own creation time, size and maker
            record["created"] = now()
            record.pop("size", None)
            record["created_by"] = self.owner  # a search's disk budget counts what it computed
        use = {**(user or {}), **({"owner": self.owner} if self.owner else {}), "at": now()}
        users = [u for u in record.get("users", []) if {**u, "at": 0} != {**use, "at": 0}]  # one line per user
        record.update(last_used=use["at"], users=[*users, use][-MAX_USERS:])
        entry.write_record(record)

    def _record_size(self, entry: CacheEntry) -> None:
        record = entry.read_record()
        record["size"] = folder_size(entry.folder)
        entry.write_record(record)

    def pin(self, stage_name: str, key: str, pin: dict[str, Any]) -> None:
        """Mark the entry as needed (``pin``: why, and by what) so that no prune deletes it."""
        entry = self.entry(stage_name, key)
        if not entry.complete:
            return
        with open_locked(entry.lock_path, fcntl.LOCK_EX):
            record = entry.read_record() or {"stage": stage_name, "key": key, "users": []}
            pins = [p for p in record.get("pins", []) if p != pin]
            record["pins"] = [*pins, {**pin}]
            entry.write_record(record)


MAX_USERS = 50  # an entry keeps the latest users only


def folder_size(folder: Path) -> int:
    """Bytes under ``folder`` (files not followed through links)."""
    total = 0
    for base, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return total


class LinkedRunFolders:
    """A ``selftune run``'s stages in the store, each linked from the run's own folder
    (``<out>/<index>-<name>`` -> the store entry), so the run's tree stays complete."""

    def __init__(self, root: str | Path, cache: StageCache):
        self.root, self.cache = Path(root), cache

    @contextmanager
    def claim(self, index: int, stage_name: str, key: str, *, user: dict[str, Any] | None = None) -> Iterator[tuple[Path, bool]]:
        with self.cache.claim(index, stage_name, key, user=user) as (entry, hit):
            link = self.root / f"{index}-{stage_name}"
            link.symlink_to(entry, target_is_directory=True)
            yield link, hit

    def release(self) -> None:
        self.cache.release()
