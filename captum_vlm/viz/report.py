"""A self-contained HTML report: one file, inline images and data, no server, no network.

The page shows the image, the prompts or caption words and the methods as buttons; clicking a
prompt/word or a method shows its map. Model scores and each method's limits are
listed. Every string from the caller is escaped: the page builds its text with ``textContent``
from a JSON block whose ``<`` characters are escaped, and the static HTML goes through
:func:`html.escape`.

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

__all__ = ["ReportView", "render_report"]


@dataclass
class ReportView:
    """One map of the report.

    Args:
        method: the method's name, e.g. ``"grad-eclip"``.
        target: what is explained: the prompt, word or answer token.
        image_png: the map over the image, as PNG bytes (e.g. a saved ``viz.overlay`` figure).
        details: ``{label: value}`` shown under the map (layers, head aggregation, target...).
        tokens: optional token strings to colour under the map (text-side scores).
        token_scores: one score per token in ``tokens``.
    """

    method: str
    target: str
    image_png: bytes
    details: dict[str, str] = field(default_factory=dict)
    tokens: list[str] | None = None
    token_scores: list[float] | None = None


def _data_uri(png: bytes) -> str:
    if not isinstance(png, (bytes, bytearray)) or not bytes(png[:8]) == b"\x89PNG\r\n\x1a\n":
        raise ValueError("image_png: expected the bytes of a PNG file")
    return "data:image/png;base64," + base64.b64encode(bytes(png)).decode("ascii")


def _safe_json(value: object) -> str:
    """JSON that cannot close the ``<script>`` block it sits in."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_STYLE = """
.cv-report{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1rem 0;color:#222;max-width:1100px}
.cv-report h1{font-size:1.3rem;margin:0 0 .3rem} .cv-report .meta{color:#555;font-size:.9rem;margin-bottom:1rem}
.cv-report .row{display:flex;gap:1.5rem;flex-wrap:wrap;align-items:flex-start}
.cv-report .panel img{max-width:420px;width:100%;border:1px solid #ddd}
.cv-report .buttons button{margin:.15rem;padding:.3rem .6rem;border:1px solid #888;background:#f6f6f6;border-radius:4px;cursor:pointer}
.cv-report .buttons button.active{background:#2b6cb0;color:#fff;border-color:#2b6cb0}
.cv-report table{border-collapse:collapse;font-size:.9rem}
.cv-report td,.cv-report th{border-bottom:1px solid #ddd;padding:.2rem .6rem;text-align:left}
.cv-report .tok{display:inline-block;padding:.1rem .25rem;margin:.1rem;border-radius:3px}
.cv-report .note{color:#555;font-size:.85rem;max-width:60ch} .cv-report .details{font-size:.85rem;color:#333}
"""

_SCRIPT = """
(function(){
  const root = document.getElementById('__ROOT__');
  const $ = (name) => root.querySelector('[data-part="' + name + '"]');
  const data = JSON.parse($('report-data').textContent);
  const state = {method: data.methods[0], target: data.targets[0]};
  function el(tag, text, cls){const e=document.createElement(tag); if(text!==undefined) e.textContent=text; if(cls) e.className=cls; return e;}
  function find(){return data.views.find(v => v.method===state.method && v.target===state.target)
                 || data.views.find(v => v.method===state.method);}
  function colour(s, maxAbs){const a=maxAbs>0? Math.min(1, Math.abs(s)/maxAbs):0;
    return s>=0 ? 'rgba(214,39,40,'+a.toFixed(3)+')' : 'rgba(31,119,180,'+a.toFixed(3)+')';}
  function show(){
    const v = find(); if(!v) return;
    state.target = v.target;
    const img = $('map');
    img.src = v.png; img.alt = v.method + ': ' + v.target; img.dataset.method = v.method; img.dataset.target = v.target;
    $('map-title').textContent = v.method + ' \\u2014 ' + v.target;
    const det = $('details'); det.replaceChildren();
    Object.entries(v.details).forEach(([k, val]) => {const li=el('li'); li.append(el('b', k + ': '), el('span', val)); det.append(li);});
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
  const table = $('scores');
  Object.entries(data.scores).forEach(([k, s]) => {const tr=el('tr'); tr.append(el('td', k), el('td', Number(s).toFixed(4))); table.append(tr);});
  show();
})();
"""


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
) -> str:
    """Build the report page.

    Args:
        title: heading, e.g. the model name.
        image_png: the input image as PNG bytes.
        views: the maps, one per (method, target).
        scores: model scores per prompt/answer, shown as a table.
        score_label: column heading of ``scores``.
        notes: ``{method: text}`` — what the method can and cannot tell.
        meta: ``{label: value}`` shown under the title (model, image size...).
        full_page: a whole HTML document; ``False`` gives a ``<div>`` fragment for notebooks
            (every element is looked up inside it, so several reports can share a page).

    Returns:
        The HTML text; write it to a ``.html`` file and open it anywhere, or show it in Jupyter.
    """
    if not views:
        raise ValueError("views: expected at least one map to show, got none")
    methods = list(dict.fromkeys(v.method for v in views))
    targets = list(dict.fromkeys(v.target for v in views))
    data = {
        "methods": methods,
        "targets": targets,
        "views": [
            {
                "method": v.method,
                "target": v.target,
                "png": _data_uri(v.image_png),
                "details": {str(k): str(val) for k, val in v.details.items()},
                "tokens": list(map(str, v.tokens)) if v.tokens is not None else None,
                "token_scores": [float(s) for s in v.token_scores]
                if v.token_scores is not None
                else None,
            }
            for v in views
        ],
        "scores": {str(k): float(s) for k, s in (scores or {}).items()},
        "notes": {str(k): str(n) for k, n in (notes or {}).items()},
    }
    esc = html.escape
    root = f"cv-report-{uuid.uuid4().hex[:12]}"
    meta_line = " · ".join(f"{esc(str(k))}: {esc(str(v))}" for k, v in (meta or {}).items())
    body = f"""<div class="cv-report" id="{root}">
<style>{_STYLE}</style>
<h1>{esc(title)}</h1>
<div class="meta">{meta_line}</div>
<h3>Method</h3><div data-part="methods" class="buttons"></div>
<h3>Prompt / word</h3><div data-part="targets" class="buttons"></div>
<div class="row">
  <div class="panel"><h3>Input</h3><img data-part="input" src="{_data_uri(image_png)}" alt="input image"></div>
  <div class="panel"><h3 data-part="map-title"></h3><img data-part="map" alt=""><ul data-part="details" class="details"></ul>
    <div data-part="tokens"></div><p data-part="note" class="note"></p></div>
</div>
<h3>Model scores</h3><table><thead><tr><th>text</th><th>{esc(score_label)}</th></tr></thead><tbody data-part="scores"></tbody></table>
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
