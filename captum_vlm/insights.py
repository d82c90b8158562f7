"""Our methods in Captum Insights, and visualizers for two-tower and fusion models.

Captum Insights (Kokhlikyan et al., *Captum: A unified and generic model interpretability library
for PyTorch*, 2020) is in captum <= 0.8 only; it was removed in captum 0.9 and is retired
upstream. captum 0.8 pins ``numpy<2``, so install it in an environment of its own::

    pip install "captum-vlm[insights]"

The maintained viewer of this project is the HTML report (``cv.explain(...).to_html(path)``).

Importing this module adds every captum-vlm method to Insights' method list, with its parameters
(names ``"captum-vlm <registry name>"``, see :data:`METHODS`). Insights attributes with the
*model* a visualizer holds, so the two helpers wrap a model as a classifier Insights understands:

* :func:`two_tower_visualizer`: CLIP/SigLIP as a zero-shot classifier over prompts
  (:class:`ZeroShotClassifier`, classes = prompts, ``target = k`` explains prompt k); one image
  feature.
* :func:`fusion_visualizer`: BLIP VQA as a classifier over candidate answers
  (:class:`AnswerClassifier`, the score of a class is the summed log-probability of that answer);
  an image feature and a text feature (the question).

Image attributions are ``[1, 3, H, W]`` like ``pixel_values``; text attributions one value per
question token (token IG with ``modality="both"``; the image-only methods give the text 0).

Example:
    >>> import captum_vlm.insights as cvi                                    # doctest: +SKIP
    >>> viz = cvi.two_tower_visualizer(model, processor, images, ["a red circle", "a blue square"])
    >>> viz.serve()        # http://localhost:PORT, pick "captum-vlm grad-eclip"  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from captum.attr import Attribution
from captum.log import log_usage
from torch import nn

from captum_vlm import attr
from captum_vlm.adapters import get_adapter
from captum_vlm.attr.token_ig import IG_METHODS
from captum_vlm.targets import ImageTextSimilarity, TokenLogProbs

_EXTRA = (
    "captum_vlm.insights needs Captum Insights, which only captum 0.8 has (it was removed in "
    "captum 0.9, and captum 0.8 pins numpy<2): install it in its own environment with "
    "pip install \"captum-vlm[insights]\". The maintained viewer is the HTML report: "
    "captum_vlm.explain(...).to_html(path)."
)
try:
    import flask  # noqa: F401  (Insights' server)
    import flask_compress  # noqa: F401
    from captum.insights import AttributionVisualizer, Batch
    from captum.insights.attr_vis import config as _config
    from captum.insights.attr_vis.features import ImageFeature, TextFeature
except ImportError as error:  # captum 0.9, or the extra's server packages missing
    raise ImportError(f"{_EXTRA} ({error})") from error

__all__ = [
    "METHODS",
    "AnswerClassifier",
    "InsightsMethod",
    "ZeroShotClassifier",
    "fusion_visualizer",
    "register_methods",
    "two_tower_visualizer",
]

NumberConfig, StrEnumConfig = _config.NumberConfig, _config.StrEnumConfig
PREFIX = "captum-vlm "


@dataclass(frozen=True)
class MethodSpec:
    """How one of our methods appears in Insights.

    Attributes:
        name: the registry name (``cv.method_names()``); Insights shows ``"captum-vlm " + name``.
        method: our Attribution class.
        params: Insights parameter widgets, by keyword (constructor or ``attribute`` keyword).
        post_process: converters of the widgets' values (Insights sends JSON values).
        fusion_kwargs: fixed ``attribute`` keywords for fusion classifiers.
    """

    name: str
    method: type
    params: dict[str, Any] = field(default_factory=dict)
    post_process: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    fusion_kwargs: dict[str, Any] = field(default_factory=dict)


def _layer(value: int = -1) -> NumberConfig:
    return NumberConfig(value=value, limit=(None, None))


_HEADS = StrEnumConfig(value="mean", limit=["mean", "max"])
METHODS: list[MethodSpec] = [
    MethodSpec("grad-eclip", attr.GradECLIP,
               {"layers": _layer(), "mode": StrEnumConfig(value="model", limit=["model", "paper"])},
               {"layers": int}),
    MethodSpec("raw-attention", attr.RawAttention, {"layers": _layer(), "head_fusion": _HEADS},
               {"layers": int}),
    MethodSpec("rollout", attr.AttentionRollout, {"start_layer": _layer(0), "head_fusion": _HEADS},
               {"start_layer": int}),
    MethodSpec("relevancy", attr.GradientWeightedRelevancy, {"start_layer": _layer(0)},
               {"start_layer": int}),
    MethodSpec("patch-word-similarity", attr.PatchWordSimilarity),
    MethodSpec("integrated-gradients", attr.TokenIntegratedGradients,
               {"n_steps": NumberConfig(value=25, limit=(2, None)),
                "method": StrEnumConfig(value="gausslegendre", limit=list(IG_METHODS))},
               {"n_steps": int}, fusion_kwargs={"modality": "both"}),
    MethodSpec("occlusion", attr.CausalOcclusion,
               {"window": NumberConfig(value=1, limit=(1, None)),
                "intervention": StrEnumConfig(value="drop", limit=["drop", "paint"])},
               {"window": int}),
    MethodSpec("cross-attention-gradcam", attr.CrossAttentionGradCAM, {"layer": _layer()},
               {"layer": int}),
    MethodSpec("bimodal-relevancy", attr.BimodalRelevancy),
]


class InsightsMethod(Attribution):
    """Base of the classes registered with Insights: Insights builds one with the visualizer's
    model (a :class:`ZeroShotClassifier` or :class:`AnswerClassifier`) and calls ``attribute``
    with the inputs of its features; the classifier runs our method on the model it wraps."""

    spec: MethodSpec

    def __init__(self, classifier: nn.Module):
        if not isinstance(classifier, (ZeroShotClassifier, AnswerClassifier)):
            raise TypeError(
                f"model: {self.get_name()} runs on the classifiers of captum_vlm.insights "
                f"(two_tower_visualizer, fusion_visualizer), got {type(classifier).__name__}"
            )
        self.classifier = classifier
        super().__init__(classifier)

    @classmethod
    def get_name(cls) -> str:
        return PREFIX + cls.spec.name

    @log_usage()  # Insights calls attribute.__wrapped__
    def attribute(self, inputs, additional_forward_args=None, target=None, **params) -> tuple[torch.Tensor, ...]:
        """Attributions of class ``target`` per feature: ``(image [1, 3, H, W],)`` for a two-tower
        classifier, ``(image [1, 3, H, W], text [1, T])`` for a fusion classifier."""
        for key, convert in self.spec.post_process.items():
            if key in params:
                params[key] = convert(params[key])
        accepted = inspect.signature(self.spec.method.__init__).parameters
        init = {k: v for k, v in params.items() if k in accepted}
        call = {k: v for k, v in params.items() if k not in accepted}
        return self.classifier.explain(self.spec, inputs, additional_forward_args, target, init, call)


def _target_index(target) -> int:
    if isinstance(target, torch.Tensor):
        if target.numel() != 1:
            raise ValueError(f"target: expected one class index, got a tensor of shape {tuple(target.shape)}")
        target = target.item()
    if isinstance(target, bool) or not isinstance(target, int):
        raise TypeError(f"target: expected a class index (int), got {target!r}")
    return target


class ZeroShotClassifier(nn.Module):
    """A two-tower model (CLIP, SigLIP) as a classifier over fixed prompts.

    ``forward(pixel_values)`` returns the similarity logits ``[B, K]`` of
    :class:`captum_vlm.targets.ImageTextSimilarity`; class k is prompt k.

    Args:
        model: ``CLIPModel`` or ``SiglipModel``.
        input_ids, attention_mask: the K prompts, ``[K, T]``, from the processor.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        super().__init__()
        self.similarity = ImageTextSimilarity(model)
        self.vlm = self.similarity.model
        self.register_buffer("input_ids", input_ids, persistent=False)
        self.register_buffer("attention_mask", attention_mask, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.similarity(pixel_values, self.input_ids, self.attention_mask)

    def explain(self, spec, inputs, additional_forward_args, target, init, call) -> tuple[torch.Tensor]:
        pixel_values = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
        method = spec.method(self.vlm, **init)
        heat = method.attribute(pixel_values, target=_target_index(target),
                                additional_forward_args=(self.input_ids, self.attention_mask), **call)
        return (heat,)


class AnswerClassifier(nn.Module):
    """A VQA model (BLIP) as a classifier over candidate answers.

    ``forward(pixel_values, input_ids, attention_mask)`` returns ``[B, C]``: the summed
    teacher-forced log-probability of each candidate answer
    (:class:`captum_vlm.targets.TokenLogProbs` with ``reduction="sum"``).

    Args:
        model: ``BlipForQuestionAnswering``.
        answer_ids, answer_attention_mask: the C candidate answers ``[C, A]`` from the tokenizer.
    """

    def __init__(self, model: nn.Module, answer_ids: torch.Tensor, answer_attention_mask: torch.Tensor):
        super().__init__()
        self.log_probs = TokenLogProbs(model, reduction="sum")
        if not self.log_probs.adapter.takes_answer_ids:  # the answer is scored as separate answer_ids
            from captum_vlm.adapters import classes_for_tasks

            raise TypeError(f"model: AnswerClassifier scores candidate answers of a VQA model "
                            f"({', '.join(classes_for_tasks(['answer_tokens']))}), got "
                            f"{type(self.log_probs.model).__name__}")
        self.vlm = self.log_probs.model
        self.register_buffer("answer_ids", answer_ids, persistent=False)
        self.register_buffer("answer_attention_mask", answer_attention_mask, persistent=False)

    def answer_args(self, input_ids, attention_mask, c: int) -> tuple[torch.Tensor, ...]:
        """``additional_forward_args`` of our methods for candidate ``c`` (one question)."""
        b = input_ids.shape[0]
        return (input_ids, attention_mask, self.answer_ids[c:c + 1].expand(b, -1),
                self.answer_attention_mask[c:c + 1].expand(b, -1))

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        columns = [self.log_probs(pixel_values, *self.answer_args(input_ids, attention_mask, c))
                   for c in range(self.answer_ids.shape[0])]
        return torch.stack(columns, dim=1)

    def explain(self, spec, inputs, additional_forward_args, target, init, call) -> tuple[torch.Tensor, torch.Tensor]:
        pixel_values, input_ids = inputs
        attention_mask = additional_forward_args[0] if isinstance(additional_forward_args, (tuple, list)) \
            else additional_forward_args
        c = _target_index(target)
        if not 0 <= c < self.answer_ids.shape[0]:
            raise ValueError(f"target: {c} is out of range for {self.answer_ids.shape[0]} candidate answers")
        method = spec.method(self.vlm, **init)
        result = method.attribute(pixel_values, additional_forward_args=self.answer_args(input_ids, attention_mask, c),
                                  **spec.fusion_kwargs, **call)
        if isinstance(result, tuple):  # (image, text) from one path
            return result[0], result[1]
        return result, torch.zeros(input_ids.shape, dtype=result.dtype)


def register_methods() -> list[str]:
    """Add every method of :data:`METHODS` to Insights' method list (idempotent).

    Returns:
        The names as Insights shows them.
    """
    names = []
    for spec in METHODS:
        cls = type(f"Insights_{spec.method.__name__}", (InsightsMethod,), {"spec": spec})
        _config.ATTRIBUTION_NAMES_TO_METHODS[cls.get_name()] = cls
        _config.ATTRIBUTION_METHOD_CONFIG[cls.get_name()] = _config.ConfigParameters(
            params=dict(spec.params), post_process=dict(spec.post_process))
        names.append(cls.get_name())
    return names


register_methods()


def _images(images: Sequence[Any]) -> list:
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or not images:
        raise ValueError(f"images: expected a non-empty list of images, got {type(images).__name__}")
    return list(images)


def _shown(processor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``pixel_values`` back to [0, 1] for display (undo the processor's normalisation)."""
    image_processor = getattr(processor, "image_processor", processor)
    mean = torch.tensor(getattr(image_processor, "image_mean", None) or [0.0] * 3).view(3, 1, 1)
    std = torch.tensor(getattr(image_processor, "image_std", None) or [1.0] * 3).view(3, 1, 1)
    return lambda x: (x * std + mean).clamp(0, 1)


def two_tower_visualizer(model: nn.Module, processor: Any, images: Sequence[Any], prompts: Sequence[str],
                         labels: Sequence[int] | None = None) -> AttributionVisualizer:
    """An Insights visualizer for CLIP/SigLIP as a zero-shot classifier over ``prompts``.

    Args:
        model: ``CLIPModel`` or ``SiglipModel``.
        processor: its processor.
        images: PIL images (or arrays) to show, one example each.
        prompts: the classes, e.g. ``["a red circle", "a blue square"]``.
        labels: the true prompt index of each image (Insights shows it); default the model's top
            prompt.

    Returns:
        A captum ``AttributionVisualizer``; ``.serve()`` starts the Insights page.

    Example:
        >>> two_tower_visualizer(model, processor, [image], ["a red circle"]).serve()  # doctest: +SKIP
    """
    images = _images(images)
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts: expected a non-empty list of strings, got {prompts!r}")
    # SigLIP pools the last position and is trained on texts padded to the full length
    padding = get_adapter(model).text_padding
    text = processor(text=list(prompts), return_tensors="pt", padding=padding)
    classifier = ZeroShotClassifier(model, text["input_ids"], text["attention_mask"])
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    if labels is None:
        with torch.no_grad():
            labels = classifier(pixels).argmax(1).tolist()
    if len(labels) != len(images):
        raise ValueError(f"labels: {len(labels)} labels for {len(images)} images")
    batches = [Batch(inputs=(pixels[i:i + 1],), labels=torch.tensor([labels[i]])) for i in range(len(images))]
    feature = ImageFeature("image", baseline_transforms=[lambda x: x * 0], input_transforms=[],
                           visualization_transform=_shown(processor))
    return AttributionVisualizer(models=[classifier], classes=list(prompts), features=[feature],
                                 dataset=batches, score_func=lambda out: out.softmax(-1))


def fusion_visualizer(model: nn.Module, processor: Any, images: Sequence[Any], questions: Sequence[str],
                      answers: Sequence[str], labels: Sequence[int] | None = None) -> AttributionVisualizer:
    """An Insights visualizer for BLIP VQA as a classifier over candidate ``answers``.

    Args:
        model: ``BlipForQuestionAnswering``.
        processor: its processor.
        images: the images, one per question.
        questions: one question per image.
        answers: the candidate answers (the classes), e.g. ``["red", "blue", "yes", "no"]``.
        labels: the true answer index per example; default the model's top candidate.

    Returns:
        A captum ``AttributionVisualizer`` with an image and a text feature.

    Example:
        >>> fusion_visualizer(model, processor, [image], ["what color is the circle?"],  # doctest: +SKIP
        ...                   ["red", "blue"]).serve()
    """
    images = _images(images)
    if isinstance(questions, str) or len(questions) != len(images):
        raise ValueError(f"questions: expected one question per image ({len(images)}), got {questions!r}")
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers: expected a non-empty list of candidate answers, got {answers!r}")
    tokenizer = getattr(processor, "tokenizer", processor)
    answer = tokenizer(list(answers), return_tensors="pt", padding=True)
    classifier = AnswerClassifier(model, answer["input_ids"], answer["attention_mask"])
    batches = []
    for i, (image, question) in enumerate(zip(images, questions)):
        x = processor(images=image, text=question, return_tensors="pt")
        if labels is None:
            with torch.no_grad():
                label = int(classifier(x["pixel_values"], x["input_ids"], x["attention_mask"]).argmax(1))
        else:
            label = int(labels[i])
        batches.append(Batch(inputs=(x["pixel_values"], x["input_ids"]), labels=torch.tensor([label]),
                             additional_args=(x["attention_mask"],)))
    image_feature = ImageFeature("image", baseline_transforms=[lambda x: x * 0], input_transforms=[],
                                 visualization_transform=_shown(processor))
    text_feature = TextFeature("question", baseline_transforms=[lambda x: x * 0], input_transforms=[],
                               visualization_transform=lambda ids: tokenizer.convert_ids_to_tokens(ids[0]))
    return AttributionVisualizer(models=[classifier], classes=list(answers), features=[image_feature, text_feature],
                                 dataset=batches, score_func=lambda out: out.softmax(-1))
