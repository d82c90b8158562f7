"""Causal occlusion on the patch grid (paint or drop tokens), on text tokens, and the grounding test.

Image windows are counted in patches of the adapter's grid. ``intervention="paint"`` is Captum's
:class:`~captum.attr.Occlusion` on ``pixel_values`` with windows aligned to the patches;
``intervention="drop"`` is the same sliding-window scheme run on a patch *keep mask*, where the
model runs without the occluded patch tokens instead of on painted pixels: the adapter's
:meth:`~captum_vlm.adapters.VLMAdapter.drop_image_tokens` removes them (a hook on the vision
embeddings, after the position embeddings; ViLT masks its shuffled patches out of attention).
When the image tokens sit in ``input_ids`` as placeholders (LLaVA), the placeholders of dropped
patches leave ``input_ids`` too, and per-token scores are put back in place.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from captum.attr import Occlusion, PerturbationAttribution
from captum.log import log_usage
from torch import nn
from tqdm.auto import tqdm

from captum_vlm._checks import check_choice, check_count
from captum_vlm._grid import pixels_to_grid
from captum_vlm.attr._core import (
    TargetAttributionBase,
    check_output_target,
    pixel_baseline,
    replacement_token,
    select_target,
    upsample_grid,
)
from captum_vlm.targets import MatchLogit, TokenLogProbs, _Target

__all__ = ["CausalOcclusion", "GroundingResult"]

INTERVENTIONS = ("drop", "paint")
TEXT_INTERVENTIONS = ("replace", "delete")


@dataclass
class GroundingResult:
    """What :meth:`CausalOcclusion.grounding_test` measured, per example ``[B]``.

    Attributes:
        fraction: share of the patches masked (top-attributed, or random).
        n_masked: number of patches masked per image.
        score: the target score on the intact input.
        score_relevant: the score with the top-attributed patches masked.
        score_random: mean score over the random maskings (``score_random_std`` their spread).
        drop_relevant, drop_random: ``score - score_relevant`` and ``score - score_random``.
        flipped_relevant: whether the answer changed with the relevant patches masked (``None``
            when the score has no discrete answer, e.g. a summed log-probability).
        flip_rate_relevant, flip_rate_random: share of examples (and random draws) whose answer
            changed.
        grounded: ``drop_relevant > drop_random + 2 * score_random_std`` (and, with
            ``require_flip``, the answer changed).
    """

    fraction: float
    n_masked: int
    score: torch.Tensor
    score_relevant: torch.Tensor
    score_random: torch.Tensor
    score_random_std: torch.Tensor
    drop_relevant: torch.Tensor
    drop_random: torch.Tensor
    flipped_relevant: torch.Tensor | None
    flip_rate_relevant: float | None
    flip_rate_random: float | None
    grounded: torch.Tensor

    def summary(self) -> str:
        """One line per example with the verdict and its numbers."""
        lines = []
        for b in range(self.score.shape[0]):
            verdict = "grounded" if bool(self.grounded[b]) else "NOT grounded"
            flip = "" if self.flipped_relevant is None else f", answer flipped: {bool(self.flipped_relevant[b])}"
            lines.append(
                f"[{b}] {verdict}: masking the top {self.fraction:.0%} patches drops the score by "
                f"{float(self.drop_relevant[b]):.4g}, random patches by {float(self.drop_random[b]):.4g} "
                f"(+/- {float(self.score_random_std[b]):.2g}){flip}"
            )
        if self.flip_rate_relevant is not None:
            lines.append(f"answer flip rate: relevant {self.flip_rate_relevant:.2f}, random {self.flip_rate_random:.2f}")
        return "\n".join(lines)


class CausalOcclusion(TargetAttributionBase, PerturbationAttribution):
    """Occlusion on the patch grid and on text tokens: the change of the target when a part is gone.

    Zeiler & Fergus, *Visualizing and Understanding Convolutional Networks*, ECCV 2014: slide a
    window over the input, occlude it, and credit the window with the drop of the score; a patch
    gets the mean drop over the windows that cover it (Captum's ``Occlusion`` rule). Here the
    occluded part is either painted with a baseline (``intervention="paint"``) or removed from
    the token sequence (``"drop"``, the causal version for transformers: no out-of-distribution
    grey patch, and fewer tokens to run).

    :meth:`grounding_test` is the LVLM-Interpret check (Ben Melech Stan et al., *LVLM-Interpret:
    An Interpretability Tool for Large Vision-Language Models*, 2024): mask the top-attributed
    patches and as many random ones, and see whether the answer or score changes.

    ``modality="text"`` occludes one token of ``input_ids`` at a time (of the prompt being
    explained for two-tower models, ``input_ids[target[b]]``; of row b for fusion models);
    special tokens (BOS/CLS, EOS/SEP, the pooled position, image placeholders, padding) are left
    alone and get 0.

    Args:
        model: a supported vision-language model (default target, see
            :func:`captum_vlm.targets.default_target`) or a target from
            :mod:`captum_vlm.targets`.

    Example:
        >>> occ = CausalOcclusion(clip_model)                                   # doctest: +SKIP
        >>> heat = occ.attribute(pixel_values, target=0, window=2, stride=1,    # doctest: +SKIP
        ...                      additional_forward_args=(input_ids, attention_mask))
    """

    def __init__(self, model: nn.Module | _Target):
        self.bind_target(model)
        super().__init__(self.target_fn)

    @log_usage()  # Captum's NoiseTunnel calls attribute.__wrapped__
    def attribute(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        target: int | Sequence[int] | torch.Tensor | None = None,
        additional_forward_args: tuple | None = None,
        modality: str = "image",
        intervention: str = "drop",
        window: int | tuple[int, int] = 1,
        stride: int | tuple[int, int] | None = None,
        baselines: float | torch.Tensor = 0.0,
        text_intervention: str = "replace",
        text_baseline: int | None = None,
        keep_token_ids: Sequence[int] = (),
        perturbations_per_eval: int = 1,
        return_grid: bool = False,
        upsample: str = "nearest",
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Occlude windows of patches (or single tokens) and measure the drop of the target.

        Args:
            inputs: ``pixel_values`` ``[B, 3, H, W]``.
            target: as in Captum: prompt index for two-tower models, answer id for
                ``AnswerLogits``, token column for a per-token ``TokenLogProbs``, ``None`` for
                one-number scores (match logit, summed log-probability). With ``modality="image"``,
                ``None`` on an output of several columns (K > 1 prompts, per-token log-probs,
                answer logits) explains every column from one sweep: each occluded forward
                already scores them all (a two-tower model's prompts are encoded once).
            additional_forward_args: ``(input_ids, attention_mask, *extra)`` as the target takes them.
            modality: ``"image"`` (patch windows) or ``"text"`` (one token at a time).
            intervention: ``"drop"`` (run without the occluded patch tokens) or ``"paint"``
                (Captum ``Occlusion`` painting ``baselines`` over the window's pixels).
            window: window ``(rows, cols)`` in patches (an int for a square).
            stride: step ``(rows, cols)`` in patches; default ``window`` (no overlap).
            baselines: pixel value(s) painted by ``"paint"`` (a number or a tensor like ``inputs``).
            text_intervention: ``"replace"`` the token's embedding with ``text_baseline``'s
                (``input_ids`` stay intact, so scored captions and LLaVA's image placeholders are
                unaffected) or ``"delete"`` it from the sequence (not when ``input_ids`` are the
                tokens a ``TokenLogProbs`` target scores: captions, LLaVA).
            text_baseline: replacement token id; default the pad token.
            keep_token_ids: more token ids never to occlude.
            perturbations_per_eval: occlusions run together in one forward (per example).
            return_grid: give the image map as the patch grid ``[B, h, w]``.
            upsample: ``"nearest"`` or ``"bilinear"`` for the pixel-shaped map.
            show_progress: draw a tqdm bar.

        Returns:
            ``"image"``: ``[B, 3, H, W]`` (or ``[B, h, w]``), ``[B, C, 3, H, W]`` (``[B, C, h, w]``)
            when every one of C columns is explained (``target=None``, see above); ``"text"``:
            ``[B, T]``.

        Example:
            >>> occ = CausalOcclusion(vilt_vqa)                                 # doctest: +SKIP
            >>> words = occ.attribute(pixel_values, target=answer_id, modality="text",  # doctest: +SKIP
            ...                       additional_forward_args=(ids, mask))
        """
        pixel_values, grid = self.image_inputs(inputs, upsample)  # also: at least one patch
        check_choice(modality, ("image", "text"), "modality")
        check_count(perturbations_per_eval, "perturbations_per_eval")
        ids, mask, extra = self.text_inputs(pixel_values, additional_forward_args)
        if modality == "text":
            check_choice(text_intervention, TEXT_INTERVENTIONS, "text_intervention")
            scores_input_ids = isinstance(self.target_fn, TokenLogProbs) and self.target_fn.scores_input_ids
            if text_intervention == "delete" and scores_input_ids:
                raise ValueError(
                    "text_intervention: 'delete' shifts the tokens this TokenLogProbs target scores; use 'replace'"
                )
            captum_target = self.explained_target(pixel_values, ids, mask, extra, target)
            with self.preserved(grad=False, freeze_parameters=False):
                return self._text(pixel_values, ids, mask, extra, captum_target, text_intervention,
                                  text_baseline, keep_token_ids, perturbations_per_eval, show_progress)

        check_choice(intervention, INTERVENTIONS, "intervention")
        window = _pair(window, "window")
        stride = window if stride is None else _pair(stride, "stride")
        if window[0] > grid[0] or window[1] > grid[1]:
            raise ValueError(f"window: {window} patches is larger than the {grid} patch grid")
        captum_target, n_outputs = self._image_target(pixel_values, ids, mask, extra, target)
        with self.preserved(grad=False, freeze_parameters=False):
            if intervention == "drop":
                forward, rest = self._drop_forward(ids, mask, extra)
                keep = torch.ones(pixel_values.shape[0], *grid, dtype=pixel_values.dtype, device=pixel_values.device)
                maps = Occlusion(forward).attribute(
                    keep, sliding_window_shapes=window, strides=stride, baselines=0.0, target=captum_target,
                    additional_forward_args=(pixel_values, *rest), perturbations_per_eval=perturbations_per_eval,
                    show_progress=show_progress,
                )
            else:
                forward, rest = self._paint_forward(ids, mask, extra)
                ph, pw = self.adapter.patch_size()
                pixels_map = Occlusion(forward).attribute(
                    pixel_values, sliding_window_shapes=(3, window[0] * ph, window[1] * pw),
                    strides=(3, stride[0] * ph, stride[1] * pw),
                    baselines=pixel_baseline(baselines, pixel_values), target=captum_target,
                    additional_forward_args=rest or None, perturbations_per_eval=perturbations_per_eval,
                    show_progress=show_progress,
                )
                maps = pixels_map[:, 0, : grid[0] * ph : ph, : grid[1] * pw : pw]
        maps = maps.to(pixel_values.dtype)  # Captum divides by its window counts in float32
        if n_outputs is not None:  # Captum gives output (b, c) of the sweep as row b * C + c
            maps = maps.reshape(pixel_values.shape[0], n_outputs, *grid)
        return self.finish(maps, pixel_values, return_grid, upsample)

    def attribute_items(self, inputs: torch.Tensor, target=None, additional_forward_args=None,
                        return_grid: bool = False, upsample: str = "nearest", **options) -> torch.Tensor:
        """:meth:`attribute` per output column, ``[B, K, ...]`` (see
        :meth:`~captum_vlm.attr._core.TargetAttributionBase.attribute_items`); image maps of all
        columns (``target=None`` on K > 1 columns) come from one sweep, whose occluded forwards
        score every column at once.

        Example:
            >>> CausalOcclusion(clip).attribute_items(pixel_values,             # doctest: +SKIP
            ...     additional_forward_args=(ids, mask), return_grid=True).shape
            torch.Size([1, 3, 7, 7])
        """
        if target is None and options.get("modality", "image") == "image":
            if len(self.item_columns(inputs, None, additional_forward_args)) > 1:
                return self.attribute(inputs, None, additional_forward_args, return_grid=return_grid,
                                      upsample=upsample, **options)
        return super().attribute_items(inputs, target, additional_forward_args, return_grid, upsample, **options)

    # ----- grounding test (LVLM-Interpret) ---------------------------------------------------
    def grounding_test(
        self,
        inputs: torch.Tensor,
        attribution: torch.Tensor,
        target: int | Sequence[int] | torch.Tensor | None = None,
        additional_forward_args: tuple | None = None,
        fraction: float = 0.2,
        n_random: int = 5,
        intervention: str = "drop",
        baselines: float | torch.Tensor = 0.0,
        require_flip: bool = False,
        seed: int = 0,
    ) -> GroundingResult:
        """Mask the top ``fraction`` of patches by ``attribution`` and as many random ones.

        A model whose score (or answer) survives losing the region its explanation points at is
        not grounded in it; one whose score falls more than under random masking is.

        Args:
            inputs: ``pixel_values`` ``[B, 3, H, W]``.
            attribution: any image map: ``[B, 3, H, W]``, ``[B, H, W]`` or the grid ``[B, h, w]``
                (pixel maps are averaged per patch); with every column explained (``target=None``
                on C > 1 columns, as in :meth:`attribute`) one map per column: ``[B, C, ...]``.
            target, additional_forward_args: as in :meth:`attribute`. With every column, the
                intact and random maskings run once for all C columns and the C top-patch
                maskings in one batch; the result's tensors are ``[B, C]`` and its flip rates are
                over all (example, column) pairs.
            fraction: share of patches to mask, in ``(0, 1)`` (at least one patch).
            n_random: random maskings to average.
            intervention: ``"drop"`` or ``"paint"`` (with ``baselines``).
            require_flip: also require the answer to change (targets with a discrete answer).
            seed: seed of the random patches.

        Returns:
            A :class:`GroundingResult`; ``print(result.summary())`` states the verdict.

        Example:
            >>> heat = CausalOcclusion(model).attribute(pixels, target=0, additional_forward_args=(ids, mask))  # doctest: +SKIP
            >>> CausalOcclusion(model).grounding_test(pixels, heat, target=0,   # doctest: +SKIP
            ...                                       additional_forward_args=(ids, mask)).grounded
        """
        pixel_values, grid = self.image_inputs(inputs)  # also: at least one patch
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ValueError(f"fraction: expected a number in (0, 1), got {fraction!r}")
        check_count(n_random, "n_random")
        check_choice(intervention, INTERVENTIONS, "intervention")
        ids, mask, extra = self.text_inputs(pixel_values, additional_forward_args)
        captum_target, n_outputs = self._image_target(pixel_values, ids, mask, extra, target)
        b, n = pixel_values.shape[0], grid[0] * grid[1]
        c = n_outputs or 1
        if n_outputs is not None:
            if not isinstance(attribution, torch.Tensor) or attribution.dim() < 3 or tuple(attribution.shape[:2]) != (b, c):
                raise ValueError(
                    f"attribution: target=None explains all {c} columns, so give one map per column, [B, C, ...] "
                    f"= [{b}, {c}, ...]; got {tuple(getattr(attribution, 'shape', ()))}"
                )
            attribution = attribution.flatten(0, 1)
        scores_map = _as_grid(attribution, pixel_values, grid, self.adapter.patch_size(), batch=b * c)
        k = max(1, round(fraction * n))
        generator = torch.Generator().manual_seed(seed)
        relevant = scores_map.reshape(b * c, n).topk(k, dim=1).indices  # row b * C + c: column c's map
        randoms = [torch.stack([torch.randperm(n, generator=generator)[:k] for _ in range(b)]) for _ in range(n_random)]
        keeps = [_keep_mask(idx, len(idx), grid, pixel_values.device) for idx in [relevant, *randoms]]

        with self.preserved(grad=False, freeze_parameters=False):
            intact = self._masked_output(pixel_values, torch.ones_like(keeps[1]), ids, mask, extra, intervention,
                                         baselines)
            if n_outputs is None:
                rows = (pixel_values, ids, mask, extra)
            else:  # each column's own top patches: the examples repeated once per column
                rows = (pixel_values.repeat_interleave(c, 0),
                        ids if self.two_tower else ids.repeat_interleave(c, 0),
                        mask if self.two_tower else mask.repeat_interleave(c, 0),
                        tuple(e.repeat_interleave(c, 0) for e in extra))
            masked = self._masked_output(rows[0], keeps[0], rows[1], rows[2], rows[3], intervention,
                                         _repeat_baselines(baselines, c) if n_outputs else baselines)
            outputs = [intact, masked] + [self._masked_output(pixel_values, keep, ids, mask, extra, intervention,
                                                              baselines) for keep in keeps[1:]]
        if n_outputs is None:
            scores = [select_target(o, captum_target) for o in outputs]
        else:
            own = torch.arange(b * c, device=masked.device) % c
            scores = [intact, masked.gather(1, own[:, None]).view(b, c)] + outputs[2:]
        random_scores = torch.stack(scores[2:])
        score_random = random_scores.mean(0)
        spread = random_scores.std(0, unbiased=False)
        drop_relevant, drop_random = scores[0] - scores[1], scores[0] - score_random
        grounded = drop_relevant > drop_random + 2 * spread
        answers = [self._answer(o) for o in outputs]
        flipped = flip_relevant = flip_random = None
        if answers[0] is not None:
            flipped = answers[1] != answers[0].repeat_interleave(c, 0)
            if n_outputs is not None:
                flipped = flipped.view(b, c)
            flip_relevant = float(flipped.float().mean())
            flip_random = float(torch.stack([a != answers[0] for a in answers[2:]]).float().mean())
            if require_flip:
                grounded = grounded & flipped
        return GroundingResult(
            fraction=float(fraction), n_masked=k, score=scores[0], score_relevant=scores[1],
            score_random=score_random, score_random_std=spread, drop_relevant=drop_relevant,
            drop_random=drop_random, flipped_relevant=flipped, flip_rate_relevant=flip_relevant,
            flip_rate_random=flip_random, grounded=grounded,
        )

    # ----- forwards ---------------------------------------------------------------------------
    def _image_target(self, pixel_values, ids, mask, extra, target) -> tuple[object, int | None]:
        """Like :meth:`explained_target`, and with ``target=None`` on an output of C > 1 columns (K
        prompts of a two-tower model, a per-token ``TokenLogProbs``, ViLT's answers) every column is
        explained by the same sweep: returns ``(None, C)``, else ``(captum_target, None)``."""
        if self.two_tower:
            if target is None and ids.shape[0] > 1:
                return None, int(ids.shape[0])
            return self.explained_target(pixel_values, ids, mask, extra, target), None
        with self.preserved(grad=False, freeze_parameters=False):
            output = self.target_fn(pixel_values, ids, mask, *extra)
        if target is None and output.dim() == 2 and output.shape[1] > 1:
            return None, int(output.shape[1])
        check_output_target(output, target)
        return target, None

    def _call(self, pixel_values, ids, mask, extra, keep=None) -> torch.Tensor:
        """The target's full output, without the patches where ``keep`` ``[B, h, w]`` is 0
        (the adapter's :meth:`~captum_vlm.adapters.VLMAdapter.drop_image_tokens`)."""
        if keep is None or bool(keep.all()):
            return self.target_fn(pixel_values, ids, mask, *extra)
        counts = (keep.reshape(keep.shape[0], -1) > 0.5).sum(1)
        if not bool((counts == counts[0]).all()):  # windows cut by the grid's edge: one row at a time
            parts = []
            for i in range(keep.shape[0]):
                row = slice(i, i + 1)
                text = (ids, mask, extra) if self.two_tower else (ids[row], mask[row], tuple(e[row] for e in extra))
                parts.append(self._call(pixel_values[row], *text, keep[row]))
            return torch.cat(parts)
        with self.adapter.drop_image_tokens(keep) as stays:
            stay = stays(ids, extra)
            if bool(stay.all()):
                return self.target_fn(pixel_values, ids, mask, *extra)
            return self._shortened(pixel_values, ids, mask, extra, stay)

    def _shortened(self, pixel_values, ids, mask, extra, stay):
        """The target on ``input_ids`` without the positions where ``stay`` is False (image
        placeholders of dropped patches); a per-token output is put back in the columns of the
        original ``input_ids``."""
        counts = stay.sum(1)
        if not bool((counts == counts[0]).all()):
            raise RuntimeError("occlusion: every example must lose the same number of patches")
        rows, length = ids.shape[0], int(counts[0])
        target_fn = self.target_fn
        if isinstance(target_fn, TokenLogProbs) and target_fn.score_from > 1:
            # the scored part starts earlier by the placeholders removed before it
            shift = (~stay[:, : target_fn.score_from]).sum(1)
            if not bool((shift == shift[0]).all()):
                raise RuntimeError("occlusion: rows place their image tokens differently; occlude them one at a time")
            target_fn = copy.copy(target_fn)
            target_fn.score_from = max(1, self.target_fn.score_from - int(shift[0]))
        # per-position extra inputs (a prefix-LM's token_type_ids) lose the same positions
        extra = tuple(e[stay].view(rows, length) if isinstance(e, torch.Tensor) and e.shape == ids.shape else e
                      for e in extra)
        out = target_fn(pixel_values, ids[stay].view(rows, length), mask[stay].view(rows, length), *extra)
        if out.dim() == 2 and out.shape[1] == length and length != ids.shape[1]:
            full = out.new_zeros(rows, ids.shape[1])
            full[stay] = out.reshape(-1)
            out = full
        return out

    def _drop_forward(self, ids, mask, extra) -> tuple[Callable, tuple]:
        """``forward(keep, pixel_values, *rest)`` for Captum, and the ``rest`` it expands (two-tower
        models keep their prompts out of it: they are encoded once and cached by the target)."""
        if self.two_tower:
            return (lambda keep, pix: self._call(pix, ids, mask, (), keep)), ()

        def forward(keep, pix, ids_, mask_, *extra_):
            return self._call(pix, ids_, mask_, extra_, keep)

        return forward, (ids, mask, *extra)

    def _paint_forward(self, ids, mask, extra) -> tuple[Callable, tuple]:
        if self.two_tower:
            return (lambda pix: self.target_fn(pix, ids, mask)), ()
        return self.target_fn, (ids, mask, *extra)

    def _masked_output(self, pixel_values, keep, ids, mask, extra, intervention, baselines):
        if intervention == "drop":
            return self._call(pixel_values, ids, mask, extra, keep)
        ph, pw = self.adapter.patch_size()
        painted = upsample_grid(1 - keep, tuple(pixel_values.shape[-2:]), (ph, pw))
        base = pixel_baseline(baselines, pixel_values)
        return self.target_fn(pixel_values * (1 - painted) + base * painted, ids, mask, *extra)

    def _answer(self, output: torch.Tensor) -> torch.Tensor | None:
        """The discrete answer behind the score: the best prompt or answer label (argmax), match
        or not (sign of a match logit); ``None`` for log-probability scores."""
        if isinstance(self.target_fn, MatchLogit):
            return output > 0
        if isinstance(self.target_fn, TokenLogProbs) or output.dim() == 1 or output.shape[1] == 1:
            return None
        return output.argmax(1)

    # ----- text ---------------------------------------------------------------------------------
    def _text(self, pixels, ids, mask, extra, target, how, replacement, keep_token_ids, per_eval, progress):
        replacement = replacement_token(self.adapter, replacement)
        fixed = self.adapter.special_token_mask(ids, mask, keep_token_ids)
        if self.two_tower:
            rows = torch.as_tensor(target)
            jobs = [(k, t) for k in sorted(set(rows.tolist())) for t in range(ids.shape[1]) if not fixed[k, t]]
            chunk = per_eval
        else:
            rows = None
            jobs = [(b, t) for b in range(ids.shape[0]) for t in range(ids.shape[1]) if not fixed[b, t]]
            chunk = per_eval * ids.shape[0]
        full = self.target_fn(pixels, ids, mask, *extra)
        base = select_target(full, target)
        out = torch.zeros(pixels.shape[0], ids.shape[1], dtype=base.dtype)
        image_embeds = None
        if self.two_tower:
            image_embeds = self.adapter.image_embeds(pixels)
        embedding = self.adapter.text_embedding()
        replacement_vector = embedding(torch.tensor([replacement], device=ids.device))[0]
        for start in tqdm(range(0, len(jobs), chunk), desc="CausalOcclusion (text)", disable=not progress, leave=False):
            part = jobs[start : start + chunk]
            index = torch.tensor([r for r, _ in part], device=ids.device)
            positions = torch.tensor([t for _, t in part], device=ids.device)
            new_ids, new_mask = ids[index], mask[index]
            handle = None
            if how == "delete":
                new_ids, new_mask = _delete_tokens(new_ids, new_mask, positions, replacement)
            else:
                handle = embedding.register_forward_hook(_embedding_replacer(positions, replacement_vector))
            try:
                if self.two_tower:
                    text = self.adapter.text_embeds(new_ids, new_mask)
                    logits = self.adapter.similarity_logits(image_embeds, text)  # [B, P]
                    for p, (k, t) in enumerate(part):
                        images = rows == k
                        out[images, t] = base[images] - logits[images, p]
                else:
                    result = self.target_fn(pixels[index], new_ids, new_mask, *[e[index] for e in extra])
                    scores = select_target(result, _rows_of(target, index))
                    out[index, positions] = base[index] - scores
            finally:
                if handle is not None:
                    handle.remove()
        return out


# ----- hooks and small helpers ------------------------------------------------------------------


def _embedding_replacer(positions: torch.Tensor, vector: torch.Tensor):
    """Forward hook on a token embedding: row i's token at ``positions[i]`` gets ``vector``."""

    def hook(module, args, output):
        output = output.clone()
        output[torch.arange(output.shape[0], device=output.device), positions] = vector.to(output.dtype)
        return output

    return hook


def _delete_tokens(ids, mask, positions, pad):
    """Remove token ``positions[i]`` from row i, shifting the rest left and padding the end."""
    rows, length = ids.shape
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[torch.arange(rows), positions] = False
    new_ids = torch.cat([ids[keep].view(rows, length - 1), torch.full((rows, 1), pad, dtype=ids.dtype)], 1)
    new_mask = torch.cat([mask[keep].view(rows, length - 1), torch.zeros((rows, 1), dtype=mask.dtype)], 1)
    return new_ids, new_mask


def _rows_of(target, index: torch.Tensor):
    """The targets of the examples in ``index`` (a per-example target list is gathered)."""
    if target is None or isinstance(target, int):
        return target
    values = torch.as_tensor(target).flatten()
    return target if values.numel() == 1 else values[index.cpu()].tolist()


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in value)):
        raise TypeError(f"{name}: expected an int or a pair of ints (rows, cols) in patches, got {value!r}")
    if min(value) < 1:
        raise ValueError(f"{name}: expected positive sizes in patches, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _keep_mask(masked: torch.Tensor, batch: int, grid: tuple[int, int], device) -> torch.Tensor:
    keep = torch.ones(batch, grid[0] * grid[1], device=device)
    keep.scatter_(1, masked.to(device), 0.0)
    return keep.view(batch, *grid)


def _repeat_baselines(baselines, times: int):
    """A per-example baseline tensor repeated like the examples (each ``times`` times)."""
    if isinstance(baselines, torch.Tensor) and baselines.dim() == 4 and baselines.shape[0] > 1:
        return baselines.repeat_interleave(times, 0)
    return baselines


def _as_grid(attribution, pixel_values, grid, patch, batch: int | None = None) -> torch.Tensor:
    """Any image map (``[B, 3, H, W]``, ``[B, H, W]``, ``[B, h, w]``) as the patch grid; ``batch``
    maps when it is not the number of images (one map per explained column)."""
    b, (h, w) = pixel_values.shape[0] if batch is None else batch, grid
    if not isinstance(attribution, torch.Tensor):
        raise TypeError(f"attribution: expected a tensor, got {type(attribution).__name__}")
    a = attribution.detach().float()
    if a.shape == (b, h, w):
        return a
    if a.dim() == 4 and a.shape[0] == b:
        a = a.mean(1)
    if a.dim() == 3 and a.shape == (b, *pixel_values.shape[-2:]):  # the patch-cover rule
        return torch.from_numpy(pixels_to_grid(a.cpu().numpy(), grid, patch)).to(a)
    raise ValueError(
        f"attribution: expected [B, 3, H, W], [B, H, W] or the patch grid {(b, h, w)}, got {tuple(attribution.shape)}"
    )

