"""Localization scores: does the attribution map point at the object?

* Pointing game — Zhang et al. 2016, "Top-down Neural Attention by Excitation Backprop"
  (ECCV; journal version IJCV 2018).
* Energy-based pointing game — Wang et al. 2020, "Score-CAM: Score-Weighted Visual
  Explanations for Convolutional Neural Networks" (CVPR workshops).

Both take a map and a binary object mask. Accepted shapes (channels are summed, as Captum's
``visualize_image_attr`` does for ``pixel_values``-shaped attributions):

* one example: mask (H, W); map (h, w), (1, h, w), (C, h, w) or (1, C, h, w);
* a batch: masks (B, H, W); maps (B, h, w) or (B, C, h, w).

A map smaller than the mask (a patch grid) is upsampled to the mask with nearest-exact
interpolation: each mask pixel takes the value of the patch its centre falls in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import maps_and_masks

#: Default pointing-game tolerance in pixels (see :func:`pointing_game`).
DEFAULT_TOLERANCE = 4


@dataclass
class PointingGameResult:
    """Outcome of :func:`pointing_game`.

    Attributes:
        hits: (B,) bool, one entry per example.
        mean: hit rate, the mean of ``hits``.
    """

    hits: Tensor
    mean: float


@dataclass
class EnergyPointingGameResult:
    """Outcome of :func:`energy_pointing_game`.

    Attributes:
        energy: (B,) share of positive relevance inside the mask, in [0, 1].
        mean: mean of ``energy``.
    """

    energy: Tensor
    mean: float


def _dilate(masks: Tensor, radius: float) -> Tensor:
    """Pixels within Euclidean distance ``radius`` of a mask pixel (a disk dilation)."""
    r = int(radius)
    if r < 1:
        return masks
    offsets = torch.arange(-r, r + 1, dtype=torch.float64)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).to(torch.float64)
    hit = F.conv2d(masks.to(torch.float64).unsqueeze(1), disk[None, None], padding=r)
    return hit[:, 0] > 0


def pointing_game(
    attribution: Any,
    mask: Any,
    tolerance: float = DEFAULT_TOLERANCE,
    ties: Literal["any", "all"] = "any",
) -> PointingGameResult:
    """Pointing game (Zhang et al. 2016): is the map's maximum on the object?

    A hit is counted when the maximum of the map lies within ``tolerance`` pixels
    (Euclidean distance, measured between pixel centres) of a mask pixel, i.e. on the mask
    dilated by a disk of that radius.

    Default tolerance: the paper uses 15 px on images of about 224 px. Scaled to the
    64-96 px scenes used here that is 15 * 64 / 224 ~ 4.3 px at 64 px and ~6.4 px at 96 px;
    we take 4 px (rounding down, so the game stays strict on the smallest images). Note that
    with ``ties="any"`` a patch-grid map scores a hit when its top patch comes within
    ``tolerance`` of the object. Pass ``tolerance=0`` for the strict game, or
    ``round(15 * side / 224)`` to scale the paper's value to your image side.

    Ties: when several pixels share the maximum (a patch grid upsampled to pixels always
    gives a block of them), ``ties="any"`` (default) counts a hit if any of them is within
    tolerance of the mask; ``ties="all"`` requires all of them to be. A flat map (maximum
    equal to minimum) points nowhere and is always a miss.

    Args:
        attribution: the map(s); shapes listed in the module docstring.
        mask: binary object mask(s), (H, W) or (B, H, W); bool or 0/1.
        tolerance: radius in mask pixels, >= 0.
        ties: how to score tied maxima, ``"any"`` or ``"all"``.

    Returns:
        :class:`PointingGameResult` with per-example ``hits`` and their ``mean``.

    Example:
        >>> m = torch.zeros(4, 4); m[1, 2] = 1.0
        >>> obj = torch.zeros(4, 4, dtype=torch.bool); obj[1, 2] = True
        >>> pointing_game(m, obj, tolerance=0).mean
        1.0
    """
    if not isinstance(tolerance, int | float) or tolerance < 0:
        raise ValueError(f"tolerance must be a number of pixels >= 0, got {tolerance!r}")
    if ties not in ("any", "all"):
        raise ValueError(f"ties must be 'any' or 'all', got {ties!r}")
    maps, masks = maps_and_masks(attribution, mask)
    allowed = _dilate(masks, float(tolerance))
    flat_maps = maps.flatten(1)
    peak = flat_maps.max(1, keepdim=True).values
    is_max = flat_maps == peak
    on_object = allowed.flatten(1)
    if ties == "any":
        hits = (is_max & on_object).any(1)
    else:
        hits = (~is_max | on_object).all(1)
    flat = flat_maps.min(1).values == peak[:, 0]
    hits = hits & ~flat
    return PointingGameResult(hits=hits, mean=hits.double().mean().item())


def energy_pointing_game(attribution: Any, mask: Any) -> EnergyPointingGameResult:
    """Energy-based pointing game (Wang et al. 2020, Score-CAM).

    The share of the map's positive relevance that falls inside the mask:
    ``sum(relu(map) * mask) / sum(relu(map))``. Channels are summed before the ReLU. A map
    with no positive value gets 0.

    Args:
        attribution: the map(s); shapes listed in the module docstring.
        mask: binary object mask(s), (H, W) or (B, H, W); Score-CAM uses bounding boxes,
            any binary mask works.

    Returns:
        :class:`EnergyPointingGameResult` with per-example ``energy`` and their ``mean``.

    Example:
        >>> m = torch.tensor([[3.0, 1.0], [-2.0, 0.0]])
        >>> obj = torch.tensor([[1, 0], [1, 0]])
        >>> energy_pointing_game(m, obj).mean  # 3 / (3 + 1)
        0.75
    """
    maps, masks = maps_and_masks(attribution, mask)
    positive = maps.clamp(min=0).flatten(1)
    total = positive.sum(1)
    inside = (positive * masks.flatten(1)).sum(1)
    energy = torch.where(total > 0, inside / total.clamp(min=1e-300), torch.zeros_like(total))
    return EnergyPointingGameResult(energy=energy, mean=energy.mean().item())
