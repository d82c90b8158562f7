"""One rule for which pixels a patch covers, shared by attr/, metrics/ and the grounding test,
and checked against what the model really sees."""

import numpy as np
import pytest
import tiny_models as tm
import torch

from captum_vlm._grid import grid_to_pixels, patch_of_pixel, pixels_to_grid
from captum_vlm.adapters import get_adapter
from captum_vlm.attr._base import upsample_grid
from captum_vlm.attr.occlusion import _as_grid
from captum_vlm.metrics.perturbation import _pixel_maps


def _reference(grid: np.ndarray, size, patch) -> np.ndarray:
    """Written out pixel by pixel: pixel (y, x) takes patch (y // ph, x // pw) if that patch exists."""
    out = np.zeros(size)
    for y in range(size[0]):
        for x in range(size[1]):
            i, j = y // patch[0], x // patch[1]
            if i < grid.shape[0] and j < grid.shape[1]:
                out[y, x] = grid[i, j]
    return out


@pytest.mark.parametrize("size,patch", [((36, 43), (8, 8)), ((17, 16), (8, 8)), ((32, 32), (8, 8)), ((9, 14), (3, 4))])
def test_every_layer_uses_the_same_cover(size, patch):
    h, w = size[0] // patch[0], size[1] // patch[1]
    grid = np.random.default_rng(0).normal(size=(h, w))
    expected = _reference(grid, size, patch)
    np.testing.assert_array_equal(grid_to_pixels(grid, size, patch), expected)
    attr = upsample_grid(torch.from_numpy(grid)[None], size, patch)[0]
    np.testing.assert_array_equal(attr[0].numpy(), expected)
    assert torch.equal(attr[0], attr[2])
    if size[0] // h == patch[0] and size[1] // w == patch[1]:  # metrics infer the patch from the sizes
        np.testing.assert_array_equal(_pixel_maps(torch.from_numpy(grid)[None], 1, size)[0].numpy(), expected)
    # back to the grid: the mean of the covered pixels gives the grid again
    back = _as_grid(torch.from_numpy(expected)[None], torch.zeros(1, 3, *size), (h, w), patch)[0]
    np.testing.assert_allclose(back.numpy(), grid, rtol=1e-6)  # the grounding test works in float32
    np.testing.assert_allclose(pixels_to_grid(expected, (h, w), patch), grid, rtol=1e-12)


def test_patch_of_pixel_by_hand_and_bad_sizes():
    assert patch_of_pixel(7, 3).tolist() == [0, 0, 1, 1, 2, 2, -1]
    assert patch_of_pixel(7, 2, patch=3).tolist() == [0, 0, 0, 1, 1, 1, -1]
    with pytest.raises(ValueError, match="3 patches of 3 pixels do not fit in 7"):
        patch_of_pixel(7, 3, patch=3)
    with pytest.raises(ValueError, match="4 patches do not fit in 3 pixels"):
        patch_of_pixel(3, 4)


def test_the_rule_is_what_the_model_sees():
    """Pixels the rule gives to no patch do not change the model's patch tokens; a pixel it gives
    to patch (i, j) changes that token only."""
    model = tm.clip()
    adapter = get_adapter(model)
    pixels = tm.pixels(1, 36, 43)
    grid = adapter.patch_grid(pixels)
    rows = patch_of_pixel(36, grid[0], adapter.patch_size()[0])
    cols = patch_of_pixel(43, grid[1], adapter.patch_size()[1])
    embed = adapter.vision_model().embeddings
    with torch.no_grad():
        before = embed(pixels, interpolate_pos_encoding=True)[0, 1:]
        for y, x in [(35, 10), (3, 42), (20, 17)]:
            changed = pixels.clone()
            changed[..., y, x] += 5.0
            moved = (embed(changed, interpolate_pos_encoding=True)[0, 1:] - before).abs().amax(-1) > 0
            if rows[y] < 0 or cols[x] < 0:
                assert not moved.any()
            else:
                assert moved.nonzero().flatten().tolist() == [rows[y] * grid[1] + cols[x]]
