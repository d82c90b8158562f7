"""Tokens coloured by their attribution, as an HTML snippet or a matplotlib figure.

Every token string and label is escaped with :func:`html.escape`, so token text can never
inject markup into a page or notebook.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, to_hex
from matplotlib.figure import Figure

from ._style import check_finite_map, color_scale, to_numpy

_SPECIAL = re.compile(r"^(<[^<>\s]+>|\[[A-Za-z_]+\])$")  # <s>, </s>, <|endoftext|>, [CLS]
_PREFIXES = ("Ġ", "▁")  # byte-level BPE (GPT-2, RoBERTa), SentencePiece (T5, LLaMA, SigLIP)


def _is_special(token: str) -> bool:
    return bool(_SPECIAL.match(token))


def merge_subwords(tokens: Sequence[str], scores: Any) -> tuple[list[str], list[float]]:
    """Merge sub-word tokens into words, summing their scores.

    The tokenizer's scheme is read from the markers present in ``tokens``:

    * WordPiece (BERT, BLIP, ViLT): a token starting with ``##`` continues the previous word.
    * CLIP's BPE: a token ending with ``</w>`` ends a word; the next token starts a new one.
    * Byte-level BPE / SentencePiece: a token starting with ``Ġ`` or ``▁`` starts a new
      word; any other token continues the previous word.
    * No marker at all: tokens are left as they are.

    Markers are removed from the merged words. Special tokens (``<s>``, ``<|endoftext|>``,
    ``[CLS]`` ...) always stand alone.

    Args:
        tokens: token strings, as from ``tokenizer.convert_ids_to_tokens``.
        scores: one score per token (list, array or tensor).

    Returns:
        ``(words, word_scores)``.

    Example:
        >>> merge_subwords(["[CLS]", "play", "##ing", "cards"], [0.5, 1.0, 2.0, -1.0])
        (['[CLS]', 'playing', 'cards'], [0.5, 3.0, -1.0])
    """
    values = _scores(tokens, scores)
    tokens = [str(t) for t in tokens]
    if any(t.startswith("##") for t in tokens):
        scheme = "wordpiece"
    elif any(t.endswith("</w>") for t in tokens):
        scheme = "end-of-word"
    elif any(t.startswith(_PREFIXES) for t in tokens):
        scheme = "prefix"
    else:
        return tokens, [float(v) for v in values]

    words: list[str] = []
    word_scores: list[float] = []
    open_word = False  # may the next token continue the last word?
    for token, value in zip(tokens, values, strict=True):
        special = _is_special(token)
        if special:
            joins, text = False, token
        elif scheme == "wordpiece":
            joins, text = token.startswith("##") and open_word, token.removeprefix("##")
        elif scheme == "end-of-word":
            joins, text = open_word, token.removesuffix("</w>")
        else:
            starts = token.startswith(_PREFIXES)
            joins, text = open_word and not starts, token[1:] if starts else token
        if joins:
            words[-1] += text
            word_scores[-1] += float(value)
        else:
            words.append(text)
            word_scores.append(float(value))
        if scheme == "end-of-word":
            open_word = not special and not token.endswith("</w>")
        else:
            open_word = not special
    return words, word_scores


def _scores(tokens: Sequence[str], scores: Any) -> np.ndarray:
    values = to_numpy(scores, "scores").astype(np.float64)
    if values.ndim == 2 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 1 or len(values) != len(tokens):
        raise ValueError(
            f"scores must hold one value per token ({len(tokens)} tokens); got shape "
            f"{tuple(values.shape)}"
        )
    check_finite_map(values, "scores")
    return values


def _is_record(obj: Any) -> bool:
    """Duck-typed check for Captum's ``VisualizationDataRecord``."""
    return hasattr(obj, "raw_input_ids") and hasattr(obj, "word_attributions")


