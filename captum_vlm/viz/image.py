"""Attribution maps drawn over images.

Maps of any of these shapes are accepted: a (h, w) patch grid, an (H, W) pixel map, a
``pixel_values``-shaped (3, H, W) or (1, 3, H, W) attribution (channels are summed, as
Captum's ``visualize_image_attr`` does before applying its sign), or channels-last (H, W, 3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter
from PIL import Image

from ._style import (
    check_finite_map,
    color_scale,
    compose_title,
    describe,
    is_signed,
    opacity,
    to_numpy,
)

Box = tuple[float, float, float, float]
Interpolation = Literal["bilinear", "nearest"]


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "detach") and hasattr(value, "cpu")


def to_rgb(image: Any) -> np.ndarray:
    """An image as an (H, W, 3) float array in [0, 1].

    Args:
        image: a PIL image; an (H, W, 3|4) or (H, W) array (uint8 in 0-255, or float); or a
            (3, H, W) / (1, 3, H, W) tensor (or array, when its last dimension is not 3 or 4;
            tensors are always read channels-first). Floats outside [0, 1] (e.g. normalised
            ``pixel_values``) are min-max rescaled for display.

    Returns:
        (H, W, 3) float64 array.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    channels_first = _is_tensor(image)  # tensors are (3, H, W), arrays (H, W, 3)
    array = to_numpy(image, "image")
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[0] in (1, 3):
        if channels_first or array.shape[-1] not in (3, 4):
            array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            "image must be PIL, (H, W, 3) or (H, W) array, or (3, H, W) tensor; "
            f"got shape {tuple(array.shape)}"
        )
    array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float64) / 255.0
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError("image: contains NaN or infinite values; expected finite pixel values")
    lo, hi = float(array.min()), float(array.max())
    if lo >= 0.0 and hi <= 1.0:
        return array
    if lo >= 0.0 and hi <= 255.0 and not channels_first:
        return array / 255.0  # a float array in the 0-255 convention
    return (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)


def to_map(attribution: Any) -> np.ndarray:
    """An attribution as a 2-D float array, channels summed (see the module docstring).

    A 3-D map is read channels-first when its first dimension is 1 or 3 (``pixel_values``
    convention, also for an ambiguous (3, H, 3)), otherwise channels-last.
    """
    array = to_numpy(attribution, "attribution").astype(np.float64)
    shape = tuple(array.shape)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3:
        if array.shape[0] in (1, 3):
            array = array.sum(0)
        elif array.shape[-1] in (1, 3):
            array = array.sum(-1)
    if array.ndim != 2:
        raise ValueError(
            "attribution must be one map: (h, w), (3, H, W), (1, 3, H, W) or (H, W, 3); "
            f"got shape {shape} (draw several maps with overlay_grid)"
        )
    check_finite_map(array, "attribution")
    return array


def _sampling_matrix(n_src: int, coords: np.ndarray, mode: Interpolation) -> np.ndarray:
    """(len(coords), n_src) weights that sample a 1-D signal at ``coords``.

    ``coords`` are in source pixels with pixel i centred at i; out-of-range coordinates
    are clamped to the edge (the align_corners=False convention).
    """
    c = np.clip(coords, 0.0, n_src - 1)
    weights = np.zeros((len(coords), n_src))
    rows = np.arange(len(coords))
    if mode == "nearest":
        weights[rows, np.clip(np.floor(coords + 0.5), 0, n_src - 1).astype(int)] = 1.0
        return weights
    low = np.floor(c).astype(int)
    high = np.minimum(low + 1, n_src - 1)
    frac = c - low
    np.add.at(weights, (rows, low), 1.0 - frac)
    np.add.at(weights, (rows, high), frac)
    return weights


def resize_map(
    attribution: Any, size: tuple[int, int], interpolation: Interpolation = "bilinear"
) -> np.ndarray:
    """Resample a map to ``size = (height, width)``.

    Bilinear uses half-pixel centres (same as ``torch.nn.functional.interpolate`` with
    ``align_corners=False`` and PIL's upsampling); nearest picks the source pixel whose
    area contains the output pixel's centre.

    Example:
        >>> resize_map(np.array([[0.0, 1.0]]), (1, 4)).tolist()
        [[0.0, 0.25, 0.75, 1.0]]
    """
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    m = to_map(attribution)
    (h, w), (height, width) = m.shape, size
    rows = _sampling_matrix(h, (np.arange(height) + 0.5) * h / height - 0.5, interpolation)
    cols = _sampling_matrix(w, (np.arange(width) + 0.5) * w / width - 0.5, interpolation)
    return rows @ m @ cols.T


