"""A map's faithfulness on its own input: deletion and insertion AUC against random orders.

Deletion and insertion (Petsiuk, Das and Saenko 2018, RISE, BMVC) remove (or reveal) patches in
the order a map ranks them. An AUC alone has no scale: whether 0.21 is good depends on the model,
the image and the target. So the same curves are run for ``n_random`` random patch orders and the
map's AUCs are reported beside theirs: a map worth reading deletes faster (lower deletion AUC) and
inserts faster (higher insertion AUC) than a random order.

Several maps of one input (:func:`maps_evidence`: one per prompt, per method) share what does not
depend on the map: the random orders' curves and every curve's two ends (the untouched image,
the image with every cell removed, the baseline with every cell hidden), all scored with every
output column kept, so a two-tower model scores the random curves of all its prompts in the same
forwards. Each map then costs ``2 (steps - 1)`` images, all in a few batched forward calls.

Example:
    >>> f = lambda x: x.sum(dim=(1, 2, 3))
    >>> x = torch.tensor([[[[1.0, 2.0]]]])
    >>> e = map_evidence(f, x, torch.tensor([[1.0, 2.0]]), steps=2, n_random=2, insertion_baseline=0.0)
    >>> e.deletion_auc, e.insertion_auc
    (1.25, 1.75)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_vlm._checks import check_count, check_finite

from ._utils import TargetType, select_target
from .perturbation import _baseline, curve_auc

__all__ = ["MapEvidence", "SharedCurves", "map_evidence", "maps_evidence", "patch_orders"]


@dataclass
class SharedCurves:
    """The scores every map of one input shares, each a forward output row (all its columns).

    Attributes:
        ends: ``(3, *out)``: the untouched image, every cell removed, every cell hidden.
        deletion, insertion: ``(n_random, steps - 1, *out)``: the random orders' inner points.
        grid_shape, steps, seed: what the random orders were drawn for.
    """

    ends: Tensor
    deletion: Tensor
    insertion: Tensor
    grid_shape: tuple[int, int]
    steps: int
    seed: int

    @property
    def n_random(self) -> int:
        return self.deletion.shape[0]


@dataclass
class MapEvidence:
    """Deletion and insertion AUC of one map and of random patch orders, on one input.

    Attributes:
        deletion_auc, insertion_auc: the map's AUCs (trapezoid rule on x in [0, 1]).
        random_deletion_auc, random_insertion_auc: mean AUC over the random orders.
        random_deletion_std, random_insertion_std: their standard deviation (0 for one order).
        deletion_scores, insertion_scores: ``(1 + n_random, steps + 1)`` curves, the map's first.
        n_random: number of random orders.
        shared: what this map's curves share with other maps of the same input (every output
            column); pass it (or this evidence as ``reuse_random``) to score another map.
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
    shared: SharedCurves | None = field(default=None, repr=False, compare=False)

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
    reuse_random: MapEvidence | SharedCurves | None = None,
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
        reuse_random: the evidence (or its ``shared``) of another map of the same input,
            forward function and grid size, any target: its random-order curves and curve ends
            are reused instead of recomputed (they do not depend on the map).

    Returns:
        :class:`MapEvidence`.
    """
    if isinstance(reuse_random, MapEvidence):
        if reuse_random.shared is None:
            raise ValueError("reuse_random: this evidence keeps no shared curves; pass its .shared")
        reuse_random = reuse_random.shared
    grid_t = torch.as_tensor(grid).detach() if not isinstance(grid, Tensor) else grid.detach()
    if grid_t.ndim != 2:
        raise ValueError(f"grid: expected one map (h, w), got shape {tuple(grid_t.shape)}")
    return maps_evidence(
        forward_func, inputs, grid_t[None], None if target is None else [target], additional_forward_args,
        steps=steps, n_random=n_random, deletion_baseline=deletion_baseline, insertion_baseline=insertion_baseline,
        blur_sigma=blur_sigma, batch_size=batch_size, seed=seed, shared=reuse_random,
    )[0]


def maps_evidence(
    forward_func: Callable[..., Tensor],
    inputs: Tensor,
    grids: Any,
    targets: Sequence[int] | None = None,
    additional_forward_args: Any = None,
    *,
    steps: int = 8,
    n_random: int = 3,
    deletion_baseline: Any = 0.0,
    insertion_baseline: Any = "blur",
    blur_sigma: float = 5.0,
    batch_size: int = 64,
    seed: int = 0,
    shared: SharedCurves | None = None,
) -> list[MapEvidence]:
    """:func:`map_evidence` of several maps of one input in shared batched forwards.

    The random orders' curves and the curves' ends are scored once for all maps (every output
    column kept, so maps of different targets share them); each map adds its ``2 (steps - 1)``
    inner images. Equal to calling :func:`map_evidence` once per map.

    Args:
        forward_func, inputs, additional_forward_args, steps, n_random, deletion_baseline,
            insertion_baseline, blur_sigma, batch_size, seed: as in :func:`map_evidence`.
        grids: ``(M, h, w)`` maps of ``inputs``.
        targets: one output column per map (``None``: the output is one score per image).
        shared: :attr:`MapEvidence.shared` of an earlier call on the same input, forward
            function and grid size: reused, not recomputed (``n_random`` and ``seed`` are its).

    Returns:
        One :class:`MapEvidence` per map.

    Example:
        >>> f = lambda x: torch.stack([x.sum(dim=(1, 2, 3)), -x.sum(dim=(1, 2, 3))], dim=1)
        >>> x = torch.tensor([[[[1.0, 2.0]]]])
        >>> found = maps_evidence(f, x, torch.tensor([[[1.0, 2.0]], [[2.0, 1.0]]]), [0, 1], steps=2,
        ...                       insertion_baseline=0.0)
        >>> [e.deletion_auc for e in found]
        [1.25, -1.75]
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs: expected a torch.Tensor (1, C, H, W), got {type(inputs).__name__}")
    if inputs.ndim == 3:
        inputs = inputs.unsqueeze(0)
    if inputs.ndim != 4 or inputs.shape[0] != 1:
        raise ValueError(f"inputs: expected one image (1, C, H, W), got shape {tuple(inputs.shape)}")
    check_finite(inputs, "inputs")
    grids_t = torch.as_tensor(grids).detach().to("cpu", torch.float64)
    if grids_t.ndim != 3 or grids_t.shape[0] < 1:
        raise ValueError(f"grids: expected maps (M, h, w), got shape {tuple(grids_t.shape)}")
    check_finite(grids_t, "grid")
    height, width = inputs.shape[-2:]
    shape = tuple(grids_t.shape[1:])
    if shape[0] > height or shape[1] > width:
        raise ValueError(f"grid: {shape} is larger than the image {height}x{width}")
    check_count(steps, "steps")
    check_count(n_random, "n_random")
    check_count(batch_size, "batch_size")
    n_maps, n_cells = grids_t.shape[0], shape[0] * shape[1]
    if steps > n_cells:
        raise ValueError(f"steps: expected at most the {n_cells} grid cells, got {steps}")
    if targets is not None:
        if isinstance(targets, (int, Tensor)) or len(targets) != n_maps:
            raise ValueError(f"targets: expected one output column per map ({n_maps}), got {targets!r}")
        targets = [int(t) for t in targets]
    if shared is not None and (shared.grid_shape != shape or shared.steps != steps):
        raise ValueError(f"shared: its curves are for a {shared.grid_shape} grid in {shared.steps} steps, "
                         f"not {shape} in {steps}")
    extra = () if additional_forward_args is None else (
        additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,)
    )
    counts = torch.arange(1, steps) * n_cells // steps  # the inner steps; 0 and all are the shared ends
    orders = [torch.sort(g.flatten(), descending=True, stable=True).indices for g in grids_t]
    if shared is None:
        orders += list(patch_orders(grids_t[0], n_random, seed)[1:])
    ranks = torch.empty(len(orders), n_cells, dtype=torch.long)
    ranks.scatter_(1, torch.stack(orders), torch.arange(n_cells).expand(len(orders), n_cells).contiguous())
    inner = (ranks[:, None, :] < counts[None, :, None]).reshape(-1, n_cells)  # [O * (S - 1), N]
    none, every = torch.zeros(1, n_cells, dtype=torch.bool), torch.ones(1, n_cells, dtype=torch.bool)
    # each image: (cells changed, deleting?); the ends first unless shared
    cells = torch.cat([inner, inner] + ([] if shared is not None else [none, every, none]))
    deleting = torch.cat([torch.ones(len(inner), dtype=torch.bool), torch.zeros(len(inner), dtype=torch.bool)]
                         + ([] if shared is not None else [torch.tensor([True, True, False])]))
    with torch.no_grad():
        image = inputs[0]
        removed = _baseline(inputs, deletion_baseline, blur_sigma)[0]
        hidden = _baseline(inputs, insertion_baseline, blur_sigma)[0]
        outputs = []
        for start in range(0, len(cells), batch_size):
            chunk = cells[start : start + batch_size].reshape(-1, 1, *shape).float()
            changed = F.interpolate(chunk, size=(height, width), mode="nearest-exact").bool().to(inputs.device)
            delete = deleting[start : start + batch_size].to(inputs.device)[:, None, None, None]
            batch = torch.where(changed, torch.where(delete, removed, image), torch.where(delete, image, hidden))
            outputs.append(forward_func(batch, *extra).detach().to("cpu", torch.float64))
    output = torch.cat(outputs)
    out_shape = tuple(output.shape[1:])
    inner_del = output[: len(inner)].view(len(orders), steps - 1, *out_shape)
    inner_ins = output[len(inner) : 2 * len(inner)].view(len(orders), steps - 1, *out_shape)
    if shared is None:
        shared = SharedCurves(ends=output[2 * len(inner) :], deletion=inner_del[n_maps:],
                              insertion=inner_ins[n_maps:], grid_shape=shape, steps=steps, seed=seed)

    def pick(rows: Tensor, target: int | None) -> Tensor:  # [..., *out] -> [...]
        flat = rows.reshape(-1, *out_shape)
        return select_target(flat, target, [0] * len(flat)).view(rows.shape[: rows.ndim - len(out_shape)])

    found = []
    for m in range(n_maps):
        target = None if targets is None else targets[m]
        ends = pick(shared.ends, target)  # image, removed, hidden
        r = shared.n_random
        deletion = torch.cat([ends[0].expand(1 + r, 1), pick(torch.cat([inner_del[m : m + 1], shared.deletion]), target),
                              ends[1].expand(1 + r, 1)], dim=1)
        insertion = torch.cat([ends[2].expand(1 + r, 1), pick(torch.cat([inner_ins[m : m + 1], shared.insertion]), target),
                               ends[0].expand(1 + r, 1)], dim=1)
        del_auc, ins_auc = curve_auc(deletion), curve_auc(insertion)
        found.append(MapEvidence(
            deletion_auc=float(del_auc[0]),
            insertion_auc=float(ins_auc[0]),
            random_deletion_auc=float(del_auc[1:].mean()),
            random_insertion_auc=float(ins_auc[1:].mean()),
            random_deletion_std=float(del_auc[1:].std(unbiased=False)),
            random_insertion_std=float(ins_auc[1:].std(unbiased=False)),
            deletion_scores=deletion,
            insertion_scores=insertion,
            n_random=r,
            shared=shared,
        ))
    return found
