"""Deletion and insertion by dropping image tokens, not painting pixels.

Painted deletion curves (RISE; Petsiuk et al. 2018) replace patches by a baseline colour: the
model then sees images it was never trained on, and the curve partly measures its reaction to
those out-of-distribution patches (the critique behind TRACE, ICML 2024, and ROAD, Rong et al.
2022). A transformer can instead run *without* the tokens: step k of the deletion curve removes
the k-th fraction of patch tokens in the map's order from the sequence (the adapter's scoped
``drop_image_tokens``), insertion starts from (almost) no patch tokens and adds them back.
Prefix tokens (CLS) always stay; for a model without one, insertion starts from the single
top-ranked token.

Example:
    >>> curve = token_drop_curve(model, ImageTextSimilarity(model), pixel_values, grid, target=0,
    ...                          additional_forward_args=(ids, mask))              # doctest: +SKIP
    >>> curve.auc                                                                 # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from captum_vlm._checks import check_choice, check_count, check_finite, check_pixel_values
from captum_vlm.adapters import get_adapter

from ._utils import TargetType, select_target
from .perturbation import PerturbationCurve, curve_auc

__all__ = ["token_drop_curve"]


def token_drop_curve(
    model: nn.Module,
    forward_func: Callable[..., Tensor],
    pixel_values: Tensor,
    grid: Any,
    target: TargetType = None,
    additional_forward_args: Any = None,
    *,
    mode: Literal["deletion", "insertion"] = "deletion",
    steps: int = 8,
) -> PerturbationCurve:
    """Deletion (lower AUC is more faithful) or insertion (higher) by dropping patch tokens.

    Args:
        model: the model ``forward_func`` runs; its adapter drops the tokens.
        forward_func: ``forward_func(pixel_values, *additional_forward_args)`` -> (1,) or (1, C).
        pixel_values: one image ``(1, 3, H, W)``.
        grid: the map on the model's patch grid ``(h, w)``.
        target: the output column, as in Captum.
        additional_forward_args: passed to ``forward_func`` after ``pixel_values``.
        mode: ``"deletion"`` or ``"insertion"``.
        steps: points after the first; step k drops (or keeps) ``floor(k * N / steps)`` tokens.

    Returns:
        :class:`~captum_vlm.metrics.PerturbationCurve` of one example.
    """
    check_choice(mode, ("deletion", "insertion"), "mode")
    check_count(steps, "steps")
    pixel_values = check_pixel_values(pixel_values)
    if pixel_values.shape[0] != 1:
        raise ValueError(f"pixel_values: expected one image (1, 3, H, W), got shape {tuple(pixel_values.shape)}")
    adapter = get_adapter(model)
    if adapter.image_tokens_in_input_ids:
        raise ValueError(
            f"model: {type(model).__name__} carries its image tokens in input_ids; token-drop curves "
            "support models whose patch tokens come from the vision tower alone"
        )
    expected = adapter.patch_grid(pixel_values)
    grid_t = torch.as_tensor(grid).detach().to("cpu", torch.float64)
    if tuple(grid_t.shape) != tuple(expected):
        raise ValueError(f"grid: expected the model's patch grid {tuple(expected)}, got shape {tuple(grid_t.shape)}")
    check_finite(grid_t, "grid")
    n = grid_t.numel()
    if steps > n:
        raise ValueError(f"steps: expected at most the {n} patch tokens, got {steps}")
    order = torch.sort(grid_t.flatten(), descending=True, stable=True).indices
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    counts = torch.arange(steps + 1) * n // steps
    floor = 0 if adapter.num_prefix_tokens > 0 else 1  # a sequence needs one token
    extra = () if additional_forward_args is None else (
        additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,)
    )
    scores = torch.empty(1, steps + 1, dtype=torch.float64)
    with torch.no_grad():
        for k, count in enumerate(counts.tolist()):
            keep = rank >= count if mode == "deletion" else rank < max(count, floor)
            if mode == "deletion" and not keep.any() and floor:
                keep = rank == n - 1  # the least relevant token stays
            with adapter.drop_image_tokens(keep.view(1, *grid_t.shape)):
                output = forward_func(pixel_values, *extra)
            scores[0, k] = select_target(output, target, [0]).detach().to("cpu", torch.float64)[0]
    auc = curve_auc(scores)
    fractions = torch.arange(steps + 1, dtype=torch.float64) / steps
    return PerturbationCurve(fractions=fractions, scores=scores, auc=auc, mean_auc=auc.mean().item())