def resize_crop_box(
    original_size: tuple[int, int],
    resize_to: int | tuple[int, int],
    crop_size: int | tuple[int, int],
) -> Box:
    """The region of the original photo that a resize + centre-crop processor kept.

    Inverts the usual image-processor pipeline (CLIP, SigLIP, BLIP ...): resize the photo to
    ``resize_to``, then cut a centred ``crop_size`` window whose top-left corner is at
    ``((resized - crop) // 2)``. Pass the result as ``crop_box`` to :func:`overlay` to draw
    the model's map on the original photo.

    Args:
        original_size: (width, height) of the photo, as ``PIL.Image.size``.
        resize_to: (width, height) after resizing, or an int: the shortest edge (the long
            edge becomes ``int(edge * long / short)``, as transformers computes it).
        crop_size: (width, height) of the centre crop, or an int for a square.

    Returns:
        ``(left, top, right, bottom)`` in original-photo pixels (floats).

    Example:
        >>> resize_crop_box((100, 50), 20, 20)  # resized to 40x20, crop columns 10..30
        (25.0, 0.0, 75.0, 50.0)
    """
    width, height = original_size
    if isinstance(resize_to, int):
        short, long = sorted((width, height))
        new_long = int(resize_to * long / short)
        resize_to = (resize_to, new_long) if width <= height else (new_long, resize_to)
    if isinstance(crop_size, int):
        crop_size = (crop_size, crop_size)
    (rw, rh), (cw, ch) = resize_to, crop_size
    left, top = (rw - cw) // 2, (rh - ch) // 2
    sx, sy = width / rw, height / rh
    return (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)


def map_to_original(
    attribution: Any,
    image_size: tuple[int, int],
    crop_box: Box,
    interpolation: Interpolation = "bilinear",
) -> np.ndarray:
    """Place a map computed on a crop back onto the original photo.

    The map is stretched over ``crop_box`` (any aspect ratio; this also undoes the resize);
    pixels whose centre lies outside the box are NaN (drawn transparent).

    Args:
        attribution: one map (see the module docstring).
        image_size: (width, height) of the original photo, as ``PIL.Image.size``.
        crop_box: (left, top, right, bottom) in original-photo pixels, e.g. from
            :func:`resize_crop_box`.
        interpolation: "bilinear" or "nearest".

    Returns:
        (height, width) array.

    Example:
        >>> m = map_to_original(np.ones((2, 2)), (4, 3), (1, 0, 3, 2))
        >>> np.isnan(m).astype(int).tolist()
        [[1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]]
    """
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    left, top, right, bottom = (float(v) for v in crop_box)
    if not (right > left and bottom > top):
        raise ValueError(
            f"crop_box must be (left, top, right, bottom) with right > left and bottom > top; got {crop_box}"
        )
    m = to_map(attribution)
    h, w = m.shape
    width, height = image_size
    ys = np.arange(height) + 0.5
    xs = np.arange(width) + 0.5
    rows = _sampling_matrix(h, (ys - top) * h / (bottom - top) - 0.5, interpolation)
    cols = _sampling_matrix(w, (xs - left) * w / (right - left) - 0.5, interpolation)
    out = rows @ m @ cols.T
    outside_y = (ys < top) | (ys >= bottom)
    outside_x = (xs < left) | (xs >= right)
    out[outside_y, :] = np.nan
    out[:, outside_x] = np.nan
    return out


