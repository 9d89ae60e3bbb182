"""``pseudo_label``: a trained model labels the unlabelled images.

Label = argmax of the softmax; pixels whose max probability is below ``threshold`` become 255
(not kept). One index PNG per image goes to ``<stage output>/pseudo_labels/<id>.png``; quality is
measured against the unlabelled ground truth where the dataset has it (``stages.labelling``).
"""

from __future__ import annotations

from typing import Any

from selftune.config import PseudoLabelStage, register_stage
from selftune.engine.context import WorkerContext
from selftune.engine.loop import predict
from selftune.stages.data import prepare_data
from selftune.stages.job import StageJob
from selftune.stages.labelling import label_and_measure, load_model, threshold_labels


@register_stage(PseudoLabelStage)
def run_pseudo_label(job: StageJob, ctx: WorkerContext) -> dict[str, Any]:
    stage: PseudoLabelStage = job.stage  # type: ignore[assignment]
    data = prepare_data(job.pipeline.data, job.seed)

    def labeller(model, batch):
        return threshold_labels(predict(model, batch["image"], ctx), stage.threshold)

    return label_and_measure(job, ctx, data, load_model(job.inputs["model"], ctx), labeller)
