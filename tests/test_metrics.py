"""Metrics against values worked out by hand on tiny maps, masks and models."""

import math

import pytest
import torch
from torch import nn

from captum_vlm.metrics import (
    DEFAULT_TOLERANCE,
    curve_auc,
    deletion_curve,
    energy_pointing_game,
    insertion_curve,
    model_randomization_check,
    pointing_game,
    ssim,
)
from captum_vlm.metrics.perturbation import gaussian_blur


def one_hot_mask(h, w, *points):
    mask = torch.zeros(h, w, dtype=torch.bool)
    for y, x in points:
        mask[y, x] = True
    return mask


def peak_map(h, w, y, x, value=1.0):
    m = torch.zeros(h, w)
    m[y, x] = value
    return m


# ---------------------------------------------------------------- pointing game


def test_pointing_game_hit_and_miss_without_tolerance():
    m = peak_map(4, 4, 1, 2)
    assert pointing_game(m, one_hot_mask(4, 4, (1, 2)), tolerance=0).hits.tolist() == [True]
    result = pointing_game(m, one_hot_mask(4, 4, (3, 3)), tolerance=0)
    assert result.hits.tolist() == [False]
    assert result.mean == 0.0


@pytest.mark.parametrize(
    "tolerance, hit", [(0, False), (2, False), (2.2, False), (2.3, True), (3, True)]
)
def test_pointing_game_tolerance_is_euclidean_pixels(tolerance, hit):
    # max at (1, 2), object pixel at (3, 3): distance sqrt(2^2 + 1^2) = 2.236
    result = pointing_game(peak_map(4, 4, 1, 2), one_hot_mask(4, 4, (3, 3)), tolerance=tolerance)
    assert result.hits.item() is hit


def test_pointing_game_default_tolerance_is_four_pixels():
    assert DEFAULT_TOLERANCE == 4
    mask = one_hot_mask(10, 10, (0, 0))
    assert pointing_game(peak_map(10, 10, 0, 4), mask).mean == 1.0  # 4 px away
    assert pointing_game(peak_map(10, 10, 3, 3), mask).mean == 0.0  # 4.24 px away


def test_pointing_game_batch_mean():
    maps = torch.stack([peak_map(4, 4, 0, 0), peak_map(4, 4, 3, 3), peak_map(4, 4, 2, 1)])
    masks = torch.stack(
        [one_hot_mask(4, 4, (0, 0)), one_hot_mask(4, 4, (0, 0)), one_hot_mask(4, 4, (2, 1))]
    )
    result = pointing_game(maps, masks, tolerance=0)
    assert result.hits.tolist() == [True, False, True]
    assert result.mean == pytest.approx(2 / 3)


def test_pointing_game_sums_channels():
    m = torch.zeros(3, 4, 4)
    m[0, 0, 0] = 5.0  # largest single value ...
    m[1, 2, 2] = 3.0  # ... but channels sum to 6 here
    m[2, 2, 2] = 3.0
    assert pointing_game(m, one_hot_mask(4, 4, (2, 2)), tolerance=0).mean == 1.0
    assert pointing_game(m, one_hot_mask(4, 4, (0, 0)), tolerance=0).mean == 0.0
    # (1, C, H, W) and a batch (B, C, H, W) with (B, H, W) masks
    assert pointing_game(m[None], one_hot_mask(4, 4, (2, 2)), tolerance=0).mean == 1.0
    assert pointing_game(m[None], one_hot_mask(4, 4, (2, 2))[None], tolerance=0).mean == 1.0


def test_pointing_game_upsamples_patch_grid_nearest():
    grid = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # top-right patch = pixels rows 0-1, cols 2-3
    assert pointing_game(grid, one_hot_mask(4, 4, (1, 3)), tolerance=0).mean == 1.0
    assert pointing_game(grid, one_hot_mask(4, 4, (2, 3)), tolerance=0).mean == 0.0
    assert pointing_game(grid, one_hot_mask(4, 4, (2, 3)), tolerance=1).mean == 1.0
    assert pointing_game(grid, one_hot_mask(4, 4, (1, 1)), tolerance=0).mean == 0.0