def overlay(
    image: Any,
    attribution: Any,
    *,
    title: str | None = None,
    method: str | None = None,
    layers: Any = None,
    heads: Any = None,
    target: Any = None,
    value_label: str | None = None,
    cmap: str | Colormap | None = None,
    alpha: float = 0.6,
    interpolation: Interpolation = "bilinear",
    signed: bool | None = None,
    crop_box: Box | None = None,
    colorbar: bool = True,
    ax: Axes | None = None,
) -> Figure:
    """Draw an attribution map over its image, with a colour bar and a descriptive title.

    The map is resampled to the image's pixels (bilinear by default) and drawn with
    ``viridis`` on [0, max] for magnitude maps or a teal-magenta diverging map
    (:data:`~captum_vlm.viz._style.SIGNED_CMAP`, ends away from red, green, blue and yellow)
    centred at 0 with symmetric limits for signed maps. The opacity of each pixel grows with
    ``|value|`` (0 at zero, ``alpha`` at the end of the scale), so low values leave the image
    untouched. ``signed=None`` picks signed when the map has a negative value; ``signed=False``
    draws absolute values. NaN or infinite maps are refused (``ValueError``).

    Args:
        image: PIL image, (H, W, 3) uint8/float array, or (3, H, W) tensor.
        attribution: (h, w) patch grid, (H, W), (3, H, W) or (1, 3, H, W) map; channels
            are summed.
        title: first title line; the second names method, layer(s), head aggregation and
            target when given.
        method, layers, heads, target: labels for the title (e.g. "grad-eclip", 11 or
            [9, 10, 11], "mean", 0 or "a red circle").
        value_label: what the number is, written on the colour bar (e.g. "logit change when
            the patch is dropped"); default "attribution (method units)".
        cmap: colour map name or object; default as above.
        alpha: opacity of the strongest values over the image.
        interpolation: "bilinear" or "nearest" (shows patch boundaries).
        signed: force a diverging (True) or magnitude (False) scale.
        crop_box: when ``image`` is the original photo and the map was computed on a
            resized + centre-cropped copy, the (left, top, right, bottom) region of the
            photo the model saw, in photo pixels; get it from :func:`resize_crop_box`. The
            map is drawn over that region only.
        colorbar: draw a colour bar.
        ax: axes to draw into; a new figure is made when None.

    Returns:
        The matplotlib Figure (the map is its axes' second image).

    Example:
        >>> fig = overlay(np.zeros((8, 8, 3)), np.array([[0.0, 1.0], [2.0, 3.0]]),
        ...               method="grad-eclip", layers=11, target="a red circle")
    """
    rgb = to_rgb(image)
    height, width = rgb.shape[:2]
    if crop_box is not None:
        drawn = map_to_original(attribution, (width, height), crop_box, interpolation)
    else:
        drawn = resize_map(attribution, (height, width), interpolation)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    drawn, norm, colormap, _ = color_scale(drawn, signed, cmap)
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 4.0))
    else:
        fig = ax.figure
    ax.imshow(rgb, interpolation="nearest")
    ax.imshow(drawn, cmap=colormap, norm=norm, alpha=opacity(drawn, norm, alpha), interpolation="nearest")
    if colorbar:
        # tick labels carry their own exponent: matplotlib's offset text ("1e-6") would sit on the title
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=colormap), ax=ax, fraction=0.046, pad=0.04,
                           format=FormatStrFormatter("%.2g"))
        bar.set_label(value_label or "attribution (method units)", fontsize=8)
    ax.set_title(
        compose_title(title, method=method, layers=layers, heads=heads, target=target),
        fontsize=9,
    )
    ax.set_axis_off()
    return fig


def overlay_grid(
    image: Any,
    maps: Mapping[str, Any] | Sequence[Any],
    ncols: int = 4,
    *,
    title: str | None = None,
    method: str | None = None,
    layers: Any = None,
    heads: Any = None,
    target: Any = None,
    value_label: str | None = None,
    cmap: str | Colormap | None = None,
    alpha: float = 0.6,
    interpolation: Interpolation = "bilinear",
    signed: bool | None = None,
    crop_box: Box | None = None,
    panel_size: float = 3.0,
) -> Figure:
    """Several maps of one image side by side (one per prompt, word, layer or method).

    Each panel is an :func:`overlay` titled with its label; the figure title names what the
    panels share (method, layer(s), head aggregation, target). ``signed=None`` is decided
    once for all maps, so every panel uses the same kind of colour scale.

    Args:
        image: as in :func:`overlay`.
        maps: ``{label: map}``, or a list of maps (labelled "0", "1", ...).
        ncols: panels per row.
        title, method, layers, heads, target, value_label, cmap, alpha, interpolation, signed,
            crop_box: as in :func:`overlay`.
        panel_size: height of a panel in inches.

    Returns:
        The matplotlib Figure.

    Example:
        >>> fig = overlay_grid(np.zeros((8, 8, 3)), {"circle": np.eye(2), "square": -np.eye(2)},
        ...                    method="occlusion")
    """
    items = (
        list(maps.items())
        if isinstance(maps, Mapping)
        else [(str(i), m) for i, m in enumerate(maps)]
    )
    if not items:
        raise ValueError("maps is empty; pass at least one map")
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be an int >= 1, got {ncols!r}")
    if signed is None:
        signed = any(is_signed(to_map(m), None) for _, m in items)
    ncols = min(ncols, len(items))
    nrows = math.ceil(len(items) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, squeeze=False, figsize=(panel_size * 1.2 * ncols, panel_size * nrows + 0.6)
    )
    for ax, (label, m) in zip(axes.flat, items, strict=False):
        overlay(
            image, m, title=str(label), value_label=value_label, cmap=cmap, alpha=alpha, interpolation=interpolation,
            signed=signed, crop_box=crop_box, ax=ax,
        )  # fmt: skip
    for ax in axes.flat[len(items) :]:
        ax.set_axis_off()
    heading = compose_title(title, method=method, layers=layers, heads=heads, target=target)
    if heading:
        fig.suptitle(heading, fontsize=10)
    return fig


__all__ = [
    "describe",
    "map_to_original",
    "overlay",
    "overlay_grid",
    "resize_crop_box",
    "resize_map",
    "to_map",
    "to_rgb",
]
