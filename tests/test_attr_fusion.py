"""Fusion-model methods (cross-attention Grad-CAM, bi-modal relevancy) against references computed
here from an eager copy's returned attentions and torch.autograd, plus the library conventions."""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from captum.attr import Attribution, NoiseTunnel
from model_state import assert_unchanged, snapshot
from numerics import assert_close_scaled

from captum_vlm.adapters import get_adapter
from captum_vlm.attr import BimodalRelevancy, CrossAttentionGradCAM
from captum_vlm.attr._base import upsample_grid
from captum_vlm.attr.bimodal_relevancy import normalised_self_relevancy
from captum_vlm.attr.cross_attention_gradcam import default_layer

GRID = (tm.IMAGE_SIZE // tm.PATCH,) * 2


@pytest.fixture(scope="module")
def blip_itm():
    return tm.blip_itm()


@pytest.fixture(scope="module")
def vilt_vqa():
    return tm.vilt_vqa()


def eager_copy(model):
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin


def cam(attention, grad):
    """ALBEF's map, by hand: mean over heads of A * relu(dA) -> [B, Q, K]."""
    return (attention * torch.relu(grad)).mean(1)


def a_bar(attention, grad):
    return (attention * grad).clamp(min=0).mean(1)


def blip_image_grid(values):
    """[..., 1 + 16] image columns (CLS first) to the 4x4 grid."""
    return values[..., 1:].reshape(*values.shape[:-1], *GRID)


def llava_ids(batch=2, prompt=(9, 10, 11, 12)):
    row = [tm.BOS] + [tm.LLAVA_IMAGE_TOKEN] * (GRID[0] * GRID[1]) + list(prompt)
    ids = torch.tensor([row] * batch)
    return ids, torch.ones_like(ids)


def blip_itm_reference(model, pixels, ids, mask):
    """Eager BLIP ITM forward with graph: (log-odds [B], vision, text self- and cross-attentions)."""
    pixels = pixels.clone().requires_grad_(True)
    vision = model.vision_model(pixel_values=pixels, output_attentions=True)
    image = vision.last_hidden_state
    text = model.text_encoder(
        input_ids=ids,
        attention_mask=mask,
        encoder_hidden_states=image,
        encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
        output_attentions=True,
    )
    itm = model.itm_head(text.last_hidden_state[:, 0])
    return itm[:, 1] - itm[:, 0], vision.attentions, text.attentions, text.cross_attentions


# ----- Grad-CAM against references ----------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, None])
def test_blip_itm_gradcam_equals_reference(blip_itm, layer):
    pixels = tm.pixels(2)
    ids, mask = tm.text_ids(2, 7)  # row 1 is padded
    ref = eager_copy(blip_itm)
    score, _, _, cross = blip_itm_reference(ref, pixels, ids, mask)
    chosen = 0  # layer 0 given, or the default: the middle layer but never the last for ITM
    grad = torch.autograd.grad(score.sum(), cross[chosen])[0]
    rows = blip_image_grid(cam(cross[chosen], grad)) * mask[:, :, None, None]  # [B, T, 4, 4]
    whole = rows.sum(1) / mask.sum(1)[:, None, None]

    method = CrossAttentionGradCAM(blip_itm, layer=layer)
    per_token = method.attribute_tokens(pixels, additional_forward_args=(ids, mask), return_grid=True)
    grid = method.attribute(pixels, additional_forward_args=(ids, mask), return_grid=True)
    heat = method.attribute(pixels, additional_forward_args=(ids, mask))
    assert per_token.shape == (2, 7, *GRID) and grid.shape == (2, *GRID) and heat.shape == pixels.shape
    assert per_token.abs().sum() > 0
    assert_close_scaled(per_token, rows)
    assert_close_scaled(grid, whole)
    assert_close_scaled(heat, upsample_grid(whole, (32, 32), (tm.PATCH, tm.PATCH)))
    assert isinstance(method, Attribution)


def test_generated_caption_maps_equal_teacher_forced():
    """Greedy generation, then each token's map computed step by step on its prefix (as at
    generation time) equals the map from one teacher-forced pass over the generated ids."""
    model = tm.blip_caption()
    ref = eager_copy(model)
    pixels = tm.pixels(2)
    with torch.no_grad():
        generated = model.generate(pixel_values=pixels, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 5) and (generated[:, 0] == tm.BOS).all()
    mask = torch.ones_like(generated)
    layer = 1
    expected = torch.zeros(2, 5, *GRID)
    for t in range(1, 5):
        image = ref.vision_model(pixel_values=pixels.clone().requires_grad_(True)).last_hidden_state
        out = ref.text_decoder(
            input_ids=generated[:, :t],
            attention_mask=mask[:, :t],
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
            output_attentions=True,
        )
        log_p = F.log_softmax(out.logits[:, -1], dim=-1).gather(1, generated[:, t, None]).sum()
        attention = out.cross_attentions[layer]
        grad = torch.autograd.grad(log_p, attention)[0]
        expected[:, t] = blip_image_grid(cam(attention, grad).sum(1))
    method = CrossAttentionGradCAM(model, layer=layer)
    got = method.attribute_tokens(pixels, additional_forward_args=(generated, mask), return_grid=True)
    assert_close_scaled(got, expected)
    whole = method.attribute(pixels, additional_forward_args=(generated, mask), return_grid=True)
    assert_close_scaled(whole, expected[:, 1:].mean(1))
    picked = method.attribute_tokens(pixels, target=[2, -1], additional_forward_args=(generated, mask), return_grid=True)
    assert_close_scaled(picked[:, [2, 4]], expected[:, [2, 4]])
    assert picked[:, [0, 1, 3]].abs().sum() == 0


def blip_vqa_reference(model, pixels, question, q_mask, answer, a_mask):
    """Eager BLIP VQA forward with graph: (log p of answer tokens 1.. [B, Ta - 1], vision, question
    self/cross and answer self/cross attentions)."""
    vision = model.vision_model(pixel_values=pixels.clone().requires_grad_(True), output_attentions=True)
    image = vision.last_hidden_state
    encoded = model.text_encoder(
        input_ids=question, attention_mask=q_mask, encoder_hidden_states=image,
        encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long), output_attentions=True,
    )
    tokens = answer.clone()
    tokens[:, 0] = tm.BOS
    out = model.text_decoder(
        input_ids=tokens, attention_mask=a_mask, encoder_hidden_states=encoded.last_hidden_state,
        encoder_attention_mask=q_mask, output_attentions=True,
    )
    log_p = F.log_softmax(out.logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    return log_p, vision.attentions, encoded.attentions, encoded.cross_attentions, out.attentions, out.cross_attentions


def test_blip_vqa_answer_tokens_equal_reference():
    model = tm.blip_vqa()
    pixels = tm.pixels(1)
    question, q_mask = tm.text_ids(1, 6)
    answer, a_mask = tm.text_ids(1, 4, seed=3)
    layer = 0
    log_p, _, _, cross, _, _ = blip_vqa_reference(eager_copy(model), pixels, question, q_mask, answer, a_mask)
    got = CrossAttentionGradCAM(model, layer=layer).attribute_tokens(
        pixels, additional_forward_args=(question, q_mask, answer, a_mask), return_grid=True
    )
    assert got.shape == (1, 4, *GRID)
    for t in (1, 2, 3):
        grad = torch.autograd.grad(log_p[:, t - 1].sum(), cross[layer], retain_graph=True)[0]
        assert_close_scaled(got[:, t], blip_image_grid(cam(cross[layer], grad).sum(1)))


def vilt_reference(model, pixels, ids, mask, answer, seed):
    """Eager ViLT VQA forward (patch order drawn from ``seed``) with its patch index."""
    adapter = get_adapter(model)
    torch.manual_seed(seed)
    with adapter.recorded_patch_index() as calls:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels.clone().requires_grad_(True),
                    output_attentions=True)
    score = out.logits.gather(1, answer[:, None]).sum()
    return score, out.attentions, calls[-1]


