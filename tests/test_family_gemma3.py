"""Gemma 3 (``Gemma3ForConditionalGeneration``) end to end on a tiny random model whose 4x4 vision
patches are average-pooled 2x2 into a 2x2 grid of image tokens. The map's grid is that pooled
token grid (each cell 2x2 patches, 16 px): the layout is found by planting a change in one pixel
patch, the pixel map spreads each cell over its 16 px, Grad-CAM and relevancy equal references
from the eager model's returned attentions and autograd, IG equals Captum's IG on the patch
embeddings summed per cell, occlusion equals dropping pooled tokens by hand, and ``cv.explain`` /
the CLI explain the model's own generated answer."""

from __future__ import annotations

import copy
import json
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


def summed_log_p(model, pixels, ids, mask):
    """``[B]`` the summed log-probability of every text token after the first (image
    placeholders left out), from the model's own forward with the processor's token_type_ids."""
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, token_type_ids=token_type_ids(ids)).logits
    log_p = F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (log_p * (ids[:, 1:] != IMG)).sum(1)


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
    with pytest.raises(ValueError, match="pixel_values: Gemma 3 pools fixed 32x32 views.*got \\(48, 48\\)"):
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
    handle = projector.register_forward_hook(lambda m, a, o: o[keep].view(1, 3, -1))
    try:
        with torch.no_grad():
            fewer = summed_log_p(model, pixels, ids[stay][None], mask[stay][None])
    finally:
        handle.remove()
    with torch.no_grad():
        full = summed_log_p(model, pixels, ids, mask)
    torch.testing.assert_close(grid[0, cell[0], cell[1]], (full - fewer)[0], atol=1e-6, rtol=1e-4)
    painted = CausalOcclusion(model).attribute(pixels, additional_forward_args=(ids, mask), window=1,
                                               intervention="paint", return_grid=True)
    blank = pixels.clone()
    blank[:, :, cell[0] * CELL : (cell[0] + 1) * CELL, cell[1] * CELL : (cell[1] + 1) * CELL] = 0
    with torch.no_grad():
        by_hand = full - summed_log_p(model, blank, ids, mask)  # painting a cell blanks its 2x2 patches
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



# ----- pan and scan: the global view and the crops ---------------------------------------------
# A 40 x 90 image is cut into 2 crops (40 x 45 each), a 90 x 40 one into 2 stacked, 30 x 100 into 3;
# each crop and the whole image are resized to 32 x 32. The canvas is the crops side by side
# (32 x 64: a 2 x 4 grid of 16 px cells); the model reads the global view's 4 tokens, then each crop's.
T = 2  # tokens a side per view
PANNED_SIZES = {"wide": ((40, 90), (1, 2)), "tall": ((90, 40), (2, 1)), "three": ((30, 100), (1, 3))}


def picture(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


#: the processor's options for pan and scan (its call defaults override the image processor's own)
PAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8}


@pytest.fixture(scope="module")
def pan_processor():
    return tiny_processor()


def panned_ids(crops: int, batch: int = 1):
    """``[BOS, w, BOI, IMG x 4, EOI, w, (BOI, IMG x 4, EOI) x crops, w, w]``: the global view, then the crops."""
    view = [BOI] + [IMG] * 4 + [EOI]
    row = [tm.BOS, 9] + view + [10] + view * crops + [11, 12]
    ids = torch.tensor([row] * batch)
    ids[1:, 1] = 20
    return ids, torch.ones_like(ids)


