"""A self-contained HTML report of the alignment views: one file, no script, no network.

Every string from the caller (texts, labels, paths, model name) goes through
:func:`html.escape`; images are inline ``data:`` PNGs; hovering a projection point shows its text
or thumbnail through SVG ``<title>`` and CSS alone.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_hex
from PIL import Image

from captum_vlm._checks import check_count
from captum_vlm.lens.alignment import alignment_scores
from captum_vlm.lens.embeddings import Embeddings
from captum_vlm.lens.modality_gap import modality_gap
from captum_vlm.lens.projection import METHODS, project
from captum_vlm.lens.views import SCALE_LABELS, similarity_matrix, top_matches
from captum_vlm.viz.lens_views import label_colours

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#222;max-width:1200px;margin:1rem auto}
h1{font-size:1.3rem} h2{font-size:1.1rem;margin-top:1.6rem} .meta{color:#555;font-size:.9rem}
table{border-collapse:collapse;font-size:.9rem} td,th{border-bottom:1px solid #ddd;padding:.2rem .6rem;text-align:left}
img.fig{max-width:100%;border:1px solid #ddd} .thumb{width:48px;height:48px;image-rendering:pixelated;vertical-align:middle}
.query{display:flex;gap:.8rem;align-items:center;margin:.4rem 0;flex-wrap:wrap} .hit{font-size:.85rem;display:inline-block;margin-right:.6rem}
.proj{display:flex;gap:1rem;flex-wrap:wrap} .proj figure{margin:0} .proj figcaption{font-size:.85rem}
svg .pt .hov{display:none} svg .pt:hover .hov{display:inline} svg .pt:hover circle,svg .pt:hover polygon{stroke:#000;stroke-width:1.5}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _png_uri(image: Image.Image, size: int = 40) -> str:
    """A small inline PNG of a thumbnail (the report repeats thumbnails, so keep them small)."""
    buffer = io.BytesIO()
    small = image.convert("RGB")
    small.thumbnail((size, size))
    small.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _table(rows: dict[str, float]) -> str:
    cells = "".join(f"<tr><td>{_e(k)}</td><td>{v:.3f}</td></tr>" for k, v in rows.items())
    return f"<table>{cells}</table>"


def _colours(labels: Sequence[str] | None, count: int) -> list[str]:
    return [to_hex(c) for c in label_colours(labels, count)[0]]


def _svg_scatter(coords: np.ndarray, embeddings: Embeddings, thumbs: list[str | None], size: int = 420) -> str:
    """Scatter as inline SVG: hover a point for its text/source and label (and thumbnail)."""
    low, high = coords.min(axis=0), coords.max(axis=0)
    span = np.where(high - low > 0, high - low, 1.0)
    xy = 12 + (coords - low) / span * (size - 24)
    xy[:, 1] = size - xy[:, 1]
    labels = embeddings.labels()
    colours = _colours(labels, len(coords))
    names = list(embeddings.image_sources) + list(embeddings.texts)
    n = len(embeddings.image)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
             f'viewBox="0 0 {size} {size}" style="border:1px solid #ddd;background:#fff">']
    if embeddings.pairs is not None:
        for i, j in enumerate(embeddings.pairs):
            (x1, y1), (x2, y2) = xy[i], xy[n + j]
            parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#ccc" stroke-width="0.6"/>')
    for p, ((x, y), colour, name) in enumerate(zip(xy, colours, names)):
        kind = "image" if p < n else "text"
        label = f"{kind}: {name}" + (f" [{labels[p]}]" if labels is not None else "")
        if kind == "image":
            shape = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>'
        else:
            shape = (f'<polygon points="{x:.1f},{y - 6:.1f} {x - 5:.1f},{y + 4:.1f} {x + 5:.1f},{y + 4:.1f}" '
                     f'fill="{colour}" stroke="#333" stroke-width="0.5"/>')
        hover = ""
        if kind == "image" and thumbs[p] is not None:
            hx, hy = min(x + 6, size - 54), max(y - 54, 0)
            hover = f'<image class="hov" href="{thumbs[p]}" x="{hx:.1f}" y="{hy:.1f}" width="48" height="48"/>'
        parts.append(f'<g class="pt" data-kind="{kind}">{shape}{hover}<title>{_e(label)}</title></g>')
    parts.append("</svg>")
    return "".join(parts)


def _retrieval_html(embeddings: Embeddings, thumbs: list[str | None], k: int, max_queries: int, scale: str) -> str:
    matches = top_matches(embeddings, k, scale)
    out = [f"<h3>Images → top-{k} texts ({_e(SCALE_LABELS[scale])})</h3>"]
    for i, hits in list(enumerate(matches["image_to_text"]))[:max_queries]:
        img = f'<img class="thumb" src="{thumbs[i]}" alt="{_e(embeddings.image_sources[i])}">' if thumbs[i] else ""
        items = "".join(f'<span class="hit">{_e(embeddings.texts[j])} <b>{s:.3f}</b></span>' for j, s in hits)
        out.append(f'<div class="query" data-query="image">{img}<span>{_e(embeddings.image_sources[i])}</span> → {items}</div>')
    out.append(f"<h3>Texts → top-{k} images</h3>")
    for j, hits in list(enumerate(matches["text_to_image"]))[:max_queries]:
        items = "".join(
            '<span class="hit">' + (f'<img class="thumb" src="{thumbs[i]}" alt="{_e(embeddings.image_sources[i])}" '
                                     f'title="{_e(embeddings.image_sources[i])}">' if thumbs[i] else
                                     _e(embeddings.image_sources[i])) + f" <b>{s:.3f}</b></span>"
            for i, s in hits)
        out.append(f'<div class="query" data-query="text"><span>{_e(embeddings.texts[j])}</span> → {items}</div>')
    return "\n".join(out)


def report(
    embeddings: Embeddings,
    path: str | Path | None = None,
    *,
    scale: str = "cosine",
    methods: Sequence[str] = ("pca", "tsne"),
    k: int = 5,
    neighbours: int = 10,
    perplexity: float = 30.0,
    max_queries: int = 20,
    title: str | None = None,
) -> str:
    """Write the alignment views into one self-contained HTML page.

    The page holds the similarity matrix (with recall@k, mean ranks and the block-diagonal
    share when pairs are known), the retrieval lists with thumbnails, the modality gap and the
    projections side by side with their trustworthiness and k-NN agreement; hovering a point
    shows its text or thumbnail. No script and no network: images are inline, text is escaped.

    Args:
        embeddings: from :func:`captum_vlm.lens.embed`, with images and texts.
        path: where to write the page (None: only return it).
        scale: similarity scale of the matrix and the retrieval lists.
        methods: projections to draw (``"pca"``, ``"tsne"``, ``"umap"``).
        k: retrieval results per query.
        neighbours: k of the trustworthiness, k-NN agreement and modality gap.
        perplexity: t-SNE perplexity; lowered to fit small sets (below a third of the points).
        max_queries: image and text queries listed in the retrieval section.
        title: page title.

    Returns:
        The HTML text.

    Example:
        >>> cv.lens.report(emb, "lens.html", methods=("pca", "tsne", "umap"))   # doctest: +SKIP
    """
    embeddings.require(images=True, texts=True, view="the report")
    check_count(max_queries, "max_queries")
    points = len(embeddings.image) + len(embeddings.text)
    neighbours = min(neighbours, (points - 1) // 2)
    if neighbours < 1:
        raise ValueError(f"embeddings: the report needs at least 3 images and texts together, got {points}")
    perplexity = min(perplexity, max(1.0, (points - 1) / 3))
    thumbs: list[str | None] = ([_png_uri(t) for t in embeddings.thumbnails]
                                if len(embeddings.thumbnails) == len(embeddings.image)
                                else [None] * len(embeddings.image))
    heading = title or f"{embeddings.model_name}: image-text alignment"
    sections = [
        f"<h1>{_e(heading)}</h1>",
        f'<div class="meta">{len(embeddings.image)} images, {len(embeddings.text)} texts, '
        f"model {_e(embeddings.model_name)}, dimension {embeddings.image.shape[1]}</div>",
    ]
    if embeddings.pairs is not None:
        scores = alignment_scores(embeddings.similarity(scale), embeddings.pairs)
        sections += ["<h2>Retrieval scores (true pairs known)</h2>", _table(scores.as_dict())]
    fig = similarity_matrix(embeddings, scale)
    sections += [f"<h2>Similarity matrix ({_e(SCALE_LABELS[scale])})</h2>",
                 f'<img class="fig" data-view="similarity" src="{_figure_uri(fig)}" alt="similarity matrix">']
    sections += ["<h2>Retrieval</h2>", _retrieval_html(embeddings, thumbs, k, max_queries, scale)]
    gap = modality_gap(embeddings, neighbours)
    sections += ["<h2>Modality gap (Liang et al., NeurIPS 2022)</h2>", _table(gap.as_dict())]
    panels = []
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"methods: expected some of {METHODS}, got {method!r}")
        proj = project(embeddings, method, k=neighbours, perplexity=perplexity)
        panels.append(f'<figure data-projection="{method}">{_svg_scatter(proj.coords, embeddings, thumbs)}'
                      f"<figcaption><b>{method.upper()}</b>: {_e(proj.summary())}</figcaption></figure>")
    sections += ["<h2>Projections (hover a point; trust only structure they share)</h2>",
                 '<div class="note">circle: image, triangle: text; colour: label; grey line: image to its own text'
                 "</div>", f'<div class="proj">{"".join(panels)}</div>']
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{_e(heading)}</title>'
            f"<style>{_STYLE}</style></head><body>{''.join(sections)}</body></html>")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(page, encoding="utf-8")
    return page
