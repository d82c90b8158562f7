"""Shared plumbing for the fusion-model methods (cross-attention Grad-CAM, bi-modal relevancy).

Fusion models let text attend to the image: BLIP (ITM, captioning, VQA) through cross-attention,
ViLT and LLaVA through one joint sequence. Both methods here record attention probabilities and
their gradients for one or more scores, turn them into *row maps* ``[B, Q, K]`` (one row per text
query position, one column per key), and read the image columns onto the patch grid. When the
image tokens are learned queries (BLIP-2, InstructBLIP: the adapter's ``image_tokens ==
"queries"``), each score's query columns reach the grid through its own *bridge*, the queries'
weights over the patches read from the Q-Former (:meth:`FusionAttribution._bridge`).

What is explained depends on the adapter's task (the "kind" here):

* ``"match"`` -- ``BlipForImageTextRetrieval``, ``ViltForImageAndTextRetrieval``: the match logit
  (:class:`captum_vlm.targets.MatchLogit`), one number per example; ``target`` must be ``None``.
  Per-token maps are the rows of the caption's tokens, aligned with ``input_ids``.
* ``"answer"`` -- ``ViltForQuestionAnswering``: the logit of answer ``target`` (a label id, one per
  example or one for all). Per-token maps are the rows of the question's tokens.
* ``"tokens"`` -- ``BlipForConditionalGeneration``, ``BlipForQuestionAnswering``,
  ``LlavaForConditionalGeneration``: the teacher-forced log-probability of each scored token
  (:class:`captum_vlm.targets.TokenLogProbs`); ``target`` picks positions in ``input_ids`` (in
  ``answer_ids`` for BLIP VQA), ``None`` means every scored position. Token ``t`` gets its own
  gradient and its own map, aligned with the token sequence; up to ``TOKEN_CHUNK`` tokens share
  one batched backward pass.

Shapes follow :mod:`captum_vlm.attr._base`: ``attribute`` returns ``[B, 3, H, W]`` like
``pixel_values`` (``[B, h, w]`` with ``return_grid=True``); ``attribute_items`` (older name
``attribute_tokens``) returns ``[B, T, 3, H, W]`` (``[B, T, h, w]``), T the token axis above,
or one map per word when ``word_ids``/``token_groups`` are given.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from captum.attr import Attribution
from captum.log import log_usage
from torch import nn
from tqdm.auto import tqdm

from captum_vlm._checks import check_input_ids, check_same_batch
from captum_vlm.adapters import classes_for_tasks
from captum_vlm.adapters.layout import ImageTokenLayout
from captum_vlm.attr._core import ImageAttributionBase, int_targets, split_text_args
from captum_vlm.hooks import capture
from captum_vlm.targets import AnswerLogits, MatchLogit, TokenLogProbs

__all__ = ["FUSION_KINDS", "FusionAttribution", "FusionInputs", "averaged_gradient_attention"]

TOKEN_CHUNK = 8  # token scores whose gradients share one batched backward (bounds its memory)

#: the adapter tasks these methods explain, and what this module calls each
FUSION_KINDS: dict[str, str] = {
    "match": "match",
    "answer_label": "answer",
    "caption": "tokens",
    "answer_tokens": "tokens",
    "generate": "tokens",
}


def averaged_gradient_attention(attention: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Head mean of the positive part of gradient times attention, ``E_h[(grad * A)^+]``.

    Args:
        attention: probabilities ``[B, heads, Q, K]``.
        grad: their gradient, same shape.

    Returns:
        ``[B, Q, K]`` in float32, or float64 for a float64 model (relevancy subtracts the
        identity from sums that start at it, so float32 loses small attentions).

    Example:
        >>> a = torch.full((1, 2, 1, 2), 0.5); g = torch.tensor([[[[1., -1.]], [[3., 1.]]]])
        >>> averaged_gradient_attention(a, g)
        tensor([[[1.0000, 0.2500]]])
    """
    dtype = torch.promote_types(attention.dtype, torch.float32)  # half -> float32; float64 stays
    return (grad.to(dtype) * attention.to(dtype)).clamp(min=0).mean(dim=1)


