"""Where the image tokens sit in a sequence and which patch-grid cell each one stands for.

A method scores the columns of a sequence (attention keys, hidden states); an
:class:`ImageTokenLayout` picks the image tokens' columns out of it and puts their scores on the
patch grid. Plain grids (CLIP, SigLIP, BLIP, LLaVA) are one-hot and in order; ViLT shuffles its
patch tokens, so its layout is read from the forward that made them. Learned query tokens (a
Q-Former's) stand for no cell: their layout has no ``cells``, and :meth:`ImageTokenLayout.to_grid`
takes the *bridge*, the queries' weights over the vision tokens (read by the method from the
attention between them), so a score on query ``j`` is spread over the patches by row ``j``.

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
        bridge_prefix: query layouts: vision tokens before the patches on the bridge's key axis
            (a CLS).

    ``cells`` is ``None`` when the image tokens are learned queries: then :meth:`to_grid` needs
    the bridge (see :meth:`queries`).
    """

    grid: tuple[int, int]
    columns: torch.Tensor
    cells: torch.Tensor | None
    length: int | None = None
    bridge_prefix: int = 0

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

    @classmethod
    def queries(
        cls, positions: torch.Tensor, grid: tuple[int, int], n_queries: int, bridge_prefix: int = 0
    ) -> ImageTokenLayout:
        """``n_queries`` learned query tokens where ``positions`` ``[B, L]`` is True, in order; the
        patch grid is reached through a bridge over ``bridge_prefix + h * w`` vision tokens.

        Raises:
            ValueError: a row does not hold ``n_queries`` image positions.
        """
        counts = positions.sum(1)
        if not bool((counts == n_queries).all()):
            raise ValueError(
                f"input_ids: the text holds {counts.tolist()} image tokens per row but the model has "
                f"{n_queries} query tokens; tokenise with the model's processor"
            )
        index = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
        columns = torch.stack([index[b][positions[b]] for b in range(positions.shape[0])])
        return cls(grid, columns, None, positions.shape[1], bridge_prefix)

    @property
    def needs_bridge(self) -> bool:
        """The image tokens are queries: :meth:`to_grid` needs their bridge to the patches."""
        return self.cells is None

    def bridge_grid(self, bridge: torch.Tensor) -> torch.Tensor:
        """Each query's bridge row on the patch grid: ``[B, N, K]`` or ``[B, R, N, K]`` (K vision
        tokens, prefix first; extra rows after the N queries, such as an instruction's, dropped)
        to ``[B, N, h, w]`` (``[B, R, N, h, w]``).

        Raises:
            ValueError: ``bridge`` has fewer rows than queries or not ``prefix + h * w`` columns.
        """
        h, w = self.grid
        n = self.columns.shape[1]
        if bridge.dim() not in (3, 4) or bridge.shape[-2] < n or bridge.shape[-1] != self.bridge_prefix + h * w:
            raise ValueError(
                f"bridge: expected [B, {n} queries, {self.bridge_prefix} + {h}x{w} vision tokens], got "
                f"{tuple(bridge.shape)}"
            )
        cells = bridge[..., :n, self.bridge_prefix :]
        return cells.reshape(*cells.shape[:-1], h, w)

    def to_grid(self, values: torch.Tensor, bridge: torch.Tensor | None = None) -> torch.Tensor:
        """Scores on the sequence ``[B, R, L]`` to scores on the grid ``[B, R, h, w]``.

        Args:
            values: scores on the sequence's columns.
            bridge: query layouts only: the queries' weights over the vision tokens, ``[B, N, K]``
                (the same for every row) or ``[B, R, N, K]``; a query's score is spread over the
                patches by its row (:meth:`bridge_grid`).

        Raises:
            ValueError: ``values`` does not have the sequence length the layout was read for; a
                query layout without ``bridge``.
        """
        b, r, length = values.shape
        if self.length is not None and length != self.length:
            h, w = self.grid
            raise ValueError(
                f"inputs: the model saw {length} tokens but the {h}x{w} patch grid expects {self.length}"
            )
        columns = self.columns.to(values.device)[:, None, :].expand(b, r, -1)
        image = values.gather(-1, columns)
        if self.cells is None:
            if bridge is None:
                raise ValueError(
                    f"bridge: the {self.columns.shape[1]} image tokens are learned queries, not patches; "
                    "pass their weights over the vision tokens (the adapter's bridge_attentions())"
                )
            cells = self.bridge_grid(bridge.to(values.device, values.dtype)).flatten(-2)
            grid = torch.einsum("brn,bnk->brk" if cells.dim() == 3 else "brn,brnk->brk", image, cells)
            return grid.reshape(b, r, *self.grid)
        cells = self.cells.to(values.device)[:, None, :].expand(b, r, -1)
        grid = values.new_zeros(b, r, self.grid[0] * self.grid[1]).scatter_add_(-1, cells, image)
        return grid.reshape(b, r, *self.grid)
