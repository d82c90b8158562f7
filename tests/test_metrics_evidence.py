"""Evidence per map (deletion/insertion vs random orders) and ROAD, against hand computations."""

import numpy as np
import pytest
import torch

from captum_vlm.metrics import (
    deletion_curve,
    insertion_curve,
    map_evidence,
    noisy_linear_impute,
    road_curve,
)
from captum_vlm.metrics.evidence import patch_orders


def weighted_sum(weights):
    return lambda x: (x * weights).sum(dim=(1, 2, 3))


def test_map_evidence_by_hand_on_two_pixels():
    x = torch.tensor([[[[1.0, 2.0]]]])
    e = map_evidence(weighted_sum(torch.ones_like(x)), x, torch.tensor([[1.0, 2.0]]), steps=2, n_random=4,
                     insertion_baseline=0.0)
    # deletion removes 2 then 1: scores 3, 1, 0 -> AUC ((3+1)/2 + (1+0)/2) / 2
    assert e.deletion_auc == pytest.approx(1.25)
    assert e.insertion_auc == pytest.approx(1.75)  # 0, 2, 3
    # a random order is either the map's (1.25 / 1.75) or the reverse (2, 3 -> 1.75 del, 1.25 ins)
    orders = patch_orders(torch.tensor([[1.0, 2.0]]), 4)[1:]
    reversed_share = float((orders[:, 0] == 0).float().mean())
    assert e.random_deletion_auc == pytest.approx(1.25 + 0.5 * reversed_share)
    assert e.random_insertion_auc == pytest.approx(1.75 - 0.5 * reversed_share)


def test_map_evidence_equals_the_deletion_and_insertion_curves():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    w = torch.randn(1, 3, 8, 8)
    grid = torch.randn(4, 4)
    e = map_evidence(weighted_sum(w), x, grid, steps=4, n_random=3, seed=7)
    ref_del = deletion_curve(weighted_sum(w), x, grid, patch_size=2, steps=4, baseline=0.0)
    ref_ins = insertion_curve(weighted_sum(w), x, grid, patch_size=2, steps=4, baseline="blur")
    assert e.deletion_auc == pytest.approx(ref_del.auc.item())
    assert e.insertion_auc == pytest.approx(ref_ins.auc.item())
    # each random order is the curve of a map that ranks the cells in that order
    orders = patch_orders(grid, 3, seed=7)[1:]
    randoms_del, randoms_ins = [], []
    for order in orders:
        ranked = torch.empty(16)
        ranked[order] = torch.arange(16, 0, -1, dtype=torch.float)
        randoms_del.append(deletion_curve(weighted_sum(w), x, ranked.view(4, 4), patch_size=2, steps=4).auc.item())
        randoms_ins.append(insertion_curve(weighted_sum(w), x, ranked.view(4, 4), patch_size=2, steps=4).auc.item())
    assert e.random_deletion_auc == pytest.approx(np.mean(randoms_del))
    assert e.random_insertion_auc == pytest.approx(np.mean(randoms_ins))
    assert e.random_deletion_std == pytest.approx(np.std(randoms_del))


def test_a_true_map_beats_random_and_a_reversed_one_does_not():
    x = torch.ones(1, 1, 4, 4)
    w = torch.arange(16.0).view(1, 1, 4, 4)
    good = map_evidence(weighted_sum(w), x, w[0, 0], steps=4, n_random=8, insertion_baseline=0.0)
    bad = map_evidence(weighted_sum(w), x, -w[0, 0], steps=4, n_random=8, insertion_baseline=0.0)
    assert good.beats_random and not bad.beats_random
    assert "lower is better" in good.summary("logit")


def test_map_evidence_is_batched():
    calls = []

    def f(images):
        calls.append(len(images))
        return images.sum(dim=(1, 2, 3))

    map_evidence(f, torch.rand(1, 3, 8, 8), torch.rand(4, 4), steps=8, n_random=3, batch_size=64)
    # the 3 shared ends (image, all removed, all hidden) + 4 orders x 2 curves x 7 inner steps
    assert sum(calls) == 3 + 2 * 4 * 7 and len(calls) == 1


