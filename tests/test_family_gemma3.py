"""Gemma 3 (``Gemma3ForConditionalGeneration``) end to end on a tiny random model whose 4x4 vision
patches are average-pooled 2x2 into a 2x2 grid of image tokens. The map's grid is that pooled
token grid (each cell 2x2 patches, 16 px): the layout is found by planting a change in one pixel
patch, the pixel map spreads each cell over its 16 px, Grad-CAM and relevancy equal references
from the eager model's returned attentions and autograd, IG equals Captum's IG on the patch
embeddings summed per cell, occlusion equals dropping pooled tokens by hand, and ``cv.explain`` /
the CLI explain the model's own generated answer."""

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

from captum_vlm._grid import grid_to_pixels
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

GRID = (2, 2)  # pooled token grid
CELL = 2 * tm.PATCH  # pixels per cell side
IMG, BOI, EOI = tm.LLAVA_IMAGE_TOKEN, tm.GEMMA3_BOI, tm.GEMMA3_EOI
FIRST = 3  # position of the first image token in gemma_ids()
SCORED = (9, 10)


@pytest.fixture(scope="module")
def model():
    return tm.gemma3()


def gemma_ids(batch: int = 1):
    """``[BOS, w, BOI, IMG x 4, EOI, w, w, w]`` and its mask, as Gemma 3's processor lays it out."""
    row = [tm.BOS, 9, BOI] + [IMG] * 4 + [EOI, 10, 11, 12]
    ids = torch.tensor([row] * batch)
    ids[1:, 1] = 20
    return ids, torch.ones_like(ids)


def token_type_ids(ids, image_token_id=IMG):
    return (ids == image_token_id).long()


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


