"""A self-contained HTML report: one file, inline images and data, no server, no network.

The first view is static HTML, so the page reads where scripts do not run (a repository page, an
untrusted notebook): the input image, the first map as an inline PNG with its colour bar, its
details and evidence, the model's scores, a table of every map's evidence (absent targets marked)
and the compare view (all methods for one target side by side, with their pairwise rank
agreement). Scripts only add the switching: the other maps travel as small numeric grids
(8-bit, base64) that the page draws on a canvas over the input image with the same colour maps
and value-dependent opacity as :func:`captum_vlm.viz.overlay`, so a thousand prompts stay a few
MB. Every string from the caller is escaped: static HTML through :func:`html.escape`, the script
builds its text with ``textContent`` from a JSON block whose ``<`` characters are escaped.

Example:
    >>> view = ReportView(method="grad-eclip", target="a red circle", image_png=png_bytes)  # doctest: +SKIP
    >>> html_text = render_report("shapes-clip", image_png, [view])                          # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import matplotlib
import numpy as np

from ._style import MAGNITUDE_CMAP, SIGNED_CMAP, check_finite_map

__all__ = ["ReportView", "encode_grid", "render_report"]


@dataclass
class ReportView:
    """One map of the report.

    Args:
        method: the method's name, e.g. ``"grad-eclip"``.
        target: what is explained: the prompt, word or answer token.
        image_png: the map over the image as PNG bytes (e.g. a saved ``viz.overlay`` figure),
            or ``None`` when ``grid`` is given (drawn by the page).
        details: ``{label: value}`` shown under the map (layers, head aggregation, target...).
        tokens: optional token strings to colour under the map (text-side scores).
        token_scores: one score per token in ``tokens``.
        grid: the map on its patch grid ``(h, w)``; drawn on a canvas when ``image_png`` is None.
        evidence: ``{label: line}``: faithfulness, randomisation check, the model's confidence.
        flag: a warning shown on the map, e.g. that the model does not see the target.
        value_label: what the number is (the colour bar's label).
    """

    method: str
    target: str
    image_png: bytes | None = None
    details: dict[str, str] = field(default_factory=dict)
    tokens: list[str] | None = None
    token_scores: list[float] | None = None
    grid: Any = None
    evidence: dict[str, str] = field(default_factory=dict)
    flag: str | None = None
    value_label: str | None = None


def _data_uri(png: bytes) -> str:
    if not isinstance(png, (bytes, bytearray)) or not bytes(png[:8]) == b"\x89PNG\r\n\x1a\n":
        raise ValueError("image_png: expected the bytes of a PNG file")
    return "data:image/png;base64," + base64.b64encode(bytes(png)).decode("ascii")


def _safe_json(value: object) -> str:
    """JSON that cannot close the ``<script>`` block it sits in."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def encode_grid(grid: Any) -> dict:
    """A map as 8 bits per cell: ``{"h", "w", "signed", "limit", "q"}`` with ``q`` base64 bytes;
    a cell's value is ``(q - 128) / 127 * limit`` when signed, ``q / 255 * limit`` otherwise.

    Example:
        >>> encode_grid([[0.0, 2.0]])["limit"]
        2.0
    """
    values = np.asarray(grid, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"grid: expected one map (h, w), got shape {values.shape}")
    check_finite_map(values, "grid")
    signed = bool((values < 0).any())
    limit = float(np.abs(values).max())
    scaled = values / limit if limit > 0 else np.zeros_like(values)
    q = np.round(scaled * 127 + 128) if signed else np.round(scaled * 255)
    data = base64.b64encode(q.astype(np.uint8).tobytes()).decode("ascii")
    return {"h": int(values.shape[0]), "w": int(values.shape[1]), "signed": signed, "limit": limit, "q": data}


def _lut(name: str) -> str:
    """256 RGB entries of a colour map as base64 bytes."""
    colours = matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3]
    return base64.b64encode(np.round(colours * 255).astype(np.uint8).tobytes()).decode("ascii")


