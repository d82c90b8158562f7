"""Adapter for SigLIP 2 (``Siglip2Model``): SigLIP's two towers with NaFlex variable-resolution
image input.

The processor resizes each image to its own aspect ratio (a whole number of patches, at most
``max_num_patches``) and hands it over as flattened patches ``[B, max_num_patches, C * P * P]``
(padded), a ``pixel_attention_mask`` and ``spatial_shapes`` ``[B, 2]`` (patch rows and columns).
Every map is drawn over the processed image, so the adapter turns those patches back into one
image tensor ``[B, 3, rows * P, cols * P]`` (:meth:`Siglip2Adapter.processor_inputs`, exact: the
patches are a rearrangement of the resized, normalised image) and that image into the model's
inputs again for every forward (:meth:`Siglip2Adapter.model_inputs`), without padding: ``rows *
cols`` patch tokens, the mask all ones, ``spatial_shapes`` read from the image's size. The map grid
is the patch grid ``spatial_shapes`` names.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from captum_vlm._checks import check_pixel_values
from captum_vlm.adapters.base import register_adapter
from captum_vlm.adapters.siglip import SiglipAdapter


@register_adapter
class Siglip2Adapter(SiglipAdapter):
    """SigLIP 2 (Tschannen et al., *SigLIP 2: Multilingual Vision-Language Encoders with Improved
    Semantic Understanding, Localization, and Dense Features*, 2025).

    The vision tower embeds each flattened patch with a linear layer and adds learned position
    embeddings resized (bilinear, antialiased) to the image's patch grid, so any grid is native:
    there is no ``interpolate_pos_encoding`` (a method's flag is accepted and has no effect). The
    rest is SigLIP's: no CLS token, an attention-pooling head, texts pooled at the last position of
    ``padding="max_length"``, sigmoid probabilities. One size per batch (the images of a batch
    share one tensor).

    Example:
        >>> adapter = get_adapter(model)                                   # doctest: +SKIP
        >>> inputs = adapter.processor_inputs(processor(images=image, text=prompts, return_tensors="pt"))
        >>> inputs["pixel_values"].shape, adapter.patch_grid(inputs["pixel_values"])  # doctest: +SKIP
        (torch.Size([1, 3, 32, 56]), (4, 7))
    """

    family = "siglip2"
    #: no zoo model: SigLIP's ranking (the same towers and pooling head)
    default_methods = ("grad-eclip",)
    model_classes = ("Siglip2Model",)
    tasks = {"Siglip2Model": "similarity"}
    any_image_size = True
    #: any patch grid is native (NaFlex): there is no ``interpolate_pos_encoding`` to pass
    interpolates_positions = False
    joint_embedding_classes = ("Siglip2Model",)

    @property
    def _patch(self) -> int:
        return int(self.model.config.vision_config.patch_size)

    @property
    def _channels(self) -> int:
        return int(self.model.config.vision_config.num_channels)

    def patch_size(self) -> tuple[int, int]:
        """The patch (the tower embeds flattened patches with a linear layer, not a convolution)."""
        return self._patch, self._patch

    # ----- the model's image inputs -------------------------------------------------------------
    def processor_inputs(self, outputs: Mapping) -> dict:
        """The processor's outputs with ``pixel_values`` as the resized images ``[B, 3, H, W]``
        (``pixel_attention_mask`` and ``spatial_shapes`` dropped: :meth:`model_inputs` rebuilds
        them).

        Raises:
            ValueError: not the NaFlex outputs, or images of one batch resized to different grids.
        """
        found = dict(outputs)
        flat, shapes = found.get("pixel_values"), found.get("spatial_shapes")
        if not isinstance(flat, torch.Tensor) or flat.dim() != 3 or not isinstance(shapes, torch.Tensor):
            raise ValueError(
                "inputs: expected the SigLIP 2 processor's patches pixel_values [B, max_num_patches, C*P*P] and "
                f"spatial_shapes, got {type(flat).__name__} {tuple(getattr(flat, 'shape', ()))}"
            )
        if flat.shape[-1] != self._channels * self._patch ** 2:
            raise ValueError(f"pixel_values: expected {self._channels}*{self._patch}*{self._patch} values per patch, "
                             f"got {flat.shape[-1]}")
        if not bool((shapes == shapes[0]).all()):
            raise ValueError(
                f"inputs: spatial_shapes {shapes.tolist()}: the images of one batch must share one patch grid "
                "(one aspect ratio); explain them one at a time"
            )
        rows, cols = int(shapes[0, 0]), int(shapes[0, 1])
        found["pixel_values"] = self.unpatchify(flat[:, : rows * cols], rows, cols)
        found.pop("spatial_shapes")
        found.pop("pixel_attention_mask", None)
        return found

    def unpatchify(self, flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Patches ``[B, rows * cols, P * P * C]`` (row-major, each patch row-major with channels
        last, as the processor flattens them) back to images ``[B, C, rows * P, cols * P]``."""
        p, c = self._patch, self._channels
        x = flat.reshape(flat.shape[0], rows, cols, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(flat.shape[0], c, rows * p, cols * p)

    def patchify(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[B, C, H, W]`` (cropped to whole patches) to the model's patches ``[B, h * w,
        P * P * C]`` and ``spatial_shapes`` ``[B, 2]``, as the processor lays them out
        (differentiable)."""
        p = self._patch
        h, w = self.patch_grid(pixel_values)
        b, c = pixel_values.shape[:2]
        x = pixel_values[:, :, : h * p, : w * p].reshape(b, c, h, p, w, p)
        flat = x.permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, p * p * c)
        shapes = torch.tensor([[h, w]] * b, dtype=torch.long, device=pixel_values.device)
        return flat, shapes

    def vision_inputs(self, pixel_values: torch.Tensor) -> dict:
        """The vision tower's keyword inputs for one image tensor: patches, ``spatial_shapes`` and
        an all-ones ``pixel_attention_mask`` (``None`` while :meth:`drop_image_tokens` shortens the
        sequence: nothing is padded, so no token is masked either way)."""
        check_pixel_values(pixel_values)
        flat, shapes = self.patchify(pixel_values)
        mask = None if self._dropping is not None else torch.ones(flat.shape[:2], dtype=torch.long, device=flat.device)
        return {"pixel_values": flat, "pixel_attention_mask": mask, "spatial_shapes": shapes}

    def model_inputs(self, pixel_values, input_ids=None, attention_mask=None, extra=()) -> dict:
        """The forward's inputs: :meth:`vision_inputs` plus the text."""
        kwargs = self.vision_inputs(pixel_values)
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return kwargs

    def vision_outputs(self, pixel_values: torch.Tensor, **kwargs):
        """The vision tower on :meth:`vision_inputs` (``interpolate_pos_encoding`` has no effect:
        every grid is native)."""
        kwargs.pop("interpolate_pos_encoding", None)
        return self.vision_model()(**self.vision_inputs(pixel_values), **kwargs)

    def image_embeds(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Pooled image embeddings ``[B, D]``."""
        return self.vision_outputs(pixel_values).pooler_output

    # occlusion: the base drop_image_tokens, after the embeddings (each kept patch keeps the position
    # embedding of its place in the whole grid), run without pixel_attention_mask (vision_inputs)

    def vision_model(self) -> nn.Module:
        return self.model.vision_model
