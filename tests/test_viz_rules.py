"""The drawing rules, checked on pixels: low values leave the image untouched, the diverging map's
ends are away from the scene colours, colour bars are labelled, NaN/inf maps are refused."""

import colorsys

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

from captum_vlm.viz import overlay, overlay_grid, to_rgb, tokens_html
from captum_vlm.viz._style import SIGNED_CMAP
from captum_vlm.zoo.scenes import _RGB as SCENE_RGB


def rendered(fig) -> np.ndarray:
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    plt.close(fig)
    return pixels


def image_only(rgb) -> np.ndarray:
    fig, ax = plt.subplots(figsize=(4.5, 4.0))
    ax.imshow(rgb, interpolation="nearest")
    ax.set_title("", fontsize=9)
    ax.set_axis_off()
    return rendered(fig)


@pytest.fixture
def scene():
    return np.random.default_rng(0).uniform(0.2, 0.9, (16, 16, 3))


@pytest.mark.parametrize("signed", [None, True])
def test_zero_map_leaves_every_image_pixel_unchanged(scene, signed):
    drawn = rendered(overlay(scene, np.zeros((4, 4)), colorbar=False, signed=signed))
    np.testing.assert_array_equal(drawn, image_only(scene))


def test_opacity_grows_with_value(scene):
    grid = np.zeros((4, 4))
    grid[0, 0], grid[3, 3] = 0.01, 1.0  # a faint patch and a strong one
    drawn = rendered(overlay(scene, grid, colorbar=False, interpolation="nearest"))
    plain = image_only(scene)
    diff = np.abs(drawn - plain).sum(-1)
    # the image area: where the plain figure is not the white background
    rows, cols = np.nonzero((plain != 255).any(-1))
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    cell_h, cell_w = (bottom - top + 1) / 4, (right - left + 1) / 4
    def cell(r, c):
        return diff[int(top + (r + 0.25) * cell_h): int(top + (r + 0.75) * cell_h),
                    int(left + (c + 0.25) * cell_w): int(left + (c + 0.75) * cell_w)]
    assert cell(1, 1).max() == 0  # zero: untouched
    assert cell(0, 0).max() <= 9  # 1 % of the maximum: at most a few levels in any channel
    assert cell(3, 3).min() > 60  # the maximum: clearly coloured


def _hue(rgb) -> float:
    return colorsys.rgb_to_hsv(*rgb)[0] * 360


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360
    return min(d, 360 - d)


def test_diverging_map_ends_are_far_from_scene_colours():
    cmap = matplotlib.colormaps[SIGNED_CMAP]
    for end in (0.0, 0.1, 0.9, 1.0):  # the strongest quarter of either sign
        colour = cmap(end)[:3]
        for name, scene_colour in SCENE_RGB.items():
            assert _hue_distance(_hue(colour), _hue(scene_colour)) >= 40, (end, name)
    # the old red/blue map fails the same check: its ends sit on the red and blue objects
    rdbu = matplotlib.colormaps["RdBu_r"]
    assert _hue_distance(_hue(rdbu(1.0)[:3]), _hue(SCENE_RGB["red"])) < 40
    assert _hue_distance(_hue(rdbu(0.0)[:3]), _hue(SCENE_RGB["blue"])) < 40


def _lightness(rgb) -> float:
    """CIE L* of an sRGB colour (D65), by the textbook formulas."""
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    y = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    return 116 * (y ** (1 / 3) if y > 0.008856 else 7.787 * y + 16 / 116) - 16


def test_diverging_map_lightness_is_symmetric_and_monotone():
    cmap = matplotlib.colormaps[SIGNED_CMAP]
    xs = np.linspace(0, 1, 101)
    lightness = np.array([_lightness(cmap(x)[:3]) for x in xs])
    assert np.all(np.diff(lightness[:51]) > 0) and np.all(np.diff(lightness[50:]) < 0)
    assert np.abs(lightness - lightness[::-1]).max() < 8  # both signs equally visible


def test_signed_overlay_uses_the_diverging_map(scene):
    fig = overlay(scene, np.array([[-1.0, 1.0], [0.0, 0.5]]))
    assert fig.axes[0].images[1].cmap.name.startswith(SIGNED_CMAP)
    plt.close(fig)


def test_colour_bar_says_what_the_number_is(scene):
    fig = overlay(scene, np.ones((2, 2)), value_label="logit change when the patch is dropped")
    assert fig.axes[1].get_ylabel() == "logit change when the patch is dropped"
    default = overlay(scene, np.ones((2, 2)))
    assert default.axes[1].get_ylabel() == "attribution (method units)"
    grid = overlay_grid(scene, {"a": np.ones((2, 2)), "b": np.eye(2)}, value_label="relevance")
    assert [ax.get_ylabel() for ax in grid.axes if not ax.images] == ["relevance", "relevance"]
    plt.close("all")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_maps_are_refused(scene, bad):
    grid = np.ones((2, 2))
    grid[0, 1] = bad
    with pytest.raises(ValueError, match="attribution: 1 of 4 values are NaN or infinite"):
        overlay(scene, grid)
    with pytest.raises(ValueError, match="scores: 1 of 2 values"):
        tokens_html(["a", "b"], [1.0, bad])


def test_float_images_in_0_255_are_not_whitened():
    rgb = np.random.default_rng(1).integers(0, 256, (4, 4, 3))
    np.testing.assert_allclose(to_rgb(rgb.astype(np.float32)), rgb / 255.0)
    np.testing.assert_allclose(to_rgb(rgb.astype(np.uint8)), rgb / 255.0)
    with pytest.raises(ValueError, match="image: contains NaN"):
        to_rgb(np.full((4, 4, 3), np.nan))
