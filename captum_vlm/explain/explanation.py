"""The :class:`Explanation`: maps, token scores, model scores and metadata; it draws and saves
itself."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from captum_vlm.explain.registry import MapRecord


@dataclass
class Explanation:
    """Maps, token scores, model scores and metadata of one image and its texts.

    Args:
        image: the original image.
        texts: the prompts or captions.
        records: the maps, one per (method, target).
        scores: ``{text: score}`` of the model (probability over prompts for CLIP, sigmoid for
            SigLIP).
        score_kind: what ``scores`` holds.
        model_name: the model's name for titles.
        crop_box: region of ``image`` that the processor kept ``(left, top, right, bottom)``.
        notes: ``{method: limits}``.
    """

    image: Image.Image
    texts: list[str]
    records: list[MapRecord]
    scores: dict[str, float]
    score_kind: str
    model_name: str
    crop_box: tuple[float, float, float, float] | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.records))

    def maps(self, method: str | None = None) -> dict[str, np.ndarray]:
        """``{"method: target": grid}`` of every map (of one method if given)."""
        return {f"{r.method}: {r.target}": r.grid for r in self.records if method in (None, r.method)}

    def plot(self, method: str | None = None, ncols: int = 4):
        """All maps (or one method's) over the image, side by side. Returns a Figure."""
        from captum_vlm.viz import overlay_grid

        maps = self.maps(method)
        if not maps:
            raise ValueError(f"method: {method!r} is not in this explanation; it holds {self.methods}")
        return overlay_grid(self.image, maps, ncols=min(ncols, len(maps)), title=self.model_name,
                            crop_box=self.crop_box)

    def _record_png(self, record: MapRecord) -> bytes:
        import matplotlib.pyplot as plt

        from captum_vlm.viz import overlay

        fig = overlay(self.image, record.grid, method=record.method, layers=record.details.get("layers"),
                      heads=record.details.get("heads"), target=record.target, crop_box=self.crop_box)
        try:
            return _png(fig)
        finally:
            plt.close(fig)

    def to_html(self, path: str | Path | None = None, full_page: bool = True) -> str:
        """The self-contained HTML report; written to ``path`` when given. Returns the HTML.

        ``full_page=False`` gives the ``<div>`` fragment that notebooks show."""
        from captum_vlm.viz.report import ReportView, render_report

        views = [
            ReportView(r.method, r.target, self._record_png(r), r.details, r.tokens,
                       None if r.token_scores is None else list(map(float, r.token_scores)))
            for r in self.records
        ]
        buffer = io.BytesIO()
        self.image.convert("RGB").save(buffer, format="PNG")
        page = render_report(
            f"captum-vlm: {self.model_name}", buffer.getvalue(), views, scores=self.scores,
            score_label=self.score_kind, notes=self.notes,
            meta={"model": self.model_name, "image": f"{self.image.width}×{self.image.height}"},
            full_page=full_page,
        )
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page

    def _repr_html_(self) -> str:
        return self.to_html(full_page=False)

    def to_dict(self) -> dict:
        """Everything but the image, as JSON-ready data."""
        return {
            "model": self.model_name,
            "texts": self.texts,
            "scores": self.scores,
            "score_kind": self.score_kind,
            "crop_box": self.crop_box,
            "maps": [
                {
                    "method": r.method,
                    "target": r.target,
                    "details": r.details,
                    "grid": np.asarray(r.grid, dtype=float).tolist(),
                    "tokens": r.tokens,
                    "token_scores": None if r.token_scores is None else np.asarray(r.token_scores, float).tolist(),
                }
                for r in self.records
            ],
        }

    def save(self, directory: str | Path) -> list[Path]:
        """Write one PNG per map and ``explanation.json``. Returns the paths written."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for i, record in enumerate(self.records):
            path = out / f"{i:02d}-{_slug(record.method)}-{_slug(record.target)}.png"
            path.write_bytes(self._record_png(record))
            written.append(path)
        path = out / "explanation.json"
        path.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        return [*written, path]


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(part for part in keep.split("-") if part)[:40] or "x"
