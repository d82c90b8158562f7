"""The audit's HTML report: one self-contained file, every text escaped with :func:`html.escape`.

Per-label tables for each method, the pattern finder's findings, the examples with the most
mass off the object, and a gallery of the worst cases with their maps (over the image when the
image is a file and the audit kept its maps).
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import numpy as np

__all__ = ["render_audit"]

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#222;max-width:1200px;margin:1rem auto}
h1{font-size:1.4rem} h2{font-size:1.15rem;margin-top:1.6rem} table{border-collapse:collapse;font-size:.85rem}
td,th{border:1px solid #ccc;padding:.2rem .45rem;text-align:right} th{background:#f2f2f2}
td.t{text-align:left} .gallery{display:flex;flex-wrap:wrap;gap:1rem} .card{width:260px;font-size:.8rem}
.card img{width:100%} .finding{background:#fff4e5;border-left:4px solid #e69500;padding:.3rem .6rem;margin:.3rem 0}
.meta{color:#555}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return _e(value)


def _table(rows: list[dict[str, Any]], columns: list[str], text_columns: tuple[str, ...]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f'<td class="t">{_e(r[c])}</td>' if c in text_columns else f"<td>{_number(r[c])}</td>"
                         for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _map_png(record: dict[str, Any], method: str) -> bytes | None:
    """The map of ``record`` over its image (or alone) as PNG bytes; ``None`` without a stored map."""
    import matplotlib.pyplot as plt

    flat = record.get(f"{method}.map")
    if flat is None:
        return None
    grid = np.asarray(flat, dtype=np.float32).reshape(record["map_rows"], record["map_cols"])
    fig = None
    try:
        if record.get("path"):
            from PIL import Image

            from captum_vlm.viz import overlay

            with Image.open(record["path"]) as opened:
                fig = overlay(opened.convert("RGB"), grid, method=method, target=record["explained"])
        else:
            fig, ax = plt.subplots(figsize=(3, 3))
            shown = ax.imshow(grid, cmap="viridis")
            fig.colorbar(shown, ax=ax, label="attribution")
            ax.set_title(f"{method}: {record['explained']}", fontsize=8)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=70, bbox_inches="tight")
        return buffer.getvalue()
    except (OSError, ValueError):
        return None
    finally:
        if fig is not None:
            plt.close(fig)


def _card(record: dict[str, Any], method: str) -> str:
    png = _map_png(record, method)
    picture = "" if png is None else f'<img alt="map" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
    facts = [("id", record["id"]), ("label", record["label"]), ("question", record.get("question")),
             ("prediction", record["prediction"]),
             ("confidence", _number(record["confidence"])), ("mass off object", _number(record[f"{method}.mass_outside"])),
             ("deletion AUC / random", f"{_number(record[f'{method}.deletion_auc'])} / "
                                       f"{_number(record[f'{method}.deletion_auc_random'])}"),
             ("grounded", record[f"{method}.grounded"])]
    text = "<br>".join(f"<b>{_e(k)}</b>: {_e(v)}" for k, v in facts if k != "question" or v is not None)
    return f'<div class="card">{picture}<div>{text}</div></div>'


def render_audit(result: Any, gallery: int = 12) -> str:
    """The report of an :class:`~captum_vlm.audit.Audit` as one HTML page."""
    config, records = result.config, result.records()
    errors = [r for r in records if r["error"] is not None]
    parts = [f"<h1>captum-vlm audit: {_e(config.model_name)}</h1>",
             f'<p class="meta">{len(records)} images, {len(errors)} errors; methods {_e(", ".join(config.methods))}; '
             f"checks {_e(', '.join(config.checks) or 'none')}; explained: the {_e(config.explain)}; "
             f"{len(config.texts)} prompts: {_e(' | '.join(config.texts))}</p>"]
    findings = result.patterns()
    parts.append("<h2>Pattern finder (no masks needed)</h2>")
    parts.append("".join(f'<div class="finding">{_e(f.summary())}</div>' for f in findings)
                 or "<p>No label stands out: no fixed peak cells, no label far more often not grounded.</p>")
    columns = ["label", "count", "errors", "empty_maps", "accuracy", "confidence", "entropy", "mass_inside",
               "deletion_auc", "deletion_auc_random", "not_grounded", "object_not_grounded"]
    for method in config.methods:
        parts.append(f"<h2>Per label: {_e(method)}</h2>")
        parts.append(_table(result.label_table(method), columns, ("label",)))
        off = result.off_object(method, 10)
        if off:
            parts.append(f"<h2>Most mass off the object: {_e(method)}</h2>")
            parts.append(_table(off, ["id", "label", "prediction", "confidence", f"{method}.mass_outside"],
                                ("id", "label", "prediction")))
        worst = result.worst(method, gallery)
        if worst:
            parts.append(f"<h2>Worst cases: {_e(method)}</h2>")
            parts.append('<div class="gallery">' + "".join(_card(r, method) for r in worst) + "</div>")
    if errors:
        parts.append("<h2>Errors</h2>")
        parts.append(_table(errors[:50], ["id", "error"], ("id", "error")))
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{_e("audit: " + config.model_name)}</title>'
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")
