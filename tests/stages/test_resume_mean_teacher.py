"""A mean-teacher stage restarted from an epoch's snapshot (a killed DDP worker) gets back both
networks and the EMA step count, not only the teacher its checkpoints hold."""

from __future__ import annotations

import io
import itertools

import torch
from torch import nn

from selftune.config import OptimizerConfig
from selftune.engine.context import WorkerContext
from selftune.engine.loop import Hook, fit
from selftune.stages.teacher import EmaUpdate, MeanTeacher


class Snapshots(Hook):
    def __init__(self):
        self.taken = []

    def after_epoch(self, state, model):  # saved as Ray Train's checkpoint is
        saved = io.BytesIO()
        torch.save(state.snapshot(), saved)
        saved.seek(0)
        self.taken.append(torch.load(saved, weights_only=True))


def train(resume_state=None):
    torch.manual_seed(0)
    x = torch.randn(4, 2)
    pair, snapshots = MeanTeacher(nn.Linear(2, 1), lambda updates, epoch: 0.9), Snapshots()
    ctx = WorkerContext.local("cpu")
    ctx.resume_state = resume_state
    fit(pair, itertools.repeat({"x": x, "y": x.sum(dim=1, keepdim=True)}), epochs=3, steps_per_epoch=2,
        compute_losses=lambda model, batch, state: {"mse": ((model(batch["x"]) - batch["y"]) ** 2).mean()},
        optimizer=OptimizerConfig(lr=0.05), ctx=ctx, hooks=[EmaUpdate(), snapshots])
    return pair, snapshots


def test_student_teacher_and_ema_count_come_back():
    whole, snapshots = train()
    resumed, _ = train(resume_state=snapshots.taken[0])
    assert resumed.updates == whole.updates == 6
    for mine, theirs in zip(nn.Module.state_dict(resumed).values(), nn.Module.state_dict(whole).values()):
        if isinstance(mine, torch.Tensor):
            assert torch.allclose(mine, theirs)
