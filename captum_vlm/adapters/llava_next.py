"""Adapter for LLaVA-NeXT and LLaVA-OneVision (``LlavaNextForConditionalGeneration``,
``LlavaOnevisionForConditionalGeneration``): any-resolution tiles plus a base view, newline
tokens, unpadding (and OneVision's pooling of the tile features).

The processor resizes the image to fit the best of ``config.image_grid_pinpoints`` (aspect kept,
padded to it), cuts that **canvas** into ``S x S`` tiles (``S`` the vision tower's image size) and
adds a **base view**, the whole image resized to ``S x S``. Every method here takes, and every
map is drawn over, that canvas ``[B, 3, H, W]``: :meth:`LlavaNextAdapter.processor_inputs`
reassembles it exactly from the processor's tiles, and :meth:`LlavaNextAdapter.model_inputs` cuts
the tiles again and computes the base view from the canvas's content box (the pixels the resized
image fills, placed by ``image_sizes``) with torch (bicubic, antialiased, the processor's
resample), so everything the model sees is a function of the one image tensor (gradients, IG paths
and occlusion reach the tiles and the base view; a painted region is hidden in both).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from captum_vlm._checks import (
    check_image_token_counts,
    check_one_canvas,
    check_one_image_per_text,
    check_pixel_values,
    image_runs,
)
from captum_vlm.adapters._canvas import canvas_to_tiles, tiles_to_canvas
from captum_vlm.adapters.base import register_adapter
from captum_vlm.adapters.layout import ImageTokenLayout
from captum_vlm.adapters.llava import LlavaAdapter

#: models in a drop_image_tokens block (by id), with their keep mask: the target's adapter is
#: another instance than the method's, so the block is recorded per model
_DROPPING: dict[int, torch.Tensor] = {}


@dataclass(frozen=True)
class AnyresGeometry:
    """Where one image's tokens come from on the canvas's patch grid.

    Attributes:
        grid: the canvas's patch grid ``(H, W)`` (the map grid).
        tiles: tiles ``(rows, cols)`` of the canvas.
        side: patches per tile side (and the base view's grid side).
        kept: the cells left after unpadding, ``(top, bottom, left, right)`` (bottom, right excluded).
        pooled: OneVision's pooled grid of the kept cells ``(rows, cols)`` (``None``: not pooled).
        content: the canvas pixels the resized image fills, ``(top, bottom, left, right)``
            (bottom, right excluded), the base view's source (``None``: the whole canvas, as when
            only the text is known).
        patch: pixels per cell side.
    """

    grid: tuple[int, int]
    tiles: tuple[int, int]
    side: int
    kept: tuple[int, int, int, int]
    pooled: tuple[int, int] | None = None
    content: tuple[int, int, int, int] | None = None
    patch: int = 1

    @property
    def token_grid(self) -> tuple[int, int]:
        """Rows and columns of tile tokens after unpadding (and pooling)."""
        if self.pooled is not None:
            return self.pooled
        top, bottom, left, right = self.kept
        return bottom - top, right - left

    @property
    def num_tokens(self) -> int:
        """Image placeholders of this image: the base view, then each row of tile tokens and a newline."""
        rows, cols = self.token_grid
        return self.side ** 2 + rows * (cols + 1)

    def boxes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image placeholder, in sequence order: whether it is an image token (not a newline)
        ``[N]`` and its cell box ``(top, left, bottom, right)`` on :attr:`grid` ``[N, 4]``
        (newlines: an empty box). Base-view token ``(i, j)`` covers the block of canvas cells its
        share of the content box (:attr:`content`) touches; a tile token its cell; a pooled token
        the cells its bilinear weights read."""
        (h, w), g, p = self.grid, self.side, self.patch
        top, bottom, left, right = self.content or (0, h * p, 0, w * p)

        def share(start: int, size: int, i: int) -> tuple[int, int]:  # cells of pixels [start + i*size/g, ...)
            return (start * g + i * size) // (g * p), -(-(start * g + (i + 1) * size) // (g * p))

        found = []
        for i in range(g):
            r0, r1 = share(top, bottom - top, i)
            for j in range(g):
                c0, c1 = share(left, right - left, j)
                found.append((r0, c0, r1, c1))
        top, bottom, left, right = self.kept
        rows, cols = self.token_grid
        row_support = _bilinear_support(bottom - top, rows)
        col_support = _bilinear_support(right - left, cols)
        image = [True] * len(found)
        for i in range(rows):
            r0, r1 = row_support[i]
            for j in range(cols):
                c0, c1 = col_support[j]
                found.append((top + r0, left + c0, top + r1, left + c1))
                image.append(True)
            found.append((0, 0, 0, 0))
            image.append(False)
        return torch.tensor(image), torch.tensor(found, dtype=torch.long)


