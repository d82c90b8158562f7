"""One per-item call for every image method, ``attribute_items`` (issue #11): it equals the older
per-item names it replaces (``attribute_prompts``, ``attribute_tokens``) and the maps the
method gives one item at a time (``attribute(target=item)``), for two-tower, fusion, generative,
IG and occlusion."""

import pytest
import tiny_models as tm
import torch
from model_state import assert_unchanged, snapshot
from numerics import assert_close_scaled

from captum_vlm.attr import (
    BimodalRelevancy,
    CausalOcclusion,
    CrossAttentionGradCAM,
    GradECLIP,
    RawAttention,
    TokenIntegratedGradients,
)
from captum_vlm.targets import TokenLogProbs


@pytest.mark.parametrize("method_class", [GradECLIP, RawAttention])
def test_two_tower_items_are_the_prompts(method_class):
    model = tm.clip().double()
    kwargs = {"head_fusion": "grad"} if method_class is RawAttention else {}
    method = method_class(model, **kwargs)
    pixels, args = tm.pixels(2).double(), tm.text_ids(3, 6)
    before = snapshot(model)
    every = method.attribute_items(pixels, additional_forward_args=args, return_grid=True)
    assert every.shape[:2] == (2, 3)
    torch.testing.assert_close(every, method.attribute_prompts(pixels, additional_forward_args=args,
                                                               return_grid=True), rtol=0, atol=0)
    for k in range(3):  # each item is that prompt explained alone (its own backward)
        assert_close_scaled(every[:, k], method.attribute(pixels, target=k, additional_forward_args=args,
                                                          return_grid=True))
    some = method.attribute_items(pixels, target=[2, -3], additional_forward_args=args, upsample="bilinear")
    torch.testing.assert_close(some, method.attribute_prompts(pixels, additional_forward_args=args, prompts=[2, 0],
                                                              upsample="bilinear"), rtol=0, atol=0)
    assert_close_scaled(some[:, 0], method.attribute(pixels, target=2, additional_forward_args=args,
                                                     upsample="bilinear"))
    one = method.attribute_items(pixels, target=torch.tensor(1), additional_forward_args=args, return_grid=True)
    assert_close_scaled(one[:, 0], every[:, 1])
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["blip_caption", "llava"])
def test_generative_items_are_the_tokens(name):
    model = getattr(tm, name)().double()
    pixels = tm.pixels(2).double()
    args = tm.image_prompt(model, [5, 6, 7, 8], batch=2) if name == "llava" else tm.text_ids(2, 6)
    method = BimodalRelevancy(model)
    every = method.attribute_items(pixels, additional_forward_args=args, return_grid=True)
    torch.testing.assert_close(every, method.attribute_tokens(pixels, additional_forward_args=args,
                                                              return_grid=True), rtol=0, atol=0)
    length = args[0].shape[1]
    assert every.shape[:2] == (2, length)
    for t in (length - 3, length - 1):  # one token explained alone: its own map, the others zero
        alone = method.attribute(pixels, target=t, additional_forward_args=args, return_grid=True)
        assert_close_scaled(every[:, t], alone)
        picked = method.attribute_items(pixels, target=t, additional_forward_args=args, return_grid=True)
        assert_close_scaled(picked[:, t], alone)
        assert picked[:, [p for p in range(length) if p != t]].abs().max() == 0


def test_fusion_match_items_are_the_caption_tokens_and_words():
    model = tm.blip_itm().double()
    pixels, (ids, mask) = tm.pixels(2).double(), tm.text_ids(2, 6)
    method = CrossAttentionGradCAM(model)
    groups = [[1, 2], [3], [4, 5]]
    words = method.attribute_items(pixels, additional_forward_args=(ids, mask), token_groups=groups,
                                   return_grid=True)
    torch.testing.assert_close(words, method.attribute_tokens(pixels, additional_forward_args=(ids, mask),
                                                              token_groups=groups, return_grid=True), rtol=0, atol=0)
    tokens = method.attribute_items(pixels, additional_forward_args=(ids, mask), return_grid=True)
    for w, group in enumerate(groups):  # a word is the mean of its tokens' maps (padding has none)
        kept = mask[:, group].to(tokens)[:, :, None, None]
        assert_close_scaled(words[:, w], (tokens[:, group] * kept).sum(1) / kept.sum(1))


