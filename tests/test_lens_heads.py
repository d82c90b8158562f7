"""Head statistics from hand-made attention; head ablation against a weight-edited reference."""

import copy
import math

import numpy as np
import pytest
import tiny_models as tm
import torch
from model_state import assert_unchanged, snapshot
from numerics import assert_close_scaled

from captum_vlm.adapters import get_adapter
from captum_vlm.lens.heads import (
    ablate_heads,
    attention_statistics,
    head_importance,
    head_statistics,
)
from captum_vlm.targets import ImageTextSimilarity, TokenLogProbs

HEAD_DIM = tm.HIDDEN // tm.HEADS


def _hand_attention():
    """CLS + a 2x2 grid. Head 0: CLS uniform, each patch only itself. Head 1: CLS all on patch
    (1,1), each patch half on CLS and half on patch (1,1)."""
    attn = torch.zeros(2, 2, 5, 5)
    attn[:, 0, 0] = 0.2
    for q in range(1, 5):
        attn[:, 0, q, q] = 1.0
        attn[:, 1, q, 0] = 0.5
        attn[:, 1, q, 4] = 0.5
    attn[:, 1, 0, 4] = 1.0
    return attn


def test_statistics_of_a_hand_made_attention():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 2:, 2:] = True  # on patch (1, 1): head 1 points there
    masks[1, :2, :2] = True  # on patch (0, 0): a miss
    patches = torch.arange(1, 5)
    stats = attention_statistics([_hand_attention()], sink_keys=torch.tensor([0]), patch_keys=patches,
                                 patch_queries=patches, grid=(2, 2), masks=masks)
    np.testing.assert_allclose(stats.entropy[0], [math.log(5) / 5, 4 / 5 * math.log(2)], rtol=1e-6)
    np.testing.assert_allclose(stats.sink_mass[0], [0.2 / 5, 0.4], rtol=1e-6)
    np.testing.assert_allclose(stats.distance[0], [0.0, (2 + math.sqrt(2)) / 4], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(stats.pointing[0], [0.0, 0.5])  # head 0's received attention is flat
    fig = stats.plot()
    assert len(fig.axes) == 8  # four maps and their colour bars


def test_head_statistics_on_a_model_use_its_attention_and_layout():
    model = tm.clip()
    inputs = {"pixel_values": tm.pixels(2)}
    before = snapshot(model)
    stats = head_statistics(model, inputs, stream="vision")
    assert_unchanged(model, before)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = reference.vision_model(pixel_values=inputs["pixel_values"], output_attentions=True).attentions
    patches = torch.arange(1, 17)
    want = attention_statistics(attentions, torch.tensor([0]), patches, patches, (4, 4))
    for name in ("entropy", "sink_mass", "distance"):
        assert_close_scaled(getattr(stats, name), getattr(want, name))
    assert np.isnan(stats.pointing).all()


def test_llava_text_stream_finds_the_image_tokens():
    model = tm.llava()
    ids = torch.tensor([[tm.BOS] + [tm.LLAVA_IMAGE_TOKEN] * 16 + [5, 6]])
    inputs = {"pixel_values": tm.pixels(1), "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    masks = torch.zeros(1, tm.IMAGE_SIZE, tm.IMAGE_SIZE, dtype=torch.bool)
    masks[0, :8, :8] = True
    stats = head_statistics(model, inputs, stream="text", masks=masks)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = reference(**inputs, output_attentions=True).attentions
    image = torch.arange(1, 17)
    want = attention_statistics(attentions, torch.tensor([0]), image, image, (4, 4), masks=masks)
    for name in ("entropy", "sink_mass", "distance", "pointing"):
        assert_close_scaled(np.nan_to_num(getattr(stats, name), nan=7.0), np.nan_to_num(getattr(want, name), nan=7.0))


def _edited(model, stream, layer, head, mean=None):
    """A copy of the model whose projection ignores the head (its weight columns zeroed); with
    ``mean`` the head's mean output is folded into the bias instead."""
    clone = copy.deepcopy(model)
    proj = get_adapter(clone).head_projections(stream)[layer]
    cols = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    with torch.no_grad():
        if mean is not None:
            shift = proj.weight[:, cols] @ mean
            if proj.bias is None:
                proj.bias = torch.nn.Parameter(shift.clone())
            else:
                proj.bias += shift
        proj.weight[:, cols] = 0
    return clone


def _head_mean(model, stream, layer, head, run):
    proj = get_adapter(model).head_projections(stream)[layer]
    seen = []
    handle = proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        run(model)
    handle.remove()
    x = seen[-1][..., head * HEAD_DIM : (head + 1) * HEAD_DIM]
    return x.reshape(-1, HEAD_DIM).mean(0)


def _clip_case():
    model = tm.clip()
    ids, mask = tm.text_ids(3, 6)
    pixels = tm.pixels(2)
    return model, "vision", lambda m: ImageTextSimilarity(m)(pixels, ids, mask)


def _blip_cross_case():
    model = tm.blip_vqa()
    ids, mask = tm.text_ids(2, 6)
    answer, answer_mask = tm.text_ids(2, 4, seed=1)
    pixels = tm.pixels(2)
    return model, "cross", lambda m: TokenLogProbs(m)(pixels, ids, mask, answer, answer_mask)


def _llava_case():
    model = tm.llava()
    ids = torch.tensor([[tm.BOS] + [tm.LLAVA_IMAGE_TOKEN] * 16 + [5, 6, 7]])
    pixels = tm.pixels(1)
    return model, "text", lambda m: TokenLogProbs(m)(pixels, ids)


CASES = {"clip-vision": _clip_case, "blip-cross": _blip_cross_case, "llava-text": _llava_case}


@pytest.mark.parametrize("mode", ["zero", "mean"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_ablating_a_head_equals_editing_its_output(name, mode):
    model, stream, run = CASES[name]()
    layer, head = 1, 2
    mean = _head_mean(model, stream, layer, head, run) if mode == "mean" else None
    with torch.no_grad():
        want = run(_edited(model, stream, layer, head, mean))
        clean = run(model)
        with ablate_heads(model, [(layer, head)], stream=stream, mode=mode):
            got = run(model)
    assert_close_scaled(got, want)
    assert_close_scaled(got - clean, want - clean)  # the change itself, on its own scale


def test_ablation_is_undone_exactly_also_after_an_exception():
    model, stream, run = _clip_case()
    before = snapshot(model)
    with torch.no_grad():
        clean = run(model)
        with ablate_heads(model, [(0, 1), (1, 3)], stream=stream):
            ablated = run(model)
        assert_unchanged(model, before)
        assert torch.equal(run(model), clean)
        with pytest.raises(RuntimeError, match="inside"):
            with ablate_heads(model, [(1, 0)], stream=stream, mode="mean"):
                run(model)
                raise RuntimeError("inside")
        assert_unchanged(model, before)
        assert torch.equal(run(model), clean)
    assert not torch.allclose(ablated, clean)


def test_head_importance_equals_one_edit_at_a_time():
    model, _, _ = _clip_case()
    ids, mask = tm.text_ids(3, 6)
    pixels = tm.pixels(2)
    before = snapshot(model)
    result = head_importance(model, ImageTextSimilarity(model), pixels, (ids, mask), target=[0, 2])
    assert_unchanged(model, before)
    with torch.no_grad():
        base = ImageTextSimilarity(model)(pixels, ids, mask)[[0, 1], [0, 2]]
        want = np.zeros((2, tm.HEADS))
        for layer in range(2):
            for head in range(tm.HEADS):
                edited = _edited(model, "vision", layer, head)
                want[layer, head] = (base - ImageTextSimilarity(edited)(pixels, ids, mask)[[0, 1], [0, 2]]).mean()
    assert_close_scaled(result.importance, want)
    assert result.ranked[0] == tuple(int(i) for i in np.unravel_index(np.argmax(want), want.shape))
    assert result.per_example.shape == (2, 2, tm.HEADS)
    assert "head ablation" in result.plot().axes[0].get_title()


def test_misuse_errors_name_the_argument():
    model, stream, run = _clip_case()
    with pytest.raises(ValueError, match="heads: head 4"):
        with ablate_heads(model, [(0, 4)]):
            pass
    with pytest.raises(ValueError, match="heads: layer 2"):
        with ablate_heads(model, [(2, 0)]):
            pass
    with pytest.raises(TypeError, match="heads"):
        with ablate_heads(model, [3]):
            pass
    with pytest.raises(ValueError, match="mode"):
        with ablate_heads(model, [(0, 0)], mode="noise"):
            pass
    with pytest.raises(ValueError, match="stream"):
        head_statistics(model, {"pixel_values": tm.pixels(1)}, stream="cross")
    with pytest.raises(ValueError, match="masks"):
        head_statistics(model, {"pixel_values": tm.pixels(1)}, masks=np.zeros((1, 4, 4), bool))
    ids, mask = tm.text_ids(3, 6)
    with pytest.raises(ValueError, match="target"):
        head_importance(model, ImageTextSimilarity(model), tm.pixels(2), (ids, mask))
    with pytest.raises(ValueError, match="target"):
        head_importance(model, ImageTextSimilarity(model), tm.pixels(2), (ids, mask), target=3)


def test_blip_cross_stream_keys_are_the_image_tokens():
    model = tm.blip_itm()
    ids, mask = tm.text_ids(2, 6)
    inputs = {"pixel_values": tm.pixels(2), "input_ids": ids, "attention_mask": mask}
    masks = torch.zeros(2, tm.IMAGE_SIZE, tm.IMAGE_SIZE, dtype=torch.bool)
    masks[:, 8:16, 8:24] = True
    stats = head_statistics(model, inputs, stream="cross", masks=masks)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        image = reference.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        attentions = reference.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image,
                                            output_attentions=True).cross_attentions
    want = attention_statistics(attentions, torch.tensor([0]), torch.arange(1, 17), None, (4, 4), masks=masks)
    for name in ("entropy", "sink_mass", "pointing"):
        assert_close_scaled(getattr(stats, name) + 1, getattr(want, name) + 1)
    assert np.isnan(stats.distance).all()  # text queries are not on the patch grid


def test_vilt_joint_encoder_reads_the_patches_from_the_layout():
    model = tm.vilt_itm()
    ids, mask = tm.text_ids(1, 6)
    inputs = {"pixel_values": tm.pixels(1), "input_ids": ids, "attention_mask": mask,
              "pixel_mask": torch.ones(1, tm.IMAGE_SIZE, tm.IMAGE_SIZE, dtype=torch.long)}
    stats = head_statistics(model, inputs, stream="vision")
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = reference(**inputs, output_attentions=True).attentions
    want = attention_statistics(attentions, torch.tensor([0]))
    for name in ("entropy", "sink_mass"):
        assert_close_scaled(getattr(stats, name), getattr(want, name))
    assert np.isfinite(stats.distance).all()  # the 16 patch tokens were found after the text


def test_head_importance_leaves_the_model_as_found_when_the_target_raises_midway():
    model, _, _ = _clip_case()
    ids, mask = tm.text_ids(3, 6)
    pixels = tm.pixels(2)
    similarity = ImageTextSimilarity(model)
    with torch.no_grad():
        clean = similarity(pixels, ids, mask)
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 4:  # the baseline and two ablated heads ran; the third ablation raises
            raise RuntimeError("target failed")
        return similarity(*args)

    before = snapshot(model)
    with pytest.raises(RuntimeError, match="target failed"):
        head_importance(model, flaky, pixels, (ids, mask), target=0, mode="mean")
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(similarity(pixels, ids, mask), clean)
