"""captum-vlm: Captum attributions for vision-language models.

Example:
    >>> import captum_vlm as cv                                              # doctest: +SKIP
    >>> model, processor = cv.zoo.load("shapes-clip")                        # doctest: +SKIP
    >>> heat = cv.GradECLIP(model).attribute(pixel_values, target=0,         # doctest: +SKIP
    ...                                      additional_forward_args=(input_ids, attention_mask))
    >>> cv.viz.overlay(image, heat[0])                                       # doctest: +SKIP
    >>> cv.explain(model, processor, image, ["a red circle"]).to_html("report.html")  # doctest: +SKIP
"""

from captum_vlm import adapters, attr, hooks, lens, metrics, targets, viz, zoo
from captum_vlm.adapters import get_adapter, register_adapter
from captum_vlm.attr import (
    AttentionRollout,
    BimodalRelevancy,
    CausalOcclusion,
    CrossAttentionGradCAM,
    GradECLIP,
    GradientWeightedRelevancy,
    PatchWordSimilarity,
    RawAttention,
    TokenIntegratedGradients,
)
from captum_vlm.audit import Audit, audit
from captum_vlm.explain import Explanation, explain, method_names, register_method
from captum_vlm.hooks import capture, preserved_model_state
from captum_vlm.targets import (
    AnswerLogits,
    ImageTextSimilarity,
    MatchLogit,
    TextImageSimilarity,
    TokenLogProbs,
)

__version__ = "0.1.0"

__all__ = [
    "adapters",
    "attr",
    "hooks",
    "lens",
    "metrics",
    "targets",
    "viz",
    "zoo",
    "get_adapter",
    "register_adapter",
    "capture",
    "preserved_model_state",
    "explain",
    "audit",
    "Audit",
    "Explanation",
    "method_names",
    "register_method",
    "ImageTextSimilarity",
    "TextImageSimilarity",
    "MatchLogit",
    "AnswerLogits",
    "TokenLogProbs",
    "AttentionRollout",
    "BimodalRelevancy",
    "CausalOcclusion",
    "CrossAttentionGradCAM",
    "GradECLIP",
    "GradientWeightedRelevancy",
    "PatchWordSimilarity",
    "RawAttention",
    "TokenIntegratedGradients",
]