def _prepare(
    tokens: Any,
    scores: Any,
    merge: bool,
    signed: bool | None,
    cmap: str | Colormap | None,
) -> tuple[list[str], np.ndarray, list[str], list[str], Any, Colormap]:
    """Tokens, scores, background and text colours (hex), norm and colormap."""
    if isinstance(tokens, str):
        raise TypeError("tokens must be a list of token strings, not one string")
    if merge:
        tokens, scores = merge_subwords(tokens, scores)
    tokens = [str(t) for t in tokens]
    values = _scores(tokens, scores)
    drawn, norm, colormap, _ = color_scale(values, signed, cmap)
    rgba = colormap(norm(drawn))
    backgrounds = [to_hex(c, keep_alpha=False) for c in rgba]
    luminance = 0.2126 * rgba[:, 0] + 0.7152 * rgba[:, 1] + 0.0722 * rgba[:, 2]
    texts = ["#000000" if lum > 0.5 else "#ffffff" for lum in luminance]
    return tokens, values, backgrounds, texts, norm, colormap


def tokens_html(
    tokens: Any,
    scores: Any = None,
    *,
    merge_subwords: bool = False,
    signed: bool | None = None,
    title: str | None = None,
    cmap: str | Colormap | None = None,
) -> str:
    """Tokens coloured by attribution, as an HTML snippet.

    Colours follow the package convention: the teal-magenta diverging map centred at 0 for signed scores (any
    negative value, or ``signed=True``), ``viridis`` for magnitudes. Each token's score is in
    its tooltip. Token text and labels are HTML-escaped.

    Args:
        tokens: token strings, or a Captum ``VisualizationDataRecord`` (then ``scores`` is
            taken from it; see :func:`record_to_html`).
        scores: one score per token.
        merge_subwords: merge sub-words into words first (see :func:`merge_subwords`).
        signed: force a diverging (True) or magnitude (False, absolute values) scale.
        title: heading shown above the tokens.
        cmap: colour map name or object.

    Returns:
        An HTML string (a ``<div>``); in Jupyter wrap it in ``IPython.display.HTML``.

    Example:
        >>> tokens_html(["a", "red", "circle"], [0.1, 0.9, 0.4], title="target: 0")[:4]
        '<div'
    """
    if _is_record(tokens):
        return record_to_html(tokens, merge_subwords=merge_subwords, signed=signed, cmap=cmap)
    if scores is None:
        raise ValueError(
            "scores is required (one per token) unless tokens is a VisualizationDataRecord"
        )
    words, values, backgrounds, texts, norm, colormap = _prepare(
        tokens, scores, merge_subwords, signed, cmap
    )
    spans = [
        f'<span title="{html.escape(f"{v:.4g}")}" style="background-color:{bg};color:{fg};'
        "padding:1px 4px;margin:1px;border-radius:3px;display:inline-block;"
        f'white-space:pre">{html.escape(w)}</span>'
        for w, v, bg, fg in zip(words, values, backgrounds, texts, strict=True)
    ]
    heading = f'<div style="font-weight:bold">{html.escape(title)}</div>' if title else ""
    legend = (
        '<div style="font-size:smaller;color:#555">'
        f"{html.escape(colormap.name)} colour scale, {norm.vmin:.3g} to {norm.vmax:.3g}</div>"
    )
    return (
        '<div class="captum-vlm-tokens" style="font-family:sans-serif;line-height:1.8">'
        f"{heading}<div>{''.join(spans)}</div>{legend}</div>"
    )


