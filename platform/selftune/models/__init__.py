"""Segmentation networks: the block interface, the registry, checkpoints, and the registered models.

Importing this package imports every model module, so the registry is full in any process that
imports ``selftune.models`` (a fresh Ray worker sees what the driver sees).
"""

from __future__ import annotations

from selftune.models.checkpoint import load_checkpoint, save_checkpoint
from selftune.models.network import BlockInfo, SegmentationNetwork, parameter_groups
from selftune.models.registry import available_models, build_model, check_model_name, register_model

# Model modules register themselves on import.
from selftune.models import deeplabv2  # noqa: F401  deeplabv2_resnet50, deeplabv2_resnet101
from selftune.models import deeplabv2_caffe  # noqa: F401  deeplabv2_caffe_resnet101, deeplabv2 (= deeplabv2_resnet101)
from selftune.models import multi_head  # noqa: F401  multi_head (any registered network + a second branch)
from selftune.models import small  # noqa: F401  small_segnet

__all__ = [
    "BlockInfo",
    "SegmentationNetwork",
    "available_models",
    "build_model",
    "check_model_name",
    "load_checkpoint",
    "parameter_groups",
    "register_model",
    "save_checkpoint",
]
