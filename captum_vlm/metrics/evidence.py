"""A map's faithfulness on its own input: deletion and insertion AUC against random orders.

Deletion and insertion (Petsiuk, Das and Saenko 2018, RISE, BMVC) remove (or reveal) patches in
the order a map ranks them. An AUC alone has no scale: whether 0.21 is good depends on the model,
the image and the target. So the same curves are run for ``n_random`` random patch orders and the
map's AUCs are reported beside theirs: a map worth reading deletes faster (lower deletion AUC) and
inserts faster (higher insertion AUC) than a random order. All curves of one map go through the
model in a few batched forward calls.

Example:
    >>> f = lambda x: x.sum(dim=(1, 2, 3))
    >>> x = torch.tensor([[[[1.0, 2.0]]]])
    >>> e = map_evidence(f, x, torch.tensor([[1.0, 2.0]]), steps=2, n_random=2, insertion_baseline=0.0)
    >>> e.deletion_auc, e.insertion_auc
    (1.25, 1.75)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_vlm._checks import check_count, check_finite

from ._utils import TargetType, select_target
from .perturbation import _baseline, curve_auc

__all__ = ["MapEvidence", "map_evidence", "patch_orders"]


@dataclass
class MapEvidence:
    """Deletion and insertion AUC of one map and of random patch orders, on one input.

    Attributes:
        deletion_auc, insertion_auc: the map's AUCs (trapezoid rule on x in [0, 1]).
        random_deletion_auc, random_insertion_auc: mean AUC over the random orders.
        random_deletion_std, random_insertion_std: their standard deviation (0 for one order).
        deletion_scores, insertion_scores: ``(1 + n_random, steps + 1)`` curves, the map's first.
        n_random: number of random orders.
    """

    deletion_auc: float
    insertion_auc: float
    random_deletion_auc: float
    random_insertion_auc: float
    random_deletion_std: float
    random_insertion_std: float
    deletion_scores: Tensor
    insertion_scores: Tensor
    n_random: int

    @property
    def beats_random(self) -> bool:
        """Deletion below and insertion above the random orders' mean."""
        return (
            self.deletion_auc < self.random_deletion_auc
            and self.insertion_auc > self.random_insertion_auc
        )

    def summary(self, unit: str = "score") -> str:
        """One line, e.g. ``"deletion AUC 0.12 (random 0.31 ± 0.02), insertion ..."``."""
        return (
            f"deletion AUC {self.deletion_auc:.3g} (random {self.random_deletion_auc:.3g} ± "
            f"{self.random_deletion_std:.2g}; lower is better), insertion AUC "
            f"{self.insertion_auc:.3g} (random {self.random_insertion_auc:.3g} ± "
            f"{self.random_insertion_std:.2g}; higher is better), of the {unit}"
        )


def patch_orders(grid: Tensor, n_random: int, seed: int = 0) -> Tensor:
    """Patch orders, most relevant first: the map's (descending, ties row-major) and ``n_random``
    random permutations from ``torch.Generator().manual_seed(seed)``. Returns ``(1 + n_random, N)``."""
    flat = grid.flatten()
    orders = [torch.sort(flat, descending=True, stable=True).indices]
    generator = torch.Generator().manual_seed(seed)
    orders += [torch.randperm(flat.numel(), generator=generator) for _ in range(n_random)]
    return torch.stack(orders)


