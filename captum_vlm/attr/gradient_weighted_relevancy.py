"""Gradient-weighted attention relevancy (Chefer et al., 2021)."""

from __future__ import annotations

import torch
from torch import nn

from captum_vlm.attr._base import ImageAttribution, resolve_layers

__all__ = ["GradientWeightedRelevancy"]


class GradientWeightedRelevancy(ImageAttribution):
    """Relevancy from gradient-weighted attention (Chefer, Gur & Wolf, "Generic Attention-model
    Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021).

    Per layer from ``start_layer`` on: ``Abar = mean_heads((dlogit/dA * A)^+)`` with the gradient of
    prompt k's similarity logit; relevancy starts as the identity and accumulates
    ``R <- R + Abar @ R``. The map is the pooled token's row of ``R`` over the patches. For SigLIP
    the pooled row is the attention-pooling head's: the map is the head's ``Abar`` (probe row)
    times ``R``.

    Args:
        model: ``CLIPModel`` or ``SiglipModel``.
        start_layer: first vision layer to accumulate (negative counts from the end); 0 is the
            paper's rule through every layer (the most faithful on the zoo's CLIP,
            ``benchmarks/RESULTS.md``); ``-1`` (last layer only) is the default of the authors'
            CLIP notebook (Transformer-MM-Explainability) and costs about what Grad-ECLIP does.
        interpolate_pos_encoding: for inputs of another size than the trained one.

    Example:
        >>> GradientWeightedRelevancy(model).attribute(pixel_values, target=0,   # doctest: +SKIP
        ...                                            additional_forward_args=(ids, mask))
    """

    def __init__(self, model: nn.Module, start_layer: int = 0, interpolate_pos_encoding: bool = False):
        super().__init__(model, interpolate_pos_encoding=interpolate_pos_encoding)
        self.start_layer = resolve_layers(start_layer, self.n_vision_layers, name="start_layer")[0]

    def _patch_maps(self, pixel_values, input_ids, attention_mask, targets):
        layers = list(range(self.start_layer, self.n_vision_layers))
        probs, grads = self._attention_pass(pixel_values, input_ids, attention_mask, layers, targets,
                                           stacked=True)
        first = self.adapter.num_prefix_tokens
        # R = (I + Abar_last) ... (I + Abar_start) and only the pooled token's row is read, so the
        # row is carried down from the top (row <- row + row @ Abar): n^2 per layer, not n^3,
        # for all prompts at once ([P, B, 1, n]).
        weighted = [g.mul(a).clamp_(min=0).mean(dim=2) for a, g in zip(probs, grads)]
        if self.pools_with_head:
            row = weighted[-1]  # the pooling head's probe row
        else:
            row = torch.zeros_like(weighted[0][..., :1, :])
            row[..., 0] = 1.0
        for abar in reversed(weighted[: len(layers)]):
            row = row + row @ abar
        maps = row[..., 0, :] if self.pools_with_head else row[..., 0, first:]
        return maps.transpose(0, 1)
