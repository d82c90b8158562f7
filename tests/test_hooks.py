"""Scoped capture: same numbers as ``output_attentions=True`` on an eager model, and the model
left exactly as found, also when the body raises."""

import copy

import pytest
import tiny_models as tm
import torch
from model_state import assert_unchanged, snapshot

from captum_vlm.adapters import get_adapter
from captum_vlm.hooks import capture, eager_attention, preserved_model_state


def eager_copy(model):
    other = copy.deepcopy(model)
    other.set_attn_implementation("eager")
    return other


def test_clip_capture_equals_eager_output_attentions():
    model = tm.clip()
    assert model.config.vision_config._attn_implementation == "sdpa"
    reference = eager_copy(model)
    pixels = tm.pixels(2)
    ids, mask = tm.text_ids(2, 8)
    adapter = get_adapter(model)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_attentions=True)
        with capture(model, attentions=adapter.vision_attentions() + adapter.text_attentions()) as rec:
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    got_vision, got_text = rec.attentions[:2], rec.attentions[2:]
    for got, want in zip(got_vision, expected.vision_model_output.attentions):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for got, want in zip(got_text, expected.text_model_output.attentions):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_capture_gradients_match_autograd():
    """The recorded gradient of each attention map is d(score)/dA, checked against autograd
    through an eager model's returned attentions."""
    model = tm.clip()
    reference = eager_copy(model)
    pixels = tm.pixels(1)
    adapter = get_adapter(model)
    with capture(model, attentions=adapter.vision_attentions()) as rec:
        score = model.get_image_features(pixel_values=pixels.clone().requires_grad_()).pooler_output.sum()
        score.backward()
    out = reference.vision_model(pixel_values=pixels.clone().requires_grad_(), output_attentions=True)
    score_ref = reference.visual_projection(out.pooler_output).sum()
    grads_ref = torch.autograd.grad(score_ref, out.attentions)
    for got, want in zip(rec.attention_grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_siglip_and_llava_capture_equal_eager():
    for factory in (tm.siglip, tm.llava):
        model = factory()
        reference = eager_copy(model)
        adapter = get_adapter(model)
        pixels = tm.pixels(1)
        if factory is tm.llava:
            ids = torch.tensor([[tm.BOS] + [tm.LLAVA_IMAGE_TOKEN] * 16 + [9, 10]])
            kwargs = dict(input_ids=ids, pixel_values=pixels)
            mods = adapter.text_attentions()
        else:
            ids, mask = tm.text_ids(1, 6)
            kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            mods = adapter.vision_attentions()
        with torch.no_grad():
            out = reference(**kwargs, output_attentions=True)
            with capture(model, attentions=mods) as rec:
                model(**kwargs)
        want = out.attentions if factory is tm.llava else out.vision_model_output.attentions
        for got, expected in zip(rec.attentions, want):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_blip_cross_attention_capture_equals_output_attentions():
    model = tm.blip_itm()
    adapter = get_adapter(model)
    pixels = tm.pixels(2)
    ids, mask = tm.text_ids(2, 7)
    with torch.no_grad():
        image = model.vision_model(pixel_values=pixels).last_hidden_state
        expected = model.text_encoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
            output_attentions=True,
        ).cross_attentions
        with capture(model, attentions=adapter.cross_attentions()) as rec:
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert len(expected) == len(rec.attentions) == 2
    for got, want in zip(rec.attentions, expected):
        assert got.shape == (2, tm.HEADS, 7, 17)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_vilt_capture_asks_for_attentions():
    model = tm.vilt_vqa()
    adapter = get_adapter(model)
    pixels = tm.pixels(1)
    ids, mask = tm.text_ids(1, 6)
    torch.manual_seed(0)  # ViLT samples its patch order
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_attentions=True).attentions
        torch.manual_seed(0)
        with capture(model, attentions=adapter.vision_attentions()) as rec:
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    for got, want in zip(rec.attentions, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_block_inputs_and_outputs_are_hidden_states():
    model = tm.clip()
    adapter = get_adapter(model)
    pixels = tm.pixels(1)
    with torch.no_grad():
        states = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        with capture(model, blocks=adapter.vision_blocks()) as rec:
            model.vision_model(pixel_values=pixels)
    torch.testing.assert_close(rec.block_inputs[0], states[0])
    torch.testing.assert_close(rec.block_outputs[0], states[1])
    torch.testing.assert_close(rec.block_inputs[1], states[1])
    torch.testing.assert_close(rec.block_outputs[1], states[2])


def test_sdpa_and_eager_loaded_models_capture_the_same():
    model = tm.clip()
    eager = eager_copy(model)
    adapter, adapter_eager = get_adapter(model), get_adapter(eager)
    pixels = tm.pixels(1)
    with torch.no_grad():
        with capture(model, attentions=adapter.vision_attentions()) as a:
            model.vision_model(pixel_values=pixels)
        with capture(eager, attentions=adapter_eager.vision_attentions()) as b:
            eager.vision_model(pixel_values=pixels)
    for x, y in zip(a.attentions, b.attentions):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_model_unchanged_after_capture_that_raises():
    model = tm.clip()
    model.text_model.train()  # an unusual mix of modes must come back as it was
    model.visual_projection.weight.requires_grad_(False)
    before = snapshot(model)
    adapter = get_adapter(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, attentions=adapter.vision_attentions(), blocks=adapter.vision_blocks(),
                     freeze_parameters=True):
            assert model.config.vision_config._attn_implementation == "eager"
            assert not any(p.requires_grad for p in model.parameters())
            model.eval()
            model.vision_model.register_forward_hook(lambda *a: None)  # a stray hook left inside
            model.vision_model(pixel_values=tm.pixels(1))
            raise RuntimeError("boom")
    assert_unchanged(model, before)
    assert model.text_model.training and not model.vision_model.training


def test_preserved_state_restores_grads():
    model = tm.clip()
    before = snapshot(model)
    with preserved_model_state(model):
        model.get_image_features(pixel_values=tm.pixels(1)).pooler_output.sum().backward()
        assert model.visual_projection.weight.grad is not None
    assert_unchanged(model, before)


def test_eager_attention_switches_and_restores():
    model = tm.llava()
    impls = {id(c): c._attn_implementation for c in (model.config, model.config.text_config, model.config.vision_config)}
    with eager_attention(model):
        assert model.config.text_config._attn_implementation == "eager"
        assert model.config.vision_config._attn_implementation == "eager"
    assert impls == {
        id(c): c._attn_implementation for c in (model.config, model.config.text_config, model.config.vision_config)
    }


def test_missing_gradient_is_a_clear_error():
    model = tm.clip()
    with capture(model, attentions=get_adapter(model).vision_attentions()) as rec:
        with torch.no_grad():
            model.vision_model(pixel_values=tm.pixels(1))
    with pytest.raises(RuntimeError, match="no gradient reached attention module 0"):
        _ = rec.attention_grads


def test_transformers_output_recording_hooks_come_back_usable():
    """LLaVA reads its vision features from hidden states that transformers records with hooks it
    installs on first use; a scope that removes them must let transformers install them again."""
    model = tm.llava()
    reference = copy.deepcopy(model)
    ids = torch.tensor([[tm.BOS] + [tm.LLAVA_IMAGE_TOKEN] * 16 + [9, 10]])
    pixels = tm.pixels(1)
    before = snapshot(model)
    with torch.no_grad():
        with preserved_model_state(model):
            model(input_ids=ids, pixel_values=pixels)  # first forward: hooks installed here
        assert_unchanged(model, before)
        after = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
        expected = reference(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(after.logits, expected.logits)
    assert len(after.hidden_states) == len(expected.hidden_states) == 3



def test_preserved_model_state_restores_the_tensors_a_forward_caches():
    """A forward that caches a tensor on a module (as Qwen-VL's rope_deltas) is undone: the very
    object found before is put back, a None stays None; other attributes are left alone."""
    import torch
    from torch import nn

    from captum_vlm.hooks import preserved_model_state

    class Caching(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)
            self.deltas = None
            self.seen = torch.zeros(1)
            self.calls = 0

        def forward(self, x):
            self.deltas, self.seen, self.calls = x.sum(), x.mean(), self.calls + 1
            return self.linear(x)

    model = Caching()
    seen = model.seen
    with preserved_model_state(model):
        model(torch.ones(1, 2))
        assert model.deltas is not None
    assert model.deltas is None and model.seen is seen and model.calls == 1