_STYLE = """
.cv-report{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1rem 0;color:#222;max-width:1100px}
.cv-report h1{font-size:1.3rem;margin:0 0 .3rem} .cv-report .meta{color:#555;font-size:.9rem;margin-bottom:1rem}
.cv-report .row{display:flex;gap:1.5rem;flex-wrap:wrap;align-items:flex-start}
.cv-report .panel img,.cv-report .panel canvas{max-width:420px;width:100%;border:1px solid #ddd}
.cv-report .buttons button{margin:.15rem;padding:.3rem .6rem;border:1px solid #888;background:#f6f6f6;border-radius:4px;cursor:pointer}
.cv-report .buttons button.active{background:#2b6cb0;color:#fff;border-color:#2b6cb0}
.cv-report table{border-collapse:collapse;font-size:.85rem}
.cv-report td,.cv-report th{border-bottom:1px solid #ddd;padding:.2rem .6rem;text-align:left;vertical-align:top}
.cv-report .tok{display:inline-block;padding:.1rem .25rem;margin:.1rem;border-radius:3px}
.cv-report .note{color:#555;font-size:.85rem;max-width:60ch} .cv-report .details{font-size:.85rem;color:#333}
.cv-report .flag{background:#fff3cd;border:1px solid #c9a227;padding:.3rem .5rem;border-radius:4px;font-size:.9rem;max-width:60ch}
.cv-report tr.absent td{background:#fff3cd} .cv-report .bar{font-size:.8rem;color:#333}
.cv-report .compare img,.cv-report section img{max-width:100%;border:1px solid #ddd} .cv-report .noscript-hint{color:#777;font-size:.8rem}
"""

