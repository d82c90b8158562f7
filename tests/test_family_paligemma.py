"""PaliGemma (``PaliGemmaForConditionalGeneration``) end to end on a tiny random model: the image
layout found by planting a change in one pixel patch, prefix-LM scoring, Grad-CAM and relevancy
against references from the eager model's returned attentions and autograd, IG and occlusion
against Captum and a by-hand token drop, and ``cv.explain`` / the CLI on the model's own answer."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import numpy as np
import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients
from model_state import assert_unchanged, snapshot
from numerics import assert_close_scaled
from PIL import Image
from torch import nn

from captum_vlm.adapters import get_adapter
from captum_vlm.attr import (
    BimodalRelevancy,
    CausalOcclusion,
    CrossAttentionGradCAM,
    TokenIntegratedGradients,
)
from captum_vlm.cli import main
from captum_vlm.explain import explain
from captum_vlm.targets import TokenLogProbs

GRID = (tm.IMAGE_SIZE // tm.PATCH,) * 2
N = GRID[0] * GRID[1]
IMG = tm.LLAVA_IMAGE_TOKEN
SUFFIX = (19, 20, 21)  # positions of the suffix (the answer) in pali_inputs()


@pytest.fixture(scope="module")
def model():
    return tm.paligemma()


def pali_inputs(batch: int = 1):
    """``(input_ids, attention_mask, token_type_ids)`` as PaliGemma's processor lays them out:
    16 image tokens, BOS, the prompt (prefix, type 0), then the answer (suffix, type 1)."""
    row = [IMG] * N + [tm.BOS, 9, 10] + [11, 12, tm.EOS]
    ids = torch.tensor([row] * batch)
    ids[1:, N + 1] = 20
    token_type_ids = (torch.arange(len(row)) >= SUFFIX[0]).long().expand(batch, -1).clone()
    return ids, torch.ones_like(ids), token_type_ids


def eager_copy(model):
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin


def a_bar(attention, grad):
    return (attention * grad).clamp(min=0).mean(1)


@contextmanager
def vision_layers_bypassed(model):
    """The vision encoder without its blocks, so that no patch mixes with another."""
    encoder = get_adapter(model).vision_model().encoder
    layers = encoder.layers
    encoder.layers = nn.ModuleList()
    try:
        yield
    finally:
        encoder.layers = layers


def language_inputs(model, pixels, ids, mask, tt):
    """The language model's input embeddings ``[B, L, D]`` and the adapter's layout of that forward."""
    adapter, seen = get_adapter(model), {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(x=k["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad(), adapter.image_layout(pixels, ids) as layout:
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels, token_type_ids=tt)
        return seen["x"], layout()
    finally:
        handle.remove()


@pytest.mark.parametrize("cell", [(0, 0), (1, 2), (3, 3)])
def test_layout_finds_a_planted_pixel_patch(model, cell):
    """Change the pixels of one patch (vision blocks bypassed, so nothing else changes): the image
    tokens whose embeddings change map back to that patch's grid cell and no other."""
    pixels = tm.pixels(2)
    ids, mask, tt = pali_inputs(2)
    changed = pixels.clone()
    r, c = cell
    changed[:, :, r * tm.PATCH : (r + 1) * tm.PATCH, c * tm.PATCH : (c + 1) * tm.PATCH] += 1.0
    with vision_layers_bypassed(model):
        before, _ = language_inputs(model, pixels, ids, mask, tt)
        after, layout = language_inputs(model, changed, ids, mask, tt)
    marked = ((after - before).abs().amax(-1) > 1e-6).float()
    assert marked.sum() == 2  # one token per example
    expected = torch.zeros(2, *GRID)
    expected[:, r, c] = 1.0
    assert torch.equal(layout.to_grid(marked[:, None])[:, 0], expected)
    assert get_adapter(model).num_prefix_tokens == 0  # SigLIP: no CLS feature


