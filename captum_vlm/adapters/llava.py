"""Adapter for LLaVA (``LlavaForConditionalGeneration``): a CLIP-style vision tower whose
projected patch features replace the image placeholder tokens in the language model's input."""

from __future__ import annotations

import torch
from torch import nn

from captum_vlm.adapters.base import VLMAdapter, register_adapter


@register_adapter
class LlavaAdapter(VLMAdapter):
    """LLaVA: image features are written into the positions where ``input_ids`` hold
    ``config.image_token_id``; the language model's self-attention from text positions to those
    positions is its image attention. With ``vision_feature_select_strategy="default"`` the CLS
    feature is dropped, so the image tokens are exactly the patch grid, row by row.
    """

    family = "llava"
    #: no ranked zoo model: the BLIP ranking (the same two fusion methods); PaliGemma and Gemma 3 inherit it
    default_methods = ("bimodal-relevancy",)
    model_classes = ("LlavaForConditionalGeneration",)
    tasks = {"LlavaForConditionalGeneration": "generate"}
    image_stream = "joint"
    image_pooling = "none"
    image_tokens_in_input_ids = True

    def _inner(self) -> nn.Module:
        return self.model.model

    def vision_model(self) -> nn.Module:
        tower = self._inner().vision_tower
        return getattr(tower, "vision_model", tower)

    @property
    def num_prefix_tokens(self) -> int:
        has_cls = hasattr(self.vision_model().embeddings, "class_embedding")
        return 1 if has_cls else 0

    def text_blocks(self) -> list[nn.Module]:
        return list(self._inner().language_model.layers)

    def text_attentions(self) -> list[nn.Module]:
        return [block.self_attn for block in self.text_blocks()]

    cross_attentions = text_attentions

    def text_embedding(self) -> nn.Module:
        return self._inner().language_model.embed_tokens

    def max_text_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def pooled_text_position(self, input_ids, attention_mask=None) -> torch.Tensor:
        """The last attended position (the one that predicts the next token)."""
        if attention_mask is None:
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long)
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values

    def final_norm(self) -> nn.Module:
        return self._inner().language_model.norm

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def image_token_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == self.image_token_id

    # ----- inside the model (lens) ----------------------------------------------------------------
    def decoder_blocks(self) -> list[nn.Module]:
        return self.text_blocks()

    def lens_sequence(self, input_ids, attention_mask, answer_ids, extra=()):
        tokens = torch.cat([input_ids, answer_ids], 1)
        return (tokens, torch.cat([attention_mask, torch.ones_like(answer_ids)], 1)), input_ids.shape[1]

    def greedy_answer(self, pixel_values, input_ids, attention_mask, max_new_tokens, extra=()):
        return self._greedy(pixel_values, input_ids, attention_mask, max_new_tokens)

    def _greedy(self, pixel_values, input_ids, attention_mask, max_new_tokens, extra=(), **model_kwargs):
        """``generate`` greedily (``model_kwargs`` passed on), the new tokens up to the end token."""
        generated = self.model.generate(**self.model_inputs(pixel_values, input_ids, attention_mask, extra),
                                        max_new_tokens=max_new_tokens, do_sample=False, **model_kwargs)
        new = generated[:, input_ids.shape[1]:]
        eos = self.model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        if eos is None:
            return new
        hits = (new[0] == eos).nonzero()
        return new[:, : int(hits[0]) + 1] if len(hits) else new

    def head_projections(self, stream: str) -> list[nn.Module]:
        if stream in ("text", "cross"):
            return [block.self_attn.o_proj for block in self.text_blocks()]
        return super().head_projections(stream)
