"""Attribution methods, one per file, each a Captum ``Attribution`` subclass.

Image maps come back in the shape of ``pixel_values``; ``return_grid=True`` gives the patch grid
(see :mod:`captum_vlm.attr._base`). Every method has ``attribute`` (one map per example) and
``attribute_items`` (one map per explained item: prompt, token or output column; see
:mod:`captum_vlm.attr._core`).
"""

from captum_vlm.attr.attention_rollout import AttentionRollout
from captum_vlm.attr.bimodal_relevancy import BimodalRelevancy
from captum_vlm.attr.cross_attention_gradcam import CrossAttentionGradCAM
from captum_vlm.attr.grad_eclip import GradECLIP
from captum_vlm.attr.gradient_weighted_relevancy import GradientWeightedRelevancy
from captum_vlm.attr.occlusion import CausalOcclusion, GroundingResult
from captum_vlm.attr.patch_word_similarity import PatchWordSimilarity
from captum_vlm.attr.raw_attention import RawAttention
from captum_vlm.attr.token_ig import TokenIntegratedGradients

__all__ = [
    "AttentionRollout",
    "BimodalRelevancy",
    "CausalOcclusion",
    "CrossAttentionGradCAM",
    "GradECLIP",
    "GradientWeightedRelevancy",
    "GroundingResult",
    "PatchWordSimilarity",
    "RawAttention",
    "TokenIntegratedGradients",
]
