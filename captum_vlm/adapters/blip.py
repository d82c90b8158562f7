"""Adapter for BLIP (retrieval/ITM, captioning, VQA): ViT image tower and a BERT-style text
encoder/decoder whose layers cross-attend to the image tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from captum_vlm.adapters.base import VLMAdapter, register_adapter


@register_adapter
class BlipAdapter(VLMAdapter):
    """BLIP: CLS-prefixed ViT; text pooled at CLS (position 0).

    Cross-attention to the image lives in ``text_encoder.encoder.layer[i].crossattention``
    (ITM, VQA question encoder) or ``text_decoder.bert.encoder.layer[i].crossattention``
    (captioning). For VQA the answer decoder attends to the question encoder, not the image,
    so :meth:`cross_attentions` returns the question encoder's; the decoder's own attention is
    reached through the ``answer_*`` accessors (VQA only).
    """

    family = "blip"
    #: shapes-blip-itm / -vqa: bi-modal relevancy (pointing 0.830 / 0.752 against Grad-CAM 0.733 / 0.596)
    default_methods = ("bimodal-relevancy",)
    model_classes = ("BlipForImageTextRetrieval", "BlipForConditionalGeneration", "BlipForQuestionAnswering")
    tasks = {
        "BlipForImageTextRetrieval": "match",
        "BlipForConditionalGeneration": "caption",
        "BlipForQuestionAnswering": "answer_tokens",
    }
    image_stream = "cross"
    text_start_tokens = 1  # CLS (ITM) or the decoder's BOS

    def vision_model(self) -> nn.Module:
        return self.model.vision_model

    def fusion_text_model(self) -> nn.Module:
        """The BERT-style text model whose layers cross-attend to the image."""
        if hasattr(self.model, "text_encoder"):
            return self.model.text_encoder
        return self.model.text_decoder.bert

    def text_blocks(self) -> list[nn.Module]:
        return list(self.fusion_text_model().encoder.layer)

    def text_attentions(self) -> list[nn.Module]:
        return [block.attention.self for block in self.text_blocks()]

    def cross_attentions(self) -> list[nn.Module]:
        return [block.crossattention.self for block in self.text_blocks()]

    def text_embedding(self) -> nn.Module:
        return self.fusion_text_model().embeddings.word_embeddings

    def max_text_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def pooled_text_position(self, input_ids, attention_mask=None) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], dtype=torch.long)

    # ----- VQA answer decoder --------------------------------------------------------------------
    def answer_decoder(self) -> nn.Module:
        """``BlipForQuestionAnswering`` only: the BERT-style answer decoder, whose self-attention
        runs over the answer tokens and whose cross-attention attends to the question encoder's
        output (not to the image).

        Raises:
            NotImplementedError: the model has no answer decoder (ITM, captioning).
        """
        if not (hasattr(self.model, "text_encoder") and hasattr(self.model, "text_decoder")):
            raise NotImplementedError(f"blip: {type(self.model).__name__} has no answer decoder (VQA only)")
        return self.model.text_decoder.bert

    def answer_self_attentions(self) -> list[nn.Module]:
        """Self-attention modules of :meth:`answer_decoder` (answer rows, answer columns)."""
        return [block.attention.self for block in self.answer_decoder().encoder.layer]

    def answer_cross_attentions(self) -> list[nn.Module]:
        """Cross-attention modules of :meth:`answer_decoder` (answer rows, question-encoder columns)."""
        return [block.crossattention.self for block in self.answer_decoder().encoder.layer]

    def answer_embedding(self) -> nn.Module:
        """The answer decoder's token-embedding module."""
        return self.answer_decoder().embeddings.word_embeddings

    # ----- inside the model (lens) ----------------------------------------------------------------
    def _decoder(self) -> nn.Module:
        if not self.has_decoder:
            raise NotImplementedError(f"blip: {type(self.model).__name__} has no language decoder")
        return self.model.text_decoder

    def decoder_blocks(self) -> list[nn.Module]:
        return list(self._decoder().bert.encoder.layer)

    def final_norm(self) -> nn.Module:
        """BERT blocks are post-norm: nothing between the last block and the LM head."""
        self._decoder()
        return nn.Identity()

    def lm_head(self) -> nn.Module:
        """``text_decoder.cls``: the transform (dense, GELU, LayerNorm) and the vocabulary layer."""
        return self._decoder().cls

    def lens_sequence(self, input_ids, attention_mask, answer_ids, extra=()):
        self._decoder()
        if self.takes_answer_ids:  # [start] answer...; the start token is set by the target
            start = torch.full_like(answer_ids[:, :1], self.model.config.text_config.bos_token_id)
            return (input_ids, attention_mask, torch.cat([start, answer_ids], 1)), 1
        # captioning: the prompt without its final [SEP] (as generate() does), then the answer
        prompt, mask = input_ids[:, :-1], attention_mask[:, :-1]
        tokens = torch.cat([prompt, answer_ids], 1)
        return (tokens, torch.cat([mask, torch.ones_like(answer_ids)], 1)), prompt.shape[1]

    def greedy_answer(self, pixel_values, input_ids, attention_mask, max_new_tokens, extra=()):
        generated = self.model.generate(pixel_values=pixel_values, input_ids=input_ids,
                                        attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                        do_sample=False)
        new = generated[:, 1:] if self.takes_answer_ids else generated[:, input_ids.shape[1] - 1:]
        return _through_first(new, self.model.config.text_config.sep_token_id)

    def head_projections(self, stream: str) -> list[nn.Module]:
        if stream == "vision":
            return [block.self_attn.projection for block in self.vision_blocks()]
        if stream == "text":
            return [block.attention.output.dense for block in self.text_blocks()]
        if stream == "cross":
            return [block.crossattention.output.dense for block in self.text_blocks()]
        return super().head_projections(stream)


    # ----- joint embedding space (lens): the ITM model's contrastive heads ----------------------
    joint_embedding_classes = ("BlipForImageTextRetrieval",)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``vision_proj`` of the CLS state, unit-normalised (``use_itm_head=False``'s image side)."""
        hidden = self.model.vision_model(pixel_values=pixel_values).last_hidden_state
        return F.normalize(self.model.vision_proj(hidden[:, 0, :]), dim=-1)

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``text_proj`` of the text-only encoder's CLS state, unit-normalised."""
        hidden = self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.model.text_proj(hidden[:, 0, :]), dim=-1)

    def joint_logit_scale_bias(self) -> tuple[float, float]:
        return 1.0, 0.0  # itm_score with use_itm_head=False is the plain cosine

def _through_first(tokens: torch.Tensor, end_id: int) -> torch.Tensor:
    """``tokens[:, :i+1]`` up to the first ``end_id`` (all of them if none), for one row."""
    hits = (tokens[0] == end_id).nonzero()
    return tokens[:, : int(hits[0]) + 1] if len(hits) else tokens
