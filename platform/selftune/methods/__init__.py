"""The math of each method as plain tensor functions: losses, pseudo-labellers, selection rules.

One module per paper (no training loop, no Ray, no I/O here):

* ``three_stage``  — Ke et al., three-stage self-training (consistency, pseudo-mask loss, A/B).
* ``dst_cbc``      — Feng et al., dynamic self-training + class-balanced curriculum.
* ``u2pl``         — Wang et al., entropy partition + memory-bank contrastive loss.
* ``st_plus_plus`` — Yang et al., ST++ stability-based image selection.
* ``saug_dsbn``    — Yuan et al., DSBN + self-correction loss.
* ``auxnet``       — auxiliary confidence network (weighted BCE, T_aux selection).
* ``common``       — shared pieces (EMA teacher, masked CE).

``from selftune.methods import dst_cbc`` gives a module; the main functions are re-exported here.
"""

from __future__ import annotations

from selftune.methods import auxnet, common, dst_cbc, saug_dsbn, st_plus_plus, three_stage, u2pl
from selftune.methods.auxnet import auxiliary_confidence_loss, class_weights, confident_pseudo_labels, enet_class_weights
from selftune.methods.common import (
    IGNORE_INDEX,
    apply_cutmix,
    class_weighted_cross_entropy,
    cutmix_boxes,
    ema_decay,
    ema_update,
    masked_cross_entropy,
)
from selftune.methods.dst_cbc import (
    class_balanced_pseudo_labels,
    class_balanced_thresholds,
    class_balanced_thresholds_reference,
    dynamic_self_training_loss,
)
from selftune.methods.saug_dsbn import (
    DualBatchNorm2d,
    check_strong_bn_trainable,
    convert_to_dsbn,
    self_correction_loss,
    use_strong_bn,
)
from selftune.methods.st_plus_plus import select_reliable, split_reliable, stability_scores
from selftune.methods.three_stage import (
    apply_cutout,
    apply_geometric_transform,
    consistency_loss,
    cutout_mask,
    pseudo_label_loss,
    sample_geometric_transform,
    total_loss,
)
from selftune.methods.u2pl import (
    ClassMemoryBank,
    build_contrastive_samples,
    contrastive_loss,
    entropy,
    entropy_reliable_mask,
    memory_bank_contrastive_loss,
)

__all__ = [
    "IGNORE_INDEX",
    "ClassMemoryBank",
    "DualBatchNorm2d",
    "apply_cutmix",
    "apply_cutout",
    "apply_geometric_transform",
    "auxiliary_confidence_loss",
    "auxnet",
    "build_contrastive_samples",
    "class_balanced_pseudo_labels",
    "class_balanced_thresholds",
    "class_balanced_thresholds_reference",
    "check_strong_bn_trainable",
    "class_weighted_cross_entropy",
    "class_weights",
    "common",
    "confident_pseudo_labels",
    "consistency_loss",
    "contrastive_loss",
    "convert_to_dsbn",
    "cutmix_boxes",
    "cutout_mask",
    "dst_cbc",
    "dynamic_self_training_loss",
    "ema_decay",
    "ema_update",
    "enet_class_weights",
    "entropy",
    "entropy_reliable_mask",
    "masked_cross_entropy",
    "memory_bank_contrastive_loss",
    "pseudo_label_loss",
    "sample_geometric_transform",
    "saug_dsbn",
    "select_reliable",
    "self_correction_loss",
    "split_reliable",
    "st_plus_plus",
    "stability_scores",
    "three_stage",
    "total_loss",
    "u2pl",
    "use_strong_bn",
]