def language_inputs(model, pixels, ids, mask):
    adapter, seen = get_adapter(model), {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(x=k["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad(), adapter.image_layout(pixels, ids) as layout:
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels, token_type_ids=token_type_ids(ids))
        return seen["x"], layout()
    finally:
        handle.remove()


def test_the_grid_is_the_pooled_token_grid(model):
    adapter = get_adapter(model)
    pixels = tm.pixels(1)
    assert adapter.patches_per_cell == (2, 2) and adapter.patch_size() == (CELL, CELL)
    assert adapter.patch_grid(pixels) == GRID
    assert {BOI, EOI, IMG} <= adapter.special_token_ids
    with pytest.raises(ValueError, match="pixel_values: Gemma 3 pools a fixed 32x32 input"):
        adapter.patch_grid(tm.pixels(1, 48, 48))


@pytest.mark.parametrize("patch", [(0, 0), (1, 2), (3, 1), (2, 3)])
def test_layout_finds_a_planted_pixel_patch(model, patch):
    """Change one vision patch's pixels (vision blocks bypassed, so nothing else mixes): exactly
    one image token changes, and the layout puts it in the cell that holds the patch."""
    pixels = tm.pixels(2)
    ids, mask = gemma_ids(2)
    r, c = patch
    changed = pixels.clone()
    changed[:, :, r * tm.PATCH : (r + 1) * tm.PATCH, c * tm.PATCH : (c + 1) * tm.PATCH] += 1.0
    with vision_layers_bypassed(model):
        before, _ = language_inputs(model, pixels, ids, mask)
        after, layout = language_inputs(model, changed, ids, mask)
    marked = ((after - before).abs().amax(-1) > 1e-6).float()
    assert marked.sum() == 2 and bool(marked[:, FIRST : FIRST + 4].any(1).all())  # one image token each
    expected = torch.zeros(2, *GRID)
    expected[:, r // 2, c // 2] = 1.0
    assert torch.equal(layout.to_grid(marked[:, None])[:, 0], expected)


def test_scoring_reads_the_bidirectional_image_block(model):
    """TokenLogProbs runs the model with token_type_ids 1 on the image tokens (as the processor
    gives them): image tokens attend to later image tokens, text stays causal."""
    ref = eager_copy(model)
    pixels = tm.pixels(1)
    ids, mask = gemma_ids()
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels, token_type_ids=token_type_ids(ids),
                  output_attentions=True)
        causal = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = TokenLogProbs(model)(pixels, ids, mask)
    assert out.attentions[1][0, :, FIRST, FIRST + 3].min() > 0  # first image token sees the last
    assert out.attentions[1][0, :, FIRST + 4, FIRST + 5].max() == 0  # EOI does not see the next word
    log_p = F.log_softmax(out.logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    expected = torch.cat([torch.zeros(1), log_p]) * (ids[0] != IMG)
    torch.testing.assert_close(got[0], expected)
    log_c = F.log_softmax(causal[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    assert not torch.allclose(expected[SCORED[0]], log_c[SCORED[0] - 1])  # the block matters
    with pytest.raises(ValueError, match="takes \\(input_ids, attention_mask\\)"):
        TokenLogProbs(model)(pixels, ids, mask, token_type_ids(ids))


def test_gradcam_sdpa_equals_eager_and_reference(model):
    ref = eager_copy(model)
    pixels = tm.pixels(2)
    ids, mask = gemma_ids(2)
    layer = 0
    got = CrossAttentionGradCAM(model, layer=layer).attribute_tokens(
        pixels, target=list(SCORED), additional_forward_args=(ids, mask), return_grid=True)
    got_eager = CrossAttentionGradCAM(ref, layer=layer).attribute_tokens(
        pixels, target=list(SCORED), additional_forward_args=(ids, mask), return_grid=True)
    assert_close_scaled(got, got_eager)
    out = ref(input_ids=ids, attention_mask=mask, token_type_ids=token_type_ids(ids),
              pixel_values=pixels.clone().requires_grad_(True), output_attentions=True)
    log_p = F.log_softmax(out.logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    attention = out.attentions[layer]
    text_rows = ids[0] != IMG
    for t in SCORED:
        grad = torch.autograd.grad(log_p[:, t - 1].sum(), attention, retain_graph=True)[0]
        cam = (attention * grad.clamp(min=0)).mean(1)[:, text_rows][:, :, FIRST : FIRST + 4]
        assert_close_scaled(got[:, t], cam.sum(1).reshape(2, *GRID))
    heat = CrossAttentionGradCAM(model, layer=layer).attribute_tokens(
        pixels, target=list(SCORED), additional_forward_args=(ids, mask))
    expected = grid_to_pixels(got[:, SCORED[0]].numpy(), (tm.IMAGE_SIZE,) * 2, (CELL, CELL))
    assert_close_scaled(heat[:, SCORED[0], 1], torch.from_numpy(expected).float())  # each cell over its 16 px


def test_relevancy_equals_joint_rule(model):
    ref = eager_copy(model)
    pixels = tm.pixels(1)
    ids, mask = gemma_ids()
    out = ref(input_ids=ids, attention_mask=mask, token_type_ids=token_type_ids(ids),
              pixel_values=pixels.clone().requires_grad_(True), output_attentions=True)
    log_p = F.log_softmax(out.logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    got = BimodalRelevancy(model).attribute_tokens(pixels, target=list(SCORED), additional_forward_args=(ids, mask),
                                                   return_grid=True)
    for t in SCORED:
        grads = torch.autograd.grad(log_p[:, t - 1].sum(), out.attentions, retain_graph=True)
        r = torch.eye(ids.shape[1])
        for a, g in zip(out.attentions, grads):
            r = r + a_bar(a, g)[0] @ r
        assert_close_scaled(got[0, t], r[t - 1, FIRST : FIRST + 4].reshape(GRID))


def test_image_ig_is_captum_ig_on_patch_embeddings_summed_per_cell(model):
    pixels = tm.pixels(1)
    ids, mask = gemma_ids()
    ours = TokenIntegratedGradients(model).attribute(pixels, additional_forward_args=(ids, mask), n_steps=6,
                                                     return_grid=True)
    conv = get_adapter(model).patch_embedding()
    target = TokenLogProbs(model, "sum")
    with torch.no_grad():
        embeds, start = conv(pixels), conv(torch.zeros_like(pixels))

    def on_embeddings(e):
        handle = conv.register_forward_hook(lambda m, a, o: e.clone())
        try:
            n = e.shape[0]
            return target(pixels.expand(n, -1, -1, -1), ids.expand(n, -1), mask.expand(n, -1))
        finally:
            handle.remove()

    per_patch = IntegratedGradients(on_embeddings).attribute(embeds, start, n_steps=6).sum(1)  # [1, 4, 4]
    expected = per_patch.reshape(1, 2, 2, 2, 2).sum(dim=(2, 4))
    assert ours.shape == (1, *GRID)
    assert_close_scaled(ours, expected)


@pytest.mark.parametrize("cell", [(0, 1), (1, 0)])
def test_occlusion_drops_a_pooled_token_and_its_placeholder(model, cell):
    pixels = tm.pixels(1)
    ids, mask = gemma_ids()
    before = snapshot(model)
    grid = CausalOcclusion(model).attribute(pixels, additional_forward_args=(ids, mask), window=1,
                                            return_grid=True)
    assert_unchanged(model, before)
    token = cell[0] * GRID[1] + cell[1]
    keep = torch.ones(1, 4, dtype=torch.bool)
    keep[0, token] = False
    stay = torch.ones_like(ids, dtype=torch.bool)
    stay[0, FIRST + token] = False
    projector = model.model.multi_modal_projector
    target = TokenLogProbs(model, "sum")
    handle = projector.register_forward_hook(lambda m, a, o: o[keep].view(1, 3, -1))
    try:
        with torch.no_grad():
            fewer = target(pixels, ids[stay][None], mask[stay][None])
    finally:
        handle.remove()
    with torch.no_grad():
        full = target(pixels, ids, mask)
    torch.testing.assert_close(grid[0, cell[0], cell[1]], (full - fewer)[0], atol=1e-6, rtol=1e-4)
    painted = CausalOcclusion(model).attribute(pixels, additional_forward_args=(ids, mask), window=1,
                                               intervention="paint", return_grid=True)
    blank = pixels.clone()
    blank[:, :, cell[0] * CELL : (cell[0] + 1) * CELL, cell[1] * CELL : (cell[1] + 1) * CELL] = 0
    with torch.no_grad():
        by_hand = full - target(blank, ids, mask)  # painting a cell blanks its 2x2 patches
    torch.testing.assert_close(painted[0, cell[0], cell[1]], by_hand[0], atol=1e-6, rtol=1e-4)


def test_drop_image_tokens_is_scoped(model):
    adapter = get_adapter(model)
    keep = torch.ones(1, *GRID)
    keep[0, 1, :] = 0
    ids, mask = gemma_ids()
    before = snapshot(model)
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(n=k["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        with torch.no_grad(), adapter.drop_image_tokens(keep) as stays:
            stay = stays(ids)
            assert stay.tolist()[0] == [True] * (FIRST + 2) + [False, False] + [True] * 4
            model(input_ids=ids[stay][None], attention_mask=mask[stay][None], pixel_values=tm.pixels(1))
        assert seen["n"] == ids.shape[1] - 2
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=tm.pixels(1))
        assert seen["n"] == ids.shape[1]
    finally:
        handle.remove()
    assert_unchanged(model, before)
    with pytest.raises(RuntimeError, match="boom"), adapter.drop_image_tokens(keep):
        raise RuntimeError("boom")
    assert_unchanged(model, before)


# ----- explain() and the CLI on the model's own answer --------------------------------------------
def tiny_processor():
    """Gemma 3's own processor, offline: its PIL image processor at 32 px and the zoo's word-level
    tokenizer (BOS first) with Gemma 3's three image tokens; 4 image tokens per image."""
    from tokenizers import processors
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, PreTrainedTokenizerFast

    from captum_vlm.zoo.processing import build_tokenizer

    base = build_tokenizer(64)
    words = base._tokenizer
    words.post_processor = processors.TemplateProcessing(single="[BOS] $A", pair="[BOS] $A $B",
                                                         special_tokens=[("[BOS]", base.bos_token_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]",
        model_max_length=64, padding_side="right",
        extra_special_tokens={"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                              "eoi_token": "<end_of_image>"})
    image_processor = Gemma3ImageProcessorPil(size={"height": tm.IMAGE_SIZE, "width": tm.IMAGE_SIZE})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4)
    assert max(tokenizer.boi_token_id, tokenizer.image_token_id, tokenizer.eoi_token_id) < tm.VOCAB
    return processor


@pytest.fixture(scope="module")
def model_and_processor():
    processor = tiny_processor()
    tok = processor.tokenizer
    return tm.gemma3(image_token_id=tok.image_token_id, boi_token_id=tok.boi_token_id,
                     eoi_token_id=tok.eoi_token_id), processor


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))


def test_explain_explains_the_generated_answer(model_and_processor, image):
    model, processor = model_and_processor
    prompts = ["<start_of_image> what color is the circle", "<start_of_image> how many"]
    before = snapshot(model)
    result = explain(model, processor, image, prompts, methods=["bimodal-relevancy"], max_new_tokens=3)
    assert_unchanged(model, before)
    method = BimodalRelevancy(model)
    for prompt in prompts:
        inputs = processor(images=[[image]], text=[prompt], return_tensors="pt")  # this prompt alone
        assert torch.equal(inputs["token_type_ids"], token_type_ids(inputs["input_ids"], model.config.image_token_id))
        with torch.no_grad():
            sequence = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            logits = model(input_ids=sequence, pixel_values=inputs["pixel_values"],
                           token_type_ids=token_type_ids(sequence, model.config.image_token_id)).logits
        start = inputs["input_ids"].shape[1]
        log_p = F.log_softmax(logits[0, start - 1 : -1], -1).gather(-1, sequence[0, start:, None]).sum()
        answer = processor.tokenizer.decode(sequence[0, start:], skip_special_tokens=True).strip()
        title = f"{prompt} → {answer}"
        assert result.scores[title] == pytest.approx(float(log_p.exp()), rel=1e-4)
        generated = list(range(start, sequence.shape[1]))
        whole = method.attribute(inputs["pixel_values"], target=generated,
                                 additional_forward_args=(sequence, torch.ones_like(sequence)), return_grid=True)
        record = next(r for r in result.records if r.target == title)
        assert record.grid.shape == GRID
        assert_close_scaled(record.grid, whole[0])


def test_cli_explains_a_saved_checkpoint(model_and_processor, image, tmp_path, capsys):
    model, processor = model_and_processor
    folder = tmp_path / "tiny-gemma3"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    picture = tmp_path / "scene.png"
    image.save(picture)
    out = tmp_path / "report.html"
    prompt = "<start_of_image> what color is the circle"
    code = main(["explain", str(picture), "--text", prompt, "--model", str(folder),
                 "--method", "cross-attention-gradcam", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    reference = explain(model, processor, image, [prompt], methods=["cross-attention-gradcam"], evidence=False)
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and list(reference.scores)[0].split(" → ")[1] in html


def test_vision_stream_views_use_the_towers_patch_grid(model):
    """Views of the vision tower itself (head statistics, probes) read its 4x4 patches, not the
    2x2 token grid: a mask on one cell puts its 4 patches, and only them, in the pointing game."""
    from captum_vlm.hooks import capture
    from captum_vlm.lens import head_statistics
    from captum_vlm.lens.heads import attention_statistics

    adapter = get_adapter(model)
    pixels = tm.pixels(1)
    assert adapter.vision_grid(pixels) == (4, 4)
    masks = np.zeros((1, tm.IMAGE_SIZE, tm.IMAGE_SIZE), bool)
    masks[0, :CELL, CELL:] = True  # cell (0, 1) = patches (0..1, 2..3)
    got = head_statistics(model, {"pixel_values": pixels}, stream="vision", masks=masks)
    with capture(model, attentions=adapter.vision_attentions(), grads=False) as rec, torch.no_grad():
        adapter.vision_model()(pixel_values=pixels)
    patches = torch.arange(16)
    want = attention_statistics(rec.attentions, masks=masks, stream="vision", sink_keys=torch.arange(0),
                                patch_keys=patches, patch_queries=patches, grid=(4, 4))
    np.testing.assert_allclose(got.pointing, want.pointing)
    np.testing.assert_allclose(got.distance, want.distance)
