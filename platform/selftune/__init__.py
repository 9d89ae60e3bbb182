"""selftune: multi-stage semi-supervised semantic segmentation on Ray Train, searched with Ray Tune
and Optuna, tracked in MLflow."""

__version__ = "0.1.0"

# Fill the registry of stage kinds (selftune.config.kinds) in every process that imports selftune,
# so a pipeline validates without importing anything else first and a fresh Ray worker sees the
# kinds the driver saw.
import selftune.stages  # noqa: E402,F401
