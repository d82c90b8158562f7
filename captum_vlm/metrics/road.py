"""ROAD: RemOve And Debias (Rong, Leemann, Borisov, Kasneci and Kasneci, ICML 2022).

Deletion curves that paint removed pixels with a constant let the model see the *shape* of the
removed region, so the curve measures the mask as much as the map. ROAD fills removed pixels by
noisy linear imputation instead: every removed pixel equals the weighted mean of its 8 neighbours
(1/6 for the 4 direct neighbours, 1/12 for the diagonal ones, renormalised at the border), solved
jointly for all removed pixels of a channel as one sparse linear system, plus a little Gaussian
noise. Pixels are removed most-relevant-first (MoRF: the score should fall fast) or
least-relevant-first (LeRF: it should stay high) at fixed fractions.

Example:
    >>> image = torch.zeros(1, 3, 3); image[0, 1, 1] = 9.0
    >>> removed = torch.zeros(3, 3, dtype=torch.bool); removed[1, 1] = True
    >>> noisy_linear_impute(image, removed, noise=0.0)[0, 1, 1].item()  # all neighbours are 0
    0.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from captum_vlm._checks import check_choice, check_finite

from ._utils import TargetType, check_target, select_target
from .perturbation import _pixel_maps

__all__ = ["ROADCurve", "noisy_linear_impute", "road_curve"]

_NEIGHBOURS = [(-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
               (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12)]


def noisy_linear_impute(
    image: Tensor, removed: Tensor, noise: float = 0.01, generator: torch.Generator | None = None
) -> Tensor:
    """Fill ``removed`` pixels of ``image`` ``(C, H, W)`` by ROAD's noisy linear imputation.

    Args:
        image: one image ``(C, H, W)``.
        removed: ``(H, W)`` bool, True where a pixel is removed.
        noise: standard deviation of the Gaussian noise added to imputed pixels.
        generator: random generator of the noise.

    Returns:
        A new ``(C, H, W)`` image; kept pixels are unchanged.
    """
    from scipy.sparse import coo_matrix, identity
    from scipy.sparse.linalg import spsolve

    channels, height, width = image.shape
    mask = removed.cpu().numpy().astype(bool)
    out = image.detach().clone()
    n = int(mask.sum())
    if n == 0:
        return out
    index = -np.ones((height, width), dtype=np.int64)
    ys, xs = np.nonzero(mask)
    index[ys, xs] = np.arange(n)
    total = np.zeros(n)
    for dy, dx, w in _NEIGHBOURS:
        inside = (ys + dy >= 0) & (ys + dy < height) & (xs + dx >= 0) & (xs + dx < width)
        total[inside] += w
    rows, cols, vals = [np.arange(n)], [np.arange(n)], [np.ones(n)]
    known_terms = []  # (row, y, x, weight) of known neighbours
    for dy, dx, w in _NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
        r, ny, nx = np.nonzero(inside)[0], ny[inside], nx[inside]
        weight = w / total[r]
        unknown = mask[ny, nx]
        rows.append(r[unknown])
        cols.append(index[ny[unknown], nx[unknown]])
        vals.append(-weight[unknown])
        known_terms.append((r[~unknown], ny[~unknown], nx[~unknown], weight[~unknown]))
    system = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    # a removed region with no known neighbour is singular: a tiny pull to the image mean fixes it
    system = (system + 1e-8 * identity(n)).tocsc()
    pixels = image.detach().cpu().double().numpy()
    for c in range(channels):
        rhs = np.full(n, 1e-8 * float(pixels[c][~mask].mean()) if (~mask).any() else 0.0)
        for r, ny, nx, weight in known_terms:
            np.add.at(rhs, r, weight * pixels[c, ny, nx])
        solved = torch.as_tensor(spsolve(system, rhs), dtype=image.dtype)
        if noise > 0:
            solved = solved + noise * torch.randn(n, generator=generator, dtype=image.dtype)
        out[c, torch.as_tensor(ys), torch.as_tensor(xs)] = solved.to(out.device)
    return out


@dataclass
class ROADCurve:
    """ROAD scores of the target after removing growing fractions of the pixels.

    Attributes:
        fractions: ``(F,)`` removed fractions (0 first: the unperturbed input).
        scores: ``(B, F)`` target score at each fraction.
        auc: ``(B,)`` trapezoid area under ``scores`` over ``fractions``.
        order: ``"morf"`` (most relevant first; lower is more faithful) or ``"lerf"``
            (least relevant first; higher is more faithful).
    """

    fractions: Tensor
    scores: Tensor
    auc: Tensor
    order: str


def road_curve(
    forward_func: Callable[..., Tensor],
    inputs: Tensor,
    attribution: Any,
    target: TargetType = None,
    additional_forward_args: Any = None,
    *,
    order: Literal["morf", "lerf"] = "morf",
    fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    noise: float = 0.01,
    seed: int = 0,
) -> ROADCurve:
    """ROAD curve (Rong et al. 2022): remove pixels by rank, fill them by noisy linear imputation.

    Args:
        forward_func: ``forward_func(images, *additional_forward_args)`` -> (N,) or (N, C).
        inputs: ``(B, C, H, W)`` images (or one ``(C, H, W)``).
        attribution: maps as in :func:`deletion_curve` (patch grids are upsampled nearest-exact).
        target: the output column, as in Captum.
        additional_forward_args: passed unchanged to every call.
        order: ``"morf"`` removes the most relevant pixels first, ``"lerf"`` the least.
        fractions: removed fractions in (0, 1), increasing; 0 is added in front.
        noise: standard deviation of the imputation noise.
        seed: seed of the noise.

    Returns:
        :class:`ROADCurve`.

    Example:
        >>> f = lambda x: x.sum(dim=(1, 2, 3))
        >>> x = torch.tensor([[[[0.0, 1.0, 4.0]]]])
        >>> road_curve(f, x, x, fractions=[1 / 3], noise=0.0).scores  # 4 -> mean of neighbour 1
        tensor([[5., 2.]], dtype=torch.float64)
    """
    check_choice(order, ("morf", "lerf"), "order")
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs: expected a torch.Tensor (B, C, H, W), got {type(inputs).__name__}")
    if inputs.ndim == 3:
        inputs = inputs.unsqueeze(0)
    if inputs.ndim != 4:
        raise ValueError(f"inputs: expected shape (B, C, H, W) or (C, H, W), got {tuple(inputs.shape)}")
    check_finite(inputs, "inputs")
    fracs = [float(f) for f in fractions]
    if not fracs or any(not 0.0 < f < 1.0 for f in fracs) or sorted(fracs) != fracs:
        raise ValueError(f"fractions: expected increasing values in (0, 1), got {list(fractions)!r}")
    batch, _, height, width = inputs.shape
    check_target(target, batch)
    maps = _pixel_maps(attribution, batch, (height, width))
    extra = () if additional_forward_args is None else (
        additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,)
    )
    n_pixels = height * width
    generator = torch.Generator().manual_seed(seed)
    scores = torch.empty(batch, len(fracs) + 1, dtype=torch.float64)
    with torch.no_grad():
        for b in range(batch):
            ranking = maps[b].flatten()
            order_idx = torch.sort(ranking, descending=(order == "morf"), stable=True).indices
            images = [inputs[b]]
            for f in fracs:
                removed = torch.zeros(n_pixels, dtype=torch.bool)
                removed[order_idx[: int(round(f * n_pixels))]] = True
                images.append(noisy_linear_impute(inputs[b], removed.view(height, width), noise, generator))
            output = forward_func(torch.stack(images), *extra)
            scores[b] = select_target(output, target, [b] * len(images)).detach().to("cpu", torch.float64)
    x = torch.tensor([0.0, *fracs], dtype=torch.float64)
    return ROADCurve(fractions=x, scores=scores, auc=torch.trapezoid(scores, x, dim=1), order=order)
