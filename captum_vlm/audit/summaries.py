"""Numbers that summarise one attribution map on its patch grid.

Every summary reads the map's positive part as a distribution of "evidence mass" over the
cells (negative evidence does not point *at* anything), so they compare across methods whose
maps have different scales.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["box_to_mask", "map_entropy", "mask_cells", "mass_inside", "peak_cell", "positive_mass"]


def positive_mass(grid: np.ndarray) -> np.ndarray | None:
    """The map's positive part normalised to sum 1, or ``None`` when it has no positive cell.

    Example:
        >>> positive_mass(np.array([[1.0, -1.0], [3.0, 0.0]])).tolist()
        [[0.25, 0.0], [0.75, 0.0]]
    """
    positive = np.clip(np.asarray(grid, dtype=np.float64), 0.0, None)
    total = positive.sum()
    if not np.isfinite(total) or total <= 0:
        return None
    return positive / total


def peak_cell(grid: np.ndarray) -> tuple[int, int] | None:
    """``(row, col)`` of the largest value (the first one in row-major order on ties); ``None``
    when no cell is positive (an empty map points nowhere, not at the first cell)."""
    grid = np.asarray(grid)
    if positive_mass(grid) is None:
        return None
    flat = int(np.argmax(grid))
    return flat // grid.shape[1], flat % grid.shape[1]


def map_entropy(grid: np.ndarray) -> float:
    """Shannon entropy of the positive mass over the cells, divided by ``log(cells)``.

    0 when one cell holds everything, 1 when the mass is uniform; NaN without positive mass.

    Example:
        >>> map_entropy(np.ones((2, 2)))
        1.0
    """
    p = positive_mass(grid)
    if p is None or p.size < 2:
        return float("nan")
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(p.size))


def mass_inside(grid: np.ndarray, cells: np.ndarray) -> float:
    """Share of the positive mass on the object: ``sum(p * cells)`` with ``cells`` the fraction
    of each cell the object covers (see :func:`mask_cells`); NaN without positive mass."""
    p = positive_mass(grid)
    if p is None:
        return float("nan")
    if cells.shape != p.shape:
        raise ValueError(f"mask cells {cells.shape} do not match the map grid {p.shape}")
    return float((p * cells).sum())


def mask_cells(
    mask: np.ndarray, grid: tuple[int, int], crop_box: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """Fraction of each grid cell the object covers.

    Args:
        mask: boolean ``(H, W)`` in the original image's pixels.
        grid: the map's ``(rows, cols)``.
        crop_box: region of the image the processor kept ``(left, top, right, bottom)``
            (``Explanation.crop_box``); ``None`` for the whole image.

    Returns:
        ``(rows, cols)`` float array in ``[0, 1]``.

    Example:
        >>> mask_cells(np.array([[1, 0], [0, 0]], bool), (1, 2)).tolist()
        [[0.5, 0.0]]
    """
    picture = Image.fromarray(np.asarray(mask, dtype=np.float32), mode="F")
    rows, cols = grid
    return np.asarray(picture.resize((cols, rows), Image.Resampling.BOX, box=crop_box), dtype=np.float64)


def box_to_mask(box: Any, size: tuple[int, int]) -> np.ndarray:
    """A boolean ``(H, W)`` mask of the box ``(x0, y0, x1, y1)`` (pixels, ``x1``/``y1`` excluded).

    Args:
        box: four numbers.
        size: the image's ``(width, height)``.
    """
    values = [float(v) for v in box]
    if len(values) != 4 or not (values[0] < values[2] and values[1] < values[3]):
        raise ValueError(f"box: expected (x0, y0, x1, y1) with x0 < x1 and y0 < y1, got {box!r}")
    width, height = size
    ys, xs = np.arange(height)[:, None] + 0.5, np.arange(width)[None, :] + 0.5
    return (xs >= values[0]) & (xs < values[2]) & (ys >= values[1]) & (ys < values[3])
