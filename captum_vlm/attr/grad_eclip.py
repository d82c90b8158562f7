"""Grad-ECLIP: gradient-weighted values and loosened attention at the pooled token."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from captum_vlm._checks import check_choice
from captum_vlm.attr._base import (
    ImageAttribution,
    cosine_scores,
    min_max,
    recorded_pooling_head,
    resolve_layers,
)
from captum_vlm.attr._core import prompt_targets
from captum_vlm.hooks import eager_attention

__all__ = ["GradECLIP"]

MODES = ("model", "paper")


def eclip_token_map(
    grad_row: torch.Tensor, query_row: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """One layer's Grad-ECLIP map before the ReLU: ``sum_c g_c v_ic * lambda_i``.

    Args:
        grad_row: gradient of the score at the pooled row of the attention output ``[B, D]``.
        query_row: query of the pooled row ``[B, D]``.
        keys: keys ``[B, N, D]``; values: values ``[B, N, D]``.
        valid: which tokens to explain ``[B, N]`` (bool); lambda is min-max normalised over them.

    Returns:
        ``[B, N]``, 0 at invalid tokens.
    """
    cosine = (F.normalize(query_row, dim=-1)[:, None, :] * F.normalize(keys, dim=-1)).sum(-1)
    loosened = min_max(cosine, valid)
    return ((grad_row[:, None, :] * values).sum(-1) * loosened).masked_fill(~valid, 0.0)


def _single_head_attention(module: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> dict:
    """The official code's re-run of an attention layer as one head over the full width."""
    q, k, v = module.q_proj(hidden), module.k_proj(hidden), module.v_proj(hidden)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        mask = mask[:, 0] if mask.dim() == 4 else mask
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1)
    o = probs @ v
    return {"q": q, "k": k, "v": v, "o": o, "out": module.out_proj(o), "probs": probs[:, None]}