def test_prefix_lm_scoring(model):
    """With token_type_ids the prefix attends both ways and only the suffix is scored; without
    them the model runs causal and every text position after the first is scored."""
    pixels = tm.pixels(1)
    ids, mask, tt = pali_inputs()
    ref = eager_copy(model)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels, token_type_ids=tt, output_attentions=True)
        causal = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = TokenLogProbs(model)(pixels, ids, mask, tt)
        got_causal = TokenLogProbs(model)(pixels, ids, mask)
    assert out.attentions[0][0, :, 0, N + 2].min() > 0  # an image token sees the prompt: prefix-LM
    assert out.attentions[0][0, :, SUFFIX[0], SUFFIX[1]].max() == 0  # the suffix stays causal
    log_p = F.log_softmax(out.logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    expected = torch.zeros(ids.shape[1])
    expected[list(SUFFIX)] = log_p[[t - 1 for t in SUFFIX]]
    torch.testing.assert_close(got[0], expected)
    log_c = F.log_softmax(causal[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    expected_c = torch.cat([torch.zeros(1), log_c]) * (ids[0] != IMG)
    torch.testing.assert_close(got_causal[0], expected_c)
    assert not torch.allclose(got[0, list(SUFFIX)], got_causal[0, list(SUFFIX)])  # the two masks differ
    with pytest.raises(ValueError, match="token_type_ids: expected a tensor shaped like input_ids"):
        TokenLogProbs(model)(pixels, ids, mask, tt[:, :5])
    with pytest.raises(ValueError, match="additional_forward_args: PaliGemmaForConditionalGeneration takes"):
        TokenLogProbs(model)(pixels, ids, mask, tt, tt)


def test_gradcam_sdpa_equals_eager_and_reference(model):
    ref = eager_copy(model)
    pixels = tm.pixels(2)
    ids, mask, tt = pali_inputs(2)
    layer = 0  # image rows get gradient here, so leaving them out matters
    args = (ids, mask, tt)
    got = CrossAttentionGradCAM(model, layer=layer).attribute_tokens(
        pixels, target=list(SUFFIX), additional_forward_args=args, return_grid=True)
    got_eager = CrossAttentionGradCAM(ref, layer=layer).attribute_tokens(
        pixels, target=list(SUFFIX), additional_forward_args=args, return_grid=True)
    assert_close_scaled(got, got_eager)
    assert model.config.text_config._attn_implementation == "sdpa"
    out = ref(input_ids=ids, attention_mask=mask, token_type_ids=tt, pixel_values=pixels.clone().requires_grad_(True),
              output_attentions=True)
    log_p = F.log_softmax(out.logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    attention = out.attentions[layer]
    text_rows = ids[0] != IMG
    for t in SUFFIX:
        grad = torch.autograd.grad(log_p[:, t - 1].sum(), attention, retain_graph=True)[0]
        cam = (attention * grad.clamp(min=0)).mean(1)[:, text_rows][:, :, :N]  # text rows over the image tokens
        assert_close_scaled(got[:, t], cam.sum(1).reshape(2, *GRID))
    assert got[:, : SUFFIX[0]].abs().sum() == 0  # prefix positions are not predictions


def test_relevancy_equals_joint_rule(model):
    ref = eager_copy(model)
    pixels = tm.pixels(1)
    ids, mask, tt = pali_inputs()
    out = ref(input_ids=ids, attention_mask=mask, token_type_ids=tt, pixel_values=pixels.clone().requires_grad_(True),
              output_attentions=True)
    log_p = F.log_softmax(out.logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    method = BimodalRelevancy(model)
    got = method.attribute_tokens(pixels, target=list(SUFFIX), additional_forward_args=(ids, mask, tt),
                                  return_grid=True)
    whole = method.attribute(pixels, additional_forward_args=(ids, mask, tt), return_grid=True)  # every scored token
    by_hand = []
    for t in SUFFIX:
        grads = torch.autograd.grad(log_p[:, t - 1].sum(), out.attentions, retain_graph=True)
        r = torch.eye(ids.shape[1])
        for a, g in zip(out.attentions, grads):
            r = r + a_bar(a, g)[0] @ r
        by_hand.append(r[t - 1, :N].reshape(GRID))
        assert_close_scaled(got[0, t], by_hand[-1])
    assert_close_scaled(whole[0], sum(by_hand) / len(by_hand))


def test_image_ig_equals_captum_ig_on_patch_embeddings(model):
    pixels = tm.pixels(1)
    ids, mask, tt = pali_inputs()
    target = TokenLogProbs(model, "sum")
    ours = TokenIntegratedGradients(model).attribute(pixels, additional_forward_args=(ids, mask, tt), n_steps=6,
                                                     return_grid=True)
    conv = get_adapter(model).patch_embedding()
    with torch.no_grad():
        embeds, start = conv(pixels), conv(torch.zeros_like(pixels))

    def on_embeddings(e):
        handle = conv.register_forward_hook(lambda m, a, o: e.clone())
        try:
            n = e.shape[0]
            return target(pixels.expand(n, -1, -1, -1), ids.expand(n, -1), mask.expand(n, -1), tt.expand(n, -1))
        finally:
            handle.remove()

    expected = IntegratedGradients(on_embeddings).attribute(embeds, start, n_steps=6).sum(1)
    assert ours.shape == (1, *GRID)
    assert_close_scaled(ours, expected)


def test_occlusion_drops_patches_and_their_placeholders(model):
    """Dropping the patch tokens of row 1, cols 0-1 equals the model run by hand without those
    vision tokens, their two placeholders and their token_type_ids entries."""
    pixels = tm.pixels(1)
    ids, mask, tt = pali_inputs()
    before = snapshot(model)
    grid = CausalOcclusion(model).attribute(pixels, additional_forward_args=(ids, mask, tt), window=(1, 2),
                                            stride=(1, 2), return_grid=True)
    assert_unchanged(model, before)
    vision = get_adapter(model).vision_model()
    keep = torch.ones(1, N, dtype=torch.bool)
    keep[0, 4:6] = False
    stay = torch.ones_like(ids, dtype=torch.bool)
    stay[0, 4:6] = False
    target = TokenLogProbs(model, "sum")
    handle = vision.embeddings.register_forward_hook(lambda m, a, o: o[keep].view(1, N - 2, -1))
    try:
        with torch.no_grad():
            fewer = target(pixels, ids[stay][None], mask[stay][None], tt[stay][None])
    finally:
        handle.remove()
    with torch.no_grad():
        full = target(pixels, ids, mask, tt)
    torch.testing.assert_close(grid[0, 1, 0], (full - fewer)[0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(grid[0, 1, 1], grid[0, 1, 0])


def test_drop_image_tokens_is_scoped(model):
    adapter = get_adapter(model)
    keep = torch.ones(1, *GRID)
    keep[0, 1, :] = 0
    ids, _, _ = pali_inputs()
    before = snapshot(model)
    with torch.no_grad(), adapter.drop_image_tokens(keep) as stays:
        assert adapter.vision_model().embeddings(tm.pixels(1)).shape[1] == N - 4
        stay = stays(ids)
        assert stay.sum() == ids.shape[1] - 4 and not stay[0, 4:8].any() and stay[0, :4].all()
    assert adapter.vision_model().embeddings(tm.pixels(1)).shape[1] == N
    assert_unchanged(model, before)


# ----- explain() and the CLI on the model's own answer --------------------------------------------
def tiny_processor():
    """PaliGemma's own processor, offline: SigLIP's image processor at 32 px (16 image tokens) and
    the zoo's word-level tokenizer without its BOS/EOS template (PaliGemma's processor adds them)."""
    from tokenizers import processors
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    from captum_vlm.zoo.processing import build_tokenizer

    tokenizer = build_tokenizer(64)
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    image_processor = SiglipImageProcessorPil(size={"height": tm.IMAGE_SIZE, "width": tm.IMAGE_SIZE})
    image_processor.image_seq_length = N
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    assert processor.image_token_id < tm.VOCAB
    return processor


@pytest.fixture(scope="module")
def model_and_processor():
    processor = tiny_processor()
    return tm.paligemma(image_token_id=processor.image_token_id), processor


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))


def test_explain_explains_the_generated_answer(model_and_processor, image):
    model, processor = model_and_processor
    prompts = ["what color is the circle", "how many"]  # padded together by explain()
    before = snapshot(model)
    result = explain(model, processor, image, prompts, methods=["bimodal-relevancy"], max_new_tokens=3)
    assert_unchanged(model, before)
    method = BimodalRelevancy(model)
    for k, prompt in enumerate(prompts):
        inputs = processor(images=image, text=prompt, return_tensors="pt")  # this prompt alone: prefix 0s
        assert not inputs["token_type_ids"].any()
        with torch.no_grad():
            sequence = model.generate(**{k_: v for k_, v in inputs.items() if k_ != "labels"}, max_new_tokens=3,
                                      do_sample=False)
        start = inputs["input_ids"].shape[1]
        tt = (torch.arange(sequence.shape[1]) >= start).long()[None]
        with torch.no_grad():
            logits = model(input_ids=sequence, pixel_values=inputs["pixel_values"], token_type_ids=tt).logits
        log_p = F.log_softmax(logits[0, start - 1 : -1], -1).gather(-1, sequence[0, start:, None]).sum()
        answer = processor.tokenizer.decode(sequence[0, start:], skip_special_tokens=True).strip()
        title = f"{prompt} → {answer}"
        assert result.scores[title] == pytest.approx(float(log_p.exp()), rel=1e-4)
        generated = list(range(start, sequence.shape[1]))
        whole = method.attribute(inputs["pixel_values"], target=generated,
                                 additional_forward_args=(sequence, torch.ones_like(sequence), tt), return_grid=True)
        record = next(r for r in result.records if r.target == title)
        assert_close_scaled(record.grid, whole[0])
        assert record.details["target"] == f"answer '{answer}' to text {k}"


def test_cli_explains_a_saved_checkpoint(model_and_processor, image, tmp_path, capsys):
    model, processor = model_and_processor
    folder = tmp_path / "tiny-paligemma"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    picture = tmp_path / "scene.png"
    image.save(picture)
    out = tmp_path / "report.html"
    code = main(["explain", str(picture), "--text", "what color is the circle", "--model", str(folder),
                 "--method", "cross-attention-gradcam", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    reference = explain(model, processor, image, ["what color is the circle"], methods=["cross-attention-gradcam"],
                        evidence=False)
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and list(reference.scores)[0].split(" → ")[1] in html