def scatter_by_hand(values, patch_index):
    """[B, R, P] values of image tokens 1..P to [B, R, 4, 4] using each token's (row, col)."""
    out = torch.zeros(*values.shape[:2], *GRID)
    for b in range(values.shape[0]):
        for p, (r, c) in enumerate(patch_index[b].tolist()):
            out[b, :, r, c] += values[b, :, p]
    return out


def test_vilt_recorded_patch_index_is_a_permutation_and_restored(vilt_vqa):
    adapter = get_adapter(vilt_vqa)
    ids, mask = tm.text_ids(2, 5)
    with adapter.recorded_patch_index() as calls:
        with torch.no_grad():
            vilt_vqa(input_ids=ids, attention_mask=mask, pixel_values=tm.pixels(2))
    assert "visual_embed" not in vars(vilt_vqa.vilt.embeddings)
    assert len(calls) == 1 and calls[0].shape == (2, 16, 2)
    order = calls[0][..., 0] * GRID[1] + calls[0][..., 1]
    assert torch.equal(order.sort(dim=1).values, torch.arange(16).expand(2, 16))  # every patch once
    assert not torch.equal(order, torch.arange(16).expand(2, 16))  # ViLT really shuffles them


def test_vilt_gradcam_equals_reference_and_ignores_patch_shuffle(vilt_vqa):
    pixels = tm.pixels(2)
    ids, mask = tm.text_ids(2, 5)
    answer = torch.tensor([1, 3])
    score, attentions, patch_index = vilt_reference(vilt_vqa, pixels, ids, mask, answer, seed=0)
    layer = 0
    grad = torch.autograd.grad(score, attentions[layer])[0]
    rows = cam(attentions[layer], grad)[:, :5, 5 + 1 :]  # text rows, patch columns (after image CLS)
    expected = scatter_by_hand(rows, patch_index) * mask[:, :, None, None]
    method = CrossAttentionGradCAM(vilt_vqa, layer=layer)
    torch.manual_seed(0)
    got = method.attribute_tokens(pixels, target=answer, additional_forward_args=(ids, mask), return_grid=True)
    assert_close_scaled(got, expected)
    # another draw of the patch order gives the same map once each token is put back in place
    torch.manual_seed(1)
    again = method.attribute_tokens(pixels, target=answer, additional_forward_args=(ids, mask), return_grid=True)
    assert_close_scaled(again, got)


