"""Attention heads: statistics per layer x head, and scoped head ablation with importance.

Statistics follow Clark et al. (2019), "What does BERT look at?" (entropy, attention to special
tokens) and Dosovitskiy et al. (2021, ViT) for the mean attention distance on the patch grid;
attention sinks are from Xiao et al. (2024), "Efficient streaming language models with attention
sinks"; the pointing game is Zhang et al. (2016). Head ablation and the importance ranking follow
Michel et al. (2019), "Are sixteen heads really better than one?".

Example:
    >>> stats = cv.lens.head_statistics(model, inputs, stream="vision", masks=masks)  # doctest: +SKIP
    >>> stats.plot()                                                                   # doctest: +SKIP
    >>> with cv.lens.ablate_heads(model, [(3, 1)]):                                    # doctest: +SKIP
    ...     logits = model(**inputs).logits_per_image
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from captum_vlm._checks import check_choice, check_one_tower_run
from captum_vlm.adapters import get_adapter
from captum_vlm.hooks import capture, preserved_model_state
from captum_vlm.metrics.localization import pointing_game

__all__ = [
    "HeadStatistics",
    "HeadImportance",
    "attention_statistics",
    "head_statistics",
    "ablate_heads",
    "head_importance",
]

STREAMS = ("vision", "text", "cross")


@dataclass
class HeadStatistics:
    """Per layer x head statistics ``[layers, heads]`` of one attention stream.

    Attributes:
        stream: ``"vision"``, ``"text"`` or ``"cross"``.
        entropy: mean entropy (nats) of a query's attention over all keys.
        sink_mass: mean attention a query pays to the sink keys (prefix / first token); NaN when
            the stream has none.
        distance: mean attention distance in patches from a patch query to the patch keys
            (attention renormalised over patch keys); NaN when queries are not on the grid.
        pointing: pointing-game hit rate of the attention the patches receive (mean over
            queries) against the masks; NaN without masks or patch keys.
    """

    stream: str
    entropy: np.ndarray
    sink_mass: np.ndarray
    distance: np.ndarray
    pointing: np.ndarray

    def maps(self) -> dict[str, np.ndarray]:
        named = {"entropy (nats)": self.entropy, "attention-sink mass": self.sink_mass,
                 "mean attention distance (patches)": self.distance, "pointing-game hit rate": self.pointing}
        return {k: v for k, v in named.items() if not np.isnan(v).all()}

    def plot(self, title: str | None = None):
        """Layer x head heat maps of every statistic that is defined for this stream."""
        from captum_vlm.viz.lens_inside import plot_layer_head_maps

        return plot_layer_head_maps(self.maps(), title=title, stream=self.stream)

    def html_section(self, title: str | None = None) -> str:
        """These statistics as one ``<section>`` of an inside-the-model report (escaped, no script)."""
        from captum_vlm.viz.lens_inside import head_statistics_html

        return head_statistics_html(self, title=title)

    def to_html(self, path: str | Path | None = None, title: str | None = None) -> str:
        """A self-contained HTML page of these statistics (see :func:`captum_vlm.lens.inside_report`)."""
        from captum_vlm.lens.inside_report import inside_report

        return inside_report([self], path, title=title)


def attention_statistics(
    attentions: Sequence[torch.Tensor],
    sink_keys: torch.Tensor | None = None,
    patch_keys: torch.Tensor | None = None,
    patch_queries: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
    masks: Any = None,
    stream: str = "vision",
) -> HeadStatistics:
    """Statistics of attention probabilities, one tensor ``[B, heads, queries, keys]`` per layer.

    Args:
        attentions: the probabilities per layer.
        sink_keys: key indices counted as sinks (prefix / special tokens).
        patch_keys: key indices of the image patches, row by row on ``grid``.
        patch_queries: query indices of the image patches (same order), for the distance.
        grid: ``(rows, cols)`` of the patches.
        masks: ``[B, H, W]`` object masks for the pointing game (strict: tolerance 0).
        stream: a name for the figures.

    Returns:
        :class:`HeadStatistics`.
    """
    layers, heads = len(attentions), attentions[0].shape[1]
    nan = np.full((layers, heads), np.nan)
    entropy, sink, distance, pointing = nan.copy(), nan.copy(), nan.copy(), nan.copy()
    offsets = None
    if patch_queries is not None and patch_keys is not None and grid is not None:
        rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        coords = torch.stack([rows.flatten(), cols.flatten()], 1).double()
        offsets = torch.cdist(coords, coords)  # [P, P] distance in patches
    for layer, attn in enumerate(attentions):
        attn = attn.detach().double()
        plogp = attn * torch.log(attn.clamp_min(1e-300))
        entropy[layer] = (-plogp.sum(-1)).mean(dim=(0, 2)).numpy()
        if sink_keys is not None and len(sink_keys):
            sink[layer] = attn[..., sink_keys].sum(-1).mean(dim=(0, 2)).numpy()
        if offsets is not None:
            on_patches = attn[:, :, patch_queries][..., patch_keys]
            weights = on_patches / on_patches.sum(-1, keepdim=True).clamp_min(1e-300)
            distance[layer] = (weights * offsets).sum(-1).mean(dim=(0, 2)).numpy()
        if masks is not None and patch_keys is not None and grid is not None:
            received = attn[..., patch_keys].mean(2)  # [B, heads, P]
            for h in range(heads):
                grid_map = received[:, h].reshape(-1, *grid).float()
                pointing[layer, h] = pointing_game(grid_map, masks, tolerance=0).mean
    return HeadStatistics(stream, entropy, sink, distance, pointing)


def _uses_image_layout(adapter, stream: str) -> bool:
    """Whether ``stream``'s keys are the sequence the adapter's image-token layout indexes: the
    cross-attention keys, a joint sequence's text stream, or a joint encoder without a tower."""
    joint = adapter.image_stream == "joint"
    return stream == "cross" or (joint and (stream == "text" or not adapter.image_tokens_in_input_ids))


