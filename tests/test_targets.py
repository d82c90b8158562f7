"""Targets equal the model's own logits and log-probabilities; bad input gets clear errors."""

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from model_state import assert_unchanged, snapshot

from captum_vlm.targets import (
    AnswerLogits,
    ImageTextSimilarity,
    MatchLogit,
    TextImageSimilarity,
    TokenLogProbs,
)


@pytest.mark.parametrize("factory", [tm.clip, tm.siglip])
def test_similarity_equals_logits_per_image(factory):
    model = factory()
    pixels = tm.pixels(2)
    ids, mask = tm.text_ids(3, 8)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        got = ImageTextSimilarity(model)(pixels, ids, mask)
        mirror = TextImageSimilarity(model)(ids, pixels, mask)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, expected.logits_per_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mirror, expected.logits_per_text, atol=1e-5, rtol=1e-5)


def test_similarity_encodes_text_once():
    model = tm.clip()
    calls = []
    handle = model.text_model.register_forward_hook(lambda *a: calls.append(1))
    target = ImageTextSimilarity(model)
    ids, mask = tm.text_ids(4, 8)
    try:
        for seed in range(3):
            target(tm.pixels(1, seed=seed), ids, mask)
        assert len(calls) == 1
        target(tm.pixels(1), ids[:2], mask[:2])  # new prompts are encoded again
        assert len(calls) == 2
    finally:
        handle.remove()


def test_similarity_non_square_with_interpolation():
    model = tm.clip()
    pixels = tm.pixels(1, 32, 48)
    ids, mask = tm.text_ids(2, 6)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, interpolate_pos_encoding=True)
        got = ImageTextSimilarity(model, interpolate_pos_encoding=True)(pixels, ids, mask)
    torch.testing.assert_close(got, expected.logits_per_image, atol=1e-5, rtol=1e-5)


def test_blip_match_logit_is_itm_log_odds():
    model = tm.blip_itm()
    pixels = tm.pixels(2)
    ids, mask = tm.text_ids(2, 7)
    with torch.no_grad():
        score = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).itm_score
        got = MatchLogit(model)(pixels, ids, mask)
    probs = score.softmax(-1)[:, 1]
    torch.testing.assert_close(torch.sigmoid(got), probs, atol=1e-6, rtol=1e-5)


def test_vilt_match_and_answer_logits():
    itm, vqa = tm.vilt_itm(), tm.vilt_vqa()
    pixels = tm.pixels(2)
    ids, mask = tm.text_ids(2, 6)
    with torch.no_grad():
        torch.manual_seed(1)
        expected = itm(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, 0]
        torch.manual_seed(1)
        got = MatchLogit(itm)(pixels, ids, mask)
        expected_vqa = vqa(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got_vqa = AnswerLogits(vqa)(pixels, ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_vqa, expected_vqa, atol=1e-5, rtol=1e-5)
    assert got_vqa.shape == (2, 5)


def _reference_log_probs(logits, tokens, scored):
    """log p(tokens[t] | <t) from next-token logits, written out step by step."""
    batch, length = tokens.shape
    out = torch.zeros(batch, length)
    for b in range(batch):
        for t in range(1, length):
            if scored[b, t]:
                out[b, t] = F.log_softmax(logits[b, t - 1], dim=-1)[tokens[b, t]]
    return out


def test_caption_log_probs_equal_model_logits():
    model = tm.blip_caption()
    pixels = tm.pixels(2)
    ids, mask = tm.text_ids(2, 7)
    target = TokenLogProbs(model)
    with torch.no_grad():
        got = target(pixels, ids, mask)
        total = TokenLogProbs(model, reduction="sum")(pixels, ids, mask)
        tokens = ids.clone()
        tokens[:, 0] = model.config.text_config.bos_token_id
        logits = model(pixel_values=pixels, input_ids=tokens, attention_mask=mask).logits
    expected = _reference_log_probs(logits, tokens, mask.bool())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, expected.sum(1), atol=1e-5, rtol=1e-5)
    assert (got[1, 6] == 0) and (got[:, 0] == 0).all()  # padding and position 0 are not scored


def test_log_probs_keep_the_model_precision():
    """float64 stays float64 (half precision alone is lifted to float32 for the softmax)."""
    model = tm.blip_caption().double()
    pixels, (ids, mask) = tm.pixels(1).double(), tm.text_ids(1, 5)
    with torch.no_grad():
        got = TokenLogProbs(model)(pixels, ids, mask)
        tokens = ids.clone()
        tokens[:, 0] = model.config.text_config.bos_token_id
        logits = model(pixel_values=pixels, input_ids=tokens, attention_mask=mask).logits
    assert got.dtype == torch.float64  # (the model's own forward hands back float32 logits)
    torch.testing.assert_close(got, _reference_log_probs(logits, tokens, mask.bool()).double(), atol=1e-5, rtol=1e-5)


