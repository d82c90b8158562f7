"""Argument checks shared by adapters, targets and methods.

Each check raises a ``TypeError`` or ``ValueError`` that names the argument, what was given and
what is expected, so a user never meets a shape error from deep inside torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def check_pixel_values(pixel_values: object, name: str = "pixel_values") -> torch.Tensor:
    """``pixel_values`` must be a float tensor ``[B, 3, H, W]``."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [B, 3, H, W], got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4:
        raise ValueError(
            f"{name}: expected 4 dimensions [B, 3, H, W], got shape {tuple(pixel_values.shape)}"
            + (" (add a batch dimension with .unsqueeze(0))" if pixel_values.dim() == 3 else "")
        )
    if pixel_values.shape[1] != 3:
        raise ValueError(
            f"{name}: expected 3 colour channels in dimension 1 [B, 3, H, W], got shape "
            f"{tuple(pixel_values.shape)}"
        )
    if not pixel_values.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {pixel_values.dtype}")
    if pixel_values.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty (shape {tuple(pixel_values.shape)}); give at least one image")
    check_finite(pixel_values, name)
    return pixel_values


def check_finite(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Refuse NaN or infinite values, which would silently give all-NaN maps or scores."""
    bad = ~torch.isfinite(tensor)
    if bad.any():
        raise ValueError(
            f"{name}: {int(bad.sum())} of {tensor.numel()} values are NaN or infinite; expected finite numbers"
        )
    return tensor


def vocab_size_of(embedding: torch.nn.Module | None) -> int | None:
    """Rows of the token embedding: the first ``nn.Embedding`` inside ``embedding`` (the word
    embeddings come first in every supported text model), or ``None``."""
    if embedding is None:
        return None
    if isinstance(embedding, torch.nn.Embedding):
        return embedding.num_embeddings
    for module in embedding.modules():
        if isinstance(module, torch.nn.Embedding):
            return module.num_embeddings
    return None


def check_pixel_inputs(inputs: object) -> torch.Tensor:
    """Captum's ``inputs`` of an image method: ``pixel_values`` alone, bare or as a 1-tuple."""
    if isinstance(inputs, (tuple, list)):
        if len(inputs) != 1:
            raise ValueError(f"inputs: expected pixel_values alone, got a tuple of {len(inputs)}")
        inputs = inputs[0]
    return check_pixel_values(inputs, name="inputs")


def check_choice(value: object, choices: tuple, name: str) -> None:
    """``value`` must be one of ``choices``.

    Example:
        >>> check_choice("max", ("mean", "max"), "head_fusion")
    """
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def check_count(value: object, name: str, minimum: int = 1) -> None:
    """``value`` must be an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def check_input_ids(
    input_ids: object,
    attention_mask: object = None,
    *,
    max_length: int | None = None,
    vocab_size: int | None = None,
    name: str = "input_ids",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` must be an integer tensor ``[K, T]`` with K >= 1 and ids below
    ``vocab_size``; ``attention_mask`` the same shape, of 0s and 1s (which also catches the two
    passed in the wrong order). Returns ids and a mask."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [K, T] of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
        raise TypeError(f"{name}: expected integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"{name}: expected 2 dimensions [K, T], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"{name}: the prompt list is empty (shape {tuple(input_ids.shape)}); give at least one text")
    if max_length is not None and input_ids.shape[1] > max_length:
        raise ValueError(
            f"{name}: texts are {input_ids.shape[1]} tokens long but the model takes at most "
            f"{max_length}; tokenise with truncation=True, max_length={max_length}"
        )
    if vocab_size is not None and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(
            f"{name}: token ids must lie in 0..{vocab_size - 1} (the model's vocabulary), got ids from "
            f"{int(input_ids.min())} to {int(input_ids.max())}; tokenise with this model's processor"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: shape {tuple(attention_mask.shape)} differs from {name} "
            f"{tuple(input_ids.shape)}"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError(
            "attention_mask: expected only 0s and 1s, got other values "
            f"(max {attention_mask.max().item()}); were input_ids and attention_mask passed in the "
            "wrong order? additional_forward_args is (input_ids, attention_mask)"
        )
    return input_ids, attention_mask


def check_texts(texts: object, name: str = "texts") -> list[str]:
    """A non-empty list of distinct, non-empty strings (a duplicate would collapse the scores)."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
        raise ValueError(f"{name}: expected a non-empty list of strings, got {texts!r}")
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{name}: every text must be a non-empty string, got {list(texts)!r}")
    seen: set[str] = set()
    repeated = [t for t in texts if t in seen or seen.add(t)]
    if repeated:
        raise ValueError(f"{name}: {sorted(set(repeated))!r} given more than once; give each text once")
    return list(texts)


def check_processor(processor: object) -> None:
    """A transformers processor: callable as ``processor(images=..., text=...)``."""
    if processor is None or not callable(processor):
        raise TypeError(
            f"processor: expected the model's processor (e.g. AutoProcessor.from_pretrained(...)), "
            f"got {type(processor).__name__}"
        )


def check_same_batch(**tensors: torch.Tensor) -> int:
    """All given tensors share dimension 0; returns it. Names the arguments that disagree."""
    sizes = {name: int(t.shape[0]) for name, t in tensors.items() if t is not None}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{name} has {n}" for name, n in sizes.items())
        raise ValueError(f"batch sizes disagree: {listing}; give one row per example in each")
    return next(iter(sizes.values()))


def check_target_index(target: object, n_outputs: int, what: str = "outputs") -> None:
    """An int target must index one of ``n_outputs`` columns."""
    if isinstance(target, bool) or (target is not None and not isinstance(target, (int, torch.Tensor, list, tuple))):
        raise TypeError(f"target: expected an int, a list of ints or a tensor, got {type(target).__name__}")
    if isinstance(target, int) and not isinstance(target, bool) and not -n_outputs <= target < n_outputs:
        raise ValueError(f"target: {target} is out of range for {n_outputs} {what} (0..{n_outputs - 1})")


def text_vocab_size(adapter: object) -> int | None:
    """The vocabulary size of an adapter's text embedding, or ``None`` where it has none."""
    try:
        return vocab_size_of(adapter.text_embedding())
    except (NotImplementedError, AttributeError):
        return None


def check_processor_kwargs(processor_kwargs: Any, reserved: Sequence[str]) -> None:
    """TypeError unless ``processor_kwargs`` is ``None`` or a dict of option names; ValueError
    where it sets one of the ``reserved`` arguments the caller passes the processor itself.

    Example:
        >>> check_processor_kwargs({"padding": True}, ("images", "text", "padding"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: processor_kwargs: ['padding'] are set by the caller itself ...
    """
    if processor_kwargs is None:
        return
    if not isinstance(processor_kwargs, Mapping) or not all(isinstance(k, str) for k in processor_kwargs):
        raise TypeError(f"processor_kwargs: expected a dict of processor options, got {type(processor_kwargs).__name__}")
    taken = sorted(set(reserved) & set(processor_kwargs))
    if taken:
        raise ValueError(f"processor_kwargs: {taken} are set by the caller itself (the image, the texts, tensors, "
                         "padding); pass other processor options only")


def check_one_tower_run(adapter: Any, name: str, why: str) -> None:
    """ValueError unless one run of the adapter's vision tower on ``pixel_values`` is what the
    model computes (its :attr:`~captum_vlm.adapters.VLMAdapter.vision_tower_per_view` is False).

    Args:
        adapter: the model's adapter.
        name: the argument the refusal names.
        why: what needs the single run, for the message.

    Example:
        >>> check_one_tower_run(get_adapter(model), "stream", "stream='vision' reads the tower")  # doctest: +SKIP
    """
    if getattr(adapter, "vision_tower_per_view", False):
        raise ValueError(
            f"{name}: {type(adapter.model).__name__}'s vision tower runs once per view of the image (tiles and "
            f"a global view, each its own sequence), not on the whole pixel_values, and {why}; this view is not "
            "defined for it (the text stream and the model's answer are)"
        )


# ----- one image per example (the tiled and dynamic-resolution families) ---------------------------
def image_run_starts(positions: torch.Tensor) -> torch.Tensor:
    """Where each run of consecutive image positions begins, ``[B, L]`` (bool), for image
    positions ``positions`` ``[B, L]`` (bool)."""
    starts = positions.clone()
    starts[:, 1:] &= ~positions[:, :-1]
    return starts


def image_runs(positions: torch.Tensor) -> list[int]:
    """Runs of consecutive image positions in each row of ``positions`` ``[B, L]`` (bool): the
    images of each text where the processor writes an image as one run of placeholders.

    Example:
        >>> image_runs(torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 0, 0]]).bool())
        [2, 1]
    """
    return [int(n) for n in image_run_starts(positions).sum(1)]


def check_one_image_per_text(images_per_text: Sequence[int], n_images: int | None = None,
                             name: str = "inputs") -> None:
    """ValueError unless every text holds one image and the images are one per text.

    Args:
        images_per_text: the images each text holds (from its placeholders).
        n_images: the images the processor gave (default: their sum).
        name: the argument the refusal names.

    Example:
        >>> check_one_image_per_text([2], n_images=2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: inputs: 2 images for 1 texts; captum-vlm explains one image per example, the texts hold [2] ...
    """
    per_text = [int(n) for n in images_per_text]
    n_images = sum(per_text) if n_images is None else int(n_images)
    if n_images != len(per_text) or any(n != 1 for n in per_text):
        raise ValueError(
            f"{name}: {n_images} images for {len(per_text)} texts; captum-vlm explains one image per example, "
            f"the texts hold {per_text} images (expected 1 each); explain several images one at a time"
        )


def check_image_token_counts(counts: Sequence[int] | torch.Tensor, expected: int | Sequence[int], source: str,
                             name: str = "input_ids") -> None:
    """ValueError unless each text holds as many image placeholders as its image makes.

    Args:
        counts: the image placeholders of each text.
        expected: what the image makes: one number for every text, or one per text.
        source: what makes them, for the message (``"the 4x7 grid of merged patches of pixel_values"``).
        name: the argument the refusal names.

    Example:
        >>> check_image_token_counts([27], 28, "the 4x7 grid of pixel_values")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: input_ids: the texts hold [27] image tokens but the 4x7 grid of pixel_values needs 28 ...
    """
    counts = [int(c) for c in counts]
    want = [int(expected)] * len(counts) if isinstance(expected, int) else [int(e) for e in expected]
    if counts != want:
        shown = want[0] if len(set(want)) == 1 else want
        raise ValueError(
            f"{name}: the texts hold {counts} image tokens but {source} needs {shown} per text (one image per "
            "example); tokenise each image with its text by the model's processor"
        )


def check_one_canvas(canvases: Sequence, given: str, name: str = "inputs") -> None:
    """ValueError unless the images of a batch share one canvas (one size, one tile layout).

    Args:
        canvases: each image's canvas (a size, a tile layout: anything comparable).
        given: what they were read from, for the message (``"image_sizes [[40, 28], [30, 64]]"``).
        name: the argument the refusal names.
    """
    if len(set(canvases)) > 1:
        raise ValueError(
            f"{name}: {given} give canvases {list(canvases)}; the images of one batch must share one canvas "
            "size; explain them one at a time"
        )
