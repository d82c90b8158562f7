"""Shared plumbing for image attributions of two-tower models (CLIP, SigLIP).

Every image method here subclasses :class:`ImageAttribution` and implements one hook,
``_patch_maps``, which returns one patch-grid map per (image, prompt) pair. The base does the rest:
adapter lookup, argument checks, unpacking ``additional_forward_args=(input_ids, attention_mask)``,
target validation, leaving the model as it found it, and upsampling to the input's shape.

Return shapes, the same for every image method:

* ``attribute(pixel_values, target=k, additional_forward_args=(ids, mask))`` returns
  ``[B, 3, H, W]`` like ``pixel_values`` (Captum's convention); the three channels hold the same map.
* ``attribute(..., return_grid=True)`` returns the raw patch grid ``[B, h, w]`` instead, with
  ``(h, w)`` taken from the adapter and the actual input size (non-square inputs give non-square
  grids).
* ``attribute_items(pixel_values, target=None, additional_forward_args=(ids, mask))`` explains
  several prompts with one image forward: ``[B, P, 3, H, W]`` (or ``[B, P, h, w]`` with
  ``return_grid=True``); ``target=None`` means all K, a list names the prompts explained for
  every image (``attribute_prompts(..., prompts=...)`` is its older name).

Gradient-based methods differentiate the model's similarity logit of the target prompt (the
forward function's output, as Captum does), except Grad-ECLIP, which uses the plain cosine as its
paper does. Batched images give the same maps as one at a time; the text tower runs once per
distinct prompt batch and its embeddings are cached.

Upsampling is ``"nearest"`` by default: every pixel gets the value of the patch that saw it, so the
map shows the model's real resolution. ``upsample="bilinear"`` gives a smoother picture. Pixels
outside the patch grid (when ``H`` or ``W`` is not a multiple of the patch size) are never seen by
the model and get 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from captum.attr import Attribution
from captum.log import log_usage
from torch import nn

from captum_vlm.attr._core import (
    UPSAMPLE_MODES,
    ImageAttributionBase,
    item_targets,
    prompt_targets,
    split_text_args,
    upsample_grid,
)
from captum_vlm.hooks import capture
from captum_vlm.targets import ImageTextSimilarity

__all__ = ["ImageAttribution", "UPSAMPLE_MODES", "resolve_layers", "upsample_grid", "mha_projections", "fuse_heads"]

PROMPT_CHUNK = 16  # prompts whose gradients share one batched backward


def fuse_heads(attention: torch.Tensor, how: str, name: str = "head_fusion") -> torch.Tensor:
    """Reduce the head dimension (1) of ``[B, heads, ...]`` by ``"mean"`` or ``"max"``."""
    if how == "mean":
        return attention.mean(dim=1)
    if how == "max":
        return attention.amax(dim=1)
    raise ValueError(f"{name}: expected 'mean' or 'max', got {how!r}")


def resolve_layers(layers: int | Sequence[int] | None, n_layers: int, name: str = "layers") -> list[int]:
    """Normalise layer indices (negative ones count from the end) to a sorted list.

    Args:
        layers: one index, several, or ``None`` for the last layer.
        n_layers: how many layers the tower has.
        name: the argument's name, for error messages.

    Returns:
        Sorted, distinct, non-negative indices.

    Example:
        >>> resolve_layers([-1, 0], 12)
        [0, 11]
    """
    if layers is None:
        layers = [-1]
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise TypeError(f"{name}: expected an int or a non-empty list of ints, got {layers!r}")
    out = set()
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{name}: expected ints, got {layer!r}")
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"{name}: {layer} is out of range for a tower of {n_layers} layers "
                             f"({-n_layers}..{n_layers - 1})")
        out.add(layer % n_layers)
    return sorted(out)


def mha_projections(mha: nn.MultiheadAttention) -> tuple[torch.Tensor, ...]:
    """Query, key and value weights and biases of a ``torch.nn.MultiheadAttention``.

    Returns:
        ``(w_q, b_q, w_k, b_k, w_v, b_v)``; biases may be ``None``.
    """
    d = mha.embed_dim
    if mha.in_proj_weight is not None:
        w_q, w_k, w_v = mha.in_proj_weight[:d], mha.in_proj_weight[d : 2 * d], mha.in_proj_weight[2 * d :]
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    if mha.in_proj_bias is not None:
        b_q, b_k, b_v = mha.in_proj_bias[:d], mha.in_proj_bias[d : 2 * d], mha.in_proj_bias[2 * d :]
    else:
        b_q = b_k = b_v = None
    return w_q, b_q, w_k, b_k, w_v, b_v


def pooling_head_attention(
    mha: nn.MultiheadAttention, query: torch.Tensor, key_value: torch.Tensor, num_heads: int | None = None
) -> dict[str, torch.Tensor]:
    """Recompute SigLIP's attention-pooling step (probe query over all tokens) by hand.

    With ``num_heads=None`` (the module's own head count) the output equals the module's.

    Args:
        mha: the pooling head's ``nn.MultiheadAttention`` (``batch_first=True``).
        query: the probe ``[B, 1, D]``.
        key_value: the tokens ``[B, N, D]``.
        num_heads: heads to split into (1 re-runs it as a single head).

    Returns:
        ``out`` ``[B, 1, D]`` (after ``out_proj``), ``probs`` ``[B, heads, 1, N]``, ``q`` ``[B, 1, D]``,
        ``k``/``v`` ``[B, N, D]`` and ``o`` ``[B, 1, D]`` (heads concatenated, before ``out_proj``).
    """
    heads = num_heads or mha.num_heads
    w_q, b_q, w_k, b_k, w_v, b_v = mha_projections(mha)
    q, k, v = F.linear(query, w_q, b_q), F.linear(key_value, w_k, b_k), F.linear(key_value, w_v, b_v)
    b, _, d = key_value.shape

    def split(t: torch.Tensor) -> torch.Tensor:  # [B, n, D] -> [B, heads, n, D / heads]
        return t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)

    probs = torch.softmax(split(q) @ split(k).transpose(-1, -2) * (d // heads) ** -0.5, dim=-1)
    o = (probs @ split(v)).transpose(1, 2).reshape(b, q.shape[1], d)
    out = mha.out_proj(o)
    return {"out": out, "probs": probs, "q": q, "k": k, "v": v, "o": o}


@contextmanager
def recorded_pooling_head(head: nn.Module, num_heads: int | None = None) -> Iterator[dict]:
    """Replace the output of SigLIP's pooling attention with :func:`pooling_head_attention`'s, so
    its per-head probabilities and intermediate tensors are recorded with their graph.

    Use inside :func:`captum_vlm.hooks.preserved_model_state`, which removes the hook.

    Yields:
        A dict filled on each forward with the keys of :func:`pooling_head_attention`.
    """
    record: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        query, key_value = args[0], args[1]
        record.update(pooling_head_attention(module, query, key_value, num_heads))
        weights = record["probs"].mean(dim=1) if isinstance(output, tuple) and output[1] is not None else None
        return record["out"], weights

    handle = head.attention.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


class ImageAttribution(ImageAttributionBase, Attribution):
    """Base of the two-tower image methods: maps over the patch grid, one per (image, prompt).

    The forward function is :class:`captum_vlm.targets.ImageTextSimilarity`: logits ``[B, K]`` of
    B images against K prompts tokenised together, so ``target=k`` explains prompt k. Subclasses
    implement ``_patch_maps``; see the module docstring for the shapes ``attribute`` returns and
    how to get the raw patch grid (``return_grid=True``).

    Args:
        model: ``CLIPModel`` or ``SiglipModel`` (any attention implementation).
        interpolate_pos_encoding: let the vision tower take sizes other than the trained one
            (needed for non-square CLIP inputs).

    Example:
        >>> heat = GradECLIP(model).attribute(pixel_values, target=0,       # doctest: +SKIP
        ...                                   additional_forward_args=(ids, mask))
        >>> grid = GradECLIP(model).attribute(pixel_values, target=0,       # doctest: +SKIP
        ...                                   additional_forward_args=(ids, mask), return_grid=True)
    """

    requires = {"two_tower": True}

    def __init__(self, model: nn.Module, interpolate_pos_encoding: bool = False):
        self.bind(model)
        if not isinstance(interpolate_pos_encoding, bool):
            raise TypeError(f"interpolate_pos_encoding: expected a bool, got {interpolate_pos_encoding!r}")
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self.similarity = ImageTextSimilarity(self.model, interpolate_pos_encoding=interpolate_pos_encoding)
        super().__init__(self.similarity)

    # ----- what subclasses use ----------------------------------------------------------------
    @property
    def pools_with_head(self) -> bool:
        """True when the image embedding comes from an attention-pooling head (SigLIP), so no
        token inside the encoder blocks is the pooled one."""
        return self.adapter.image_pooling == "attention_head"

    @property
    def n_vision_layers(self) -> int:
        return len(self.adapter.vision_blocks())

    def pooled_row_layers(self, layers: int | Sequence[int] | None, pooled_row: str) -> list[int]:
        """The vision layers read at the pooled row (:func:`resolve_layers`); ``[]`` for a model
        pooled by an attention head, which refuses ``layers`` (``pooled_row`` says where its
        pooled row is instead)."""
        if not self.pools_with_head:
            return resolve_layers(layers, self.n_vision_layers)
        if layers is not None:
            raise ValueError(
                f"layers: {type(self.model).__name__} has no pooled token inside its encoder blocks; "
                f"{pooled_row}. Leave layers=None."
            )
        return []

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings ``[B, E]`` (with graph)."""
        return self.adapter.image_embeds(pixel_values, interpolate_pos_encoding=self.interpolate_pos_encoding)

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Projected text embeddings ``[K, E]`` (cached, no graph)."""
        return self.similarity.text_embeds(input_ids, attention_mask)

    def _patch_maps(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Maps ``[B, P, n_patches]`` for prompt ``targets[b, p]`` of image ``b`` (``targets`` is
        ``[B, P]``). Runs inside :func:`preserved_model_state`."""
        raise NotImplementedError

    # ----- public API -----------------------------------------------------------------------
    @log_usage()
    def attribute(
        self,
        inputs: torch.Tensor,
        target: int | Sequence[int] | torch.Tensor | None = None,
        additional_forward_args: tuple | None = None,
        return_grid: bool = False,
        upsample: str = "nearest",
    ) -> torch.Tensor:
        """Explain prompt ``target`` for each image.

        Args:
            inputs: ``pixel_values`` ``[B, 3, H, W]``.
            target: prompt index (int), one per image (list or ``[B]`` tensor), or ``None`` when
                only one prompt is given.
            additional_forward_args: ``(input_ids, attention_mask)`` of the K prompts, ``[K, T]``.
            return_grid: return the patch grid ``[B, h, w]`` instead of ``[B, 3, H, W]``.
            upsample: ``"nearest"`` or ``"bilinear"`` (ignored with ``return_grid``).

        Returns:
            ``[B, 3, H, W]`` (or ``[B, h, w]``).

        Example:
            >>> method.attribute(pixel_values, target=1,                 # doctest: +SKIP
            ...                  additional_forward_args=(ids, mask)).shape
            torch.Size([1, 3, 224, 224])
        """
        pixel_values, input_ids, attention_mask, grid = self._prepare(inputs, additional_forward_args, upsample)
        targets = prompt_targets(target, pixel_values.shape[0], input_ids.shape[0])[:, None]
        maps = self._run(pixel_values, input_ids, attention_mask, targets, grid)[:, 0]
        return self.finish(maps, pixel_values, return_grid, upsample)

    def attribute_items(
        self,
        inputs: torch.Tensor,
        target: int | Sequence[int] | torch.Tensor | None = None,
        additional_forward_args: tuple | None = None,
        return_grid: bool = False,
        upsample: str = "nearest",
    ) -> torch.Tensor:
        """One map per explained prompt for each image, all from one image forward.

        Args:
            inputs: ``pixel_values`` ``[B, 3, H, W]``.
            target: the prompts to explain, each for every image: an int, a list of ints, or
                ``None`` for all K (unlike :meth:`attribute`, a list names prompts, not one per
                image).
            additional_forward_args: ``(input_ids, attention_mask)`` of the K prompts.
            return_grid: return ``[B, P, h, w]`` instead of ``[B, P, 3, H, W]``.
            upsample: ``"nearest"`` or ``"bilinear"``.

        Returns:
            ``[B, P, 3, H, W]`` (or ``[B, P, h, w]``), P the explained prompts; item ``p``
            equals ``attribute(inputs, target=prompts[p], ...)``.

        Example:
            >>> maps = method.attribute_items(pixel_values,                  # doctest: +SKIP
            ...                               additional_forward_args=(ids, mask))
        """
        pixel_values, input_ids, attention_mask, grid = self._prepare(inputs, additional_forward_args, upsample)
        b, k = pixel_values.shape[0], input_ids.shape[0]
        prompts = list(range(k)) if target is None else item_targets(target, "a prompt index or a list of them")
        columns = [prompt_targets(p, b, k) for p in prompts]
        maps = self._run(pixel_values, input_ids, attention_mask, torch.stack(columns, dim=1), grid)
        return self.finish(maps, pixel_values, return_grid, upsample)

    def attribute_prompts(
        self,
        inputs: torch.Tensor,
        additional_forward_args: tuple | None = None,
        prompts: Sequence[int] | None = None,
        return_grid: bool = False,
        upsample: str = "nearest",
    ) -> torch.Tensor:
        """Alias of :meth:`attribute_items` with the prompts as ``prompts`` (a non-empty list
        of indices, ``None`` for all K): ``[B, P, 3, H, W]`` (or ``[B, P, h, w]``)."""
        if prompts is not None and (not isinstance(prompts, (list, tuple)) or not prompts):
            raise TypeError(f"prompts: expected a non-empty list of prompt indices, got {prompts!r}")
        return self.attribute_items(inputs, prompts, additional_forward_args, return_grid, upsample)

    # ----- plumbing ---------------------------------------------------------------------------
    def _prepare(self, inputs, additional_forward_args, upsample):
        pixel_values, grid = self.image_inputs(inputs, upsample)
        ids, mask, _ = split_text_args(self.adapter, additional_forward_args, most=2,
                                       wanted="(input_ids, attention_mask)")
        if self.adapter.any_image_size:  # every grid is native (dynamic resolution)
            return pixel_values, ids, mask, grid
        config = self.model.config.vision_config
        trained = (config.image_size // config.patch_size,) * 2
        if grid != trained and not self.interpolate_pos_encoding:
            raise ValueError(
                f"inputs: a {tuple(pixel_values.shape[-2:])} image gives a {grid} patch grid but the model "
                f"was trained on {trained}; pass interpolate_pos_encoding=True to the method"
            )
        return pixel_values, ids, mask, grid

    def _run(self, pixel_values, input_ids, attention_mask, targets, grid) -> torch.Tensor:
        with self.preserved():
            maps = self._patch_maps(pixel_values, input_ids, attention_mask, targets)
        return maps.detach().reshape(*maps.shape[:2], *grid)

    def _attention_pass(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        layers: Sequence[int],
        targets: torch.Tensor | None = None,
        stacked: bool = False,
    ) -> tuple[list[torch.Tensor], list | None]:
        """One image forward recording vision attention probabilities.

        Args:
            layers: vision layers to record.
            targets: ``[B, P]`` prompt indices; when given, also the gradient of the summed
                similarity logits of each column with respect to every recorded probability.

        Returns:
            ``probs``: ``[B, heads, N, N]`` per layer, followed for SigLIP by the pooling head's
            ``[B, heads, 1, N]``; ``grads``: per column, a tuple shaped like ``probs`` (or None);
            with ``stacked``, per recorded tensor its gradients for all columns, ``[P, ...]``.
        """
        text = self.text_embeds(input_ids, attention_mask)
        pixels = self._pixels_with_grad(pixel_values) if targets is not None else pixel_values
        modules = [self.adapter.vision_attentions()[i] for i in layers]
        with ExitStack() as stack, torch.set_grad_enabled(targets is not None):
            record = stack.enter_context(capture(self.model, attentions=modules, grads=False))
            head = None
            if self.pools_with_head:
                head = stack.enter_context(recorded_pooling_head(self.adapter.pooling_head()))
            image = self.image_embeds(pixels)
            probs = list(record.attentions) + ([head["probs"]] if head is not None else [])
        if targets is None:
            return probs, None
        gradients = self._stacked_prompt_gradients if stacked else self._prompt_gradients
        return probs, gradients(image, text, targets, probs)

    @staticmethod
    def _pixels_with_grad(pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.detach().requires_grad_(True)

    def _prompt_gradients(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        targets: torch.Tensor,
        tensors: Sequence[torch.Tensor],
        score: str = "logits",
    ) -> list[tuple[torch.Tensor, ...]]:
        """Gradients of each prompt column's score with respect to ``tensors``.

        The score of column p is ``sum_b score[b, targets[b, p]]``, with ``score`` the model's
        similarity logits (``"logits"``) or the plain cosine (``"cosine"``). Its gradient at the
        image embedding is cheap; the costly backward through the image tower then runs once for
        all P columns as a batched vector-Jacobian product (one backward per column if a model's
        operation has no batching rule).

        Returns:
            One tuple per column, shaped like ``tensors``.
        """
        stacked = self._stacked_prompt_gradients(image_embeds, text_embeds, targets, tensors, score)
        return [tuple(g[p] for g in stacked) for p in range(targets.shape[1])]

    def _stacked_prompt_gradients(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        targets: torch.Tensor,
        tensors: Sequence[torch.Tensor],
        score: str = "logits",
    ) -> list[torch.Tensor]:
        """:meth:`_prompt_gradients` as one tensor per entry of ``tensors``, ``[P, *shape]``."""
        free = image_embeds.detach().requires_grad_(True)
        if score == "cosine":
            scores = cosine_scores(free, text_embeds)
        else:
            scores = self.adapter.similarity_logits(free, text_embeds)
        columns = self._per_prompt_scores(scores, targets)
        vectors = torch.stack([torch.autograd.grad(c, free, retain_graph=True)[0] for c in columns])
        parts: list[tuple[torch.Tensor, ...]] = []
        for chunk in vectors.split(PROMPT_CHUNK):  # bounds the memory of the batched backward
            if len(chunk) > 1:
                try:
                    parts.append(torch.autograd.grad(
                        image_embeds, list(tensors), grad_outputs=chunk, retain_graph=True, is_grads_batched=True
                    ))
                    continue
                except RuntimeError:  # an operation without a batching rule: one backward per column
                    pass
            singles = [torch.autograd.grad(image_embeds, list(tensors), grad_outputs=v, retain_graph=True)
                       for v in chunk]
            parts.append(tuple(torch.stack(g) for g in zip(*singles)))
        if len(parts) == 1:
            return list(parts[0])
        return [torch.cat(g) for g in zip(*parts)]

    @staticmethod
    def _per_prompt_scores(scores: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        """For each column p of ``targets`` ``[B, P]``: ``sum_b scores[b, targets[b, p]]``."""
        rows = torch.arange(scores.shape[0], device=scores.device)
        return [scores[rows, targets[:, p].to(scores.device)].sum() for p in range(targets.shape[1])]


def cosine_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[B, K]`` of image and text embeddings."""
    return F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).t()


def min_max(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Min-max normalise along the last dimension over ``valid`` entries (others set to 0)."""
    if valid is None:
        valid = torch.ones_like(x, dtype=torch.bool)
    lo = x.masked_fill(~valid, float("inf")).amin(dim=-1, keepdim=True)
    hi = x.masked_fill(~valid, float("-inf")).amax(dim=-1, keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).masked_fill(~valid, 0.0)