def _tower_layout(adapter, pixel_values: torch.Tensor) -> dict:
    """The vision tower's own sequence: prefix tokens (the sinks), then the patches row by row."""
    grid = adapter.vision_grid(pixel_values)  # the tower's patches (several per token where tokens pool them)
    prefix = adapter.num_prefix_tokens
    patches = torch.arange(prefix, prefix + grid[0] * grid[1])
    return dict(sink_keys=torch.arange(prefix), patch_keys=patches, patch_queries=patches, grid=grid)


def _sequence_layout(adapter, stream: str, layout) -> dict:
    """Patch keys (in grid order) from an :class:`~captum_vlm.adapters.layout.ImageTokenLayout`;
    the sink is the sequence's first token. Merged or per-example layouts give no patch keys."""
    h, w = layout.grid
    columns, cells = layout.columns, layout.one_cell_each
    if cells is None:  # tokens covering several cells (or none): no patch keys
        return dict(sink_keys=torch.tensor([0]), patch_keys=None, patch_queries=None, grid=layout.grid)
    one_to_one = cells.shape[1] == h * w and bool((cells.sort(1).values == torch.arange(h * w)).all())
    same = bool((columns == columns[:1]).all() and (cells == cells[:1]).all())
    keys = columns[0][cells[0].argsort()] if one_to_one and same else None
    queries = keys if adapter.image_stream == "joint" else None  # cross: text queries, off the grid
    return dict(sink_keys=torch.tensor([0]), patch_keys=keys, patch_queries=queries, grid=layout.grid)


def _image_and_model_inputs(adapter, inputs: Mapping) -> tuple[dict, dict]:
    """``inputs`` with ``pixel_values`` as one image tensor ``[B, 3, H, W]`` (the adapter's
    :meth:`processor_inputs` where the processor gave them otherwise), and the keyword
    arguments of the model's forward (the adapter's :meth:`model_inputs` of the image and text,
    beside the processor's further inputs)."""
    inputs = dict(inputs)
    if not (isinstance(inputs["pixel_values"], torch.Tensor) and inputs["pixel_values"].dim() == 4):
        inputs = adapter.processor_inputs(inputs)
    extra = tuple(inputs.get(name) for name in adapter.extra_text_inputs)
    built = adapter.model_inputs(inputs["pixel_values"], inputs.get("input_ids"), inputs.get("attention_mask"), extra)
    rest = {k: v for k, v in inputs.items() if k not in ("pixel_values", "input_ids", "attention_mask")}
    return inputs, {**rest, **built}


