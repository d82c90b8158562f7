"""Adapter for Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration``,
``SmolVLMForConditionalGeneration``): the image split into tiles plus a global view, pixel shuffle,
a Llama-style language model.

The processor resizes the image to a **tile canvas** (a whole number of ``T x T`` tiles, ``T`` the
vision tower's ``image_size``), cuts it into ``rows x cols`` tiles (row by row) and appends a
**global view**, the canvas resized to ``T x T``; pixel values ``[B, tiles + 1, 3, T, T]``. A
canvas of one tile (or ``do_image_splitting=False``) is the single image, without global view.
Each tile's ``(T / P)^2`` patches are pixel-shuffled: one language-model image token per block of
``s x s`` patches (``s = config.scale_factor``), ``k = T / (P s)`` tokens a side, row by row; the
tokens fill the ``<image>`` placeholders, tile after tile and the global view last, between the
text tokens ``<fake_token_around_image>``, ``<row_i_col_j>`` and ``<global-img>``.

Every method takes one image tensor, the **canvas** ``[B, 3, rows * T, cols * T]``:
:meth:`Idefics3Adapter.processor_inputs` reassembles it exactly from the tiles, and
:meth:`Idefics3Adapter.model_inputs` cuts the tiles from it again and recomputes the global view
from it with torch (``interpolate``, bicubic with antialias, the nearest to the processor's
Lanczos), so everything the model sees is a function of one tensor: gradients, IG paths and
occlusion reach the tiles and the global view, and a painted region is hidden in both. This global
view differs slightly from the processor's (a PIL Lanczos resize of the 8-bit canvas). Measured on
tiny random models (``benchmarks/idefics3_global_view.py``, results in ``benchmarks/RESULTS.md``;
3 seeds, a smooth picture and noise, 2 x 3 and 3 x 2 tiles): the global view's pixels differ by at
most 0.167 (normalised units, range [-1, 1]), the logits by at most 0.13 of the largest |logit| over
all positions (0.004 at the prompt's last position), and no greedy 5-token answer changed. Not
measured on a trained checkpoint (none is available offline).

A view that is exactly zero everywhere is taken by the model for batch padding and left out, so
such a view gets ``1e-30`` in one value (no float32 or float64 output changes).
Occlusion (``"drop"``) removes a cell's tile token and every global token whose box holds a dropped
cell (the region leaves both streams); ``"paint"`` paints the canvas, so the global view is painted
too.

The map grid is the canvas' grid of image tokens, ``(rows * k) x (cols * k)`` cells of ``P s``
pixels: a tile token covers its cell; a global-view token covers the ``rows x cols`` block of
cells its part of the global view was resized from (its score spread evenly over them,
:meth:`~captum_vlm.adapters.layout.ImageTokenLayout.boxes`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from captum_vlm._checks import (
    check_image_token_counts,
    check_one_canvas,
    check_one_image_per_text,
    check_pixel_values,
    image_run_starts,
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
from captum_vlm.adapters.base import register_adapter
from captum_vlm.adapters.layout import ImageTokenLayout
from captum_vlm.adapters.llava import LlavaAdapter


@register_adapter
class Idefics3Adapter(LlavaAdapter):
    """Idefics3 (Laurençon et al., *Building and better understanding vision-language models:
    insights and future directions*, 2024) and SmolVLM (Marafioti et al., *SmolVLM: Redefining
    small and efficient multimodal models*, 2025): a SigLIP-style tower per tile, a pixel-shuffle
    connector, a causal language model. One image per example; the images of a batch share one
    canvas size (one tile layout).

    Example:
        >>> adapter = get_adapter(model)                                          # doctest: +SKIP
        >>> inputs = adapter.processor_inputs(processor(images=[[image]], text=[prompt], return_tensors="pt"))
        >>> inputs["pixel_values"].shape, adapter.patch_grid(inputs["pixel_values"])  # doctest: +SKIP
        (torch.Size([1, 3, 1024, 1536]), (16, 24))
    """

    family = "idefics3"
    #: no zoo model: LLaVA's ranking (the same language-model attention methods)
    default_methods = ("bimodal-relevancy",)
    model_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    tasks = {name: "generate" for name in model_classes}
    #: the canvas is a whole number of tiles, and the tower has no interpolate_pos_encoding
    interpolates_positions = False
    #: how the global view is resized from the canvas (``torch.nn.functional.interpolate``)
    global_view_mode: str = "bicubic"
    #: the tower runs on each tile and the global view apart
    vision_tower_per_view = True

    # ----- modules -----------------------------------------------------------------------------
    def vision_model(self) -> nn.Module:
        return self._inner().vision_model

    def _language(self) -> nn.Module:
        return self._inner().text_model

    def text_blocks(self) -> list[nn.Module]:
        return list(self._language().layers)

    def text_attentions(self) -> list[nn.Module]:
        return [block.self_attn for block in self.text_blocks()]

    cross_attentions = text_attentions

    def text_embedding(self) -> nn.Module:
        return self._language().embed_tokens

    def final_norm(self) -> nn.Module:
        return self._language().norm

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    # ----- sizes -------------------------------------------------------------------------------
    @property
    def tile(self) -> int:
        """The tile side ``T`` in pixels (the vision tower's ``image_size``)."""
        return int(self.model.config.vision_config.image_size)

    @property
    def scale(self) -> int:
        """Patches per image token along each axis (pixel shuffle's ``scale_factor``)."""
        return int(self.model.config.scale_factor)

    @property
    def patches_per_cell(self) -> tuple[int, int]:
        return self.scale, self.scale

    @property
    def tokens_per_side(self) -> int:
        """Image tokens along each side of one tile, ``k = T / (P s)``."""
        return self.tile // (int(self.model.config.vision_config.patch_size) * self.scale)

    def tiles(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """The canvas' tiles ``(rows, cols)``; ValueError unless it is a whole number of tiles."""
        check_pixel_values(pixel_values)
        h, w = pixel_values.shape[-2:]
        t = self.tile
        if h % t or w % t:
            raise ValueError(
                f"pixel_values: {type(self.model).__name__} takes a canvas of whole {t}x{t} tiles, got "
                f"{(h, w)}; use adapter.processor_inputs(processor(...))"
            )
        return h // t, w // t

    def patch_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """The canvas' grid of image tokens ``(rows * k, cols * k)``."""
        (rows, cols), k = self.tiles(pixel_values), self.tokens_per_side
        return rows * k, cols * k

    def has_global_view(self, pixel_values: torch.Tensor) -> bool:
        """Split into several tiles (a single-tile canvas is the image itself, no global view)."""
        rows, cols = self.tiles(pixel_values)
        return rows * cols > 1

    def num_image_tokens(self, pixel_values: torch.Tensor) -> int:
        rows, cols = self.tiles(pixel_values)
        views = rows * cols + (1 if rows * cols > 1 else 0)
        return views * self.tokens_per_side ** 2

    # ----- the model's image inputs -------------------------------------------------------------
    def global_view(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The canvas resized to one tile, differentiably (:attr:`global_view_mode`, antialias)."""
        return whole_view(pixel_values, self.tile, self.global_view_mode)

    def views(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's ``pixel_values`` ``[B, views, 3, T, T]``: the tiles row by row, then the
        global view (none for a single-tile canvas). The model takes a view that is exactly zero
        everywhere for batch padding and leaves it out; such a view (an IG baseline, a tile painted
        over whole) gets ``1e-30`` in one value, which changes no output in float32 or float64."""
        rows, cols = self.tiles(pixel_values)
        tiles = canvas_to_tiles(pixel_values, rows, cols)
        views = tiles if rows * cols == 1 else torch.cat([tiles, self.global_view(pixel_values)[:, None]], 1)
        return _not_padding(views)

    def processor_inputs(self, outputs: Mapping) -> dict:
        """The processor's outputs with ``pixel_values`` as the tile canvas ``[B, 3, rows * T,
        cols * T]`` (``pixel_attention_mask`` dropped: :meth:`model_inputs` rebuilds it). The tile
        layout is read from ``rows`` / ``cols`` where given, else per image it is the one whose
        canvas gives back the processor's global view best (the factorisations of the tile count
        are few).

        Raises:
            ValueError: not these processor outputs; a text with other than one image
                (:meth:`images_per_text`) or placeholders that do not match its canvas; images of
                different canvas sizes in one batch (padded views, or different tile layouts).
        """
        found = dict(outputs)
        views = found.get("pixel_values")
        t = self.tile
        if not isinstance(views, torch.Tensor) or views.dim() != 5 or tuple(views.shape[-2:]) != (t, t):
            raise ValueError(
                f"inputs: expected the {type(self.model).__name__} processor's pixel_values [B, views, 3, {t}, {t}], "
                f"got {type(views).__name__} {tuple(getattr(views, 'shape', ()))}"
            )
        ids = found.get("input_ids")
        if ids is not None:
            check_one_image_per_text(self.images_per_text(ids))
        mask = found.pop("pixel_attention_mask", None)
        padded = (views.flatten(2) == 0).all(-1)
        if mask is not None:
            padded |= ~mask.flatten(2).bool().any(-1)
        if bool(padded.any()):
            raise ValueError(
                f"inputs: the processor padded examples {padded.any(1).nonzero()[:, 0].tolist()} with empty views "
                f"(their images have fewer tiles than the {views.shape[1]} views of the largest); the images of one "
                "batch must share one canvas size; explain them one at a time"
            )
        n = views.shape[1]
        if n == 1:
            found["pixel_values"] = views[:, 0]
        else:
            rows, cols = self._tile_layout(found, views)
            found["pixel_values"] = tiles_to_canvas(views[:, : n - 1], rows, cols)
        found.pop("rows", None)
        found.pop("cols", None)
        if ids is not None:
            self._check_image_tokens(found["pixel_values"], ids, name="inputs")
        return found

    def images_per_text(self, input_ids: torch.Tensor) -> list[int]:
        """The images each text holds, read from the tokens that open its runs of ``<image>``
        placeholders: one run per view, opened by the view's own marker (``<row_i_col_j>`` for a
        tile, ``<global-img>`` for the global view or an unsplit image). Every image ends with a
        run opened by ``<global-img>``, so a text's images are the runs opened by the marker of its
        last run."""
        found = []
        for row, start in zip(input_ids, image_run_starts(self.image_token_positions(input_ids))):
            columns = start.nonzero()[:, 0]
            markers = row[(columns - 1).clamp(min=0)]
            found.append(int((markers == markers[-1]).sum()) if len(markers) else 0)
        return found

    def _tile_layout(self, found: Mapping, views: torch.Tensor) -> tuple[int, int]:
        """The one tile layout of the batch: from ``rows`` / ``cols`` where given, else per
        example the one whose canvas gives back the processor's global view best
        (:func:`~captum_vlm.adapters._canvas.closest_tile_layout`).

        Raises:
            ValueError: the examples have different layouts.
        """
        rows, cols, t = found.get("rows"), found.get("cols"), self.tile
        if rows is not None and cols is not None:
            rows, cols = torch.as_tensor(rows).flatten().tolist(), torch.as_tensor(cols).flatten().tolist()
            check_one_canvas([(r * t, c * t) for r, c in zip(rows, cols)], f"rows {rows}, cols {cols}")
            return rows[0], cols[0]
        layouts = [closest_tile_layout(views[b : b + 1, :-1], views[b : b + 1, -1], self.global_view)
                   for b in range(views.shape[0])]
        check_one_canvas([(r * t, c * t) for r, c in layouts], "the processor's tiles and global views")
        return layouts[0]

    def model_inputs(self, pixel_values, input_ids=None, attention_mask=None, extra=()) -> dict:
        """The tiles and the global view cut and resized from the canvas, their (all-ones)
        ``pixel_attention_mask``, and the text.

        Raises:
            ValueError: the canvas is not whole tiles; a text does not hold one placeholder per
                image token of the canvas.
        """
        views = self.views(pixel_values)
        mask = torch.ones(views.shape[0], views.shape[1], *views.shape[-2:], dtype=torch.long, device=views.device)
        kwargs = {"pixel_values": views, "pixel_attention_mask": mask}
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
            if self._dropping is None:
                self._check_image_tokens(pixel_values, input_ids)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return kwargs

    def _check_image_tokens(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, name: str = "input_ids") -> None:
        """ValueError (naming ``name``) unless every text holds one placeholder per image token of the canvas."""
        check_image_token_counts(self.image_token_positions(input_ids).sum(1), self.num_image_tokens(pixel_values),
                                 self._views_source(pixel_values), name)

    def _views_source(self, pixel_values: torch.Tensor) -> str:
        """What makes the image tokens, for the refusals: the canvas and its views."""
        rows, cols = self.tiles(pixel_values)
        views = " (tiles and global view)" if rows * cols > 1 else ""
        return f"the {rows}x{cols}-tile canvas of pixel_values{views}"

    # ----- the layout --------------------------------------------------------------------------
    def token_boxes(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 4]`` the cell box ``(top, left, bottom, right)`` of each image token, in the
        order the model fills the placeholders: tile tokens (one cell each), then global tokens
        (the ``rows x cols`` cells their part of the global view comes from)."""
        rows, cols = self.tiles(pixel_values)
        return tile_token_boxes(rows, cols, self.tokens_per_side, "last" if rows * cols > 1 else None)

    @contextmanager
    def image_layout(self, pixel_values, input_ids=None) -> Iterator[Callable[[], ImageTokenLayout]]:
        """Tile and global-view tokens where ``input_ids`` hold the placeholders, on the canvas grid."""
        if input_ids is None:
            raise ValueError("input_ids: needed to find the image tokens of this model")
        found = ImageTokenLayout.boxes_at_positions(self.image_token_positions(input_ids), self.patch_grid(pixel_values),
                                                    self.token_boxes(pixel_values), self._views_source(pixel_values))
        yield lambda: found

    def patch_embedding_grid(self, layer_attr: torch.Tensor, pixel_values: torch.Tensor, extra=()) -> torch.Tensor:
        """Patch-embedding attributions ``[B * views, D, T/P, T/P]`` summed per image token (its
        ``s x s`` patches) and put on the canvas grid by the layout's rule (global tokens spread
        over their boxes)."""
        return views_patch_grid(layer_attr, pixel_values.shape[0], self.tokens_per_side, self.patches_per_cell,
                                self.patch_grid(pixel_values), self.token_boxes(pixel_values))

    # ----- occlusion without some image tokens -------------------------------------------------
    def token_keep(self, keep: torch.Tensor) -> torch.Tensor:
        """Which image tokens stay ``[B, N]`` for a keep mask on the canvas grid ``[B, h, w]``: a
        tile token with its cell, a global token while every cell of its box stays (a dropped
        region leaves both streams)."""
        k = self.tokens_per_side
        one_tile = keep.shape[1] == k and keep.shape[2] == k
        return tile_token_keep(keep, k, None if one_tile else "last")

    @contextmanager
    def drop_image_tokens(self, keep: torch.Tensor) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """Inside the block the image tokens :meth:`token_keep` drops leave the language model's
        input with their placeholders (the tower still sees every tile and the global view)."""
        token_keep = self.token_keep(keep)

        def prepare(module, args, kwargs):
            ids, pixels = kwargs.get("input_ids"), kwargs.get("pixel_values")
            if ids is None or pixels is None or ids.shape[0] != token_keep.shape[0]:
                return args, kwargs
            features = module.get_image_features(pixels, kwargs.get("pixel_attention_mask"), return_dict=True)
            tokens = list(features.pooler_output)
            if len(tokens) != token_keep.shape[0] or tokens[0].shape[0] != token_keep.shape[1]:
                raise RuntimeError(f"occlusion: {[f.shape[0] for f in tokens]} image tokens per example for a keep "
                                   f"mask of {tuple(token_keep.shape)} tokens")
            features.pooler_output = [f[token_keep[b].to(f.device)] for b, f in enumerate(tokens)]
            kwargs = {**kwargs, "pixel_values": None, "pixel_attention_mask": None,
                      "mm_encoder_outputs": {"image": features}}
            return args, kwargs

        handle = self._inner().register_forward_pre_hook(prepare, with_kwargs=True)
        with self._dropping_scope(handle, token_keep) as stays:
            yield stays

    # ----- the processor -----------------------------------------------------------------------
    def processor_images(self, image, n_texts: int):
        """One list of images per text (one image each)."""
        return [[image] for _ in range(n_texts)]

    def head_projections(self, stream: str) -> list[nn.Module]:
        if stream == "vision":
            return [block.self_attn.out_proj for block in self.vision_blocks()]
        return super().head_projections(stream)


def _not_padding(views: torch.Tensor) -> torch.Tensor:
    """``views`` ``[B, V, C, T, T]`` with ``1e-30`` added to the first value of each view that is
    zero everywhere (differentiable; the others unchanged)."""
    empty = (views.flatten(2) == 0).all(-1)
    if not bool(empty.any()):
        return views
    corner = torch.zeros_like(views[0, 0])
    corner[0, 0, 0] = 1e-30
    return views + empty[..., None, None, None].to(views.dtype) * corner
