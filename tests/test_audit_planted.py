"""The pattern finder on the zoo's planted shortcut: shapes-clip-shortcut reads a dark bar near
the top-left corner as "a blue square". In a biased data set (every "a blue square" scene carries
the bar, no other does) the finder, told nothing about the bar, names that label and the bar's
cells from Chefer relevancy maps; on shapes-clip, which never learnt the bar, it flags no fixed
peaks."""

from __future__ import annotations

import numpy as np
import pytest

import captum_vlm as cv
from captum_vlm.zoo import scenes

PER_LABEL = 10  # the finder tests labels with at least 10 examples


@pytest.fixture(scope="module")
def biased_scenes():
    images, labels = [], []
    for k, (colour, shape) in enumerate(scenes.all_labels()):
        for i in range(PER_LABEL):
            marked = (colour, shape) == ("blue", "square")
            scene = scenes.make_scene(123_456 + 100 * k + i, labels=[(colour, shape)], marker=marked)
            images.append(scene.pil())
            labels.append(scenes.phrase(colour, shape))
    return images, labels


def _marker_cells(grid: tuple[int, int] = (8, 8), size: int = 64) -> set[tuple[int, int]]:
    """The grid cells the marker bar covers (from the scene generator's own box)."""
    y0, y1, x0, x1 = scenes.marker_box((size, size))
    cell = size // grid[0]
    return {(r, c) for r in range(grid[0]) for c in range(grid[1])
            if r * cell < y1 and (r + 1) * cell > y0 and c * cell < x1 and (c + 1) * cell > x0}


def _fixed_peaks(name, images, labels, tmp_path):
    model, processor = cv.zoo.load(name)
    result = cv.audit(model, processor, images, scenes.zero_shot_prompts(), methods=["relevancy"], checks=(),
                      labels=labels, output=tmp_path / name)
    return [f for f in result.patterns() if f.kind == "fixed peaks"], result


def test_the_finder_names_the_shortcut_and_its_cells(biased_scenes, tmp_path):
    images, labels = biased_scenes
    found, result = _fixed_peaks("shapes-clip-shortcut", images, labels, tmp_path)
    assert [f.label for f in found] == ["a blue square"]
    assert set(found[0].cells) <= _marker_cells() and found[0].p_value < 1e-3
    # the rate is the share of the label's maps peaking in those cells, counted here from the records
    peaks = [(r["relevancy.peak_row"], r["relevancy.peak_col"]) for r in result.records() if r["label"] == "a blue square"]
    assert found[0].rate == pytest.approx(np.mean([p in set(found[0].cells) for p in peaks]))


def test_the_finder_flags_no_fixed_peaks_on_the_model_without_the_shortcut(biased_scenes, tmp_path):
    images, labels = biased_scenes
    found, _ = _fixed_peaks("shapes-clip", images, labels, tmp_path)
    assert found == []
