"""Drawing: overlays, token colouring, escaping, colour scales and crop inversion."""

import ast
import re
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import visualization as captum_viz
from matplotlib.colors import TwoSlopeNorm, to_hex
from matplotlib.figure import Figure
from PIL import Image

from captum_vlm.viz import (
    map_to_original,
    merge_subwords,
    overlay,
    overlay_grid,
    record_to_html,
    resize_crop_box,
    tokens_figure,
    tokens_html,
)

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def map_image(fig, index=0):
    """The attribution layer (second image) of the index-th axes, NaN where masked."""
    return np.ma.filled(fig.axes[index].images[1].get_array().astype(float), np.nan)


def backgrounds(snippet):
    return re.findall(r"background-color:(#[0-9a-f]{6})", snippet)


# ---------------------------------------------------------------- tokens: HTML


def test_tokens_html_escapes_tokens_and_title():
    out = tokens_html(["a", XSS, "&"], [0.1, 0.9, 0.2], title="<script>alert(1)</script>")
    assert "&lt;img src=x onerror=alert(1)&gt;" in out
    assert "<img" not in out
    assert "<script" not in out and "&lt;script&gt;" in out
    assert ">&amp;</span>" in out
    merged = tokens_html(["Ġa", XSS], [1.0, 2.0], merge_subwords=True)
    assert "<img" not in merged and "a&lt;img" in merged


def test_record_to_html_escapes_labels():
    record = captum_viz.VisualizationDataRecord(
        torch.tensor([0.2, -0.5, 1.0]),
        0.87,
        "<b>cat</b>",
        "dog",
        "<i>x</i>",
        1.5,
        ["[CLS]", XSS, "ok"],
        0.01,
    )
    for out in (record_to_html(record), tokens_html(record)):
        assert "<img" not in out and "<b>" not in out and "<i>" not in out
        assert "&lt;b&gt;cat&lt;/b&gt;" in out
        assert "predicted: &lt;b&gt;cat&lt;/b&gt; (0.87)" in out
        assert len(backgrounds(out)) == 3
    with pytest.raises(TypeError, match="VisualizationDataRecord"):
        record_to_html(["a"])


def test_tokens_html_colours_by_score():
    out = tokens_html(["low", "mid", "high"], [0.0, 0.5, 2.0])
    low, mid, high = backgrounds(out)
    assert len({low, mid, high}) == 3
    viridis = matplotlib.colormaps["viridis"]
    assert low == to_hex(viridis(0.0)) and high == to_hex(viridis(1.0))  # magnitudes on [0, max]
    assert mid == to_hex(viridis(0.25))
    signed = backgrounds(tokens_html(["neg", "zero", "pos"], [-2.0, 0.0, 1.0]))
    rdbu = matplotlib.colormaps["cv_teal_magenta"]
    # symmetric limits [-2, 2]: 0 sits at the centre of the diverging map
    assert signed == [to_hex(rdbu(0.0)), to_hex(rdbu(0.5)), to_hex(rdbu(0.75))]
    assert "viridis" in out and "cv_teal_magenta" in tokens_html(["a"], [-1.0])


def test_tokens_html_bad_inputs():
    with pytest.raises(ValueError, match=r"one value per token \(2 tokens\); got shape \(3,\)"):
        tokens_html(["a", "b"], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="scores is required"):
        tokens_html(["a"])
    with pytest.raises(TypeError, match="list of token strings"):
        tokens_html("abc", [1.0, 2.0, 3.0])


# ---------------------------------------------------------------- merge_subwords


def test_merge_subwords_wordpiece():
    words, scores = merge_subwords(
        ["[CLS]", "un", "##believ", "##able", "film", "[SEP]"], [0.1, 1.0, 2.0, 3.0, -1.0, 0.5]
    )
    assert words == ["[CLS]", "unbelievable", "film", "[SEP]"]
    assert scores == pytest.approx([0.1, 6.0, -1.0, 0.5])


def test_merge_subwords_byte_bpe_and_sentencepiece():
    words, scores = merge_subwords(
        ["<s>", "The", "Ġcat", "s", "Ġsat", "</s>"], torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    )
    assert words == ["<s>", "The", "cats", "sat", "</s>"]
    assert scores == pytest.approx([1.0, 2.0, 7.0, 5.0, 6.0])
    words, scores = merge_subwords(
        ["▁A", "▁red", "d", "ish", "▁ball"], np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    )
    assert words == ["A", "reddish", "ball"]
    assert scores == pytest.approx([1.0, 9.0, 5.0])


def test_merge_subwords_clip_end_of_word():
    tokens = ["<|startoftext|>", "a</w>", "red", "dish</w>", "ball</w>", "<|endoftext|>"]
    words, scores = merge_subwords(tokens, [0.5, 1.0, 2.0, -0.5, 4.0, 0.0])
    assert words == ["<|startoftext|>", "a", "reddish", "ball", "<|endoftext|>"]
    assert scores == pytest.approx([0.5, 1.0, 1.5, 4.0, 0.0])


