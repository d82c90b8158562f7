"""Where the image tokens sit in a sequence and which patch-grid cell each one stands for.

A method scores the columns of a sequence (attention keys, hidden states); an
:class:`ImageTokenLayout` picks the image tokens' columns out of it and puts their scores on the
patch grid. Plain grids (CLIP, SigLIP, BLIP, LLaVA) are one-hot and in order; ViLT shuffles its
patch tokens, so its layout is read from the forward that made them.

Example:
    >>> layout = ImageTokenLayout.plain(batch=1, grid=(2, 3), start=1)
    >>> layout.to_grid(torch.arange(7.0)[None, None]).tolist()
    [[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ImageTokenLayout"]


@dataclass
class ImageTokenLayout:
    """Image tokens of one batch: their sequence positions and their grid cells.

    Attributes:
        grid: the patch grid ``(rows, cols)``.
        columns: ``[B, N]`` sequence position of each image token, per example.
        cells: ``[B, N]`` flat grid cell (``row * cols + col``) each image token stands for.
        length: the length of the sequence the positions index (``None``: not checked).
    """

    grid: tuple[int, int]
    columns: torch.Tensor
    cells: torch.Tensor
    length: int | None = None

    @classmethod
    def plain(cls, batch: int, grid: tuple[int, int], start: int = 0, length: int | None = None) -> ImageTokenLayout:
        """``h * w`` image tokens in row-major order from position ``start`` on."""
        n = grid[0] * grid[1]
        columns = (torch.arange(n) + start).expand(batch, n)
        return cls(grid, columns, torch.arange(n).expand(batch, n), start + n if length is None else length)

    @classmethod
    def at_positions(cls, positions: torch.Tensor, grid: tuple[int, int], skip: int = 0) -> ImageTokenLayout:
        """Image tokens where ``positions`` ``[B, L]`` is True, row-major, after the first ``skip``
        (a prefix feature such as a CLS that the sequence keeps).

        Raises:
            ValueError: a row does not hold ``skip + h * w`` image positions.
        """
        n = grid[0] * grid[1]
        counts = positions.sum(1)
        if not bool((counts == n + skip).all()):
            raise ValueError(
                f"inputs: the text holds {counts.tolist()} image tokens per row but the {grid[0]}x{grid[1]} "
                f"patch grid of pixel_values has {n}" + (f" (+{skip} prefix)" if skip else "")
            )
        index = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
        columns = torch.stack([index[b][positions[b]][skip:] for b in range(positions.shape[0])])
        return cls(grid, columns, torch.arange(n).expand_as(columns), positions.shape[1])

    def to_grid(self, values: torch.Tensor) -> torch.Tensor:
        """Scores on the sequence ``[B, R, L]`` to scores on the grid ``[B, R, h, w]``.

        Raises:
            ValueError: ``values`` does not have the sequence length the layout was read for.
        """
        b, r, length = values.shape
        if self.length is not None and length != self.length:
            h, w = self.grid
            raise ValueError(
                f"inputs: the model saw {length} tokens but the {h}x{w} patch grid expects {self.length}"
            )
        columns = self.columns.to(values.device)[:, None, :].expand(b, r, -1)
        cells = self.cells.to(values.device)[:, None, :].expand(b, r, -1)
        image = values.gather(-1, columns)
        grid = values.new_zeros(b, r, self.grid[0] * self.grid[1]).scatter_add_(-1, cells, image)
        return grid.reshape(b, r, *self.grid)