def map_evidence(
    forward_func: Callable[..., Tensor],
    inputs: Tensor,
    grid: Any,
    target: TargetType = None,
    additional_forward_args: Any = None,
    *,
    steps: int = 8,
    n_random: int = 3,
    deletion_baseline: Any = 0.0,
    insertion_baseline: Any = "blur",
    blur_sigma: float = 5.0,
    batch_size: int = 64,
    seed: int = 0,
    reuse_random: MapEvidence | None = None,
) -> MapEvidence:
    """Deletion and insertion of one map's patch order against ``n_random`` random orders.

    Step k of ``steps`` removes (deletion) or reveals (insertion) the first
    ``floor(k * N / steps)`` of the N grid cells in each order; a cell covers the pixels whose
    centres fall in it (nearest-exact upsampling, as in :func:`deletion_curve`).

    Args:
        forward_func: ``forward_func(images, *additional_forward_args)`` -> (N,) or (N, C).
        inputs: one image ``(1, C, H, W)`` or ``(C, H, W)``.
        grid: the map on its patch grid ``(h, w)`` (or a pixel map ``(H, W)``).
        target: the output column, as in Captum.
        additional_forward_args: passed unchanged to every call (shared by all images).
        steps: points of each curve after the first.
        n_random: random orders to compare against (>= 1).
        deletion_baseline, insertion_baseline: fill of removed / not yet revealed cells: a
            number, a tensor like ``inputs``, ``"mean"`` or ``"blur"``.
        blur_sigma: sigma in pixels of the ``"blur"`` baseline.
        batch_size: images per forward call.
        seed: seed of the random orders.
        reuse_random: the evidence of another map of the same input, target and grid size:
            its random-order curves are reused instead of recomputed (they do not depend on
            the map), so several methods on one target cost one set of random curves.

    Returns:
        :class:`MapEvidence`.
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs: expected a torch.Tensor (1, C, H, W), got {type(inputs).__name__}")
    if inputs.ndim == 3:
        inputs = inputs.unsqueeze(0)
    if inputs.ndim != 4 or inputs.shape[0] != 1:
        raise ValueError(f"inputs: expected one image (1, C, H, W), got shape {tuple(inputs.shape)}")
    check_finite(inputs, "inputs")
    grid_t = torch.as_tensor(grid).detach().to("cpu", torch.float64)
    if grid_t.ndim != 2:
        raise ValueError(f"grid: expected one map (h, w), got shape {tuple(grid_t.shape)}")
    check_finite(grid_t, "grid")
    height, width = inputs.shape[-2:]
    if grid_t.shape[0] > height or grid_t.shape[1] > width:
        raise ValueError(f"grid: {tuple(grid_t.shape)} is larger than the image {height}x{width}")
    check_count(steps, "steps")
    check_count(n_random, "n_random")
    check_count(batch_size, "batch_size")
    n_cells = grid_t.numel()
    if steps > n_cells:
        raise ValueError(f"steps: expected at most the {n_cells} grid cells, got {steps}")
    extra = () if additional_forward_args is None else (
        additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,)
    )
    if reuse_random is not None:
        n_random = reuse_random.n_random
        if reuse_random.deletion_scores.shape[1] != steps + 1:
            raise ValueError(f"reuse_random: its curves have {reuse_random.deletion_scores.shape[1] - 1} steps, not {steps}")
    orders = patch_orders(grid_t, n_random, seed)  # [O, N]
    if reuse_random is not None:
        orders = orders[:1]
    ranks = torch.empty_like(orders)
    ranks.scatter_(1, orders, torch.arange(n_cells).expand_as(orders).contiguous())
    counts = torch.arange(steps + 1) * n_cells // steps
    changed = ranks[:, None, :] < counts[None, :, None]  # [O, S+1, N]
    cells = changed.reshape(-1, 1, *grid_t.shape).float()
    changed_px = F.interpolate(cells, size=(height, width), mode="nearest-exact").bool().to(inputs.device)
    with torch.no_grad():
        image = inputs[0]
        removed = _baseline(inputs, deletion_baseline, blur_sigma)[0]
        hidden = _baseline(inputs, insertion_baseline, blur_sigma)[0]
        deleted = torch.where(changed_px, removed, image)
        inserted = torch.where(changed_px, image, hidden)
        batch = torch.cat([deleted, inserted])
        scores = []
        for start in range(0, batch.shape[0], batch_size):
            chunk = batch[start : start + batch_size]
            output = forward_func(chunk, *extra)
            scores.append(select_target(output, target, [0] * len(chunk)).detach().to("cpu", torch.float64))
    curves = torch.cat(scores).view(2, len(orders), steps + 1)
    deletion, insertion = curves[0], curves[1]
    if reuse_random is not None:
        deletion = torch.cat([deletion, reuse_random.deletion_scores[1:]])
        insertion = torch.cat([insertion, reuse_random.insertion_scores[1:]])
    del_auc, ins_auc = curve_auc(deletion), curve_auc(insertion)
    return MapEvidence(
        deletion_auc=float(del_auc[0]),
        insertion_auc=float(ins_auc[0]),
        random_deletion_auc=float(del_auc[1:].mean()),
        random_insertion_auc=float(ins_auc[1:].mean()),
        random_deletion_std=float(del_auc[1:].std(unbiased=False)),
        random_insertion_std=float(ins_auc[1:].std(unbiased=False)),
        deletion_scores=deletion,
        insertion_scores=insertion,
        n_random=n_random,
    )