def test_merge_subwords_without_markers_keeps_tokens():
    assert merge_subwords(["a", "b"], [1.0, 2.0]) == (["a", "b"], [1.0, 2.0])
    with pytest.raises(ValueError, match="one value per token"):
        merge_subwords(["a", "b"], [1.0])


# ---------------------------------------------------------------- tokens: figure


def test_tokens_figure_colours_and_text():
    tokens = ["low", XSS, "$x$", "high"]
    fig = tokens_figure(tokens, [0.0, 1.0, 1.0, 3.0], title="occlusion | target: 0")
    assert isinstance(fig, Figure)
    texts = {t.get_text(): t for t in fig.texts}
    assert "occlusion | target: 0" in texts
    assert XSS in texts and "$x$" in texts  # drawn literally, no markup or mathtext
    low = texts["low"].get_bbox_patch().get_facecolor()
    high = texts["high"].get_bbox_patch().get_facecolor()
    assert to_hex(low) != to_hex(high)
    assert to_hex(high) == to_hex(matplotlib.colormaps["viridis"](1.0))
    fig.canvas.draw()  # lays out without error


def test_tokens_figure_wraps_and_accepts_record():
    fig = tokens_figure(["word"] * 60, np.arange(60.0), width=4.0)
    ys = sorted({round(t.get_position()[1], 6) for t in fig.texts})
    assert len(ys) > 1  # several lines
    record = captum_viz.VisualizationDataRecord(
        torch.tensor([1.0, -1.0]), 0.5, 1, 1, 1, 0.0, ["a", "b"], 0.0
    )
    texts = [t.get_text() for t in tokens_figure(record).texts]
    assert texts == ["a", "b"]


# ---------------------------------------------------------------- overlay


