"""Adapter for ViLT (``ViltForQuestionAnswering``, ``ViltForImageAndTextRetrieval``): one
transformer over the joint sequence ``[text tokens, image CLS, patch tokens]``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from captum_vlm.adapters.base import VLMAdapter, register_adapter
from captum_vlm.adapters.layout import ImageTokenLayout

_EMBEDDING_ARGS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "pixel_mask",
                   "inputs_embeds", "image_embeds")


@register_adapter
class ViltAdapter(VLMAdapter):
    """ViLT: text and image tokens share every layer, so each self-attention is also the
    cross-attention. The image part of the sequence starts with an image CLS token.

    ViLT's embedding step samples the order of the patch tokens at random (its
    ``max_image_length`` sampling permutes them even when all are kept); the grid position
    of each image token must therefore be read from that forward (``patch_index``).
    """

    family = "vilt"
    #: no ranked zoo model: the BLIP ranking (the same two fusion methods)
    default_methods = ("bimodal-relevancy",)
    model_classes = ("ViltForQuestionAnswering", "ViltForImageAndTextRetrieval")
    tasks = {"ViltForQuestionAnswering": "answer_label", "ViltForImageAndTextRetrieval": "match"}
    attention_needs_output_flag = True
    image_stream = "joint"
    text_start_tokens = 1  # CLS

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

    @contextmanager
    def image_layout(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None
    ) -> Iterator[Callable[[], ImageTokenLayout]]:
        """The joint sequence is ``[text, image CLS, patches]`` with the patches in the order the
        forward inside the block sampled them (read from its ``patch_index``)."""
        if input_ids is None:
            raise ValueError("input_ids: needed to find the image tokens of this model")
        grid, start = self.patch_grid(pixel_values), self.image_sequence_start(input_ids) + 1

        with self.recorded_patch_index() as calls:

            def layout() -> ImageTokenLayout:
                if not calls:
                    raise RuntimeError("image_layout: no forward ran inside the block")
                index = calls[-1]
                cells = index[..., 0] * grid[1] + index[..., 1]
                columns = torch.arange(index.shape[1], device=index.device) + start
                return ImageTokenLayout(grid, columns.expand_as(cells), cells, start + index.shape[1])

            yield layout

    @contextmanager
    def drop_image_tokens(self, keep: torch.Tensor) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """ViLT's embeddings sample and shuffle the patch tokens, so the dropped ones are found
        by their ``patch_index`` and masked out of attention, which removes them for every other
        token."""
        keep_flat = keep.reshape(keep.shape[0], -1) > 0.5
        handle = self.model.vilt.embeddings.register_forward_pre_hook(
            _patch_masker(keep_flat, tuple(keep.shape[-2:])), with_kwargs=True
        )
        try:
            yield self._staying_positions(keep_flat)
        finally:
            handle.remove()


    # ----- inside the model (lens) ----------------------------------------------------------------
    def head_projections(self, stream: str) -> list[nn.Module]:
        """The joint encoder's heads (ViLT has one stream; it is what ``vision_blocks`` holds)."""
        if stream == "vision":
            return [block.attention.output.dense for block in self.vision_blocks()]
        return super().head_projections(stream)

    def num_heads(self, stream: str) -> int:
        return int(self.model.config.num_attention_heads)

def _patch_masker(keep: torch.Tensor, grid: tuple[int, int]):
    """Forward pre-hook on ``ViltEmbeddings``: embed the patches itself, then mask the occluded
    ones (found by ``patch_index``, as ViLT shuffles them) out of attention."""
    keep_grid = keep.view(keep.shape[0], *grid)

    def hook(module, args, kwargs):
        named = dict(zip(_EMBEDDING_ARGS, args))
        named.update(kwargs)
        x, x_mask, (patch_index, _) = module.visual_embed(
            named["pixel_values"], named["pixel_mask"], max_image_length=module.config.max_image_length
        )
        rows = torch.arange(x.shape[0], device=x.device)[:, None]
        kept = keep_grid[rows, patch_index[..., 0], patch_index[..., 1]]
        x_mask = x_mask.clone()
        x_mask[:, 1:] = x_mask[:, 1:] * kept.to(x_mask.dtype)
        named.update(image_embeds=x, pixel_mask=x_mask)
        return (), named

    return hook
