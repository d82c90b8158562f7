"""Adapter for ViLT (``ViltForQuestionAnswering``, ``ViltForImageAndTextRetrieval``): one
transformer over the joint sequence ``[text tokens, image CLS, patch tokens]``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from captum_vlm.adapters.base import VLMAdapter, register_adapter


@register_adapter
class ViltAdapter(VLMAdapter):
    """ViLT: text and image tokens share every layer, so each self-attention is also the
    cross-attention. The image part of the sequence starts with an image CLS token.

    ViLT's embedding step samples the order of the patch tokens at random (its
    ``max_image_length`` sampling permutes them even when all are kept); the grid position
    of each image token must therefore be read from that forward (``patch_index``).
    """

    family = "vilt"
    model_classes = ("ViltForQuestionAnswering", "ViltForImageAndTextRetrieval")
    attention_needs_output_flag = True
    two_tower = False

    def vision_blocks(self) -> list[nn.Module]:
        return list(self.model.vilt.encoder.layer)

    def vision_attentions(self) -> list[nn.Module]:
        return [block.attention.attention for block in self.vision_blocks()]

    text_blocks = vision_blocks
    text_attentions = vision_attentions
    cross_attentions = vision_attentions

    def patch_embedding(self) -> nn.Module:
        return self.model.vilt.embeddings.patch_embeddings

    def _patch_conv(self) -> nn.Conv2d:
        return self.model.vilt.embeddings.patch_embeddings.projection

    def text_embedding(self) -> nn.Module:
        return self.model.vilt.embeddings.text_embeddings.word_embeddings

    def max_text_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def pooled_text_position(self, input_ids, attention_mask=None) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], dtype=torch.long)

    def image_sequence_start(self, input_ids: torch.Tensor) -> int:
        """Index of the image CLS token in the joint sequence (= text length)."""
        return int(input_ids.shape[1])

    @contextmanager
    def recorded_patch_index(self) -> Iterator[list[torch.Tensor]]:
        """Record where each image token of the joint sequence sits on the patch grid.

        Inside the block, every call of ViLT's ``embeddings.visual_embed`` appends its
        ``patch_index`` ``[B, P, 2]`` (row, column of the patch behind image token ``1 + p``)
        to the yielded list; the original method is put back on exit, also on error.

        Yields:
            The list of recorded ``patch_index`` tensors, one per forward.

        Example:
            >>> with adapter.recorded_patch_index() as calls:      # doctest: +SKIP
            ...     model(input_ids=ids, pixel_values=pixels)
            >>> calls[-1].shape                                      # doctest: +SKIP
            torch.Size([1, 16, 2])
        """
        embeddings = self.model.vilt.embeddings
        shadowed = vars(embeddings).get("visual_embed")  # an instance attribute set by others
        original = embeddings.visual_embed
        calls: list[torch.Tensor] = []

        def visual_embed(*args, **kwargs):
            out = original(*args, **kwargs)
            calls.append(out[2][0].detach())
            return out

        embeddings.visual_embed = visual_embed
        try:
            yield calls
        finally:
            if shadowed is None:
                del embeddings.visual_embed
            else:
                embeddings.visual_embed = shadowed

    # ----- inside the model (lens) ----------------------------------------------------------------
    def head_projections(self, stream: str) -> list[nn.Module]:
        """The joint encoder's heads (ViLT has one stream; it is what ``vision_blocks`` holds)."""
        if stream == "vision":
            return [block.attention.output.dense for block in self.vision_blocks()]
        return super().head_projections(stream)

    def num_heads(self, stream: str) -> int:
        return int(self.model.config.num_attention_heads)
