"""The mean teacher that three-stage self-training and U2PL share, packaged so ``fit`` can train it.

``MeanTeacher`` holds a student (trained) and its EMA teacher (never trained) in one module:

* ``forward`` in training mode runs the student (through DDP, so gradients are reduced); in eval
  mode it runs the teacher — so ``fit``'s per-epoch val mIoU and its best checkpoint are the
  teacher's (U2PL validates its teacher; three-stage labels the next stage with it).
* ``state_dict()`` is the teacher's, so the checkpoint ``fit`` saves is a plain network of the
  student's architecture that ``load_checkpoint`` rebuilds and a ``pseudo_label`` stage uses.
* The EMA update ``θ' <- d θ' + (1 - d) θ`` must follow each optimizer step, and the shared
  training loop has no hook there. So the wrapper marks an update as pending whenever the student
  runs, and applies it before the next use of the teacher (``teach``), the next student forward
  (i.e. after the optimizer step) or the switch to eval mode before validation. The order of
  updates is the textbook one; only the moment it is computed moves.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from selftune.methods.common import ema_update
from selftune.models import load_checkpoint
from selftune.stages.job import StageJob
from selftune.stages.training import initial_model


class MeanTeacher(nn.Module):
    """Student + EMA teacher. ``decay(updates)`` gives the EMA decay of update number ``updates``
    (0-based); ``parameters_only`` as ``ema_update``; ``teacher_train_mode`` runs the teacher with
    batch statistics (U2PL's second teacher pass) instead of its running ones."""

    def __init__(
        self, student: nn.Module, decay: Callable[[int], float], *,
        parameters_only: bool = False, teacher_train_mode: bool = False,
    ):
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student).requires_grad_(False)
        self.decay = decay
        self.parameters_only = parameters_only
        self.teacher_train_mode = teacher_train_mode
        self.updates = 0
        self._pending = False

    def update_teacher(self) -> None:
        """Apply the EMA update owed for the student's last optimizer step, if any."""
        if self._pending:
            ema_update(self.teacher, self.student, self.decay(self.updates), parameters_only=self.parameters_only)
            self.updates += 1
            self._pending = False

    def forward(self, x: torch.Tensor, **kwargs: Any):
        if not self.training:
            return self.teacher(x)
        self.update_teacher()  # the previous step's optimizer update is done by now
        self._pending = True
        return self.student(x, **kwargs)

    @torch.no_grad()
    def teach(self, x: torch.Tensor, **kwargs: Any):
        """The (up-to-date) teacher's output, without gradient."""
        self.update_teacher()
        return self.teacher(x, **kwargs)

    def train(self, mode: bool = True) -> MeanTeacher:
        if not mode:
            self.update_teacher()  # validation must see the teacher of the last step
        super().train(mode)
        self.teacher.train(mode and self.teacher_train_mode)
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The teacher's state: the network a checkpoint of this stage is."""
        return self.teacher.state_dict(*args, **kwargs)


def with_model(job: StageJob, model_config: dict[str, Any]) -> StageJob:
    """``job`` with the pipeline's model replaced by ``{name, options}``.

    ``fit`` builds the fresh network (same seed on every rank) and writes the checkpoint's model
    JSON from the pipeline's model config, so a stage that trains a different architecture (the
    multi-head network) hands ``fit`` a job that names it.
    """
    model = job.pipeline.model.model_copy(update={"name": model_config["name"], "options": model_config["options"]})
    return dataclasses.replace(job, pipeline=job.pipeline.model_copy(update={"model": model}))


def multi_head_job(job: StageJob, model_config: dict[str, Any]) -> tuple[StageJob, str | None]:
    """``job`` training ``model_config`` (a multi-head network) with its ``init`` input taken out.

    ``fit`` must build, and save the model JSON of, the multi-head network — not reload the
    ``init_from`` checkpoint, which is normally a plain network; ``multi_head_student`` loads
    that one into the main path. Returns (job, the init checkpoint folder or None).
    """
    init = job.inputs.get("init")
    inputs = {role: path for role, path in job.inputs.items() if role != "init"}
    return dataclasses.replace(with_model(job, model_config), inputs=inputs), init


def multi_head_student(job: StageJob, num_classes: int, init: str | None) -> nn.Module:
    """Fresh multi-head network (the same on every rank); with ``init`` (a plain network's
    checkpoint folder, or a multi-head one) its main path starts from it, the branch stays fresh."""
    torch.manual_seed(job.seed + job.stage_index)
    student, _ = initial_model(job, num_classes)
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
