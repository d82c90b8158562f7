"""Adapter facts checked against what the real transformers models compute."""

import pytest
import tiny_models as tm
import torch
from torch import nn

from captum_vlm.adapters import VLMAdapter, get_adapter, register_adapter, supported_model_classes
from captum_vlm.adapters.base import _REGISTRY

FACTORIES = tm.FACTORIES
FAMILY = {
    "CLIPModel": "clip",
    "SiglipModel": "siglip",
    "BlipForImageTextRetrieval": "blip",
    "BlipForConditionalGeneration": "blip",
    "BlipForQuestionAnswering": "blip",
    "ViltForQuestionAnswering": "vilt",
    "ViltForImageAndTextRetrieval": "vilt",
    "LlavaForConditionalGeneration": "llava",
    "Qwen2_5_VLForConditionalGeneration": "qwen-vl",
    "Qwen2VLForConditionalGeneration": "qwen-vl",
    "Blip2ForConditionalGeneration": "blip2",
    "InstructBlipForConditionalGeneration": "instructblip",
    "PaliGemmaForConditionalGeneration": "paligemma",
    "Gemma3ForConditionalGeneration": "gemma3",
    "LlavaNextForConditionalGeneration": "llava-next",
    "LlavaOnevisionForConditionalGeneration": "llava-next",
    "Siglip2Model": "siglip2",
    "Idefics3ForConditionalGeneration": "idefics3",
    "SmolVLMForConditionalGeneration": "idefics3",
}


@pytest.fixture(scope="module", params=list(FACTORIES))
def model(request):
    return FACTORIES[request.param]()


def test_registry_picks_family(model):
    adapter = get_adapter(model)
    assert adapter.family == FAMILY[type(model).__name__]
    assert adapter.model is model
    assert get_adapter(adapter) is adapter
    assert set(FACTORIES) <= set(supported_model_classes())


def test_unsupported_model_lists_supported_classes():
    with pytest.raises(TypeError) as err:
        get_adapter(nn.Linear(2, 2))
    message = str(err.value)
    assert "Linear" in message and "CLIPModel" in message and "register_adapter" in message
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        get_adapter("clip")


def test_custom_adapter_registration():
    class Toy(nn.Module):
        pass

    @register_adapter
    class ToyAdapter(VLMAdapter):
        family = "toy"
        model_classes = ("Toy",)

    try:
        assert isinstance(get_adapter(Toy()), ToyAdapter)
    finally:
        del _REGISTRY["Toy"]
    with pytest.raises(ValueError, match="model_classes"):
        register_adapter(type("Empty", (VLMAdapter,), {}))