def _bilinear_support(size: int, out: int) -> list[tuple[int, int]]:
    """For each of ``out`` outputs of a bilinear resize (``align_corners=False``) of ``size``
    inputs, the input range ``[first, last + 1)`` its nonzero weights read (the identity when
    ``out == size``)."""
    if out == size:
        return [(i, i + 1) for i in range(size)]
    found = []
    for i in range(out):
        source = max(Fraction(0), Fraction((2 * i + 1) * size - out, 2 * out))
        first = int(math.floor(source))
        last = min(first + 1, size - 1) if source > first else first
        found.append((first, last + 1))
    return found


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (Liu et al., *LLaVA-NeXT: Improved reasoning, OCR, and world knowledge*, 2024)
    and LLaVA-OneVision (Li et al., *LLaVA-OneVision: Easy Visual Task Transfer*, 2024).

    **The image tensor is the tile canvas** ``[B, 3, a*S, b*S]``: the processed high-resolution
    image at the chosen grid pinpoint (resized with its aspect kept and padded, as the
    processor does) from which the ``a x b`` tiles are cut. The map grid is the canvas's patch
    grid ``(a*g, b*g)`` (``g = S / patch``); one cell is one vision patch of a tile.

    The language model's image placeholders hold, in order, the base view's ``g x g`` tokens and
    then the tile tokens of the canvas grid row by row, each row followed by an ``image_newline``
    token, after **unpadding** (rows or columns of the grid that only cover the processor's
    padding are removed; they map to nothing). LLaVA-OneVision bilinearly **pools** the unpadded
    tile features to a smaller grid when there are more than ``anyres_max_N`` tiles' worth
    (``config.vision_aspect_ratio``); a pooled token covers the cells its bilinear weights read.
    A tile token covers its cell, a base-view token the cells its ``1/g x 1/g`` share of the content
    box touches (:class:`AnyresGeometry`); newline tokens are no image tokens. The layout spreads
    a token's score evenly over its cells (mass-conserving,
    :meth:`~captum_vlm.adapters.layout.ImageTokenLayout.boxes`).

    **The base view is computed from the canvas's content box**: the pixels where the processor
    pasted the resized image (from ``image_sizes``: the pinpoint, the resize size and the even
    padding, :meth:`geometry_of_size`), resized to ``S x S`` bicubic with antialiasing. So a change
    to the canvas reaches both the tiles and the base view, and padding reaches neither the base
    view nor any map through it. The processor's own base view is one resize of the original
    image; ours resamples twice. Measured on the tiny random models of the tests
    (``benchmarks/anyres_base_view.py``, 3 seeds, 2026-12-02): the largest logit difference is
    0.1-0.2% of the logits' range for a picture that fills its pinpoint and 0.4-2.7% with padding
    on the canvas (the whole padded canvas as base view gave 14-71% and changed greedy answers);
    no greedy answer changed.

    The processor's ``image_sizes`` (the original ``(height, width)``, which fixes the unpadding)
    travel after ``attention_mask``: ``additional_forward_args=(input_ids, attention_mask,
    image_sizes)``; :meth:`processor_inputs` keeps them. :meth:`model_inputs`,
    :meth:`patch_embedding_grid` and occlusion's ``stays`` read them from their ``extra``
    argument, :meth:`image_layout` from the model's forward inside its block (or its
    ``image_sizes`` argument). The unpadding a text's placeholders imply is read back from their
    number (:meth:`geometry`) and checked. One image per example, all of one batch on the same
    canvas.

    Occlusion (``"drop"``) removes, with their placeholders, the tile tokens of the dropped cells
    and every base-view (or pooled) token whose box holds a dropped cell; newlines stay. Windows
    at different places can then drop different numbers of tokens, which one batched forward
    cannot hold: such a batch asks for ``perturbations_per_eval=1`` (ValueError).
    Image-side IG sums the patch embeddings' attributions per cell: a tile patch's in its cell, a
    base-view patch's spread evenly over its box of content-box cells.

    Example:
        >>> adapter = get_adapter(model)                                              # doctest: +SKIP
        >>> inputs = adapter.processor_inputs(processor(images=image, text=prompt, return_tensors="pt"))
        >>> args = (inputs["input_ids"], inputs["attention_mask"], inputs["image_sizes"])  # doctest: +SKIP
        >>> heat = cv.CrossAttentionGradCAM(model).attribute(inputs["pixel_values"], target=t,
        ...                                                  additional_forward_args=args)  # doctest: +SKIP
    """

    family = "llava-next"
    #: no zoo model (so no ranking of its own): LLaVA's, itself the BLIP ranking of the same two
    #: fusion methods (benchmarks/RESULTS.md, "Default methods of explain()")
    default_methods = ("bimodal-relevancy",)
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")
    tasks = {name: "generate" for name in model_classes}
    extra_text_inputs = ("image_sizes",)
    #: the canvas must be one of the grid pinpoints; tiles run at the tower's trained size
    interpolates_positions = False
    #: the tower runs on the base view and each tile apart
    vision_tower_per_view = True

    # ----- geometry ---------------------------------------------------------------------------
    @property
    def tile_size(self) -> int:
        """``S``: the pixels of one tile side (the vision tower's image size)."""
        return int(self.model.config.vision_config.image_size)

    @property
    def _side(self) -> int:
        return self.tile_size // int(self.model.config.vision_config.patch_size)

    @property
    def _pinpoints(self) -> list[tuple[int, int]]:
        return [(int(h), int(w)) for h, w in self.model.config.image_grid_pinpoints]

    @property
    def _max_tiles(self) -> int | None:
        """OneVision's ``anyres_max_N``: tile features are pooled above ``N`` tiles' worth."""
        ratio = getattr(self.model.config, "vision_aspect_ratio", None)
        prefix = "anyres_max_"
        return int(ratio[len(prefix):]) if isinstance(ratio, str) and ratio.startswith(prefix) else None

    def patch_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """The canvas's patch grid; ValueError unless the canvas is one of the grid pinpoints."""
        check_pixel_values(pixel_values)
        size = tuple(int(s) for s in pixel_values.shape[-2:])
        if size not in self._pinpoints:
            raise ValueError(
                f"pixel_values: expected a tile canvas of one of the grid pinpoints {self._pinpoints} "
                f"(height, width), got {size}; use adapter.processor_inputs(processor(...))"
            )
        return super().patch_grid(pixel_values)

    def _with_pooling(self, grid, tiles, kept, content=None) -> AnyresGeometry:
        """The geometry, with OneVision's pooling applied as its ``pack_image_features`` does."""
        top, bottom, left, right = kept
        rows, cols, side = bottom - top, right - left, self._side
        pooled = None
        if self._max_tiles is not None:
            ratio = math.sqrt(rows * cols / (self._max_tiles * side ** 2))
            if ratio > 1.1:
                pooled = (int(rows // ratio), int(cols // ratio))
        patch = self.tile_size // side
        return AnyresGeometry(grid, tiles, side, kept, pooled, content, patch)

    def geometry_of_size(self, image_size: Sequence[int]) -> AnyresGeometry:
        """The geometry of an original image of ``(height, width)`` pixels, as the model computes it
        from ``image_sizes`` (best pinpoint, unpadding, pooling), with its content box: where the
        processor pastes the resized image on the pinpoint canvas (aspect kept, the longer side
        scaled to fit and the other rounded up; padded evenly, the odd pixel after it)."""
        from transformers.image_processing_utils import select_best_resolution

        height, width = (int(s) for s in image_size)
        best = select_best_resolution((height, width), self._pinpoints)
        side, s = self._side, self.tile_size
        tiles = (best[0] // s, best[1] // s)
        h, w = tiles[0] * side, tiles[1] * side
        if width / height > w / h:
            new = int(round(height * (w / width), 7))
            pad = (h - new) // 2
            kept = (pad, h - pad, 0, w)
        else:
            new = int(round(width * (h / height), 7))
            pad = (w - new) // 2
            kept = (0, h, pad, w - pad)
        big_h, big_w = best
        scale_h, scale_w = big_h / height, big_w / width  # (the processor's float steps, for its rounding)
        if scale_w < scale_h:
            new_h, new_w = min(math.ceil(height * scale_w), big_h), big_w
        else:
            new_h, new_w = big_h, min(math.ceil(width * scale_h), big_w)
        top, left = (big_h - new_h) // 2, (big_w - new_w) // 2
        return self._with_pooling((h, w), tiles, kept, (top, top + new_h, left, left + new_w))

    def geometry(self, grid: tuple[int, int], n_tokens: int) -> AnyresGeometry:
        """The geometry of an image on a canvas of patch grid ``grid`` whose text holds
        ``n_tokens`` image placeholders: the unpadding whose token count that is.

        Raises:
            ValueError: no unpadding gives ``n_tokens``, or two do (explain such an image alone
                with the geometry from ``image_sizes``).
        """
        h, w = grid
        side = self._side
        if h % side or w % side:
            raise ValueError(f"pixel_values: the {h}x{w} patch grid is no whole number of {side}x{side} tiles")
        tiles = (h // side, w // side)
        candidates = [(k, h - k, 0, w) for k in range(0, (h + 1) // 2)]
        candidates += [(0, h, k, w - k) for k in range(1, (w + 1) // 2)]
        found = {}
        for kept in candidates:
            geometry = self._with_pooling(grid, tiles, kept)
            if geometry.num_tokens == n_tokens:
                found[geometry.kept] = geometry
        if len(found) != 1:
            full = self._with_pooling(grid, tiles, (0, h, 0, w)).num_tokens
            why = "no unpadding of" if not found else "more than one unpadding of"
            raise ValueError(
                f"input_ids: {n_tokens} image tokens, {why} the {h}x{w} canvas grid gives that number (without "
                f"unpadding it holds {full}); tokenise the image with the model's processor"
            )
        return next(iter(found.values()))

    def _text_geometry(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> AnyresGeometry:
        """The one geometry of every row of ``input_ids`` (ValueError if rows differ)."""
        grid = self.patch_grid(pixel_values)
        counts = self.image_token_positions(input_ids).sum(1).tolist()
        found = [self.geometry(grid, n) for n in counts]
        if len({g.kept for g in found}) != 1:
            raise ValueError(
                f"input_ids: rows hold {counts} image tokens (different unpadding); explain images of one size "
                "together, or one at a time"
            )
        return found[0]

    def num_image_tokens(self, pixel_values: torch.Tensor) -> int:
        """Placeholders for an image that fills its canvas (no unpadding)."""
        h, w = self.patch_grid(pixel_values)
        side = self._side
        return self._with_pooling((h, w), (h // side, w // side), (0, h, 0, w)).num_tokens

    # ----- the model's image inputs ---------------------------------------------------------------
    def processor_inputs(self, outputs: Mapping) -> dict:
        """The processor's outputs with ``pixel_values`` as the tile canvas ``[B, 3, H, W]``
        (the tiles put back in place; the base view dropped, :meth:`model_inputs` recomputes
        it); ``image_sizes`` kept, OneVision's ``batch_num_images`` dropped.

        Raises:
            ValueError: not the processor's tiles, several images per text, canvases of different sizes.
        """
        found = dict(outputs)
        tiles, sizes = found.get("pixel_values"), found.get("image_sizes")
        if not isinstance(tiles, torch.Tensor) or tiles.dim() != 5 or not isinstance(sizes, torch.Tensor):
            raise ValueError(
                "inputs: expected the LLaVA-NeXT processor's tiles pixel_values [B, tiles, 3, S, S] and image_sizes, "
                f"got {type(tiles).__name__} {tuple(getattr(tiles, 'shape', ()))}"
            )
        ids = found.get("input_ids")
        batch_images = found.pop("batch_num_images", None)  # OneVision: the images of each text
        if ids is not None:  # an image is one run of <image> placeholders
            check_one_image_per_text(image_runs(self.image_token_positions(ids)), n_images=tiles.shape[0])
        if batch_images is not None:
            check_one_image_per_text(torch.as_tensor(batch_images).flatten().tolist(), n_images=tiles.shape[0])
        geometries = [self.geometry_of_size(size.tolist()) for size in sizes]
        s = self.tile_size
        check_one_canvas([(a * s, b * s) for a, b in (g.tiles for g in geometries)], f"image_sizes {sizes.tolist()}")
        a, b = geometries[0].tiles
        found["pixel_values"] = tiles_to_canvas(tiles[:, 1 : 1 + a * b], a, b)
        return found

    def content_boxes(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[tuple[int, int, int, int]]:
        """Per example, the canvas pixels ``(top, bottom, left, right)`` its resized image fills
        (from ``image_sizes`` ``[B, 2]``; ``None``: the whole canvas).

        Raises:
            ValueError: an image size whose pinpoint is not this canvas.
        """
        grid = self.patch_grid(pixel_values)
        height, width = pixel_values.shape[-2:]
        if image_sizes is None:
            return [(0, height, 0, width)] * pixel_values.shape[0]
        found = []
        for size in image_sizes.tolist():
            geometry = self.geometry_of_size(size)
            if geometry.grid != grid:
                raise ValueError(f"image_sizes: an image of size {tuple(size)} goes on a canvas of {geometry.tiles} "
                                 f"tiles, pixel_values holds a {tuple(pixel_values.shape[-2:])} canvas")
            found.append(geometry.content)
        return found

    def tiles(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """The canvas ``[B, 3, a*S, b*S]`` as the model's input ``[B, 1 + a*b, 3, S, S]``: the base
        view, then the tiles row by row (differentiable). The base view is each example's content
        box (:meth:`content_boxes`, from ``image_sizes``; ``None``: the whole canvas) resized to
        ``S x S``, bicubic with antialiasing (the processor's resample), so it reads no padding."""
        self.patch_grid(pixel_values)
        s = self.tile_size
        cut = canvas_to_tiles(pixel_values, pixel_values.shape[-2] // s, pixel_values.shape[-1] // s)
        bases = []
        for k, (top, bottom, left, right) in enumerate(self.content_boxes(pixel_values, image_sizes)):
            box = pixel_values[k : k + 1, :, top:bottom, left:right]
            bases.append(box if box.shape[-2:] == (s, s) else
                         F.interpolate(box, size=(s, s), mode="bicubic", align_corners=False, antialias=True))
        return torch.cat([torch.cat(bases)[:, None], cut], 1)

    def model_inputs(self, pixel_values, input_ids=None, attention_mask=None, extra=()) -> dict:
        """The tiles and base view of the canvas; ``extra`` holds ``image_sizes``, which places the
        base view's content box (the model's own ``image_sizes`` comes from
        :meth:`language_kwargs`)."""
        check_pixel_values(pixel_values)
        sizes = tuple(extra)[0] if len(tuple(extra)) else None
        kwargs = {"pixel_values": self.tiles(pixel_values, sizes if isinstance(sizes, torch.Tensor) else None)}
        if input_ids is not None:
            if id(self.model) not in _DROPPING:  # (an occlusion's drop removes placeholders)
                self._text_geometry(pixel_values, input_ids)  # a clear error before the model's own
            kwargs["input_ids"] = input_ids
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return kwargs

    def language_kwargs(self, input_ids: torch.Tensor, extra: Sequence[torch.Tensor | None] = ()) -> dict:
        """``image_sizes`` ``[B, 2]`` (the original heights and widths), checked against the
        placeholders of ``input_ids`` (outside an occlusion's drop).

        Raises:
            ValueError: ``image_sizes`` missing or not ``[B, 2]``, more extra inputs, or a text
                whose placeholders do not match its image.
        """
        extra = tuple(extra)
        if len(extra) > 1:
            raise ValueError(f"additional_forward_args: {type(self.model).__name__} takes (input_ids, attention_mask, "
                             f"image_sizes), got {2 + len(extra)} tensors")
        sizes = extra[0] if extra else None
        if sizes is None:
            raise ValueError(
                f"image_sizes: {type(self.model).__name__} needs the processor's image_sizes [B, 2] after attention_mask: "
                "additional_forward_args=(input_ids, attention_mask, image_sizes)"
            )
        if not isinstance(sizes, torch.Tensor) or tuple(sizes.shape) != (input_ids.shape[0], 2):
            shape = tuple(sizes.shape) if isinstance(sizes, torch.Tensor) else type(sizes).__name__
            raise ValueError(f"image_sizes: expected [{input_ids.shape[0]}, 2] (height, width per example), got {shape}")
        if id(self.model) not in _DROPPING:
            check_image_token_counts(self.image_token_positions(input_ids).sum(1),
                                     [self.geometry_of_size(size).num_tokens for size in sizes.tolist()],
                                     f"image_sizes {sizes.tolist()} (each image's tiles, unpadding and base view)")
        return {"image_sizes": sizes.to(input_ids.device)}

    def patch_embedding_grid(self, layer_attr: torch.Tensor, pixel_values: torch.Tensor, extra=()) -> torch.Tensor:
        """Patch-embedding attributions ``[B * (1 + a*b), D, g, g]`` on the canvas grid
        ``[B, H, W]``: a tile patch's in its cell, a base-view patch's spread evenly over its box
        of content-box cells (``extra``: ``(image_sizes,)``; without it the whole canvas)."""
        (h, w), g = self.patch_grid(pixel_values), self._side
        batch = pixel_values.shape[0]
        a, b = h // g, w // g
        per_patch = layer_attr.sum(1) if layer_attr.dim() == 4 else layer_attr.sum(-1)
        per_patch = per_patch.reshape(batch, 1 + a * b, g, g)
        tiles = per_patch[:, 1:].reshape(batch, a, b, g, g).permute(0, 1, 3, 2, 4).reshape(batch, h, w)
        sizes = tuple(extra)[0] if len(tuple(extra)) else None
        boxes = self.content_boxes(pixel_values, sizes if isinstance(sizes, torch.Tensor) else None)
        spread = torch.stack([self._base_spread((h, w), box).to(per_patch) for box in boxes])  # [B, g*g, H*W]
        base = torch.einsum("bk,bkn->bn", per_patch[:, 0].reshape(batch, -1), spread).reshape(batch, h, w)
        return tiles + base

    def _base_spread(self, grid: tuple[int, int], content: tuple[int, int, int, int]) -> torch.Tensor:
        """``[g*g, H*W]``: each base-view token's equal share over the cells of its box."""
        side = self._side
        geometry = AnyresGeometry(grid, (grid[0] // side, grid[1] // side), side, (0, grid[0], 0, grid[1]),
                                  content=content, patch=self.tile_size // side)
        _, boxes = geometry.boxes()
        spread = torch.zeros(side * side, grid[0], grid[1], dtype=torch.float64)
        for k, (top, left, bottom, right) in enumerate(boxes[: side * side].tolist()):
            spread[k, top:bottom, left:right] = 1.0 / ((bottom - top) * (right - left))
        return spread.reshape(side * side, -1)

    # ----- where the image tokens sit -----------------------------------------------------------
    @contextmanager
    def image_layout(self, pixel_values, input_ids=None, image_sizes=None) -> Iterator[Callable[[], ImageTokenLayout]]:
        """The base-view and tile tokens on the canvas grid (newlines and unpadded cells left out).
        The base-view tokens' boxes lie on the content box, which ``image_sizes`` places: given
        here, or read from the last forward of the model inside the block."""
        if input_ids is None:
            raise ValueError("input_ids: needed to find the image tokens of this model")
        self._text_geometry(pixel_values, input_ids)
        seen = [] if image_sizes is None else [image_sizes]

        def record(module, args, kwargs):
            if kwargs.get("image_sizes") is not None:
                seen.append(kwargs["image_sizes"])

        def layout() -> ImageTokenLayout:
            if not seen:
                raise RuntimeError("image_layout: no forward ran inside the block; pass image_sizes")
            positions = self.image_token_positions(input_ids)
            index = torch.arange(input_ids.shape[1], device=input_ids.device)
            columns, boxes_of = [], []
            for row, size in zip(positions, seen[-1].tolist()):
                image, boxes = self.geometry_of_size(size).boxes()
                columns.append(index[row][image.to(row.device)])
                boxes_of.append(boxes[image])
            return ImageTokenLayout.boxes(torch.stack(columns), self.patch_grid(pixel_values), torch.stack(boxes_of),
                                          input_ids.shape[1])

        handle = self._inner().register_forward_pre_hook(record, with_kwargs=True)
        try:
            yield layout
        finally:
            handle.remove()

    # ----- occlusion without some image tokens ------------------------------------------------
    @staticmethod
    def _dropped(geometry: AnyresGeometry, keep: torch.Tensor) -> torch.Tensor:
        """Per placeholder ``[N]``: dropped, as a token whose box holds a cell where ``keep``
        ``[H, W]`` is False (newlines stay)."""
        image, boxes = geometry.boxes()
        gone = ~(keep.reshape(geometry.grid) > 0.5).cpu()
        dropped = torch.zeros(len(image), dtype=torch.bool)
        for k, (top, left, bottom, right) in enumerate(boxes.tolist()):
            dropped[k] = bool(image[k]) and bool(gone[top:bottom, left:right].any())
        return dropped

    @contextmanager
    def drop_image_tokens(self, keep: torch.Tensor) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """Inside the block the image tokens whose boxes hold a cell where ``keep`` ``[B, H, W]``
        is False leave the language model's input with their placeholders (the vision tower sees
        the whole canvas); restored on exit, also on error."""
        keep = keep > 0.5
        inner, model_key = self._inner(), id(self.model)

        def prepare(module, args, kwargs):
            pixels, sizes = kwargs.get("pixel_values"), kwargs.get("image_sizes")
            if pixels is None or sizes is None or pixels.shape[0] != keep.shape[0]:
                return args, kwargs
            features = module.get_image_features(pixels, sizes, return_dict=True)
            kept = []
            for b, (feature, size) in enumerate(zip(features.pooler_output, sizes.tolist())):
                dropped = self._dropped(self.geometry_of_size(size), keep[b])
                if dropped.shape[0] != feature.shape[0]:
                    raise RuntimeError(f"occlusion: {feature.shape[0]} image features for {dropped.shape[0]} tokens")
                kept.append(feature[~dropped.to(feature.device)])
            features.pooler_output = kept
            return args, {**kwargs, "pixel_values": None, "mm_encoder_outputs": {"image": features}}

        handle = inner.register_forward_pre_hook(prepare, with_kwargs=True)
        _DROPPING[model_key] = keep
        try:
            yield self._stays(keep)
        finally:
            _DROPPING.pop(model_key, None)
            handle.remove()

    def _stays(self, keep: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def stays(input_ids: torch.Tensor, extra=()) -> torch.Tensor:
            positions = self.image_token_positions(input_ids)
            found = torch.ones_like(input_ids, dtype=torch.bool)
            grid = tuple(int(s) for s in keep.shape[-2:])
            sizes = tuple(extra)[0] if len(tuple(extra)) else None
            for b in range(input_ids.shape[0]):
                geometry = (self.geometry_of_size(sizes[b].tolist()) if isinstance(sizes, torch.Tensor)
                            else self.geometry(grid, int(positions[b].sum())))
                columns = positions[b].nonzero()[:, 0]
                found[b, columns[self._dropped(geometry, keep[b]).to(columns.device)]] = False
            counts = (~found).sum(1)
            if not bool((counts == counts[0]).all()):
                raise ValueError(
                    f"perturbations_per_eval: the occlusion windows of one forward drop {counts.tolist()} image "
                    "tokens (a base-view or pooled token covers several cells, so windows at different places "
                    "drop different numbers); pass perturbations_per_eval=1 for this model"
                )
            return found

        return stays

    # ----- generation and the lens -----------------------------------------------------------------
    def lens_sequence(self, input_ids, attention_mask, answer_ids, extra=()):
        (tokens, mask), start = super().lens_sequence(input_ids, attention_mask, answer_ids)
        return (tokens, mask, *[e for e in extra[:1] if e is not None]), start

    def greedy_answer(self, pixel_values, input_ids, attention_mask, max_new_tokens, extra=()):
        return self._greedy(pixel_values, input_ids, attention_mask, max_new_tokens, extra,
                            **self.language_kwargs(input_ids, extra))

    def vision_attentions(self) -> list[nn.Module]:
        """The vision tower's attention runs per tile (and the base view): no one map of the canvas."""
        return []
