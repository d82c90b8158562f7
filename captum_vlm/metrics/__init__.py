"""Faithfulness and localization metrics for attribution maps.

They know only about Captum-style forward functions and targets, so they work with any
attribution method (ours or Captum's) and any model.
"""

from .evidence import MapEvidence, SharedCurves, map_evidence, maps_evidence
from .localization import (
    DEFAULT_TOLERANCE,
    EnergyPointingGameResult,
    PointingGameResult,
    energy_pointing_game,
    pointing_game,
)
from .perturbation import PerturbationCurve, curve_auc, deletion_curve, insertion_curve
from .road import ROADCurve, noisy_linear_impute, road_curve
from .sanity import RandomizationResult, model_randomization_check, reinitialize, ssim
from .token_drop import token_drop_curve

__all__ = [
    "DEFAULT_TOLERANCE",
    "EnergyPointingGameResult",
    "MapEvidence",
    "PerturbationCurve",
    "PointingGameResult",
    "ROADCurve",
    "RandomizationResult",
    "SharedCurves",
    "curve_auc",
    "deletion_curve",
    "energy_pointing_game",
    "insertion_curve",
    "map_evidence",
    "maps_evidence",
    "noisy_linear_impute",
    "model_randomization_check",
    "pointing_game",
    "reinitialize",
    "road_curve",
    "ssim",
    "token_drop_curve",
]
