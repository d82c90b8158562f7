"""The scalar being explained, as a Captum ``forward_func``.

Each target is a callable whose first argument is what gets attributed and whose remaining
arguments arrive through Captum's ``additional_forward_args``; it returns one row per example,
and Captum's ``target`` picks the column:

* :class:`ImageTextSimilarity` — ``pixel_values -> logits [B, K]`` over K prompts (a zero-shot
  classifier; ``target=k`` explains prompt k). The prompts are encoded once and cached.
* :class:`TextImageSimilarity` — the mirror: ``input_ids -> logits [K, M]`` against M fixed images.
* :class:`MatchLogit` — BLIP/ViLT image–text matching logit ``[B]``.
* :class:`AnswerLogits` — ViLT VQA answer-classifier logits ``[B, num_answers]``.
* :class:`TokenLogProbs` — teacher-forced log-probabilities of caption/answer tokens ``[B, T]``
  (BLIP captioning, BLIP VQA, LLaVA), or their sum ``[B]``.

Example:
    >>> sim = ImageTextSimilarity(model)                                  # doctest: +SKIP
    >>> sim(pixel_values, input_ids, attention_mask).shape               # doctest: +SKIP
    torch.Size([1, 2])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from captum_vlm._checks import check_input_ids, check_pixel_values, check_same_batch
from captum_vlm.adapters import get_adapter
from captum_vlm.adapters.base import classes_with_decoder

__all__ = [
    "ImageTextSimilarity",
    "TextImageSimilarity",
    "MatchLogit",
    "AnswerLogits",
    "TokenLogProbs",
    "default_target",
]


class _Target:
    def __init__(self, model: nn.Module):
        self.adapter = get_adapter(model)
        self.model = self.adapter.model

    def _check_text(self, input_ids, attention_mask):
        return check_input_ids(input_ids, attention_mask, max_length=self.adapter.max_text_length())


class ImageTextSimilarity(_Target):
    """Two-tower similarity logits of images against K prompts: a zero-shot classifier.

    ``forward(pixel_values, input_ids, attention_mask=None)`` returns the model's
    ``logits_per_image`` ``[B, K]``. The text side is encoded once (without gradients) and reused
    while the same ``input_ids``/``attention_mask`` come in, so Captum's repeated forwards only
    run the image tower.

    Args:
        model: ``CLIPModel`` or ``SiglipModel``.
        interpolate_pos_encoding: pass through to the vision tower (non-square or resized inputs).
    """

    def __init__(self, model: nn.Module, interpolate_pos_encoding: bool = False):
        super().__init__(model)
        if not self.adapter.two_tower:
            raise TypeError(
                f"model: ImageTextSimilarity needs a two-tower model (CLIP, SigLIP), got "
                f"{type(self.model).__name__}; use MatchLogit or TokenLogProbs for fusion models"
            )
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected text embeddings ``[K, D]``, computed once per distinct prompt batch."""
        input_ids, attention_mask = self._check_text(input_ids, attention_mask)
        if self._cache is not None:
            ids, mask, embeds = self._cache
            if ids.shape == input_ids.shape and torch.equal(ids, input_ids) and torch.equal(mask, attention_mask):
                return embeds
        with torch.no_grad():
            embeds = self.adapter.text_embeds(input_ids, attention_mask)
        self._cache = (input_ids.clone(), attention_mask.clone(), embeds)
        return embeds

    def __call__(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_pixel_values(pixel_values)
        text = self.text_embeds(input_ids, attention_mask)
        image = self.adapter.image_embeds(pixel_values, interpolate_pos_encoding=self.interpolate_pos_encoding)
        return self.adapter.similarity_logits(image, text)


class TextImageSimilarity(_Target):
    """The mirror form: similarity logits of K texts against M fixed images, ``[K, M]``.

    ``forward(input_ids, pixel_values, attention_mask=None)``; ``target=m`` explains image m.
    The image side is encoded once (without gradients) and cached.

    Args:
        model: ``CLIPModel`` or ``SiglipModel``.
        interpolate_pos_encoding: pass through to the vision tower.
    """

    def __init__(self, model: nn.Module, interpolate_pos_encoding: bool = False):
        super().__init__(model)
        if not self.adapter.two_tower:
            raise TypeError(
                f"model: TextImageSimilarity needs a two-tower model (CLIP, SigLIP), got {type(self.model).__name__}"
            )
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        check_pixel_values(pixel_values)
        if self._cache is not None and self._cache[0].shape == pixel_values.shape and torch.equal(
            self._cache[0], pixel_values
        ):
            return self._cache[1]
        with torch.no_grad():
            embeds = self.adapter.image_embeds(pixel_values, interpolate_pos_encoding=self.interpolate_pos_encoding)
        self._cache = (pixel_values.detach().clone(), embeds)
        return embeds

    def __call__(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        input_ids, attention_mask = self._check_text(input_ids, attention_mask)
        image = self.image_embeds(pixel_values)
        text = self.adapter.text_embeds(input_ids, attention_mask)
        return self.adapter.similarity_logits(image, text).t()


class MatchLogit(_Target):
    """Image–text matching logit ``[B]`` for fusion models.

    * BLIP (``BlipForImageTextRetrieval``): the ITM head's log-odds of "match",
      ``itm_score[:, 1] - itm_score[:, 0]`` (the logit of the softmax match probability).
    * ViLT (``ViltForImageAndTextRetrieval``): the retrieval head's logit.

    ``forward(pixel_values, input_ids, attention_mask=None)``; one caption per image.
    """

    _FAMILIES = ("BlipForImageTextRetrieval", "ViltForImageAndTextRetrieval")

    def __init__(self, model: nn.Module, interpolate_pos_encoding: bool = False):
        super().__init__(model)
        if type(self.model).__name__ not in self._FAMILIES:
            raise TypeError(
                f"model: MatchLogit supports {', '.join(self._FAMILIES)}, got {type(self.model).__name__}"
            )
        self.interpolate_pos_encoding = interpolate_pos_encoding

    def __call__(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_pixel_values(pixel_values)
        input_ids, attention_mask = self._check_text(input_ids, attention_mask)
        check_same_batch(pixel_values=pixel_values, input_ids=input_ids)
        if self.adapter.family == "blip":
            score = self.model(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                use_itm_head=True,
                interpolate_pos_encoding=self.interpolate_pos_encoding,
            ).itm_score
            return score[:, 1] - score[:, 0]
        return self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask).logits[:, 0]


class AnswerLogits(_Target):
    """ViLT VQA answer logits ``[B, num_answers]``; ``target`` is the answer's label id
    (``model.config.label2id[answer]``).

    ``forward(pixel_values, input_ids, attention_mask=None)``.
    """

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if type(self.model).__name__ != "ViltForQuestionAnswering":
            raise TypeError(f"model: AnswerLogits needs ViltForQuestionAnswering, got {type(self.model).__name__}")

    def __call__(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_pixel_values(pixel_values)
        input_ids, attention_mask = self._check_text(input_ids, attention_mask)
        check_same_batch(pixel_values=pixel_values, input_ids=input_ids)
        return self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask).logits


class TokenLogProbs(_Target):
    """Teacher-forced log-probabilities of caption or answer tokens.

    Column ``t`` of the ``[B, T]`` output is ``log p(tokens[t] | tokens[<t], image)`` for the
    scored tokens and 0 elsewhere (position 0, padding, image placeholders, a prefix-LM's prefix,
    and any prompt before ``score_from``). ``reduction="sum"`` returns their sum ``[B]`` instead.

    * captioning (``BlipForConditionalGeneration``): ``forward(pixel_values, input_ids,
      attention_mask=None)``; the caption's first token is replaced by the decoder start token,
      as ``generate`` does.
    * separate answer tokens (``BlipForQuestionAnswering``): ``forward(pixel_values, input_ids,
      attention_mask, answer_ids, answer_attention_mask=None)``; the question is ``input_ids``,
      columns follow ``answer_ids`` (first token replaced by the decoder start token).
    * generative models with the image tokens in ``input_ids`` (LLaVA, BLIP-2, InstructBLIP,
      PaliGemma, Gemma 3): ``forward(pixel_values, input_ids, attention_mask=None, *extra)`` with
      the image placeholders left intact; ``extra`` are the processor outputs the adapter names in
      :attr:`~captum_vlm.adapters.VLMAdapter.extra_text_inputs` (PaliGemma's optional
      ``token_type_ids``, 0 on the prefix its attention sees both ways, 1 on the scored suffix;
      InstructBLIP's required ``qformer_input_ids, qformer_attention_mask``).

    Args:
        model: a model whose adapter's task scores tokens (``caption``, ``answer_tokens``,
            ``generate``).
        reduction: ``None`` for per-token ``[B, T]``, ``"sum"`` for ``[B]``.
        score_from: score only positions ``>= score_from`` (e.g. the answer after a prompt).
        interpolate_pos_encoding: pass through to the vision tower, for inputs of another size
            than the trained one (generative models: ``input_ids`` then hold one placeholder per
            patch of that size).
    """

    def __init__(self, model: nn.Module, reduction: str | None = None, score_from: int = 1,
                 interpolate_pos_encoding: bool = False):
        super().__init__(model)
        if not isinstance(interpolate_pos_encoding, bool):
            raise TypeError(f"interpolate_pos_encoding: expected a bool, got {interpolate_pos_encoding!r}")
        if not self.adapter.has_decoder:
            raise TypeError(f"model: TokenLogProbs supports {', '.join(classes_with_decoder())}, "
                            f"got {type(self.model).__name__}")
        if reduction not in (None, "sum"):
            raise ValueError(f"reduction: expected None or 'sum', got {reduction!r}")
        if not isinstance(score_from, int) or score_from < 1:
            raise ValueError(f"score_from: expected an int >= 1 (position 0 has no prediction), got {score_from!r}")
        if interpolate_pos_encoding and not self.adapter.interpolates_positions:
            raise ValueError(f"interpolate_pos_encoding: {type(self.model).__name__} takes only its trained image "
                             "size (its forward does not interpolate the vision tower's positions); leave it False")
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self.kind = self.adapter.task
        self.reduction = reduction
        self.score_from = score_from

    def logits(self, pixel_values, input_ids, attention_mask=None, *extra):
        """Next-token logits ``[B, T, V]`` aligned with the scored token sequence, it, and its mask.

        ``extra``: ``(answer_ids, answer_attention_mask)`` for separate answer tokens, else the
        adapter's :attr:`~captum_vlm.adapters.VLMAdapter.extra_text_inputs`."""
        check_pixel_values(pixel_values)
        input_ids, attention_mask = self._check_text(input_ids, attention_mask)
        check_same_batch(pixel_values=pixel_values, input_ids=input_ids)
        if self.kind == "caption":
            tokens = input_ids.clone()
            tokens[:, 0] = self.model.config.text_config.bos_token_id
            logits = self.model(pixel_values=pixel_values, input_ids=tokens, attention_mask=attention_mask,
                                interpolate_pos_encoding=self.interpolate_pos_encoding).logits
            return logits, tokens, attention_mask
        if self.kind == "answer_tokens":
            answer_ids = extra[0] if extra else None
            answer_attention_mask = extra[1] if len(extra) > 1 else None
            if answer_ids is None:
                raise ValueError("answer_ids: BlipForQuestionAnswering needs the answer tokens to score")
            answer_ids, answer_attention_mask = check_input_ids(
                answer_ids, answer_attention_mask, name="answer_ids", max_length=self.adapter.max_text_length()
            )
            check_same_batch(pixel_values=pixel_values, answer_ids=answer_ids)
            tokens = answer_ids.clone()
            tokens[:, 0] = self.model.config.text_config.bos_token_id
            image = self.model.vision_model(pixel_values=pixel_values,
                                            interpolate_pos_encoding=self.interpolate_pos_encoding).last_hidden_state
            image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
            question = self.model.text_encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=image,
                encoder_attention_mask=image_mask,
            ).last_hidden_state
            logits = self.model.text_decoder(
                input_ids=tokens,
                attention_mask=answer_attention_mask,
                encoder_hidden_states=question,
                encoder_attention_mask=attention_mask,
            ).logits
            return logits, tokens, answer_attention_mask
        self.adapter.check_image_tokens(pixel_values, input_ids)
        extra_inputs = self.adapter.language_kwargs(input_ids, extra)
        if self.interpolate_pos_encoding:  # only when asked: not every tower's forward takes it
            extra_inputs["interpolate_pos_encoding"] = True
        logits = self.model(**self.adapter.model_inputs(pixel_values, input_ids, attention_mask, extra),
                            **extra_inputs).logits
        return logits, input_ids, attention_mask

    @property
    def scores_input_ids(self) -> bool:
        """The scored tokens are ``input_ids`` themselves (captions, LLaVA), not separate
        ``answer_ids``."""
        return not self.adapter.takes_answer_ids

    def score_mask(self, tokens: torch.Tensor, mask: torch.Tensor, *extra) -> torch.Tensor:
        """Which positions of ``tokens`` are scored ``[B, T]`` (bool); ``extra`` as in
        :meth:`logits` (the adapter reads a prefix-LM's prefix from it)."""
        scored = mask.bool().clone()
        scored[:, : self.score_from] = False
        if self.adapter.image_tokens_in_input_ids:
            scored &= ~self.adapter.unscored_positions(tokens, extra)
        return scored

    def __call__(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *extra: torch.Tensor | None,
    ) -> torch.Tensor:
        logits, tokens, mask = self.logits(pixel_values, input_ids, attention_mask, *extra)
        if logits.dtype in (torch.float16, torch.bfloat16):  # half models: the softmax in float32
            logits = logits.float()
        log_probs = F.log_softmax(logits[:, :-1], dim=-1)
        picked = log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        per_token = torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)
        per_token = per_token * self.score_mask(tokens, mask, *extra)
        return per_token.sum(dim=1) if self.reduction == "sum" else per_token


