"""Adapter for Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP vision tower whose patch
features are average-pooled (``k x k`` patches -> one token, ``config.mm_tokens_per_image`` tokens)
and projected into the placeholders of a Gemma 3 language model, between begin- and end-of-image
tokens, with bidirectional attention among the image tokens.

**Pan and scan** (the processor's ``do_pan_and_scan=True``): an image of a wide or tall aspect
ratio is also cut into ``n >= 2`` crops side by side (one row, or one column), each resized to
the tower's ``S x S``; the model reads the whole image resized to ``S x S`` (the *global view*)
first, then the crops, each view its own block of image tokens. Every method then takes one
image tensor, the **canvas** of the crops ``[B, 3, S, n * S]`` (or ``[B, 3, n * S, S]``):
:meth:`Gemma3Adapter.processor_inputs` puts the processor's crops side by side exactly, and
:meth:`Gemma3Adapter.model_inputs` cuts them from it again and resizes it to ``S x S`` for the
global view with torch (bilinear with antialias, as the processor's resample), so gradients, IG
paths and occlusion reach every view. This global view is the canvas resized, not the original
image resized (the processor's): the two differ where the crops' aspect ratio is not the
canvas' (the last crop is cut to what is left of the image) and by the resize kernel; measured
in ``tests/test_family_gemma3.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from captum_vlm._checks import (
    check_image_token_counts,
    check_one_canvas,
    check_one_image_per_text,
    check_pixel_values,
    image_runs,
)
from captum_vlm.adapters._canvas import (
    canvas_to_tiles,
    closest_tile_layout,
    tile_token_boxes,
    tile_token_keep,
    tiles_to_canvas,
    views_patch_grid,
    whole_view,
)
from captum_vlm.adapters.base import _token_dropper, register_adapter
from captum_vlm.adapters.layout import ImageTokenLayout
from captum_vlm.adapters.llava import LlavaAdapter


@register_adapter
class Gemma3Adapter(LlavaAdapter):
    """Gemma 3 (Gemma Team, "Gemma 3 Technical Report", 2025).

    The map's grid is the **pooled token grid**: cell ``(i, j)`` is image token ``i * w + j`` (the
    projector's average pool keeps row-major order), and it covers ``k x k`` vision patches, so
    :meth:`patch_size` is the cell's size in pixels (``k`` times the vision patch; 896 px, patch
    14, 256 tokens: 16 x 16 cells of 56 px) and :attr:`patches_per_cell` is ``(k, k)``. Methods
    reading the language model's attention score the tokens directly; image-side IG sums its
    patch-embedding attributions over each cell's patches; occlusion drops whole tokens after the
    pooling (:meth:`drop_image_tokens`), with their placeholders.

    A pan-and-scan canvas of ``rows x cols`` crops has ``(rows * t) x (cols * t)`` cells (``t``
    tokens a side per view): a crop's token covers its cell, a global-view token the ``rows x
    cols`` cells its part of the global view was resized from (its score spread evenly over
    them); occlusion drops a cell's crop token and every global token whose box holds it.

    The processor's ``token_type_ids`` (1 on image tokens) are read from ``input_ids`` here, so
    ``additional_forward_args`` is ``(input_ids, attention_mask)`` and the image tokens attend to
    each other both ways, as in the processor's forward. The begin/end-of-image tokens are text.
    The tower runs at its trained size only (the projector pools a fixed patch grid).

    Example:
        >>> raw = processor(images=[[wide]], text=[prompt], return_tensors="pt", do_pan_and_scan=True)  # doctest: +SKIP
        >>> get_adapter(model).processor_inputs(raw)["pixel_values"].shape  # 2 crops  # doctest: +SKIP
        torch.Size([1, 3, 896, 1792])
    """

    family = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration",)
    tasks = {"Gemma3ForConditionalGeneration": "generate"}
    #: the projector pools a fixed patch grid
    interpolates_positions = False
    #: how the global view of a pan-and-scan canvas is resized (``torch.nn.functional.interpolate``)
    global_view_mode: str = "bilinear"

    def _projector(self) -> nn.Module:
        return self._inner().multi_modal_projector

    @property
    def patches_per_cell(self) -> tuple[int, int]:
        k = int(self._projector().kernel_size)
        return k, k

    # ----- views ----------------------------------------------------------------------------------
    @property
    def tile(self) -> int:
        """The side ``S`` in pixels of every view the tower reads (its ``image_size``)."""
        return int(self.model.config.vision_config.image_size)

    @property
    def tokens_per_side(self) -> int:
        """Image tokens along each side of one view."""
        return int(round(int(self.model.config.mm_tokens_per_image) ** 0.5))

    def tiles(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """The canvas' crops ``(rows, cols)``: ``(1, 1)`` for one ``S x S`` image.

        Raises:
            ValueError: ``pixel_values`` are not whole ``S x S`` crops.
        """
        check_pixel_values(pixel_values)
        h, w = pixel_values.shape[-2:]
        s = self.tile
        if h % s or w % s:
            raise ValueError(
                f"pixel_values: Gemma 3 pools fixed {s}x{s} views into {self.model.config.mm_tokens_per_image} "
                f"tokens each; expected {s}x{s} (or a pan-and-scan canvas of whole {s}x{s} crops), got {(h, w)}; "
                "use the model's processor"
            )
        return h // s, w // s

    def panned(self, pixel_values: torch.Tensor) -> bool:
        """``pixel_values`` are a pan-and-scan canvas of several crops (with a global view)."""
        rows, cols = self.tiles(pixel_values)
        return rows * cols > 1

    def patch_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """The canvas' grid of image tokens ``(rows * t, cols * t)`` (``t x t`` for one image)."""
        (rows, cols), t = self.tiles(pixel_values), self.tokens_per_side
        return rows * t, cols * t

    def num_image_tokens(self, pixel_values: torch.Tensor) -> int:
        rows, cols = self.tiles(pixel_values)
        views = rows * cols + 1 if rows * cols > 1 else 1
        return views * self.tokens_per_side ** 2

    def global_view(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The canvas resized to one view, differentiably (:attr:`global_view_mode`, antialias)."""
        return whole_view(pixel_values, self.tile, self.global_view_mode)

    def views(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The views the tower reads ``[B, V, 3, S, S]``: the image itself, or the global view
        and then the crops row by row."""
        rows, cols = self.tiles(pixel_values)
        crops = canvas_to_tiles(pixel_values, rows, cols)
        return crops if rows * cols == 1 else torch.cat([self.global_view(pixel_values)[:, None], crops], 1)

    def vision_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """The tower's patch grid of one image; ValueError for a pan-and-scan canvas (the tower
        runs once per view there, not on the canvas)."""
        self._one_view(pixel_values)
        return super().vision_grid(pixel_values)

    def vision_outputs(self, pixel_values: torch.Tensor, **kwargs):
        self._one_view(pixel_values)
        return super().vision_outputs(pixel_values, **kwargs)

    def _one_view(self, pixel_values: torch.Tensor) -> None:
        if self.panned(pixel_values):
            rows, cols = self.tiles(pixel_values)
            raise ValueError(
                f"pixel_values: a pan-and-scan canvas of {rows}x{cols} crops; Gemma 3's vision tower runs once per "
                f"view (the global view and each crop), not on the canvas, so views of the tower itself take one "
                f"{self.tile}x{self.tile} image (the text stream and the model's answer take the canvas)"
            )

    # ----- the model's image inputs -------------------------------------------------------------
    #: the largest mean |difference| (normalised units) between a canvas' global view and the
    #: processor's for its views to be read as one image's crops (measured gaps: at most 0.061,
    #: ``benchmarks/RESULTS.md``; unrelated pictures differ by far more)
    crops_tolerance: float = 0.2

    def processor_inputs(self, outputs: Mapping) -> dict:
        """The processor's outputs, with a pan-and-scan image's views ``[B * (1 + n), 3, S, S]``
        as the canvas of its ``n`` crops ``[B, 3, S, n * S]`` (or ``n * S`` tall: the side whose
        resize gives back the processor's global view best).

        A text's views are its runs of image placeholders: one run is one image, ``1 + n >= 3``
        runs one image with ``n`` crops (pan and scan makes 2 or more), if its crops resized
        together give back its first view (within :attr:`crops_tolerance`).

        Raises:
            ValueError: several images per text, texts whose images make different canvases.
        """
        found = dict(outputs)
        views, ids = found.get("pixel_values"), found.get("input_ids")
        s = self.tile
        if not isinstance(views, torch.Tensor) or views.dim() != 4 or tuple(views.shape[-2:]) != (s, s):
            raise ValueError(
                f"inputs: expected the Gemma 3 processor's pixel_values [images, 3, {s}, {s}], got "
                f"{type(views).__name__} {tuple(getattr(views, 'shape', ()))}"
            )
        if ids is None:
            return found
        runs = image_runs(self.image_token_positions(ids))
        check_one_image_per_text([1 if r == 1 or r >= 3 else r for r in runs], name="inputs")
        if views.shape[0] != sum(runs):
            raise ValueError(f"inputs: {views.shape[0]} views of images for texts holding {runs} runs of image "
                             "tokens; process each image with its text")
        if all(r == 1 for r in runs):
            return found
        per_text = views.split(runs)
        layouts = [(1, 1) if r == 1 else closest_tile_layout(v[None, 1:], v[None, 0], self.global_view,
                                                             [(1, r - 1), (r - 1, 1)])
                   for v, r in zip(per_text, runs)]
        check_one_canvas([(rows * s, cols * s) for rows, cols in layouts], f"pan and scan's views per text {runs}")
        views = torch.stack(per_text)  # [B, 1 + n, 3, S, S]: one canvas, so as many views per text
        canvas = tiles_to_canvas(views[:, 1:], *layouts[0])
        gaps = (self.global_view(canvas) - views[:, 0]).abs().flatten(1).mean(1)
        if float(gaps.max()) > self.crops_tolerance:
            raise ValueError(
                f"inputs: the views of a text resized together differ from its first view by {float(gaps.max()):.3f} "
                f"(mean, more than crops_tolerance {self.crops_tolerance}): they are not one image's pan-and-scan "
                "crops; captum-vlm explains one image per example"
            )
        found["pixel_values"] = canvas
        return found

    def model_inputs(self, pixel_values, input_ids=None, attention_mask=None, extra=()) -> dict:
        """The image (or a canvas' global view and crops, flattened ``[B * V, 3, S, S]``) and the text.

        Raises:
            ValueError: ``pixel_values`` are not whole views; a text does not hold one
                placeholder per image token.
        """
        views = self.views(pixel_values)
        kwargs = {"pixel_values": views.flatten(0, 1)}
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
            if self._dropping is None:
                check_image_token_counts(self.image_token_positions(input_ids).sum(1),
                                         self.num_image_tokens(pixel_values), self._views_source(pixel_values))
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return kwargs

    def _views_source(self, pixel_values: torch.Tensor) -> str:
        """What makes the image tokens, for the refusals: the image, or the canvas and its views."""
        rows, cols = self.tiles(pixel_values)
        if rows * cols == 1:
            return "the image of pixel_values"
        return f"the {rows}x{cols}-crop canvas of pixel_values (and its global view)"

    # ----- the layout --------------------------------------------------------------------------
    def token_boxes(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 4]`` the cell box ``(top, left, bottom, right)`` of each image token in the order
        the model reads them: the global view's (their ``rows x cols`` blocks), then each crop's."""
        rows, cols = self.tiles(pixel_values)
        return tile_token_boxes(rows, cols, self.tokens_per_side, "first" if rows * cols > 1 else None)

    @contextmanager
    def image_layout(self, pixel_values, input_ids=None) -> Iterator[Callable[[], ImageTokenLayout]]:
        """One image: its tokens row by row; a pan-and-scan canvas: the global view's and the
        crops' tokens on the canvas grid (:meth:`token_boxes`)."""
        if not self.panned(pixel_values):
            with super().image_layout(pixel_values, input_ids) as layout:
                yield layout
            return
        if input_ids is None:
            raise ValueError("input_ids: needed to find the image tokens of this model")
        found = ImageTokenLayout.boxes_at_positions(self.image_token_positions(input_ids), self.patch_grid(pixel_values),
                                                    self.token_boxes(pixel_values), self._views_source(pixel_values))
        yield lambda: found

    def patch_embedding_grid(self, layer_attr: torch.Tensor, pixel_values: torch.Tensor, extra=()) -> torch.Tensor:
        """Patch-embedding attributions summed per image token; a canvas' ``[B * V, D, ., .]``
        put on its grid by the layout's rule (global tokens spread over their boxes)."""
        if not self.panned(pixel_values):
            return super().patch_embedding_grid(layer_attr, pixel_values, extra)
        return views_patch_grid(layer_attr, pixel_values.shape[0], self.tokens_per_side, self.patches_per_cell,
                                self.patch_grid(pixel_values), self.token_boxes(pixel_values))

    # ----- occlusion without some image tokens -------------------------------------------------
    @contextmanager
    def drop_image_tokens(self, keep: torch.Tensor) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """Inside the block the image tokens where ``keep`` ``[B, h, w]`` is False leave the
        language model's input with their placeholders (after the pooling); on a pan-and-scan
        canvas also every global token whose box holds a dropped cell (the tower still reads
        every view)."""
        t = self.tokens_per_side
        one_view = keep.shape[1] == t and keep.shape[2] == t
        token_keep = tile_token_keep(keep, t, None if one_view else "first")
        drop = _token_dropper(token_keep, 0)
        batch = token_keep.shape[0]

        def per_example(module, args, output):  # [B * V, t * t, D] -> the kept [B, kept, D]
            return drop(module, args, output.reshape(batch, -1, output.shape[-1]))

        handle = self._projector().register_forward_hook(per_example)
        with self._dropping_scope(handle, token_keep) as stays:
            yield stays

    def language_kwargs(self, input_ids: torch.Tensor, extra: Sequence[torch.Tensor | None] = ()) -> dict:
        """``token_type_ids``: 1 on the image tokens (their bidirectional block), from ``input_ids``."""
        found = super().language_kwargs(input_ids, extra)
        found["token_type_ids"] = self.image_token_positions(input_ids).long()
        return found

    def processor_images(self, image, n_texts: int):
        """One list of images per text (Gemma 3's processor reads a flat list as one text's images)."""
        return [[image] for _ in range(n_texts)]

    def greedy_answer(self, pixel_values, input_ids, attention_mask, max_new_tokens, extra=()):
        return self._greedy(pixel_values, input_ids, attention_mask, max_new_tokens,
                            **self.language_kwargs(input_ids))
