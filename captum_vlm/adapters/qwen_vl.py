"""Adapter for Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``): dynamic resolution, 2x2 merged patches, M-RoPE.

The processor hands the image over as flattened patches ``[sum of patches, C * T * P * P]`` plus
``image_grid_thw``. Every map is drawn over the processed image, so the adapter turns those
patches back into one image tensor ``[B, 3, H, W]`` (:meth:`QwenVLAdapter.processor_inputs`, exact:
the patches are a rearrangement of the resized, normalised image, repeated ``T`` times) and the
image tensor into the model's inputs again for every forward (:meth:`QwenVLAdapter.model_inputs`).
The map grid is the grid of *merged* tokens: one language-model image token, one cell of
``merge * patch`` pixels, row by row.
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
    image_runs,
)
from captum_vlm.adapters.base import register_adapter
from captum_vlm.adapters.llava import LlavaAdapter


@register_adapter
class QwenVLAdapter(LlavaAdapter):
    """Qwen2-VL / Qwen2.5-VL (Wang et al., *Qwen2-VL: Enhancing Vision-Language Model's Perception
    of the World at Any Resolution*, 2024; Bai et al., *Qwen2.5-VL Technical Report*, 2025).

    The vision tower embeds ``patch x patch`` patches; its merger joins each ``merge x merge``
    block into one feature that replaces one ``<|image_pad|>`` placeholder of ``input_ids``, in
    row-major order over the merged grid (Qwen2.5-VL's window attention reorders tokens inside
    the tower and restores the order after the merger). The language model's self-attention from
    text positions to those placeholders is its image attention. One image per example. The
    language-model side is LLaVA's (:class:`~captum_vlm.adapters.llava.LlavaAdapter`).

    Example:
        >>> adapter = get_adapter(model)                                   # doctest: +SKIP
        >>> inputs = adapter.processor_inputs(processor(images=image, text=prompt, return_tensors="pt"))
        >>> inputs["pixel_values"].shape, adapter.patch_grid(inputs["pixel_values"])  # doctest: +SKIP
        (torch.Size([1, 3, 56, 84]), (2, 3))
    """

    family = "qwen-vl"
    #: no zoo model (so no ranking of its own): LLaVA's, the joint-sequence family whose
    #: language-model side this is, itself the BLIP ranking of the same two fusion methods
    #: (benchmarks/RESULTS.md, "Default methods of explain()")
    default_methods = ("bimodal-relevancy",)
    model_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration")
    tasks = {name: "generate" for name in model_classes}
    any_image_size = True
    #: any size is native (dynamic resolution): there is no ``interpolate_pos_encoding`` to pass
    interpolates_positions = False

    # ----- vision tower ---------------------------------------------------------------------
    def vision_model(self) -> nn.Module:
        return self._inner().visual

    def vision_blocks(self) -> list[nn.Module]:
        return list(self.vision_model().blocks)

    def vision_attentions(self) -> list[nn.Module]:
        """The vision attention runs packed over ``cu_seqlens`` windows and returns no probabilities."""
        return []

    def patch_embedding(self) -> nn.Module:
        return self.vision_model().patch_embed

    @property
    def _vision_config(self):
        return self.model.config.vision_config

    @property
    def merge(self) -> int:
        """Patches per merged token along each axis (``spatial_merge_size``)."""
        return int(self._vision_config.spatial_merge_size)

    def patch_size(self) -> tuple[int, int]:
        """Pixels of one map-grid cell: one merged token, ``merge * patch`` on each side."""
        side = int(self._vision_config.patch_size) * self.merge
        return side, side

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    # ----- the model's image inputs -------------------------------------------------------------
    def processor_inputs(self, outputs: Mapping) -> dict:
        """The processor's outputs with ``pixel_values`` as the processed images ``[B, 3, H, W]``
        (``image_grid_thw`` and ``mm_token_type_ids`` dropped: :meth:`model_inputs` rebuilds them).

        Raises:
            ValueError: images of different sizes, several images (or a video) per example.
        """
        found = dict(outputs)
        if "pixel_values_videos" in found:
            raise ValueError("inputs: videos are not supported; give one image per example")
        flat, grid = found.get("pixel_values"), found.get("image_grid_thw")
        if not isinstance(flat, torch.Tensor) or flat.dim() != 2 or not isinstance(grid, torch.Tensor):
            raise ValueError(
                "inputs: expected the Qwen-VL processor's flattened pixel_values [patches, C*T*P*P] and "
                f"image_grid_thw, got {type(flat).__name__} {tuple(getattr(flat, 'shape', ()))}"
            )
        ids = found.get("input_ids")
        if ids is not None:  # an image is one run of <|image_pad|> placeholders
            check_one_image_per_text(image_runs(self.image_token_positions(ids)), n_images=grid.shape[0])
        patch = int(self._vision_config.patch_size)
        check_one_canvas([(h * patch, w * patch) for _, h, w in grid.tolist()], f"image_grid_thw {grid.tolist()}")
        if bool((grid[:, 0] != 1).any()):
            raise ValueError(f"inputs: image_grid_thw {grid.tolist()}: expected one temporal patch per image "
                             "(an image, not a video)")
        found["pixel_values"] = self.unpatchify(flat, int(grid[0, 1]), int(grid[0, 2]), grid.shape[0])
        found.pop("image_grid_thw")
        found.pop("mm_token_type_ids", None)
        return found

    def unpatchify(self, flat: torch.Tensor, rows: int, cols: int, batch: int) -> torch.Tensor:
        """Flattened patches ``[batch * rows * cols, C * T * P * P]`` (``rows x cols`` patches
        per image, merge blocks first) back to images ``[batch, C, rows * P, cols * P]``."""
        cfg, m = self._vision_config, self.merge
        c, t, p = int(cfg.in_channels), int(cfg.temporal_patch_size), int(cfg.patch_size)
        x = flat.reshape(batch, rows // m, cols // m, m, m, c, t, p, p)[..., 0, :, :]  # the T copies are equal
        return x.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(batch, c, rows * p, cols * p)

    def patchify(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[B, C, H, W]`` (cropped to whole cells) to the model's flattened patches and
        ``image_grid_thw``, as the processor lays them out (differentiable)."""
        cfg, m = self._vision_config, self.merge
        t, p = int(cfg.temporal_patch_size), int(cfg.patch_size)
        h, w = self.patch_grid(pixel_values)
        b, c = pixel_values.shape[:2]
        x = pixel_values[:, :, : h * m * p, : w * m * p].reshape(b, c, h, m, p, w, m, p)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7).unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
        flat = x.reshape(b * h * w * m * m, c * t * p * p)
        grid = torch.tensor([[1, h * m, w * m]] * b, dtype=torch.long, device=pixel_values.device)
        return flat, grid

    def model_inputs(self, pixel_values, input_ids=None, attention_mask=None, extra=()) -> dict:
        """Flattened patches, ``image_grid_thw`` and the ``mm_token_type_ids`` M-RoPE needs.

        Raises:
            ValueError: a text does not hold one placeholder per cell of its image.
        """
        check_pixel_values(pixel_values)
        flat, grid = self.patchify(pixel_values)
        kwargs = {"pixel_values": flat, "image_grid_thw": grid}
        if input_ids is not None:
            image = self.image_token_positions(input_ids)
            kwargs.update(input_ids=input_ids, mm_token_type_ids=image.long())
            if self._dropping is None:
                h, w = self.patch_grid(pixel_values)
                check_image_token_counts(image.sum(1), h * w, f"the {h}x{w} grid of merged patches of pixel_values")
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return kwargs

    def patch_embedding_grid(self, layer_attr: torch.Tensor, pixel_values: torch.Tensor, extra=()) -> torch.Tensor:
        """Patch-embedding attributions ``[B * patches, D]`` summed per merged cell ``[B, h, w]``."""
        h, w = self.patch_grid(pixel_values)
        return layer_attr.sum(-1).reshape(pixel_values.shape[0], h, w, self.merge ** 2).sum(-1)

    # ----- occlusion without some image tokens -------------------------------------------------
    @contextmanager
    def drop_image_tokens(self, keep: torch.Tensor) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """Inside the block the merged tokens where ``keep`` ``[B, h, w]`` is False leave the
        language model's input with their placeholders (the vision tower still sees the whole
        image, as the merger needs whole blocks); the others keep the M-RoPE positions they have
        in the whole sequence."""
        keep_flat = keep.reshape(keep.shape[0], -1) > 0.5
        grid = (int(keep.shape[-2]), int(keep.shape[-1]))
        inner = self._inner()

        def prepare(module, args, kwargs):
            ids, pixels = kwargs.get("input_ids"), kwargs.get("pixel_values")
            if ids is None or pixels is None or ids.shape[0] != keep_flat.shape[0]:
                return args, kwargs
            features = module.get_image_features(pixels, kwargs["image_grid_thw"], return_dict=True)
            merged = torch.cat(features.pooler_output)
            kept = keep_flat.to(merged.device).reshape(-1)
            if kept.shape[0] != merged.shape[0]:
                raise RuntimeError(f"occlusion: {merged.shape[0]} merged image tokens for a keep mask of "
                                   f"{tuple(keep_flat.shape)}")
            features.pooler_output = (merged[kept],)
            kwargs = {**kwargs, "pixel_values": None, "mm_encoder_outputs": {"image": features}}
            if kwargs.get("position_ids") is None:
                kwargs["position_ids"] = self._kept_positions(ids, kwargs.get("attention_mask"), keep_flat, grid)
            return args, kwargs

        handle = inner.register_forward_pre_hook(prepare, with_kwargs=True)
        with self._dropping_scope(handle, keep_flat) as stays:
            yield stays

    def _kept_positions(
        self, ids: torch.Tensor, mask: torch.Tensor | None, keep_flat: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """M-RoPE positions ``[3, B, L]`` of a sequence whose dropped image placeholders were
        removed: each row rebuilt whole, its positions read by the model's own
        ``get_rope_index``, and the kept columns taken."""
        n, (h, w) = keep_flat.shape[1], grid
        mask = torch.ones_like(ids) if mask is None else mask
        rows = []
        for b in range(ids.shape[0]):
            image = self.image_token_positions(ids[b : b + 1])[0]
            kept = keep_flat[b].to(ids.device)
            k = int(image.sum())
            if k == 0:  # the whole image is gone: positions of the text alone
                full_ids, full_mask, take = ids[b : b + 1], mask[b : b + 1], torch.arange(ids.shape[1])
            else:
                s = int(image.nonzero()[0])
                fill = torch.full((1, n), self.image_token_id, dtype=ids.dtype, device=ids.device)
                full_ids = torch.cat([ids[b : b + 1, :s], fill, ids[b : b + 1, s + k :]], 1)
                full_mask = torch.cat([mask[b : b + 1, :s], torch.ones_like(fill), mask[b : b + 1, s + k :]], 1)
                take = torch.cat([torch.arange(s), s + kept.nonzero()[:, 0].cpu(),
                                  torch.arange(s + n, full_ids.shape[1])])
            thw = torch.tensor([[1, h * self.merge, w * self.merge]], device=ids.device)
            found, _ = self._inner().get_rope_index(
                full_ids, mm_token_type_ids=self.image_token_positions(full_ids).long(),
                image_grid_thw=thw, attention_mask=full_mask)
            rows.append(found[:, :, take.to(found.device)])
        return torch.cat(rows, 1)

    # ----- text side (LLaVA's, plus the vision start / end tokens) ------------------------------
    @property
    def special_token_ids(self) -> set[int]:
        config = self.model.config
        extra = {getattr(config, k, None) for k in ("vision_start_token_id", "vision_end_token_id")}
        return super().special_token_ids | {int(t) for t in extra if isinstance(t, int)}

    def head_projections(self, stream: str) -> list[nn.Module]:
        if stream == "vision":
            raise NotImplementedError(f"{self.family}: the vision attention returns no probabilities")
        return super().head_projections(stream)

    def num_heads(self, stream: str) -> int:
        if stream == "vision":
            return int(self._vision_config.num_heads)
        return super().num_heads(stream)
