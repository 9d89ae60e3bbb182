"""A search's disk budget (``budget.disk: 20G``): the stage outputs the search computed stay under
it as trials end, the losers' going first.

After every stage report and every trial's end, the driver sums the store entries this search
computed (``created_by`` in each entry's record) and, while they exceed the budget, deletes the
least recently used of them that no one needs: never an entry a running trial holds (its ``.use``
lock), a pinned one, or one of the best finished trial's stages. Metrics, summaries and the trial
table live in MLflow and the search folder, so nothing a user reads is lost; a later trial that
needs a deleted stage computes it again. The search can exceed the budget only by what its
running trials hold (the stages they are computing or read) and by the best trial's stages.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

from selftune.runner.store import PruneReport, human_size, prune
from selftune.search.trial import OBJECTIVE, STAGE

Keys = Callable[[dict[str, Any]], set[str]]  # a trial's config -> the store keys of its stages


def search_owner(folder: str | Path) -> str:
    """How a search's trials name themselves in the store's records."""
    return f"search {Path(folder).resolve()}"


def enforce(root: str | Path, owner: str, max_bytes: int, keep: set[str]) -> PruneReport:
    """Delete ``owner``'s entries, least recently used first, until they take at most ``max_bytes``;
    never a held or pinned entry or one whose key is in ``keep`` (``selftune store prune``'s rules)."""
    return prune(root, max_size=max_bytes, among=lambda stored: stored.record.get("created_by") == owner, keep=keep)


class DiskBudget(Callback):
    """Tune callback (driver side): ``enforce`` after every report, protecting the best finished trial."""

    def __init__(self, root: str | Path, owner: str, max_bytes: int, mode: str, keys: Keys, say: Callable[[str], None]):
        self.root, self.owner, self.max_bytes, self.mode, self.keys, self.say = root, owner, max_bytes, mode, keys, say
        self.best: float | None = None
        self.keep: set[str] = set()  # the stages of every finished trial at the best value (the table may pick any)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.enforce_now()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        value = result.get(OBJECTIVE)
        if result.get(STAGE) == result.get("stages_total") and value is not None and math.isfinite(value):
            if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
                self.best, self.keep = value, set()
            if value == self.best:  # keys computed once per best trial, not at every report
                self.keep |= self.keys(dict(trial.config))
        self.enforce_now()

    def enforce_now(self) -> None:
        """Prune to the budget (also called by the driver once Tune has ended every trial's process)."""
        report = enforce(self.root, self.owner, self.max_bytes, self.keep)
        if report.deleted:
            over = "; the rest is the best trial's or running trials'" if report.size_after > self.max_bytes else ""
            self.say(f"  disk budget: deleted {len(report.deleted)} stage output(s) of ended trials; the search's "
                     f"stages now take {human_size(report.size_after)} of {human_size(self.max_bytes)}{over}")
