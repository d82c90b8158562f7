"""Linear probes: accuracy equals scikit-learn's on features taken here from output_hidden_states."""

import numpy as np
import pytest
import tiny_models as tm
import torch
from model_state import assert_unchanged, snapshot
from numerics import assert_close_scaled
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from captum_vlm.lens.probes import layer_features, patch_labels, probe

N = 24


def _data():
    pixels = tm.pixels(N, seed=3)
    pixels[: N // 2, 0] += 1.0  # half the images redder: something a probe can read
    labels = np.array(["red"] * (N // 2) + ["plain"] * (N // 2))
    return pixels, labels


def _reference(x, y, folds, groups=None):
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return cross_val_score(pipe, x, y, cv=folds, groups=groups)


@pytest.mark.parametrize("make, pooled", [(tm.clip, "cls"), (tm.siglip, "mean")])
def test_pooled_probe_equals_sklearn_on_hidden_states(make, pooled):
    model = make()
    pixels, labels = _data()
    before = snapshot(model)
    result = probe(model, None, pixels, labels, cv=4, seed=1, batch_size=10)
    assert_unchanged(model, before)
    assert result.layers == [0, 1, 2]
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
    shuffled = np.random.default_rng(1).permutation(labels)
    for i, layer in enumerate(result.layers):
        h = hidden[layer]
        x = (h[:, 0] if pooled == "cls" else h.mean(1)).numpy()
        want = _reference(x, labels, StratifiedKFold(4, shuffle=True, random_state=1))
        control = _reference(x, shuffled, StratifiedKFold(4, shuffle=True, random_state=1))
        assert result.accuracy[i] == pytest.approx(want.mean())
        assert result.accuracy_std[i] == pytest.approx(want.std())
        assert result.control[i] == pytest.approx(control.mean())
    assert result.chance == 0.5
    assert result.accuracy[-1] > result.control[-1]  # the redness is readable, shuffled labels are not
    assert "linear probe" in result.plot().axes[0].get_title()


def test_patch_probe_equals_sklearn_and_heat_map_is_its_decision_function():
    model = tm.clip()
    pixels = tm.pixels(8, seed=5)
    rows = cols = tm.IMAGE_SIZE // tm.PATCH
    labels = np.zeros((8, rows, cols), bool)
    labels[:, :2] = True  # top half "on the object"
    pixels[:, :, : tm.IMAGE_SIZE // 2] += 1.5
    result = probe(model, None, pixels, labels, where="patches", layers=[1, 2], cv=4)
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
    y = labels.reshape(-1)
    groups = np.repeat(np.arange(8), rows * cols)
    for i, layer in enumerate([1, 2]):
        x = hidden[layer][:, 1:].reshape(8 * rows * cols, -1).numpy()
        want = _reference(x, y, GroupKFold(4), groups)
        assert result.accuracy[i] == pytest.approx(want.mean())
    new = tm.pixels(2, seed=9)
    heat = result.heat_map(model, new, layer=2)
    with torch.no_grad():
        x_new = model.vision_model(pixel_values=new, output_hidden_states=True).hidden_states[2][:, 1:]
    fitted = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(
        hidden[2][:, 1:].reshape(8 * rows * cols, -1).numpy(), y)
    want = fitted.decision_function(x_new.reshape(2 * rows * cols, -1).numpy()).reshape(2, rows, cols)
    assert_close_scaled(heat, want)


def test_features_of_llava_tower_match_hidden_states():
    model = tm.llava()
    pixels = tm.pixels(2)
    features = layer_features(model, pixels, [2], where="patches")[2]
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[2]
    assert_close_scaled(features, hidden[:, 1:].numpy())


def test_patch_labels_pool_a_mask():
    mask = np.zeros((8, 8), bool)
    mask[:4, :5] = True  # patch (0,0) fully covered, patch (0,1) 1/4 covered
    got = patch_labels(mask, (2, 2))
    assert got.tolist() == [[True, False], [False, False]]
    assert patch_labels(mask, (2, 2), fraction=0.25).tolist() == [[True, True], [False, False]]
    with pytest.raises(ValueError, match="mask"):
        patch_labels(mask, (3, 3))


def test_probe_misuse():
    model = tm.clip()
    pixels, labels = _data()
    with pytest.raises(ValueError, match="labels: expected one label per image"):
        probe(model, None, pixels, labels[:-1])
    with pytest.raises(ValueError, match="labels: a probe needs at least two classes"):
        probe(model, None, pixels, ["red"] * N)
    with pytest.raises(ValueError, match="layers"):
        probe(model, None, pixels, labels, layers=[3])
    with pytest.raises(ValueError, match="where"):
        probe(model, None, pixels, labels, where="pixels")
    with pytest.raises(ValueError, match="fewer than cv"):
        probe(model, None, pixels, labels, cv=20)
    with pytest.raises(ValueError, match="labels: patch probes"):
        probe(model, None, pixels, labels, where="patches")
    result = probe(model, None, pixels, labels, layers=[1], cv=2)
    with pytest.raises(ValueError, match="where"):
        result.heat_map(model, pixels, layer=1)