def record_to_html(
    record: Any,
    *,
    merge_subwords: bool = False,
    signed: bool | None = None,
    cmap: str | Colormap | None = None,
) -> str:
    """HTML for a Captum ``captum.attr.visualization.VisualizationDataRecord``.

    The heading carries the record's labels (true, predicted with probability, attribution
    label and score, convergence delta), all escaped.

    Args:
        record: a ``VisualizationDataRecord`` (or anything with its attributes).
        merge_subwords, signed, cmap: as in :func:`tokens_html`.

    Returns:
        An HTML string.
    """
    if not _is_record(record):
        raise TypeError(
            f"record must be a captum VisualizationDataRecord, got {type(record).__name__}"
        )

    def fmt(value: Any) -> str:
        try:
            return f"{float(value):.2f}"
        except (TypeError, ValueError):
            return str(value)

    title = (
        f"true: {record.true_class} | predicted: {record.pred_class} ({fmt(record.pred_prob)}) | "
        f"attribution label: {record.attr_class} | attribution score: {fmt(record.attr_score)} | "
        f"convergence delta: {fmt(record.convergence_score)}"
    )
    return tokens_html(
        list(record.raw_input_ids), record.word_attributions, merge_subwords=merge_subwords,
        signed=signed, title=title, cmap=cmap,
    )  # fmt: skip


def tokens_figure(
    tokens: Any,
    scores: Any = None,
    *,
    merge_subwords: bool = False,
    signed: bool | None = None,
    title: str | None = None,
    cmap: str | Colormap | None = None,
    width: float = 8.0,
    fontsize: float = 12.0,
) -> Figure:
    """Tokens coloured by attribution, as a matplotlib figure of coloured text boxes.

    Same colours as :func:`tokens_html`; tokens wrap onto new lines at ``width`` inches, and
    a colour bar sits underneath.

    Args:
        tokens: token strings, or a Captum ``VisualizationDataRecord``.
        scores: one score per token (taken from the record when one is given).
        merge_subwords, signed, cmap: as in :func:`tokens_html`.
        title: figure title (e.g. method and target).
        width: figure width in inches.
        fontsize: token font size in points.

    Returns:
        The matplotlib Figure; tokens are its ``fig.texts`` in order, after the title.

    Example:
        >>> fig = tokens_figure(["a", "red", "circle"], [0.1, 0.9, 0.4], title="occlusion")
    """
    if _is_record(tokens):
        tokens, scores = list(tokens.raw_input_ids), tokens.word_attributions
    if scores is None:
        raise ValueError(
            "scores is required (one per token) unless tokens is a VisualizationDataRecord"
        )
    words, _, backgrounds, texts, norm, colormap = _prepare(
        tokens, scores, merge_subwords, signed, cmap
    )

    fig = plt.figure(figsize=(width, 1.0))
    renderer = fig.canvas.get_renderer()
    margin, gap, pad = 0.25, fontsize / 72 * 0.45, fontsize / 72 * 0.25
    line_height = fontsize / 72 * 2.0
    positions, x, line = [], margin, 0
    for word in words:
        probe = fig.text(0, 0, word, fontsize=fontsize, parse_math=False)
        w = probe.get_window_extent(renderer).width / fig.dpi + 2 * pad
        probe.remove()
        if x + w > width - margin and x > margin:
            x, line = margin, line + 1
        positions.append((x + pad, line))
        x += w + gap
    head = 0.55 if title else 0.2
    foot = 0.75
    height = head + (line + 1) * line_height + foot
    fig.set_size_inches(width, height)

    if title:
        fig.text(
            0.5,
            1 - 0.3 / height,
            title,
            ha="center",
            va="center",
            fontsize=fontsize,
            parse_math=False,
        )
    for word, (x, row), bg, fg in zip(words, positions, backgrounds, texts, strict=True):
        y = 1 - (head + (row + 0.5) * line_height) / height
        fig.text(
            x / width, y, word, fontsize=fontsize, color=fg, va="center", ha="left",
            parse_math=False, bbox={"facecolor": bg, "edgecolor": "none", "boxstyle": "round,pad=0.25"},
        )  # fmt: skip
    cax = fig.add_axes((0.25, 0.3 / height, 0.5, 0.15 / height))
    fig.colorbar(ScalarMappable(norm=norm, cmap=colormap), cax=cax, orientation="horizontal")
    return fig


__all__ = ["merge_subwords", "record_to_html", "tokens_figure", "tokens_html"]
