"""Shared drawing conventions: array conversion, colour maps, norms and figure titles.

Colour maps are perceptually uniform: ``viridis`` for magnitudes, :data:`SIGNED_CMAP` (teal for
negative, magenta for positive, light grey at zero) centred at zero with symmetric limits for signed
values. Its ends are chosen away from the hues of typical scene colours (the zoo's red, green, blue
and yellow objects): a red/blue map over a red and a blue object reads the objects as "positive"
and "negative" where the attribution is about zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import Colormap, LinearSegmentedColormap, Normalize, TwoSlopeNorm

MAGNITUDE_CMAP = "viridis"
SIGNED_CMAP = "cv_teal_magenta"
"""Diverging map registered with matplotlib: dark teal (hue ~180°) - light grey - dark magenta
(hue ~300°), lightness rising symmetrically to the centre. The scene hues it avoids: red ~0°,
yellow ~55°, green ~130°, blue ~230°."""

_SIGNED_STOPS = [
    (0.00, (0.00, 0.33, 0.36)),
    (0.25, (0.20, 0.60, 0.62)),
    (0.50, (0.95, 0.95, 0.95)),
    (0.75, (0.78, 0.42, 0.76)),
    (1.00, (0.47, 0.06, 0.47)),
]
if SIGNED_CMAP not in matplotlib.colormaps:
    matplotlib.colormaps.register(LinearSegmentedColormap.from_list(SIGNED_CMAP, _SIGNED_STOPS))
    matplotlib.colormaps.register(
        LinearSegmentedColormap.from_list(SIGNED_CMAP + "_r", [(1 - x, c) for x, c in _SIGNED_STOPS[::-1]])
    )


def check_finite_map(values: np.ndarray, name: str) -> None:
    """Refuse NaN or infinite values: drawn, they would read as a clean image on a 0-1 scale."""
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(
            f"{name}: {int(bad.sum())} of {values.size} values are NaN or infinite; expected finite "
            "numbers (check the inputs and baselines that produced the map)"
        )


def opacity(values: np.ndarray, norm: Normalize, alpha: float) -> np.ndarray:
    """Per-pixel opacity growing with ``|value|``: 0 at zero, ``alpha`` at the scale's end, so low
    values leave the image untouched. NaN (outside the model's crop) is transparent."""
    limit = max(abs(float(norm.vmin)), abs(float(norm.vmax)))
    strength = np.abs(values) / limit if limit > 0 else np.zeros_like(values)
    return np.nan_to_num(alpha * np.clip(strength, 0.0, 1.0), nan=0.0)


def to_numpy(value: Any, name: str) -> np.ndarray:
    """Array from a numpy array, a torch tensor (duck-typed, no torch import) or a list."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().float().numpy()
    if isinstance(value, list | tuple):
        value = np.asarray(value, dtype=float)
    if not isinstance(value, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy array, a torch tensor or a list, got {type(value).__name__}"
        )
    return value


def is_signed(values: np.ndarray, signed: bool | None) -> bool:
    """Whether to draw ``values`` on a diverging scale: ``signed``, or any negative value."""
    if signed is not None:
        return bool(signed)
    return bool(np.nanmin(values) < 0) if np.isfinite(values).any() else False


def color_scale(
    values: np.ndarray, signed: bool | None, cmap: str | Colormap | None
) -> tuple[np.ndarray, Normalize, Colormap, bool]:
    """Choose what to draw and how to colour it.

    Signed values get a diverging map with a :class:`~matplotlib.colors.TwoSlopeNorm`
    centred at 0 and symmetric limits ``[-max|v|, max|v|]``. Magnitudes get ``viridis`` on
    ``[0, max]``; with ``signed=False`` negative values are shown by their absolute value
    (Captum's ``absolute_value`` sign).

    Returns:
        ``(values_to_draw, norm, colormap, signed)``; NaN values draw transparent.
    """
    signed = is_signed(values, signed)
    finite = values[np.isfinite(values)]
    if signed:
        limit = float(np.abs(finite).max()) if finite.size else 0.0
        if limit > 0:
            norm: Normalize = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
        else:
            norm = Normalize(vmin=-1.0, vmax=1.0)
    else:
        values = np.abs(values)
        top = float(np.abs(finite).max()) if finite.size else 0.0
        norm = Normalize(vmin=0.0, vmax=top if top > 0 else 1.0)
    name = cmap if cmap is not None else (SIGNED_CMAP if signed else MAGNITUDE_CMAP)
    colormap = matplotlib.colormaps[name] if isinstance(name, str) else name
    return values, norm, colormap.with_extremes(bad=(0.0, 0.0, 0.0, 0.0)), signed


def _join(value: Any) -> str:
    if isinstance(value, str) or not isinstance(value, Sequence):
        return str(value)
    items = [str(v) for v in value]
    if len(items) > 4:
        return f"{items[0]}…{items[-1]} ({len(items)})"
    return ", ".join(items)


def describe(
    method: str | None = None,
    layers: Any = None,
    heads: Any = None,
    target: Any = None,
) -> str:
    """One line naming method, layer(s), head aggregation and target, e.g.
    ``"grad-eclip | layer 11 | heads: mean | target: 0"``. Missing parts are left out; layers
    given as a string are already worded (``"vision block 3 (last)"``) and shown as they are."""
    parts = []
    if method is not None:
        parts.append(str(method))
    if isinstance(layers, str):
        parts.append(layers)  # already worded, e.g. "vision block 3 (last)"
    elif layers is not None:
        many = not isinstance(layers, str) and isinstance(layers, Sequence) and len(layers) > 1
        parts.append(f"{'layers' if many else 'layer'} {_join(layers)}")
    if heads is not None:
        parts.append(f"heads: {_join(heads)}")
    if target is not None:
        parts.append(f"target: {_join(target)}")
    return " | ".join(parts)


def compose_title(title: str | None, width: int = 50, **labels: Any) -> str:
    """``title`` on the first line, then :func:`describe` of the labels, broken between
    parts into lines of about ``width`` characters."""
    lines = [title] if title else []
    current = ""
    for part in describe(**labels).split(" | ") if labels else []:
        if current and len(current) + 3 + len(part) > width:
            lines.append(current)
            current = part
        else:
            current = f"{current} | {part}" if current else part
    if current:
        lines.append(current)
    return "\n".join(lines)