def _vision_tokens(model, pixel_values):
    """Length of the vision sequence the model really produces for these pixels."""
    name = type(model).__name__
    if name.startswith("Vilt"):
        ids, mask = tm.text_ids(pixel_values.shape[0], 6)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[-1].shape[1] - ids.shape[1]
    adapter = get_adapter(model)
    if adapter.family == "llava-next":  # the canvas's tiles (the base view and each tile's CLS left out)
        tiles = adapter.model_inputs(pixel_values)["pixel_values"][0, 1:]
        out = adapter.vision_model()(pixel_values=tiles)
        return (out.last_hidden_state.shape[1] - adapter.num_prefix_tokens) * tiles.shape[0] + adapter.num_prefix_tokens
    if adapter.family == "qwen-vl":  # flattened patches in, one merged token per 2x2 patches out
        inputs = adapter.model_inputs(pixel_values)
        out = adapter.vision_model()(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        return out.pooler_output.shape[0]
    if adapter.family == "idefics3":  # every view's patches (a one-tile canvas: the image alone)
        views = adapter.model_inputs(pixel_values)["pixel_values"].flatten(0, 1)
        return adapter.vision_model()(pixel_values=views).last_hidden_state.shape[1] * views.shape[0]
    out = adapter.vision_outputs(pixel_values, interpolate_pos_encoding=True)  # SigLIP 2: its NaFlex patches
    return out.last_hidden_state.shape[1]


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_patch_grid_matches_real_sequence(model, size):
    """The grid's cells times the patches each pools are the vision tower's patch tokens. A
    tower whose image tokens pool patches (Gemma 3) runs at its trained size only
    (tests/test_family_gemma3.py checks the refusal)."""
    adapter = get_adapter(model)
    kh, kw = adapter.patches_per_cell
    if (kh, kw) != (1, 1):
        size = (tm.IMAGE_SIZE, tm.IMAGE_SIZE)
    if adapter.family == "llava-next":  # a tile canvas of one of the grid pinpoints
        size = (size[0] // 2, size[1] // 2)
    patch = tm.IDEFICS_PATCH if adapter.family == "idefics3" else tm.PATCH  # its 2x2 patches: one 8-px token
    pixels = tm.pixels(1, *size)
    rows, cols = adapter.patch_grid(pixels)
    assert (rows * kh, cols * kw) == (size[0] // patch, size[1] // patch)
    assert adapter.patch_size() == (patch * kh, patch * kw)
    with torch.no_grad():
        n_tokens = _vision_tokens(model, pixels)
    assert n_tokens == adapter.num_prefix_tokens + rows * kh * cols * kw


def test_prefix_tokens():
    assert get_adapter(tm.clip()).num_prefix_tokens == 1
    assert get_adapter(tm.siglip()).num_prefix_tokens == 0
    assert get_adapter(tm.blip_itm()).num_prefix_tokens == 1
    assert get_adapter(tm.llava()).num_prefix_tokens == 1


def test_clip_pooled_position_is_models_pooling():
    model = tm.clip()
    ids, mask = tm.text_ids(3, 9)
    out = model.text_model(input_ids=ids, attention_mask=mask)
    pos = get_adapter(model).pooled_text_position(ids, mask)
    assert pos.tolist() == [8, 7, 8]  # the EOS of each row
    picked = out.last_hidden_state[torch.arange(3), pos]
    torch.testing.assert_close(picked, out.pooler_output)


def test_clip_missing_eos_is_a_clear_error():
    model = tm.clip()
    ids = torch.full((2, 5), 7)
    with pytest.raises(ValueError, match="input_ids: rows \\[0, 1\\] hold no EOS"):
        get_adapter(model).pooled_text_position(ids)


def test_siglip_pooled_position_is_models_pooling():
    model = tm.siglip()
    ids, mask = tm.text_ids(2, 7)
    out = model.text_model(input_ids=ids, attention_mask=mask)
    pos = get_adapter(model).pooled_text_position(ids, mask)
    assert pos.tolist() == [6, 6]
    picked = model.text_model.head(out.last_hidden_state[torch.arange(2), pos])
    torch.testing.assert_close(picked, out.pooler_output)


def test_blip_pooled_position_is_itm_input():
    model = tm.blip_itm()
    ids, mask = tm.text_ids(2, 7)
    pixels = tm.pixels(2)
    adapter = get_adapter(model)
    with torch.no_grad():
        image = model.vision_model(pixel_values=pixels).last_hidden_state
        text = model.text_encoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
        ).last_hidden_state
        pos = adapter.pooled_text_position(ids, mask)
        score = model.itm_head(text[torch.arange(2), pos])
        expected = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).itm_score
    torch.testing.assert_close(score, expected)
    assert len(adapter.cross_attentions()) == 2


def test_llava_image_positions_and_pooling():
    model = tm.llava()
    adapter = get_adapter(model)
    ids = torch.tensor([[tm.BOS, 9] + [tm.LLAVA_IMAGE_TOKEN] * 16 + [11, 12, tm.PAD]])
    mask = (ids != tm.PAD).long()
    positions = adapter.image_token_positions(ids)
    assert positions.sum() == 16 and positions[0, 2:18].all()
    assert adapter.pooled_text_position(ids, mask).tolist() == [19]
    # the number of image tokens the model needs is the patch grid of its vision tower
    rows, cols = adapter.patch_grid(tm.pixels(1))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=tm.pixels(1))  # raises on a count mismatch
    assert rows * cols == 16


def test_vilt_image_sequence_start():
    adapter = get_adapter(tm.vilt_itm())
    ids, _ = tm.text_ids(1, 6)
    assert adapter.image_sequence_start(ids) == 6
    assert adapter.cross_attentions() == adapter.vision_attentions()


def test_text_embedding_is_the_models_input_embedding(model):
    adapter = get_adapter(model)
    embedding = adapter.text_embedding()
    assert isinstance(embedding, nn.Embedding)
    assert embedding.num_embeddings == tm.VOCAB


@pytest.mark.parametrize("bad, error, match", [
    (torch.zeros(3, 32, 32), ValueError, "pixel_values: expected 4 dimensions"),
    (torch.zeros(1, 1, 32, 32), ValueError, "pixel_values: expected 3 colour channels"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.long), TypeError, "floating-point"),
    ([[0.0]], TypeError, "pixel_values: expected a torch.Tensor"),
    (torch.zeros(1, 3, 32, 7), ValueError, r"pixel_values: image \(32, 7\) is smaller than one 8x8 patch"),
])
def test_patch_grid_rejects_bad_pixels(bad, error, match):
    with pytest.raises(error, match=match):
        get_adapter(tm.clip()).patch_grid(bad)


def test_methods_reject_an_image_smaller_than_a_patch():
    from captum_vlm.attr import (
        CausalOcclusion,
        CrossAttentionGradCAM,
        GradECLIP,
        TokenIntegratedGradients,
    )

    tiny = torch.zeros(1, 3, 7, 7)
    args = tm.text_ids(1, 5)
    for method in (GradECLIP(tm.clip()), TokenIntegratedGradients(tm.clip()), CausalOcclusion(tm.clip()),
                   CrossAttentionGradCAM(tm.blip_itm())):
        with pytest.raises(ValueError, match="smaller than one 8x8 patch"):
            method.attribute(tiny, target=None if isinstance(method, CrossAttentionGradCAM) else 0,
                             additional_forward_args=args)