def test_overlay_bilinear_matches_interpolate():
    grid = torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
    fig = overlay(np.zeros((4, 6, 3)), grid)
    assert isinstance(fig, Figure)
    expected = F.interpolate(grid[None, None], size=(4, 6), mode="bilinear", align_corners=False)[
        0, 0
    ]
    np.testing.assert_allclose(map_image(fig), expected.numpy(), atol=1e-12)
    # by hand: source x = (j + 0.5) / 3 - 0.5, clamped to [0, 1]: 0, 0, 1/3, 2/3, 1, 1;
    # row 1 sits at source y = 0.25: 0.75 * row 0 + 0.25 * row 1 of the grid
    assert map_image(fig)[0] == pytest.approx([0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    assert map_image(fig)[1] == pytest.approx([0.5, 0.5, 5 / 6, 7 / 6, 1.5, 1.5])


def test_overlay_nearest_shows_patches():
    grid = np.array([[0.0, 1.0], [2.0, 3.0]])
    fig = overlay(np.zeros((4, 4, 3)), grid, interpolation="nearest")
    np.testing.assert_array_equal(map_image(fig), np.kron(grid, np.ones((2, 2))))
    with pytest.raises(ValueError, match="interpolation"):
        overlay(np.zeros((4, 4, 3)), grid, interpolation="cubic")


def test_overlay_title_names_method_layers_heads_target():
    fig = overlay(
        np.zeros((4, 4, 3)), np.ones((2, 2)), title="demo", method="grad-eclip",
        layers=[9, 10, 11], heads="mean", target="a red circle",
    )  # fmt: skip
    title = fig.axes[0].get_title()
    assert title.startswith("demo\n")
    for part in ("grad-eclip", "layers 9, 10, 11", "heads: mean", "target: a red circle"):
        assert part in title
    assert title == "demo\ngrad-eclip | layers 9, 10, 11 | heads: mean\ntarget: a red circle"
    short = overlay(np.zeros((4, 4, 3)), np.ones((2, 2)), layers=11, target=0)
    assert short.axes[0].get_title() == "layer 11 | target: 0"
    assert overlay(np.zeros((4, 4, 3)), np.ones((2, 2))).axes[0].get_title() == ""


def test_overlay_signed_map_uses_centred_diverging_scale():
    fig = overlay(np.zeros((4, 4, 3)), np.array([[-1.0, 2.0], [0.5, 0.0]]))
    image = fig.axes[0].images[1]
    assert image.cmap.name.startswith("cv_teal_magenta")
    assert isinstance(image.norm, TwoSlopeNorm)
    assert image.norm.vcenter == 0.0
    assert (image.norm.vmin, image.norm.vmax) == (-2.0, 2.0)
    assert image.norm(0.0) == pytest.approx(0.5)
    assert len(fig.axes) == 2  # image axes + colour bar

    magnitude = overlay(np.zeros((4, 4, 3)), np.array([[1.0, 2.0], [0.5, 0.0]])).axes[0].images[1]
    assert magnitude.cmap.name.startswith("viridis")
    assert (magnitude.norm.vmin, magnitude.norm.vmax) == (0.0, 2.0)

    forced = overlay(np.zeros((4, 4, 3)), np.array([[1.0, 2.0], [0.5, 0.0]]), signed=True)
    assert forced.axes[0].images[1].cmap.name.startswith("cv_teal_magenta")
    absolute = overlay(np.zeros((2, 2, 3)), np.array([[-3.0, 1.0], [0.0, 0.0]]), signed=False)
    np.testing.assert_array_equal(map_image(absolute), [[3.0, 1.0], [0.0, 0.0]])


def test_overlay_accepts_image_and_map_formats():
    rgb = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    expected = rgb / 255.0
    for image in (Image.fromarray(rgb), rgb, torch.tensor(rgb).permute(2, 0, 1).float() / 255):
        shown = overlay(image, np.ones((2, 2))).axes[0].images[0].get_array()
        np.testing.assert_allclose(shown, expected, atol=1e-6)
    attr = torch.arange(48.0).view(3, 4, 4) - 20  # pixel_values-shaped: channels summed
    summed = attr.sum(0).numpy()
    for shape_variant in (attr, attr[None], attr.permute(1, 2, 0).numpy()):
        np.testing.assert_allclose(map_image(overlay(rgb, shape_variant)), summed)
    with pytest.raises(ValueError, match="one map"):
        overlay(rgb, torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="image must be"):
        overlay(np.zeros((4, 4, 5)), np.ones((2, 2)))
    with pytest.raises(TypeError, match="attribution must be"):
        overlay(rgb, "map")


def test_overlay_draws_into_given_axes():
    fig, ax = plt.subplots()
    assert overlay(np.zeros((4, 4, 3)), np.ones((2, 2)), ax=ax, colorbar=False) is fig
    assert len(fig.axes) == 1


# ---------------------------------------------------------------- crop-box inversion


def test_resize_crop_box_by_hand():
    # 100x50 photo, shortest edge -> 20: 40x20; centre crop 20x20 starts at column 10
    assert resize_crop_box((100, 50), 20, 20) == (25.0, 0.0, 75.0, 50.0)
    # portrait 30x60 resized to 10x20, crop 10x10 starts at row 5 -> rows 15..45 of the photo
    assert resize_crop_box((30, 60), (10, 20), (10, 10)) == (0.0, 15.0, 30.0, 45.0)


def test_crop_box_places_map_on_original_photo():
    photo = np.zeros((6, 8, 3))  # height 6, width 8
    grid = np.array([[1.0, 2.0], [3.0, 4.0]])
    fig = overlay(photo, grid, crop_box=(2, 1, 6, 5), interpolation="nearest")
    expected = np.full((6, 8), np.nan)
    expected[1:3, 2:4], expected[1:3, 4:6] = 1.0, 2.0
    expected[3:5, 2:4], expected[3:5, 4:6] = 3.0, 4.0
    np.testing.assert_array_equal(map_image(fig), expected)
    # bilinear over the box equals plain bilinear upsampling to the box size
    inner = map_to_original(grid, (8, 6), (2, 1, 6, 5))[1:5, 2:6]
    up = F.interpolate(
        torch.tensor(grid)[None, None], size=(4, 4), mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(inner, up[0, 0].numpy())
    with pytest.raises(ValueError, match="crop_box"):
        map_to_original(grid, (8, 6), (6, 1, 2, 5))


# ---------------------------------------------------------------- overlay_grid


def test_overlay_grid_labels_and_shared_sign():
    maps = {"a red circle": np.eye(2), "a blue square": -np.eye(2), "a triangle": np.ones((2, 2))}
    fig = overlay_grid(
        np.zeros((4, 4, 3)), maps, ncols=2, method="occlusion", layers=11, target="each prompt"
    )
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == list(maps)
    assert all(ax.images[1].cmap.name.startswith("cv_teal_magenta") for ax in panels)  # one map is signed
    assert "occlusion" in fig._suptitle.get_text() and "layer 11" in fig._suptitle.get_text()
    np.testing.assert_allclose(map_image(fig, fig.axes.index(panels[1])), -resize(np.eye(2)))
    listed = overlay_grid(np.zeros((4, 4, 3)), [np.eye(2), np.ones((2, 2))])
    assert [ax.get_title() for ax in listed.axes if ax.images] == ["0", "1"]
    with pytest.raises(ValueError, match="maps is empty"):
        overlay_grid(np.zeros((4, 4, 3)), {})


def resize(grid):
    t = torch.tensor(grid, dtype=torch.float64)[None, None]
    return F.interpolate(t, size=(4, 4), mode="bilinear", align_corners=False)[0, 0].numpy()


# ---------------------------------------------------------------- architecture


def test_viz_imports_no_model_code():
    forbidden = {"torch", "transformers", "captum", "captum_vlm", "safetensors", "tokenizers"}
    for path in Path(__file__).parents[1].joinpath("captum_vlm", "viz").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name} imports from outside viz"
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
