"""SigLIP 2 (NaFlex): the processor's padded patches as one image tensor and back, the patch
layout found by planting a feature, Grad-ECLIP / raw attention / rollout / relevancy / IG /
occlusion against references computed here on the processor's *own* padded inputs (eager
attentions, autograd, the padding token masked out), and ``explain`` / the CLI on prompts.

The processor is the real ``Siglip2Processor`` with its PIL image processor at 8-pixel patches and
at most 16 patches (a 40 x 64 image becomes 24 x 40 = 3 x 5 patches, one padding patch), and the
zoo's word tokenizer; the test subclass only changes the class's call defaults (patch size, patch
budget, text length) to the tiny model's.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from ig_refs import embedding_path_integral
from model_state import assert_unchanged, snapshot
from numerics import assert_close_scaled
from PIL import Image
from transformers import Siglip2Processor
from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

from captum_vlm.adapters import get_adapter
from captum_vlm.attr import (
    AttentionRollout,
    CausalOcclusion,
    GradECLIP,
    GradientWeightedRelevancy,
    PatchWordSimilarity,
    RawAttention,
    TokenIntegratedGradients,
)
from captum_vlm.explain import explain
from captum_vlm.zoo.processing import build_tokenizer

PROMPTS = ["a red circle", "a blue square", "a green circle"]
GRID, REAL = (3, 5), 15  # the processor's grid for the 40 x 64 image, and its real (unpadded) patches


class TinySiglip2Processor(Siglip2Processor):
    """``Siglip2Processor`` whose call defaults fit the tiny model (8-pixel patches, 16 at most,
    12 text tokens)."""

    text_kwargs = {"padding": "max_length", "truncation": True, "max_length": 12}
    images_kwargs = {"max_num_patches": 16, "patch_size": tm.PATCH}


@pytest.fixture(scope="module")
def processor():
    image_processor = Siglip2ImageProcessorPil(patch_size=tm.PATCH, max_num_patches=16)
    return TinySiglip2Processor(image_processor=image_processor, tokenizer=build_tokenizer(24))


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return tm.siglip2()


@pytest.fixture(scope="module")
def raw(processor, image):
    found = processor(images=image, text=PROMPTS, return_tensors="pt")
    assert found["spatial_shapes"].tolist() == [list(GRID)] and found["pixel_attention_mask"].sum() == REAL
    assert found["pixel_values"].shape == (1, 16, 3 * tm.PATCH ** 2)  # padded to the budget
    return found


def eager_copy(model):
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin


def image_kwargs(raw):
    return {k: raw[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}


# ----- the processor's image inputs ------------------------------------------------------------
def test_processor_inputs_are_the_processed_image_exactly(model, raw):
    adapter = get_adapter(model)
    inputs = adapter.processor_inputs(raw)
    pixels = inputs["pixel_values"]
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    assert pixels.shape == (1, 3, 24, 40) and adapter.patch_grid(pixels) == GRID
    kwargs = adapter.model_inputs(pixels, inputs["input_ids"], inputs["attention_mask"])
    assert torch.equal(kwargs["pixel_values"], raw["pixel_values"][:, :REAL])  # the real patches, unpadded
    assert torch.equal(kwargs["spatial_shapes"], raw["spatial_shapes"])
    assert kwargs["pixel_attention_mask"].shape == (1, REAL) and bool(kwargs["pixel_attention_mask"].all())
    # patch (0, 1): the image's pixels rows 0..7, columns 8..15, flattened channels last
    assert torch.equal(pixels[0, :, :8, 8:16], raw["pixel_values"][0, 1].reshape(8, 8, 3).permute(2, 0, 1))
    with torch.no_grad():
        ours, theirs = model(**kwargs).logits_per_image, model(**raw).logits_per_image
    assert_close_scaled(ours, theirs)  # no padding token here, the padded one masked there


def test_processor_inputs_refuse_what_is_not_one_grid(model, processor, image):
    adapter = get_adapter(model)
    tall = image.resize((24, 64))
    mixed = processor(images=[image, tall], text=PROMPTS[:2], return_tensors="pt")
    with pytest.raises(ValueError, match="must share one patch grid"):
        adapter.processor_inputs(mixed)
    with pytest.raises(ValueError, match="spatial_shapes"):
        adapter.processor_inputs({"pixel_values": torch.zeros(1, 3, 32, 32)})
    with pytest.raises(ValueError, match="values per patch"):
        adapter.processor_inputs({"pixel_values": torch.zeros(1, 16, 7), "spatial_shapes": torch.tensor([[4, 4]])})


# ----- the layout, by planting a feature ---------------------------------------------------------
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
@pytest.mark.parametrize("cell", [(0, 0), (1, 2), (2, 3)])
def test_layout_finds_a_planted_patch(model, size, cell):
    """With the vision attention silenced (each token then stays itself through the tower), a
    change to one patch's pixels changes exactly one output token, and the layout maps it back to
    that patch: patchify's order and the grid from spatial_shapes are read right."""
    adapter = get_adapter(model)
    pixels = tm.pixels(2, *size)
    silence = [block.self_attn.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), *out[1:]))
               for block in adapter.vision_blocks()]
    try:
        with torch.no_grad(), adapter.image_layout(pixels) as layout:
            before = adapter.vision_outputs(pixels).last_hidden_state
            changed = pixels.clone()
            r, c = cell
            changed[:, :, r * tm.PATCH : (r + 1) * tm.PATCH, c * tm.PATCH : (c + 1) * tm.PATCH] += 1.0
            after = adapter.vision_outputs(changed).last_hidden_state
    finally:
        for handle in silence:
            handle.remove()
    marked = ((after - before).abs().amax(-1) > 1e-6).float()
    assert marked.sum() == 2  # one token per example
    grid = (size[0] // tm.PATCH, size[1] // tm.PATCH)
    expected = torch.zeros(2, *grid)
    expected[:, r, c] = 1.0
    assert torch.equal(layout().to_grid(marked[:, None])[:, 0], expected)


# ----- references on the processor's own (padded) inputs -----------------------------------------
def split_heads(t, heads):
    b, n, d = t.shape
    return t.reshape(b, n, heads, d // heads).transpose(1, 2)


def head_by_hand(model, raw, heads=None):
    """The attention-pooling head run by hand on the padded tower output, the padding key masked."""
    head = model.vision_model.head
    with torch.no_grad():
        x = model.vision_model(**image_kwargs(raw)).last_hidden_state
    mha = head.attention
    d = mha.embed_dim
    w, bias = mha.in_proj_weight, mha.in_proj_bias
    q = head.probe.expand(x.shape[0], 1, d) @ w[:d].T + bias[:d]
    k = x @ w[d : 2 * d].T + bias[d : 2 * d]
    v = x @ w[2 * d :].T + bias[2 * d :]
    heads = heads or mha.num_heads
    scores = split_heads(q, heads) @ split_heads(k, heads).transpose(-1, -2) / (d // heads) ** 0.5
    padding = ~raw["pixel_attention_mask"].bool()
    probs = scores.masked_fill(padding[:, None, None, :], float("-inf")).softmax(-1)
    o = (probs @ split_heads(v, heads)).transpose(1, 2).reshape(q.shape)
    y = o @ mha.out_proj.weight.T + mha.out_proj.bias
    y = y + head.mlp(head.layernorm(y))
    return y[:, 0], dict(q=q, k=k, v=v, o=o, probs=probs)


def text_embeds(model, raw):
    with torch.no_grad():
        return model.get_text_features(input_ids=raw["input_ids"], attention_mask=raw["attention_mask"]).pooler_output


def pixels_of(model, raw):
    return get_adapter(model).processor_inputs(raw)["pixel_values"]


def args_of(raw):
    return raw["input_ids"], raw["attention_mask"]


def test_grad_eclip_equals_reference(model, raw):
    got = GradECLIP(model).attribute_prompts(pixels_of(model, raw), additional_forward_args=args_of(raw),
                                             return_grid=True)[0]
    image, r = head_by_hand(model, raw)
    with torch.no_grad():
        torch.testing.assert_close(image, model.get_image_features(**image_kwargs(raw)).pooler_output)
    cosines = F.normalize(image, dim=-1) @ F.normalize(text_embeds(model, raw), dim=-1).T
    cos = F.cosine_similarity(r["q"], r["k"], dim=-1)[0, :REAL]
    lam = (cos - cos.min()) / (cos.max() - cos.min())
    compared = 0
    for k in range(len(PROMPTS)):
        (g,) = torch.autograd.grad(cosines[0, k], [r["o"]], retain_graph=True)
        want = torch.relu((g * r["v"]).sum(-1)[0, :REAL] * lam).reshape(GRID)
        if want.abs().max() == 0:  # a prompt whose gradient is negative everywhere
            assert got[k].abs().max() == 0
            continue
        assert_close_scaled(got[k], want)
        compared += 1
    assert compared


def _head_attention(model, raw, target):
    image, r = head_by_hand(model, raw)
    logits = model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text_embeds(model, raw), dim=-1).T
    (grad,) = torch.autograd.grad((logits + model.logit_bias)[0, target], [r["probs"]])
    return r["probs"].detach(), grad


def test_raw_attention_equals_reference(model, raw):
    got = RawAttention(model, head_fusion="grad").attribute(pixels_of(model, raw), target=2,
                                                             additional_forward_args=args_of(raw), return_grid=True)
    probs, grad = _head_attention(model, raw, 2)
    want = (grad * probs)[0, :, 0, :REAL].clamp(min=0).mean(0)
    assert_close_scaled(got[0], want.reshape(GRID))


def test_rollout_and_relevancy_equal_references(model, raw):
    pixels, args = pixels_of(model, raw), args_of(raw)
    rollout = AttentionRollout(model).attribute(pixels, target=0, additional_forward_args=args, return_grid=True)
    relevancy = GradientWeightedRelevancy(model).attribute(pixels, target=1, additional_forward_args=args,
                                                           return_grid=True)
    twin = eager_copy(model)
    out = twin(**raw, output_attentions=True)
    attentions = out.vision_model_output.attentions
    assert attentions[0].shape[-1] == 16  # the padded sequence
    eye = torch.eye(16)
    a0, a1 = [((a.mean(1) + eye) / (a.mean(1) + eye).sum(-1, keepdim=True)).detach() for a in attentions]
    probs, _ = _head_attention(model, raw, 0)
    assert_close_scaled(rollout[0], (probs.mean(1) @ a1 @ a0)[0, 0, :REAL].reshape(GRID))
    grads = torch.autograd.grad(out.logits_per_image[0, 1], attentions)
    r = torch.eye(16)[None]
    for a, g in zip(attentions, grads):
        r = r + (g * a).clamp(min=0).mean(1) @ r
    probs, grad = _head_attention(model, raw, 1)
    want = ((grad * probs).clamp(min=0).mean(1) @ r)[0, 0, :REAL]
    assert_close_scaled(relevancy[0], want.reshape(GRID))


def test_patch_word_similarity_equals_reference(model, raw):
    words = PatchWordSimilarity(model).attribute_words(pixels_of(model, raw), target=0,
                                                       additional_forward_args=args_of(raw), return_grid=True)
    head = model.vision_model.head
    d = head.attention.embed_dim
    with torch.no_grad():
        x = model.vision_model(**image_kwargs(raw)).last_hidden_state[0, :REAL]
        y = head.attention.out_proj(x @ head.attention.in_proj_weight[2 * d :].T + head.attention.in_proj_bias[2 * d :])
        y = y + head.mlp(head.layernorm(y))
        ids, mask = args_of(raw)
        tokens = model.text_model.head(model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state[0])
    want = F.normalize(tokens, dim=-1) @ F.normalize(y, dim=-1).T * mask[0, :, None]
    assert_close_scaled(words[0], want.reshape(-1, *GRID))


def _logits(model, kwargs):
    return model(**kwargs).logits_per_image


def test_integrated_gradients_equal_a_hand_made_path_integral(raw):
    """The path integral on the padded patch embeddings by hand (the padding patch is zero pixels,
    so it stays at the baseline all along the path)."""
    model = tm.siglip2().double()
    raw = {k: (v.double() if v.is_floating_point() else v) for k, v in raw.items()}
    n_steps, target = 4, 1
    got, delta = TokenIntegratedGradients(model).attribute(
        pixels_of(model, raw), target=target, additional_forward_args=args_of(raw), n_steps=n_steps,
        method="riemann_trapezoid", return_grid=True, return_convergence_delta=True)
    embed = model.vision_model.embeddings.patch_embedding
    attributions, base = embedding_path_integral(
        embed, raw["pixel_values"], lambda: _logits(model, raw)[0, target], n_steps)
    want = attributions.sum(-1)[0]
    assert float(want[REAL:].abs().max()) == 0.0  # the padding patch
    assert_close_scaled(got[0], want[:REAL].reshape(GRID))
    # completeness: the map's sum against the logit's change from the all-baseline embeddings
    with torch.no_grad():
        intact = _logits(model, raw)[0, target]
        handle = embed.register_forward_hook(lambda m, a, out: base.clone())
        try:
            at_base = _logits(model, raw)[0, target]
        finally:
            handle.remove()
    torch.testing.assert_close(delta, (want.sum() - (intact - at_base))[None])


def _without_tokens(model, raw, drop):
    """Logits with the patch tokens ``drop`` (and the padding token) removed after the embeddings,
    each kept token with its position embedding in the whole grid."""
    vision = model.vision_model
    with torch.no_grad():
        tokens = vision.embeddings(raw["pixel_values"], raw["spatial_shapes"])
        stay = torch.zeros(16, dtype=torch.bool)
        stay[:REAL] = True
        stay[list(drop)] = False
        hidden = vision.post_layernorm(vision.encoder(inputs_embeds=tokens[:, stay]).last_hidden_state)
        image = vision.head(hidden)
        text = text_embeds(model, raw)
        cos = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
        return model.logit_scale.exp() * cos + model.logit_bias


def test_occlusion_drop_and_paint_equal_references(raw):
    model = tm.siglip2().double()
    raw = {k: (v.double() if v.is_floating_point() else v) for k, v in raw.items()}
    pixels, args, target = pixels_of(model, raw), args_of(raw), 2
    occlusion = CausalOcclusion(model)
    before = snapshot(model)
    dropped = occlusion.attribute(pixels, target=target, additional_forward_args=args, window=1, return_grid=True)[0]
    assert_unchanged(model, before)
    with torch.no_grad():
        intact = _logits(model, raw)[0, target]
    for r, c in [(0, 0), (1, 3), (2, 4)]:
        assert_close_scaled(dropped[r, c], intact - _without_tokens(model, raw, [r * 5 + c])[0, target])
    painted = occlusion.attribute(pixels, target=target, additional_forward_args=args, window=1,
                                  intervention="paint", return_grid=True)[0]
    flat = raw["pixel_values"].clone()
    flat[0, 1 * 5 + 3] = 0.0  # patch (1, 3) painted grey (0 after normalisation)
    with torch.no_grad():
        want = intact - _logits(model, {**raw, "pixel_values": flat})[0, target]
    assert_close_scaled(painted[1, 3], want)


def test_drop_image_tokens_is_scoped(model):
    adapter = get_adapter(model)
    before = snapshot(model)
    keep = torch.ones(1, 4, 4)
    keep[0, 1, 2] = 0
    with adapter.drop_image_tokens(keep):
        assert adapter.vision_inputs(tm.pixels(1))["pixel_attention_mask"] is None
        with torch.no_grad():
            assert adapter.vision_outputs(tm.pixels(1)).last_hidden_state.shape[1] == 15
    assert adapter.vision_inputs(tm.pixels(1))["pixel_attention_mask"].shape == (1, 16)
    with pytest.raises(RuntimeError, match="boom"), adapter.drop_image_tokens(keep):
        raise RuntimeError("boom")
    assert not adapter._dropping
    assert_unchanged(model, before)


# ----- explain and the CLI on prompts ------------------------------------------------------------
def test_explain_explains_each_prompt(model, processor, image, raw):
    before = snapshot(model)
    result = explain(model, processor, image, PROMPTS, methods=["relevancy"], evidence=False)
    assert_unchanged(model, before)
    with torch.no_grad():
        probs = torch.sigmoid(model(**raw).logits_per_image[0])
    method = GradientWeightedRelevancy(model)
    for k, prompt in enumerate(PROMPTS):
        assert result.scores[prompt] == pytest.approx(float(probs[k]), rel=1e-4)
        record = next(r for r in result.records if r.target == prompt)
        want = method.attribute(pixels_of(model, raw), target=k, additional_forward_args=args_of(raw),
                                return_grid=True)[0]
        assert record.grid.shape == GRID
        assert_close_scaled(record.grid, want)


def test_cli_explains_a_siglip2_model(model, processor, image, tmp_path, monkeypatch, capsys):
    """The CLI end to end (the loader replaced: the test processor's call defaults are a subclass's)."""
    from captum_vlm import cli

    monkeypatch.setattr(cli, "load_model", lambda spec: (model, processor))
    path = tmp_path / "scene.png"
    image.save(path)
    out = tmp_path / "report.html"
    code = cli.main(["explain", str(path), "--text", PROMPTS[0], "--text", PROMPTS[1], "--model", "tiny-siglip2",
                     "--method", "grad-eclip", "--method", "rollout", "--out", str(out), "--png",
                     str(tmp_path / "png"), "--quiet"])
    assert code == 0, capsys.readouterr()
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert len(list((tmp_path / "png").glob("*.png"))) >= 2


def test_lens_embed_gives_the_models_logits_for_images_of_different_grids(model, processor, image):
    from captum_vlm.lens import embed

    images = [image, image.resize((24, 64))]  # 3 x 5 and 5 x 3 patches: one tensor each
    emb = embed(model, processor, images=images, texts=PROMPTS)
    with torch.no_grad():
        want = torch.cat([model(**processor(images=im, text=PROMPTS, return_tensors="pt")).logits_per_image
                          for im in images])
    assert_close_scaled(torch.as_tensor(emb.similarity("logits")), want)


def test_vision_head_statistics_equal_the_models_own_attentions(model, raw):
    """Head statistics of the vision stream against the model's own eager attentions on the
    processor's padded patches, restricted to the 15 real patches and worked out here: entropy
    per query, and the mean grid distance (in patches) of each query's attention over the patches."""
    from captum_vlm.lens import head_statistics

    before = snapshot(model)
    stats = head_statistics(model, raw, stream="vision")
    assert_unchanged(model, before)
    with torch.no_grad():
        attentions = eager_copy(model).vision_model(**image_kwargs(raw), output_attentions=True).attentions
    rows, cols = np.divmod(np.arange(REAL), GRID[1])
    offsets = torch.as_tensor(np.hypot(rows[:, None] - rows[None], cols[:, None] - cols[None]))
    for layer, attn in enumerate(attentions):
        real = attn[0, :, :REAL, :REAL].double()  # [heads, queries, keys]: padding keys get no weight
        assert torch.allclose(real.sum(-1), torch.ones_like(real.sum(-1)), atol=1e-5)
        entropy = -(real * real.clamp_min(1e-300).log()).sum(-1).mean(-1)
        distance = ((real / real.sum(-1, keepdim=True)) * offsets).sum(-1).mean(-1)
        assert_close_scaled(torch.as_tensor(stats.entropy[layer]), entropy)
        assert_close_scaled(torch.as_tensor(stats.distance[layer]), distance)
    assert np.isnan(stats.sink_mass).all()  # no prefix token: no sink to measure