_SCRIPT = """
(function(){
  const root = document.getElementById('__ROOT__');
  const $ = (name) => root.querySelector('[data-part="' + name + '"]');
  const data = JSON.parse($('report-data').textContent);
  root.querySelectorAll('.noscript-hint').forEach(e => e.remove());
  const luts = {}; Object.entries(data.luts).forEach(([k, b]) => {luts[k] = bytes(b);});
  const state = {method: data.views[0].method, target: data.views[0].target};
  function bytes(b64){const s = atob(b64); const a = new Uint8Array(s.length); for (let i=0;i<s.length;i++) a[i]=s.charCodeAt(i); return a;}
  function el(tag, text, cls){const e=document.createElement(tag); if(text!==undefined) e.textContent=text; if(cls) e.className=cls; return e;}
  function find(){return data.views.find(v => v.method===state.method && v.target===state.target)
                 || data.views.find(v => v.method===state.method);}
  function colour(s, maxAbs){const a=maxAbs>0? Math.min(1, Math.abs(s)/maxAbs):0; const lut=luts.signed;
    const i = Math.round((s/(maxAbs||1))*127+128)*3; return 'rgba('+lut[i]+','+lut[i+1]+','+lut[i+2]+','+a.toFixed(3)+')';}
  function drawGrid(v){
    const canvas = $('canvas'), input = $('input'), g = v.grid;
    const W = input.naturalWidth, H = input.naturalHeight; canvas.width = W; canvas.height = H;
    const ctx = canvas.getContext('2d'); ctx.imageSmoothingEnabled = false; ctx.drawImage(input, 0, 0, W, H);
    const cells = document.createElement('canvas'); cells.width = g.w; cells.height = g.h;
    const cctx = cells.getContext('2d'); const img = cctx.createImageData(g.w, g.h); const q = bytes(g.q);
    const lut = g.signed ? luts.signed : luts.magnitude;
    for (let i = 0; i < q.length; i++){
      const strength = g.signed ? Math.abs(q[i]-128)/127 : q[i]/255;
      const j = q[i] * 3;
      img.data[4*i] = lut[j]; img.data[4*i+1] = lut[j+1]; img.data[4*i+2] = lut[j+2];
      img.data[4*i+3] = Math.round(255 * data.alpha * Math.min(1, strength));
    }
    cctx.putImageData(img, 0, 0);
    const box = data.crop_box || [0, 0, W, H];
    ctx.imageSmoothingEnabled = data.smooth; ctx.drawImage(cells, box[0], box[1], box[2]-box[0], box[3]-box[1]);
    const bar = $('bar'); bar.textContent = (v.value_label || 'attribution') + ': ' +
      (g.signed ? (-g.limit).toPrecision(3) + ' \\u2026 0 \\u2026 ' : '0 \\u2026 ') + g.limit.toPrecision(3) +
      ' (' + (g.signed ? 'teal negative, magenta positive' : 'viridis') + '; opacity grows with |value|)';
  }
  function show(){
    const v = find(); if(!v) return;
    state.target = v.target;
    const img = $('map'), canvas = $('canvas');
    img.dataset.method = v.method; img.dataset.target = v.target;
    if (v.png){ img.src = v.png; img.alt = v.method + ': ' + v.target; img.style.display=''; canvas.style.display='none'; $('bar').textContent=''; }
    else { drawGrid(v); img.removeAttribute('src'); img.alt = v.method + ': ' + v.target; img.style.display='none'; canvas.style.display=''; }
    canvas.dataset.method = v.method; canvas.dataset.target = v.target;
    $('map-title').textContent = v.method + ' \\u2014 ' + v.target;
    const flag = $('flag'); flag.textContent = v.flag || ''; flag.style.display = v.flag ? '' : 'none';
    const det = $('details'); det.replaceChildren();
    Object.entries(v.details).forEach(([k, val]) => {const li=el('li'); li.append(el('b', k + ': '), el('span', val)); det.append(li);});
    const ev = $('evidence'); ev.replaceChildren();
    Object.entries(v.evidence).forEach(([k, val]) => {const li=el('li'); li.append(el('b', k + ': '), el('span', val)); ev.append(li);});
    const toks = $('tokens'); toks.replaceChildren();
    if (v.tokens){ const m = Math.max(...v.token_scores.map(Math.abs));
      v.tokens.forEach((t,i) => {const s=el('span', t, 'tok'); s.style.background=colour(v.token_scores[i], m);
        s.title = v.token_scores[i].toFixed(4); toks.append(s);}); }
    $('note').textContent = data.notes[v.method] || '';
    root.querySelectorAll('[data-kind]').forEach(b => b.classList.toggle('active',
      (b.dataset.kind==='method' && b.dataset.value===state.method) || (b.dataset.kind==='target' && b.dataset.value===state.target)));
  }
  function buttons(id, kind, values){
    const box = $(id);
    values.forEach(val => {const b = el('button', val); b.dataset.kind = kind; b.dataset.value = val;
      b.addEventListener('click', () => {state[kind]=val; show();});
      box.append(b);});
  }
  buttons('methods', 'method', data.methods);
  buttons('targets', 'target', data.targets);
  const input = $('input');
  if (input.complete) show(); else input.addEventListener('load', show);
})();
"""


def _list_items(items: dict[str, str]) -> str:
    esc = html.escape
    return "".join(f"<li><b>{esc(str(k))}: </b><span>{esc(str(v))}</span></li>" for k, v in items.items())


def _static_tokens(tokens: list[str] | None, scores: list[float] | None) -> str:
    if not tokens:
        return ""
    values = np.asarray(scores, dtype=np.float64)
    check_finite_map(values, "token_scores")
    top = float(np.abs(values).max()) or 1.0
    lut = matplotlib.colormaps[SIGNED_CMAP]
    spans = []
    for token, value in zip(tokens, values):
        r, g, b, _ = lut(0.5 + 0.5 * value / top)
        spans.append(
            f'<span class="tok" title="{value:.4f}" style="background:rgba({int(r * 255)},{int(g * 255)},'
            f'{int(b * 255)},{min(1.0, abs(value) / top):.3f})">{html.escape(str(token))}</span>'
        )
    return "".join(spans)