def test_occlusion_items_from_one_sweep_equal_one_column_at_a_time():
    model = tm.blip_caption().double()
    pixels, (ids, mask) = tm.pixels(2).double(), tm.text_ids(2, 6)
    occ = CausalOcclusion(TokenLogProbs(model))
    kwargs = dict(additional_forward_args=(ids, mask), window=2, stride=2, return_grid=True)
    every = occ.attribute_items(pixels, perturbations_per_eval=3, **kwargs)
    assert every.shape[:2] == (2, 6)
    for t in (1, 4):
        assert_close_scaled(every[:, t], occ.attribute(pixels, target=t, **kwargs))
    picked = occ.attribute_items(pixels, target=[4, 1], **kwargs)
    assert_close_scaled(picked, every[:, [4, 1]])
    clip = tm.clip().double()
    one_prompt = CausalOcclusion(clip).attribute_items(pixels, additional_forward_args=tm.text_ids(1, 6),
                                                       window=2, return_grid=True)
    assert one_prompt.shape[1] == 1
    assert_close_scaled(one_prompt[:, 0], CausalOcclusion(clip).attribute(
        pixels, target=0, additional_forward_args=tm.text_ids(1, 6), window=2, return_grid=True))


def test_occlusion_text_items_and_one_number_scores():
    model = tm.clip().double()
    pixels, args = tm.pixels(2).double(), tm.text_ids(3, 6)
    occ = CausalOcclusion(model)
    texts = occ.attribute_items(pixels, additional_forward_args=args, modality="text")
    assert texts.shape == (2, 3, 6)
    for k in range(3):
        torch.testing.assert_close(texts[:, k], occ.attribute(pixels, target=k, additional_forward_args=args,
                                                              modality="text"))
    itm = CausalOcclusion(tm.blip_itm().double())  # the match logit: one number, one item
    itm_args = tm.text_ids(2, 6)
    assert_close_scaled(itm.attribute_items(pixels, additional_forward_args=itm_args, return_grid=True)[:, 0],
                        itm.attribute(pixels, additional_forward_args=itm_args, return_grid=True))


def test_integrated_gradients_items_are_the_prompts_and_keep_both_modalities():
    model = tm.clip().double()
    pixels, args = tm.pixels(2).double(), tm.text_ids(2, 6)
    ig = TokenIntegratedGradients(model)
    before = snapshot(model)
    image, text = ig.attribute_items(pixels, additional_forward_args=args, modality="both", n_steps=8,
                                     return_grid=True)
    assert image.shape[:2] == (2, 2) and text.shape == (2, 2, 6)
    for k in range(2):
        one_image, one_text = ig.attribute(pixels, target=k, additional_forward_args=args, modality="both",
                                           n_steps=8, return_grid=True)
        assert_close_scaled(image[:, k], one_image)
        assert_close_scaled(text[:, k], one_text)
    assert_unchanged(model, before)


def test_bad_items_are_named():
    model = tm.clip()
    pixels, args = tm.pixels(1), tm.text_ids(3, 6)
    with pytest.raises(ValueError, match="target: 3 is out of range for 3 prompts"):
        GradECLIP(model).attribute_items(pixels, target=[0, 3], additional_forward_args=args)
    with pytest.raises(TypeError, match="target: expected a prompt index or a list of them"):
        GradECLIP(model).attribute_items(pixels, target=[], additional_forward_args=args)
    with pytest.raises(TypeError, match="target: expected ints, got 0.5"):
        CausalOcclusion(model).attribute_items(pixels, target=[0.5], additional_forward_args=args)
    with pytest.raises(TypeError, match="prompts: expected a non-empty list"):
        GradECLIP(model).attribute_prompts(pixels, additional_forward_args=args, prompts=2)
