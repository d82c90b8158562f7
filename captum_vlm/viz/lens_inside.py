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
# Self-contained sections in the style of the alignment report (``cv.lens.report``): escaped text,
# figures as inline PNGs, numbers in plain tables (each cell's full value in ``data-value``), no script.
PAGE_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#222;max-width:1200px;margin:1rem auto}
h1{font-size:1.3rem} h2{font-size:1.1rem;margin-top:1.6rem} h3{font-size:1rem} .meta{color:#555;font-size:.9rem}
table{border-collapse:collapse;font-size:.85rem;margin:.4rem 0} td,th{border-bottom:1px solid #ddd;padding:.2rem .5rem;text-align:left}
img.fig{max-width:100%;border:1px solid #ddd} .note{color:#555;font-size:.85rem;max-width:80ch}
.scroll{overflow-x:auto}
"""


def _e(value: object) -> str:
    import html

    return html.escape(str(value), quote=True)


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """A Figure as PNG bytes."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def _img(fig: Figure, alt: str, view: str) -> str:
    import base64

    data = base64.b64encode(figure_png(fig, dpi=90)).decode("ascii")
    return f'<img class="fig" data-figure="{_e(view)}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _cell(value: float, digits: int = 3) -> str:
    """A numeric cell: the value shown rounded, in full in ``data-value`` (NaN shown as a dash)."""
    value = float(value)
    shown = "–" if np.isnan(value) else f"{value:.{digits}f}"
    return f'<td data-value="{value!r}">{shown}</td>'


def _matrix_table(values: Any, part: str, row_label: str, col_labels: Sequence[str], digits: int = 3) -> str:
    values = to_numpy(values, part)
    head = "".join(f"<th>{_e(c)}</th>" for c in col_labels)
    rows = "".join(f"<tr><th>{row_label} {r}</th>{''.join(_cell(v, digits) for v in row)}</tr>"
                   for r, row in enumerate(values))
    return (f'<div class="scroll"><table data-part="{_e(part)}"><thead><tr><th></th>{head}</tr></thead>'
            f"<tbody>{rows}</tbody></table></div>")


def logit_lens_html(lens: Any, title: str = "logit lens", notes: Sequence[str] = ()) -> str:
    """One ``<section>``: the layers x positions grid with the rank curves, the top-1 token and
    its probability per layer and position, and the produced token's rank and probability.

    Example:
        >>> html = logit_lens_html(lens, notes=["question: what color is it?"])  # doctest: +SKIP
    """
    produced = [str(t) for t in lens.produced_tokens]
    columns = [f"{p}: {t}" for p, t in zip(to_numpy(lens.positions, "positions").astype(int), produced)]
    top_probs = to_numpy(lens.top_probs[:, :, 0], "top_probs")
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    rows = "".join(
        f"<tr><th>layer {layer}</th>" + "".join(
            f'<td data-token="{_e(lens.top_tokens[layer][p][0])}" data-value="{float(top_probs[layer, p])!r}">'
            f"{_e(lens.top_tokens[layer][p][0])} <small>{top_probs[layer, p]:.3f}</small></td>"
            for p in range(len(columns))) + "</tr>"
        for layer in range(top_probs.shape[0]))
    top1 = (f'<div class="scroll"><table data-part="top-1"><thead><tr><th></th>{head}</tr></thead>'
            f"<tbody>{rows}</tbody></table></div>")
    parts = [f'<section data-view="logit-lens"><h2>{_e(title)}</h2>']
    parts += [f'<p class="note">{_e(n)}</p>' for n in notes]
    parts.append(f'<p class="meta" data-part="produced">produced: {_e(" ".join(produced))}</p>')
    parts.append(_img(plot_logit_lens(lens), f"{title}: top-1 token per layer and position", "logit-lens"))
    parts.append("<h3>Top-1 token per layer (its probability)</h3>" + top1)
    parts.append("<h3>Rank of the produced token (1 = top)</h3>"
                 + _matrix_table(lens.produced_ranks, "produced-rank", "layer", columns, digits=0))
    parts.append("<h3>Probability of the produced token</h3>"
                 + _matrix_table(lens.produced_probs, "produced-probability", "layer", columns))
    parts.append("<h3>Entropy of the next-token distribution (nats)</h3>"
                 + _matrix_table(lens.entropy, "entropy", "layer", columns))
    for word, values in getattr(lens, "word_maps", {}).items():
        last = int(values.shape[0]) - 1
        parts.append(_img(plot_word_map(values[last], word, last), f"p({word}) over the image tokens", "word-map"))
    parts.append("</section>")
    return "\n".join(parts)


def probe_html(result: Any, title: str = "linear probe") -> str:
    """One ``<section>``: accuracy per layer with the shuffled control (figure and table)."""
    rows = "".join(
        f"<tr><th>{layer}</th>{_cell(a)}{_cell(sa)}{_cell(c)}{_cell(sc)}</tr>"
        for layer, a, sa, c, sc in zip(result.layers, result.accuracy, result.accuracy_std,
                                       result.control, result.control_std))
    classes = ", ".join(str(c) for c in result.classes)
    return (f'<section data-view="probe"><h2>{_e(title)}</h2>'
            f'<p class="meta">where: {_e(result.where)} · classes: {_e(classes)} · majority-class share '
            f'<span data-part="chance" data-value="{float(result.chance)!r}">{result.chance:.3f}</span></p>'
            + _img(plot_probe_curves(result, title=title), f"{title}: accuracy per layer", "probe")
            + '<table data-part="probe-accuracy"><thead><tr><th>layer</th><th>accuracy</th><th>sd over folds</th>'
            "<th>shuffled-label control</th><th>control sd</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
            '<p class="note">Cross-validated accuracy of a logistic-regression probe; the control is the same '
            "probe on shuffled labels (Hewitt &amp; Liang 2019): the gap, not the accuracy, is what the layer "
            "encodes.</p></section>")


def head_statistics_html(stats: Any, title: str | None = None) -> str:
    """One ``<section>``: layer x head heat maps and one table per defined statistic."""
    maps = stats.maps()
    title = title or f"{stats.stream} attention heads"
    parts = [f'<section data-view="head-statistics" data-stream="{_e(stats.stream)}"><h2>{_e(title)}</h2>',
             _img(plot_layer_head_maps(maps, title=title, stream=stats.stream), title, "head-statistics")]
    for name, values in maps.items():
        heads = [f"head {h}" for h in range(to_numpy(values, name).shape[1])]
        parts.append(f"<h3>{_e(name)}</h3>" + _matrix_table(values, name, "layer", heads))
    parts.append("</section>")
    return "\n".join(parts)


def head_importance_html(importance: Any, target: str = "", top: int = 10, title: str | None = None) -> str:
    """One ``<section>``: the layer x head importance map and the heads ranked by the drop."""
    values = to_numpy(importance.importance, "importance")
    per_example = to_numpy(importance.per_example, "per_example")
    title = title or f"{importance.stream} head ablation ({importance.mode})"
    rows = "".join(
        f"<tr><td>{rank}</td><td>{layer}</td><td>{head}</td>{_cell(values[layer, head], 4)}"
        f"{_cell(np.std(per_example[:, layer, head]), 4)}</tr>"
        for rank, (layer, head) in enumerate(importance.ranked[:top], start=1))
    heads = [f"head {h}" for h in range(values.shape[1])]
    return (f'<section data-view="head-importance" data-stream="{_e(importance.stream)}"><h2>{_e(title)}</h2>'
            f'<p class="meta">target: {_e(target or "the given target")} · mode: {_e(importance.mode)} · '
            f"{per_example.shape[0]} examples · drop = target without ablation - with the head ablated</p>"
            + _img(plot_head_importance(values, importance.ranked, target=target, top=top), title, "head-importance")
            + f"<h3>Top {min(top, len(importance.ranked))} heads</h3>"
            '<table data-part="ranked-heads"><thead><tr><th>rank</th><th>layer</th><th>head</th>'
            f"<th>mean drop</th><th>sd over examples</th></tr></thead><tbody>{rows}</tbody></table>"
            "<h3>Mean drop per layer x head</h3>" + _matrix_table(values, "importance", "layer", heads, 4)
            + "</section>")


def lens_section(title: str, figures: Sequence[Figure] = (), notes: Sequence[str] = ()) -> str:
    """One ``<section>`` of an HTML report: escaped title and notes, each figure as an embedded PNG.

    Example:
        >>> html = lens_section("logit lens", [lens.plot()], ["answer: red"])  # doctest: +SKIP
    """
    parts = [f"<section class=\"lens-inside\"><h2>{_e(title)}</h2>"]
    parts += [f"<p>{_e(note)}</p>" for note in notes]
    parts += [_img(fig, title, "figure") for fig in figures]
    parts.append("</section>")
    return "\n".join(parts)


def lens_page(sections: Sequence[str], title: str = "captum-vlm: inside the model", meta: str = "") -> str:
    """A self-contained HTML page (no script, no network) of section blocks; text is escaped."""
    line = f'<div class="meta">{_e(meta)}</div>' if meta else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{PAGE_STYLE}</style></head><body><h1>{_e(title)}</h1>{line}"
            + "\n".join(sections) + "</body></html>")
