"""The pattern finder: labels whose explanations behave unlike the rest, without masks.

Two signals, each a one-sided Fisher exact test of one label against all the other labels
(Fisher, *Statistical Methods for Research Workers*, 1925), Bonferroni-corrected over the labels
(and, for peaks, over every set of cells of that size the label's cells were picked from):

* **fixed peaks** — a label whose maps peak in the same few cells far more often than the other
  labels' maps peak there. Objects move from image to image, so maps that follow the object
  spread their peaks; a marker, watermark or border that the model reads for one label pins
  that label's peaks to its cells.
* **not grounded** — a label whose maps fail the grounding test (masking the top patches does
  not hurt the score more than masking random ones) far more often than the other labels'.
* **empty maps** — a label whose maps have no positive cell (they point nowhere, so they have no
  peak) far more often than the other labels': the method is blind to what drives that label.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import fisher_exact

__all__ = ["Finding", "empty_map_labels", "fixed_peak_labels", "ungrounded_labels"]


@dataclass
class Finding:
    """One label that stands out.

    Attributes:
        kind: ``"fixed peaks"`` or ``"not grounded"``.
        label: the label.
        method: the method whose maps show it.
        rate: share of the label's examples showing it (peaks in ``cells`` / not grounded).
        rate_rest: the same share among the other labels' examples.
        lift: ``rate / rate_rest`` (with one pseudo-count on each side).
        p_value: one-sided Fisher exact p-value, Bonferroni-corrected over the labels tested.
        count: the label's examples.
        cells: fixed peaks: the ``(row, col)`` cells the label's peaks fall in.
    """

    kind: str
    label: str
    method: str
    rate: float
    rate_rest: float
    lift: float
    p_value: float
    count: int
    cells: list[tuple[int, int]]

    def summary(self) -> str:
        where = f" in cells {self.cells}" if self.cells else ""
        return (f"{self.method}: label {self.label!r}: {self.kind}{where} for {self.rate:.0%} of its "
                f"{self.count} examples vs {self.rate_rest:.0%} of the others (lift {self.lift:.1f}, "
                f"p = {self.p_value:.2g})")


def _test(hits: int, n: int, hits_rest: int, n_rest: int, tests: float) -> tuple[float, float]:
    """(lift, corrected p) of ``hits / n`` being larger than ``hits_rest / n_rest``."""
    _, p = fisher_exact([[hits, n - hits], [hits_rest, n_rest - hits_rest]], alternative="greater")
    lift = ((hits + 1) / (n + 1)) / ((hits_rest + 1) / (n_rest + 1))
    return lift, min(1.0, float(p) * tests)


def fixed_peak_labels(
    labels: Sequence[str],
    peaks: Sequence[tuple[int, int]],
    method: str = "",
    max_cells: int = 3,
    min_rate: float = 0.5,
    min_lift: float = 3.0,
    alpha: float = 0.01,
    min_count: int = 10,
) -> list[Finding]:
    """Labels whose maps peak in the same ``<= max_cells`` cells far more than other labels'.

    For each label, its most frequent peak cells are taken one by one until they hold
    ``min_rate`` of the label's peaks (at most ``max_cells``); the label is flagged when that
    share is ``min_lift`` times the other labels' share in the same cells and the Fisher test
    gives ``p < alpha`` after multiplying by the number of labels tested and by the number of
    cell sets of that size (``C(cells seen, k)``: the cells are picked from the label's own
    peaks, so a few examples falling together by chance must not count).

    Args:
        labels: one label per example (``None`` entries are skipped).
        peaks: the peak ``(row, col)`` of each example's map (``None`` or ``(None, None)`` for an
            empty map: skipped).
        method: the method's name, carried into the findings.
        max_cells, min_rate, min_lift, alpha, min_count: see above; labels with fewer than
            ``min_count`` examples are not tested.

    Returns:
        Findings, strongest (largest lift) first.

    Example:
        >>> labels = ["cat"] * 20 + ["dog"] * 20
        >>> peaks = [(0, 0)] * 20 + [(i % 4, i // 4) for i in range(20)]
        >>> [f.label for f in fixed_peak_labels(labels, peaks)]
        ['cat']
    """
    pairs = [(str(lab), (int(p[0]), int(p[1]))) for lab, p in zip(labels, peaks, strict=True)
             if lab is not None and p is not None and p[0] is not None and p[1] is not None]
    counts = Counter(lab for lab, _ in pairs)
    tested = [lab for lab, n in counts.items() if n >= min_count]
    n_cells = len({cell for _, cell in pairs})
    findings = []
    for label in tested:
        own = Counter(cell for lab, cell in pairs if lab == label)
        cells, hits = [], 0
        for cell, n in own.most_common(max_cells):
            cells.append(cell)
            hits += n
            if hits >= min_rate * counts[label]:
                break
        rest = [cell for lab, cell in pairs if lab != label]
        hits_rest = sum(cell in cells for cell in rest)
        lift, p = _test(hits, counts[label], hits_rest, len(rest), len(tested) * math.comb(n_cells, len(cells)))
        rate = hits / counts[label]
        if rate >= min_rate and lift >= min_lift and p < alpha:
            findings.append(Finding("fixed peaks", label, method, rate, hits_rest / max(1, len(rest)), lift, p,
                                    counts[label], sorted(cells)))
    return sorted(findings, key=lambda f: -f.lift)


def ungrounded_labels(
    labels: Sequence[str],
    grounded: Sequence[bool | None],
    method: str = "",
    min_lift: float = 2.0,
    alpha: float = 0.01,
    min_count: int = 10,
) -> list[Finding]:
    """Labels whose maps are "not grounded" far more often than the other labels'.

    Args:
        labels: one label per example (``None`` entries skipped).
        grounded: the grounding verdict per example (``None`` entries skipped).
        method, min_lift, alpha, min_count: as in :func:`fixed_peak_labels`.

    Returns:
        Findings, strongest first.

    Example:
        >>> labels = ["cat"] * 20 + ["dog"] * 20
        >>> verdicts = [False] * 18 + [True] * 2 + [True] * 18 + [False] * 2  # cat: not grounded
        >>> [f.label for f in ungrounded_labels(labels, verdicts)]
        ['cat']
    """
    flags = [None if g is None or (isinstance(g, float) and np.isnan(g)) else not g for g in grounded]
    return _rate_outliers("not grounded", labels, flags, method, min_lift, alpha, min_count)


def empty_map_labels(
    labels: Sequence[str],
    empty: Sequence[bool],
    method: str = "",
    min_lift: float = 2.0,
    alpha: float = 0.01,
    min_count: int = 10,
) -> list[Finding]:
    """Labels whose maps are empty (no positive cell) far more often than the other labels'.

    Args:
        labels: one label per example.
        empty: per example, whether its map has no positive cell.
        method, min_lift, alpha, min_count: as in :func:`fixed_peak_labels`.

    Example:
        >>> [f.label for f in empty_map_labels(["a"] * 10 + ["b"] * 30, [True] * 10 + [False] * 30)]
        ['a']
    """
    return _rate_outliers("empty maps", labels, list(empty), method, min_lift, alpha, min_count)


def _rate_outliers(kind, labels, flags, method, min_lift, alpha, min_count) -> list[Finding]:
    """Labels whose share of ``flags`` (``None`` entries skipped) far exceeds the others'."""
    pairs = [(str(lab), bool(f)) for lab, f in zip(labels, flags, strict=True) if lab is not None and f is not None]
    counts = Counter(lab for lab, _ in pairs)
    tested = [lab for lab, n in counts.items() if n >= min_count]
    findings = []
    for label in tested:
        hits = sum(f for lab, f in pairs if lab == label)
        rest = [f for lab, f in pairs if lab != label]
        lift, p = _test(hits, counts[label], sum(rest), len(rest), len(tested))
        if lift >= min_lift and p < alpha:
            findings.append(Finding(kind, label, method, hits / counts[label], sum(rest) / max(1, len(rest)), lift, p,
                                    counts[label], []))
    return sorted(findings, key=lambda f: -f.lift)
