"""Batched paths of issue #17 equal the one-at-a-time results they replace: occlusion explaining
every prompt (or token) from one sweep, the grounding test for all prompts, per-token fusion maps
from one batched backward, relevancy for many prompts from one forward."""

import pytest
import tiny_models as tm
import torch
from model_state import assert_unchanged, snapshot
from numerics import assert_close_scaled

from captum_vlm.attr import (
    BimodalRelevancy,
    CausalOcclusion,
    CrossAttentionGradCAM,
    GradientWeightedRelevancy,
    RawAttention,
)
from captum_vlm.targets import TokenLogProbs

# ----- occlusion: every column from one sweep ---------------------------------------------------


@pytest.mark.parametrize("intervention", ["drop", "paint"])
def test_two_tower_occlusion_of_all_prompts_equals_one_prompt_at_a_time(intervention):
    model = tm.clip().double()
    pixels, (ids, mask) = tm.pixels(2).double(), tm.text_ids(3, 6)
    occ = CausalOcclusion(model)
    kwargs = dict(additional_forward_args=(ids, mask), intervention=intervention, window=2, stride=1)
    every = occ.attribute(pixels, target=None, perturbations_per_eval=4, return_grid=True, **kwargs)
    assert every.shape == (2, 3, *get_grid(model, pixels))
    for k in range(3):
        assert_close_scaled(every[:, k], occ.attribute(pixels, target=k, return_grid=True, **kwargs))
    pixel_maps = occ.attribute(pixels, target=None, **kwargs)
    assert pixel_maps.shape == (2, 3, *pixels.shape[1:])
    assert_close_scaled(pixel_maps[:, 1], occ.attribute(pixels, target=1, **kwargs))


def get_grid(model, pixels):
    from captum_vlm.adapters import get_adapter

    return get_adapter(model).patch_grid(pixels)


def test_occlusion_of_all_prompts_encodes_the_prompts_once_and_leaves_the_model():
    model = tm.clip()
    calls = []
    before = snapshot(model)
    handle = model.text_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        CausalOcclusion(model).attribute(tm.pixels(1), target=None, additional_forward_args=tm.text_ids(4, 6),
                                         perturbations_per_eval=3)
    finally:
        handle.remove()
    assert calls == [1]
    assert_unchanged(model, before)


def test_per_token_occlusion_of_all_tokens_equals_one_token_at_a_time():
    model = tm.blip_caption().double()
    pixels, (ids, mask) = tm.pixels(2).double(), tm.text_ids(2, 6)
    occ = CausalOcclusion(TokenLogProbs(model))
    every = occ.attribute(pixels, target=None, additional_forward_args=(ids, mask), window=2, stride=2,
                          return_grid=True, perturbations_per_eval=2)
    assert every.shape[:2] == (2, 6)
    for t in (1, 3, 5):
        alone = occ.attribute(pixels, target=t, additional_forward_args=(ids, mask), window=2, stride=2,
                              return_grid=True)
        assert_close_scaled(every[:, t], alone)


@pytest.mark.parametrize("intervention", ["drop", "paint"])
def test_grounding_test_of_all_prompts_equals_one_prompt_at_a_time(intervention):
    model = tm.clip().double()
    pixels, (ids, mask) = tm.pixels(2).double(), tm.text_ids(3, 6)
    occ = CausalOcclusion(model)
    maps = torch.rand(2, 3, *get_grid(model, pixels), generator=torch.Generator().manual_seed(1))
    every = occ.grounding_test(pixels, maps, target=None, additional_forward_args=(ids, mask), fraction=0.25,
                               n_random=3, intervention=intervention)
    assert every.score.shape == (2, 3) and every.flipped_relevant.shape == (2, 3)
    flips = []
    for k in range(3):
        one = occ.grounding_test(pixels, maps[:, k], target=k, additional_forward_args=(ids, mask), fraction=0.25,
                                 n_random=3, intervention=intervention)
        for field in ("score", "score_relevant", "score_random", "drop_relevant", "drop_random"):
            assert_close_scaled(getattr(every, field)[:, k], getattr(one, field))
        torch.testing.assert_close(every.score_random_std[:, k], one.score_random_std)
        assert torch.equal(every.grounded[:, k], one.grounded)
        assert torch.equal(every.flipped_relevant[:, k], one.flipped_relevant)
        assert every.flip_rate_random == one.flip_rate_random
        flips.append(one.flip_rate_relevant)
    assert every.flip_rate_relevant == pytest.approx(sum(flips) / 3)


def test_grounding_test_of_all_prompts_wants_one_map_per_prompt():
    model = tm.clip()
    pixels, args = tm.pixels(1), tm.text_ids(3, 6)
    with pytest.raises(ValueError, match="attribution: target=None explains all 3 columns"):
        CausalOcclusion(model).grounding_test(pixels, torch.rand(1, 2, 2), target=None, additional_forward_args=args)


# ----- fusion models: every token from one batched backward ---------------------------------------


def _per_token_loop(method, pixels, args, positions):
    """The reference: one attribute call (one backward) per token position."""
    return {t: method.attribute(pixels, target=t, additional_forward_args=args, return_grid=True) for t in positions}


