"""A search's best trial keeps its stages: when the search ends, each of them is pinned in the
stage store (``selftune store prune`` deletes no pinned entry), so ``selftune final --from`` the
search reuses them. The pin names the search folder and lapses when that folder is deleted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from selftune.config import PipelineConfig
from selftune.runner import StageCache, stage_keys
from selftune.search import pbt
from selftune.search.space import SearchSpace

PBT_RECORDS = "pbt"  # as in selftune.search.driver


def best_trial_pipeline(space: SearchSpace, folder: Path, trial_id: str, params: dict[str, str]) -> PipelineConfig | None:
    """The pipeline the trial ran: its sampled values, or under PBT its realised schedule."""
    if not pbt.is_population_search(space):
        sample = {name: yaml.safe_load(value) for name, value in params.items() if name in space.param_names()}
        return space.pipeline_for(sample)
    record = pbt.read_trial_record(str(folder / PBT_RECORDS), trial_id)
    if not record:
        return None
    return space.pipeline_for(record["config"], overrides=pbt.realised_overrides(space, record["config"], record["realised"]))


def pin_best_trial(space: SearchSpace, folder: Path, best: Any, store_root: str | None) -> None:
    """Pin every stage of the best trial (a ``TrialRow``) in the store the search's trials shared."""
    if best is None or not store_root or not space.config.stage_cache:
        return  # without the shared store each trial's stages stay in the search folder
    pipeline = best_trial_pipeline(space, folder, best.trial_id, best.params)
    if pipeline is None:
        return
    store = StageCache(store_root)
    pin = {"search": str(folder), "trial": best.trial_id}
    for stage, key in zip(pipeline.stages, stage_keys(pipeline)):
        store.pin(stage.name, key, pin)


__all__ = ["best_trial_pipeline", "pin_best_trial"]
