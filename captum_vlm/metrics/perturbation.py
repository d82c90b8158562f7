"""Faithfulness by perturbation: deletion and insertion curves.

Petsiuk, Das and Saenko 2018, "RISE: Randomized Input Sampling for Explanation of Black-box
Models" (BMVC). Deletion removes the most relevant patches first and watches the score
fall (lower AUC is better); insertion starts from a baseline, reveals the most relevant
patches first and watches the score rise (higher AUC is better).

The model is any Captum-style ``forward_func(inputs, *additional_forward_args)`` returning
(N,) or (N, C) scores; ``target`` picks the column as in Captum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from captum_vlm._checks import check_finite
from captum_vlm._grid import grid_to_pixels

from ._utils import TargetType, check_target, select_target

BaselineType = float | int | Tensor | Literal["blur", "mean"]


@dataclass
class PerturbationCurve:
    """A deletion or insertion curve.

    Attributes:
        fractions: (steps + 1,) x axis, ``k / steps`` for k = 0..steps.
        scores: (B, steps + 1) forward score of the target after each step; column 0 is the
            unperturbed input (deletion) or the pure baseline (insertion).
        auc: (B,) trapezoid area under ``scores`` over ``fractions``.
        mean_auc: mean of ``auc`` over the batch.
    """

    fractions: Tensor
    scores: Tensor
    auc: Tensor
    mean_auc: float


def curve_auc(scores: Tensor) -> Tensor:
    """Area under curve(s) sampled at ``k / steps``, k = 0..steps, by the trapezoid rule.

    Args:
        scores: (..., steps + 1) curve values, steps >= 1.

    Returns:
        (...) areas.

    Example:
        >>> curve_auc(torch.tensor([1.0, 0.5, 0.0]))  # (0.75 + 0.25) / 2
        tensor(0.5000)
    """
    if scores.shape[-1] < 2:
        raise ValueError(f"a curve needs at least 2 points, got {scores.shape[-1]}")
    steps = scores.shape[-1] - 1
    return ((scores[..., 1:] + scores[..., :-1]) / 2).sum(-1) / steps


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Blur (B, C, H, W) images with a Gaussian of ``sigma`` pixels (replicated borders)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def _baseline(inputs: Tensor, baseline: BaselineType, blur_sigma: float) -> Tensor:
    if isinstance(baseline, str):
        if baseline == "mean":
            return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)
        if baseline == "blur":
            return gaussian_blur(inputs, blur_sigma)
        raise ValueError(f"baseline must be a number, a tensor, 'blur' or 'mean'; got {baseline!r}")
    if isinstance(baseline, bool) or not isinstance(baseline, int | float | Tensor):
        raise TypeError(
            f"baseline must be a number, a tensor, 'blur' or 'mean'; got {type(baseline).__name__}"
        )
    if isinstance(baseline, int | float):
        return torch.full_like(inputs, float(baseline))
    try:
        return torch.broadcast_to(baseline.to(inputs.device, inputs.dtype), inputs.shape)
    except RuntimeError:
        raise ValueError(
            f"baseline tensor of shape {tuple(baseline.shape)} does not broadcast to the inputs' "
            f"shape {tuple(inputs.shape)}"
        ) from None


def _pixel_maps(attribution: Any, batch: int, size: tuple[int, int]) -> Tensor:
    """Attribution as (B, H, W) float64 on CPU (channels summed; a patch grid spread over the
    pixels each patch covers, :func:`captum_vlm._grid.grid_to_pixels`)."""
    if not isinstance(attribution, Tensor):
        attribution = torch.as_tensor(attribution)
    attr = attribution.detach().to("cpu", torch.float64)
    given = tuple(attr.shape)
    if attr.ndim == 4:
        attr = attr.sum(1)
    elif attr.ndim == 3 and attr.shape[0] != batch and batch == 1:
        attr = attr.sum(0, keepdim=True)
    elif attr.ndim == 2 and batch == 1:
        attr = attr.unsqueeze(0)
    if attr.ndim != 3 or attr.shape[0] != batch:
        raise ValueError(
            f"attribution must have shape (B, C, h, w) or (B, h, w) with B={batch} "
            f"(or (C, h, w) / (h, w) for one example); got shape {given}"
        )
    h, w = attr.shape[-2:]
    if h > size[0] or w > size[1]:
        raise ValueError(f"attribution map {h}x{w} is larger than the inputs {size[0]}x{size[1]}")
    if (h, w) != size:  # the one patch-cover rule of captum_vlm._grid (unseen pixels get 0)
        attr = torch.from_numpy(grid_to_pixels(attr.numpy(), size))
    if not torch.isfinite(attr).all():
        raise ValueError("attribution contains NaN or infinite values")
    return attr


def _patch_ranks(maps: Tensor, patch: tuple[int, int]) -> tuple[Tensor, int]:
    """For every pixel, the rank (0 = most relevant) of the patch it belongs to.

    Patches are ranked by their mean attribution, descending; ties keep row-major order.
    Patches at the right/bottom edge are smaller when ``patch`` does not divide the image.
    """
    batch, height, width = maps.shape
    ph, pw = patch
    n_rows, n_cols = math.ceil(height / ph), math.ceil(width / pw)
    n_patches = n_rows * n_cols
    ys = torch.arange(height) // ph
    xs = torch.arange(width) // pw
    patch_id = (ys[:, None] * n_cols + xs[None, :]).flatten()
    sums = torch.zeros(batch, n_patches, dtype=maps.dtype).index_add_(1, patch_id, maps.flatten(1))
    counts = torch.bincount(patch_id, minlength=n_patches).to(maps.dtype)
    order = torch.sort(sums / counts, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n_patches).expand(batch, -1).contiguous())
    return ranks[:, patch_id].view(batch, height, width), n_patches


def _patch_size(patch_size: int | tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    pair = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if len(pair) != 2 or not all(isinstance(p, int) and p >= 1 for p in pair):
        raise ValueError(
            f"patch_size must be a positive int or (height, width); got {patch_size!r}"
        )
    if pair[0] > size[0] or pair[1] > size[1]:
        raise ValueError(f"patch_size {pair} is larger than the inputs {size[0]}x{size[1]}")
    return pair


def _perturbation_curve(
    mode: Literal["deletion", "insertion"],
    forward_func: Callable[..., Tensor],
    inputs: Tensor,
    attribution: Any,
    target: TargetType,
    additional_forward_args: Any,
    patch_size: int | tuple[int, int],
    steps: int | None,
    baseline: BaselineType,
    batch_size: int,
    expand_additional_args: bool,
    blur_sigma: float,
    show_progress: bool,
) -> PerturbationCurve:
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.ndim == 3:
        inputs = inputs.unsqueeze(0)
    if inputs.ndim != 4:
        raise ValueError(
            f"inputs must have shape (B, C, H, W) or (C, H, W); got {tuple(inputs.shape)}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    check_finite(inputs, "inputs")
    batch, _, height, width = inputs.shape
    check_target(target, batch)
    patch = _patch_size(patch_size, (height, width))
    maps = _pixel_maps(attribution, batch, (height, width))
    ranks, n_patches = _patch_ranks(maps, patch)
    if steps is None:
        steps = n_patches
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n_patches:
        raise ValueError(
            f"steps must be an int between 1 and the number of patches ({n_patches}); got {steps!r}"
        )
    # Step k changes the floor(k * N / steps) highest-ranked patches.
    counts = torch.arange(steps + 1) * n_patches // steps
    ranks = ranks.to(inputs.device)
    counts = counts.to(inputs.device)

    with torch.no_grad():
        base = check_finite(_baseline(inputs, baseline, blur_sigma), "baseline")
    if additional_forward_args is None:
        extra: tuple = ()
    elif isinstance(additional_forward_args, tuple):
        extra = additional_forward_args
    else:
        extra = (additional_forward_args,)

    scores = torch.empty(batch, steps + 1, dtype=torch.float64)
    chunks = range(0, steps + 1, batch_size)
    with (
        torch.no_grad(),
        tqdm(total=batch * len(chunks), desc=mode, disable=not show_progress) as bar,
    ):
        for b in range(batch):
            for start in chunks:
                k = torch.arange(start, min(start + batch_size, steps + 1), device=inputs.device)
                changed = (ranks[b][None] < counts[k][:, None, None]).unsqueeze(1)
                if mode == "deletion":
                    perturbed = torch.where(changed, base[b], inputs[b])
                else:
                    perturbed = torch.where(changed, inputs[b], base[b])
                args = extra
                if expand_additional_args:
                    args = tuple(
                        a[b : b + 1].expand(len(k), *a.shape[1:]) if isinstance(a, Tensor) else a
                        for a in extra
                    )
                output = forward_func(perturbed, *args)
                picked = select_target(output, target, [b] * len(k))
                scores[b, start : start + len(k)] = picked.detach().to("cpu", torch.float64)
                bar.update(1)

    auc = curve_auc(scores)
    fractions = torch.arange(steps + 1, dtype=torch.float64) / steps
    return PerturbationCurve(
        fractions=fractions, scores=scores, auc=auc, mean_auc=auc.mean().item()
    )


_ARGS_DOC = """
    Args:
        forward_func: ``forward_func(inputs, *additional_forward_args)`` returning (N,) or
            (N, C) scores, e.g. logits or probabilities (RISE uses class probabilities).
        inputs: (B, C, H, W) images, or (C, H, W) for one; any H and W.
        attribution: map(s) of shape (B, C, H, W), (B, H, W), (B, h, w) patch grid, or
            (C, H, W) / (H, W) for one example. Channels are summed; a smaller grid is
            spread over the pixels each patch covers (``captum_vlm._grid``: patch size
            ``H // h``; pixels past the grid get 0, as the model never sees them).
        target: as in Captum: None (one score per input), an int, or one int per example.
        additional_forward_args: passed to ``forward_func`` after the perturbed inputs.
        patch_size: side of the square patches (or (height, width)) ranked by their mean
            attribution; 1 is pixel-wise. If it does not divide the image, the last row and
            column of patches are smaller.
        steps: number of perturbation steps; step k changes the floor(k * N / steps)
            highest-ranked of the N patches. Default: one patch per step (``steps = N``).
        baseline: fill for removed patches: a number, a tensor broadcastable to ``inputs``,
            ``"mean"`` (each image's per-channel mean) or ``"blur"`` (Gaussian blur of the
            image, ``blur_sigma`` pixels).
        batch_size: perturbed images per ``forward_func`` call.
        expand_additional_args: False (default) passes ``additional_forward_args`` unchanged
            to every call, right for inputs shared by all images (the prompts of a two-tower
            model). True treats tensors among them as one row per example (Captum's
            convention): each call gets the example's row repeated.
        blur_sigma: standard deviation in pixels of the ``"blur"`` baseline.
        show_progress: draw a tqdm bar.

    Returns:
        :class:`PerturbationCurve` with ``steps + 1`` scores per example and the AUC
        (trapezoid rule on the normalised x axis [0, 1], step 0 included).
"""


def deletion_curve(
    forward_func: Callable[..., Tensor],
    inputs: Tensor,
    attribution: Any,
    target: TargetType = None,
    additional_forward_args: Any = None,
    *,
    patch_size: int | tuple[int, int] = 1,
    steps: int | None = None,
    baseline: BaselineType = 0.0,
    batch_size: int = 32,
    expand_additional_args: bool = False,
    blur_sigma: float = 5.0,
    show_progress: bool = False,
) -> PerturbationCurve:
    """Deletion curve and AUC (Petsiuk et al. 2018, RISE); lower AUC is more faithful.

    Patches are replaced by the baseline in order of decreasing attribution (most relevant
    first; negative values last), and the target score is recorded after each step. The
    default baseline is 0, which for normalised ``pixel_values`` is the data set's mean colour.
    {args}
    Example:
        >>> f = lambda x: x.sum(dim=(1, 2, 3))
        >>> x = torch.tensor([[[[1.0, 2.0]]]])
        >>> deletion_curve(f, x, x).scores  # remove 2, then 1
        tensor([[3., 1., 0.]], dtype=torch.float64)
    """
    return _perturbation_curve(
        "deletion", forward_func, inputs, attribution, target, additional_forward_args,
        patch_size, steps, baseline, batch_size, expand_additional_args, blur_sigma, show_progress,
    )  # fmt: skip


def insertion_curve(
    forward_func: Callable[..., Tensor],
    inputs: Tensor,
    attribution: Any,
    target: TargetType = None,
    additional_forward_args: Any = None,
    *,
    patch_size: int | tuple[int, int] = 1,
    steps: int | None = None,
    baseline: BaselineType = "blur",
    batch_size: int = 32,
    expand_additional_args: bool = False,
    blur_sigma: float = 5.0,
    show_progress: bool = False,
) -> PerturbationCurve:
    """Insertion curve and AUC (Petsiuk et al. 2018, RISE); higher AUC is more faithful.

    Starts from the baseline (a blurred image by default, as in RISE) and reveals the
    original patches in order of decreasing attribution, recording the target score. The
    last point is the unperturbed input.
    {args}
    Example:
        >>> f = lambda x: x.sum(dim=(1, 2, 3))
        >>> x = torch.tensor([[[[1.0, 2.0]]]])
        >>> insertion_curve(f, x, x, baseline=0.0).scores  # reveal 2, then 1
        tensor([[0., 2., 3.]], dtype=torch.float64)
    """
    return _perturbation_curve(
        "insertion", forward_func, inputs, attribution, target, additional_forward_args,
        patch_size, steps, baseline, batch_size, expand_additional_args, blur_sigma, show_progress,
    )  # fmt: skip


deletion_curve.__doc__ = (deletion_curve.__doc__ or "").replace("{args}", _ARGS_DOC)
insertion_curve.__doc__ = (insertion_curve.__doc__ or "").replace("{args}", _ARGS_DOC)