@contextmanager
def recorded_attention(modules: Sequence[nn.Module], single_head: bool) -> Iterator[list[dict]]:
    """Record q, k, v (projections of the layer-normed block input) and ``o`` (heads concatenated,
    before ``out_proj``) of CLIP-style attention modules, with their graph.

    ``single_head=False`` only observes the model's own forward. ``single_head=True`` replaces each
    module's output by a single-head re-run (Grad-ECLIP's official code).
    """
    records: list[dict] = [{} for _ in modules]
    handles = []

    def keep(record: dict, key: str):
        return lambda mod, args, out: record.__setitem__(key, out)

    def keep_input(record: dict):
        return lambda mod, args: record.__setitem__("o", args[0])

    def replace(record: dict):
        def hook(mod, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            record.update(_single_head_attention(mod, hidden, mask))
            return record["out"], record["probs"]

        return hook

    try:
        for module, record in zip(modules, records):
            if single_head:
                handles.append(module.register_forward_hook(replace(record), with_kwargs=True))
            else:
                for key in ("q", "k", "v"):
                    handles.append(getattr(module, f"{key}_proj").register_forward_hook(keep(record, key)))
                handles.append(module.out_proj.register_forward_pre_hook(keep_input(record)))
        yield records
    finally:
        for handle in handles:
            handle.remove()


class GradECLIP(ImageAttribution):
    """Grad-ECLIP (Zhao, Wang, Zeng, Zhao & Chan, "Gradient-based Visual Explanation for
    Transformer-based CLIP", ICML 2024; extended as "Grad-ECLIP: Gradient-based Visual and Textual
    Explanations for CLIP", arXiv:2502.18816).

    The score is the cosine between the image embedding and prompt k's text embedding. At each
    chosen attention layer, with ``o`` the attention output (heads concatenated, before the output
    projection), ``g = ds/do`` at the pooled row weights the channels of each token's value
    ``v_i``, and a loosened attention ``lambda_i`` -- the cosine between the pooled row's query and
    token i's key, min-max normalised over the explained tokens -- replaces the softmax::

        H_i = ReLU(sum_c g_c * v_ic * lambda_i)

    Several layers add their ReLU'd maps. q, k and v are the module's ``q_proj``/``k_proj``/
    ``v_proj`` of the layer-normed block input over the full width (all heads concatenated, as the
    paper's cosine is over the whole embedding).

    * ``mode="model"`` (default) reads everything off the model's real multi-head forward; the map
      explains the model as it is.
    * ``mode="paper"`` reproduces the authors' code: each chosen layer is re-run as a *single* head
      over the full width (so the score itself comes from that modified forward), q and k go
      through ``out_proj`` before their cosine, and layers are summed before one ReLU.

    Pooled row: CLIP's CLS token (maps over patch tokens). SigLIP has no pooled token inside its
    encoder; its image embedding is made by an attention-pooling head where a learnt probe query
    attends over all patches. Grad-ECLIP then runs at that head: ``g`` at the head's attention
    output, lambda from the probe's query against the patch keys, v the head's values; ``layers``
    must stay ``None`` for SigLIP.

    The text side, :meth:`attribute_text`, applies the same at the text encoder's pooled token (EOS
    for CLIP, the last position for SigLIP) over input tokens.

    Args:
        model: ``CLIPModel`` or ``SiglipModel``.
        layers: vision layers to use (negative counts from the end); ``None`` for the last.
        text_layers: text layers for :meth:`attribute_text`; ``None`` for the last.
        mode: ``"model"`` or ``"paper"`` (see above).
        interpolate_pos_encoding: for inputs of another size than the trained one.

    Example:
        >>> explainer = GradECLIP(model)                                        # doctest: +SKIP
        >>> heat = explainer.attribute(pixel_values, target=0,                  # doctest: +SKIP
        ...                            additional_forward_args=(ids, mask))     # [B, 3, H, W]
        >>> words = explainer.attribute_text(pixel_values, target=0,            # doctest: +SKIP
        ...                                  additional_forward_args=(ids, mask))  # [B, T]
    """

    def __init__(
        self,
        model: nn.Module,
        layers: int | Sequence[int] | None = None,
        text_layers: int | Sequence[int] | None = None,
        mode: str = "model",
        interpolate_pos_encoding: bool = False,
    ):
        super().__init__(model, interpolate_pos_encoding=interpolate_pos_encoding)
        check_choice(mode, MODES, "mode")
        self.mode = mode
        self.layers = self.pooled_row_layers(layers, "Grad-ECLIP runs at its attention-pooling head") or None
        self.text_layers = resolve_layers(text_layers, len(self.adapter.text_blocks()), name="text_layers")

    @property
    def _paper(self) -> bool:
        return self.mode == "paper"

    def _combine(self, per_layer: list[torch.Tensor]) -> torch.Tensor:
        if self._paper:
            return torch.relu(torch.stack(per_layer).sum(0))
        return torch.stack([torch.relu(m) for m in per_layer]).sum(0)

    def _lambda_inputs(self, record: dict, out_proj: nn.Module, rows: torch.Tensor | int):
        b = record["q"].shape[0]
        if isinstance(rows, torch.Tensor):
            q_row = record["q"][torch.arange(b, device=rows.device), rows]
        else:
            q_row = record["q"][:, rows]
        k = record["k"]
        if self._paper:
            q_row, k = out_proj(q_row), out_proj(k)
        return q_row, k

    def _patch_maps(self, pixel_values, input_ids, attention_mask, targets):
        text = self.text_embeds(input_ids, attention_mask)
        pixels = self._pixels_with_grad(pixel_values)
        with ExitStack() as stack:
            if self._paper:
                stack.enter_context(eager_attention(self.model))
            if self.pools_with_head:
                head = self.adapter.pooling_head()
                records = [stack.enter_context(recorded_pooling_head(head, 1 if self._paper else None))]
                out_projs, first = [head.attention.out_proj], 0
            else:
                modules = [self.adapter.vision_attentions()[i] for i in self.layers]
                records = stack.enter_context(recorded_attention(modules, self._paper))
                out_projs, first = [m.out_proj for m in modules], self.adapter.num_prefix_tokens
            image = self.image_embeds(pixels)
        maps = []
        for grads in self._prompt_gradients(image, text, targets, [r["o"] for r in records], score="cosine"):
            per_layer = []
            for record, grad, out_proj in zip(records, grads, out_projs):
                q_row, k = self._lambda_inputs(record, out_proj, 0)
                v = record["v"][:, first:]
                valid = torch.ones(v.shape[:2], dtype=torch.bool, device=v.device)
                per_layer.append(eclip_token_map(grad[:, 0], q_row, k[:, first:], v, valid))
            maps.append(self._combine(per_layer))
        return torch.stack(maps, dim=1)

    def attribute_text(
        self,
        inputs: torch.Tensor,
        target: int | Sequence[int] | torch.Tensor | None = None,
        additional_forward_args: tuple | None = None,
        special_tokens_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Grad-ECLIP over the prompts' tokens: which words make prompt k match each image.

        One value per input token, aligned with ``input_ids``. Special tokens get 0: position 0
        for CLIP (its BOS), the pooled position and everything after it, padding
        (``attention_mask == 0``) and any position set in ``special_tokens_mask``. Each map is
        normalised to sum 1 over the remaining tokens (all 0 if nothing is positive). Loosened
        attention is min-max normalised over the tokens the pooled token attends to.

        Args:
            inputs: ``pixel_values`` ``[B, 3, H, W]`` (no gradient flows into the image tower).
            target: prompt per image as in :meth:`attribute`; ``None`` returns every prompt.
            additional_forward_args: ``(input_ids, attention_mask)`` ``[K, T]``.
            special_tokens_mask: optional ``[K, T]``, nonzero where a token is special (the
                tokenizer's ``return_special_tokens_mask=True`` gives it).

        Returns:
            ``[B, T]`` for the target prompt of each image, or ``[B, K, T]`` with ``target=None``.

        Example:
            >>> GradECLIP(model).attribute_text(pixel_values, target=0,     # doctest: +SKIP
            ...     additional_forward_args=(ids, mask)).shape
            torch.Size([1, 7])
        """
        pixel_values, ids, mask, _ = self._prepare(inputs, additional_forward_args, "nearest")
        b, (k, t) = pixel_values.shape[0], ids.shape
        targets = None if target is None else prompt_targets(target, b, k)
        if special_tokens_mask is not None:
            if not isinstance(special_tokens_mask, torch.Tensor) or special_tokens_mask.shape != ids.shape:
                raise ValueError(
                    f"special_tokens_mask: expected a tensor of shape {tuple(ids.shape)} like input_ids, got "
                    f"{getattr(special_tokens_mask, 'shape', type(special_tokens_mask).__name__)}"
                )
        device = pixel_values.device
        pooled = self.adapter.pooled_text_position(ids, mask).long().to(device)
        positions = torch.arange(t, device=device)
        valid = (positions[None] <= pooled[:, None]) & mask.bool().to(device)
        modules = [self.adapter.text_attentions()[i] for i in self.text_layers]
        with self.preserved(), ExitStack() as stack:
            if self._paper:
                stack.enter_context(eager_attention(self.model))
            with torch.no_grad():
                image = self.image_embeds(pixel_values)
            self.adapter.text_embedding().register_forward_hook(lambda mod, args, out: out.requires_grad_(True))
            records = stack.enter_context(recorded_attention(modules, self._paper))
            scores = cosine_scores(image, self.adapter.text_embeds(ids, mask))
            rows = torch.arange(k, device=device)
            maps = []
            for i in range(b):
                grads = torch.autograd.grad(scores[i].sum(), [r["o"] for r in records], retain_graph=True)
                per_layer = []
                for record, grad, module in zip(records, grads, modules):
                    q_row, keys = self._lambda_inputs(record, module.out_proj, pooled)
                    per_layer.append(eclip_token_map(grad[rows, pooled], q_row, keys, record["v"], valid))
                maps.append(self._combine(per_layer))
            maps = torch.stack(maps).detach()  # [B, K, T]
        keep = valid & (positions[None] != pooled[:, None])
        keep[:, : self.adapter.text_start_tokens] = False  # a BOS carries no word
        if special_tokens_mask is not None:
            keep &= ~special_tokens_mask.bool().to(keep.device)
        maps = maps * keep
        maps = maps / maps.sum(-1, keepdim=True).clamp_min(1e-12)
        return maps if targets is None else maps[torch.arange(b), targets]