@pytest.mark.parametrize("cls", [CrossAttentionGradCAM, BimodalRelevancy])
@pytest.mark.parametrize("factory", [tm.blip_caption, tm.blip_vqa, tm.llava])
def test_fusion_per_token_maps_from_one_batched_backward_equal_the_token_loop(cls, factory):
    model = factory().double()
    pixels = tm.pixels(2).double()
    if factory is tm.llava:
        ids = torch.tensor([[tm.BOS, 9] + [tm.LLAVA_IMAGE_TOKEN] * 16 + [11, 12, 13]] * 2)
        ids[1, 1] = 20
        args = (ids, torch.ones_like(ids))
    else:
        args = tm.text_ids(2, 7)
        if factory is tm.blip_vqa:
            args = (*args, *tm.text_ids(2, 5, seed=1))
    method = cls(model)
    calls = []
    original = torch.autograd.grad

    def counting(*a, **k):
        calls.append(bool(k.get("is_grads_batched")))
        return original(*a, **k)

    torch.autograd.grad = counting
    try:
        every = method.attribute_tokens(pixels, additional_forward_args=args, return_grid=True)
    finally:
        torch.autograd.grad = original
    assert calls == [True], f"expected one batched backward for all tokens, got {calls}"
    length = every.shape[1]
    positions = [t for t in range(1, length) if every[:, t].abs().sum() > 0]
    assert len(positions) >= 2
    reference = _per_token_loop(method, pixels, args, positions)
    for t in positions:
        assert_close_scaled(every[:, t], reference[t])


# ----- two-tower gradient-on-attention methods: many prompts, one forward ------------------------------


@pytest.mark.parametrize("make", [lambda m: GradientWeightedRelevancy(m), lambda m: RawAttention(m, head_fusion="grad")])
@pytest.mark.parametrize("factory", [tm.clip, tm.siglip])
def test_many_prompts_equal_one_prompt_at_a_time(make, factory):
    model = factory().double()
    pixels, (ids, mask) = tm.pixels(2).double(), tm.text_ids(5, 6)
    method = make(model)
    forwards = []
    handle = model.vision_model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        every = method.attribute_prompts(pixels, additional_forward_args=(ids, mask), return_grid=True)
    finally:
        handle.remove()
    assert len(forwards) == 1
    for k in range(5):
        assert_close_scaled(every[:, k], method.attribute(pixels, target=k, additional_forward_args=(ids, mask),
                                                          return_grid=True))


def test_explain_occlusion_of_several_prompts_equals_the_class_one_prompt_at_a_time():
    from captum_vlm import zoo
    from captum_vlm.explain import explain

    model, processor = zoo.load("shapes-clip")
    scene = zoo.scenes.make_scenes(7, 1, size=model.config.vision_config.image_size, n_objects=2)[0]
    texts = ["a red circle", "a blue square", "a green triangle"]
    result = explain(model, processor, scene.pil(), texts, methods=["occlusion"])
    inputs = processor(images=scene.pil(), text=texts, return_tensors="pt", padding=True)
    occ = CausalOcclusion(model)
    assert [r.target for r in result.records] == texts
    for k, record in enumerate(result.records):
        alone = occ.attribute(inputs["pixel_values"], target=k, return_grid=True,
                              additional_forward_args=(inputs["input_ids"], inputs["attention_mask"]))[0]
        assert_close_scaled(record.grid, alone)


class _IdTokenizer:
    """What Captum's LLMAttribution asks of a tokenizer when the target is given as ids."""

    def decode(self, ids, **kwargs):
        return " ".join(str(int(i)) for i in torch.as_tensor(ids).flatten())

    def encode(self, text, add_special_tokens=True, **kwargs):
        return [int(t) for t in str(text).split()]

    def __call__(self, text, **kwargs):
        ids, offsets, start = [], [], 0
        for word in str(text).split(" "):
            ids.append(int(word))
            offsets.append((start, start + len(word)))
            start += len(word) + 1
        return {"input_ids": ids, "offset_mapping": offsets}


def test_per_token_occlusion_of_llava_equals_captum_llm_attribution_with_image_masks():
    import numpy as np
    from captum.attr import FeatureAblation, ImageMaskInput, LLMAttribution
    from PIL import Image

    model = tm.llava()
    prompt = torch.tensor([[tm.BOS, 9] + [tm.LLAVA_IMAGE_TOKEN] * 16 + [11, 12]])
    answer = [13, 14, 15]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (tm.IMAGE_SIZE, tm.IMAGE_SIZE, 3), dtype=np.uint8))

    def to_pixels(img):
        return (torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1)[None] / 255 - 0.5) / 0.5

    side = tm.IMAGE_SIZE // tm.PATCH
    mask = (torch.arange(tm.IMAGE_SIZE)[:, None] // tm.PATCH) * side + torch.arange(tm.IMAGE_SIZE)[None] // tm.PATCH
    inp = ImageMaskInput(image, mask=mask, processor_fn=lambda img: {
        "input_ids": prompt, "attention_mask": torch.ones_like(prompt), "pixel_values": to_pixels(img)})
    with torch.no_grad():
        theirs = LLMAttribution(FeatureAblation(model), _IdTokenizer()).attribute(
            inp, target=torch.tensor(answer), use_cached_outputs=False, forward_in_tokens=False).token_attr
    ids = torch.cat([prompt, torch.tensor([answer])], dim=1)
    ours = CausalOcclusion(TokenLogProbs(model, score_from=prompt.shape[1])).attribute(
        to_pixels(image), target=None, additional_forward_args=(ids, torch.ones_like(ids)), intervention="paint",
        baselines=1.0, perturbations_per_eval=8, return_grid=True)  # white, as Captum paints
    assert_close_scaled(ours[0, -len(answer):].reshape(len(answer), -1), theirs)
