"""Logit lens against references computed here from ``output_hidden_states`` on tiny models."""

import numpy as np
import pytest
import tiny_models as tm
import torch
from model_state import assert_unchanged, snapshot
from numerics import assert_close_scaled

from captum_vlm.adapters import get_adapter
from captum_vlm.lens.logit_lens import (
    LogitLens,
    logit_lens,
    logit_lens_from_inputs,
    logit_lens_scored,
    mean_rank_per_layer,
)
from captum_vlm.viz.lens_inside import plot_word_map

N_IMAGE = (tm.IMAGE_SIZE // tm.PATCH) ** 2


def _llava_ids():
    ids = torch.tensor([[tm.BOS] + [tm.LLAVA_IMAGE_TOKEN] * N_IMAGE + [5, 6, 7]])
    return ids, torch.ones_like(ids)


def _reference_probs(model, pixels, ids, mask, lens):
    """Per-layer next-token probabilities at the lensed positions, from output_hidden_states."""
    adapter = get_adapter(model)
    answer = lens.produced_ids[None]
    with torch.no_grad():
        if hasattr(model, "text_encoder"):  # VQA: question encoder, then the answer decoder
            image = model.vision_model(pixel_values=pixels).last_hidden_state
            question = model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image).last_hidden_state
            tokens = torch.cat([torch.tensor([[tm.BOS]]), answer], 1)
            hidden = model.text_decoder(input_ids=tokens, encoder_hidden_states=question,
                                        encoder_attention_mask=mask, output_hidden_states=True).hidden_states
            states = [model.text_decoder.cls(h) for h in hidden]
        elif hasattr(model, "text_decoder"):  # captioning: the prompt without its final token
            tokens = torch.cat([ids[:, :-1], answer], 1)
            tokens[:, 0] = tm.BOS
            image = model.vision_model(pixel_values=pixels).last_hidden_state
            hidden = model.text_decoder(input_ids=tokens, encoder_hidden_states=image,
                                        output_hidden_states=True).hidden_states
            states = [model.text_decoder.cls(h) for h in hidden]
        else:  # LLaVA: hidden_states' last entry is already normed
            tokens = torch.cat([ids, answer], 1)
            hidden = model(pixel_values=pixels, input_ids=tokens, output_hidden_states=True).hidden_states
            norm, head = adapter.final_norm(), adapter.lm_head()
            states = [head(norm(h)) for h in hidden[:-1]] + [head(hidden[-1])]
            logits = model(pixel_values=pixels, input_ids=tokens).logits
            torch.testing.assert_close(states[-1], logits)
    return torch.stack([torch.softmax(s[0, lens.positions], -1) for s in states]), tokens[0]


