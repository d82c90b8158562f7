"""Adapter for InstructBLIP (``InstructBlipForConditionalGeneration``): BLIP-2 whose Q-Former also
reads the instruction, so its queries (the image tokens) depend on the text."""

from __future__ import annotations

from torch import nn

from captum_vlm.adapters.base import register_adapter
from captum_vlm.adapters.blip2 import Blip2Adapter


@register_adapter
class InstructBlipAdapter(Blip2Adapter):
    """InstructBLIP (Dai et al., "InstructBLIP: Towards General-purpose Vision-Language Models with
    Instruction Tuning", NeurIPS 2023).

    As BLIP-2 (query image tokens, the Q-Former's cross-attention as the bridge to the patches),
    and the Q-Former's self-attention runs over the queries followed by the instruction's tokens
    (``qformer_input_ids``, tokenised by the processor's ``qformer_tokenizer``): the forward takes
    ``(input_ids, attention_mask, qformer_input_ids, qformer_attention_mask)`` as
    ``additional_forward_args`` (:attr:`extra_text_inputs`). Only the queries cross-attend.

    Example:
        >>> inputs = processor(images=image, text="what is this?", return_tensors="pt")  # doctest: +SKIP
        >>> args = tuple(inputs[k] for k in ("input_ids", "attention_mask",               # doctest: +SKIP
        ...                                  "qformer_input_ids", "qformer_attention_mask"))
    """

    family = "instructblip"
    model_classes = ("InstructBlipForConditionalGeneration",)
    tasks = {"InstructBlipForConditionalGeneration": "generate"}
    extra_text_inputs = ("qformer_input_ids", "qformer_attention_mask")

    def bridge_embedding(self) -> nn.Module:
        """The Q-Former's embeddings: the queries and the instruction, layer-normed."""
        return self.model.qformer.embeddings
