"""Metrics with the package's own targets on small random-initialised transformers models."""

import pytest
import tiny_models as tm
import torch

from captum_vlm.metrics import deletion_curve, insertion_curve, model_randomization_check
from captum_vlm.targets import ImageTextSimilarity, MatchLogit


def test_deletion_with_clip_similarity_target_matches_direct_forwards():
    model = tm.clip()
    sim = ImageTextSimilarity(model)
    ids, mask = tm.text_ids(2, 5)
    px = tm.pixels(1)
    grid = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))  # 8 px patches
    curve = deletion_curve(
        sim, px, grid, target=1, additional_forward_args=(ids, mask), patch_size=8, batch_size=5
    )
    assert curve.scores.shape == (1, 17)
    with torch.no_grad():
        assert curve.scores[0, 0] == pytest.approx(sim(px, ids, mask)[0, 1].item(), abs=1e-5)
        assert curve.scores[0, -1] == pytest.approx(
            sim(torch.zeros_like(px), ids, mask)[0, 1].item(), abs=1e-5
        )
        # after 3 steps the 3 highest patches are zero
        top3 = grid.flatten().argsort(descending=True)[:3]
        keep = torch.ones(16)
        keep[top3] = 0
        pixel_keep = keep.view(4, 4).repeat_interleave(8, 0).repeat_interleave(8, 1)
        expected = sim(px * pixel_keep, ids, mask)[0, 1].item()
    assert curve.scores[0, 3] == pytest.approx(expected, abs=1e-5)
    one_call = deletion_curve(
        sim, px, grid, target=1, additional_forward_args=(ids, mask), patch_size=8, batch_size=100
    )
    assert torch.allclose(one_call.scores, curve.scores, atol=1e-5)
    ins = insertion_curve(
        sim, px, grid, target=1, additional_forward_args=(ids, mask), patch_size=8, steps=4
    )
    assert ins.scores[0, -1] == pytest.approx(curve.scores[0, 0].item(), abs=1e-5)


def test_batched_fusion_model_curves_equal_one_at_a_time():
    target = MatchLogit(tm.vilt_itm())
    ids, mask = tm.text_ids(2, 5)
    px = tm.pixels(2)
    attr = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    kwargs = dict(patch_size=8, steps=8, batch_size=4, expand_additional_args=True)
    batched = deletion_curve(target, px, attr, additional_forward_args=(ids, mask), **kwargs)
    for b in range(2):
        single = deletion_curve(
            target,
            px[b : b + 1],
            attr[b : b + 1],
            additional_forward_args=(ids[b : b + 1], mask[b : b + 1]),
            **kwargs,
        )
        assert torch.allclose(batched.scores[b], single.scores[0], atol=1e-5)


def test_randomization_check_on_clip_leaves_model_untouched():
    model = tm.clip()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = tm.text_ids(2, 5)

    def input_gradient(m, px):
        px = px.clone().requires_grad_(True)
        ImageTextSimilarity(m)(px, ids, mask)[:, 0].sum().backward()
        return px.grad

    layers = ["visual_projection", "vision_model.encoder.layers.1", "vision_model.encoder.layers.0"]
    result = model_randomization_check(model, input_gradient, tm.pixels(1), layers=layers)
    assert result.layers == ["none", *layers]
    assert result.spearman[0] == pytest.approx(1.0)
    assert all(s < 0.9 for s in result.spearman[1:])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