CASES = {
    "blip_vqa": lambda: (tm.blip_vqa(), *tm.text_ids(1, 6)),
    "blip_caption": lambda: (tm.blip_caption(), *tm.text_ids(1, 6)),
    "llava": lambda: (tm.llava(), *_llava_ids()),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_layer_equals_reference_and_last_layer_is_the_model(name):
    model, ids, mask = CASES[name]()
    pixels = tm.pixels(1)
    before = snapshot(model)
    lens = logit_lens_from_inputs(model, pixels, ids, mask, k=4)
    assert_unchanged(model, before)
    probs, tokens = _reference_probs(model, pixels, ids, mask, lens)
    assert torch.equal(lens.sequence, tokens)
    assert lens.top_ids.shape == (len(get_adapter(model).decoder_blocks()) + 1, len(lens.positions), 4)
    values, ids_ref = probs.topk(4, dim=-1)
    assert_close_scaled(lens.top_probs, values)
    assert torch.equal(lens.top_ids, ids_ref)
    picked = probs.gather(2, lens.produced_ids[None, :, None].expand(probs.shape[0], -1, 1))[..., 0]
    assert_close_scaled(lens.produced_probs, picked)
    ranks = 1 + (probs > picked[..., None]).sum(-1)
    assert torch.equal(lens.produced_ranks, ranks)
    entropy = -(probs * probs.log()).sum(-1)
    assert_close_scaled(lens.entropy, entropy)
    # the greedy answer is what the last layer ranks first
    assert torch.equal(lens.top_ids[-1, :, 0], lens.produced_ids)
    assert (lens.produced_ranks[-1] == 1).all()
    assert mean_rank_per_layer([lens, lens])[-1] == 1.0


def test_given_answer_is_lensed_not_generated():
    model, ids, mask = CASES["blip_vqa"]()
    answer = torch.tensor([[7, 8, 9]])
    lens = logit_lens_from_inputs(model, tm.pixels(1), ids, mask, answer_ids=answer, k=3)
    assert lens.produced_ids.tolist() == [7, 8, 9]
    probs, _ = _reference_probs(model, tm.pixels(1), ids, mask, lens)
    assert_close_scaled(lens.produced_probs, probs[:, torch.arange(3), torch.tensor([7, 8, 9])])


def test_llava_image_tokens_and_word_map():
    model, ids, mask = CASES["llava"]()
    pixels = tm.pixels(1)
    lens = logit_lens_from_inputs(model, pixels, ids, mask, k=3, words=[5, 11])
    assert lens.image_grid == (4, 4)
    adapter = get_adapter(model)
    tokens = torch.cat([ids, lens.produced_ids[None]], 1)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, input_ids=tokens, output_hidden_states=True).hidden_states
        layer = 1
        probs = torch.softmax(adapter.lm_head()(adapter.final_norm()(hidden[layer][0, 1 : 1 + N_IMAGE])), -1)
    assert_close_scaled(lens.word_map("11", layer), probs[:, 11].reshape(4, 4))
    assert torch.equal(lens.image_top_ids[layer], probs.topk(3, -1).indices)
    fig = plot_word_map(lens.word_map("11", layer), "11", layer, image=np.zeros((32, 32, 3)))
    assert "image tokens" in fig.axes[1].get_title() and "11" in fig.axes[1].get_title()
    with pytest.raises(KeyError, match="word"):
        lens.word_map("12")
    with pytest.raises(ValueError, match="layer"):
        lens.word_map("5", layer=3)


class _Tokenizer:
    """A word-per-token stand-in with the two calls the lens makes."""

    def __call__(self, text, add_special_tokens=True, **kwargs):
        return {"input_ids": [10 + len(w) for w in text.split()]}

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]


class _Processor:
    tokenizer = _Tokenizer()

    def __call__(self, images=None, text=None, return_tensors=None):
        ids, mask = tm.text_ids(1, 6)
        return {"pixel_values": tm.pixels(1), "input_ids": ids, "attention_mask": mask}


def test_processor_level_call_and_figure():
    model = tm.blip_vqa()
    lens = logit_lens(model, _Processor(), None, "what?", answer="ab cde", k=2)
    assert isinstance(lens, LogitLens)
    assert lens.produced_ids.tolist() == [12, 13]
    assert lens.produced_tokens == ["t12", "t13"]
    fig = lens.plot()
    assert "logit lens" in fig.axes[0].get_title()


def test_two_tower_model_is_refused_naming_decoder_classes():
    with pytest.raises(TypeError, match="BlipForQuestionAnswering.*LlavaForConditionalGeneration"):
        logit_lens_from_inputs(tm.clip(), tm.pixels(1), *tm.text_ids(1, 6))
    with pytest.raises(TypeError, match="BlipForImageTextRetrieval has none"):
        logit_lens(tm.blip_itm(), _Processor(), None, "a")