def test_pointing_game_ties_and_flat_maps():
    m = torch.zeros(4, 4)
    m[0, 0] = m[3, 3] = 2.0
    mask = one_hot_mask(4, 4, (0, 0))
    assert pointing_game(m, mask, tolerance=0, ties="any").mean == 1.0
    assert pointing_game(m, mask, tolerance=0, ties="all").mean == 0.0
    both = one_hot_mask(4, 4, (0, 0), (3, 3))
    assert pointing_game(m, both, tolerance=0, ties="all").mean == 1.0
    # a flat map points nowhere, even though every pixel ties at the max
    assert pointing_game(torch.ones(4, 4), mask, tolerance=0).mean == 0.0


def test_pointing_game_bad_inputs():
    mask = one_hot_mask(4, 4, (0, 0))
    with pytest.raises(ValueError, match=r"attribution map 5x5 is larger than the mask 4x4"):
        pointing_game(torch.rand(5, 5), mask)
    with pytest.raises(ValueError, match="mask is empty"):
        pointing_game(torch.rand(4, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="mask must be binary"):
        pointing_game(torch.rand(4, 4), torch.full((4, 4), 0.5))
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(torch.rand(4, 4), mask, tolerance=-1)
    with pytest.raises(ValueError, match=r"batch of 2 masks.*got shape \(3, 4, 4\)"):
        pointing_game(torch.rand(3, 4, 4), torch.stack([mask, mask]))
    with pytest.raises(ValueError, match="ties"):
        pointing_game(torch.rand(4, 4), mask, ties="first")
    with pytest.raises(TypeError, match="attribution must be a torch.Tensor"):
        pointing_game([[1.0]], mask)
    with pytest.raises(ValueError, match="NaN"):
        pointing_game(torch.full((4, 4), float("nan")), mask)


# ---------------------------------------------------------------- energy pointing game


def test_energy_pointing_game_by_hand():
    m = torch.tensor([[4.0, 0.0, -1.0], [2.0, 1.0, 0.0], [0.0, -3.0, 3.0]])
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[:2, :2] = True
    # positive inside: 4 + 2 + 1 = 7; positive total: 4 + 2 + 1 + 3 = 10
    result = energy_pointing_game(m, mask)
    assert result.energy.tolist() == pytest.approx([0.7])
    assert result.mean == pytest.approx(0.7)


def test_energy_pointing_game_sums_channels_before_relu():
    m = torch.tensor([[[2.0, -1.0]], [[-3.0, 2.0]]])  # channel sum [[-1, 1]]
    mask = torch.tensor([[1, 0]])
    assert energy_pointing_game(m, mask).mean == 0.0  # per-channel ReLU would give 2 / 4


def test_energy_pointing_game_patch_grid_and_batch():
    grid = torch.tensor([[1.0, 3.0], [0.0, 0.0]])  # each value covers 2x2 pixels of 4x4
    mask = one_hot_mask(4, 4, (0, 0), (0, 1), (0, 2))
    # inside 1 + 1 + 3 = 5; total 4 * 1 + 4 * 3 = 16
    assert energy_pointing_game(grid, mask).mean == pytest.approx(5 / 16)
    maps = torch.stack([grid, -grid])  # the second has no positive relevance: 0
    result = energy_pointing_game(maps, torch.stack([mask, mask]))
    assert result.energy.tolist() == pytest.approx([5 / 16, 0.0])
    assert result.mean == pytest.approx(5 / 32)


def test_energy_pointing_game_bad_inputs():
    with pytest.raises(ValueError, match="mask is empty"):
        energy_pointing_game(torch.rand(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="mask must have shape"):
        energy_pointing_game(torch.rand(2, 2), torch.ones(2))


# ---------------------------------------------------------------- deletion / insertion


def pixel_sum(x):
    return x.sum(dim=(1, 2, 3))


X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
# relevance order: pixel (0, 1)=2, (1, 0)=3, (1, 1)=4, (0, 0)=1
A = torch.tensor([[0.1, 0.4], [0.3, 0.2]])


def test_deletion_curve_pixelwise_by_hand():
    curve = deletion_curve(pixel_sum, X, A)
    assert curve.scores.tolist() == [[10.0, 8.0, 5.0, 1.0, 0.0]]
    assert curve.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    # trapezoids: (9 + 6.5 + 3 + 0.5) / 4
    assert curve.auc.tolist() == pytest.approx([4.75])
    assert curve.mean_auc == pytest.approx(4.75)


def test_insertion_curve_pixelwise_by_hand():
    curve = insertion_curve(pixel_sum, X, A, baseline=0.0)
    assert curve.scores.tolist() == [[0.0, 2.0, 5.0, 9.0, 10.0]]
    assert curve.auc.tolist() == pytest.approx([(1 + 3.5 + 7 + 9.5) / 4])


def test_deletion_scalar_baseline_and_fewer_steps():
    curve = deletion_curve(pixel_sum, X, A, baseline=1.0)
    assert curve.scores.tolist() == [[10.0, 9.0, 7.0, 4.0, 4.0]]
    assert curve.auc.item() == pytest.approx((9.5 + 8 + 5.5 + 4) / 4)
    two = deletion_curve(pixel_sum, X, A, steps=2)  # two patches per step
    assert two.scores.tolist() == [[10.0, 5.0, 0.0]]
    assert two.auc.item() == pytest.approx((7.5 + 2.5) / 2)
    three = deletion_curve(pixel_sum, X, A, steps=3)  # floor(k * 4 / 3) = 0, 1, 2, 4 pixels
    assert three.scores.tolist() == [[10.0, 8.0, 5.0, 0.0]]


def test_mean_and_tensor_baselines():
    curve = insertion_curve(pixel_sum, X, A, baseline="mean")  # mean pixel 2.5
    assert curve.scores.tolist() == [[10.0, 9.5, 10.0, 11.5, 10.0]]
    fill = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    curve = deletion_curve(pixel_sum, X, A, baseline=fill)
    assert curve.scores.tolist() == [[10.0, 28.0, 55.0, 91.0, 100.0]]


def test_blur_baseline():
    flat = torch.full((1, 3, 4, 6), 7.0)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat)
    impulse = torch.zeros(1, 1, 31, 31)
    impulse[0, 0, 15, 15] = 1.0
    blurred = gaussian_blur(impulse, 2.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert blurred[0, 0, 15, 15] < 0.1 and blurred[0, 0, 15, 16] == blurred[0, 0, 16, 15]
    # deleting with a blur of a flat image changes nothing
    curve = deletion_curve(pixel_sum, flat, torch.rand(4, 6), baseline="blur", steps=4)
    assert torch.allclose(curve.scores, torch.full((1, 5), 7.0 * 72, dtype=torch.float64))


def test_patchwise_deletion_by_hand():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    grid = torch.tensor([[1.0, 4.0], [3.0, 2.0]])  # patch grid, ranks TR, BL, BR, TL
    # patch sums: TL 10, TR 18, BL 42, BR 50
    curve = deletion_curve(pixel_sum, x, grid, patch_size=2)
    assert curve.scores.tolist() == [[120.0, 102.0, 60.0, 10.0, 0.0]]
    assert curve.auc.item() == pytest.approx((111 + 81 + 35 + 5) / 4)
    # the same grid given as a pixel map (B, C, H, W) ranks the same
    pixel_map = grid.repeat_interleave(2, 0).repeat_interleave(2, 1)[None, None]
    assert (
        deletion_curve(pixel_sum, x, pixel_map, patch_size=2).scores.tolist()
        == curve.scores.tolist()
    )


def test_non_square_image_and_patch_not_dividing():
    x = torch.ones(1, 1, 3, 5)
    attr = torch.zeros(3, 5)
    attr[:2, :2] = 3.0  # top-left 2x2 patch: sum 12, mean 3
    attr[2, 4] = 5.0  # bottom-right 1x1 patch: sum 5, mean 5 -> ranked first
    # patches (row-major): 0 TL 4 px, 1 4 px, 2 2 px, 3 2 px, 4 2 px, 5 BR 1 px
    curve = deletion_curve(pixel_sum, x, attr, patch_size=2)
    assert curve.scores.tolist() == [[15.0, 14.0, 10.0, 6.0, 4.0, 2.0, 0.0]]
    ins = insertion_curve(pixel_sum, x, attr, patch_size=(3, 5), baseline=0.0)
    assert ins.scores.tolist() == [[0.0, 15.0]]


def test_batched_targets_and_chunks():
    calls = []

    def two_outputs(x):
        calls.append(x.shape[0])
        s = x.sum(dim=(1, 2, 3))
        return torch.stack([s, -2 * s], dim=1)

    inputs = torch.cat([X, 2 * X])
    attrs = torch.stack([A, A])
    curve = deletion_curve(two_outputs, inputs, attrs, target=[0, 1], batch_size=2)
    assert curve.scores.tolist() == [[10.0, 8.0, 5.0, 1.0, 0.0], [-40.0, -32.0, -20.0, -4.0, 0.0]]
    assert calls == [2, 2, 1, 2, 2, 1]
    assert curve.auc.tolist() == pytest.approx([4.75, -19.0])
    assert curve.mean_auc == pytest.approx((4.75 - 19.0) / 2)
    same = deletion_curve(two_outputs, inputs, attrs, target=torch.tensor([0, 1]), batch_size=100)
    assert torch.equal(same.scores, curve.scores)
    single = deletion_curve(two_outputs, X[0], A, target=1)  # (C, H, W) input
    assert single.scores.tolist() == [[-20.0, -16.0, -10.0, -2.0, 0.0]]


def test_additional_forward_args_shared_and_expanded():
    def scaled(x, w):
        assert w.ndim == 0  # passed unchanged
        return x.sum(dim=(1, 2, 3)) * w

    shared = deletion_curve(scaled, X, A, additional_forward_args=torch.tensor(3.0))
    assert shared.scores.tolist() == [[30.0, 24.0, 15.0, 3.0, 0.0]]

    def per_row(x, w):
        assert w.shape == (x.shape[0], 1)
        return x.sum(dim=(1, 2, 3)) * w[:, 0]

    weights = torch.tensor([[1.0], [10.0]])
    curve = deletion_curve(
        per_row,
        torch.cat([X, X]),
        torch.stack([A, A]),
        additional_forward_args=(weights,),
        expand_additional_args=True,
        batch_size=3,
    )
    assert curve.scores[1].tolist() == [100.0, 80.0, 50.0, 10.0, 0.0]


def test_curve_auc_and_progress(capsys):
    assert curve_auc(torch.tensor([1.0, 0.5, 0.0])).item() == pytest.approx(0.5)
    assert curve_auc(torch.tensor([[2.0, 2.0]])).tolist() == [2.0]
    deletion_curve(pixel_sum, X, A, show_progress=True)
    assert "deletion" in capsys.readouterr().err
    deletion_curve(pixel_sum, X, A)
    assert capsys.readouterr().err == ""


def test_perturbation_bad_inputs():
    with pytest.raises(
        ValueError, match=r"steps must be an int between 1 and the number of patches \(4\); got 0"
    ):
        deletion_curve(pixel_sum, X, A, steps=0)
    with pytest.raises(ValueError, match="steps"):
        deletion_curve(pixel_sum, X, A, steps=5)
    with pytest.raises(ValueError, match="patch_size"):
        deletion_curve(pixel_sum, X, A, patch_size=0)
    with pytest.raises(ValueError, match="patch_size"):
        deletion_curve(pixel_sum, X, A, patch_size=3)
    with pytest.raises(ValueError, match="batch_size"):
        deletion_curve(pixel_sum, X, A, batch_size=0)
    with pytest.raises(ValueError, match=r"attribution must have shape.*got shape \(2, 2, 2\)"):
        deletion_curve(pixel_sum, torch.cat([X, X, X]), torch.rand(2, 2, 2))
    with pytest.raises(ValueError, match="larger than the inputs"):
        deletion_curve(pixel_sum, X, torch.rand(3, 3))
    with pytest.raises(ValueError, match="does not broadcast"):
        deletion_curve(pixel_sum, X, A, baseline=torch.zeros(3))
    with pytest.raises(ValueError, match="baseline"):
        insertion_curve(pixel_sum, X, A, baseline="noise")
    with pytest.raises(TypeError, match="baseline"):
        insertion_curve(pixel_sum, X, A, baseline=None)
    with pytest.raises(ValueError, match="pass target="):
        deletion_curve(lambda x: torch.zeros(x.shape[0], 3), X, A)
    with pytest.raises(ValueError, match="target has 1 entries but inputs hold 2"):
        deletion_curve(pixel_sum, torch.cat([X, X]), torch.stack([A, A]), target=[0])
    with pytest.raises(ValueError, match=r"inputs must have shape"):
        deletion_curve(pixel_sum, X[0, 0], A)
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        deletion_curve(pixel_sum, [[1.0]], A)


# ---------------------------------------------------------------- model randomisation


def grad_map(model, x):
    x = x.clone().requires_grad_(True)
    model(x).sum().backward()
    return x.grad[0]


def two_layer_net():
    net = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
        net[1].weight.copy_(torch.tensor([[1.0, 0.0]]))
    return net  # input gradient = W2 @ W1 = [1, 2, 3, 4]


def fixed_reinit(module):
    with torch.no_grad():
        if module.out_features == 1:
            module.weight.copy_(torch.tensor([[0.0, 1.0]]))  # gradient becomes W1 row 1
        else:
            module.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]]))