def default_target(model: nn.Module | _Target) -> _Target:
    """The target a method explains when given a bare model, from its adapter's task.

    * ``"similarity"`` (CLIP, SigLIP): :class:`ImageTextSimilarity` (``target=k``: prompt k);
    * ``"match"`` (BLIP retrieval, ViLT retrieval): :class:`MatchLogit` (``target=None``);
    * ``"answer_label"`` (ViLT VQA): :class:`AnswerLogits` (``target``: answer id);
    * token tasks (BLIP captioning, BLIP VQA, LLaVA): ``TokenLogProbs(model, reduction="sum")``.

    A target instance is returned as it is.

    Example:
        >>> default_target(clip_model)                                     # doctest: +SKIP
        <captum_vlm.targets.ImageTextSimilarity object at ...>
    """
    if isinstance(model, TextImageSimilarity):
        raise TypeError(
            "model: TextImageSimilarity takes input_ids first; these methods take pixel_values first, so "
            "pass the model (or ImageTextSimilarity) and choose the text side with modality='text'"
        )
    if isinstance(model, _Target):
        return model
    adapter = get_adapter(model)
    task = adapter.task
    if task == "similarity":
        return ImageTextSimilarity(adapter.model)
    if task == "match":
        return MatchLogit(adapter.model)
    if task == "answer_label":
        return AnswerLogits(adapter.model)
    if adapter.scores_tokens:
        return TokenLogProbs(adapter.model, reduction="sum")
    raise TypeError(f"model: no default target for {type(adapter.model).__name__}; pass a target from captum_vlm.targets")