def test_misuse_errors_name_the_argument():
    model, ids, mask = CASES["blip_vqa"]()
    with pytest.raises(ValueError, match="^k:"):
        logit_lens_from_inputs(model, tm.pixels(1), ids, mask, k=0)
    with pytest.raises(ValueError, match="one text per image"):
        logit_lens_from_inputs(model, tm.pixels(2), *tm.text_ids(3, 6))
    with pytest.raises(ValueError, match="words"):
        logit_lens_from_inputs(model, tm.pixels(1), ids, mask, words=[5])
    with pytest.raises(ValueError, match="words.*outside"):
        logit_lens_from_inputs(tm.llava(), tm.pixels(1), *_llava_ids(), words=[10_000])
    with pytest.raises(TypeError, match="text"):
        logit_lens(model, _Processor(), None, ["a", 3])
    with pytest.raises(ValueError, match="image, text"):
        logit_lens(model, _Processor(), [None, None], ["a", "b", "c"])
    with pytest.raises(ValueError, match="answer"):
        logit_lens(model, _Processor(), [None, None], "a", answer=["x"])
    with pytest.raises(ValueError, match="answer_ids"):
        logit_lens_from_inputs(model, tm.pixels(2), *tm.text_ids(2, 6), answer_ids=[torch.tensor([5])])
    with pytest.raises(ValueError, match="starts"):
        logit_lens_scored(model, tm.pixels(1), [(ids, mask, torch.tensor([[1, 5]]))], [2])


def _llava_batch():
    rows = [[tm.BOS] + [tm.LLAVA_IMAGE_TOKEN] * N_IMAGE + words for words in ([5, 6, 7], [8], [9, 10, 11, 12])]
    length = max(map(len, rows))
    ids = torch.tensor([r + [tm.PAD] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    return ids, mask


BATCHES = {
    "blip_vqa": lambda: (tm.blip_vqa(), *tm.text_ids(3, 7)),
    "blip_caption": lambda: (tm.blip_caption(), *tm.text_ids(3, 7)),
    "llava": lambda: (tm.llava(), *_llava_batch()),
}


def _assert_same_lens(got: LogitLens, want: LogitLens):
    for name in ("top_ids", "produced_ids", "produced_ranks", "positions", "sequence"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for name in ("top_probs", "produced_probs", "entropy"):
        assert_close_scaled(getattr(got, name), getattr(want, name))
    assert got.top_tokens == want.top_tokens and got.produced_tokens == want.produced_tokens
    if want.image_top_ids is not None:
        assert torch.equal(got.image_top_ids, want.image_top_ids)
        assert torch.equal(got.image_positions, want.image_positions)
        assert_close_scaled(got.image_top_probs, want.image_top_probs)
        assert got.word_maps.keys() == want.word_maps.keys()
        for word in want.word_maps:
            assert_close_scaled(got.word_maps[word], want.word_maps[word])


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_batched_equals_one_by_one(name):
    """Rows of different prompt and answer lengths, two per forward (a padded batch and a rest)."""
    model, ids, mask = BATCHES[name]()
    pixels = tm.pixels(3, seed=1)
    words = [5, 11] if name == "llava" else []
    answers = [torch.tensor([7, 8, 9]), torch.tensor([4]), torch.tensor([10, 11])]
    before = snapshot(model)
    for given in (None, answers):
        batched = logit_lens_from_inputs(model, pixels, ids, mask, answer_ids=given, k=3, words=words, batch_size=2)
        assert isinstance(batched, list) and len(batched) == 3
        for b in range(3):
            row = ids[b : b + 1, mask[b].bool()]
            alone = logit_lens_from_inputs(model, pixels[b : b + 1], row, answer_ids=None if given is None else given[b],
                                           k=3, words=words)
            _assert_same_lens(batched[b], alone)
        if given is not None:
            assert [lens.produced_ids.tolist() for lens in batched] == [a.tolist() for a in answers]
    assert_unchanged(model, before)
    # rows of one forward (LLaVA, captions: rows 0, 1; VQA: the equal-length questions 0, 2) differ
    # in length, so the batch really was padded
    together = (0, 2) if name == "blip_vqa" else (0, 1)
    assert len(batched[together[0]].sequence) != len(batched[together[1]].sequence)


def test_processor_level_batch_broadcasts_one_image_over_texts():
    model = tm.blip_vqa()
    lenses = logit_lens(model, _Processor(), None, ["what?", "which?"], answer=["ab cde", "abc"], k=2)
    assert [lens.produced_ids.tolist() for lens in lenses] == [[12, 13], [13]]
    alone = logit_lens(model, _Processor(), None, "which?", answer="abc", k=2)
    _assert_same_lens(lenses[1], alone)