def test_maps_evidence_of_every_prompt_equals_one_map_at_a_time():
    import tiny_models as tm
    from numerics import assert_close_scaled

    from captum_vlm.adapters import get_adapter
    from captum_vlm.metrics import maps_evidence
    from captum_vlm.targets import ImageTextSimilarity

    model = tm.clip()
    pixels = tm.pixels(1, seed=3)
    ids, mask = tm.text_ids(3, 5)
    h, w = get_adapter(model).patch_grid(pixels)
    grids = torch.randn(3, h, w, generator=torch.Generator().manual_seed(4))
    similarity = ImageTextSimilarity(model)
    images = []

    def forward(batch):
        images.append(len(batch))
        return similarity(batch, ids, mask)  # [N, 3]: every prompt from one forward

    found = maps_evidence(forward, pixels, grids, [0, 1, 2], steps=4, n_random=2, batch_size=16)
    # shared: 3 curve ends + 2 random orders x 2 curves x 3 inner steps; then 3 maps x 2 x 3
    assert sum(images) == 3 + 2 * 2 * 3 + 3 * 2 * 3
    for k, batched in enumerate(found):
        alone = map_evidence(lambda x: similarity(x, ids, mask), pixels, grids[k], target=k, steps=4, n_random=2)
        assert_close_scaled(batched.deletion_scores, alone.deletion_scores)
        assert_close_scaled(batched.insertion_scores, alone.insertion_scores)
        for name in ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc"):
            assert getattr(batched, name) == pytest.approx(getattr(alone, name), rel=1e-4, abs=1e-5)
    # a later call on the same input reuses the shared curves: only the new map's images run
    images.clear()
    again = maps_evidence(forward, pixels, grids[2:], [2], steps=4, shared=found[0].shared)
    assert sum(images) == 2 * 3 and again[0].deletion_auc == pytest.approx(found[2].deletion_auc, rel=1e-5)
    with pytest.raises(ValueError, match="targets: expected one output column per map"):
        maps_evidence(forward, pixels, grids, [0, 1], steps=4)
    with pytest.raises(ValueError, match="shared: its curves are for"):
        maps_evidence(forward, pixels, grids, [0, 1, 2], steps=3, shared=found[0].shared)


def test_impute_one_pixel_is_the_weighted_neighbour_mean():
    rng = np.random.default_rng(0)
    image = torch.tensor(rng.normal(size=(2, 3, 3)))
    removed = torch.zeros(3, 3, dtype=torch.bool)
    removed[1, 1] = True
    out = noisy_linear_impute(image, removed, noise=0.0)
    direct = image[:, [0, 2, 1, 1], [1, 1, 0, 2]].sum(1) / 6
    diagonal = image[:, [0, 0, 2, 2], [0, 2, 0, 2]].sum(1) / 12
    torch.testing.assert_close(out[:, 1, 1], direct + diagonal)
    kept = ~removed
    torch.testing.assert_close(out[:, kept], image[:, kept])


def test_impute_two_neighbours_solve_the_joint_system():
    # 1 x 4 row [a, ?, ?, d]: each removed pixel is the mean of its (two) row neighbours
    image = torch.tensor([[[3.0, 0.0, 0.0, 9.0]]], dtype=torch.float64)
    removed = torch.tensor([[False, True, True, False]])
    out = noisy_linear_impute(image, removed, noise=0.0)
    # x1 = (3 + x2) / 2, x2 = (x1 + 9) / 2  ->  x1 = 5, x2 = 7
    torch.testing.assert_close(out[0, 0], torch.tensor([3.0, 5.0, 7.0, 9.0], dtype=torch.float64))


def test_impute_noise_has_the_given_scale():
    image = torch.zeros(1, 40, 40, dtype=torch.float64)
    removed = torch.zeros(40, 40, dtype=torch.bool)
    removed[::2, ::2] = True
    out = noisy_linear_impute(image, removed, noise=0.1, generator=torch.Generator().manual_seed(0))
    assert out[0][removed].std().item() == pytest.approx(0.1, rel=0.15)


