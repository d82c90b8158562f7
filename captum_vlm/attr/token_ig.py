"""Token-level Integrated Gradients on the embedding layers, for every family.

IG runs at the *output* of the text-embedding layer and of the patch-embedding layer (Captum's
:class:`~captum.attr.LayerIntegratedGradients`), so ``input_ids`` reach the model intact: LLaVA's
image placeholders stay where they are and are filled with image features as usual, and a
caption scored by :class:`~captum_vlm.targets.TokenLogProbs` is still the caption being scored.

The checks, the target, the text arguments, the pixel baseline and the ending come from the
shared base, :class:`captum_vlm.attr._core.TargetAttributionBase`, as in
:mod:`captum_vlm.attr.occlusion`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from captum.attr import GradientAttribution, LayerIntegratedGradients
from captum.log import log_usage
from torch import nn
from tqdm.auto import tqdm

from captum_vlm._checks import check_choice, check_count
from captum_vlm.attr._core import (
    TargetAttributionBase,
    pixel_baseline,
    replacement_token,
    select_target,
)
from captum_vlm.targets import ImageTextSimilarity, _Target, default_target

__all__ = ["TokenIntegratedGradients", "default_target", "text_baseline_ids"]

MODALITIES = ("image", "text", "both")
IG_METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")


class TokenIntegratedGradients(TargetAttributionBase, GradientAttribution):
    """Integrated Gradients over text tokens, image patches, or both on one path.

    IG (Sundararajan, Taly & Yan, *Axiomatic Attribution for Deep Networks*, ICML 2017) integrates
    the gradient of the target along the straight path from a baseline to the input. Here the path
    runs in embedding space:

    * ``modality="text"``: the output of the token-embedding layer. The baseline keeps the special
      tokens (BOS/CLS at position 0, EOS/SEP, the pooled position such as CLIP's EOS, LLaVA's image
      placeholders, padding) and puts the pad token everywhere else (see :func:`text_baseline_ids`).
      Scores are summed over the embedding dimension: one value per token of ``input_ids``.
    * ``modality="image"``: the output of the patch-embedding layer, baseline = the patch embedding
      of ``baselines`` (zeros by default, the mean colour after the processor's normalisation),
      summed per patch and spread over the patch's pixels.
    * ``modality="both"``: text and patch embeddings are scaled together by the same ``alpha``, so
      the two maps share one budget: ``sum(image) + sum(text) = f(x) - f(baselines)`` up to the
      convergence delta, and the modalities' shares are comparable.

    The text side is always ``input_ids`` from ``additional_forward_args``. For two-tower models
    (CLIP, SigLIP) with K prompts, the text map of image ``b`` holds the tokens of the prompt it
    explains, ``input_ids[target[b]]``; for fusion models row ``b`` of the text map is aligned with
    ``input_ids[b]``.

    Args:
        model: a supported vision-language model (its default target is used, see
            :func:`default_target`), or a target from :mod:`captum_vlm.targets` (e.g.
            ``TokenLogProbs(model, reduction="sum", score_from=5)``) to explain something else.
        multiply_by_inputs: multiply the averaged gradients by ``input - baseline`` (IG proper); with
            ``False`` the result is the path-averaged gradient.

    Example:
        >>> ig = TokenIntegratedGradients(clip_model)                        # doctest: +SKIP
        >>> image, text = ig.attribute(pixel_values, target=0, modality="both",  # doctest: +SKIP
        ...                            additional_forward_args=(input_ids, attention_mask))
    """

    def __init__(self, model: nn.Module | _Target, multiply_by_inputs: bool = True):
        self.bind_target(model)
        self._multiply_by_inputs = multiply_by_inputs
        self._want_delta = False
        self._interpolate = bool(getattr(self.target_fn, "interpolate_pos_encoding", False))
        super().__init__(self.target_fn)

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def has_convergence_delta(self) -> bool:
        return True

    @log_usage()  # Captum's NoiseTunnel calls attribute.__wrapped__
    def attribute(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        target: int | Sequence[int] | torch.Tensor | None = None,
        additional_forward_args: tuple | None = None,
        modality: str = "image",
        baselines: torch.Tensor | float | None = None,
        text_baseline: int | torch.Tensor | None = None,
        keep_token_ids: Sequence[int] = (),
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
        return_grid: bool = False,
        upsample: str = "nearest",
        show_progress: bool = False,
    ):
        """Attribute the target to tokens, patches, or both.

        Args:
            inputs: ``pixel_values`` ``[B, 3, H, W]``.
            target: which output to explain, as in Captum: for two-tower models the prompt index
                (int, one per image, or ``[B]`` tensor); for ``AnswerLogits`` the answer id; for a
                per-token ``TokenLogProbs`` the token column; ``None`` for one-number scores
                (match logit, summed log-probability).
            additional_forward_args: ``(input_ids, attention_mask, *extra)`` as the target takes
                them (BLIP VQA: ``(..., answer_ids, answer_attention_mask)``).
            modality: ``"image"``, ``"text"`` or ``"both"``.
            baselines: pixel baseline (a float or a tensor shaped like ``inputs``); default 0.
            text_baseline: the token id that replaces non-special tokens (default: the model's pad
                token), or a whole baseline ``input_ids`` tensor.
            keep_token_ids: more token ids to keep in the baseline (e.g. a tokenizer's CLS/SEP
                that the model config does not name).
            n_steps: integration steps.
            method: Captum's integration rule (``"gausslegendre"``, ``"riemann_trapezoid"``...).
            internal_batch_size: at most this many interpolated examples per forward (bounds
                memory); ``None`` runs all steps at once.
            return_convergence_delta: also return ``sum(attributions) - (f(x) - f(baseline))``
                per image ``[B]``.
            return_grid: give the image map as the patch grid ``[B, h, w]``.
            upsample: ``"nearest"`` or ``"bilinear"`` for the pixel-shaped image map.
            show_progress: draw a tqdm bar over the forward passes.

        Returns:
            ``"image"``: ``[B, 3, H, W]`` (or ``[B, h, w]``); ``"text"``: ``[B, T]``; ``"both"``:
            the tuple ``(image, text)``. With ``return_convergence_delta``: ``(that, delta)``.

        Example:
            >>> ig = TokenIntegratedGradients(blip_itm)                      # doctest: +SKIP
            >>> tokens = ig.attribute(pixel_values, modality="text",         # doctest: +SKIP
            ...                       additional_forward_args=(ids, mask))
        """
        pixel_values, _ = self.image_inputs(inputs, upsample)  # also: at least one patch
        check_choice(modality, MODALITIES, "modality")
        check_count(n_steps, "n_steps")
        check_choice(method, IG_METHODS, "method")
        if internal_batch_size is not None and (
            isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int) or internal_batch_size < 1
        ):
            raise ValueError(f"internal_batch_size: expected None or an int >= 1, got {internal_batch_size!r}")
        ids, mask, extra = self.text_inputs(pixel_values, additional_forward_args)
        pixel_base = pixel_baseline(baselines, pixel_values)
        text_base = None
        if modality != "image":
            text_base = text_baseline_ids(self.adapter, ids, mask, text_baseline, keep_token_ids)
        captum_target = self.explained_target(pixel_values, ids, mask, extra, target)

        self._want_delta = return_convergence_delta
        with self.preserved():
            if self.two_tower:
                image, text, delta = self._two_tower(
                    pixel_values, pixel_base, ids, mask, text_base, captum_target, modality,
                    n_steps, method, internal_batch_size, show_progress,
                )
            else:
                image, text, delta = self._fusion(
                    pixel_values, pixel_base, ids, mask, extra, text_base, captum_target, modality,
                    n_steps, method, internal_batch_size, show_progress,
                )
        if image is not None:
            image = self.finish(image, pixel_values, return_grid, upsample)
        out = {"image": image, "text": text, "both": (image, text)}[modality]
        return (out, delta) if return_convergence_delta else out

    # ----- two-tower models (CLIP, SigLIP) -----------------------------------------------------
    def _two_tower(self, pixels, pixel_base, ids, mask, text_base, rows, modality, n_steps, method, ibs, progress):
        adapter = self.adapter
        n_prompts = ids.shape[0]
        if modality == "image":
            similarity = ImageTextSimilarity(self.model)
            text = similarity.text_embeds(ids, mask)

            def forward(pix):
                return adapter.similarity_logits(adapter.image_embeds(pix, self._interpolate), text)

            grids, delta = self._integrate(
                forward, [adapter.patch_embedding()], (pixels,), (pixel_base,), (), rows,
                n_steps, method, ibs, progress,
            )
            return adapter.patch_embedding_grid(grids[0], pixels), None, delta

        # text and both: one image at a time, so each prompt's gradient belongs to one image
        images, texts, deltas = [], [], []
        for b in range(pixels.shape[0]):
            pix = pixels[b : b + 1]
            fixed_image = None
            if modality == "text":
                with torch.no_grad():
                    fixed_image = adapter.image_embeds(pix, self._interpolate)

            def forward(*args, fixed_image=fixed_image):
                if fixed_image is None:
                    pix_steps, ids_steps, mask_steps = args
                    image = adapter.image_embeds(pix_steps, self._interpolate)
                else:
                    ids_steps, mask_steps = args
                    image = fixed_image
                text = adapter.text_embeds(ids_steps, mask_steps)
                return _paired_logits(adapter, image, text, n_prompts)

            k = int(rows[b])
            if modality == "text":
                layers, inps, bases, rest = [adapter.text_embedding()], (ids,), (text_base,), (mask,)
            else:
                layers = [adapter.patch_embedding(), adapter.text_embedding()]
                inps, bases, rest = (pix, ids), (pixel_base[b : b + 1], text_base), (mask,)
            attrs, delta = self._integrate(forward, layers, inps, bases, rest, k, n_steps, method, ibs, progress)
            texts.append(attrs[-1].sum(-1)[k])
            if modality == "both":
                images.append(adapter.patch_embedding_grid(attrs[0], pix)[0])
            deltas.append(None if delta is None else delta[0])
        image = torch.stack(images) if images else None
        return image, torch.stack(texts), (None if deltas[0] is None else torch.stack(deltas))

    # ----- fusion models (BLIP, ViLT, LLaVA) --------------------------------------------------
    def _fusion(self, pixels, pixel_base, ids, mask, extra, text_base, target, modality, n_steps, method, ibs, progress):
        adapter, call = self.adapter, self.target_fn
        if modality == "image":
            layers, inps, bases, rest = [adapter.patch_embedding()], (pixels,), (pixel_base,), (ids, mask, *extra)
            forward = call
        elif modality == "text":
            layers, inps, bases, rest = [adapter.text_embedding()], (ids,), (text_base,), (pixels, mask, *extra)

            def forward(ids_steps, pix_steps, *others):
                return call(pix_steps, ids_steps, *others)

        else:
            layers = [adapter.patch_embedding(), adapter.text_embedding()]
            inps, bases, rest = (pixels, ids), (pixel_base, text_base), (mask, *extra)
            forward = call
        attrs, delta = self._integrate(forward, layers, inps, bases, rest, target, n_steps, method, ibs, progress)
        image = adapter.patch_embedding_grid(attrs[0], pixels, extra) if modality != "text" else None
        text = attrs[-1].sum(-1) if modality != "image" else None
        return image, text, delta

    # ----- the integration itself ---------------------------------------------------------------
    def _integrate(self, forward, layers, inputs, baselines, rest, target, n_steps, method, ibs, progress):
        """LayerIntegratedGradients on ``layers`` jointly; returns per-layer attributions (the
        layer outputs' shapes) and the convergence delta per example."""
        batch = inputs[0].shape[0]
        steps_per_pass = n_steps if ibs is None else max(1, ibs // batch)
        total = 2 + math.ceil(n_steps / steps_per_pass)
        bar = tqdm(total=total, desc="TokenIntegratedGradients", disable=not progress, leave=False)

        def counted(*args):
            # registered after Captum's own hooks, so it copies what they return: some models add
            # position embeddings in place (BLIP's text embeddings), which a leaf cannot take
            handles = [layer.register_forward_hook(_copy_output) for layer in layers]
            try:
                bar.update(1)
                return forward(*args)
            finally:
                for handle in handles:
                    handle.remove()

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Multiple layers provided")
                lig = LayerIntegratedGradients(counted, layers if len(layers) > 1 else layers[0],
                                               multiply_by_inputs=self._multiply_by_inputs)
                attrs = lig.attribute(
                    inputs, baselines=baselines, target=target, additional_forward_args=rest or None,
                    n_steps=n_steps, method=method, internal_batch_size=ibs,
                )
        finally:
            bar.close()
        attrs = [a[0] if isinstance(a, (tuple, list)) else a for a in (attrs if len(layers) > 1 else [attrs])]
        attrs = [a.detach() for a in attrs]
        if not self._want_delta:
            return attrs, None
        end, start = _endpoints(forward, layers, inputs, baselines, rest)
        change = select_target(end, target) - select_target(start, target)
        total_attr = sum(_example_sums(a, change.shape[0]) for a in attrs)
        return attrs, total_attr - change


# ----- helpers ------------------------------------------------------------------------------------


def text_baseline_ids(
    adapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    text_baseline: int | torch.Tensor | None = None,
    keep_token_ids: Sequence[int] = (),
) -> torch.Tensor:
    """The text baseline: ``input_ids`` with every non-special token replaced.

    Args:
        adapter: the model's adapter.
        input_ids, attention_mask: ``[K, T]``.
        text_baseline: replacement token id (default: the pad token), or a full baseline tensor
            shaped like ``input_ids`` (returned after a shape check).
        keep_token_ids: more token ids to keep.

    Returns:
        Baseline ids ``[K, T]`` whose pooled position equals that of ``input_ids``.

    Example:
        >>> text_baseline_ids(get_adapter(clip), ids, mask)     # doctest: +SKIP
        tensor([[49406,     1,     1, 49407]])
    """
    if isinstance(text_baseline, torch.Tensor):
        if text_baseline.shape != input_ids.shape or text_baseline.is_floating_point():
            raise ValueError(
                f"text_baseline: expected integer ids shaped like input_ids {tuple(input_ids.shape)}, got "
                f"{text_baseline.dtype} {tuple(text_baseline.shape)}"
            )
        return text_baseline.to(input_ids.device)
    text_baseline = replacement_token(adapter, text_baseline, "a token id (int) or a tensor")
    keep = adapter.special_token_mask(input_ids, attention_mask, keep_token_ids)
    baseline = torch.where(keep, input_ids, torch.full_like(input_ids, text_baseline))
    before = adapter.pooled_text_position(input_ids, attention_mask)
    after = adapter.pooled_text_position(baseline, attention_mask)
    if not torch.equal(before, after):
        raise ValueError(
            f"text_baseline: token {text_baseline} moves the pooled position ({before.tolist()} -> "
            f"{after.tolist()}); pass another token id or a baseline tensor"
        )
    return baseline


def _example_sums(attr: torch.Tensor, batch: int) -> torch.Tensor:
    """Total attribution per example; a layer with more rows than examples (the K prompts of a
    two-tower model, explained for one image) counts all its rows for that image."""
    sums = attr.reshape(attr.shape[0], -1).sum(1)
    if sums.shape[0] % batch == 0:  # [B, ...] or rows in example order (flattened patches [B * N, D])
        return sums.reshape(batch, -1).sum(1)
    return sums.sum().expand(batch)


def _paired_logits(adapter, image: torch.Tensor, text: torch.Tensor, n_prompts: int) -> torch.Tensor:
    """Similarity logits where the ``s``-th copy of the image meets the ``s``-th copy of the K
    prompts (Captum stacks IG steps along dimension 0): ``[steps, K]``."""
    logits = adapter.similarity_logits(image, text)  # [S_img, S_txt * K]
    steps = text.shape[0] // n_prompts
    if image.shape[0] == 1:
        return logits.reshape(steps, n_prompts)
    logits = logits.reshape(image.shape[0], steps, n_prompts)
    return logits[torch.arange(steps), torch.arange(steps)]


def _copy_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output.clone()


def _endpoints(forward: Callable, layers, inputs, baselines, rest) -> tuple[torch.Tensor, torch.Tensor]:
    """``f`` at the input and at the path's start (the layers' outputs at the baseline, the rest
    of the forward run on the real inputs, as IG's path does)."""
    recorded: dict[int, torch.Tensor] = {}

    def record(i):
        return lambda module, args, output: recorded.__setitem__(i, output.detach().clone())

    def replace(i):
        return lambda module, args, output: recorded[i].clone()

    with torch.no_grad():
        end = forward(*inputs, *rest)
        handles = [layer.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
        try:
            forward(*baselines, *rest)
        finally:
            for handle in handles:
                handle.remove()
        handles = [layer.register_forward_hook(replace(i)) for i, layer in enumerate(layers)]
        try:
            start = forward(*inputs, *rest)
        finally:
            for handle in handles:
                handle.remove()
    return end, start

