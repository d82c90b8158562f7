"""Cross-attention Grad-CAM: which image regions each word or generated token relied on."""

from __future__ import annotations

import torch
from torch import nn

from captum_vlm.attr._base import resolve_layers
from captum_vlm.attr._fusion import FusionAttribution, FusionInputs

__all__ = ["CrossAttentionGradCAM", "default_layer"]


def default_layer(n_layers: int, kind: str) -> int:
    """The middle cross-attention layer, ``n_layers // 2``, kept below the last layer for models
    read at one pooled token (``kind`` ``"match"`` or ``"answer"``).

    Example:
        >>> default_layer(12, "match"), default_layer(2, "match"), default_layer(2, "tokens")
        (6, 0, 1)
    """
    layer = n_layers // 2
    if kind in ("match", "answer") and n_layers > 1:
        layer = min(layer, n_layers - 2)
    return layer


class CrossAttentionGradCAM(FusionAttribution):
    """Cross-attention Grad-CAM (Li et al., "Align before Fuse: Vision and Language Representation
    Learning with Momentum Distillation" (ALBEF), NeurIPS 2021; used again by BLIP).

    At one layer where text queries attend to image keys, with ``A`` the attention probabilities
    ``[B, heads, Q, K]`` and ``dA`` the gradient of the explained score::

        cam[q, k] = mean_h( A[h, q, k] * max(dA[h, q, k], 0) )

    read over the image keys (the image CLS/prefix column dropped) on the adapter's patch grid.

    * Match models (BLIP ITM, ViLT retrieval) and ViLT VQA: one score (the match logit; the logit
      of answer ``target``). Token ``q``'s map is row ``q``; :meth:`attribute` returns the mean of
      the rows of all attended text tokens (the whole caption or question).
    * Token models (BLIP captioning and VQA, LLaVA): the teacher-forced log-probability of each
      token ``t`` is explained by its own gradient (tokens share batched backward passes); its
      map is the sum of ``cam`` over all text query rows (earlier positions, or the question for BLIP VQA; LLaVA's image positions
      are not text and are left out). :meth:`attribute` returns the mean over the chosen tokens.

    Where the attention lives: BLIP's ``crossattention`` of the text encoder (ITM, VQA question
    encoder) or the caption decoder; ViLT's joint self-attention (text rows, image columns,
    patch order recovered from the forward); LLaVA's language-model self-attention (text rows,
    image-token columns); BLIP-2 and InstructBLIP: the language model's self-attention to the
    query tokens, each query spread over the patches by the Q-Former's cross-attention weighted
    the same way, ``mean_h(C * max(dC, 0))`` averaged over its cross-attention layers (word ->
    queries -> patches).

    Default layer (:func:`default_layer`): the middle one, ``n_layers // 2``. For BLIP's 12-layer
    text encoder that is layer 6, the default of the Grad-CAM demo in Salesforce's LAVIS; ALBEF's
    demo used layer 8, the third of its six fusion layers. For match models and ViLT VQA it is
    never the last layer: there only the CLS row reaches the head, so every word row would get
    zero gradient (a 2-layer model uses layer 0).

    Shapes: see :mod:`captum_vlm.attr._fusion` -- ``attribute`` gives ``[B, 3, H, W]`` (or the raw
    grid ``[B, h, w]`` with ``return_grid=True``), ``attribute_tokens`` gives one map per token or
    per word.

    Args:
        model: one of ``BlipForImageTextRetrieval``, ``BlipForConditionalGeneration``,
            ``BlipForQuestionAnswering``, ``ViltForQuestionAnswering``,
            ``ViltForImageAndTextRetrieval``, ``LlavaForConditionalGeneration``.
        layer: index into the adapter's ``cross_attentions()`` (negative counts from the end);
            ``None`` for the middle layer.
        interpolate_pos_encoding: pass through to the vision tower (BLIP, LLaVA, PaliGemma at
            another size than the trained one).

    Example:
        >>> explainer = CrossAttentionGradCAM(blip_itm)                                # doctest: +SKIP
        >>> heat = explainer.attribute(pixel_values, additional_forward_args=(ids, mask))  # doctest: +SKIP
        >>> words = explainer.attribute_tokens(pixel_values, additional_forward_args=(ids, mask),  # doctest: +SKIP
        ...                                    word_ids=encoding.word_ids(), return_grid=True)
    """

    def __init__(self, model: nn.Module, layer: int | None = None, interpolate_pos_encoding: bool = False):
        super().__init__(model, interpolate_pos_encoding=interpolate_pos_encoding)
        n_layers = len(self.adapter.cross_attentions())
        if layer is None:
            layer = default_layer(n_layers, self.kind)
        if isinstance(layer, (list, tuple)):
            raise TypeError(f"layer: expected one int (a single cross-attention layer), got {layer!r}")
        self.layer = resolve_layers(layer, n_layers, name="layer")[0]

    def _modules(self) -> list[nn.Module]:
        return [self.adapter.cross_attentions()[self.layer]]

    def _row_maps(self, attentions: list[torch.Tensor], grads: list[torch.Tensor], inputs: FusionInputs) -> torch.Tensor:
        return (attentions[0].float() * grads[0].float().clamp(min=0)).mean(dim=1)  # float32 for half models

    def _reduce_rows(self, rows: torch.Tensor, inputs: FusionInputs, position: int | None) -> torch.Tensor:
        text = inputs.query_mask.to(rows.dtype)[:, : rows.shape[1], None]
        summed = (rows[:, : text.shape[1]] * text).sum(dim=1)
        if position is not None:
            return summed
        return summed / text.sum(dim=1).clamp_min(1)
