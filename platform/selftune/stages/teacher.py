"""The mean teacher that three-stage self-training and U2PL share, packaged so ``fit`` can train it.

``MeanTeacher`` holds a student (trained) and its EMA teacher (never trained) in one module:

* ``forward`` in training mode runs the student (through DDP, so gradients are reduced); in eval
  mode it runs the teacher — so the per-epoch val mIoU and the best checkpoint are the teacher's
  (U2PL validates its teacher; three-stage labels the next stage with it).
* ``state_dict()`` is the teacher's, so the checkpoint a stage saves is a plain network of the
  student's architecture that ``load_checkpoint`` rebuilds and a ``pseudo_label`` stage uses.
* ``EmaUpdate``, a ``fit`` hook, applies ``θ' <- d θ' + (1 - d) θ`` after every optimizer step.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from selftune.engine.loop import Hook, TrainState, unwrap
from selftune.methods.common import ema_update
from selftune.models import load_checkpoint
from selftune.models.multi_head import multi_head_config
from selftune.stages.job import StageJob
from selftune.stages.training import ModelConfig, fresh_network


class MeanTeacher(nn.Module):
    """Student + EMA teacher. ``decay(updates, epoch_index)`` gives the EMA decay of update number
    ``updates`` (0-based), made during 0-based epoch ``epoch_index``; ``parameters_only`` as ``ema_update``; ``teacher_train_mode`` runs the teacher with
    batch statistics (U2PL's second teacher pass) instead of its running ones."""

    def __init__(
        self, student: nn.Module, decay: Callable[[int, int], float], *,
        parameters_only: bool = False, teacher_train_mode: bool = False,
    ):
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student).requires_grad_(False)
        self.decay = decay
        self.parameters_only = parameters_only
        self.teacher_train_mode = teacher_train_mode
        self.updates = 0

    def update_teacher(self, epoch_index: int = 0) -> None:
        """One EMA step of the teacher towards the student (after the student's optimizer step)."""
        decay = self.decay(self.updates, epoch_index)
        ema_update(self.teacher, self.student, decay, parameters_only=self.parameters_only)
        self.updates += 1

    def forward(self, x: torch.Tensor, **kwargs: Any):
        if not self.training:
            return self.teacher(x)
        return self.student(x, **kwargs)

    @torch.no_grad()
    def teach(self, x: torch.Tensor, **kwargs: Any):
        """The teacher's output, without gradient."""
        return self.teacher(x, **kwargs)

    @torch.no_grad()
    def teach_eval(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits with its running BN statistics, whatever mode it trains in."""
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            return self.teacher(x)
        finally:
            self.teacher.train(was_training)

    def train(self, mode: bool = True) -> MeanTeacher:
        super().train(mode)
        self.teacher.train(mode and self.teacher_train_mode)
        return self

    def get_extra_state(self) -> dict[str, int]:
        """What a restarted worker group needs beyond the weights: how many EMA steps were made."""
        return {"updates": self.updates}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.updates = state["updates"]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The teacher's state: the network a checkpoint of this stage is."""
        return self.teacher.state_dict(*args, **kwargs)


class EmaUpdate(Hook):
    """After every optimizer step, move the mean teacher one EMA step towards the student."""

    def after_step(self, state: TrainState, model: nn.Module) -> None:
        pair = unwrap(model)
        assert isinstance(pair, MeanTeacher), "EmaUpdate trains a MeanTeacher"
        pair.update_teacher(state.epoch_index)


def multi_head_model_config(job: StageJob, num_classes: int, **options: Any) -> ModelConfig:
    """The model config of a multi-head network around the pipeline's model (``options``: its
    ``shared_blocks``, ``branch``, …), as a checkpoint's ``model.json`` records it."""
    model = job.pipeline.model
    return {"num_classes": num_classes, **multi_head_config(model.name, dict(model.options), **options)}


def multi_head_student(job: StageJob, model_config: ModelConfig) -> nn.Module:
    """Fresh multi-head network (the same on every rank); with an ``init`` input (a plain network's
    checkpoint folder, or a multi-head one) its main path starts from it, the branch stays fresh."""
    student = fresh_network(job, model_config)
    init = job.inputs.get("init")
    if init is None:
        return student
    warm, _ = load_checkpoint(Path(init))
    state = warm.state_dict()
    if not any(key.startswith("head.main.") for key in state):  # plain network: its head is the main head
        state = {("head.main." + key[5:]) if key.startswith("head.") else key: value for key, value in state.items()}
    state = {key: value for key, value in state.items() if not key.startswith("head.branch.")}
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or any(not key.startswith("head.branch.") for key in missing):
        raise ValueError(f"init checkpoint {init} does not fit the multi-head network: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return student


__all__ = ["EmaUpdate", "MeanTeacher", "multi_head_model_config", "multi_head_student"]
