"""Adapter for Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP vision tower whose patch
features are average-pooled (``k x k`` patches -> one token, ``config.mm_tokens_per_image`` tokens)
and projected into the placeholders of a Gemma 3 language model, between begin- and end-of-image
tokens, with bidirectional attention among the image tokens of each block.

**Pan and scan.** With ``do_pan_and_scan=True`` the processor cuts an image wider (or taller) than
``pan_and_scan_min_ratio_to_activate`` into ``n`` side-by-side (or stacked) crops of the original,
resizes each to ``S x S`` (``S`` the tower's ``image_size``) and hands them over after the whole
image resized to ``S x S``: ``pixel_values`` ``[B * (1 + n), 3, S, S]``, and each text holds one
``<start_of_image>`` block of image tokens per view, the whole image's first. Every method here
takes one image tensor per example, the **crop canvas** ``[B, 3, S, n * S]`` (or ``[B, 3, n * S,
S]``): the resized crops side by side, :meth:`Gemma3Adapter.processor_inputs` puts them back
exactly, and :meth:`Gemma3Adapter.model_inputs` cuts them again and recomputes the whole-image
view from the canvas with torch (bilinear with antialias, the processor's resample), so everything
the model sees is a function of one tensor (gradients, IG paths and occlusion reach the crops and
the whole view; a painted region is hidden in both). The canvas is the original image with each
crop stretched to ``S x S``: crop ``c`` covers the original's pixels ``[c * ceil(W / n), (c + 1) *
ceil(W / n))`` (cut at ``W``) and canvas columns ``[c * S, (c + 1) * S)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from captum_vlm._checks import check_pixel_values
from captum_vlm.adapters._canvas import (
    canvas_to_tiles,
    closest_layout,
    tile_token_boxes,
    tiles_to_canvas,
    whole_view_token_boxes,
)
from captum_vlm.adapters.base import register_adapter
from captum_vlm.adapters.layout import ImageTokenLayout
from captum_vlm.adapters.llava import LlavaAdapter

#: models in a pan-and-scan drop_image_tokens block (by id): their texts have lost placeholders
_DROPPING: set[int] = set()


@register_adapter
class Gemma3Adapter(LlavaAdapter):
    """Gemma 3 (Gemma Team, "Gemma 3 Technical Report", 2025), with or without pan and scan.

    The map's grid is the **pooled token grid**: cell ``(i, j)`` of one view is image token ``i * k
    + j`` (the projector's average pool keeps row-major order), and it covers ``p x p`` vision
    patches, so :meth:`patch_size` is the cell's size in pixels (``p`` times the vision patch; 896
    px, patch 14, 256 tokens: 16 x 16 cells of 56 px) and :attr:`patches_per_cell` is ``(p, p)``.
    Methods reading the language model's attention score the tokens directly; image-side IG sums
    its patch-embedding attributions over each cell's patches; occlusion drops whole tokens after
    the pooling (:meth:`drop_image_tokens`), with their placeholders.

    A pan-and-scan **canvas** of ``n`` crops (module docstring) has the grid ``k x n k`` (or ``n k
    x k``): a crop token covers its cell, a whole-view token ``(i, j)`` the ``1 x n`` (or ``n x
    1``) cells its part of the whole view is resized from (its score spread evenly over them,
    :meth:`~captum_vlm.adapters.layout.ImageTokenLayout.boxes`). The placeholders hold the whole
    view's ``k x k`` tokens first, then each crop's, crop by crop. Occlusion (``"drop"``) removes a
    cell's crop token and the whole-view token whose box holds it; windows that cut different
    numbers of whole-view boxes ask for ``perturbations_per_eval=1`` (ValueError). The whole view
    differs slightly from the processor's (a PIL bilinear resize of the 8-bit original image, ours
    of the canvas); ``tests/test_family_gemma3.py`` measures it on a tiny random model. The views
    of the vision tower itself (vision-stream head statistics, probes) refuse a canvas by name:
    the tower runs once per view.

    The processor's ``token_type_ids`` (1 on image tokens) are read from ``input_ids`` here, so
    ``additional_forward_args`` is ``(input_ids, attention_mask)`` and the image tokens of a block
    attend to each other both ways, as in the processor's forward. The begin/end-of-image tokens
    are text. The tower runs at its trained size only (the projector pools a fixed patch grid).
    One image per example; the images of a batch share one crop layout.

    Example:
        >>> processor.images_kwargs = {**processor.images_kwargs, "do_pan_and_scan": True}  # doctest: +SKIP
        >>> inputs = adapter.processor_inputs(processor(images=[[image]], text=[prompt], return_tensors="pt"))
        >>> adapter.patch_grid(inputs["pixel_values"])  # 2 crops of a wide image   # doctest: +SKIP
        (16, 32)
    """

    family = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration",)
    tasks = {"Gemma3ForConditionalGeneration": "generate"}
    #: the projector pools a fixed patch grid
    interpolates_positions = False

    def _projector(self) -> nn.Module:
        return self._inner().multi_modal_projector

    @property
    def patches_per_cell(self) -> tuple[int, int]:
        k = int(self._projector().kernel_size)
        return k, k

    # ----- the view and the canvas ----------------------------------------------------------------
    @property
    def view_size(self) -> int:
        """``S``: the pixels of one view's side (the vision tower's ``image_size``)."""
        return int(self.model.config.vision_config.image_size)

    @property
    def tokens_per_side(self) -> int:
        """``k``: image tokens along each side of one view."""
        return int(self._projector().tokens_per_side)

    def crops(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """The canvas's crops ``(rows, cols)``: ``(1, 1)`` for one view, ``(1, n)`` or ``(n, 1)``
        for a pan-and-scan canvas.

        Raises:
            ValueError: ``pixel_values`` is no ``S x S`` view nor a row or column of them.
        """
        check_pixel_values(pixel_values)
        s = self.view_size
        h, w = (int(d) for d in pixel_values.shape[-2:])
        if h % s or w % s or (h > s and w > s):
            raise ValueError(
                f"pixel_values: Gemma 3 pools a fixed {s}x{s} input into {self.model.config.mm_tokens_per_image} "
                f"tokens per view, got {(h, w)}; a pan-and-scan canvas is a row or a column of {s}x{s} crops. Use "
                "the model's processor and adapter.processor_inputs(...)"
            )
        return h // s, w // s

    def patch_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """The pooled token grid of the view or canvas (``k x k`` per crop); ValueError unless
        ``pixel_values`` is one view or a row or column of views (:meth:`crops`)."""
        (rows, cols), k = self.crops(pixel_values), self.tokens_per_side
        return rows * k, cols * k

    def num_views(self, pixel_values: torch.Tensor) -> int:
        """Views the tower runs on per example: 1, or the whole view and ``n`` crops."""
        rows, cols = self.crops(pixel_values)
        return 1 if rows * cols == 1 else 1 + rows * cols

    def num_image_tokens(self, pixel_values: torch.Tensor) -> int:
        return self.num_views(pixel_values) * self.tokens_per_side ** 2

    def whole_view(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The canvas resized to one view ``[B, 3, S, S]``, bilinear with antialias (differentiable)."""
        s = self.view_size
        return F.interpolate(pixel_values, size=(s, s), mode="bilinear", align_corners=False, antialias=True)

    def views(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's ``pixel_values`` ``[B * views, 3, S, S]``: per example the whole view, then
        the crops (one view: ``pixel_values`` itself)."""
        rows, cols = self.crops(pixel_values)
        if rows * cols == 1:
            return pixel_values
        views = torch.cat([self.whole_view(pixel_values)[:, None], canvas_to_tiles(pixel_values, rows, cols)], 1)
        return views.flatten(0, 1)

    def processor_inputs(self, outputs: Mapping) -> dict:
        """The processor's outputs with a pan-and-scan example's views as its crop canvas
        ``[B, 3, S, n * S]`` or ``[B, 3, n * S, S]`` (exact; ``num_crops`` dropped). Whether the
        crops lie side by side or stacked is the arrangement whose canvas gives back the
        processor's whole view best. One view per example: as they are.

        Raises:
            ValueError: not the processor's ``[B * views, 3, S, S]``, texts whose image tokens do
                not match the views, or examples of different crop layouts in one batch.
        """
        found = dict(outputs)
        found.pop("num_crops", None)
        views, ids, s = found.get("pixel_values"), found.get("input_ids"), self.view_size
        if not isinstance(views, torch.Tensor) or views.dim() != 4 or tuple(views.shape[-2:]) != (s, s):
            raise ValueError(
                f"inputs: expected the Gemma 3 processor's pixel_values [B * views, 3, {s}, {s}], got "
                f"{type(views).__name__} {tuple(getattr(views, 'shape', ()))}"
            )
        if ids is None or views.shape[0] == ids.shape[0]:
            return found
        per_view = self.tokens_per_side ** 2
        counts = self.image_token_positions(ids).sum(1)
        n_views = views.shape[0] // ids.shape[0]
        if views.shape[0] % ids.shape[0] or n_views < 3 or not bool((counts == n_views * per_view).all()):
            raise ValueError(
                f"inputs: {views.shape[0]} views for {ids.shape[0]} texts holding {counts.tolist()} image tokens "
                f"({per_view} per view); captum-vlm explains one image per example (pan and scan: the whole "
                "image and its crops), one crop layout per batch"
            )
        grouped = views.reshape(ids.shape[0], n_views, *views.shape[1:])
        n = n_views - 1
        layouts = {closest_layout(grouped[b : b + 1, 1:], grouped[b : b + 1, 0], [(1, n), (n, 1)], self.whole_view)
                   for b in range(ids.shape[0])}
        if len(layouts) != 1:
            raise ValueError(f"inputs: the images of one batch are cut into crops {sorted(layouts)} (rows, cols); "
                             "explain them one at a time")
        found["pixel_values"] = tiles_to_canvas(grouped[:, 1:], *layouts.pop())
        return found

    def model_inputs(self, pixel_values, input_ids=None, attention_mask=None, extra=()) -> dict:
        """The views of the canvas (:meth:`views`) and the text.

        Raises:
            ValueError: ``pixel_values`` no view or canvas; a text that does not hold one
                placeholder per image token of its views (outside an occlusion's drop).
        """
        kwargs = {"pixel_values": self.views(pixel_values)}
        if input_ids is not None:
            if id(self.model) not in _DROPPING:
                counts = self.image_token_positions(input_ids).sum(1)
                want = self.num_image_tokens(pixel_values)
                if not bool((counts == want).all()):
                    raise ValueError(
                        f"input_ids: the texts hold {counts.tolist()} image tokens but pixel_values "
                        f"{tuple(pixel_values.shape[-2:])} has {self.num_views(pixel_values)} view(s) of {want // self.num_views(pixel_values)} "
                        f"tokens, {want} in all (one image per example; tokenise with the model's processor)"
                    )
            kwargs["input_ids"] = input_ids
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return kwargs

    def language_kwargs(self, input_ids: torch.Tensor, extra: Sequence[torch.Tensor | None] = ()) -> dict:
        """``token_type_ids``: 1 on the image tokens (their bidirectional blocks), from ``input_ids``."""
        found = super().language_kwargs(input_ids, extra)
        found["token_type_ids"] = self.image_token_positions(input_ids).long()
        return found

    def processor_images(self, image, n_texts: int):
        """One list of images per text (Gemma 3's processor reads a flat list as one text's images)."""
        return [[image] for _ in range(n_texts)]

    # ----- where the image tokens sit ----------------------------------------------------------
    def token_boxes(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 4]`` the cell box ``(top, left, bottom, right)`` of each image token in the order
        the model fills the placeholders: the whole view's (a ``rows x cols`` block of cells
        each, on a canvas), then each crop's (one cell each)."""
        return self._token_boxes(*self.crops(pixel_values))

    def _token_boxes(self, rows: int, cols: int) -> torch.Tensor:
        k = self.tokens_per_side
        crops = tile_token_boxes(rows, cols, k)
        return crops if rows * cols == 1 else torch.cat([whole_view_token_boxes(rows, cols, k), crops])

    @contextmanager
    def image_layout(self, pixel_values, input_ids=None) -> Iterator[Callable[[], ImageTokenLayout]]:
        """The image tokens where ``input_ids`` hold them: one view's on its grid, a canvas's
        whole-view and crop tokens on the canvas grid (:meth:`token_boxes`)."""
        if self.num_views(pixel_values) == 1:
            with super().image_layout(pixel_values, input_ids) as layout:
                yield layout
            return
        if input_ids is None:
            raise ValueError("input_ids: needed to find the image tokens of this model")
        found = ImageTokenLayout.boxes_at_positions(self.image_token_positions(input_ids),
                                                    self.patch_grid(pixel_values), self.token_boxes(pixel_values))
        yield lambda: found

    def patch_embedding_grid(self, layer_attr: torch.Tensor, pixel_values: torch.Tensor, extra=()) -> torch.Tensor:
        """Patch-embedding attributions (``[B * views, D, k p, k p]``) summed per image token (its
        ``p x p`` patches) and put on the grid by the layout's rule (a canvas's whole-view tokens
        spread over their boxes)."""
        if self.num_views(pixel_values) == 1:
            return super().patch_embedding_grid(layer_attr, pixel_values, extra)
        b, (p, _), k = pixel_values.shape[0], self.patches_per_cell, self.tokens_per_side
        per_token = layer_attr.sum(1).reshape(b, -1, k, p, k, p).sum(dim=(3, 5)).reshape(b, 1, -1)
        return self._fill_order_layout(b, *self.crops(pixel_values)).to_grid(per_token)[:, 0]

    def _fill_order_layout(self, batch: int, rows: int, cols: int) -> ImageTokenLayout:
        """The layout of a sequence of just the image tokens of a ``rows x cols`` canvas, in fill order."""
        boxes, k = self._token_boxes(rows, cols), self.tokens_per_side
        columns = torch.arange(boxes.shape[0]).expand(batch, -1)
        return ImageTokenLayout.boxes(columns, (rows * k, cols * k), boxes)

    # ----- occlusion without some image tokens -------------------------------------------------
    def _token_drop_site(self) -> tuple[nn.Module, int]:
        """The projector's output: one row per pooled image token."""
        return self._projector(), 0

    @contextmanager
    def drop_image_tokens(self, keep: torch.Tensor) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """Inside the block the model runs without the image tokens whose cells ``keep`` ``[B, h,
        w]`` drops, with their placeholders: one view's cells, or on a canvas a cell's crop token
        and the whole-view token whose box holds it (the tower still sees every view). Restored
        on exit, also on error."""
        _DROPPING.add(id(self.model))
        try:
            with self._dropped_tokens(keep) as stays:
                yield stays
        finally:
            _DROPPING.discard(id(self.model))

    @contextmanager
    def _dropped_tokens(self, keep: torch.Tensor) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        k = self.tokens_per_side
        if keep.shape[-2] == k and keep.shape[-1] == k:
            with super().drop_image_tokens(keep) as stays:
                yield stays
            return
        token_keep = self._fill_order_layout(keep.shape[0], keep.shape[-2] // k, keep.shape[-1] // k).all_cells_kept(keep)

        def hook(module, args, output):
            if output.shape[0] * output.shape[1] != token_keep.numel():
                raise RuntimeError(f"occlusion: {output.shape[0]} views of {output.shape[1]} image tokens for a keep "
                                   f"mask of {tuple(token_keep.shape)} tokens")
            per_example = output.reshape(token_keep.shape[0], token_keep.shape[1], output.shape[-1])
            return per_example[token_keep.to(output.device)][None]

        staying = self._staying_positions(token_keep)

        def stays(input_ids: torch.Tensor, extra=()) -> torch.Tensor:
            found = staying(input_ids, extra)
            counts = (~found).sum(1)
            if not bool((counts == counts[0]).all()):
                raise ValueError(
                    f"perturbations_per_eval: the occlusion windows of one forward drop {counts.tolist()} image "
                    "tokens (a whole-view token covers several cells of the pan-and-scan canvas, so windows at "
                    "different places drop different numbers); pass perturbations_per_eval=1 for this model"
                )
            return found

        handle = self._projector().register_forward_hook(hook)
        try:
            yield stays
        finally:
            handle.remove()

    # ----- the tower itself, generation ---------------------------------------------------------
    def _one_view(self, pixel_values: torch.Tensor, what: str) -> None:
        """ValueError unless ``pixel_values`` is one view (the tower runs once per view of a canvas)."""
        if self.num_views(pixel_values) > 1:
            raise ValueError(
                f"pixel_values: a {tuple(pixel_values.shape[-2:])} pan-and-scan canvas: Gemma 3's vision tower runs "
                f"once per view (the whole image and each crop, each its own sequence), so {what} is not defined "
                "for it (the text stream and the model's answer are); use one view (do_pan_and_scan=False)"
            )

    def vision_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        self._one_view(pixel_values, "the tower's patch grid")
        return super().vision_grid(pixel_values)

    def vision_outputs(self, pixel_values: torch.Tensor, **kwargs):
        self._one_view(pixel_values, "one run of the tower")
        return super().vision_outputs(pixel_values, **kwargs)

    def greedy_answer(self, pixel_values, input_ids, attention_mask, max_new_tokens, extra=()):
        return self._greedy(pixel_values, input_ids, attention_mask, max_new_tokens,
                            **self.language_kwargs(input_ids))
