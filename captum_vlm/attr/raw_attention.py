"""Raw attention of the pooled token to the patches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from captum_vlm._checks import check_choice
from captum_vlm.attr._base import ImageAttribution, fuse_heads

__all__ = ["RawAttention"]

HEAD_FUSIONS = ("mean", "max", "grad")


class RawAttention(ImageAttribution):
    """Attention of the pooled token to each patch, the simplest transformer explanation
    (as used for ViTs by Dosovitskiy et al., 2021, and as a baseline by Abnar & Zuidema, 2020,
    and Chefer et al., 2021).

    The pooled row is CLIP's CLS token at the chosen vision layers (averaged over layers), or for
    SigLIP the attention-pooling head's probe query (``layers`` must stay ``None``). Heads are
    combined by ``head_fusion``: ``"mean"``, ``"max"``, or ``"grad"`` -- the mean over heads of
    ``ReLU(dlogit/dA * A)``, with the gradient of prompt k's similarity logit; only ``"grad"``
    depends on the target.

    Args:
        model: ``CLIPModel`` or ``SiglipModel``.
        layers: vision layers (negative counts from the end); ``None`` for the last.
        head_fusion: ``"mean"``, ``"max"`` or ``"grad"``.
        interpolate_pos_encoding: for inputs of another size than the trained one.

    Example:
        >>> RawAttention(model, head_fusion="grad").attribute(             # doctest: +SKIP
        ...     pixel_values, target=0, additional_forward_args=(ids, mask))
    """

    def __init__(
        self,
        model: nn.Module,
        layers: int | Sequence[int] | None = None,
        head_fusion: str = "mean",
        interpolate_pos_encoding: bool = False,
    ):
        super().__init__(model, interpolate_pos_encoding=interpolate_pos_encoding)
        check_choice(head_fusion, HEAD_FUSIONS, "head_fusion")
        self.head_fusion = head_fusion
        self.layers = self.pooled_row_layers(layers, "its pooled row is the attention-pooling head's")

    def _patch_maps(self, pixel_values, input_ids, attention_mask, targets):
        use_grad = self.head_fusion == "grad"
        probs, grads = self._attention_pass(
            pixel_values, input_ids, attention_mask, self.layers, targets if use_grad else None
        )
        first = self.adapter.num_prefix_tokens
        rows = [a[:, :, 0, first:] for a in probs]  # [B, heads, patches] per layer
        if not use_grad:
            fused = torch.stack([fuse_heads(r, self.head_fusion) for r in rows]).mean(0)
            return fused[:, None].expand(-1, targets.shape[1], -1)
        maps = []
        for column in grads:
            per_layer = [torch.relu(g[:, :, 0, first:] * r).mean(1) for g, r in zip(column, rows)]
            maps.append(torch.stack(per_layer).mean(0))
        return torch.stack(maps, dim=1)
