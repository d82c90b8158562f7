"""``explain()``: pick the adapter and the target, run the methods, return an Explanation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from captum_vlm._checks import check_count
from captum_vlm.adapters import get_adapter
from captum_vlm.explain.answering import Answers, answer_questions
from captum_vlm.explain.explanation import Explanation
from captum_vlm.explain.registry import METHODS, ExplainContext, MapRecord, method_names


def _as_image(image: Any) -> Image.Image:
    if isinstance(image, (str, Path)):
        return Image.open(image).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray) and image.ndim == 3:
        return Image.fromarray(image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).astype(np.uint8))
    raise TypeError(f"image: expected a PIL image, an (H, W, 3) array or a path, got {type(image).__name__}")


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
    methods: Sequence[str] = ("grad-eclip",),
    target: int | Sequence[int] | None = None,
    *,
    model_name: str | None = None,
    show_progress: bool = False,
    max_new_tokens: int = 10,
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
        methods: registry names, see :func:`method_names`.
        target: which prompts to explain (index or list); ``None`` explains all.
        model_name: name for titles (default: the checkpoint's folder or the class name).
        show_progress: a tqdm bar over methods.
        max_new_tokens: VQA and generative models: longest answer generated (greedy).

    Returns:
        An :class:`Explanation`.
    """
    adapter = get_adapter(model)
    picture = _as_image(image)
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise ValueError(f"texts: expected a non-empty list of strings, got {texts!r}")
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"texts: every text must be a non-empty string, got {list(texts)!r}")
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
        targets = [target] if isinstance(target, int) else list(target)
        bad = [t for t in targets if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < len(texts)]
        if bad or not targets:
            raise ValueError(f"target: {bad or targets} out of range for {len(texts)} texts (0..{len(texts) - 1})")
    images = picture if adapter.two_tower else [picture] * len(texts)  # fusion models: each text with the image
    inputs = processor(images=images, text=list(texts), return_tensors="pt", padding=adapter.text_padding)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokens = [tokenizer.convert_ids_to_tokens(row.tolist()) for row in inputs["input_ids"]]
    check_count(max_new_tokens, "max_new_tokens")
    answers = None
    if adapter.answers_questions:
        answers = answer_questions(model, tokenizer, dict(inputs), max_new_tokens=max_new_tokens)
    context = ExplainContext(model, adapter, dict(inputs), list(texts), targets, tokens, show_progress, answers)
    records: list[MapRecord] = []
    for name in tqdm(methods, desc="methods", disable=not show_progress):
        for record in METHODS[name].run(context):
            record.method = name
            records.append(record)
    scores, kind = _model_scores(model, adapter, inputs, texts, answers)
    return Explanation(
        image=picture,
        texts=list(texts),
        records=records,
        scores=scores,
        score_kind=kind,
        model_name=model_name or _model_name(model),
        crop_box=processor_crop_box(processor, picture.size),
        notes={m: METHODS[m].limits for m in methods},
    )


def _model_scores(model, adapter, inputs, texts, answers: Answers | None) -> tuple[dict[str, float], str]:
    from captum_vlm.targets import ImageTextSimilarity, MatchLogit, TokenLogProbs

    pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    if answers is not None:
        return {f"{q} → {a}": p for q, a, p in zip(texts, answers.texts, answers.probabilities)}, "answer probability"
    task = adapter.task
    with torch.no_grad():
        if task == "similarity":
            logits = ImageTextSimilarity(model)(pixels, ids, mask)[0]
            kind = "probability over prompts" if adapter.probability == "softmax" else f"{adapter.probability} probability"
            return dict(zip(texts, adapter.to_probability(logits).tolist())), kind
        if task == "match":
            return dict(zip(texts, adapter.to_probability(MatchLogit(model)(pixels, ids, mask)).tolist())), "match probability"
        if task == "caption":
            return dict(zip(texts, TokenLogProbs(model, reduction="sum")(pixels, ids, mask).tolist())), "log-probability"
    return {}, "score"
