"""Drawing only: image overlays and token colouring.

Imports numpy, matplotlib and PIL; accepts torch tensors without importing any model code.
Colour maps are perceptually uniform (``viridis`` for magnitudes, a teal-magenta diverging map
centred at zero for signed maps, ends away from the scenes' red/green/blue/yellow; opacity grows
with the value) and every figure can say method, layer(s), head aggregation and target.
"""

from ._style import describe
from .image import (
    map_to_original,
    overlay,
    overlay_grid,
    resize_crop_box,
    resize_map,
    to_map,
    to_rgb,
)
from .text import merge_subwords, record_to_html, tokens_figure, tokens_html

__all__ = [
    "describe",
    "map_to_original",
    "merge_subwords",
    "overlay",
    "overlay_grid",
    "record_to_html",
    "resize_crop_box",
    "resize_map",
    "to_map",
    "to_rgb",
    "tokens_figure",
    "tokens_html",
]
