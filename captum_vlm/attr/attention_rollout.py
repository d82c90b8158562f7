"""Attention rollout: attention multiplied through the layers, residual included."""

from __future__ import annotations

import torch
from torch import nn

from captum_vlm.attr._base import ImageAttribution, fuse_heads, resolve_layers

__all__ = ["AttentionRollout"]


class AttentionRollout(ImageAttribution):
    """Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

    Per layer from ``start_layer`` on, heads are fused, the identity is added for the residual
    connection and rows are renormalised: ``A' = (A + I) / rowsum``; the layers are multiplied,
    last on the left: ``R = A'_L ... A'_start``. The map is the pooled token's row of ``R`` over
    the patches. For SigLIP, whose pooled row lives in the attention-pooling head, the map is the
    head's fused probe attention times ``R`` (no identity there: the probe is not one of the
    tokens). The map does not depend on the target.

    Args:
        model: ``CLIPModel`` or ``SiglipModel``.
        start_layer: first vision layer to roll out (negative counts from the end).
        head_fusion: ``"mean"`` (the paper's) or ``"max"``.
        interpolate_pos_encoding: for inputs of another size than the trained one.

    Example:
        >>> AttentionRollout(model).attribute(pixel_values, target=0,       # doctest: +SKIP
        ...                                   additional_forward_args=(ids, mask))
    """

    def __init__(
        self,
        model: nn.Module,
        start_layer: int = 0,
        head_fusion: str = "mean",
        interpolate_pos_encoding: bool = False,
    ):
        super().__init__(model, interpolate_pos_encoding=interpolate_pos_encoding)
        self.start_layer = resolve_layers(start_layer, self.n_vision_layers, name="start_layer")[0]
        fuse_heads(torch.zeros(1, 1), head_fusion)  # checks the name
        self.head_fusion = head_fusion

    def _patch_maps(self, pixel_values, input_ids, attention_mask, targets):
        layers = list(range(self.start_layer, self.n_vision_layers))
        probs, _ = self._attention_pass(pixel_values, input_ids, attention_mask, layers)
        first = self.adapter.num_prefix_tokens
        rollout = None
        for attention in probs[: len(layers)]:
            fused = fuse_heads(attention, self.head_fusion)
            fused = fused + torch.eye(fused.shape[-1], device=fused.device, dtype=fused.dtype)
            fused = fused / fused.sum(dim=-1, keepdim=True)
            rollout = fused if rollout is None else fused @ rollout
        if self.pools_with_head:
            row = (fuse_heads(probs[-1], self.head_fusion) @ rollout)[:, 0]
        else:
            row = rollout[:, 0, first:]
        return row[:, None].expand(-1, targets.shape[1], -1)
