"""Adapter for CLIP (``CLIPModel``): two towers, text pooled at the EOS token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from captum_vlm.adapters.base import VLMAdapter, first_position_of, register_adapter


@register_adapter
class CLIPAdapter(VLMAdapter):
    """CLIP: ViT image tower with a CLS token, causal text tower pooled at EOS.

    The similarity logit is ``logit_scale.exp() * cos(image_embeds, text_embeds)``.
    """

    family = "clip"
    #: shapes-clip: Chefer relevancy (deletion AUC 0.046, pointing 0.970)
    default_methods = ("relevancy",)
    model_classes = ("CLIPModel",)
    tasks = {"CLIPModel": "similarity"}
    two_tower = True
    image_pooling = "cls"
    text_start_tokens = 1  # the BOS token
    similarity_probability = "softmax"

    def vision_model(self) -> nn.Module:
        return self.model.vision_model

    def text_blocks(self) -> list[nn.Module]:
        return list(self.model.text_model.encoder.layers)

    def text_attentions(self) -> list[nn.Module]:
        return [block.self_attn for block in self.text_blocks()]

    def text_embedding(self) -> nn.Module:
        return self.model.text_model.embeddings.token_embedding

    def max_text_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def pooled_text_position(self, input_ids, attention_mask=None) -> torch.Tensor:
        eos = self.model.text_model.eos_token_id
        if eos == 2:  # transformers' legacy rule: the highest token id is the end token
            return input_ids.int().argmax(dim=-1)
        return first_position_of(input_ids, eos, "EOS")

    # ----- two-tower embeddings ------------------------------------------------------------
    def image_embeds(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Projected (unnormalised) image embeddings ``[B, D]``."""
        out = self.model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return self.model.visual_projection(out.pooler_output)

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected (unnormalised) text embeddings ``[K, D]``."""
        out = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.model.text_projection(out.pooler_output)

    def similarity_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Logits per image ``[B, K]`` exactly as the model computes ``logits_per_image``."""
        image = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
        text = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * image @ text.t()

    # ----- joint embedding space (lens) --------------------------------------------------------
    joint_embedding_classes = ("CLIPModel",)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_embeds(pixel_values), dim=-1)

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.text_embeds(input_ids, attention_mask), dim=-1)

    def joint_logit_scale_bias(self) -> tuple[float, float]:
        return float(self.model.logit_scale.detach().exp()), 0.0
