"""Adapter for Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP vision tower whose patch
features are average-pooled (``k x k`` patches -> one token, ``config.mm_tokens_per_image`` tokens)
and projected into the placeholders of a Gemma 3 language model, between begin- and end-of-image
tokens, with bidirectional attention among the image tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from captum_vlm.adapters.base import register_adapter
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

    The processor's ``token_type_ids`` (1 on image tokens) are read from ``input_ids`` here, so
    ``additional_forward_args`` is ``(input_ids, attention_mask)`` and the image tokens attend to
    each other both ways, as in the processor's forward. The begin/end-of-image tokens are text.
    The tower runs at its trained size only (the projector pools a fixed patch grid).
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

    def patch_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """The pooled token grid; ValueError unless ``pixel_values`` have the tower's trained size."""
        grid = super().patch_grid(pixel_values)
        config = self.model.config.vision_config
        side = int(config.image_size)
        if tuple(pixel_values.shape[-2:]) != (side, side):
            raise ValueError(
                f"pixel_values: Gemma 3 pools a fixed {side}x{side} input into "
                f"{self.model.config.mm_tokens_per_image} tokens, got {tuple(pixel_values.shape[-2:])}; "
                "use the model's processor"
            )
        return grid

    def language_kwargs(self, input_ids: torch.Tensor, extra: Sequence[torch.Tensor | None] = ()) -> dict:
        """``token_type_ids``: 1 on the image tokens (their bidirectional block), from ``input_ids``."""
        found = super().language_kwargs(input_ids, extra)
        found["token_type_ids"] = self.image_token_positions(input_ids).long()
        return found

    def processor_images(self, image, n_texts: int):
        """One list of images per text (Gemma 3's processor reads a flat list as one text's images)."""
        return [[image] for _ in range(n_texts)]

    def _token_drop_site(self) -> tuple[nn.Module, int]:
        """The projector's output: one row per pooled image token."""
        return self._projector(), 0

    def greedy_answer(self, pixel_values, input_ids, attention_mask, max_new_tokens, extra=()):
        return self._greedy(pixel_values, input_ids, attention_mask, max_new_tokens,
                            **self.language_kwargs(input_ids))
