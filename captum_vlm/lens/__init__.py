"""Non-attribution views of a model: what it holds inside.

Inside the model (issue 13): the logit lens (:func:`logit_lens`), linear probes per layer
(:func:`probe`), attention-head statistics (:func:`head_statistics`) and scoped head ablation
(:func:`ablate_heads`, :func:`head_importance`).
"""

from captum_vlm.lens.heads import (
    HeadImportance,
    HeadStatistics,
    ablate_heads,
    attention_statistics,
    head_importance,
    head_statistics,
)
from captum_vlm.lens.logit_lens import LogitLens, logit_lens, logit_lens_from_inputs
from captum_vlm.lens.probes import ProbeResult, layer_features, patch_labels, probe

__all__ = [
    "LogitLens",
    "logit_lens",
    "logit_lens_from_inputs",
    "ProbeResult",
    "probe",
    "layer_features",
    "patch_labels",
    "HeadStatistics",
    "HeadImportance",
    "attention_statistics",
    "head_statistics",
    "ablate_heads",
    "head_importance",
]
