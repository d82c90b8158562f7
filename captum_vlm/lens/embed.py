"""Embed images and texts into a model's joint space, batch by batch, without gradients."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from captum_vlm._checks import check_count
from captum_vlm.adapters import VLMAdapter, get_adapter
from captum_vlm.hooks import preserved_model_state
from captum_vlm.lens.embeddings import Embeddings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def joint_embedding_classes() -> list[str]:
    """The model classes whose adapter gives a joint image-text embedding space."""
    found: set[str] = set()
    stack = [VLMAdapter]
    while stack:
        cls = stack.pop()
        found.update(cls.joint_embedding_classes)
        stack.extend(cls.__subclasses__())
    return sorted(found)


def _model_name(model: nn.Module) -> str:
    """The checkpoint's folder name, else the class name."""
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return Path(path).name or type(model).__name__


def _joint_adapter(model: nn.Module) -> VLMAdapter:
    supported = ", ".join(joint_embedding_classes())
    try:
        adapter = get_adapter(model)
    except TypeError as err:
        raise TypeError(f"model: {type(model).__name__} has no joint image-text embedding space; "
                        f"supported classes: {supported}") from err
    if not adapter.has_joint_embeddings:
        raise TypeError(f"model: {type(model).__name__} has no joint image-text embedding space; "
                        f"supported classes: {supported}")
    return adapter


def _image_items(images: Any) -> list[Any]:
    """A list of image items from a list, or the image files of a folder."""
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise ValueError(f"images: {str(images)!r} is not a folder; give a folder or a list of images")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"images: the folder {str(folder)!r} holds no image files {IMAGE_SUFFIXES}")
        return files
    if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)):
        return [images]
    if not isinstance(images, Sequence):
        raise TypeError(f"images: expected a list of PIL images, arrays or paths, or a folder, got "
                        f"{type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images: the list is empty; give at least one image or leave images=None")
    return list(images)


def _source(item: Any, index: int) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"image {index}"


