"""The result of an audit: its records, aggregates, the pattern finder and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa

from captum_vlm.audit.patterns import (
    Finding,
    empty_map_labels,
    fixed_peak_labels,
    ungrounded_labels,
)
from captum_vlm.audit.store import RunStore
from captum_vlm.audit.worker import AuditConfig

__all__ = ["Audit", "group_of"]


def group_of(record: dict[str, Any]) -> str:
    """The group a record is aggregated and tested in: its label (two-tower models; the
    prediction when it has none); for answer models the question and the model's answer
    (``"what color is the square? → blue"``), marked ``[wrong]`` when a label says so."""
    if record.get("question") is not None and record.get("explained") is not None:
        return record["explained"] + (" [wrong]" if record.get("correct") is False else "")
    return record["label"] if record["label"] is not None else f"(predicted) {record['prediction']}"


def _mean(values: list[Any]) -> float:
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(kept) / len(kept) if kept else float("nan")


class Audit:
    """The records of an audit folder, and what can be read from them.

    Args:
        output: the folder :func:`captum_vlm.audit` wrote.

    Example:
        >>> result = Audit("audit/")                   # doctest: +SKIP
        >>> result.label_table()[0]["accuracy"]        # doctest: +SKIP
    """

    def __init__(self, output: str | Path):
        self.output = Path(output)
        manifest = self.output / "manifest.json"
        if not manifest.is_file():
            raise ValueError(f"output: {str(output)!r} holds no audit (no manifest.json)")
        self.config = AuditConfig.from_json(json.dumps(json.loads(manifest.read_text(encoding="utf-8"))["config"]))
        self._store = RunStore(self.output, self.config, writable=False)

    @property
    def methods(self) -> list[str]:
        return list(self.config.methods)

    def table(self) -> pa.Table:
        """Every record as a ``pyarrow.Table`` sorted by id (``.to_pandas()`` for a DataFrame)."""
        return self._store.table()

    def records(self) -> list[dict[str, Any]]:
        """Every record as a dict, sorted by id."""
        return self.table().to_pylist()

    def __len__(self) -> int:
        return self.table().num_rows

    def errors(self) -> list[dict[str, Any]]:
        """The records of images that could not be audited (``error`` set)."""
        return [r for r in self.records() if r["error"] is not None]

    def _method(self, method: str | None) -> str:
        method = method or self.config.methods[0]
        if method not in self.config.methods:
            raise ValueError(f"method: {method!r} is not in this audit; it has {list(self.config.methods)}")
        return method

    # ----- aggregates ------------------------------------------------------------------------
    def label_table(self, method: str | None = None) -> list[dict[str, Any]]:
        """Per label (see :func:`group_of`: the prediction when an image has no label; question →
        answer for answer models): count, errors, accuracy, mean confidence and, for ``method``,
        the maps without a positive cell, mean entropy, mass on the object, deletion AUCs (map and
        random order), the share of maps not grounded and of objects not grounded (masked images)."""
        method = self._method(method)
        groups: dict[str, list[dict]] = {}
        for r in self.records():
            groups.setdefault(group_of(r), []).append(r)
        rows = []
        for label, items in sorted(groups.items(), key=lambda kv: str(kv[0])):
            ok = [r for r in items if r["error"] is None]
            verdicts = [r[f"{method}.grounded"] for r in ok if r[f"{method}.grounded"] is not None]
            objects = [r["object_grounded"] for r in ok if r["object_grounded"] is not None]
            rows.append({
                "label": label, "count": len(items), "errors": len(items) - len(ok),
                "empty_maps": sum(r[f"{method}.peak_row"] is None for r in ok),
                "accuracy": _mean([r["correct"] for r in ok]),
                "confidence": _mean([r["confidence"] for r in ok]),
                "entropy": _mean([r[f"{method}.entropy"] for r in ok]),
                "mass_inside": _mean([r[f"{method}.mass_inside"] for r in ok]),
                "deletion_auc": _mean([r[f"{method}.deletion_auc"] for r in ok]),
                "deletion_auc_random": _mean([r[f"{method}.deletion_auc_random"] for r in ok]),
                "not_grounded": _mean([not v for v in verdicts]) if verdicts else float("nan"),
                "object_not_grounded": _mean([not v for v in objects]) if objects else float("nan"),
            })
        return rows

    def off_object(self, method: str | None = None, n: int = 10) -> list[dict[str, Any]]:
        """The ``n`` records whose ``method`` map puts the most mass off the object (masked images)."""
        key = f"{self._method(method)}.mass_outside"
        masked = [r for r in self.records() if r[key] is not None and not math.isnan(r[key])]
        return sorted(masked, key=lambda r: (-r[key], r["id"]))[:n]

    def worst(self, method: str | None = None, n: int = 12) -> list[dict[str, Any]]:
        """The worst ``n`` explanations of ``method``: most mass off the object when masks were
        given, else the maps whose deletion AUC is furthest above the random order's (deleting
        by the map hurts the score least)."""
        method = self._method(method)
        off = self.off_object(method, n)
        if off:
            return off
        key, rand = f"{method}.deletion_auc", f"{method}.deletion_auc_random"
        scored = [r for r in self.records() if r[key] is not None and r[rand] is not None]
        return sorted(scored, key=lambda r: (-(r[key] - r[rand]), r["id"]))[:n]

    def patterns(self, method: str | None = None, **kwargs: Any) -> list[Finding]:
        """The pattern finder (see :mod:`captum_vlm.audit.patterns`) over ``method``'s maps, or
        every method's when ``None``: labels with fixed peaks, labels far more often with empty maps
        or not grounded; with masks, also labels whose objects are far more often not grounded
        (method ``"object mask"``: the answer survives losing the object).

        ``kwargs`` go to :func:`~captum_vlm.audit.patterns.fixed_peak_labels` (``min_lift``,
        ``alpha``, ...). Records are grouped by :func:`group_of` (answer models: question → answer)."""
        methods = [self._method(method)] if method else self.methods
        records = [r for r in self.records() if r["error"] is None]
        labels = [group_of(r) for r in records]
        shared = {k: v for k, v in kwargs.items() if k in ("alpha", "min_count")}
        findings: list[Finding] = []
        for m in methods:
            peaks = [(r[f"{m}.peak_row"], r[f"{m}.peak_col"]) for r in records]
            findings += fixed_peak_labels(labels, peaks, method=m, **kwargs)
            findings += empty_map_labels(labels, [p[0] is None for p in peaks], method=m, **shared)
            if "grounding" in self.config.checks:
                findings += ungrounded_labels(labels, [r[f"{m}.grounded"] for r in records], method=m, **shared)
        objects = [r["object_grounded"] for r in records]
        if any(v is not None for v in objects):
            findings += ungrounded_labels(labels, objects, method="object mask", **shared)
        return findings

    def to_html(self, path: str | Path | None = None, gallery: int = 12) -> str:
        """The self-contained HTML report (every text escaped); written to ``path`` when given."""
        from captum_vlm.audit.report import render_audit

        page = render_audit(self, gallery=gallery)
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page
