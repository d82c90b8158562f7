"""Adapter for InstructBLIP (``InstructBlipForConditionalGeneration``): BLIP-2 whose Q-Former also
reads the instruction, so its queries (the image tokens) depend on the text."""

from __future__ import annotations

from collections.abc import Sequence

import torch
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

    def language_kwargs(self, input_ids: torch.Tensor, extra: Sequence[torch.Tensor | None] = ()) -> dict:
        """The instruction as the Q-Former reads it, required: ``extra`` is
        ``(qformer_input_ids, qformer_attention_mask)``, each ``[B, Q]`` (their own length, not
        ``input_ids``').

        Raises:
            ValueError: either is missing, or they are not integer ``[B, Q]`` tensors alike.
        """
        extra = tuple(extra)
        names = self.extra_text_inputs
        if len(extra) != len(names) or any(value is None for value in extra):
            given = sum(value is not None for value in extra)
            raise ValueError(f"additional_forward_args: {type(self.model).__name__} also needs {', '.join(names)} "
                             f"after (input_ids, attention_mask), got {2 + given} tensors")
        ids, mask = extra
        for name, value in zip(names, extra):
            if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.is_floating_point():
                got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name}: expected an integer tensor [B, Q], got {got}")
        if ids.shape != mask.shape or ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"qformer_input_ids, qformer_attention_mask: expected two [B={input_ids.shape[0]}, Q] "
                             f"tensors alike, got {tuple(ids.shape)} and {tuple(mask.shape)}")
        return {"qformer_input_ids": ids.to(input_ids.device), "qformer_attention_mask": mask.to(input_ids.device)}

    def _instruction(self, extra: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """One prompt's Q-Former inputs ``[1, Q]`` with their padding dropped (empty if not given)."""
        extra = tuple(extra)
        if len(extra) != 2:
            return extra  # language_kwargs says what is missing
        kept = extra[1][0].bool()
        return extra[0][:, kept], extra[1][:, kept]

    def lens_sequence(self, input_ids, attention_mask, answer_ids, extra=()):
        """``(tokens, mask, qformer_input_ids, qformer_attention_mask)``: the prompt, then
        ``answer_ids``; the instruction (``extra``) as given, padding dropped."""
        args, start = super().lens_sequence(input_ids, attention_mask, answer_ids)
        return (*args, *self._instruction(extra)), start

    def greedy_answer(self, pixel_values, input_ids, attention_mask, max_new_tokens, extra=()):
        """Greedy continuation with the instruction (``extra``) given to the Q-Former."""
        return self._greedy(pixel_values, input_ids, attention_mask, max_new_tokens,
                            **self.language_kwargs(input_ids, self._instruction(extra)))

    def bridge_embedding(self) -> nn.Module:
        """The Q-Former's embeddings: the queries and the instruction, layer-normed."""
        return self.model.qformer.embeddings
