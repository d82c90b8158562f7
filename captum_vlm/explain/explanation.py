"""The :class:`Explanation`: maps, token scores, model scores and metadata; it draws and saves
itself."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from captum_vlm.explain.evidence import compare_records, rank_agreement
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
        lenses: ``explain(..., logit_lens=True)``: the logit lens of each explained text's
            explained tokens (:class:`captum_vlm.lens.LogitLens`, ``.prompt`` is the text).
    """

    image: Image.Image
    texts: list[str]
    records: list[MapRecord]
    scores: dict[str, float]
    score_kind: str
    model_name: str
    crop_box: tuple[float, float, float, float] | None = None
    notes: dict[str, str] = field(default_factory=dict)
    lenses: list = field(default_factory=list)

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
        labels = {r.details.get("value") for r in self.records if method in (None, r.method)}
        value = labels.pop() if len(labels) == 1 else "attribution (each panel on its own scale)"
        return overlay_grid(self.image, maps, ncols=min(ncols, len(maps)), title=self.model_name,
                            crop_box=self.crop_box, value_label=value)

    def compare(self, target: int | None = None, ncols: int = 4):
        """The compare view: every method's map of one text side by side (prompt-independent
        maps included), titled with the methods' mean pairwise rank agreement. Returns a Figure."""
        from captum_vlm.viz import overlay_grid

        records = compare_records(self.records, target)
        if not records:
            raise ValueError(f"target: no whole-text map of text {target!r} in this explanation")
        maps = {f"{r.method}{' (prompt-independent)' if r.text_index is None else ''}": r.grid for r in records}
        shown = next((r.target for r in records if r.text_index is not None), records[0].target)
        return overlay_grid(self.image, maps, ncols=min(ncols, len(maps)), title=f"{self.model_name}: {shown}",
                            crop_box=self.crop_box, value_label="each panel on its own scale")

    def logit_lens(self, text: int | str | None = None):
        """The logit lens of one explained text (index or the text; None: the first lensed).

        Raises:
            ValueError: the explanation holds no lens (pass ``logit_lens=True`` to ``explain``)
                or none of that text.
        """
        if not self.lenses:
            raise ValueError("logit_lens: this explanation holds no logit lens; pass logit_lens=True to explain() "
                             "(models with a language decoder)")
        if text is None:
            return self.lenses[0]
        wanted = self.texts[text] if isinstance(text, int) and not isinstance(text, bool) and 0 <= text < len(self.texts) else text
        for lens in self.lenses:
            if lens.prompt == wanted:
                return lens
        raise ValueError(f"text: no logit lens of {text!r}; lensed: {[lens.prompt for lens in self.lenses]}")

    def agreement(self) -> dict[tuple[str, str], float]:
        """Pairwise rank agreement of the methods: Spearman correlation of their maps of each
        explained text, mean over the texts (:func:`captum_vlm.evidence.rank_agreement`)."""
        return rank_agreement(self.records)

    def _flag(self, record: MapRecord) -> str | None:
        """A warning for a map whose target the model does not see (see :func:`confidence`)."""
        if not record.evidence_values.get("absent"):
            return None
        seen = record.evidence.get("model's confidence", "low").split(" — ")[0]
        return (f"The model does not see '{record.target}' (confidence {seen}): this map shows where "
                "it would look, not an object it found.")

    def _record_png(self, record: MapRecord) -> bytes:
        import matplotlib.pyplot as plt

        from captum_vlm.viz import overlay

        flag = "MODEL DOES NOT SEE THIS TARGET" if self._flag(record) else None
        fig = overlay(self.image, record.grid, title=flag, method=record.method,
                      layers=record.details.get("layers"), heads=record.details.get("heads"),
                      target=record.target, crop_box=self.crop_box, value_label=record.details.get("value"))
        try:
            return _png(fig)
        finally:
            plt.close(fig)

    def to_html(self, path: str | Path | None = None, full_page: bool = True) -> str:
        """The self-contained HTML report; written to ``path`` when given. Returns the HTML.

        ``full_page=False`` gives the ``<div>`` fragment that notebooks show."""
        from captum_vlm.viz.report import ReportView, render_report

        views = [
            ReportView(r.method, r.target, self._record_png(r) if i == 0 else None, r.details, r.tokens,
                       None if r.token_scores is None else list(map(float, r.token_scores)),
                       grid=r.grid, evidence=r.evidence, flag=self._flag(r), value_label=r.details.get("value"))
            for i, r in enumerate(self.records)
        ]
        compare_png, compare_title = None, ""
        if len(self.methods) > 1 and compare_records(self.records, None):
            import matplotlib.pyplot as plt

            figure = self.compare()
            compare_png, compare_title = _png(figure), compare_records(self.records, None)[0].target
            plt.close(figure)
        buffer = io.BytesIO()
        self.image.convert("RGB").save(buffer, format="PNG")
        page = render_report(
            f"captum-vlm: {self.model_name}", buffer.getvalue(), views, scores=self.scores,
            score_label=self.score_kind, notes=self.notes,
            meta={"model": self.model_name, "image": f"{self.image.width}×{self.image.height}"},
            full_page=full_page, crop_box=self.crop_box, compare_png=compare_png,
            compare_title=compare_title, agreement=self.agreement() if len(self.methods) > 1 else None,
            sections=[lens.html_section(title=f"Logit lens: {lens.prompt}") for lens in self.lenses],
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
            "logit_lens": [
                {"text": lens.prompt, "produced_tokens": lens.produced_tokens,
                 "produced_ids": lens.produced_ids.tolist(), "produced_ranks": lens.produced_ranks.tolist(),
                 "produced_probs": lens.produced_probs.tolist(), "top_tokens": lens.top_tokens}
                for lens in self.lenses
            ],
            "maps": [
                {
                    "method": r.method,
                    "target": r.target,
                    "details": r.details,
                    "grid": np.asarray(r.grid, dtype=float).tolist(),
                    "tokens": r.tokens,
                    "token_scores": None if r.token_scores is None else np.asarray(r.token_scores, float).tolist(),
                    "text_index": r.text_index,
                    "evidence": r.evidence,
                    "evidence_values": r.evidence_values,
                }
                for r in self.records
            ],
        }

    def save(self, directory: str | Path) -> list[Path]:
        """Write one PNG per map and ``explanation.json``. Returns the paths written.

        Saving again into the same folder first removes the PNGs the previous ``save`` wrote
        (listed in its ``explanation.json``), so no stale map stays beside the new ones; other
        files are left alone."""
        out = Path(directory)
        if out.exists() and not out.is_dir():
            raise ValueError(f"directory: {str(out)!r} is a file; give a folder for the PNGs")
        out.mkdir(parents=True, exist_ok=True)
        remove_previous_save(out)
        written = []
        for i, record in enumerate(self.records):
            path = out / f"{i:02d}-{_slug(record.method)}-{_slug(record.target)}.png"
            path.write_bytes(self._record_png(record))
            written.append(path)
        path = out / "explanation.json"
        record = {**self.to_dict(), "files": [p.name for p in written]}
        path.write_text(json.dumps(record, indent=1), encoding="utf-8")
        return [*written, path]


def remove_previous_save(out: Path) -> None:
    """Delete the PNGs an earlier :meth:`Explanation.save` listed in ``out/explanation.json``."""
    manifest = out / "explanation.json"
    if not manifest.is_file():
        return
    try:
        names = json.loads(manifest.read_text(encoding="utf-8")).get("files", [])
    except (ValueError, AttributeError):
        return
    for name in names:
        candidate = out / str(name)
        if candidate.parent == out and candidate.suffix == ".png" and candidate.is_file():
            candidate.unlink()


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(part for part in keep.split("-") if part)[:40] or "x"