def test_llava_sdpa_equals_eager_and_reference():
    model = tm.llava()
    assert model.config.text_config._attn_implementation == "sdpa"
    ref = eager_copy(model)
    pixels = tm.pixels(2)
    ids, mask = llava_ids()
    layer = 0  # image rows get gradient here (not at the last layer), so leaving them out matters
    got = CrossAttentionGradCAM(model, layer=layer).attribute_tokens(
        pixels, target=[18, 19, 20], additional_forward_args=(ids, mask), return_grid=True
    )
    got_eager = CrossAttentionGradCAM(ref, layer=layer).attribute_tokens(
        pixels, target=[18, 19, 20], additional_forward_args=(ids, mask), return_grid=True
    )
    assert_close_scaled(got, got_eager)
    assert model.config.text_config._attn_implementation == "sdpa"
    out = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels.clone().requires_grad_(True), output_attentions=True)
    log_p = F.log_softmax(out.logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    attention = out.attentions[layer]
    text_rows = ids[0] != tm.LLAVA_IMAGE_TOKEN
    for t in (18, 19, 20):
        grad = torch.autograd.grad(log_p[:, t - 1].sum(), attention, retain_graph=True)[0]
        per_row = cam(attention, grad)[:, text_rows][:, :, 1:17]  # text rows over the 16 image tokens
        assert_close_scaled(got[:, t], per_row.sum(1).reshape(2, *GRID))
    assert got[:, t].abs().sum() > 0


# ----- bi-modal relevancy against references -----------------------------------------------------
def relevancy_blip_by_hand(vision, text_self, cross, grads_v, grads_s, grads_c, use_vision=True):
    """Rules 6, 7 and 10 of Chefer et al. (2021) for one example, plain matrices."""
    n, t = cross[0].shape[-1], cross[0].shape[-2]
    r_ii = torch.eye(n)
    if use_vision:
        for a, g in zip(vision, grads_v):
            r_ii = r_ii + a_bar(a, g)[0] @ r_ii

    def bar(r):
        hat = r - torch.eye(r.shape[0])
        return hat / hat.sum(-1, keepdim=True).clamp_min(1e-12) + torch.eye(r.shape[0])

    r_tt, r_ti = torch.eye(t), torch.zeros(t, n)
    for a_s, g_s, a_c, g_c in zip(text_self, grads_s, cross, grads_c):
        s = a_bar(a_s, g_s)[0]
        r_tt, r_ti = r_tt + s @ r_tt, r_ti + s @ r_ti
        r_ti = r_ti + bar(r_tt).T @ a_bar(a_c, g_c)[0] @ bar(r_ii)
    return r_ti


@pytest.mark.parametrize("image_relevancy", ["vision", "identity"])
def test_blip_itm_relevancy_equals_reference(blip_itm, image_relevancy):
    pixels = tm.pixels(1)
    ids, mask = tm.text_ids(1, 6)
    ref = eager_copy(blip_itm)
    score, vision, text_self, cross = blip_itm_reference(ref, pixels, ids, mask)
    grads = torch.autograd.grad(score.sum(), [*vision, *text_self, *cross])
    gv, gs, gc = grads[:2], grads[2:4], grads[4:]
    r_ti = relevancy_blip_by_hand(vision, text_self, cross, gv, gs, gc, image_relevancy == "vision")
    method = BimodalRelevancy(blip_itm, image_relevancy=image_relevancy)
    per_token = method.attribute_tokens(pixels, additional_forward_args=(ids, mask), return_grid=True)
    whole = method.attribute(pixels, additional_forward_args=(ids, mask), return_grid=True)
    assert_close_scaled(per_token[0], blip_image_grid(r_ti))
    assert_close_scaled(whole[0], blip_image_grid(r_ti[0]))  # CLS row


def test_caption_relevancy_reads_the_predicting_row():
    """Token t of a caption: the rules under the gradient of log p(token t), row t - 1."""
    model = tm.blip_caption()
    ref = eager_copy(model)
    pixels = tm.pixels(1)
    ids, mask = tm.text_ids(1, 5)
    ids[:, 0] = tm.BOS
    vision = ref.vision_model(pixel_values=pixels.clone().requires_grad_(True), output_attentions=True)
    image = vision.last_hidden_state
    out = ref.text_decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image,
                           encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
                           output_attentions=True)
    log_p = F.log_softmax(out.logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    got = BimodalRelevancy(model).attribute_tokens(pixels, additional_forward_args=(ids, mask), return_grid=True)
    recorded = [*vision.attentions, *out.attentions, *out.cross_attentions]
    for t in range(1, 5):
        grads = torch.autograd.grad(log_p[:, t - 1].sum(), recorded, retain_graph=True)
        r_ti = relevancy_blip_by_hand(vision.attentions, out.attentions, out.cross_attentions,
                                      grads[:2], grads[2:4], grads[4:])
        assert_close_scaled(got[0, t], blip_image_grid(r_ti[t - 1]))
    assert got[0, 0].abs().sum() == 0


def test_blip_vqa_relevancy_chains_answer_through_question():
    """Answer token t: the question encoder's R_qi as for ITM, then the answer decoder's rules 6-7
    and rule 10 with R_qi as the keys' relevancy, read at row t - 1."""
    model = tm.blip_vqa()
    pixels = tm.pixels(1)
    question, q_mask = tm.text_ids(1, 6)
    answer, a_mask = tm.text_ids(1, 4, seed=3)
    log_p, vision, q_self, q_cross, a_self, a_cross = blip_vqa_reference(
        eager_copy(model), pixels, question, q_mask, answer, a_mask
    )
    got = BimodalRelevancy(model).attribute_tokens(pixels, additional_forward_args=(question, q_mask, answer, a_mask),
                                                   return_grid=True)
    whole = BimodalRelevancy(model).attribute(pixels, target=[1, 3],
                                              additional_forward_args=(question, q_mask, answer, a_mask), return_grid=True)
    recorded = [*vision, *q_self, *q_cross, *a_self, *a_cross]
    eye = torch.eye(answer.shape[1])
    by_hand = []
    for t in (1, 2, 3):
        grads = torch.autograd.grad(log_p[:, t - 1].sum(), recorded, retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads[6:8])  # the answer's self-attention matters
        r_qi = relevancy_blip_by_hand(vision, q_self, q_cross, grads[:2], grads[2:4], grads[4:6])
        r_aa, r_ai = eye.clone(), torch.zeros(answer.shape[1], r_qi.shape[-1])
        for a_s, g_s, a_c, g_c in zip(a_self, grads[6:8], a_cross, grads[8:]):
            s = a_bar(a_s, g_s)[0]
            r_aa, r_ai = r_aa + s @ r_aa, r_ai + s @ r_ai
            hat = r_aa - eye
            r_aa_bar = hat / hat.sum(-1, keepdim=True).clamp_min(1e-12) + eye
            r_ai = r_ai + r_aa_bar.T @ a_bar(a_c, g_c)[0] @ r_qi
        by_hand.append(blip_image_grid(r_ai[t - 1]))
        assert_close_scaled(got[0, t], by_hand[-1])
    assert got[0, 0].abs().sum() == 0
    assert_close_scaled(whole[0], (by_hand[0] + by_hand[2]) / 2)


def test_llava_relevancy_equals_joint_rule():
    model = tm.llava()
    ref = eager_copy(model)
    pixels = tm.pixels(1)
    ids, mask = llava_ids(1)
    out = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels.clone().requires_grad_(True),
              output_attentions=True)
    log_p = F.log_softmax(out.logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    got = BimodalRelevancy(model).attribute_tokens(pixels, target=[19, 20], additional_forward_args=(ids, mask),
                                                   return_grid=True)
    for t in (19, 20):
        grads = torch.autograd.grad(log_p[:, t - 1].sum(), out.attentions, retain_graph=True)
        r = torch.eye(ids.shape[1])
        for a, g in zip(out.attentions, grads):
            r = r + a_bar(a, g)[0] @ r
        assert_close_scaled(got[0, t], r[t - 1, 1:17].reshape(GRID))


def test_vilt_relevancy_equals_joint_self_attention_rule(vilt_vqa):
    pixels = tm.pixels(1)
    ids, mask = tm.text_ids(1, 5)
    answer = torch.tensor([2])
    score, attentions, patch_index = vilt_reference(vilt_vqa, pixels, ids, mask, answer, seed=3)
    grads = torch.autograd.grad(score, attentions)
    r = torch.eye(attentions[0].shape[-1])
    for a, g in zip(attentions, grads):
        r = r + a_bar(a, g)[0] @ r
    expected = scatter_by_hand(r[None, :5, 6:], patch_index)
    torch.manual_seed(3)
    got = BimodalRelevancy(vilt_vqa).attribute_tokens(pixels, target=2, additional_forward_args=(ids, mask),
                                                      return_grid=True)
    assert_close_scaled(got, expected)
    torch.manual_seed(4)
    whole = BimodalRelevancy(vilt_vqa).attribute(pixels, target=2, additional_forward_args=(ids, mask), return_grid=True)
    assert_close_scaled(whole, expected[:, 0])


def test_default_layer():
    assert [default_layer(n, "match") for n in (1, 2, 3, 4, 12)] == [0, 0, 1, 2, 6]
    assert [default_layer(n, "tokens") for n in (1, 2, 3, 4, 12)] == [0, 1, 1, 2, 6]
    assert CrossAttentionGradCAM(tm.blip_caption()).layer == 1


def test_normalised_self_relevancy():
    r = torch.tensor([[[2.0, 3.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 2.0]]])
    expected = torch.tensor([[[1.25, 0.75, 0.0], [0.0, 1.0, 0.0], [1 / 3, 1 / 3, 4 / 3]]])
    torch.testing.assert_close(normalised_self_relevancy(r), expected)


# ----- conventions ------------------------------------------------------------------------------
@pytest.mark.parametrize("method_class", [CrossAttentionGradCAM, BimodalRelevancy])
def test_batched_equals_one_by_one(blip_itm, vilt_vqa, method_class):
    pixels = tm.pixels(2)
    ids, mask = tm.text_ids(2, 6)
    blip = method_class(blip_itm)
    batched = blip.attribute_tokens(pixels, additional_forward_args=(ids, mask), return_grid=True)
    for i in range(2):
        single = blip.attribute_tokens(pixels[i : i + 1], additional_forward_args=(ids[i : i + 1], mask[i : i + 1]),
                                       return_grid=True)
        assert_close_scaled(batched[i : i + 1], single)
    vilt = method_class(vilt_vqa)
    batched = vilt.attribute(pixels, target=[4, 0], additional_forward_args=(ids, mask), return_grid=True)
    for i, answer in enumerate([4, 0]):
        single = vilt.attribute(pixels[i : i + 1], target=answer,
                                additional_forward_args=(ids[i : i + 1], mask[i : i + 1]), return_grid=True)
        assert_close_scaled(batched[i : i + 1], single)
    vqa = method_class(tm.blip_vqa())
    answer, a_mask = tm.text_ids(2, 4, seed=3)
    args = (ids, mask, answer, a_mask)
    batched = vqa.attribute_tokens(pixels, additional_forward_args=args, return_grid=True)
    for i in range(2):
        single = vqa.attribute_tokens(pixels[i : i + 1], additional_forward_args=tuple(a[i : i + 1] for a in args),
                                      return_grid=True)
        assert_close_scaled(batched[i : i + 1], single)


@pytest.mark.parametrize("method_class", [CrossAttentionGradCAM, BimodalRelevancy])
def test_noise_tunnel_wraps_the_methods(vilt_vqa, method_class):
    pixels = tm.pixels(2)
    ids, mask = tm.text_ids(2, 6)
    method = method_class(vilt_vqa)
    plain = method.attribute(pixels, target=[1, 2], additional_forward_args=(ids, mask))
    smooth = NoiseTunnel(method).attribute(pixels, nt_samples=2, stdevs=0.0, target=[1, 2],
                                           additional_forward_args=(ids, mask))
    assert_close_scaled(smooth, plain)


def test_word_merging_is_the_mean_of_sub_token_maps(blip_itm):
    pixels = tm.pixels(2)
    ids, mask = tm.text_ids(2, 6)
    method = CrossAttentionGradCAM(blip_itm, layer=0)
    tokens = method.attribute_tokens(pixels, additional_forward_args=(ids, mask), return_grid=True)
    word_ids = [None, 0, 0, 1, 2, None]
    words = method.attribute_tokens(pixels, additional_forward_args=(ids, mask), word_ids=word_ids, return_grid=True)
    assert words.shape == (2, 3, *GRID)
    assert_close_scaled(words[:, 0], tokens[:, 1:3].mean(1))
    assert_close_scaled(words[:, 2], tokens[:, 4])
    groups = method.attribute_tokens(pixels, additional_forward_args=(ids, mask), token_groups=[[1, 2], [3, 4]],
                                     return_grid=True)
    assert_close_scaled(groups[:, 0], words[:, 0])
    assert_close_scaled(groups[:, 1], tokens[:, 3:5].mean(1))
    per_example = method.attribute_tokens(pixels, additional_forward_args=(ids, mask),
                                          word_ids=[word_ids, [None, 0, 1, 1, 1, None]], return_grid=True)
    assert_close_scaled(per_example[1, 1], tokens[1, 2:5].mean(0))
    assert per_example[1, 2].abs().sum() == 0  # example 1 has two words
    pixel_words = method.attribute_tokens(pixels, additional_forward_args=(ids, mask), word_ids=word_ids)
    assert pixel_words.shape == (2, 3, 3, 32, 32)


@pytest.mark.parametrize("method_class", [CrossAttentionGradCAM, BimodalRelevancy])
@pytest.mark.parametrize("factory", [tm.blip_caption, tm.blip_vqa, tm.vilt_itm, tm.llava])
def test_model_unchanged_also_when_raising(method_class, factory, monkeypatch):
    model = factory()
    model.vision_model.train() if factory is tm.blip_caption else model.train()  # an unusual mode must survive
    before = snapshot(model)
    ids, mask = llava_ids(1) if factory is tm.llava else tm.text_ids(1, 5)
    args = (ids, mask, *tm.text_ids(1, 3, seed=3)) if factory is tm.blip_vqa else (ids, mask)
    method = method_class(model)
    heat = method.attribute(tm.pixels(1), target=[1, 2] if factory is tm.blip_vqa else None,
                            additional_forward_args=args)
    assert heat.shape == (1, 3, 32, 32) and torch.isfinite(heat).all() and heat.abs().sum() > 0
    assert_unchanged(model, before)
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    adapter = get_adapter(model)
    failing = adapter.answer_self_attentions()[-1] if factory is tm.blip_vqa else adapter.text_blocks()[-1]
    with monkeypatch.context() as patch:  # fail inside the forward, after the hooks are in place
        patch.setattr(failing, "forward", boom)
        with pytest.raises(RuntimeError, match="boom"):
            method.attribute(tm.pixels(1), additional_forward_args=args)
    assert_unchanged(model, before)
    if factory is tm.vilt_itm:
        assert "visual_embed" not in vars(model.vilt.embeddings)
    extra = {"decoder_input_ids": args[2]} if factory is tm.blip_vqa else {}
    with torch.no_grad():  # the model still runs as before (transformers' own hooks intact)
        model.eval()(input_ids=ids, attention_mask=mask, pixel_values=tm.pixels(1), **extra)


def test_bad_arguments_name_the_argument(blip_itm, vilt_vqa):
    pixels = tm.pixels(1)
    ids, mask = tm.text_ids(1, 6)
    args = (ids, mask)
    with pytest.raises(TypeError, match="model"):
        CrossAttentionGradCAM(tm.clip())
    with pytest.raises(ValueError, match="layer"):
        CrossAttentionGradCAM(blip_itm, layer=2)
    with pytest.raises(TypeError, match="layer"):
        CrossAttentionGradCAM(blip_itm, layer=[0, 1])
    with pytest.raises(ValueError, match="image_relevancy"):
        BimodalRelevancy(blip_itm, image_relevancy="text")
    with pytest.raises(ValueError, match="image_relevancy"):
        BimodalRelevancy(vilt_vqa, image_relevancy="vision")
    method = CrossAttentionGradCAM(blip_itm)
    with pytest.raises(ValueError, match="target: .*target=None"):
        method.attribute(pixels, target=0, additional_forward_args=args)
    with pytest.raises(TypeError, match="additional_forward_args"):
        method.attribute(pixels, additional_forward_args=None)
    with pytest.raises(ValueError, match="inputs"):
        method.attribute(pixels[0], additional_forward_args=args)
    with pytest.raises(ValueError, match="batch sizes disagree"):
        method.attribute(tm.pixels(2), additional_forward_args=args)
    with pytest.raises(ValueError, match="upsample"):
        method.attribute(pixels, additional_forward_args=args, upsample="cubic")
    with pytest.raises(ValueError, match="word_ids: 3 entries for 6 tokens"):
        method.attribute_tokens(pixels, additional_forward_args=args, word_ids=[0, 1, 2])
    with pytest.raises(ValueError, match="word_ids, token_groups"):
        method.attribute_tokens(pixels, additional_forward_args=args, word_ids=[0] * 6, token_groups=[[1]])
    with pytest.raises(ValueError, match="token_groups"):
        method.attribute_tokens(pixels, additional_forward_args=args, token_groups=[[1, 9]])
    vilt = CrossAttentionGradCAM(vilt_vqa)
    with pytest.raises(ValueError, match="target: say which answer"):
        vilt.attribute(pixels, additional_forward_args=args)
    with pytest.raises(ValueError, match="target: answer id 5 is out of range for 5 answers"):
        vilt.attribute(pixels, target=5, additional_forward_args=args)
    caption = CrossAttentionGradCAM(tm.blip_caption())
    with pytest.raises(ValueError, match="target: position 0 has no prediction"):
        caption.attribute(pixels, target=0, additional_forward_args=args)
    with pytest.raises(TypeError, match="target"):
        caption.attribute(pixels, target=1.5, additional_forward_args=args)
    with pytest.raises(ValueError, match="answer_ids"):
        CrossAttentionGradCAM(tm.blip_vqa()).attribute(pixels, additional_forward_args=args)


def test_progress_bar_over_tokens_only_when_asked(capsys):
    model = tm.blip_caption()
    pixels, (ids, mask) = tm.pixels(1), tm.text_ids(1, 5)
    method = BimodalRelevancy(model)
    quiet = method.attribute_tokens(pixels, additional_forward_args=(ids, mask), return_grid=True)
    assert "BimodalRelevancy" not in capsys.readouterr().err
    shown = method.attribute_tokens(pixels, additional_forward_args=(ids, mask), return_grid=True, show_progress=True)
    err = capsys.readouterr().err
    assert "BimodalRelevancy" in err and "0/4" in err  # positions 1..4 of the caption, one backward each
    torch.testing.assert_close(shown, quiet, atol=0, rtol=0)


@pytest.mark.parametrize("method_class", [CrossAttentionGradCAM, BimodalRelevancy])
def test_attribute_with_tokens_equals_both_calls(blip_itm, method_class):
    pixels, (ids, mask) = tm.pixels(2), tm.text_ids(2, 6)
    method = method_class(blip_itm)
    word_ids = [None, 0, 0, 1, 2, None]
    whole, words = method.attribute_with_tokens(pixels, additional_forward_args=(ids, mask), word_ids=word_ids)
    assert_close_scaled(whole, method.attribute(pixels, additional_forward_args=(ids, mask)))
    assert_close_scaled(words, method.attribute_tokens(pixels, additional_forward_args=(ids, mask), word_ids=word_ids))
    assert whole.shape == (2, 3, 32, 32) and words.shape == (2, 3, 3, 32, 32)
