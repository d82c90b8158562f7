"""Drawing for the alignment lens: similarity matrix, zero-shot bars, retrieval lists,
projections and the modality gap. Numbers in, matplotlib Figures out; no model code.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from PIL import Image

from ._style import MAGNITUDE_CMAP, SIGNED_CMAP

_TILE = 32


def _short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _montage(thumbnails: Sequence[Image.Image], tile: int = _TILE) -> np.ndarray:
    """Thumbnails resized to ``tile`` squares and stacked top to bottom ``[n*tile, tile, 3]``."""
    tiles = [np.asarray(t.convert("RGB").resize((tile, tile), Image.Resampling.BILINEAR)) for t in thumbnails]
    return np.concatenate(tiles, axis=0)


def similarity_figure(
    matrix: np.ndarray,
    texts: Sequence[str],
    thumbnails: Sequence[Image.Image] | None,
    *,
    scale_label: str,
    title: str,
    pairs: Sequence[int] | None = None,
    footer: str | None = None,
    max_labels: int = 40,
):
    """Image x text matrix with thumbnails along the rows, texts along the columns, the best
    text of each row marked with a white dot and each image's own text outlined."""
    n, m = matrix.shape
    signed = bool(matrix.min() < 0)
    limit = float(np.abs(matrix).max()) or 1.0
    cmap, vmin, vmax = (SIGNED_CMAP, -limit, limit) if signed else (MAGNITUDE_CMAP, 0.0, float(matrix.max()) or 1.0)
    height = min(3 + 0.32 * n, 18)
    width = min(4 + 0.32 * m, 22)
    show_thumbs = thumbnails is not None and len(thumbnails) == n and n <= 120
    fig, axes = plt.subplots(1, 2 if show_thumbs else 1, figsize=(width, height), squeeze=False,
                             gridspec_kw={"width_ratios": [1, max(m, 1)]} if show_thumbs else None)
    ax = axes[0, -1]
    image = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    best = matrix.argmax(axis=1)
    ax.scatter(best, np.arange(n), s=12, c="white", edgecolors="black", linewidths=0.5, label="best text")
    if pairs is not None:
        for i, j in enumerate(pairs):
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=0.8))
    if m <= max_labels:
        ax.set_xticks(range(m), [_short(t) for t in texts], rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xlabel(f"{m} texts")
    ax.set_yticks([])
    ax.set_ylabel(f"{n} images")
    fig.colorbar(image, ax=ax, label=scale_label, fraction=0.04)
    if show_thumbs:
        strip = axes[0, 0]
        strip.imshow(_montage(thumbnails), extent=(0, 1, n - 0.5, -0.5), aspect="auto")
        strip.set_xticks([])
        strip.set_yticks([])
        strip.set_ylim(n - 0.5, -0.5)
    legend = "white dot: best text per image" + ("; red box: the image's own text" if pairs is not None else "")
    fig.suptitle(f"{title}\n{legend}" + (f"\n{footer}" if footer else ""), fontsize=9)
    fig.tight_layout()
    return fig


def zero_shot_figure(
    probabilities: np.ndarray,
    labels: Sequence[str],
    *,
    thumbnail: Image.Image | None,
    true_index: int | None,
    value_label: str,
    title: str,
):
    """One image against K labels: bars sorted from most to least likely, the true label marked."""
    order = np.argsort(-probabilities, kind="stable")
    k = len(order)
    fig, axes = plt.subplots(1, 2, figsize=(8, 1.5 + 0.3 * k), gridspec_kw={"width_ratios": [1, 2.5]})
    if thumbnail is not None:
        axes[0].imshow(np.asarray(thumbnail.convert("RGB")))
    axes[0].axis("off")
    ax = axes[1]
    colours = ["#d62728" if i == true_index else "#4c72b0" for i in order]
    ax.barh(range(k), probabilities[order], color=colours)
    ax.set_yticks(range(k), [_short(labels[i], 34) + (" (true)" if i == true_index else "") for i in order],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(value_label)
    for y, i in enumerate(order):
        ax.text(min(probabilities[i] + 0.01, 0.9), y, f"{probabilities[i]:.3f}", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def retrieval_figure(
    image_queries: Sequence[tuple[Image.Image | None, str, Sequence[tuple[str, float]]]],
    text_queries: Sequence[tuple[str, Sequence[tuple[Image.Image | None, str, float]]]],
    *,
    score_label: str,
    title: str,
):
    """Rows of queries: an image query with its top texts and their scores, a text query with
    its top images (thumbnails) and their scores."""
    k = max([len(r) for _, _, r in image_queries] + [len(r) for _, r in text_queries] + [1])
    rows = len(image_queries) + len(text_queries)
    fig, axes = plt.subplots(max(rows, 1), k + 1, figsize=(1.9 * (k + 1), 1.7 * max(rows, 1)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (thumb, name, results) in enumerate(image_queries):
        if thumb is not None:
            axes[r, 0].imshow(np.asarray(thumb.convert("RGB")))
        axes[r, 0].set_title(f"query: {_short(name, 20)}", fontsize=7)
        for c, (text, score) in enumerate(results, start=1):
            axes[r, c].text(0.5, 0.5, "\n".join(textwrap.wrap(text, 18)[:4]) + f"\n{score:.3f}",
                            ha="center", va="center", fontsize=7, wrap=True)
            axes[r, c].set_title(f"#{c}", fontsize=7)
    for r, (text, results) in enumerate(text_queries, start=len(image_queries)):
        axes[r, 0].text(0.5, 0.5, "query:\n" + "\n".join(textwrap.wrap(text, 18)[:4]), ha="center",
                        va="center", fontsize=7)
        for c, (thumb, _name, score) in enumerate(results, start=1):
            if thumb is not None:
                axes[r, c].imshow(np.asarray(thumb.convert("RGB")))
            axes[r, c].set_title(f"#{c} {score:.3f}", fontsize=7)
    fig.suptitle(f"{title}\ntop-{k} by {score_label}", fontsize=9)
    fig.tight_layout()
    return fig


def label_colours(labels: Sequence[str] | None, count: int) -> tuple[list, dict]:
    """A qualitative colour per label (tab10, tab20 beyond 10 labels) and the ``{label: colour}``
    table; one colour for all without labels."""
    if labels is None:
        return ["#4c72b0"] * count, {}
    names = list(dict.fromkeys(labels))
    palette = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    table = {name: palette(i % palette.N) for i, name in enumerate(names)}
    return [table[label] for label in labels], table


def projection_figure(
    panels: Sequence[tuple[str, np.ndarray, str]],
    *,
    kinds: Sequence[str],
    labels: Sequence[str] | None,
    pairs: Sequence[int] | None,
    title: str,
):
    """Side-by-side scatter plots ``(method, coords [P, 2], distortion text)``: colour = label,
    circle = image, triangle = text, a grey line from each image to its own text."""
    kinds = np.asarray(kinds)
    colours, table = label_colours(labels, len(kinds))
    colours = np.asarray(colours, dtype=object)
    n_images = int((kinds == "image").sum())
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.8), squeeze=False)
    for ax, (method, coords, summary) in zip(axes[0], panels):
        if pairs is not None:
            for i, j in enumerate(pairs):
                a, b = coords[i], coords[n_images + j]
                ax.plot([a[0], b[0]], [a[1], b[1]], color="0.75", lw=0.5, zorder=1)
        for kind, marker in (("image", "o"), ("text", "^")):
            pick = kinds == kind
            if pick.any():
                ax.scatter(coords[pick, 0], coords[pick, 1], c=list(colours[pick]), marker=marker,
                           s=22 if kind == "image" else 46, edgecolors="black" if kind == "text" else "none",
                           linewidths=0.4, zorder=2)
        ax.set_title(f"{method.upper()}\n{summary}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], marker="o", ls="", color="0.4", label="image"),
               Line2D([], [], marker="^", ls="", color="0.4", label="text")]
    handles += [Line2D([], [], marker="s", ls="", color=c, label=_short(str(name), 22))
                for name, c in list(table.items())[:20]]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(f"{title}: image and text embeddings, one space", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    return fig


def modality_gap_figure(coords: np.ndarray, kinds: Sequence[str], *, summary: str, title: str):
    """First two principal components of all embeddings, by modality, with both centroids."""
    kinds = np.asarray(kinds)
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    for kind, marker, colour in (("image", "o", "#4c72b0"), ("text", "^", "#dd8452")):
        pick = kinds == kind
        ax.scatter(coords[pick, 0], coords[pick, 1], marker=marker, s=18, color=colour, alpha=0.7, label=kind)
        centre = coords[pick].mean(axis=0)
        ax.scatter([centre[0]], [centre[1]], marker="X", s=140, color=colour, edgecolors="black",
                   label=f"{kind} centroid")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7)
    ax.set_title(f"{title}: modality gap\n{summary}", fontsize=9)
    fig.tight_layout()
    return fig
