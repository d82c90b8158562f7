"""Bi-modal relevancy propagation (Chefer et al. 2021) for fusion models."""

from __future__ import annotations

import torch
from torch import nn

from captum_vlm._checks import check_choice
from captum_vlm.attr._fusion import FusionAttribution, FusionInputs, averaged_gradient_attention

__all__ = ["BimodalRelevancy", "normalised_self_relevancy"]

IMAGE_RELEVANCY = ("vision", "identity")


def normalised_self_relevancy(relevancy: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The paper's normalisation of a self-relevancy map before a co-attention step:
    ``R_bar = rownorm(R - I) + I`` (each row of ``R - I`` scaled to sum 1; all-zero rows stay 0).

    Args:
        relevancy: ``[B, N, N]``, identity plus non-negative additions.

    Returns:
        ``[B, N, N]``.

    Example:
        >>> normalised_self_relevancy(torch.tensor([[[3., 2.], [0., 1.]]]))
        tensor([[[1.5000, 0.5000],
                 [0.0000, 1.0000]]])
    """
    eye = torch.eye(relevancy.shape[-1], dtype=relevancy.dtype, device=relevancy.device)
    residual = relevancy - eye
    return residual / residual.sum(dim=-1, keepdim=True).clamp_min(eps) + eye


class BimodalRelevancy(FusionAttribution):
    """Relevancy propagation of Chefer, Gur and Wolf, "Generic Attention-model Explainability for
    Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021.

    Every recorded attention map becomes ``A_bar = E_h[(grad * A)^+]`` (rule 5: gradient of the
    explained score times the attention, positive part, mean over heads). Relevancy maps start as
    identities (within a modality) and zeros (across) and are updated layer by layer, first to last:

    * self-attention over tokens s (rules 6-7): ``R_ss += A_bar R_ss`` and ``R_sq += A_bar R_sq``;
    * co-attention of queries s over keys q (rules 10-11):
      ``R_sq += R_bar_ss^T A_bar R_bar_qq`` and ``R_ss += A_bar R_qs``, with the normalisation
      of eqs. 8-9, ``R_bar = rownorm(R - I) + I`` (:func:`normalised_self_relevancy`).

    Which rules apply per family:

    * BLIP (ITM, captioning): the image self-relevancy ``R_ii`` comes first, either propagated
      through the vision tower's self-attention with rule 6 (``image_relevancy="vision"``, the
      default) or fixed at the identity (``"identity"``). Then each text layer applies the
      self-attention rules to the text (``R_tt``, ``R_ti``) and the co-attention rule 10 for its
      cross-attention (text queries, image keys). Rule 11 adds ``A_bar R_it`` with ``R_it = 0``:
      BLIP's image never attends to the text, so ``R_tt`` gets nothing from it.
    * ViLT, LLaVA: one joint sequence, so only the self-attention rule over every layer,
      ``R += A_bar R``; the text rows are read over the image columns (ViLT's patch order recovered
      from the forward; LLaVA's image-token positions). LLaVA's vision tower is not propagated:
      its image tokens count as the inputs.
    * Learned query image tokens (BLIP-2): the language model's self-attention rule gives the
      text rows' relevancy over the query columns; each query's relevancy over the patches comes
      from the Q-Former as BLIP's text does from its encoder: its self-attention rules over the
      queries (and any instruction after them) and rule 10 for its cross-attention to the vision
      tokens, whose self-relevancy is propagated through the vision tower (``image_relevancy``).
      A text row's map is its query relevancy times the queries' patch relevancy; chaining the
      two relevancies is our extension, as for BLIP VQA below.
    * ``BlipForQuestionAnswering``: image, question and answer are three token sets. The question
      encoder gives ``R_qi`` as for ITM (its text is the question). The answer decoder then applies
      the self-attention rules to the answer (``R_aa``, ``R_ai``) and, for its cross-attention of
      answer queries over the question encoder's output tokens, rule 10 with those keys'
      relevancy over the image in place of ``R_bar_qq``:
      ``R_ai += R_bar_aa^T A_bar R_qi``. The paper has no rule for keys that are themselves a
      fusion of two inputs; chaining through ``R_qi`` is our extension of rule 10.

    Read-out (columns: image tokens, image CLS dropped): for match models and ViLT VQA, token
    ``q``'s map is row ``q`` of the text-to-image relevancy and :meth:`attribute` returns the row of
    the token the head reads (position 0, CLS); for token models the map of token ``t`` is row
    ``t - 1`` (the position that predicts it) under the gradient of its own log-probability, and
    :meth:`attribute` returns the mean over the chosen tokens.

    Shapes: as :class:`CrossAttentionGradCAM` (``[B, 3, H, W]``, ``return_grid=True`` for
    ``[B, h, w]``; ``attribute_tokens`` for one map per token or word).

    Args:
        model: ``BlipForImageTextRetrieval``, ``BlipForConditionalGeneration``,
            ``BlipForQuestionAnswering``, ``ViltForQuestionAnswering``,
            ``ViltForImageAndTextRetrieval`` or ``LlavaForConditionalGeneration``.
        image_relevancy: BLIP only: ``"vision"`` (propagate through the vision tower) or
            ``"identity"``; ``None`` means ``"vision"`` for BLIP.
        interpolate_pos_encoding: pass through to the vision tower (BLIP, LLaVA, PaliGemma at
            another size than the trained one).

    Example:
        >>> explainer = BimodalRelevancy(blip_itm)                                      # doctest: +SKIP
        >>> heat = explainer.attribute(pixel_values, additional_forward_args=(ids, mask))   # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, image_relevancy: str | None = None, interpolate_pos_encoding: bool = False):
        super().__init__(model, interpolate_pos_encoding=interpolate_pos_encoding)
        self.two_streams = self.adapter.image_stream == "cross"  # a separate image stream
        self.queries = self.adapter.image_tokens == "queries"  # a vision tower behind a bridge
        if image_relevancy is not None and not (self.two_streams or self.queries):
            raise ValueError(
                f"image_relevancy: only models with a separate image stream take it; "
                f"{type(self.model).__name__} has one joint sequence, leave it None"
            )
        if image_relevancy is None:
            image_relevancy = "vision"
        check_choice(image_relevancy, IMAGE_RELEVANCY, "image_relevancy")
        self.image_relevancy = image_relevancy

    def _modules(self) -> list[nn.Module]:
        if not self.two_streams:
            return self.adapter.text_attentions()
        vision = self.adapter.vision_attentions() if self.image_relevancy == "vision" else []
        modules = vision + self.adapter.text_attentions() + self.adapter.cross_attentions()
        if self.takes_answer_ids:
            modules += self.adapter.answer_self_attentions() + self.adapter.answer_cross_attentions()
        return modules

    def _bridge_modules(self) -> list[nn.Module]:
        if not self.queries:
            return []
        vision = self.adapter.vision_attentions() if self.image_relevancy == "vision" else []
        return vision + [s for s, _ in self.adapter.bridge_blocks()] + self.adapter.bridge_attentions()

    def _bridge(self, attentions: list[torch.Tensor], grads: list[torch.Tensor], inputs: FusionInputs) -> torch.Tensor:
        """The queries' relevancy over the vision tokens through the Q-Former, ``[B, S, K]``."""
        a_bar = [averaged_gradient_attention(a, g) for a, g in zip(attentions, grads)]
        blocks = self.adapter.bridge_blocks()
        n_cross = sum(cross is not None for _, cross in blocks)
        n_vision = len(a_bar) - len(blocks) - n_cross
        vision, own, cross = a_bar[:n_vision], a_bar[n_vision : n_vision + len(blocks)], iter(a_bar[n_vision + len(blocks) :])
        per_layer = [next(cross) if c is not None else None for _, c in blocks]
        batch, n = own[0].shape[0], next(c for c in per_layer if c is not None).shape[-1]
        r_ii = _self_attention_relevancy(vision) if vision else _eye(batch, n, own[0])
        return _co_attention_relevancy(own, per_layer, normalised_self_relevancy(r_ii))

    def _row_maps(self, attentions: list[torch.Tensor], grads: list[torch.Tensor], inputs: FusionInputs) -> torch.Tensor:
        a_bar = [averaged_gradient_attention(a, g) for a, g in zip(attentions, grads)]
        if not self.two_streams:
            return _self_attention_relevancy(a_bar)
        n_answer = len(self.adapter.answer_self_attentions()) if self.takes_answer_ids else 0
        if n_answer:
            a_bar, answer = a_bar[: -2 * n_answer], a_bar[-2 * n_answer :]
        n_text = len(self.adapter.text_attentions())
        n_vision = len(a_bar) - 2 * n_text
        vision, text, cross = a_bar[:n_vision], a_bar[n_vision : n_vision + n_text], a_bar[n_vision + n_text :]
        batch, _, n = cross[0].shape
        r_ii = _self_attention_relevancy(vision) if vision else _eye(batch, n, cross[0])
        r_ti = _co_attention_relevancy(text, cross, normalised_self_relevancy(r_ii))
        if not n_answer:
            return r_ti
        return _co_attention_relevancy(answer[:n_answer], answer[n_answer:], r_ti)

    def _reduce_rows(self, rows: torch.Tensor, inputs: FusionInputs, position: int | None) -> torch.Tensor:
        batch = torch.arange(rows.shape[0], device=rows.device)
        if position is None:
            pooled = self.adapter.pooled_text_position(inputs.input_ids, inputs.attention_mask).to(rows.device)
            return rows[batch, pooled.long()]
        return rows[:, position - 1]


def _eye(batch: int, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device).expand(batch, n, n).clone()


def _self_attention_relevancy(a_bar: list[torch.Tensor]) -> torch.Tensor:
    """Rule 6 over a stack of self-attention layers: ``R = I; R += A_bar R`` for each."""
    batch, n, _ = a_bar[0].shape
    relevancy = _eye(batch, n, a_bar[0])
    for a in a_bar:
        relevancy = relevancy + a @ relevancy
    return relevancy


def _co_attention_relevancy(
    self_attention: list[torch.Tensor], co_attention: list[torch.Tensor | None], key_relevancy: torch.Tensor
) -> torch.Tensor:
    """Relevancy of the query tokens s over the inputs behind the keys, through layers that each
    self-attend over s and then co-attend to the keys: ``R_ss, R_sk`` start at ``I, 0``; per layer
    ``R_ss += A_bar R_ss``, ``R_sk += A_bar R_sk`` (rules 6-7), then
    ``R_sk += R_bar_ss^T A_bar_co key_relevancy`` (rule 10).

    Args:
        self_attention: ``A_bar`` of each layer's self-attention ``[B, S, S]``.
        co_attention: ``A_bar`` of each layer's co-attention ``[B, S', Q]`` (``None``: the layer
            has none); only the first ``S' <= S`` tokens co-attend (a Q-Former's queries, not
            the instruction after them), the other rows count as zeros.
        key_relevancy: the keys' relevancy over their inputs ``[B, Q, N]``.

    Returns:
        ``R_sk`` ``[B, S, N]``.
    """
    batch, s, _ = self_attention[0].shape
    r_ss = _eye(batch, s, self_attention[0])
    r_sk = self_attention[0].new_zeros(batch, s, key_relevancy.shape[-1])
    for a_ss, a_sq in zip(self_attention, co_attention):
        r_ss, r_sk = r_ss + a_ss @ r_ss, r_sk + a_ss @ r_sk  # rules 6-7
        if a_sq is None:
            continue
        if a_sq.shape[1] < s:
            a_sq = torch.cat([a_sq, a_sq.new_zeros(batch, s - a_sq.shape[1], a_sq.shape[2])], 1)
        r_sk = r_sk + normalised_self_relevancy(r_ss).transpose(-1, -2) @ a_sq @ key_relevancy  # rule 10
    return r_sk
