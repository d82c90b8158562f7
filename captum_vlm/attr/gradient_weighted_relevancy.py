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
            paper's; ``-1`` (last layer only) is what several CLIP demos use.
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
        probs, grads = self._attention_pass(pixel_values, input_ids, attention_mask, layers, targets)
        first = self.adapter.num_prefix_tokens
        maps = []
        for column in grads:
            weighted = [torch.relu(g * a).mean(dim=1) for g, a in zip(column, probs)]
            n = weighted[0].shape[-1]
            relevancy = torch.eye(n, dtype=weighted[0].dtype, device=weighted[0].device).expand_as(weighted[0])
            for abar in weighted[: len(layers)]:
                relevancy = relevancy + abar @ relevancy
            if self.pools_with_head:
                maps.append((weighted[-1] @ relevancy)[:, 0])
            else:
                maps.append(relevancy[:, 0, first:])
        return torch.stack(maps, dim=1)
