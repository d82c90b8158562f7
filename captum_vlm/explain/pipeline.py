"""``explain()``: pick the adapter and the target, run the methods, return an Explanation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from captum_vlm._checks import check_count, check_processor, check_processor_kwargs, check_texts
from captum_vlm.adapters import get_adapter
from captum_vlm.explain.answering import Answers, answer_questions
from captum_vlm.explain.evidence import (
    VALUE_LABELS,
    attach_evidence,
    collapse_prompt_independent,
    default_methods,
)
from captum_vlm.explain.explanation import Explanation
from captum_vlm.explain.registry import METHODS, ExplainContext, MapRecord, method_names


def _as_image(image: Any) -> Image.Image:
    """A PIL image from a path, a PIL image or an ``(H, W, 3)`` array: uint8 as is, floats in
    [0, 1] times 255, floats in [0, 255] as they are; other float ranges and NaN/inf refused."""
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise ValueError(f"image: no file at {str(image)!r}")
        return Image.open(image).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3:
        return Image.fromarray(_as_uint8(image))
    shape = f" of shape {image.shape}" if isinstance(image, np.ndarray) else ""
    raise TypeError(f"image: expected a PIL image, an (H, W, 3) array or a path, got {type(image).__name__}{shape}")


def _as_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise TypeError(f"image: expected a uint8 or float array, got dtype {image.dtype}")
    if not np.isfinite(image).all():
        raise ValueError("image: the array holds NaN or infinite values; expected finite pixels")
    lo, hi = float(image.min()), float(image.max())
    if lo >= 0 and hi <= 1 and np.issubdtype(image.dtype, np.floating):
        return np.round(image * 255).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return np.round(image).astype(np.uint8)
    raise ValueError(
        f"image: values from {lo:.4g} to {hi:.4g} fit neither [0, 1] nor [0, 255]; pass the original "
        "picture (uint8, or floats in [0, 1]), not normalised pixel_values"
    )


def processor_crop_box(processor: Any, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """Region of an image of ``size`` (width, height) that ``processor`` keeps after resize and
    centre crop, in original pixels; ``None`` when it keeps (a resized copy of) the whole image."""
    from captum_vlm.viz import resize_crop_box

    ip = getattr(processor, "image_processor", processor)
    if not getattr(ip, "do_center_crop", False):
        return None
    resize = getattr(ip, "size", None) or {}
    crop = getattr(ip, "crop_size", None) or {}
    if "shortest_edge" in resize:
        resize_to: int | tuple[int, int] = int(resize["shortest_edge"])
    elif "height" in resize:
        resize_to = (int(resize["width"]), int(resize["height"]))
    else:
        return None
    crop_to = (int(crop.get("width", 0)), int(crop.get("height", 0)))
    if not all(crop_to):
        return None
    return resize_crop_box(size, resize_to, crop_to)


def _model_name(model: nn.Module) -> str:
    path = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return Path(path).name if path else type(model).__name__


def explain(
    model: nn.Module,
    processor: Any,
    image: Any,
    texts: Sequence[str],
    methods: Sequence[str] | None = None,
    target: int | Sequence[int] | None = None,
    *,
    model_name: str | None = None,
    show_progress: bool = False,
    max_new_tokens: int = 10,
    evidence: bool = True,
    logit_lens: bool = False,
    processor_kwargs: Mapping[str, Any] | None = None,
) -> Explanation:
    """Explain how ``model`` relates ``image`` to ``texts`` with one or more methods.

    Args:
        model: a supported transformers model (one with an adapter, :func:`captum_vlm.adapters.get_adapter`).
        processor: its processor (``processor(images=..., text=[...], return_tensors="pt", padding=True)``).
        image: a PIL image, an ``(H, W, 3)`` array or a path.
        texts: the prompts (two-tower models: each explained against the image; matching and
            captioning models: captions; VQA models: questions; LLaVA: prompts holding the
            image token. VQA models and LLaVA are explained through their own answer, see
            :func:`answer_questions`).
        methods: registry names, see :func:`method_names`. Default: the method the zoo
            benchmark ranks most faithful for the model's family
            (the adapter's ``default_methods``: CLIP ``relevancy``, SigLIP
            ``grad-eclip``, BLIP/ViLT/LLaVA ``bimodal-relevancy``; see ``benchmarks/RESULTS.md``).
        target: which prompts to explain (index or list); ``None`` explains all.
        model_name: name for titles (default: the checkpoint's folder or the class name).
        show_progress: a tqdm bar over methods.
        max_new_tokens: VQA and generative models: longest answer generated (greedy).
        evidence: attach each map's evidence (:mod:`captum_vlm.explain.evidence`): deletion and
            insertion AUC against random orders, the method's randomisation check, the model's
            confidence. Prompt-independent maps are kept once either way.
        logit_lens: models with a language decoder (``adapter.has_decoder``: captioning, VQA,
            generative): also lens the explained tokens of every explained text (the caption, or
            the model's own answer) at every decoder layer (:func:`captum_vlm.lens.logit_lens_scored`);
            they are ``Explanation.lenses`` and a section of the report.
        processor_kwargs: more keyword arguments for the processor call, such as Gemma 3's
            ``{"do_pan_and_scan": True}`` (the maps are then drawn on the canvas of its crops).

    Returns:
        An :class:`Explanation`.
    """
    adapter = get_adapter(model)
    if logit_lens and not adapter.has_decoder:
        from captum_vlm.adapters.base import classes_with_decoder

        raise TypeError(f"logit_lens: the logit lens needs a language decoder with an LM head; "
                        f"{type(model).__name__} has none. Classes with a decoder: {', '.join(classes_with_decoder())}")
    check_processor(processor)
    check_processor_kwargs(processor_kwargs, ("images", "text", "return_tensors", "padding"))
    picture = _as_image(image)
    texts = check_texts(texts)
    if isinstance(target, str) or isinstance(target, bool):
        raise TypeError(f"target: expected a text index (int) or a list of them, got {target!r}; "
                        "pass the text itself in texts")
    if methods is None:
        methods = default_methods(adapter, method_names(adapter))
    if isinstance(methods, str):
        methods = [methods]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods: unknown {unknown or methods!r}; choose from {method_names()}")
    unsupported = [m for m in methods if not METHODS[m].supports(adapter)]
    if unsupported:
        raise ValueError(
            f"methods: {unsupported} do not support {type(model).__name__}; for it use "
            f"{method_names(adapter)}"
        )
    if target is None:
        targets = list(range(len(texts)))
    else:
        if not isinstance(target, (int, Sequence)):
            raise TypeError(f"target: expected a text index (int) or a list of them, got {type(target).__name__}")
        targets = [target] if isinstance(target, int) else list(target)
        bad = [t for t in targets if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < len(texts)]
        if bad or not targets:
            raise ValueError(f"target: {bad or targets} out of range for {len(texts)} texts (0..{len(texts) - 1})")
        if len(set(targets)) != len(targets):
            raise ValueError(f"target: {targets} names a text more than once; give each index once")
    check_count(max_new_tokens, "max_new_tokens")
    context = explain_context(model, processor, picture, texts, targets, max_new_tokens=max_new_tokens,
                              show_progress=show_progress, processor_kwargs=processor_kwargs)
    inputs, answers, tokenizer = context.inputs, context.answers, getattr(processor, "tokenizer", processor)
    scores, kind = _model_scores(model, adapter, inputs, texts, answers)
    records: list[MapRecord] = []
    shared: dict = {}  # score functions and random-order curves, shared by the methods
    for name in tqdm(methods, desc="methods", disable=not show_progress):
        found = METHODS[name].run(context)
        for record in found:
            record.method = name
            record.details.setdefault("value", VALUE_LABELS.get(name, "attribution (method units)"))
        if evidence:
            attach_evidence(context, found, METHODS[name].run, list(scores.values()), kind, cache=shared)
        records.extend(collapse_prompt_independent(found, texts))
    lenses = _explained_lenses(model, adapter, dict(inputs), targets, texts, tokenizer, answers) if logit_lens else []
    return Explanation(
        image=picture,
        texts=list(texts),
        records=records,
        scores=scores,
        score_kind=kind,
        model_name=model_name or _model_name(model),
        crop_box=processor_crop_box(processor, picture.size),
        notes={m: METHODS[m].limits for m in methods},
        lenses=lenses,
    )


def explain_context(
    model: nn.Module,
    processor: Any,
    picture: Image.Image,
    texts: Sequence[str],
    targets: Sequence[int],
    *,
    max_new_tokens: int = 10,
    show_progress: bool = False,
    processor_kwargs: Mapping[str, Any] | None = None,
) -> ExplainContext:
    """What :func:`explain` hands each registered method: the processed image and texts and,
    for VQA and generative models, the model's own answers (no argument checks: ``explain``
    makes them).

    Args:
        model, processor: as in :func:`explain`.
        picture: the image (PIL).
        texts: the prompts, captions or questions.
        targets: indices of the texts to explain.
        max_new_tokens: longest generated answer.
        show_progress: passed on to the methods.
        processor_kwargs: more keyword arguments for the processor call.

    Returns:
        An :class:`~captum_vlm.explain.registry.ExplainContext`; ``METHODS[name].run(context)``
        gives the method's records, as inside :func:`explain`.

    Example:
        >>> context = explain_context(model, processor, image, ["a red circle"], [0])  # doctest: +SKIP
        >>> records = METHODS["grad-eclip"].run(context)                               # doctest: +SKIP
    """
    adapter = get_adapter(model)
    images = adapter.processor_images(picture, len(texts))  # fusion models: each text with the image
    inputs = adapter.processor_inputs(  # pixel_values as one image tensor [B, 3, H, W]
        processor(images=images, text=list(texts), return_tensors="pt", padding=adapter.text_padding,
                  **dict(processor_kwargs or {})))
    tokenizer = getattr(processor, "tokenizer", processor)
    tokens = [tokenizer.convert_ids_to_tokens(row.tolist()) for row in inputs["input_ids"]]
    answers = None
    if adapter.answers_questions:
        answers = answer_questions(model, tokenizer, dict(inputs), max_new_tokens=max_new_tokens)
    return ExplainContext(model, adapter, dict(inputs), list(texts), list(targets), tokens, show_progress, answers)


def _explained_lenses(model, adapter, inputs, targets, texts, tokenizer, answers: Answers | None) -> list:
    """The logit lens of the tokens each explained text's maps explain: a caption's own tokens,
    a VQA answer after its question, a generated continuation after its prompt (the same
    ``TokenLogProbs`` inputs the maps explain, see :func:`captum_vlm.lens.logit_lens_scored`)."""
    from captum_vlm.lens import logit_lens_scored

    pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    rows, starts, images = [], [], []
    for k in targets:
        if adapter.answers_questions and not adapter.takes_answer_ids:  # a continuation after the prompt
            sequence = answers.sequences[k]  # scored as the maps explain it (with e.g. InstructBLIP's instruction)
            rows.append(answers.forward_args[k] if answers.forward_args else (sequence, torch.ones_like(sequence)))
            starts.append(answers.prompt_lengths[k])
        elif adapter.takes_answer_ids:  # the answer tokens after the question (as explained: padded batch row)
            answer = answers.answer_ids[k][answers.answer_mask[k].bool()][None]
            rows.append((ids[k : k + 1], mask[k : k + 1], answer, torch.ones_like(answer)))
            starts.append(1)
        else:  # the caption's own tokens after its first
            caption = ids[k][mask[k].bool()][None]
            rows.append((caption, torch.ones_like(caption)))
            starts.append(1)
        images.append(pixels[min(k, pixels.shape[0] - 1)][None])
    lenses = logit_lens_scored(model, torch.cat(images), rows, starts, tokenizer=tokenizer)
    for lens, k in zip(lenses, targets):
        lens.prompt = texts[k]
    return lenses


def _model_scores(model, adapter, inputs, texts, answers: Answers | None) -> tuple[dict[str, float], str]:
    from captum_vlm.targets import ImageTextSimilarity, MatchLogit, TokenLogProbs

    pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    if answers is not None:
        return {f"{q} → {a}": p for q, a, p in zip(texts, answers.texts, answers.probabilities)}, "answer probability"
    task = adapter.task
    with torch.no_grad():
        if task == "similarity":
            logits = ImageTextSimilarity(model)(pixels, ids, mask)[0]
            if adapter.probability == "softmax" and len(texts) == 1:  # a softmax over one prompt is always 1
                return dict(zip(texts, logits.tolist())), "logit (one prompt: no probability over prompts)"
            kind = "probability over prompts" if adapter.probability == "softmax" else f"{adapter.probability} probability"
            return dict(zip(texts, adapter.to_probability(logits).tolist())), kind
        if task == "match":
            return dict(zip(texts, adapter.to_probability(MatchLogit(model)(pixels, ids, mask)).tolist())), "match probability"
        if task == "caption":
            return dict(zip(texts, TokenLogProbs(model, reduction="sum")(pixels, ids, mask).tolist())), "log-probability"
    return {}, "score"