def to_pil(item: Any, index: int) -> Image.Image:
    """One image item (PIL image, ``HxW[x3]`` array or tensor, or path) as an RGB PIL image."""
    name = f"images[{index}]"
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise ValueError(f"{name}: no such image file {str(path)!r}")
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError as err:
            raise ValueError(f"{name}: cannot read {str(path)!r} as an image ({err})") from err
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if not isinstance(item, np.ndarray):
        raise TypeError(f"{name}: expected a PIL image, an array or a path, got {type(item).__name__}")
    if item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (1, 3, 4)):
        raise ValueError(f"{name}: expected an array [H, W] or [H, W, 3], got shape {item.shape}")
    if item.dtype != np.uint8:
        values = item.astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"{name}: the array holds NaN or infinite values")
        if values.min() < 0 or values.max() > 255:
            raise ValueError(f"{name}: expected values in [0, 1] or [0, 255], got "
                             f"[{values.min():.3g}, {values.max():.3g}]")
        item = np.rint(values * 255 if values.max() <= 1.0 else values).astype(np.uint8)
    if item.ndim == 3 and item.shape[2] == 1:
        item = item[:, :, 0]
    return Image.fromarray(item).convert("RGB")


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence):
        raise TypeError(f"texts: expected a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("texts: the list is empty; give at least one text or leave texts=None")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"texts: entries {bad[:5]} are not non-empty strings")
    return list(texts)


def _check_labels(labels: Any, count: int, name: str, what: str) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise TypeError(f"{name}: expected a list of {count} labels, got {type(labels).__name__}")
    if len(labels) != count:
        raise ValueError(f"{name}: got {len(labels)} labels for {count} {what}; give one per {what[:-1]}")
    return [str(label) for label in labels]


def check_pairs(pairs: Any, n_images: int, n_texts: int) -> list[int] | None:
    """``pairs``: None, ``"diagonal"`` (image i with text i) or one text index per image."""
    if pairs is None:
        return None
    if isinstance(pairs, str):
        if pairs != "diagonal":
            raise ValueError(f"pairs: expected None, 'diagonal' or a list of text indices, got {pairs!r}")
        if n_images != n_texts:
            raise ValueError(f"pairs: 'diagonal' needs as many texts as images, got {n_images} images "
                             f"and {n_texts} texts")
        return list(range(n_images))
    if not isinstance(pairs, (Sequence, np.ndarray, torch.Tensor)):
        raise TypeError(f"pairs: expected a list of text indices, got {type(pairs).__name__}")
    pairs = [int(p) for p in pairs]
    if len(pairs) != n_images:
        raise ValueError(f"pairs: got {len(pairs)} entries for {n_images} images; give one text index per image")
    bad = [p for p in pairs if not 0 <= p < n_texts]
    if bad:
        raise ValueError(f"pairs: text indices {bad[:5]} are out of range for {n_texts} texts")
    return pairs


def _batches(items: list, batch_size: int) -> Iterator[tuple[int, list]]:
    for start in range(0, len(items), batch_size):
        yield start, items[start : start + batch_size]


def _thumbnail(image: Image.Image, size: int) -> Image.Image:
    thumb = image.copy()
    thumb.thumbnail((size, size))
    return thumb


def embed(
    model: nn.Module,
    processor: Any,
    images: Any = None,
    texts: Any = None,
    *,
    image_labels: Sequence[str] | None = None,
    text_labels: Sequence[str] | None = None,
    pairs: str | Sequence[int] | None = None,
    batch_size: int = 32,
    thumbnail_size: int | None = 48,
    model_name: str | None = None,
    show_progress: bool = False,
) -> Embeddings:
    """Embed images and texts into the model's joint space (unit-normalised rows).

    Images are loaded, processed and embedded ``batch_size`` at a time, so memory is bounded
    by the batch, not by the number of images. Runs under ``torch.no_grad()`` in eval mode and
    leaves the model as it found it.

    Args:
        model: a model with a joint embedding space (see :func:`joint_embedding_classes`):
            CLIP, SigLIP, or BLIP ITM through its contrastive heads ``vision_proj``/``text_proj``.
        processor: the model's processor.
        images: PIL images, ``[H, W, 3]`` arrays (uint8, or floats in [0, 1]), paths, or a folder.
        texts: strings.
        image_labels: optional label per image (colours the projections).
        text_labels: optional label per text.
        pairs: which text belongs to which image: ``"diagonal"`` or ``pairs[i]`` = text index.
        batch_size: images (or texts) per forward pass.
        thumbnail_size: longest side of the thumbnails kept for the views, in pixels (about
            7 KB per image at 48); None keeps none (the views then draw no thumbnails).
        model_name: name for titles (default: the checkpoint's folder name, else the class).
        show_progress: draw a tqdm bar over the batches.

    Returns:
        :class:`Embeddings`.

    Raises:
        TypeError: the model has no joint embedding space (the message lists supported classes).
        ValueError: empty lists, labels or pairs of the wrong length, unreadable or NaN images.

    Example:
        >>> emb = embed(model, processor, images=[scene.pil()], texts=["a red circle"])  # doctest: +SKIP
        >>> emb.image.shape, emb.text.shape                                            # doctest: +SKIP
    """
    adapter = _joint_adapter(model)
    check_count(batch_size, "batch_size")
    if thumbnail_size is not None:
        check_count(thumbnail_size, "thumbnail_size")
    if images is None and texts is None:
        raise ValueError("images, texts: give images, texts or both")
    items = _image_items(images) if images is not None else []
    text_list = _check_texts(texts) if texts is not None else []
    image_labels = _check_labels(image_labels, len(items), "image_labels", "images")
    text_labels = _check_labels(text_labels, len(text_list), "text_labels", "texts")
    pairs = check_pairs(pairs, len(items), len(text_list))
    if pairs is not None and not items:
        raise ValueError("pairs: no images were given")
    for i, item in enumerate(items):  # cheap checks of in-memory items before any work
        if not isinstance(item, (str, Path)):
            to_pil(item, i)

    image_rows, text_rows, thumbnails = [], [], []
    steps = -(-len(items) // batch_size) + -(-len(text_list) // batch_size)
    with preserved_model_state(model), torch.no_grad(), tqdm(
        total=steps, desc="embed", disable=not show_progress
    ) as bar:
        model.eval()
        for start, chunk in _batches(items, batch_size):
            pil = [to_pil(item, start + j) for j, item in enumerate(chunk)]
            # images of any size each keep their own grid (one tensor per image), others share one
            groups = [[p] for p in pil] if adapter.any_image_size else [pil]
            for group in groups:
                inputs = adapter.processor_inputs(processor(images=group, return_tensors="pt"))
                image_rows.append(adapter.image_embeddings(inputs["pixel_values"]).float())
            if thumbnail_size is not None:
                thumbnails += [_thumbnail(p, thumbnail_size) for p in pil]
            bar.update()
        for _, chunk in _batches(text_list, batch_size):
            tokens = processor(text=chunk, return_tensors="pt", padding=adapter.text_padding, truncation=True)
            text_rows.append(adapter.text_embeddings(tokens["input_ids"], tokens.get("attention_mask")).float())
            bar.update()

    dim = (image_rows or text_rows)[0].shape[1]
    scale, bias = adapter.joint_logit_scale_bias()
    return Embeddings(
        image=torch.cat(image_rows) if image_rows else torch.zeros(0, dim),
        text=torch.cat(text_rows) if text_rows else torch.zeros(0, dim),
        image_sources=[_source(item, i) for i, item in enumerate(items)],
        texts=text_list,
        thumbnails=thumbnails,
        image_labels=image_labels,
        text_labels=text_labels,
        pairs=pairs,
        logit_scale=scale,
        logit_bias=bias,
        probability=adapter.similarity_probability,
        model_name=model_name or _model_name(model),
    )
