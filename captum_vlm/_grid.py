"""The one rule for which input pixels a patch covers (numpy only, so every layer can use it).

A vision transformer's patch convolution (kernel = stride = the patch size ``p``) gives patch
``i`` the pixels ``[i * p, (i + 1) * p)`` along each axis; pixels past ``n_patches * p`` (when the
size is not a multiple of the patch) are never seen by the model and belong to no patch. Image
maps in ``attr/`` (``return_grid=False``), the painted deletion/insertion curves in
``metrics/`` and the grounding test all go through :func:`patch_of_pixel`, so they agree on it.

This is about the model's input pixels. Putting a map onto another image (the original photo,
a scene mask of another size) is a resize of that whole input, which ``viz`` and the
localization metrics do by stretching; the two agree whenever the input size is a multiple of
the patch, as processors make it.

Example:
    >>> patch_of_pixel(5, 2).tolist()      # 5 pixels, 2 patches of 2: the last pixel is unseen
    [0, 0, 1, 1, -1]
    >>> grid_to_pixels(np.array([[1.0, 2.0]]), (2, 5)).tolist()
    [[1.0, 1.0, 2.0, 2.0, 0.0], [1.0, 1.0, 2.0, 2.0, 0.0]]
"""

from __future__ import annotations

import numpy as np

__all__ = ["patch_of_pixel", "grid_to_pixels", "pixels_to_grid"]


def patch_of_pixel(n_pixels: int, n_patches: int, patch: int | None = None) -> np.ndarray:
    """Along one axis, the patch covering each pixel, ``-1`` where none does.

    Args:
        n_pixels: pixels along the axis (``H`` or ``W``).
        n_patches: patches along the axis (``h`` or ``w``).
        patch: the patch size in pixels; ``None`` takes ``n_pixels // n_patches``, the model's
            patch whenever the grid came from this input (``n_patches = n_pixels // patch``) and
            the size is a multiple of it.

    Returns:
        ``[n_pixels]`` int array.

    Raises:
        ValueError: the patches do not fit in the pixels.
    """
    if n_patches < 1 or n_pixels < n_patches:
        raise ValueError(f"grid: {n_patches} patches do not fit in {n_pixels} pixels")
    size = n_pixels // n_patches if patch is None else int(patch)
    if size < 1 or size * n_patches > n_pixels:
        raise ValueError(f"patch: {n_patches} patches of {size} pixels do not fit in {n_pixels} pixels")
    index = np.arange(n_pixels) // size
    index[index >= n_patches] = -1
    return index


def grid_to_pixels(
    grid: np.ndarray, size: tuple[int, int], patch: tuple[int, int] | None = None, fill: float = 0.0
) -> np.ndarray:
    """A patch-grid map ``[..., h, w]`` as a pixel map ``[..., H, W]``: each pixel gets the value
    of the patch covering it, ``fill`` where none does.

    Example:
        >>> grid_to_pixels(np.eye(2), (3, 4), patch=(1, 2)).tolist()
        [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    """
    grid = np.asarray(grid, dtype=np.float64)
    h, w = grid.shape[-2:]
    rows = patch_of_pixel(size[0], h, None if patch is None else patch[0])
    cols = patch_of_pixel(size[1], w, None if patch is None else patch[1])
    padded = np.concatenate([grid, np.full((*grid.shape[:-1], 1), fill)], axis=-1)
    padded = np.concatenate([padded, np.full((*padded.shape[:-2], 1, w + 1), fill)], axis=-2)
    return padded[..., rows[:, None], cols[None, :]]


def pixels_to_grid(
    pixels: np.ndarray, grid: tuple[int, int], patch: tuple[int, int] | None = None
) -> np.ndarray:
    """A pixel map ``[..., H, W]`` as the patch grid ``[..., h, w]``: each patch gets the mean of
    the pixels it covers (unseen pixels are left out).

    Example:
        >>> pixels_to_grid(np.arange(10.0).reshape(2, 5), (1, 2)).tolist()
        [[3.0, 5.0]]
    """
    pixels = np.asarray(pixels, dtype=np.float64)
    rows = _one_hot(patch_of_pixel(pixels.shape[-2], grid[0], None if patch is None else patch[0]), grid[0])
    cols = _one_hot(patch_of_pixel(pixels.shape[-1], grid[1], None if patch is None else patch[1]), grid[1])
    sums = rows.T @ pixels @ cols  # [..., h, w]
    return sums / np.outer(rows.sum(0), cols.sum(0))


def _one_hot(index: np.ndarray, n: int) -> np.ndarray:
    """``[len(index), n]`` with a 1 at each covered pixel's patch (a row of zeros if unseen)."""
    return (index[:, None] == np.arange(n)[None, :]).astype(np.float64)
