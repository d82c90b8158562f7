"""Figures of the inside-the-model lens: logit lens grid, probe curves, layer x head maps.

Drawing only: these take the arrays of a ``LogitLens``, ``ProbeResult``, ``HeadStatistics`` or
``HeadImportance`` (duck-typed) and return matplotlib Figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ._style import MAGNITUDE_CMAP, SIGNED_CMAP, color_scale, compose_title, to_numpy


def plot_logit_lens(lens: Any, title: str | None = None, max_chars: int = 8) -> Figure:
    """Layers x positions grid: each cell the layer's top-1 token, coloured by its probability;
    beside it the rank of the produced token per layer, one curve per position."""
    probs = to_numpy(lens.top_probs[:, :, 0], "top_probs")
    layers, positions = probs.shape
    fig = Figure(figsize=(3 + 0.9 * positions + 4, 1 + 0.35 * layers))
    grid, curve = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(positions, 1), 3]})
    image = grid.imshow(probs, cmap=MAGNITUDE_CMAP, vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    for layer in range(layers):
        for p in range(positions):
            token = lens.top_tokens[layer][p][0][:max_chars]
            grid.text(p, layer, token, ha="center", va="center", fontsize=7,
                      color="white" if probs[layer, p] < 0.6 else "black")
    grid.set_xticks(range(positions), [t[:max_chars] for t in lens.produced_tokens], rotation=45, fontsize=7)
    grid.set_xlabel("produced token (position)")
    grid.set_ylabel("layer (0 = embeddings)")
    fig.colorbar(image, ax=grid, label="top-1 probability")
    ranks = to_numpy(lens.produced_ranks, "produced_ranks")
    for p in range(positions):
        curve.plot(range(layers), ranks[:, p], marker="o", markersize=3, label=lens.produced_tokens[p][:max_chars])
    curve.set_yscale("log")
    curve.set_xlabel("layer")
    curve.set_ylabel("rank of produced token (1 = top)")
    if positions <= 10:
        curve.legend(fontsize=7)
    grid.set_title(compose_title(title, method="logit lens", layers=f"0..{layers - 1}", target="next token"),
                   fontsize=9)
    fig.tight_layout()
    return fig


def plot_word_map(values: Any, word: str, layer: int, image: Any = None) -> Figure:
    """The probability of ``word`` over the image tokens' grid at one layer (beside the image)."""
    grid = to_numpy(values, "values")
    fig = Figure(figsize=(7 if image is not None else 4, 3.5))
    axes = fig.subplots(1, 2 if image is not None else 1)
    axes = np.atleast_1d(axes)
    if image is not None:
        axes[0].imshow(np.asarray(image))
        axes[0].set_axis_off()
    shown = axes[-1].imshow(grid, cmap=MAGNITUDE_CMAP, vmin=0.0)
    axes[-1].set_axis_off()
    fig.colorbar(shown, ax=axes[-1], label=f"p({word!s}) per image token")
    axes[-1].set_title(compose_title(None, method="logit lens on image tokens", layers=layer, target=word), fontsize=9)
    return fig


def plot_probe_curves(result: Any, title: str | None = None) -> Figure:
    """Cross-validated accuracy per layer with its shuffled-label control and chance level."""
    layers = list(result.layers)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.errorbar(layers, result.accuracy, yerr=result.accuracy_std, marker="o", capsize=3, label="probe")
    ax.errorbar(layers, result.control, yerr=result.control_std, marker="s", capsize=3,
                label="shuffled labels")
    ax.axhline(result.chance, color="grey", linestyle=":", label="majority class")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("cross-validated accuracy")
    ax.legend(fontsize=8)
    ax.set_title(compose_title(title, method=f"linear probe ({result.where})", layers=layers), fontsize=9)
    fig.tight_layout()
    return fig


def plot_layer_head_maps(maps: dict[str, Any], title: str | None = None, stream: str = "") -> Figure:
    """One layer x head heat map per named statistic (NaN cells drawn blank)."""
    fig = Figure(figsize=(3.6 * len(maps), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(maps)))
    for ax, (name, values) in zip(axes, maps.items()):
        values = to_numpy(values, name)
        drawn, norm, cmap, _ = color_scale(values, None, None)
        shown = ax.imshow(drawn, cmap=cmap, norm=norm, aspect="auto", origin="lower")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(values.shape[1]))
        fig.colorbar(shown, ax=ax, label=name)
        ax.set_title(compose_title(None, method=name, heads="each", layers=f"0..{values.shape[0] - 1}"), fontsize=8)
    if title or stream:
        fig.suptitle(title or f"{stream} attention heads", fontsize=10)
    fig.tight_layout()
    return fig


def plot_head_importance(importance: Any, ranked: Sequence[tuple[int, int]], target: str = "",
                         top: int = 10) -> Figure:
    """Layer x head map of the target's drop when each head is ablated, and the top heads ranked."""
    values = to_numpy(importance, "importance")
    fig = Figure(figsize=(8, 3.5))
    grid, bars = fig.subplots(1, 2)
    limit = float(np.nanmax(np.abs(values))) or 1.0
    shown = grid.imshow(values, cmap=SIGNED_CMAP, vmin=-limit, vmax=limit, aspect="auto", origin="lower")
    grid.set_xlabel("head")
    grid.set_ylabel("layer")
    fig.colorbar(shown, ax=grid, label="target drop when ablated")
    grid.set_title(compose_title(None, method="head ablation", heads="one at a time", target=target), fontsize=8)
    shown_heads = list(ranked)[:top]
    drops = [values[layer, head] for layer, head in shown_heads]
    bars.barh(range(len(drops))[::-1], drops)
    bars.set_yticks(range(len(drops))[::-1], [f"L{layer} H{head}" for layer, head in shown_heads], fontsize=7)
    bars.set_xlabel("target drop")
    bars.set_title("heads ranked", fontsize=8)
    fig.tight_layout()
    return fig


# ----- HTML -------------------------------------------------------------------------------------
def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """A Figure as PNG bytes."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def lens_section(title: str, figures: Sequence[Figure] = (), notes: Sequence[str] = ()) -> str:
    """One ``<section>`` of an HTML report: escaped title and notes, each figure as an embedded PNG.

    Example:
        >>> html = lens_section("logit lens", [lens.plot()], ["answer: red"])  # doctest: +SKIP
    """
    import base64
    import html

    parts = [f"<section class=\"lens-inside\"><h2>{html.escape(str(title))}</h2>"]
    parts += [f"<p>{html.escape(str(note))}</p>" for note in notes]
    for fig in figures:
        data = base64.b64encode(figure_png(fig)).decode("ascii")
        parts.append(f'<img alt="{html.escape(str(title))}" src="data:image/png;base64,{data}">')
    parts.append("</section>")
    return "\n".join(parts)


def lens_page(sections: Sequence[str], title: str = "captum-vlm: inside the model") -> str:
    """A self-contained HTML page of :func:`lens_section` blocks (the title is escaped)."""
    import html

    head = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>")
    return head + "\n".join(sections) + "</body></html>"
