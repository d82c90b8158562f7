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

import torch

__all__ = ["canvas_to_tiles", "tiles_to_canvas"]


def canvas_to_tiles(canvas: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The canvas ``[B, C, rows * T, cols * T]`` as its tiles ``[B, rows * cols, C, T, T]``, row by row."""
    b, c, height, width = canvas.shape
    t = height // rows
    return canvas.reshape(b, c, rows, t, cols, t).permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, c, t, t)


def tiles_to_canvas(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Tiles ``[B, rows * cols, C, T, T]`` (row by row) put back as the canvas ``[B, C, rows * T, cols * T]``."""
    b, _, c, t, _ = tiles.shape
    return tiles.reshape(b, rows, cols, c, t, t).permute(0, 3, 1, 4, 2, 5).reshape(b, c, rows * t, cols * t)
