"""selftune: multi-stage semi-supervised semantic segmentation on Ray Train, searched with Ray Tune
and Optuna, tracked in MLflow."""

__version__ = "0.1.0"