def _stream_modules(adapter, stream: str) -> list[nn.Module]:
    check_choice(stream, STREAMS, "stream")
    try:
        return adapter.stream_attentions(stream)
    except NotImplementedError:
        raise ValueError(f"stream: {type(adapter.model).__name__} has no {stream!r} attention") from None


def head_statistics(
    model: nn.Module,
    inputs: dict,
    stream: str = "vision",
    masks: Any = None,
    forward: Callable[[], Any] | None = None,
) -> HeadStatistics:
    """Per layer x head statistics of one attention stream on these inputs.

    Args:
        model: any supported model.
        inputs: the processor's output (``pixel_values``; ``input_ids`` for text/cross), as it
            gave it (Qwen-VL's flattened patches and ``image_grid_thw`` are read through the
            adapter's :meth:`~captum_vlm.adapters.VLMAdapter.processor_inputs`) or with
            ``pixel_values`` already one image tensor ``[B, 3, H, W]``.
        stream: ``"vision"`` (the image tower), ``"text"`` or ``"cross"`` (text queries on image
            tokens).
        masks: ``[B, H, W]`` object masks at the ``pixel_values`` size, for the pointing game.
        forward: runs the model (no arguments); default: the vision tower for ``"vision"`` (a
            joint encoder without a tower: the model), else ``model(**inputs)``.

    Returns:
        :class:`HeadStatistics` (``.plot()`` draws the layer x head maps).
    """
    adapter = get_adapter(model)
    if stream == "vision" and not _uses_image_layout(adapter, stream):
        check_one_tower_run(adapter, "stream", "stream='vision' reads the tower's patch grid")
    modules = _stream_modules(adapter, stream)
    if not isinstance(inputs, Mapping) or "pixel_values" not in inputs:
        raise TypeError("inputs: expected the processor's output, a dict with pixel_values")
    inputs, model_kwargs = _image_and_model_inputs(adapter, inputs)
    if masks is not None:
        masks = torch.as_tensor(np.asarray(masks)).bool()
        size = tuple(inputs["pixel_values"].shape[-2:])
        if masks.dim() != 3 or masks.shape[0] != inputs["pixel_values"].shape[0] or tuple(masks.shape[1:]) != size:
            raise ValueError(f"masks: expected [B, H, W] = [{inputs['pixel_values'].shape[0]}, {size[0]}, {size[1]}] "
                             f"(one mask per image at the pixel_values size), got shape {tuple(masks.shape)}")
    if forward is None:
        if stream == "vision" and not _uses_image_layout(adapter, stream):
            def forward():
                return adapter.vision_outputs(inputs["pixel_values"])
        else:
            def forward():
                return model(**model_kwargs)
    with ExitStack() as scope:
        read_layout = None
        if _uses_image_layout(adapter, stream):
            read_layout = scope.enter_context(adapter.image_layout(inputs["pixel_values"], inputs.get("input_ids")))
        rec = scope.enter_context(capture(model, attentions=modules, grads=False))
        scope.enter_context(torch.no_grad())
        forward()
        layout = read_layout() if read_layout is not None else None
    if layout is not None:
        where = _sequence_layout(adapter, stream, layout)
    elif stream == "vision":
        where = _tower_layout(adapter, inputs["pixel_values"])
    else:  # a text stream that never sees the image
        where = dict(sink_keys=torch.tensor([0]), patch_keys=None, patch_queries=None, grid=None)
    return attention_statistics(rec.attentions, masks=masks, stream=stream, **where)