def test_road_morf_and_lerf_by_hand():
    f = lambda x: x.sum(dim=(1, 2, 3))  # noqa: E731
    x = torch.tensor([[[[0.0, 1.0, 4.0, 2.0]]]])
    morf = road_curve(f, x, x, fractions=[0.25, 0.5], noise=0.0)
    # remove 4: mean of neighbours (1 + 2) / 2 = 1.5 -> 4.5; then 4 and 2: x2=(1+x3)/2, x3=x2 -> 1, 1 -> 3
    torch.testing.assert_close(morf.scores, torch.tensor([[7.0, 4.5, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(morf.auc, torch.trapezoid(morf.scores, morf.fractions))
    lerf = road_curve(f, x, x, order="lerf", fractions=[0.25], noise=0.0)
    torch.testing.assert_close(lerf.scores, torch.tensor([[7.0, 8.0]], dtype=torch.float64))  # 0 -> 1
    with pytest.raises(ValueError, match="fractions"):
        road_curve(f, x, x, fractions=[0.5, 0.2])
    with pytest.raises(ValueError, match="order"):
        road_curve(f, x, x, order="up")


# ---------------------------------------------------------------- token-drop curves
def _clip_logit_without(model, pixels, ids, mask, keep_flat, k):
    """Reference: CLIP's image tower run by hand on the CLS token and the kept patch tokens."""
    vision = model.vision_model
    with torch.no_grad():
        tokens = vision.embeddings(pixels)
        kept = torch.cat([tokens[:, :1], tokens[:, 1:][:, keep_flat]], dim=1)
        hidden = vision.pre_layrnorm(kept)
        for layer in vision.encoder.layers:
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out
        pooled = vision.post_layernorm(hidden[:, 0])
        image = model.visual_projection(pooled)
        text = model.get_text_features(input_ids=ids, attention_mask=mask)
        text = text if isinstance(text, torch.Tensor) else text.pooler_output
        image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
        return float((model.logit_scale.exp() * image @ text.T)[0, k])


def test_token_drop_curves_equal_the_tower_run_on_the_kept_tokens():
    import tiny_models as tm
    from model_state import assert_unchanged, snapshot

    from captum_vlm.adapters import get_adapter
    from captum_vlm.metrics import token_drop_curve
    from captum_vlm.targets import ImageTextSimilarity

    model = tm.clip()
    pixels = tm.pixels(1)
    ids, mask = tm.text_ids(2, 5)
    h, w = get_adapter(model).patch_grid(pixels)
    grid = torch.randn(h, w)
    before = snapshot(model)
    deletion = token_drop_curve(model, ImageTextSimilarity(model), pixels, grid, target=1,
                                additional_forward_args=(ids, mask), steps=4)
    insertion = token_drop_curve(model, ImageTextSimilarity(model), pixels, grid, target=1,
                                 additional_forward_args=(ids, mask), mode="insertion", steps=4)
    assert_unchanged(model, before)
    n = h * w
    order = torch.sort(grid.flatten(), descending=True, stable=True).indices
    for step in range(5):
        count = step * n // 4
        dropped = torch.zeros(n, dtype=torch.bool)
        dropped[order[:count]] = True
        assert deletion.scores[0, step].item() == pytest.approx(
            _clip_logit_without(model, pixels, ids, mask, ~dropped, 1), rel=1e-4, abs=1e-5)
        assert insertion.scores[0, step].item() == pytest.approx(
            _clip_logit_without(model, pixels, ids, mask, dropped, 1), rel=1e-4, abs=1e-5)
    torch.testing.assert_close(deletion.auc, curve_auc_ref(deletion.scores))
    with pytest.raises(ValueError, match="grid: expected the model's patch grid"):
        token_drop_curve(model, ImageTextSimilarity(model), pixels, torch.ones(3, 3), target=0,
                         additional_forward_args=(ids, mask))


def curve_auc_ref(scores):
    s = scores[0].tolist()
    return torch.tensor([sum((a + b) / 2 for a, b in zip(s, s[1:])) / (len(s) - 1)], dtype=torch.float64)
