"""BLIP and LLaVA at an image size other than the trained one: the targets and the fusion methods
pass ``interpolate_pos_encoding`` on to the vision tower, and their maps (on the 6x5 grid of a
48x40 input) equal references computed here from the model's own forward and Captum's IG."""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients
from numerics import assert_close_scaled

from captum_vlm.adapters import get_adapter
from captum_vlm.attr import CrossAttentionGradCAM, TokenIntegratedGradients
from captum_vlm.targets import MatchLogit, TokenLogProbs

SIZE = (48, 40)
GRID = (SIZE[0] // tm.PATCH, SIZE[1] // tm.PATCH)
N = GRID[0] * GRID[1]


def eager_copy(model):
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin


def llava_ids():
    ids = torch.tensor([[tm.BOS, 9] + [tm.LLAVA_IMAGE_TOKEN] * N + [11, 12, 13]])
    return ids, torch.ones_like(ids)


def test_blip_caption_log_probs_at_another_size():
    model = tm.blip_caption()
    pixels = tm.pixels(2, *SIZE)
    ids, mask = tm.text_ids(2, 6)
    got = TokenLogProbs(model, interpolate_pos_encoding=True)(pixels, ids, mask)
    tokens = ids.clone()
    tokens[:, 0] = model.config.text_config.bos_token_id
    with torch.no_grad():
        logits = model(pixel_values=pixels, input_ids=tokens, attention_mask=mask, interpolate_pos_encoding=True).logits
    log_p = F.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0] * mask[:, 1:]
    torch.testing.assert_close(got[:, 1:], log_p)
    assert got[:, 0].abs().sum() == 0


def test_blip_vqa_log_probs_at_another_size():
    """The question encoder reads the interpolated tower's tokens; the decoder scores the answer."""
    model = tm.blip_vqa()
    pixels = tm.pixels(1, *SIZE)
    ids, mask = tm.text_ids(1, 6)
    answer, answer_mask = tm.text_ids(1, 4, seed=1)
    got = TokenLogProbs(model, interpolate_pos_encoding=True)(pixels, ids, mask, answer, answer_mask)
    with torch.no_grad():
        image = model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        assert image.shape[1] == 1 + N
        question = model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image).last_hidden_state
        tokens = answer.clone()
        tokens[:, 0] = model.config.text_config.bos_token_id
        logits = model.text_decoder(input_ids=tokens, attention_mask=answer_mask, encoder_hidden_states=question,
                                    encoder_attention_mask=mask).logits
    log_p = F.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0] * answer_mask[:, 1:]
    torch.testing.assert_close(got[:, 1:], log_p)


def test_blip_caption_ig_at_another_size_equals_captum_on_patch_embeddings():
    model = tm.blip_caption()
    pixels = tm.pixels(1, *SIZE)
    ids, mask = tm.text_ids(1, 6)
    target = TokenLogProbs(model, reduction="sum", interpolate_pos_encoding=True)
    ours = TokenIntegratedGradients(target).attribute(pixels, additional_forward_args=(ids, mask), n_steps=6,
                                                      return_grid=True)
    conv = get_adapter(model).patch_embedding()
    with torch.no_grad():
        embeds, start = conv(pixels), conv(torch.zeros_like(pixels))

    def on_embeddings(e):
        handle = conv.register_forward_hook(lambda m, a, o: e.clone())
        try:
            n = e.shape[0]
            return target(pixels.expand(n, -1, -1, -1), ids.expand(n, -1), mask.expand(n, -1))
        finally:
            handle.remove()

    expected = IntegratedGradients(on_embeddings).attribute(embeds, start, n_steps=6).sum(1)
    assert ours.shape == (1, *GRID)
    assert_close_scaled(ours, expected)


def test_blip_itm_gradcam_at_another_size_equals_reference():
    model = tm.blip_itm()
    ref = eager_copy(model)
    pixels = tm.pixels(1, *SIZE)
    ids, mask = tm.text_ids(1, 7)
    got = CrossAttentionGradCAM(model, layer=0, interpolate_pos_encoding=True).attribute_tokens(
        pixels, additional_forward_args=(ids, mask), return_grid=True)
    image = ref.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    text = ref.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image,
                            encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
                            output_attentions=True)
    itm = ref.itm_head(text.last_hidden_state[:, 0])
    score = (itm[:, 1] - itm[:, 0]).sum()
    cross = text.cross_attentions[0]
    grad = torch.autograd.grad(score, cross)[0]
    cam = (cross * grad.clamp(min=0)).mean(1)[..., 1:].reshape(1, ids.shape[1], *GRID)  # CLS column dropped
    assert got.shape == (1, ids.shape[1], *GRID)
    assert_close_scaled(got, cam * mask[:, :, None, None])
    torch.testing.assert_close(MatchLogit(model, interpolate_pos_encoding=True)(pixels, ids, mask), score[None].detach())


def test_llava_gradcam_at_another_size_equals_reference():
    model = tm.llava()
    ref = eager_copy(model)
    pixels = tm.pixels(1, *SIZE)
    ids, mask = llava_ids()
    scored = [ids.shape[1] - 2, ids.shape[1] - 1]
    got = CrossAttentionGradCAM(model, layer=0, interpolate_pos_encoding=True).attribute_tokens(
        pixels, target=scored, additional_forward_args=(ids, mask), return_grid=True)
    out = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels, interpolate_pos_encoding=True,
              output_attentions=True)
    log_p = F.log_softmax(out.logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    attention = out.attentions[0]
    text_rows = ids[0] != tm.LLAVA_IMAGE_TOKEN
    for t in scored:
        grad = torch.autograd.grad(log_p[:, t - 1].sum(), attention, retain_graph=True)[0]
        cam = (attention * grad.clamp(min=0)).mean(1)[:, text_rows][:, :, 2 : 2 + N]
        assert_close_scaled(got[:, t], cam.sum(1).reshape(1, *GRID))


@pytest.mark.parametrize("factory", [tm.paligemma, tm.gemma3])
def test_towers_that_take_only_their_trained_size_refuse_it(factory):
    model = factory()
    with pytest.raises(ValueError, match="interpolate_pos_encoding: .* takes only its trained image size"):
        TokenLogProbs(model, interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        CrossAttentionGradCAM(model, interpolate_pos_encoding=True)
    with pytest.raises(TypeError, match="interpolate_pos_encoding: expected a bool"):
        TokenLogProbs(tm.llava(), interpolate_pos_encoding="yes")