# ----- ablation ---------------------------------------------------------------------------------
def _check_heads(heads: Iterable[tuple[int, int]], layers: int, per_layer: int) -> list[tuple[int, int]]:
    try:
        pairs = [(layer, head) for layer, head in heads]
    except (TypeError, ValueError):
        raise TypeError(f"heads: expected (layer, head) pairs, got {heads!r}") from None
    for layer, head in pairs:
        for value, n, what in ((layer, layers, "layer"), (head, per_layer, "head")):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
                raise ValueError(f"heads: {what} {value!r} of pair {(layer, head)} is out of range "
                                 f"0..{n - 1} ({layers} layers x {per_layer} heads)")
    return pairs


def _ablation_hook(heads: list[int], head_dim: int, mode: str):
    def hook(module, args):
        hidden = args[0].clone()
        for h in heads:
            part = hidden[..., h * head_dim : (h + 1) * head_dim]
            if mode == "zero":
                part.zero_()
            else:  # the head's mean output over the batch and positions of this forward
                part.copy_(part.mean(dim=tuple(range(part.dim() - 1)), keepdim=True).expand_as(part))
        return (hidden, *args[1:])

    return hook


@contextmanager
def ablate_heads(
    model: nn.Module, heads: Iterable[tuple[int, int]], stream: str = "vision", mode: str = "zero"
) -> Iterator[nn.Module]:
    """Inside the block, the given heads are ablated; on exit the model is exactly as before.

    A head's output (its slice of the input of the layer's output projection) is replaced by
    zeros (``mode="zero"``) or by its mean over the batch and positions of the same forward
    (``"mean"``). Nothing but a forward pre-hook is added, and it is removed on exit, also when
    the block raises (with everything :func:`~captum_vlm.hooks.preserved_model_state` restores).

    Args:
        model: any supported model.
        heads: ``(layer, head)`` pairs, 0-based.
        stream: ``"vision"``, ``"text"`` or ``"cross"``.
        mode: ``"zero"`` or ``"mean"``.

    Yields:
        The model.
    """
    check_choice(mode, ("zero", "mean"), "mode")
    adapter = get_adapter(model)
    check_choice(stream, STREAMS, "stream")
    try:
        projections = adapter.head_projections(stream)
    except NotImplementedError:
        raise ValueError(f"stream: {type(adapter.model).__name__} has no {stream!r} attention heads") from None
    n_heads = adapter.num_heads(stream)
    pairs = _check_heads(heads, len(projections), n_heads)
    with preserved_model_state(model):
        by_layer: dict[int, list[int]] = {}
        for layer, head in pairs:
            by_layer.setdefault(layer, []).append(head)
        for layer, chosen in by_layer.items():
            module = projections[layer]
            head_dim = module.in_features // n_heads
            module.register_forward_pre_hook(_ablation_hook(chosen, head_dim, mode))
        yield model


@dataclass
class HeadImportance:
    """How much a target drops when each head is ablated alone.

    Attributes:
        importance: ``[layers, heads]`` mean over examples of ``baseline - ablated``.
        per_example: ``[B, layers, heads]`` the same per example.
        baseline: ``[B]`` the target without ablation.
        ranked: ``(layer, head)`` pairs, largest drop first.
        stream, mode: what was ablated and how.
        target_label: what the target is, for titles (e.g. "ImageTextSimilarity, target 3").
    """

    importance: np.ndarray
    per_example: np.ndarray
    baseline: np.ndarray
    ranked: list[tuple[int, int]]
    stream: str
    mode: str
    target_label: str = ""

    def plot(self, target: str | None = None, top: int = 10):
        """Layer x head importance map and the top heads ranked (a Figure)."""
        from captum_vlm.viz.lens_inside import plot_head_importance

        shown = self.target_label if target is None else target
        return plot_head_importance(self.importance, self.ranked, target=shown, top=top)

    def html_section(self, title: str | None = None, top: int = 10) -> str:
        """This importance map and the ``top`` ranked heads as one ``<section>`` (escaped, no script)."""
        from captum_vlm.viz.lens_inside import head_importance_html

        return head_importance_html(self, target=self.target_label, top=top, title=title)

    def to_html(self, path: str | Path | None = None, title: str | None = None) -> str:
        """A self-contained HTML page of this map (see :func:`captum_vlm.lens.inside_report`)."""
        from captum_vlm.lens.inside_report import inside_report

        return inside_report([self], path, title=title)


