"""Tiles and the canvas they are cut from: the rearrangement the tiled families share.

A tiled family's processor cuts the processed image (the *canvas*) into ``rows x cols`` square
tiles, row by row, and may add a *global view* (the whole image resized to one tile); the adapters
hold the canvas as the one image tensor and cut the tiles again for every forward. Both directions
are exact rearrangements (differentiable). Each view becomes ``k x k`` image tokens, row by row; on
the canvas grid of ``(rows * k) x (cols * k)`` cells a tile token covers its cell and a global
token the ``rows x cols`` block its part of the global view was resized from
(:func:`tile_token_boxes`).

Example:
    >>> canvas = torch.arange(2 * 4 * 6.0).reshape(1, 2, 4, 6)
    >>> tiles = canvas_to_tiles(canvas, rows=2, cols=3)
    >>> tiles.shape, torch.equal(tiles_to_canvas(tiles, rows=2, cols=3), canvas)
    (torch.Size([1, 6, 2, 2, 2]), True)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["canvas_to_tiles", "closest_tile_layout", "tile_token_boxes", "tile_token_keep", "tiles_to_canvas",
           "views_patch_grid", "whole_view"]

#: where the global view's tokens sit among a tiled image's tokens
GLOBAL_VIEW_PLACES = ("first", "last", None)


def canvas_to_tiles(canvas: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The canvas ``[B, C, rows * T, cols * T]`` as its tiles ``[B, rows * cols, C, T, T]``, row by row."""
    b, c, height, width = canvas.shape
    t = height // rows
    return canvas.reshape(b, c, rows, t, cols, t).permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, c, t, t)


def tiles_to_canvas(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Tiles ``[B, rows * cols, C, T, T]`` (row by row) put back as the canvas ``[B, C, rows * T, cols * T]``."""
    b, _, c, t, _ = tiles.shape
    return tiles.reshape(b, rows, cols, c, t, t).permute(0, 3, 1, 4, 2, 5).reshape(b, c, rows * t, cols * t)


def whole_view(canvas: torch.Tensor, side: int, mode: str) -> torch.Tensor:
    """The canvas ``[B, C, H, W]`` resized to one ``side x side`` view (a global view),
    differentiably: ``torch.nn.functional.interpolate`` in ``mode``, antialiased where it smooths."""
    import torch.nn.functional as F

    smooth = mode in ("bilinear", "bicubic")
    kwargs = {"align_corners": False, "antialias": True} if smooth else {}
    return F.interpolate(canvas, size=(side, side), mode=mode, **kwargs)


def tile_token_boxes(rows: int, cols: int, k: int, global_view: str | None) -> torch.Tensor:
    """``[N, 4]`` the canvas-grid cell box ``(top, left, bottom, right)`` of each image token of a
    ``rows x cols`` canvas whose views give ``k x k`` tokens each, in the order the model reads
    them: the tiles' tokens (one cell each, tile after tile) and the global view's (the ``rows x
    cols`` cells each one's part of the global view comes from), ``"first"`` or ``"last"``
    (``None``: no global view).

    Example:
        >>> tile_token_boxes(1, 2, 1, "first").tolist()
        [[0, 0, 1, 2], [0, 0, 1, 1], [0, 1, 1, 2]]
    """
    if global_view not in GLOBAL_VIEW_PLACES:
        raise ValueError(f"global_view: expected one of {GLOBAL_VIEW_PLACES}, got {global_view!r}")
    tiles = [(r * k + i, c * k + j, r * k + i + 1, c * k + j + 1)
             for r in range(rows) for c in range(cols) for i in range(k) for j in range(k)]
    whole = [(i * rows, j * cols, (i + 1) * rows, (j + 1) * cols) for i in range(k) for j in range(k)]
    boxes = {"first": whole + tiles, "last": tiles + whole, None: tiles}[global_view]
    return torch.tensor(boxes, dtype=torch.long)


def tile_token_keep(keep: torch.Tensor, k: int, global_view: str | None) -> torch.Tensor:
    """Which image tokens stay ``[B, N]`` (in :func:`tile_token_boxes` order) for a keep mask on
    the canvas grid ``[B, rows * k, cols * k]``: a tile token with its cell, a global token while
    every cell of its box stays (a dropped region leaves both streams).

    Example:
        >>> keep = torch.tensor([[[1.0, 0.0]]])  # a 1x2 canvas of one token per view
        >>> tile_token_keep(keep, 1, "first").tolist()
        [[False, True, False]]
    """
    b, h, w = keep.shape
    rows, cols = h // k, w // k
    kept = keep > 0.5
    tiles = kept.reshape(b, rows, k, cols, k).permute(0, 1, 3, 2, 4).reshape(b, -1)
    if global_view is None:
        return tiles
    whole = kept.reshape(b, k, rows, k, cols).all(4).all(2).reshape(b, -1)
    return torch.cat([whole, tiles] if global_view == "first" else [tiles, whole], 1)


def closest_tile_layout(
    tiles: torch.Tensor, global_view: torch.Tensor, resize: Callable[[torch.Tensor], torch.Tensor],
    shapes: list[tuple[int, int]] | None = None,
) -> tuple[int, int]:
    """The ``(rows, cols)`` of ``tiles`` ``[B, n, C, T, T]`` whose canvas, resized by ``resize``,
    is nearest (mean absolute difference) to the processor's ``global_view`` ``[B, C, T, T]``:
    how the tiles were cut when the processor does not say (``shapes``: the candidates, default
    every factorisation of ``n``).
    """
    n = tiles.shape[1]
    shapes = shapes or [(r, n // r) for r in range(1, n + 1) if n % r == 0]
    errors = [float((resize(tiles_to_canvas(tiles, r, c)) - global_view).abs().mean()) for r, c in shapes]
    return shapes[errors.index(min(errors))]


def views_patch_grid(
    layer_attr: torch.Tensor, batch: int, tokens_per_side: int, patches_per_token: tuple[int, int],
    grid: tuple[int, int], boxes: torch.Tensor,
) -> torch.Tensor:
    """Patch-embedding attributions of every view ``[B * V, D, t * kh, t * kw]`` summed per image
    token (its ``kh x kw`` patches, views in token order) and put on the canvas ``grid`` by the
    tokens' ``boxes`` (:func:`tile_token_boxes`; a global token spread evenly over its box):
    ``[B, h, w]``."""
    from captum_vlm.adapters.layout import ImageTokenLayout

    (kh, kw), t = patches_per_token, tokens_per_side
    per_token = layer_attr.sum(1).reshape(batch, -1, t, kh, t, kw).sum(dim=(3, 5)).reshape(batch, 1, -1)
    columns = torch.arange(per_token.shape[-1]).expand(batch, -1)
    return ImageTokenLayout.boxes(columns, grid, boxes).to_grid(per_token)[:, 0]
