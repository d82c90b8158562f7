"""Where the image tokens sit in a sequence and which map-grid cells each one stands for.

A method scores the columns of a sequence (attention keys, hidden states); an
:class:`ImageTokenLayout` picks the image tokens' columns out of it and puts their scores on the
map grid. It is a linear map from token scores to cell scores (:meth:`ImageTokenLayout.matrix`):

* one token, one cell (CLIP, SigLIP, BLIP, LLaVA, Qwen-VL's merged grid), in order or not (ViLT
  shuffles its patch tokens, so its layout is read from the forward that made them);
* one token, several cells (a merged or pooled token put on the finer patch grid,
  :meth:`ImageTokenLayout.merged`; any box of cells, :meth:`ImageTokenLayout.boxes`);
* several tokens, one cell (tiles plus a global view: a tile token and the global token that
  both see a cell).

A token's score is spread evenly over the cells it covers, and a cell adds up what its tokens give
it, so the grid holds the same total as the tokens (mass-conserving); with one cell per token this
is the plain one-hot rule. Learned query tokens (a Q-Former's) stand for no cell: their layout
has no ``cells``, and :meth:`ImageTokenLayout.to_grid` takes the *bridge*, the queries' weights
over the vision tokens (read by the method from the attention between them), so a score on query
``j`` is spread over the patches by row ``j``.

Example:
    >>> layout = ImageTokenLayout.plain(batch=1, grid=(2, 3), start=1)
    >>> layout.to_grid(torch.arange(7.0)[None, None]).tolist()
    [[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]]
    >>> ImageTokenLayout.merged(torch.tensor([[0, 1]]), grid=(2, 4), merge=2).to_grid(
    ...     torch.tensor([[[4.0, 8.0]]])).tolist()
    [[[[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ImageTokenLayout", "PAD_CELL"]

#: the padding index of :attr:`ImageTokenLayout.cells` (a token covering fewer cells than M)
PAD_CELL = -1


@dataclass
class ImageTokenLayout:
    """Image tokens of one batch: their sequence positions and the grid cells they cover.

    Attributes:
        grid: the map grid ``(rows, cols)``.
        columns: ``[B, N]`` sequence position of each image token, per example.
        cells: ``[B, N]`` the flat grid cell (``row * cols + col``) each image token stands for,
            or ``[B, N, M]`` the cells it covers, :data:`PAD_CELL` where it covers fewer than M.
        length: the length of the sequence the positions index (``None``: not checked).
        bridge_prefix: query layouts: vision tokens before the patches on the bridge's key axis
            (a CLS).

    ``cells`` is ``None`` when the image tokens are learned queries: then :meth:`to_grid` needs
    the bridge (see :meth:`queries`).

    Raises:
        ValueError: ``columns`` and ``cells`` disagree in shape, or a cell is off the grid.
    """

    grid: tuple[int, int]
    columns: torch.Tensor
    cells: torch.Tensor | None
    length: int | None = None
    bridge_prefix: int = 0

    def __post_init__(self):
        if self.cells is None:
            return
        n_cells = self.grid[0] * self.grid[1]
        if self.columns.dim() != 2 or self.cells.dim() not in (2, 3) or self.cells.shape[:2] != self.columns.shape:
            raise ValueError(
                f"cells: expected [B, N] or [B, N, M] for columns [B, N] = {tuple(self.columns.shape)}, got "
                f"{tuple(self.cells.shape)}"
            )
        if self.cells.numel() and (int(self.cells.min()) < PAD_CELL or int(self.cells.max()) >= n_cells):
            raise ValueError(
                f"cells: expected flat cells 0..{n_cells - 1} of the {self.grid[0]}x{self.grid[1]} grid "
                f"(or {PAD_CELL} for padding), got {int(self.cells.min())}..{int(self.cells.max())}"
            )

    # ----- constructors ---------------------------------------------------------------------------
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
    def merged(
        cls, columns: torch.Tensor, grid: tuple[int, int], merge: int | tuple[int, int], length: int | None = None
    ) -> ImageTokenLayout:
        """Tokens in row-major order over the coarse grid ``ceil(h / mh) x ceil(w / mw)``, each
        covering its ``mh x mw`` block of the ``grid`` (blocks at the bottom and right edges are
        cut to what is left): merged patches, pixel shuffle, pooling.

        Args:
            columns: ``[B, N]`` sequence positions, ``N`` the number of coarse cells.
            grid: the fine grid ``(h, w)`` the map is drawn on.
            merge: ``(mh, mw)`` fine cells per token along each axis (an int for both).
            length: the sequence length ``columns`` index.

        Example:
            >>> ImageTokenLayout.merged(torch.tensor([[3, 4]]), (3, 2), merge=2).cells.tolist()
            [[[0, 1, 2, 3], [4, 5, -1, -1]]]
        """
        mh, mw = (merge, merge) if isinstance(merge, int) else merge
        h, w = grid
        coarse = (-(-h // mh), -(-w // mw))
        boxes = torch.tensor([[r * mh, c * mw, min(h, (r + 1) * mh), min(w, (c + 1) * mw)]
                              for r in range(coarse[0]) for c in range(coarse[1])])
        if columns.shape[1] != boxes.shape[0]:
            raise ValueError(
                f"columns: {columns.shape[1]} image tokens per row, but {merge}-merging the {h}x{w} grid gives "
                f"{coarse[0]}x{coarse[1]} = {boxes.shape[0]}"
            )
        return cls.boxes(columns, grid, boxes, length)

    @classmethod
    def boxes(
        cls, columns: torch.Tensor, grid: tuple[int, int], boxes: torch.Tensor, length: int | None = None
    ) -> ImageTokenLayout:
        """Each token covers a box of cells ``(top, left, bottom, right)`` (bottom and right
        excluded): tiles, a global view over the whole grid, any rectangle. An empty box covers
        nothing (its token's score is left out).

        Args:
            columns: ``[B, N]`` sequence positions.
            grid: the map grid ``(h, w)`` the boxes are counted in.
            boxes: ``[N, 4]`` (the same for every example) or ``[B, N, 4]`` integer cell boxes.
            length: the sequence length ``columns`` index.

        Example:
            >>> tiles_and_global = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 2], [0, 0, 1, 2]])
            >>> ImageTokenLayout.boxes(torch.tensor([[1, 2, 3]]), (1, 2), tiles_and_global).cells.tolist()
            [[[0, -1], [1, -1], [0, 1]]]
        """
        boxes = torch.as_tensor(boxes, dtype=torch.long)
        boxes = boxes.expand(columns.shape[0], -1, -1) if boxes.dim() == 2 else boxes
        if boxes.shape[:2] != columns.shape or boxes.shape[-1] != 4:
            raise ValueError(f"boxes: expected [N, 4] or [B, N, 4] for columns {tuple(columns.shape)}, got "
                             f"{tuple(boxes.shape)}")
        h, w = grid
        top, left = boxes[..., 0].clamp(0, h), boxes[..., 1].clamp(0, w)
        bottom, right = boxes[..., 2].clamp(0, h), boxes[..., 3].clamp(0, w)
        rows, cols = torch.arange(h), torch.arange(w)
        inside = (((rows >= top[..., None]) & (rows < bottom[..., None]))[..., :, None]
                  & ((cols >= left[..., None]) & (cols < right[..., None]))[..., None, :])  # [B, N, h, w]
        inside = inside.flatten(2)
        width = max(1, int(inside.sum(-1).max()))
        flat = torch.arange(h * w).expand_as(inside)
        order = torch.sort(inside.long(), dim=-1, descending=True, stable=True).indices[..., :width]  # covered first
        cells = torch.where(inside.gather(-1, order), flat.gather(-1, order), PAD_CELL)
        return cls(grid, columns, cells, length)

    @classmethod
    def boxes_at_positions(
        cls, positions: torch.Tensor, grid: tuple[int, int], boxes: torch.Tensor,
        source: str = "the image of pixel_values",
    ) -> ImageTokenLayout:
        """Image tokens where ``positions`` ``[B, L]`` is True, in order, token ``n`` covering
        ``boxes[n]`` (:meth:`boxes`): tiles and global views read from a text's placeholders.

        Raises:
            ValueError: a row does not hold one image position per box (``source`` names what
                makes the boxes, :func:`~captum_vlm._checks.check_image_token_counts`).

        Example:
            >>> positions = torch.tensor([[False, True, True, True]])
            >>> boxes = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 2], [0, 0, 1, 2]])
            >>> ImageTokenLayout.boxes_at_positions(positions, (1, 2), boxes).columns.tolist()
            [[1, 2, 3]]
        """
        from captum_vlm._checks import check_image_token_counts

        check_image_token_counts(positions.sum(1), boxes.shape[0], source)
        index = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
        columns = torch.stack([index[b][positions[b]] for b in range(positions.shape[0])])
        return cls.boxes(columns.cpu(), grid, boxes, positions.shape[1])

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

    # ----- reading scores ------------------------------------------------------------------------
    @property
    def one_cell_each(self) -> torch.Tensor | None:
        """``[B, N]`` the one cell of each token when every token covers exactly one, else ``None``."""
        if self.cells is None or self.cells.dim() == 2:
            return self.cells
        covered = (self.cells >= 0).sum(-1)
        if not bool((covered == 1).all()):
            return None
        return self.cells.max(-1).values

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cells ``[B, N, M]`` (padding clamped to 0) and each one's share of its token ``[B, N, M]``."""
        cells = self.cells if self.cells.dim() == 3 else self.cells[..., None]
        valid = cells >= 0
        share = valid / valid.sum(-1, keepdim=True).clamp_min(1)
        return cells.clamp_min(0), share

    def to_grid(self, values: torch.Tensor, bridge: torch.Tensor | None = None) -> torch.Tensor:
        """Scores on the sequence ``[B, R, L]`` to scores on the grid ``[B, R, h, w]``: each image
        token's score spread evenly over the cells it covers, summed per cell.

        Args:
            values: scores on the sequence's columns.
            bridge: query layouts only: the queries' weights over the vision tokens, ``[B, N, K]``
                (the same for every row) or ``[B, R, N, K]``; a query's score is spread over the
                patches by its row (:meth:`bridge_grid`).

        Raises:
            ValueError: ``values`` does not have the sequence length the layout was read for; a
                query layout without ``bridge``.
        """
        b, r, _ = values.shape
        image = self._image_values(values)  # [B, R, N]
        if self.cells is None:
            if bridge is None:
                raise ValueError(
                    f"bridge: the {self.columns.shape[1]} image tokens are learned queries, not patches; "
                    "pass their weights over the vision tokens (the adapter's bridge_attentions())"
                )
            cells = self.bridge_grid(bridge.to(values.device, values.dtype)).flatten(-2)
            grid = torch.einsum("brn,bnk->brk" if cells.dim() == 3 else "brn,brnk->brk", image, cells)
            return grid.reshape(b, r, *self.grid)
        return self._scatter(image, *self._weights())

    def _image_values(self, values: torch.Tensor) -> torch.Tensor:
        """The image tokens' columns ``[B, R, N]`` of scores on the sequence ``[B, R, L]``."""
        b, r, length = values.shape
        if self.length is not None and length != self.length:
            h, w = self.grid
            raise ValueError(
                f"inputs: the model saw {length} tokens but the {h}x{w} patch grid expects {self.length}"
            )
        return values.gather(-1, self.columns.to(values.device)[:, None, :].expand(b, r, -1))

    def _scatter(self, image: torch.Tensor, cells: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Token values ``[B, R, N]`` times ``weights`` ``[B, N, M]``, added up on their ``cells``
        ``[B, N, M]``: the grid ``[B, R, h, w]``."""
        b, r = image.shape[:2]
        n, m = cells.shape[1:]
        cells = cells.to(image.device)[:, None].expand(b, r, n, m).reshape(b, r, n * m)
        spread = (image[..., None] * weights.to(image)[:, None]).reshape(b, r, n * m)
        grid = image.new_zeros(b, r, self.grid[0] * self.grid[1]).scatter_add_(-1, cells, spread)
        return grid.reshape(b, r, *self.grid)

    def mean_on_grid(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token quantities on the sequence ``[B, R, L]`` (a probability, not a share of a
        total) on the grid ``[B, R, h, w]``: each cell the mean of the image tokens that cover it
        (a tile token and the global-view tokens whose box holds the cell count once each), 0
        where none does. With one cell per token this is :meth:`to_grid`; a token covering
        several cells gives each its whole value, where :meth:`to_grid` divides it among them.

        Raises:
            ValueError: as :meth:`to_grid`; a query layout (its tokens cover no fixed cells).

        Example:
            >>> tiles_and_global = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 2], [0, 0, 1, 2]])
            >>> layout = ImageTokenLayout.boxes(torch.tensor([[0, 1, 2]]), (1, 2), tiles_and_global)
            >>> layout.mean_on_grid(torch.tensor([[[1.0, 2.0, 4.0]]])).tolist()  # (1 + 4) / 2, (2 + 4) / 2
            [[[[2.5, 3.0]]]]
        """
        if self.cells is None:
            raise ValueError("cells: the image tokens are learned queries; they cover no fixed cells of the grid")
        cells, share = self._weights()
        covers = (share > 0).to(share.dtype)
        total = self._scatter(self._image_values(values), cells, covers)
        count = self._scatter(values.new_ones(values.shape[0], 1, self.columns.shape[1]), cells, covers)
        return total / count.clamp_min(1)

    def matrix(self) -> torch.Tensor:
        """The layout as a linear map ``[B, h * w, N]``: ``grid = matrix @ token_scores`` (cell
        layouts; a query layout's map is its bridge, :meth:`bridge_grid`)."""
        if self.cells is None:
            raise ValueError("cells: a query layout has no fixed map; its bridge spreads the scores")
        cells, share = self._weights()
        b, n, m = cells.shape
        out = torch.zeros(b, self.grid[0] * self.grid[1], n, dtype=torch.float64)
        tokens = torch.arange(n)[None, :, None].expand(b, n, m)
        out.index_put_((torch.arange(b)[:, None, None].expand(b, n, m), cells, tokens), share.double(),
                       accumulate=True)
        return out
