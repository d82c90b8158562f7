"""A self-contained HTML report of the inside-the-model views: one file, no script, no network.

Each view (a :class:`~captum_vlm.lens.LogitLens`, :class:`~captum_vlm.lens.ProbeResult`,
:class:`~captum_vlm.lens.HeadStatistics` or :class:`~captum_vlm.lens.HeadImportance`) draws its
own section (``html_section``): its figures as inline PNGs and its numbers as tables, every
cell's full value in ``data-value``; every string from the caller or the tokenizer is escaped.

Example:
    >>> lens = cv.lens.logit_lens(model, processor, image, "what color is the circle?")  # doctest: +SKIP
    >>> cv.lens.inside_report([lens, probe_result, stats, importance], "inside.html")     # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["inside_report"]


def inside_report(
    views: Any | Sequence[Any],
    path: str | Path | None = None,
    *,
    title: str | None = None,
    meta: str = "",
) -> str:
    """Write the inside-the-model views into one self-contained HTML page.

    Args:
        views: one view or a list of them (logit lenses, probe results, head statistics, head
            importance maps), shown in order.
        path: where to write the page (None: only return it).
        title: page title (default "captum-vlm: inside the model").
        meta: a line under the title (model, data...).

    Returns:
        The HTML text.

    Raises:
        TypeError: a view that cannot draw a section.
    """
    from captum_vlm.viz.lens_inside import lens_page

    views = list(views) if isinstance(views, (list, tuple)) else [views]
    if not views:
        raise ValueError("views: expected at least one view to show, got none")
    bad = [type(v).__name__ for v in views if not callable(getattr(v, "html_section", None))]
    if bad:
        raise TypeError(f"views: expected LogitLens, ProbeResult, HeadStatistics or HeadImportance, got {bad[0]}")
    page = lens_page([v.html_section() for v in views], title=title or "captum-vlm: inside the model", meta=meta)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(page, encoding="utf-8")
    return page
