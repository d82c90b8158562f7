"""Similarity of projected patch tokens and projected word tokens, without gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from captum_vlm.attr._base import ImageAttribution, mha_projections
from captum_vlm.attr._core import prompt_targets

__all__ = ["PatchWordSimilarity"]


class PatchWordSimilarity(ImageAttribution):
    """Cosine between each patch token and each word token, both carried into the shared
    embedding space by the heads that normally only see the pooled token (the dense reading of
    two-tower models behind MaskCLIP, Zhou et al., "Extract Free Dense Labels from CLIP",
    ECCV 2022). No gradients.

    * Patches: CLIP applies ``post_layernorm`` and ``visual_projection`` to every patch token of the
      last layer. SigLIP sends every (post-layernormed) patch token through its attention-pooling
      head as if the probe attended to that token alone: value and output projections, then the
      head's residual layer norm and MLP.
    * Words: the text tower's last hidden states (after its final layer norm) through the text
      projection (CLIP's ``text_projection``, SigLIP's ``text_model.head``), token by token.

    :meth:`attribute` compares patches with the prompt's own text embedding (the word token at the
    pooled position), in the usual image-map shapes. :meth:`attribute_words` gives one map per
    token of the target prompt: ``[B, T, 3, H, W]`` or the grid ``[B, T, h, w]``, aligned with
    ``input_ids`` (padding tokens get 0). Values are cosines in ``[-1, 1]``.

    Args:
        model: ``CLIPModel`` or ``SiglipModel``.
        interpolate_pos_encoding: for inputs of another size than the trained one.

    Example:
        >>> words = PatchWordSimilarity(model).attribute_words(              # doctest: +SKIP
        ...     pixel_values, target=0, additional_forward_args=(ids, mask), return_grid=True)
    """

    def patch_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch tokens in the joint embedding space ``[B, n_patches, E]``."""
        vision = self.model.vision_model
        hidden = self.adapter.vision_outputs(pixel_values, interpolate_pos_encoding=self.interpolate_pos_encoding)
        hidden = hidden.last_hidden_state[:, self.adapter.num_prefix_tokens :]
        if not self.pools_with_head:
            return self.model.visual_projection(vision.post_layernorm(hidden))
        head = self.adapter.pooling_head()
        *_, w_v, b_v = mha_projections(head.attention)
        pooled = head.attention.out_proj(F.linear(hidden, w_v, b_v))
        return pooled + head.mlp(head.layernorm(pooled))

    def token_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Word tokens in the joint embedding space ``[K, T, E]``."""
        text = self.model.text_model
        hidden = text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return text.head(hidden) if self.pools_with_head else self.model.text_projection(hidden)

    def _similarities(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        with torch.no_grad():
            patches = F.normalize(self.patch_embeds(pixel_values), dim=-1)
            words = F.normalize(self.token_embeds(input_ids, attention_mask), dim=-1)
        return torch.einsum("bne,kte->bktn", patches, words)  # [B, K, T, n_patches]

    def _patch_maps(self, pixel_values, input_ids, attention_mask, targets):
        sims = self._similarities(pixel_values, input_ids, attention_mask)
        pooled = self.adapter.pooled_text_position(input_ids, attention_mask).long().to(sims.device)
        at_pooled = sims[:, torch.arange(sims.shape[1], device=sims.device), pooled]  # [B, K, n_patches]
        rows, targets = torch.arange(sims.shape[0], device=sims.device), targets.to(sims.device)
        return torch.stack([at_pooled[rows, targets[:, p]] for p in range(targets.shape[1])], dim=1)

    def attribute_words(
        self,
        inputs: torch.Tensor,
        target: int | Sequence[int] | torch.Tensor | None = None,
        additional_forward_args: tuple | None = None,
        return_grid: bool = False,
        upsample: str = "nearest",
    ) -> torch.Tensor:
        """One map per token of the target prompt.

        Args:
            inputs: ``pixel_values`` ``[B, 3, H, W]``.
            target: prompt per image (int, list or tensor), ``None`` with a single prompt.
            additional_forward_args: ``(input_ids, attention_mask)`` ``[K, T]``.
            return_grid: return ``[B, T, h, w]`` instead of ``[B, T, 3, H, W]``.
            upsample: ``"nearest"`` or ``"bilinear"``.

        Returns:
            ``[B, T, 3, H, W]`` (or ``[B, T, h, w]``); tokens with ``attention_mask == 0`` are 0.

        Example:
            >>> PatchWordSimilarity(model).attribute_words(pixel_values, target=0,   # doctest: +SKIP
            ...     additional_forward_args=(ids, mask), return_grid=True).shape
            torch.Size([1, 7, 7, 7])
        """
        pixel_values, ids, mask, grid = self._prepare(inputs, additional_forward_args, upsample)
        targets = prompt_targets(target, pixel_values.shape[0], ids.shape[0]).to(ids.device)
        sims = self._similarities(pixel_values, ids, mask)
        sims = sims[torch.arange(sims.shape[0], device=sims.device), targets.to(sims.device)]
        sims = sims * mask[targets].to(sims)[..., None]
        maps = sims.reshape(*sims.shape[:2], *grid)
        return self.finish(maps, pixel_values, return_grid, upsample)