def _evidence_row(view: ReportView) -> str:
    esc = html.escape
    marked = ' class="absent"' if view.flag else ""
    flag = f"<br><b>{esc(view.flag)}</b>" if view.flag else ""
    lines = "<br>".join(f"<b>{esc(k)}:</b> {esc(str(line))}" for k, line in view.evidence.items())
    return f"<tr{marked}><td>{esc(view.method)}</td><td>{esc(view.target)}{flag}</td><td>{lines}</td></tr>"


def render_report(
    title: str,
    image_png: bytes,
    views: list[ReportView],
    *,
    scores: dict[str, float] | None = None,
    score_label: str = "score",
    notes: dict[str, str] | None = None,
    meta: dict[str, str] | None = None,
    full_page: bool = True,
    crop_box: tuple[float, float, float, float] | None = None,
    compare_png: bytes | None = None,
    compare_title: str = "",
    agreement: dict[tuple[str, str], float] | None = None,
    alpha: float = 0.6,
    sections: list[str] | tuple[str, ...] = (),
) -> str:
    """Build the report page.

    Args:
        title: heading, e.g. the model name.
        image_png: the input image as PNG bytes.
        views: the maps, one per (method, target); the first needs ``image_png`` (the static
            first view), the others may travel as ``grid`` only.
        scores: model scores per prompt/answer, shown as a table.
        score_label: column heading of ``scores``.
        notes: ``{method: text}`` — what the method can and cannot tell.
        meta: ``{label: value}`` shown under the title (model, image size...).
        full_page: a whole HTML document; ``False`` gives a ``<div>`` fragment for notebooks
            (every element is looked up inside it, so several reports can share a page).
        crop_box: where grids go on the input image ``(left, top, right, bottom)`` in its
            pixels (the region the processor kept); default the whole image.
        compare_png: the compare view: every method for one target side by side.
        compare_title: what ``compare_png`` shows.
        agreement: ``{(method a, method b): rank correlation}`` shown as a table.
        alpha: opacity of the strongest grid values, as in :func:`overlay`.
        sections: further static ``<section>`` blocks, already escaped by whoever built them
            (e.g. the logit lens, :func:`captum_vlm.viz.lens_inside.logit_lens_html`).

    Returns:
        The HTML text; write it to a ``.html`` file and open it anywhere, or show it in Jupyter.
    """
    if not views:
        raise ValueError("views: expected at least one map to show, got none")
    if views[0].image_png is None:
        raise ValueError("views: the first view needs image_png (it is the page's static first view)")
    for i, v in enumerate(views):
        if v.image_png is None and v.grid is None:
            raise ValueError(f"views[{i}]: give image_png or grid")
        if v.token_scores is not None:
            check_finite_map(np.asarray(v.token_scores, dtype=np.float64), f"views[{i}].token_scores")
    check_finite_map(np.asarray(list((scores or {}).values()), dtype=np.float64), "scores")
    methods = list(dict.fromkeys(v.method for v in views))
    targets = list(dict.fromkeys(v.target for v in views))
    data = {
        "methods": methods,
        "targets": targets,
        "alpha": float(alpha),
        "smooth": True,
        "crop_box": None if crop_box is None else [float(c) for c in crop_box],
        "luts": {"magnitude": _lut(MAGNITUDE_CMAP), "signed": _lut(SIGNED_CMAP)},
        "views": [
            {
                "method": v.method,
                "target": v.target,
                "png": None if v.image_png is None else _data_uri(v.image_png),
                "grid": None if v.image_png is not None else encode_grid(v.grid),
                "details": {str(k): str(val) for k, val in v.details.items()},
                "evidence": {str(k): str(val) for k, val in v.evidence.items()},
                "flag": None if v.flag is None else str(v.flag),
                "value_label": None if v.value_label is None else str(v.value_label),
                "tokens": list(map(str, v.tokens)) if v.tokens is not None else None,
                "token_scores": [float(s) for s in v.token_scores] if v.token_scores is not None else None,
            }
            for v in views
        ],
        "notes": {str(k): str(n) for k, n in (notes or {}).items()},
    }
    esc = html.escape
    first = views[0]
    root = f"cv-report-{uuid.uuid4().hex[:12]}"
    meta_line = " · ".join(f"{esc(str(k))}: {esc(str(v))}" for k, v in (meta or {}).items())
    score_rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{float(s):.4f}</td></tr>" for k, s in (scores or {}).items())
    evidence_rows = "".join(_evidence_row(v) for v in views if v.evidence)
    evidence_table = (
        f"<h3>Evidence per map</h3><table data-part=\"evidence-table\"><thead><tr><th>method</th><th>target</th>"
        f"<th>evidence on this input</th></tr></thead><tbody>{evidence_rows}</tbody></table>"
        if evidence_rows
        else ""
    )
    agreement_html = ""
    if agreement:
        names = list(dict.fromkeys([a for a, _ in agreement] + [b for _, b in agreement]))
        header = "".join(f"<th>{esc(n)}</th>" for n in names)
        rows = ""
        for a in names:
            cells = "".join(
                "<td>1</td>" if a == b else
                f"<td>{agreement.get((a, b), agreement.get((b, a), float('nan'))):.2f}</td>" for b in names
            )
            rows += f"<tr><th>{esc(a)}</th>{cells}</tr>"
        agreement_html = (
            "<p class=\"note\">Pairwise rank agreement (Spearman correlation of the maps' patch rankings, mean over "
            "the explained targets): methods that agree point at the same evidence; where they disagree, "
            "read none of them alone.</p>"
            f"<table data-part=\"agreement\"><thead><tr><th></th>{header}</tr></thead><tbody>{rows}</tbody></table>"
        )
    compare_html = ""
    if compare_png is not None or agreement_html:
        figure = (
            f'<img data-part="compare" src="{_data_uri(compare_png)}" alt="{esc(compare_title)}">'
            if compare_png is not None else ""
        )
        compare_html = f'<h3>Compare methods: {esc(compare_title)}</h3><div class="compare">{figure}{agreement_html}</div>'
    flag_style = "" if first.flag else ' style="display:none"'
    body = f"""<div class="cv-report" id="{root}">
<style>{_STYLE}</style>
<h1>{esc(title)}</h1>
<div class="meta">{meta_line}</div>
<h3>Method</h3><div data-part="methods" class="buttons"><span class="noscript-hint">(switching maps needs scripts; the first map, the evidence and the comparison below read without)</span></div>
<h3>Prompt / word</h3><div data-part="targets" class="buttons"></div>
<div class="row">
  <div class="panel"><h3>Input</h3><img data-part="input" src="{_data_uri(image_png)}" alt="input image"></div>
  <div class="panel"><h3 data-part="map-title">{esc(first.method)} — {esc(first.target)}</h3>
    <div data-part="flag" class="flag"{flag_style}>{esc(first.flag or "")}</div>
    <img data-part="map" src="{_data_uri(first.image_png)}" alt="{esc(first.method)}: {esc(first.target)}" data-method="{esc(first.method)}" data-target="{esc(first.target)}">
    <canvas data-part="canvas" style="display:none"></canvas><div data-part="bar" class="bar"></div>
    <ul data-part="details" class="details">{_list_items(first.details)}</ul>
    <ul data-part="evidence" class="details">{_list_items(first.evidence)}</ul>
    <div data-part="tokens">{_static_tokens(first.tokens, first.token_scores)}</div>
    <p data-part="note" class="note">{esc((notes or {}).get(first.method, ""))}</p></div>
</div>
<h3>Model scores</h3><table><thead><tr><th>text</th><th>{esc(score_label)}</th></tr></thead><tbody data-part="scores">{score_rows}</tbody></table>
{evidence_table}
{compare_html}
{"".join(sections)}
<script type="application/json" data-part="report-data">{_safe_json(data)}</script>
<script>{_SCRIPT.replace("__ROOT__", root)}</script>
</div>"""
    if not full_page:
        return body
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title></head>
<body>
{body}
</body></html>
"""
