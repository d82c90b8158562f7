"""Per-query maps of models whose image tokens are learned queries (BLIP-2's Q-Former): where
each query reads from on the patch grid.

Example:
    >>> inputs = processor(images=image, text="a photo of", return_tensors="pt")    # doctest: +SKIP
    >>> maps = cv.lens.query_maps(model, inputs)                                     # doctest: +SKIP
    >>> maps.shape                                                                    # doctest: +SKIP
    torch.Size([1, 32, 16, 16])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from captum_vlm._checks import check_choice, check_pixel_values
from captum_vlm.adapters import get_adapter
from captum_vlm.hooks import capture

__all__ = ["query_maps"]

HEAD_FUSIONS = ("mean", "max")


def query_maps(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    layers: int | Sequence[int] | None = None,
    head_fusion: str = "mean",
) -> torch.Tensor:
    """Each query token's cross-attention over the patches (the bridge read raw, no gradient).

    The probabilities of the bridge's cross-attention layers (the adapter's
    :meth:`~captum_vlm.adapters.VLMAdapter.bridge_attentions`, eager inside), heads fused by
    ``head_fusion`` and averaged over ``layers``, with the vision prefix (CLS) column dropped: a
    query's map sums to 1 minus what it pays the CLS.

    Args:
        model: a model whose adapter has ``image_tokens == "queries"`` (BLIP-2, InstructBLIP).
        inputs: the processor's output (``pixel_values``, ``input_ids`` with the image
            placeholders, and whatever else the model's forward takes).
        layers: indices into the bridge's cross-attention layers (negative from the end);
            ``None`` for all.
        head_fusion: ``"mean"`` or ``"max"`` over heads.

    Returns:
        ``[B, N, h, w]``: N queries on the ``h x w`` patch grid.

    Raises:
        TypeError: the model's image tokens are not queries.
        ValueError: bad ``inputs``, ``layers`` or ``head_fusion``.
    """
    adapter = get_adapter(model)
    if adapter.image_tokens != "queries":
        raise TypeError(
            f"model: query_maps reads models whose image tokens are learned queries (a Q-Former), got "
            f"{type(adapter.model).__name__}, whose image tokens are patches"
        )
    if not isinstance(inputs, Mapping) or "pixel_values" not in inputs or "input_ids" not in inputs:
        raise ValueError("inputs: expected the processor's output, a mapping with pixel_values and input_ids")
    check_choice(head_fusion, HEAD_FUSIONS, "head_fusion")
    pixel_values = check_pixel_values(inputs["pixel_values"])
    modules = adapter.bridge_attentions()
    chosen = _layers(layers, len(modules))
    with capture(adapter.model, attentions=[modules[i] for i in chosen], grads=False) as record, torch.no_grad():
        with adapter.image_layout(pixel_values, inputs["input_ids"]) as layout:
            adapter.model(**inputs)
        found = layout()
        probs = [a.float() for a in record.attentions]  # [B, heads, N, K] per layer
    fused = [a.mean(1) if head_fusion == "mean" else a.amax(1) for a in probs]
    return found.bridge_grid(torch.stack(fused).mean(0))


def _layers(layers, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    if isinstance(layers, bool) or not isinstance(layers, (int, list, tuple)):
        raise ValueError(f"layers: expected None, an int or a list of ints, got {layers!r}")
    chosen = [layers] if isinstance(layers, int) else list(layers)
    if not chosen or any(isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n for i in chosen):
        raise ValueError(f"layers: {layers!r} is out of range for {n} cross-attention layers (0..{n - 1})")
    return sorted({i % n for i in chosen})
