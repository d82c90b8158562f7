"""Adapter for PaliGemma (``PaliGemmaForConditionalGeneration``): a SigLIP vision tower whose
projected patch features replace the image placeholders in a Gemma language model's input, one
token per patch, under prefix-LM attention (image and prompt see each other both ways)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from captum_vlm.adapters.base import register_adapter
from captum_vlm.adapters.llava import LlavaAdapter


@register_adapter
class PaliGemmaAdapter(LlavaAdapter):
    """PaliGemma (Beyer et al., "PaliGemma: A versatile 3B VLM for transfer", 2024): the SigLIP
    tower has no CLS token, so the image tokens are exactly the patch grid, row by row, at the
    positions where ``input_ids`` hold ``config.image_token_id`` (before the BOS and the prompt).

    Prefix-LM attention: the processor's ``token_type_ids`` are 0 on the prefix (image tokens and
    prompt), which attends both ways, and 1 on the suffix (the answer), which is causal. Pass them
    third in ``additional_forward_args`` ``(input_ids, attention_mask, token_type_ids)``; only
    suffix tokens are then scored (a prefix token sees itself). Without them every token is
    taken as suffix, so the model runs causal everywhere (as transformers' eager attention does
    without them; its sdpa attention would otherwise attend both ways over the whole sequence).
    ``cv.explain`` passes them for the generated answer.
    """

    family = "paligemma"
    model_classes = ("PaliGemmaForConditionalGeneration",)
    tasks = {"PaliGemmaForConditionalGeneration": "generate"}
    #: its forward does not pass ``interpolate_pos_encoding`` to the SigLIP tower
    interpolates_positions = False
    extra_text_inputs = ("token_type_ids",)

    def language_kwargs(self, input_ids: torch.Tensor, extra: Sequence[torch.Tensor | None] = ()) -> dict:
        """``token_type_ids`` as given, else all 1 (causal everywhere, in every attention kernel)."""
        found = super().language_kwargs(input_ids, extra)
        found.setdefault("token_type_ids", torch.ones_like(input_ids))
        return found

    def unscored_positions(self, input_ids: torch.Tensor, extra: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
        """Image placeholders, and the prefix (``token_type_ids == 0``) when they are given."""
        return self.image_token_positions(input_ids) | (self.language_kwargs(input_ids, extra)["token_type_ids"] == 0)

    def lens_sequence(self, input_ids, attention_mask, answer_ids, extra=()):
        """``(tokens, mask, token_type_ids)``: the prompt as prefix, ``answer_ids`` as suffix."""
        tokens = torch.cat([input_ids, answer_ids], 1)
        token_type_ids = torch.cat([torch.zeros_like(input_ids), torch.ones_like(answer_ids)], 1)
        return (tokens, torch.cat([attention_mask, torch.ones_like(answer_ids)], 1), token_type_ids), input_ids.shape[1]

    def greedy_answer(self, pixel_values, input_ids, attention_mask, max_new_tokens, extra=()):
        """Greedy continuation with the whole prompt as the prefix (``token_type_ids`` 0)."""
        return self._greedy(pixel_values, input_ids, attention_mask, max_new_tokens,
                            token_type_ids=torch.zeros_like(input_ids))