def test_randomization_cascading_by_hand():
    net = two_layer_net()
    result = model_randomization_check(net, grad_map, torch.ones(1, 4), reinit=fixed_reinit)
    assert result.layers == ["none", "1", "0"]  # top-level children, last first
    assert result.maps[0].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert result.maps[1].tolist() == [4.0, 3.0, 2.0, 1.0]
    assert result.maps[2].tolist() == [1.0, 3.0, 2.0, 4.0]
    # rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)); last step: d = [0, 1, -1, 0] -> 1 - 12/60
    assert result.spearman == pytest.approx([1.0, -1.0, 0.8])
    assert result.spearman_abs == pytest.approx([1.0, -1.0, 0.8])
    assert result.ssim is None


def test_randomization_independent_and_layer_arguments():
    net = two_layer_net()
    result = model_randomization_check(
        net, grad_map, torch.ones(1, 4), layers=[net[1], "0"], cascading=False, reinit=fixed_reinit
    )
    assert result.layers == ["none", "1", "0"]
    # independent: randomising only layer 0 keeps W2 = [1, 0] -> gradient = W1'[0] = [1, 2, 3, 4]
    assert result.spearman == pytest.approx([1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="no submodule named 'head'"):
        model_randomization_check(net, grad_map, torch.ones(1, 4), layers=["head"])
    with pytest.raises(ValueError, match="not a submodule"):
        model_randomization_check(net, grad_map, torch.ones(1, 4), layers=[nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="model must be"):
        model_randomization_check(grad_map, grad_map, torch.ones(1, 4))


def test_randomization_default_reinit_changes_map_and_leaves_model_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 6)
    rng_before = torch.get_rng_state()

    def explain(model, inputs):
        inputs = inputs.clone().requires_grad_(True)
        model(inputs)[:, 0].sum().backward()
        return inputs.grad * inputs

    result = model_randomization_check(net, explain, x, compute_ssim=True)
    assert result.layers == ["none", "2", "0"]  # ReLU has no parameters
    assert result.spearman[0] == 1.0 and result.ssim[0] == pytest.approx(1.0)
    assert not torch.equal(result.maps[1], result.maps[0])
    assert result.spearman[1] < 0.99
    assert all(-1.0 <= s <= 1.0 for s in result.spearman + result.spearman_abs)
    # the passed model, its gradients, its mode and the global RNG are as they were
    assert set(net.state_dict()) == set(before)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is None for p in net.parameters())
    assert not net.training
    assert torch.equal(torch.get_rng_state(), rng_before)
    # the seed makes the check reproducible
    again = model_randomization_check(net, explain, x)
    assert again.spearman == result.spearman


def test_ssim_by_hand():
    a = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert ssim(a, a) == pytest.approx(1.0)
    # one 2x2 window: means 0.5, variances 0.25, covariance -0.25
    c1, c2 = 0.01**2, 0.03**2
    expected = ((0.5 + c1) * (-0.5 + c2)) / ((0.5 + c1) * (0.5 + c2))
    assert ssim(a, b) == pytest.approx(expected)
    assert math.isclose(ssim(3 * a + 1, a), 1.0)  # min-max normalised first
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, torch.zeros(3, 3))