@dataclass
class FusionInputs:
    """Checked inputs of one ``attribute`` call.

    Attributes:
        pixel_values: ``[B, 3, H, W]``.
        args: what the forward function takes after ``pixel_values``.
        input_ids, attention_mask: the text ``[B, T]`` (the question for VQA).
        tokens, token_mask: the per-token axis (``input_ids``, or ``answer_ids`` for BLIP VQA) and
            which of its positions can have a map (``[B, T]`` bool).
        query_mask: which query rows of the recorded attention are text ``[B, Q]`` (bool).
        grid: patch grid ``(h, w)``.
        layout: where the image tokens of the recorded forward sit (the adapter's
            :meth:`~captum_vlm.adapters.VLMAdapter.image_layout`).
    """

    pixel_values: torch.Tensor
    args: tuple
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    tokens: torch.Tensor
    token_mask: torch.Tensor
    query_mask: torch.Tensor
    grid: tuple[int, int]
    layout: ImageTokenLayout | None = None


def _text_requires_grad(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    # with frozen parameters, make text-only attention (e.g. BLIP's first text layer) differentiable;
    # the clone keeps the result a non-leaf, as models add to it in place
    if output.requires_grad:
        return output
    return output.detach().requires_grad_(True).clone()


class FusionAttribution(ImageAttributionBase, Attribution):
    """Base of the fusion-model image methods; subclasses implement ``_modules``, ``_row_maps``
    and ``_reduce_rows`` (see the module docstring for what is explained per model class)."""

    def __init__(self, model: nn.Module, interpolate_pos_encoding: bool = False):
        self.bind(model)
        task = None if self.adapter.two_tower else self.adapter.task
        if task not in FUSION_KINDS:
            raise TypeError(
                f"model: {type(self).__name__} explains fusion models "
                f"({', '.join(classes_for_tasks(list(FUSION_KINDS)))}), got {type(self.model).__name__}; "
                "for two-tower models use GradECLIP or another image method"
            )
        self.kind = FUSION_KINDS[task]
        self.takes_answer_ids = self.adapter.takes_answer_ids  # the scored tokens are separate answer_ids
        if self.kind == "match":
            forward_func = MatchLogit(self.model, interpolate_pos_encoding=interpolate_pos_encoding)
        elif self.kind == "answer":
            if interpolate_pos_encoding:
                raise ValueError("interpolate_pos_encoding: ViLT embeds any size itself; leave it False")
            forward_func = AnswerLogits(self.model)
        else:
            forward_func = TokenLogProbs(self.model, interpolate_pos_encoding=interpolate_pos_encoding)
        super().__init__(forward_func)

    # ----- what subclasses implement ----------------------------------------------------------
    def _modules(self) -> list[nn.Module]:
        """Attention modules to record, in the order ``_row_maps`` expects them."""
        raise NotImplementedError

    def _bridge_modules(self) -> list[nn.Module]:
        """Attention modules the bridge is read from when the image tokens are learned queries
        (the adapter's ``image_tokens == "queries"``), recorded after :meth:`_modules`; default
        the adapter's :meth:`~captum_vlm.adapters.VLMAdapter.bridge_attentions`."""
        return self.adapter.bridge_attentions() if self.adapter.image_tokens == "queries" else []

    def _bridge(self, attentions: list[torch.Tensor], grads: list[torch.Tensor], inputs: FusionInputs) -> torch.Tensor:
        """The query tokens' weights over the vision tokens ``[B, N, K]`` for one score, from the
        recorded :meth:`_bridge_modules`: by default the mean over the bridge's cross-attention
        layers of ``E_h[(grad * A)^+]``, the gradient weighting of the text-side maps."""
        return torch.stack([averaged_gradient_attention(a, g) for a, g in zip(attentions, grads)]).mean(0)

    def _row_maps(
        self, attentions: list[torch.Tensor], grads: list[torch.Tensor], inputs: FusionInputs
    ) -> torch.Tensor:
        """Row maps ``[B, Q, K]`` from one score's recorded attentions and gradients."""
        raise NotImplementedError

    def _reduce_rows(self, rows: torch.Tensor, inputs: FusionInputs, position: int | None) -> torch.Tensor:
        """One map ``[B, K]`` from row maps: the whole-text map of a match/answer score
        (``position=None``) or the map of the token at ``position`` from its own score."""
        raise NotImplementedError

    # ----- public API -------------------------------------------------------------------------
    @log_usage()  # Captum's NoiseTunnel calls attribute.__wrapped__
    def attribute(
        self,
        inputs: torch.Tensor,
        target: int | Sequence[int] | torch.Tensor | None = None,
        additional_forward_args: tuple | None = None,
        return_grid: bool = False,
        upsample: str = "nearest",
        show_progress: bool = False,
    ) -> torch.Tensor:
        """One image map per example: the match/answer score over the whole text, or for token
        models the mean of the chosen tokens' maps.

        Args:
            inputs: ``pixel_values`` ``[B, 3, H, W]``.
            target: ``None`` for match models; the answer label id(s) for ViLT VQA; for token
                models the position(s) to explain (an int or a list of ints), ``None`` for all
                scored positions.
            additional_forward_args: ``(input_ids, attention_mask)``; for BLIP VQA
                ``(input_ids, attention_mask, answer_ids[, answer_attention_mask])``.
            return_grid: return the patch grid ``[B, h, w]`` instead of ``[B, 3, H, W]``.
            upsample: ``"nearest"`` or ``"bilinear"`` (ignored with ``return_grid``).
            show_progress: token models: a tqdm bar over the explained tokens (their gradients
                come from batched backward passes, ``TOKEN_CHUNK`` tokens each).

        Returns:
            ``[B, 3, H, W]`` (or ``[B, h, w]``).

        Example:
            >>> heat = method.attribute(pixel_values, additional_forward_args=(ids, mask))  # doctest: +SKIP
        """
        prepared, positions = self._prepare(inputs, target, additional_forward_args, upsample)
        _, _, aggregate = self._maps(prepared, target, positions, show_progress)
        return self._finish(aggregate, prepared, return_grid, upsample)

    def attribute_items(
        self,
        inputs: torch.Tensor,
        target: int | Sequence[int] | torch.Tensor | None = None,
        additional_forward_args: tuple | None = None,
        return_grid: bool = False,
        upsample: str = "nearest",
        word_ids: Sequence | None = None,
        token_groups: Sequence[Sequence[int]] | None = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """One image map per token (or per word), aligned with the token axis.

        Positions without a map (padding; for token models, positions not explained or not
        scored) are all zero.

        Args:
            inputs, target, additional_forward_args, return_grid, upsample, show_progress: as in
                :meth:`attribute` (for token models ``target`` names the explained positions).
            word_ids: merge sub-tokens into words: the tokenizer's ``encoding.word_ids()`` (one
                entry per token, ``None`` for special tokens), or one such list per example. Word
                ``w``'s map is the mean of its tokens' maps (over tokens that have one).
            token_groups: merge by explicit groups of token positions instead, the same for every
                example; group ``g``'s map is the mean of its tokens' maps.

        Returns:
            ``[B, T, 3, H, W]`` (or ``[B, T, h, w]``); with words ``[B, W, ...]``, W the number of
            words (groups), words missing from shorter examples zero.

        Example:
            >>> maps = method.attribute_items(pixel_values, additional_forward_args=(ids, mask),  # doctest: +SKIP
            ...                               word_ids=encoding.word_ids())
        """
        return self.attribute_with_tokens(inputs, target, additional_forward_args, word_ids, token_groups,
                                          return_grid, upsample, show_progress)[1]

    def attribute_tokens(
        self,
        inputs: torch.Tensor,
        target: int | Sequence[int] | torch.Tensor | None = None,
        additional_forward_args: tuple | None = None,
        word_ids: Sequence | None = None,
        token_groups: Sequence[Sequence[int]] | None = None,
        return_grid: bool = False,
        upsample: str = "nearest",
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Alias of :meth:`attribute_items` (its older name and argument order)."""
        return self.attribute_items(inputs, target, additional_forward_args, return_grid, upsample, word_ids,
                                    token_groups, show_progress)

    def attribute_with_tokens(
        self,
        inputs: torch.Tensor,
        target: int | Sequence[int] | torch.Tensor | None = None,
        additional_forward_args: tuple | None = None,
        word_ids: Sequence | None = None,
        token_groups: Sequence[Sequence[int]] | None = None,
        return_grid: bool = False,
        upsample: str = "nearest",
        show_progress: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`attribute` and :meth:`attribute_items` from one pass: the same two results as
        calling both, at the cost of one.

        Args:
            as in :meth:`attribute_items`.

        Returns:
            ``(whole, per_token)``: ``[B, 3, H, W]`` and ``[B, T, 3, H, W]`` (grids with
            ``return_grid=True``; ``[B, W, ...]`` with words).

        Example:
            >>> heat, words = method.attribute_with_tokens(pixel_values, additional_forward_args=(ids, mask))  # doctest: +SKIP
        """
        prepared, positions = self._prepare(inputs, target, additional_forward_args, upsample)
        groups = _word_groups(word_ids, token_groups, prepared.tokens.shape)
        per_token, has_map, aggregate = self._maps(prepared, target, positions, show_progress)
        if groups is not None:
            per_token = _merge(per_token, has_map, groups)
        return (self._finish(aggregate, prepared, return_grid, upsample),
                self._finish(per_token, prepared, return_grid, upsample))

    # ----- plumbing ---------------------------------------------------------------------------
    def _prepare(self, inputs, target, additional_forward_args, upsample) -> tuple[FusionInputs, list[int]]:
        pixel_values, grid = self.image_inputs(inputs, upsample)
        extra_names = self.adapter.extra_text_inputs
        wanted = ("(input_ids, attention_mask, answer_ids[, answer_attention_mask])" if self.takes_answer_ids
                  else f"(input_ids, attention_mask{''.join(f'[, {n}]' for n in extra_names)})")
        ids, mask, args = split_text_args(self.adapter, additional_forward_args,
                                          4 if self.takes_answer_ids else 2 + len(extra_names), wanted)
        max_length = self.adapter.max_text_length()
        check_same_batch(pixel_values=pixel_values, input_ids=ids)
        query_mask = mask.bool()
        if self.takes_answer_ids:
            if not args or args[0] is None:
                raise ValueError(
                    f"additional_forward_args: {type(self.model).__name__} needs "
                    "(input_ids, attention_mask, answer_ids[, answer_attention_mask])"
                )
            answer_ids, answer_mask = check_input_ids(
                args[0], args[1] if len(args) > 1 else None, max_length=max_length, name="answer_ids"
            )
            check_same_batch(pixel_values=pixel_values, answer_ids=answer_ids)
            forward_args = (ids, mask, answer_ids, answer_mask)
            tokens = answer_ids.clone()
            tokens[:, 0] = self.model.config.text_config.bos_token_id
            token_mask = self.forward_func.score_mask(tokens, answer_mask)
        else:
            forward_args = (ids, mask, *args)
            self.adapter.language_kwargs(ids, args)  # checks the extra inputs' shapes
            tokens, token_mask = ids, mask.bool()
            if self.kind == "tokens":
                token_mask = self.forward_func.score_mask(ids, mask, *args)
            if self.adapter.image_tokens_in_input_ids:
                query_mask = query_mask & ~self.adapter.image_token_positions(ids)
        prepared = FusionInputs(pixel_values, forward_args, ids, mask, tokens, token_mask, query_mask, grid)
        return prepared, self._positions(target, prepared)

    def _positions(self, target, inputs: FusionInputs) -> list[int]:
        """Validate ``target``; for token models return the positions to explain."""
        if self.kind == "match":
            if target is not None:
                raise ValueError(
                    f"target: {type(self.model).__name__} gives one match logit per example; pass "
                    f"target=None (got {target!r})"
                )
            return []
        if self.kind == "answer":
            _answer_targets(target, inputs.input_ids.shape[0], int(self.model.config.num_labels))
            return []
        length = inputs.tokens.shape[1]
        if target is None:
            positions = [t for t in range(length) if bool(inputs.token_mask[:, t].any())]
            if not positions:
                raise ValueError("target: no token is scored (texts of one token, or score_from past the end)")
            return positions
        target = int_targets(target, "a token position or a list of positions")
        if not target:
            raise TypeError(f"target: expected a token position or a list of positions, got {target!r}")
        positions = []
        for t in target:
            if not -length < t < length or t % length == 0:
                raise ValueError(
                    f"target: position {t} has no prediction; token positions run 1..{length - 1} "
                    "(position 0 is the start token)"
                )
            positions.append(t % length)
        return sorted(set(positions))

    def _maps(
        self, inputs: FusionInputs, target, positions: list[int], show_progress: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token grids ``[B, T, h, w]``, which tokens have one ``[B, T]`` and the aggregate
        grid ``[B, h, w]``. With query image tokens each score's maps reach the grid through its
        own bridge (:meth:`_bridge`)."""
        own = self._modules()
        modules, n_own = own + self._bridge_modules(), len(own)
        pixels = inputs.pixel_values.detach().clone().requires_grad_(True)
        b, length = inputs.tokens.shape
        with ExitStack() as stack:
            record = stack.enter_context(capture(self.model, attentions=modules, grads=False, freeze_parameters=True))
            stack.enter_context(torch.enable_grad())
            layout = stack.enter_context(self.adapter.image_layout(inputs.pixel_values, inputs.input_ids))
            embeddings = [self.adapter.text_embedding()] + ([self.adapter.answer_embedding()] if self.takes_answer_ids else [])
            if n_own < len(modules):  # learned queries: their embedding starts the bridge
                embeddings.append(self.adapter.bridge_embedding())
            for embedding in embeddings:  # capture removes these hooks
                embedding.register_forward_hook(_text_requires_grad)
            output = self.forward_func(pixels, *inputs.args)
            inputs.layout = layout()
            attentions = record.attentions
            if self.kind == "tokens":
                per_token = None
                token_grads = _token_grads(output, positions, attentions)
                for t, grads in tqdm(token_grads, desc=type(self).__name__, unit="token", total=len(positions),
                                     disable=not show_progress, leave=False):
                    rows = self._row_maps(attentions[:n_own], grads[:n_own], inputs)
                    reduced = self._reduce_rows(rows, inputs, t).detach()
                    grid = self._to_grid(reduced[:, None], inputs, attentions[n_own:], grads[n_own:])[:, 0]
                    if per_token is None:
                        per_token = grid.new_zeros(b, length, *grid.shape[1:])
                    per_token[:, t] = grid
                per_token = per_token * inputs.token_mask[:, :, None, None]
                chosen = torch.zeros_like(inputs.token_mask)
                chosen[:, positions] = True
                has_map = chosen & inputs.token_mask
                aggregate = per_token.sum(1) / has_map.sum(1)[:, None, None].clamp_min(1)
            else:
                if self.kind == "answer":
                    labels = _answer_targets(target, b, output.shape[1]).to(output.device)
                    score = output.gather(1, labels[:, None]).sum()
                else:
                    score = output.sum()
                grads = _grads(score, attentions)
                rows = self._row_maps(attentions[:n_own], grads[:n_own], inputs).detach()
                has_map = inputs.token_mask
                bridge = attentions[n_own:], grads[n_own:]
                per_token = self._to_grid(rows[:, :length] * has_map[:, :, None], inputs, *bridge)
                aggregate = self._to_grid(self._reduce_rows(rows, inputs, None)[:, None], inputs, *bridge)[:, 0]
        return per_token, has_map, aggregate

    def _to_grid(
        self, values: torch.Tensor, inputs: FusionInputs, attentions: Sequence[torch.Tensor] = (),
        grads: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """Image columns of ``values`` ``[B, R, K]`` onto the patch grid ``[B, R, h, w]``; query
        image tokens through the bridge of the score whose bridge attentions and gradients
        these are."""
        if not inputs.layout.needs_bridge:
            return inputs.layout.to_grid(values)
        return inputs.layout.to_grid(values, self._bridge(list(attentions), list(grads), inputs).detach())

    def _finish(self, grid: torch.Tensor, inputs: FusionInputs, return_grid: bool, upsample: str) -> torch.Tensor:
        return self.finish(grid.to(inputs.pixel_values.dtype), inputs.pixel_values, return_grid, upsample)


def _token_grads(
    output: torch.Tensor, positions: list[int], attentions: list[torch.Tensor], chunk: int | None = None
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """For each position t, ``d output[:, t].sum() / d A`` for each recorded attention (as
    :func:`_grads`), ``chunk`` (default ``TOKEN_CHUNK``) positions sharing one batched backward (a
    vector-Jacobian product with ``is_grads_batched``); one backward per position if an operation
    has no batching rule.

    Yields:
        ``(t, grads)`` in the order of ``positions``.
    """
    chunk = TOKEN_CHUNK if chunk is None else chunk
    needed = [i for i, a in enumerate(attentions) if a.requires_grad]
    for start in range(0, len(positions), chunk):
        part = positions[start : start + chunk]
        if len(part) == 1 or not needed:
            for t in part:
                yield t, _grads(output[:, t].sum(), attentions)
            continue
        one_hot = output.new_zeros(len(part), *output.shape)
        for j, t in enumerate(part):
            one_hot[j, :, t] = 1
        try:
            found = torch.autograd.grad(output, [attentions[i] for i in needed], grad_outputs=one_hot,
                                        retain_graph=True, allow_unused=True, is_grads_batched=True)
        except RuntimeError:  # an operation without a batching rule: one backward per position
            for t in part:
                yield t, _grads(output[:, t].sum(), attentions)
            continue
        for j, t in enumerate(part):
            grads = [torch.zeros_like(a) for a in attentions]
            for i, g in zip(needed, found):
                if g is not None:
                    grads[i] = g[j]
            yield t, grads


def _grads(score: torch.Tensor, attentions: list[torch.Tensor]) -> list[torch.Tensor]:
    """``d score / d A`` for each recorded attention (zeros where the score does not depend on it)."""
    needed = [i for i, a in enumerate(attentions) if a.requires_grad]
    found = torch.autograd.grad(score, [attentions[i] for i in needed], retain_graph=True, allow_unused=True)
    grads = [torch.zeros_like(a) for a in attentions]
    for i, g in zip(needed, found):
        if g is not None:
            grads[i] = g
    return grads


def _answer_targets(target: object, batch: int, n_answers: int) -> torch.Tensor:
    """ViLT VQA ``target`` (label id, one per example) to ``[B]`` long."""
    if target is None:
        raise ValueError(
            "target: say which answer to explain, its label id (model.config.label2id[answer]), one "
            "int or one per example"
        )
    single = isinstance(target, int) or (isinstance(target, torch.Tensor) and target.dim() == 0)
    target = int_targets(target, "an answer label id or a list of them")
    if single:
        target = target * batch
    if len(target) != batch:
        raise ValueError(f"target: {len(target)} answers for {batch} examples; give one per example or one int")
    for t in target:
        if not 0 <= t < n_answers:
            raise ValueError(f"target: answer id {t} is out of range for {n_answers} answers (0..{n_answers - 1})")
    return torch.tensor(target, dtype=torch.long)


def _word_groups(word_ids, token_groups, shape: torch.Size) -> list[list[list[int]]] | None:
    """Token positions of each word, per example: ``groups[b][w]``."""
    b, length = shape
    if word_ids is not None and token_groups is not None:
        raise ValueError("word_ids, token_groups: give one way of merging tokens into words, not both")
    if token_groups is not None:
        if not isinstance(token_groups, (list, tuple)) or not token_groups or not all(
            isinstance(g, (list, tuple)) and g for g in token_groups
        ):
            raise TypeError(f"token_groups: expected a non-empty list of non-empty lists of positions, got {token_groups!r}")
        for group in token_groups:
            for p in group:
                if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < length:
                    raise ValueError(f"token_groups: position {p!r} is not a token position 0..{length - 1}")
        return [[list(g) for g in token_groups] for _ in range(b)]
    if word_ids is None:
        return None
    if not isinstance(word_ids, (list, tuple)) or not word_ids:
        raise TypeError(f"word_ids: expected the tokenizer's word_ids() list (or one per example), got {word_ids!r}")
    rows = list(word_ids) if isinstance(word_ids[0], (list, tuple)) else [list(word_ids)] * b
    if len(rows) != b:
        raise ValueError(f"word_ids: {len(rows)} lists for {b} examples; give one per example or one for all")
    groups = []
    for row in rows:
        if len(row) != length:
            raise ValueError(f"word_ids: {len(row)} entries for {length} tokens; give one per token (None for special)")
        words: dict[int, list[int]] = {}
        for p, w in enumerate(row):
            if w is None:
                continue
            if isinstance(w, bool) or not isinstance(w, int):
                raise TypeError(f"word_ids: expected ints or None, got {w!r}")
            words.setdefault(w, []).append(p)
        groups.append([words[w] for w in sorted(words)])
    return groups


def _merge(per_token: torch.Tensor, has_map: torch.Tensor, groups: list[list[list[int]]]) -> torch.Tensor:
    """Mean of each group's token maps over its tokens that have one: ``[B, T, ...]`` to ``[B, W, ...]``."""
    n_words = max(len(g) for g in groups)
    out = per_token.new_zeros(per_token.shape[0], n_words, *per_token.shape[2:])
    for i, words in enumerate(groups):
        for w, positions in enumerate(words):
            keep = [p for p in positions if has_map[i, p]]
            if keep:
                out[i, w] = per_token[i, keep].mean(0)
    return out
