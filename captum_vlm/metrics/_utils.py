"""Shared input checks for the metrics: map/mask shapes, targets, baselines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

TargetType = int | Sequence[int] | Tensor | None


def as_tensor(value: Any, name: str) -> Tensor:
    """Return ``value`` as a float tensor on CPU, or raise ``TypeError`` naming ``name``."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", torch.float64)
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            return torch.as_tensor(value, dtype=torch.float64)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")


def _batch_masks(mask: Tensor) -> Tensor:
    """Masks as a (B, H, W) bool tensor; raise if not binary or if any is empty."""
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise ValueError(f"mask must have shape (H, W) or (B, H, W), got shape {tuple(mask.shape)}")
    if not torch.all((mask == 0) | (mask == 1)):
        raise ValueError("mask must be binary (bool or 0/1 values); got other values")
    mask = mask.bool()
    empty = [i for i in range(mask.shape[0]) if not mask[i].any()]
    if empty:
        raise ValueError(
            f"mask is empty (no object pixel) for example(s) {empty}; "
            "the localization score is undefined without an object"
        )
    return mask


def maps_and_masks(attribution: Any, mask: Any) -> tuple[Tensor, Tensor]:
    """Bring an attribution and a mask to matching (B, H, W) shapes.

    Channels are summed (like Captum's ``visualize_image_attr``). A map smaller than the
    mask (a patch grid) is upsampled with nearest-exact interpolation, so each patch
    covers the block of pixels whose centres fall inside it.

    Args:
        attribution: (h, w), (C, h, w) or (1, C, h, w) for one example; (B, h, w) or
            (B, C, h, w) for a batch.
        mask: (H, W) for one example or (B, H, W) for a batch.

    Returns:
        ``(maps, masks)``: float64 maps and bool masks, both (B, H, W).
    """
    attr = as_tensor(attribution, "attribution")
    given = tuple(attr.shape)
    mask_t = as_tensor(mask, "mask")
    single = mask_t.ndim == 2
    masks = _batch_masks(mask_t)
    batch = masks.shape[0]
    if single:
        if attr.ndim == 2:
            attr = attr.unsqueeze(0)
        elif attr.ndim == 3:
            attr = attr.sum(0, keepdim=True)
        elif attr.ndim == 4 and attr.shape[0] == 1:
            attr = attr.sum(1)
        else:
            raise ValueError(
                "attribution for a single (H, W) mask must have shape (h, w), (C, h, w) or "
                f"(1, C, h, w); got shape {given}"
            )
    else:
        if attr.ndim == 2 and batch == 1:
            attr = attr.unsqueeze(0)
        elif attr.ndim == 4:
            attr = attr.sum(1)
        if attr.ndim != 3 or attr.shape[0] != batch:
            raise ValueError(
                f"attribution for a batch of {batch} masks must have shape (B, h, w) or "
                f"(B, C, h, w) with B={batch}; got shape {given}"
            )
    height, width = masks.shape[-2:]
    h, w = attr.shape[-2:]
    if h > height or w > width:
        raise ValueError(
            f"attribution map {h}x{w} is larger than the mask {height}x{width}; resize the "
            "mask to the map (or the map to the image) first"
        )
    if (h, w) != (height, width):
        attr = F.interpolate(attr.unsqueeze(1), size=(height, width), mode="nearest-exact")[:, 0]
    if not torch.isfinite(attr).all():
        raise ValueError("attribution contains NaN or infinite values")
    return attr, masks


def select_target(output: Tensor, target: TargetType, rows: Sequence[int]) -> Tensor:
    """Pick the explained score from a forward output, Captum style.

    Args:
        output: (N,) or (N, C) output of ``forward_func``.
        target: ``None`` (output must be one score per row), an int (the same column for
            every row), or one int per example (list or tensor).
        rows: for each output row, the index of the example it belongs to.

    Returns:
        (N,) scores.
    """
    if isinstance(target, Tensor) and target.ndim == 0:
        target = int(target)
    if output.ndim == 2 and output.shape[1] == 1 and target is None:
        output = output[:, 0]
    if output.ndim == 1:
        if target is not None and not (isinstance(target, int) and target == 0):
            raise ValueError(
                f"target={target!r} was given but forward_func returns one score per input "
                f"(shape {tuple(output.shape)}); pass target=None"
            )
        return output
    if output.ndim != 2:
        raise ValueError(
            f"forward_func must return a tensor of shape (N,) or (N, C); got {tuple(output.shape)}"
        )
    if target is None:
        raise ValueError(
            f"forward_func returns {output.shape[1]} outputs per input; pass target= to choose one"
        )
    if isinstance(target, int):
        columns = torch.full((len(rows),), target, dtype=torch.long)
    else:
        per_example = torch.as_tensor(target, dtype=torch.long).flatten()
        columns = per_example[torch.as_tensor(rows, dtype=torch.long)]
    n_out = output.shape[1]
    if bool(((columns < -n_out) | (columns >= n_out)).any()):
        raise ValueError(
            f"target: {target!r} is out of range: forward_func returns {n_out} outputs per input "
            f"(columns 0..{n_out - 1})"
        )
    columns = columns % n_out
    return output.gather(1, columns.to(output.device).unsqueeze(1))[:, 0]


def check_target(target: TargetType, batch: int) -> None:
    """Raise if a per-example target does not have one entry per example."""
    if target is None or isinstance(target, int):
        return
    if isinstance(target, Tensor) and target.ndim == 0:
        return
    if isinstance(target, tuple):
        raise TypeError(
            "target must be None, an int or one int per example; tuples are not supported"
        )
    n = len(target)
    if n != batch:
        raise ValueError(
            f"target has {n} entries but inputs hold {batch} examples; pass one per example"
        )