def hand_views(canvas, rows, cols):
    """The model's pixel_values for a canvas, by hand: the canvas resized to 32 x 32 (bilinear,
    antialias), then its crops row by row, ``[B * (1 + rows * cols), 3, 32, 32]``."""
    s = tm.IMAGE_SIZE
    whole = F.interpolate(canvas, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
    crops = [canvas[:, :, r * s : (r + 1) * s, c * s : (c + 1) * s] for r in range(rows) for c in range(cols)]
    return torch.stack([whole, *crops], 1).flatten(0, 1)


def panned_grid(scores, rows, cols):
    """Image-token scores ``[..., 4 + 4 * crops]`` (the global view's, then each crop's) on the
    canvas grid, by hand: a crop token on its cell, a global token spread evenly over the
    ``rows x cols`` cells its part of the global view comes from."""
    grid = scores.new_zeros(*scores.shape[:-1], rows * T, cols * T)
    whole = scores[..., :4].reshape(*scores.shape[:-1], T, T) / (rows * cols)
    grid += whole.repeat_interleave(rows, -2).repeat_interleave(cols, -1)
    for crop in range(rows * cols):
        r, c = divmod(crop, cols)
        start = 4 * (crop + 1)
        grid[..., r * T : (r + 1) * T, c * T : (c + 1) * T] += scores[..., start : start + 4].reshape(
            *scores.shape[:-1], T, T)
    return grid


@pytest.mark.parametrize("shape", PANNED_SIZES)
def test_pan_and_scan_inputs_are_the_crops_side_by_side(model_and_processor, pan_processor, shape):
    """The canvas holds the processor's crops exactly, in the right orientation; the global view
    resized from it with torch stays near the processor's (the original image resized by PIL)."""
    model = model_and_processor[0]
    (height, width), (rows, cols) = PANNED_SIZES[shape]
    raw = pan_processor(images=[[picture(height, width)]] * 2, text=["<start_of_image> what color"] * 2,
                        return_tensors="pt", **PAN)
    n_views = 1 + rows * cols
    assert raw["pixel_values"].shape == (2 * n_views, 3, 32, 32)  # the processor's flat views
    adapter = get_adapter(model)
    canvas = adapter.processor_inputs(raw)["pixel_values"]
    assert canvas.shape == (2, 3, rows * 32, cols * 32) and adapter.patch_grid(canvas) == (rows * T, cols * T)
    views = raw["pixel_values"].reshape(2, n_views, 3, 32, 32)
    ours = adapter.model_inputs(canvas, raw["input_ids"], raw["attention_mask"])["pixel_values"]
    ours = ours.reshape(2, n_views, 3, 32, 32)
    assert torch.equal(ours[:, 1:], views[:, 1:])  # every crop exactly
    torch.testing.assert_close(ours[:, 0], hand_views(canvas, rows, cols).reshape(2, n_views, 3, 32, 32)[:, 0])
    gap = (ours[:, 0] - views[:, 0]).abs()
    assert float(gap.mean()) < 0.15 and float(gap.max()) < 1.0  # measured: see the RESULTS note
    assert adapter.num_image_tokens(canvas) == 4 * n_views == int((raw["input_ids"][0] == IMG_ID(model)).sum())


def IMG_ID(model):  # noqa: N802 - the processor's image token in this model
    return model.config.image_token_id


def test_pan_and_scan_refuses_several_images_and_mixed_crops(model, model_and_processor, pan_processor):
    named, plain = model_and_processor  # its image tokens are the tokenizer's
    adapter = get_adapter(named)
    before = snapshot(named)
    share = "the images of one batch must share one canvas size"
    mixed = pan_processor(images=[[picture(40, 90)], [picture(40, 40)]], text=["<start_of_image> a"] * 2,
                          return_tensors="pt", padding=True, **PAN)
    with pytest.raises(ValueError, match=rf"views per text \[3, 1\] give canvases \[\(32, 64\), \(32, 32\)\]; {share}"):
        adapter.processor_inputs(mixed)
    turned = pan_processor(images=[[picture(40, 90)], [picture(90, 40)]], text=["<start_of_image> a"] * 2,
                           return_tensors="pt", padding=True, **PAN)  # as many views, crops side by side / stacked
    with pytest.raises(ValueError, match=rf"give canvases \[\(32, 64\), \(64, 32\)\]; {share}"):
        adapter.processor_inputs(turned)
    two = plain(images=[[picture(40, 40), picture(40, 40, 1)]], text=["<start_of_image> <start_of_image> a"],
                return_tensors="pt")
    with pytest.raises(ValueError, match=r"inputs: 2 images for 1 texts; .* hold \[2\] images"):
        adapter.processor_inputs(two)
    three = plain(images=[[picture(40, 40, k) for k in range(3)]], text=["<start_of_image> " * 3 + "a"],
                  return_tensors="pt")  # three runs of views, but not one image and its crops
    with pytest.raises(ValueError, match=r"differ from its first view by .* not one image's pan-and-scan crops"):
        adapter.processor_inputs(three)
    assert_unchanged(named, before)
    adapter, before = get_adapter(model), snapshot(model)
    canvas = tm.pixels(1, 32, 64)
    ids, mask = panned_ids(crops=1)  # a 2-crop canvas needs 12 placeholders, the text has 8
    with pytest.raises(ValueError, match=r"input_ids: the texts hold \[8\] image tokens but the 1x2-crop canvas"):
        TokenLogProbs(model)(canvas, ids, mask)
    with pytest.raises(ValueError, match="pixel_values: Gemma 3 pools fixed 32x32 views"):
        adapter.patch_grid(tm.pixels(1, 32, 80))
    assert_unchanged(model, before)


@pytest.mark.parametrize("patch", [(0, 0), (1, 5), (3, 2), (2, 7)])
def test_layout_finds_a_planted_patch_in_its_crop_and_the_global_view(model, patch):
    """With the vision blocks bypassed, a change to one 8 px patch of a 1 x 2 canvas changes one
    token of the crop that holds it and, through the global view, global token(s) whose box holds
    its cell; the layout maps the crop token onto the cell and the global token onto its box.
    With an area resize the global change stays in one token; with the default bilinear one it
    may leak to a neighbour, the largest change staying on the cell's own global token."""
    adapter = get_adapter(model)
    canvas = tm.pixels(1, 32, 64)
    ids, mask = panned_ids(crops=2)
    r, c = patch
    changed = canvas.clone()
    changed[:, :, r * tm.PATCH : (r + 1) * tm.PATCH, c * tm.PATCH : (c + 1) * tm.PATCH] += 1.0
    cell = (r // 2, c // 2)
    with adapter.image_layout(canvas, ids) as layout:
        pass
    columns = layout().columns[0]
    try:
        for mode in ("area", "bilinear"):
            adapter.global_view_mode = mode
            with vision_layers_bypassed(model):
                before, _ = language_inputs_of(model, canvas, ids, mask)
                after, _ = language_inputs_of(model, changed, ids, mask)
            change = (after - before).abs().amax(-1)[0, columns]
            crop_part, global_part = change[4:], change[:4]
            assert int((crop_part > 1e-6).sum()) == 1
            one = torch.zeros(1, 1, ids.shape[1])
            one[0, 0, columns[4 + int(crop_part.argmax())]] = 1.0
            expected = torch.zeros(1, 1, 2, 4)
            expected[..., cell[0], cell[1]] = 1.0
            assert torch.equal(layout().to_grid(one), expected)
            own = (r // 2) * T + c // 4  # the global token whose box (1 x 2 cells) holds the cell
            if mode == "area":
                assert int((global_part > 1e-6).sum()) == 1
            assert int(global_part.argmax()) == own
            strongest = torch.zeros(1, 1, ids.shape[1])
            strongest[0, 0, columns[own]] = 1.0
            box = torch.zeros(1, 1, 2, 4)
            box[..., cell[0], (c // 4) * 2 : (c // 4) * 2 + 2] = 0.5
            assert torch.equal(layout().to_grid(strongest), box)
    finally:
        adapter.global_view_mode = "bilinear"


def language_inputs_of(model, canvas, ids, mask):
    """The language model's input embeddings for a canvas (its views cut by the adapter)."""
    adapter, seen = get_adapter(model), {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(x=k["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**adapter.model_inputs(canvas, ids, mask), token_type_ids=token_type_ids(ids))
        return seen["x"], None
    finally:
        handle.remove()


@pytest.mark.parametrize("rows,cols", [(1, 2), (2, 1)])
def test_pan_and_scan_gradcam_and_relevancy_equal_references(model, rows, cols):
    ref = eager_copy(model)
    canvas = tm.pixels(2, rows * 32, cols * 32)
    ids, mask = panned_ids(crops=rows * cols, batch=2)
    scored = [ids.shape[1] - 2, ids.shape[1] - 1]
    cam = CrossAttentionGradCAM(model, layer=1).attribute_tokens(canvas, target=scored, additional_forward_args=(ids, mask),
                                                                 return_grid=True)
    relevancy = BimodalRelevancy(model).attribute_tokens(canvas, target=scored, additional_forward_args=(ids, mask),
                                                         return_grid=True)
    out = ref(input_ids=ids, attention_mask=mask, token_type_ids=token_type_ids(ids),
              pixel_values=hand_views(canvas, rows, cols).requires_grad_(True), output_attentions=True)
    log_p = F.log_softmax(out.logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    image_cols = (ids[0] == IMG).nonzero()[:, 0]
    text_rows = ids[0] != IMG
    for t in scored:
        grads = torch.autograd.grad(log_p[:, t - 1].sum(), out.attentions, retain_graph=True)
        a = out.attentions[1]
        by_hand = (a * grads[1].clamp(min=0)).mean(1)[:, text_rows][:, :, image_cols].sum(1)
        assert_close_scaled(cam[:, t], panned_grid(by_hand, rows, cols))
        for b in range(2):
            r = torch.eye(ids.shape[1])
            for att, g in zip(out.attentions, grads):
                r = r + a_bar(att, g)[b] @ r
            assert_close_scaled(relevancy[b, t], panned_grid(r[t - 1, image_cols], rows, cols))


def test_pan_and_scan_ig_is_captum_ig_on_every_views_patch_embeddings(model):
    model = copy.deepcopy(model).double()
    canvas = tm.pixels(1, 32, 64).double()
    ids, mask = panned_ids(crops=2)
    ours = TokenIntegratedGradients(model).attribute(canvas, additional_forward_args=(ids, mask), n_steps=5,
                                                     return_grid=True)
    conv = get_adapter(model).patch_embedding()
    views = hand_views(canvas, 1, 2)
    with torch.no_grad():
        embeds, start = conv(views), conv(hand_views(torch.zeros_like(canvas), 1, 2))

    def on_embeddings(e):  # e: [n, 3 views, D, 4, 4], the n steps' patch embeddings of every view
        n = e.shape[0]
        handle = conv.register_forward_hook(lambda m, a, o: e.flatten(0, 1).clone())
        try:
            return summed_log_p(model, views.repeat(n, 1, 1, 1), ids.expand(n, -1), mask.expand(n, -1))
        finally:
            handle.remove()

    per_patch = IntegratedGradients(on_embeddings).attribute(embeds[None], start[None], n_steps=5).sum(2)
    per_token = per_patch.reshape(3, 2, 2, 2, 2).sum(dim=(2, 4)).flatten()  # each token's 2x2 patches
    assert ours.shape == (1, 2, 4)
    assert_close_scaled(ours[0], panned_grid(per_token, 1, 2))


@pytest.mark.parametrize("cell", [(0, 1), (1, 2)])
def test_pan_and_scan_occlusion_drops_the_crop_token_and_its_global_token(model, cell):
    model = copy.deepcopy(model).double()
    canvas = tm.pixels(1, 32, 64).double()
    ids, mask = panned_ids(crops=2)
    before = snapshot(model)
    grid = CausalOcclusion(model).attribute(canvas, additional_forward_args=(ids, mask), window=1,
                                            return_grid=True)
    assert_unchanged(model, before)
    r, c = cell
    crop_token = 4 * (1 + c // 2) + r * T + c % 2
    global_token = r * T + c // 2
    keep = torch.ones(12, dtype=torch.bool)
    keep[[crop_token, global_token]] = False
    image_cols = (ids[0] == IMG).nonzero()[:, 0]
    stay = torch.ones(ids.shape[1], dtype=torch.bool)
    stay[image_cols[~keep]] = False
    views = hand_views(canvas, 1, 2)
    handle = model.model.multi_modal_projector.register_forward_hook(
        lambda m, a, o: o.reshape(1, 12, -1)[:, keep])
    try:
        with torch.no_grad():
            fewer = summed_log_p(model, views, ids[:, stay], mask[:, stay])
    finally:
        handle.remove()
    with torch.no_grad():
        full = summed_log_p(model, views, ids, mask)
    assert_close_scaled(grid[0, r, c], (full - fewer)[0])


def test_pan_and_scan_explain_explains_the_generated_answer(model_and_processor, pan_processor):
    model, _ = model_and_processor
    wide = picture(40, 90)
    prompt = "<start_of_image> what color is the circle"
    before = snapshot(model)
    result = explain(model, pan_processor, wide, [prompt], methods=["bimodal-relevancy"], max_new_tokens=3,
                     processor_kwargs=PAN)
    assert_unchanged(model, before)
    adapter = get_adapter(model)
    inputs = adapter.processor_inputs(pan_processor(images=[[wide]], text=[prompt], return_tensors="pt",
                                                    **PAN))
    canvas, ids = inputs["pixel_values"], inputs["input_ids"]
    with torch.no_grad():
        sequence = model.generate(**adapter.model_inputs(canvas, ids, inputs["attention_mask"]),
                                  token_type_ids=token_type_ids(ids, IMG_ID(model)), max_new_tokens=3, do_sample=False)
    start = ids.shape[1]
    answer = pan_processor.tokenizer.decode(sequence[0, start:], skip_special_tokens=True).strip()
    record = next(r for r in result.records if r.target == f"{prompt} → {answer}")
    whole = BimodalRelevancy(model).attribute(canvas, target=list(range(start, sequence.shape[1])),
                                              additional_forward_args=(sequence, torch.ones_like(sequence)),
                                              return_grid=True)
    assert record.grid.shape == (2, 4)
    assert_close_scaled(record.grid, whole[0])


def test_pan_and_scan_logit_lens_word_maps_are_the_tokens_probabilities_on_their_cells(model):
    """The logit lens on a 1 x 2 canvas: each word map equals, per cell, the mean probability of
    the word over the crop token on the cell and the global token whose box holds it, from
    ``output_hidden_states`` of hand-made views (final norm, LM head), placed by hand."""
    from joint_refs import assert_varied, mean_over_covering, sharpened, word_probs_at

    import captum_vlm as cv

    sharp, words = sharpened(model), [5, 11]
    canvas = tm.pixels(1, 32, 64)
    ids, mask = panned_ids(crops=2)
    before = snapshot(sharp)
    lens = cv.lens.logit_lens_from_inputs(sharp, canvas, ids, mask, max_new_tokens=2, words=words)
    assert_unchanged(sharp, before)
    sequence = torch.cat([ids, lens.produced_ids[None]], 1)
    positions = (sequence[0] == IMG).nonzero()[:, 0]
    assert torch.equal(lens.image_positions, positions) and lens.image_grid == (2, 4)
    kwargs = {"pixel_values": hand_views(canvas, 1, 2), "input_ids": sequence,
              "attention_mask": torch.ones_like(sequence), "token_type_ids": token_type_ids(sequence)}
    probs = word_probs_at(sharp, kwargs, positions, words)  # [layers, 12 tokens, words]
    covers = torch.zeros(12, 2, 4, dtype=torch.bool)
    for g in range(4):  # global token (i, j): cells (i, 2j), (i, 2j + 1)
        covers[g, g // 2, 2 * (g % 2) : 2 * (g % 2) + 2] = True
    for crop in range(2):
        for token in range(4):
            covers[4 * (crop + 1) + token, token // 2, 2 * crop + token % 2] = True
    for k, word in enumerate(words):
        want = mean_over_covering(probs[..., k], covers.flatten(1), (2, 4))
        assert_varied(want[-1])
        assert_close_scaled(lens.word_maps[str(word)].double(), want)


def test_tower_views_refuse_a_pan_and_scan_canvas(model):
    from captum_vlm.lens import head_statistics
    from captum_vlm.lens.probes import layer_features

    canvas = tm.pixels(1, 32, 64)
    before = snapshot(model)
    with pytest.raises(ValueError, match="pixel_values: a pan-and-scan canvas of 1x2 crops"):
        head_statistics(model, {"pixel_values": canvas}, stream="vision")
    with pytest.raises(ValueError, match="pixel_values: a pan-and-scan canvas of 1x2 crops"):
        layer_features(model, canvas, layers=[0])
    assert_unchanged(model, before)


def test_cli_and_explain_take_processor_options(model_and_processor, pan_processor, tmp_path, capsys):
    """--processor-option reaches the processor call: the report explains the pan-and-scan
    answer, as explain(processor_kwargs=PAN) does; bad options are one-line errors (exit 2)."""
    model, processor = model_and_processor
    folder = tmp_path / "tiny-gemma3"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    scene = tmp_path / "wide.png"
    picture(40, 90).save(scene)
    prompt = "<start_of_image> what color is the circle"
    out = tmp_path / "report.html"
    code = main(["explain", str(scene), "--text", prompt, "--model", str(folder), "--method", "bimodal-relevancy",
                 "--processor-option", "do_pan_and_scan=true", "--processor-option", "pan_and_scan_min_crop_size=8",
                 "--out", str(out), "--png", str(tmp_path / "png"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    reference = explain(model, processor, picture(40, 90), [prompt], methods=["bimodal-relevancy"], evidence=False,
                        processor_kwargs=PAN)
    assert list(reference.scores)[0].split(" → ")[1] in out.read_text()
    saved = json.loads((tmp_path / "png" / "explanation.json").read_text())["maps"]
    assert [m["target"] for m in saved] == [r.target for r in reference.records]  # the answer, then each token
    for got, want in zip(saved, reference.records):
        grid = torch.tensor(got["grid"])
        assert grid.shape == (2, 4)  # the canvas of the global view's and two crops' tokens
        assert_close_scaled(grid, torch.as_tensor(want.grid, dtype=grid.dtype))
    capsys.readouterr()
    assert main(["explain", str(scene), "--text", prompt, "--model", str(folder), "--processor-option", "pan",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--processor-option 'pan': expected NAME=VALUE" in err
    with pytest.raises(TypeError, match="processor_kwargs: expected a dict"):
        explain(model, processor, picture(40, 90), [prompt], processor_kwargs=["do_pan_and_scan"])
    with pytest.raises(ValueError, match=r"processor_kwargs: \['padding'\] are set by the caller"):
        explain(model, processor, picture(40, 90), [prompt], processor_kwargs={"padding": False})


def test_logit_lens_takes_processor_options(model_and_processor):
    """cv.lens.logit_lens(..., processor_kwargs=PAN) lenses the pan-and-scan input: the canvas'
    image grid, and its last layer is the model's own next-token softmax on that input."""
    import captum_vlm as cv

    model, processor = model_and_processor
    wide, prompt = picture(40, 90), "<start_of_image> what color is the circle"
    lens = cv.lens.logit_lens(model, processor, wide, prompt, max_new_tokens=2, processor_kwargs=PAN)
    assert lens.image_grid == (2, 4)
    adapter = get_adapter(model)
    inputs = adapter.processor_inputs(processor(images=[[wide]], text=[prompt], return_tensors="pt", **PAN))
    sequence = torch.cat([inputs["input_ids"], lens.produced_ids[None]], 1)
    with torch.no_grad():
        logits = model(**adapter.model_inputs(inputs["pixel_values"], sequence, torch.ones_like(sequence)),
                       token_type_ids=token_type_ids(sequence, IMG_ID(model))).logits
    start = inputs["input_ids"].shape[1]
    own = F.softmax(logits[0].double(), -1)[start - 1 : -1].gather(-1, sequence[0, start:, None])[:, 0]
    assert_close_scaled(lens.produced_probs[-1].double(), own)
    with pytest.raises(ValueError, match=r"processor_kwargs: \['text'\] are set by the caller"):
        cv.lens.logit_lens(model, processor, wide, prompt, processor_kwargs={"text": "x"})
