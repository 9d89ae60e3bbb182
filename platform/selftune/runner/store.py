"""``selftune store``: what the stage store holds, and pruning it by age or to a size budget.

An entry is never deleted while a run holds it (its ``.use`` lock: a running ``selftune run``, a
trial of a running search, a final run, or a computation in progress) or while something needs
it (its ``pins``): a registered model's lineage (``selftune final`` pins the stages its model came
from) or a search's best trial (pinned when the search ends; the pin lapses once that search's
folder is deleted). Incomplete entries (a failed computation's leftovers) go first, then the
least recently used.
"""

from __future__ import annotations

import fcntl
import re
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from selftune.errors import ConfigError
from selftune.runner.cache import KEY_LENGTH, CacheEntry, folder_size, open_locked

ENTRY_NAME = re.compile(rf"^(?P<stage>.+)-(?P<key>[0-9a-f]{{{KEY_LENGTH}}})$")
SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class StoredStage:
    entry: CacheEntry
    stage: str
    key: str
    record: dict[str, Any]
    complete: bool
    size: int

    @property
    def last_used(self) -> float:
        return float(self.record.get("last_used") or self.entry.folder.stat().st_mtime)

    @property
    def pins(self) -> list[dict[str, Any]]:
        """What needs the entry kept: a model's lineage, or a best trial of a search that is still there."""
        return [pin for pin in self.record.get("pins", []) if not pin.get("search") or (Path(pin["search"]) / "search.json").is_file()]

    @property
    def users(self) -> list[dict[str, Any]]:
        return self.record.get("users", [])


@dataclass
class PruneReport:
    deleted: list[StoredStage] = field(default_factory=list)
    held: list[StoredStage] = field(default_factory=list)  # would have gone, but a run holds it
    size_after: int = 0


def parse_size(text: str, option: str = "--max-size") -> int:
    """``50G``, ``500M``, ``1.5T``, ``2048`` (bytes); K/M/G/T are powers of 1024."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(f"{option} {text}: not a size; use a number with K, M, G or T, e.g. 50G or 500M")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def parse_age(text: str, option: str = "--older-than") -> float:
    """``30d``, ``12h``, ``90m``, ``2w``, ``3600s``: seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(f"{option} {text}: not an age; use a number with s, m, h, d or w, e.g. 30d or 12h")
    return float(match.group(1)) * AGE_UNITS[match.group(2).lower()]


def stored_stages(root: str | Path) -> list[StoredStage]:
    """Every entry in the store (complete or not), oldest use first."""
    root = Path(root)
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        match = ENTRY_NAME.match(folder.name)
        if not match or not folder.is_dir():
            continue
        entry = CacheEntry(folder)
        record = entry.read_record()
        size = record.get("size") if entry.complete and "size" in record else folder_size(folder)
        found.append(StoredStage(entry, match["stage"], match["key"], record, entry.complete, int(size)))
    return sorted(found, key=lambda stored: stored.last_used)


@contextmanager
def exclusively(entry: CacheEntry) -> Iterator[bool]:
    """Both of the entry's locks, without waiting: False when a run holds or computes it."""
    with ExitStack() as stack:
        try:
            for path in (entry.lock_path, entry.use_path):
                stack.enter_context(open_locked(path, fcntl.LOCK_EX | fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def is_held(entry: CacheEntry) -> bool:
    with exclusively(entry) as free:
        return not free


def delete(entry: CacheEntry) -> None:
    """Under both locks (see ``exclusively``): the folder, its record, then the lock files, so a
    claimant waiting on them retries on new ones (``open_locked``)."""
    shutil.rmtree(entry.folder, ignore_errors=True)
    for path in (entry.record_path, entry.use_path, entry.lock_path):
        path.unlink(missing_ok=True)


def prune(root: str | Path, *, older_than_s: float | None = None, max_size: int | None = None,
          now: float | None = None, dry_run: bool = False, among: Callable[[StoredStage], bool] | None = None,
          keep: set[str] = frozenset()) -> PruneReport:
    """Delete incomplete entries, those unused for ``older_than_s``, then the least recently used
    until the entries hold at most ``max_size`` bytes; never a pinned or held entry, nor one whose
    key is in ``keep``. ``among``: only the entries it accepts count and may go (a search's own)."""
    now = time.time() if now is None else now
    stages = [s for s in stored_stages(root) if among is None or among(s)]
    total = sum(stored.size for stored in stages)
    report = PruneReport()
    removable = sorted((s for s in stages if not s.pins and s.key not in keep), key=lambda s: (s.complete, s.last_used))
    for stored in removable:
        stale = not stored.complete or (older_than_s is not None and now - stored.last_used > older_than_s)
        if not stale and not (max_size is not None and total > max_size):
            continue
        with exclusively(stored.entry) as free:
            if not free:
                report.held.append(stored)
                continue
            if not dry_run:
                delete(stored.entry)
        report.deleted.append(stored)
        total -= stored.size
    report.size_after = total
    return report


def human_size(size: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if size < 1024:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}T"


def human_age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f}{unit} ago"
    return "just now"


def describe_user(user: dict[str, Any]) -> str:
    who = user.get("owner") or (f"run {user['run']}" if user.get("run") else "untracked run")
    return f"{who} trial {user['trial_id']}" if user.get("trial_id") else who


def describe_pin(pin: dict[str, Any]) -> str:
    if pin.get("model"):
        return f"model {pin['model']} v{pin.get('version') or '?'}"
    return f"best trial {pin.get('trial', '?')} of {pin['search']}"


def store_rows(stages: list[StoredStage], now: float | None = None) -> list[list[str]]:
    """stage, key, size, last use, users (count: latest), needed by (pins, or held by a run)."""
    now = time.time() if now is None else now
    rows = []
    for stored in stages:
        needed = [describe_pin(pin) for pin in stored.pins] + (["in use by a run"] if is_held(stored.entry) else [])
        users = stored.users
        rows.append([stored.stage, stored.key, human_size(stored.size) + ("" if stored.complete else " (incomplete)"),
                     human_age(now - stored.last_used), f"{len(users)}: {describe_user(users[-1])}" if users else "0",
                     "; ".join(needed) or "-"])
    return rows


__all__ = ["PruneReport", "StoredStage", "is_held", "parse_age", "parse_size", "prune", "store_rows", "stored_stages"]