def test_vqa_answer_log_probs_follow_greedy_generation():
    model = tm.blip_vqa()
    pixels = tm.pixels(1)
    ids, mask = tm.text_ids(1, 6)
    with torch.no_grad():
        answer = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                                do_sample=False)
        logits, tokens, _ = TokenLogProbs(model).logits(pixels, ids, mask, answer)
        per_token = TokenLogProbs(model)(pixels, ids, mask, answer)
    # greedy decoding picked, at every step, the token our teacher-forced logits rank first
    assert torch.equal(logits[0, :-1].argmax(-1), answer[0, 1:])
    expected = _reference_log_probs(logits, tokens, torch.ones_like(tokens, dtype=torch.bool))
    torch.testing.assert_close(per_token, expected, atol=1e-5, rtol=1e-5)


def test_llava_log_probs_skip_image_tokens():
    model = tm.llava()
    pixels = tm.pixels(1)
    ids = torch.tensor([[tm.BOS, 9] + [tm.LLAVA_IMAGE_TOKEN] * 16 + [11, 12, 13]])
    with torch.no_grad():
        got = TokenLogProbs(model, score_from=18)(pixels, ids)
        logits = model(input_ids=ids, pixel_values=pixels).logits
    scored = torch.zeros_like(ids, dtype=torch.bool)
    scored[0, 18:] = True
    torch.testing.assert_close(got, _reference_log_probs(logits, ids, scored), atol=1e-5, rtol=1e-5)
    assert (got[0, :18] == 0).all() and (got[0, 18:] < 0).all()


def test_targets_leave_model_unchanged():
    model = tm.blip_caption()
    before = snapshot(model)
    ids, mask = tm.text_ids(1, 6)
    pixels = tm.pixels(1).requires_grad_()
    TokenLogProbs(model, reduction="sum")(pixels, ids, mask).sum().backward()
    assert pixels.grad is not None
    # parameters received gradients from this plain backward; targets add no hooks or modes
    for p in model.parameters():
        p.grad = None
    assert_unchanged(model, before)


@pytest.mark.parametrize("call, error, match", [
    (lambda m: ImageTextSimilarity(m)(torch.zeros(3, 32, 32), *tm.text_ids(2, 5)), ValueError,
     "pixel_values: expected 4 dimensions"),
    (lambda m: ImageTextSimilarity(m)(torch.zeros(1, 4, 32, 32), *tm.text_ids(2, 5)), ValueError,
     "pixel_values: expected 3 colour channels"),
    (lambda m: ImageTextSimilarity(m)(tm.pixels(1), torch.zeros(0, 5, dtype=torch.long)), ValueError,
     "input_ids: the prompt list is empty"),
    (lambda m: ImageTextSimilarity(m)(tm.pixels(1), *tm.text_ids(2, 30)), ValueError,
     "input_ids: texts are 30 tokens long but the model takes at most 24"),
    (lambda m: ImageTextSimilarity(m)(tm.pixels(1), torch.zeros(2, 5)), TypeError,
     "input_ids: expected integer token ids"),
    (lambda m: ImageTextSimilarity(m)(tm.pixels(1), tm.text_ids(2, 5)[0], torch.ones(2, 4)), ValueError,
     "attention_mask: shape"),
])
def test_bad_two_tower_input(call, error, match):
    with pytest.raises(error, match=match):
        call(tm.clip())


def test_bad_fusion_input():
    model = tm.blip_itm()
    with pytest.raises(ValueError, match="batch sizes disagree: pixel_values has 2, input_ids has 3"):
        MatchLogit(model)(tm.pixels(2), *tm.text_ids(3, 5))
    with pytest.raises(TypeError, match="MatchLogit supports"):
        MatchLogit(tm.clip())
    with pytest.raises(TypeError, match="two-tower"):
        ImageTextSimilarity(model)
    with pytest.raises(ValueError, match="reduction"):
        TokenLogProbs(tm.blip_caption(), reduction="mean")
    with pytest.raises(ValueError, match="answer_ids"):
        TokenLogProbs(tm.blip_vqa())(tm.pixels(1), *tm.text_ids(1, 5))