def _target_values(output: torch.Tensor, target: Any) -> torch.Tensor:
    if output.dim() == 1:
        if target is not None:
            raise ValueError(f"target: the forward returns one value per example, so target must be None, got {target!r}")
        return output
    if output.dim() != 2:
        raise ValueError(f"forward_func: expected [B] or [B, K] outputs, got shape {tuple(output.shape)}")
    if target is None:
        raise ValueError(f"target: the forward returns {output.shape[1]} outputs per example; say which (an int "
                         "or one per example)")
    index = torch.as_tensor(target).long().reshape(-1)
    if index.numel() == 1:
        index = index.expand(output.shape[0])
    if index.numel() != output.shape[0] or (index < 0).any() or (index >= output.shape[1]).any():
        raise ValueError(f"target: expected an int or {output.shape[0]} ints in 0..{output.shape[1] - 1}, got {target!r}")
    return output.gather(1, index[:, None])[:, 0]


def head_importance(
    model: nn.Module,
    forward_func: Callable[..., torch.Tensor],
    inputs: torch.Tensor,
    additional_forward_args: tuple = (),
    target: Any = None,
    stream: str = "vision",
    mode: str = "zero",
    heads: Iterable[tuple[int, int]] | None = None,
    show_progress: bool = False,
    target_label: str | None = None,
) -> HeadImportance:
    """Ablate each head on its own and measure the drop of a target from ``captum_vlm.targets``.

    Args:
        model: the model ``forward_func`` runs.
        forward_func: e.g. ``ImageTextSimilarity(model)``, ``MatchLogit(model)``,
            ``TokenLogProbs(model, reduction="sum")``; called as
            ``forward_func(inputs, *additional_forward_args)``.
        inputs, additional_forward_args: as in Captum.
        target: the output column for ``[B, K]`` outputs (an int or one per example).
        stream, mode: see :func:`ablate_heads`.
        heads: the heads to score; None for every head of the stream.
        show_progress: a tqdm bar over the heads.
        target_label: what the target is, for titles (default: the forward's class and ``target``).

    Returns:
        :class:`HeadImportance`; heads not scored are NaN.
    """
    adapter = get_adapter(model)
    check_choice(stream, STREAMS, "stream")
    check_choice(mode, ("zero", "mean"), "mode")
    if not isinstance(additional_forward_args, tuple):
        additional_forward_args = (additional_forward_args,)
    try:
        n_layers = len(adapter.head_projections(stream))
    except NotImplementedError:
        raise ValueError(f"stream: {type(adapter.model).__name__} has no {stream!r} attention heads") from None
    n_heads = adapter.num_heads(stream)
    pairs = _check_heads(heads, n_layers, n_heads) if heads is not None else [
        (layer, head) for layer in range(n_layers) for head in range(n_heads)]

    def run() -> torch.Tensor:
        return _target_values(forward_func(inputs, *additional_forward_args), target).detach().double()

    with preserved_model_state(model), torch.no_grad():
        baseline = run()
        per_example = torch.full((baseline.shape[0], n_layers, n_heads), float("nan"), dtype=torch.double)
        iterator = pairs
        if show_progress:
            from tqdm.auto import tqdm

            iterator = tqdm(pairs, desc="ablating heads")
        for layer, head in iterator:
            with ablate_heads(model, [(layer, head)], stream=stream, mode=mode):
                per_example[:, layer, head] = baseline - run()
    importance = per_example.mean(0).numpy()
    order = np.argsort(-np.nan_to_num(importance, nan=-np.inf), axis=None)
    ranked = [(int(i // n_heads), int(i % n_heads)) for i in order if not np.isnan(importance.flat[i])]
    if target_label is None:
        one = target is None or torch.as_tensor(target).numel() == 1
        which = "" if target is None else (f", target {int(torch.as_tensor(target))}" if one else ", a target per example")
        target_label = type(forward_func).__name__ + which
    return HeadImportance(importance, per_example.numpy(), baseline.numpy(), ranked, stream, mode, str(target_label))
