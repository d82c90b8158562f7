"""Tiles and the canvas they are cut from: the rearrangement the tiled families share.

A tiled family's processor cuts the processed image (the *canvas*) into ``rows x cols`` square
tiles, row by row; the adapters hold the canvas as the one image tensor and cut the tiles again
for every forward. Both directions are exact rearrangements (differentiable).

Example:
    >>> canvas = torch.arange(2 * 4 * 6.0).reshape(1, 2, 4, 6)
    >>> tiles = canvas_to_tiles(canvas, rows=2, cols=3)
    >>> tiles.shape, torch.equal(tiles_to_canvas(tiles, rows=2, cols=3), canvas)
    (torch.Size([1, 6, 2, 2, 2]), True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["canvas_to_tiles", "closest_layout", "tile_token_boxes", "tiles_to_canvas", "whole_view_token_boxes"]


def canvas_to_tiles(canvas: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The canvas ``[B, C, rows * T, cols * T]`` as its tiles ``[B, rows * cols, C, T, T]``, row by row."""
    b, c, height, width = canvas.shape
    t = height // rows
    return canvas.reshape(b, c, rows, t, cols, t).permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, c, t, t)


def tiles_to_canvas(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Tiles ``[B, rows * cols, C, T, T]`` (row by row) put back as the canvas ``[B, C, rows * T, cols * T]``."""
    b, _, c, t, _ = tiles.shape
    return tiles.reshape(b, rows, cols, c, t, t).permute(0, 3, 1, 4, 2, 5).reshape(b, c, rows * t, cols * t)


def tile_token_boxes(rows: int, cols: int, k: int) -> torch.Tensor:
    """``[rows * cols * k * k, 4]`` the cell box ``(top, left, bottom, right)`` of each token of a
    canvas of ``rows x cols`` tiles of ``k x k`` tokens, tile after tile (row by row), each token
    row by row within its tile: one cell each on the canvas's ``(rows * k) x (cols * k)`` grid."""
    return torch.tensor([(r * k + i, c * k + j, r * k + i + 1, c * k + j + 1)
                         for r in range(rows) for c in range(cols) for i in range(k) for j in range(k)],
                        dtype=torch.long)


def whole_view_token_boxes(rows: int, cols: int, k: int) -> torch.Tensor:
    """``[k * k, 4]`` the cell boxes of the ``k x k`` tokens of a view of the whole canvas (the
    canvas resized to one tile), row by row: token ``(i, j)`` covers the ``rows x cols`` cells
    its part of the view was resized from."""
    return torch.tensor([(i * rows, j * cols, (i + 1) * rows, (j + 1) * cols) for i in range(k) for j in range(k)],
                        dtype=torch.long)


def closest_layout(
    tiles: torch.Tensor, view: torch.Tensor, layouts: Sequence[tuple[int, int]],
    resize: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[int, int]:
    """Of the tile layouts ``(rows, cols)`` in ``layouts``, the one whose canvas of ``tiles``
    ``[B, n, C, T, T]`` gives back ``view`` ``[B, C, T, T]`` best when resized by ``resize``
    (canvas to view; the smallest mean absolute difference): the layout a processor that hands
    over tiles and a whole view without their arrangement used."""
    best, best_error = None, None
    for rows, cols in layouts:
        error = float((resize(tiles_to_canvas(tiles, rows, cols)) - view).abs().mean())
        if best_error is None or error < best_error:
            best, best_error = (rows, cols), error
    return best
