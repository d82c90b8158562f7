"""captum-vlm: Captum attributions for vision-language models.

Example:
    >>> import captum_vlm as cv                                     # doctest: +SKIP
    >>> cv.get_adapter(model).patch_grid(inputs["pixel_values"])   # doctest: +SKIP
"""

from captum_vlm import adapters, hooks, targets
from captum_vlm.adapters import get_adapter, register_adapter
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
    "hooks",
    "targets",
    "get_adapter",
    "register_adapter",
    "capture",
    "preserved_model_state",
    "ImageTextSimilarity",
    "TextImageSimilarity",
    "MatchLogit",
    "AnswerLogits",
    "TokenLogProbs",
]
