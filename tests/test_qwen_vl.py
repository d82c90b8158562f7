"""Qwen2-VL / Qwen2.5-VL: the processor's flattened patches as one image tensor and back, the
merged-token layout found by planting a feature, Grad-CAM / relevancy / IG / occlusion against
references computed here from the model's own outputs (eager attentions, autograd, inputs_embeds),
and ``explain`` / the CLI on the model's own generated answer.

The processor is the real ``Qwen2_5_VLProcessor`` (PIL image processor at 4-pixel patches, the
zoo's word tokenizer plus the Qwen placeholders); without torchvision no video processor can be
built, so the test class leaves that sub-processor out.
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
from transformers import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from captum_vlm.adapters import get_adapter
from captum_vlm.attr import (
    BimodalRelevancy,
    CausalOcclusion,
    CrossAttentionGradCAM,
    TokenIntegratedGradients,
)
from captum_vlm.explain import explain
from captum_vlm.zoo.processing import build_tokenizer

FACTORIES = [tm.qwen2_5_vl, tm.qwen2_vl]
PROMPT = "<|vision_start|><|image_pad|><|vision_end|> what color is the circle"


def make_processor() -> Qwen2_5_VLProcessor:
    """The real Qwen2.5-VL processor at the tiny models' sizes (without its video processor)."""
    tokenizer = build_tokenizer(128)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]})
    ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"])
    assert ids == [tm.QWEN_IMAGE_TOKEN, tm.QWEN_VISION_START, tm.QWEN_VISION_END, tm.QWEN_VIDEO_TOKEN]
    assert len(tokenizer) <= tm.VOCAB
    image_processor = Qwen2VLImageProcessorPil(patch_size=tm.QWEN_PATCH, merge_size=tm.QWEN_MERGE,
                                               temporal_patch_size=2,
                                               size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48})
    return tm.image_only(Qwen2_5_VLProcessor)(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def processor():
    return make_processor()


@pytest.fixture(scope="module")
def image():
    """40 x 64 pixels: the processor resizes it to 32 x 56, a 4 x 7 grid of merged tokens."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=FACTORIES, ids=lambda f: f.__name__)
def model(request):
    return request.param()


def eager_copy(model):
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin


def raw_inputs(processor, image, prompts=(PROMPT,)):
    return processor(images=[image] * len(prompts), text=list(prompts), return_tensors="pt", padding=True)


def log_probs(logits, ids):
    """log p(ids[t] | ids[<t]) at t = 1.. ``[B, T-1]``."""
    return F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]


# ----- the processor's image inputs ------------------------------------------------------------
def test_processor_inputs_are_the_processed_image_exactly(model, processor, image):
    raw = raw_inputs(processor, image, [PROMPT, "<|vision_start|><|image_pad|><|vision_end|> how many"])
    adapter = get_adapter(model)
    inputs = adapter.processor_inputs(raw)
    pixels = inputs["pixel_values"]
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    assert pixels.shape == (2, 3, 32, 56) and adapter.patch_grid(pixels) == (4, 7)
    assert adapter.patch_size() == (tm.PATCH, tm.PATCH)
    kwargs = adapter.model_inputs(pixels, inputs["input_ids"], inputs["attention_mask"])
    assert torch.equal(kwargs["pixel_values"], raw["pixel_values"])
    assert torch.equal(kwargs["image_grid_thw"], raw["image_grid_thw"])
    assert torch.equal(kwargs["mm_token_type_ids"], raw["mm_token_type_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**kwargs).logits, model(**raw).logits, rtol=0, atol=0)
    # the patches are the resized, normalised image: pixel (0, 0..3) of the first patch, channel 0
    first = raw["pixel_values"][0].reshape(3, 2, tm.QWEN_PATCH, tm.QWEN_PATCH)
    assert torch.equal(pixels[0, :, : tm.QWEN_PATCH, : tm.QWEN_PATCH], first[:, 0])
    assert torch.equal(first[:, 0], first[:, 1])


def test_processor_inputs_refuse_what_is_not_one_image_per_example(processor, image):
    adapter = get_adapter(tm.qwen2_5_vl())
    two = processor(images=[image, image], text=[PROMPT.replace("circle", PROMPT)], return_tensors="pt")
    with pytest.raises(ValueError, match="2 images for 1 texts; captum-vlm explains one image per example"):
        adapter.processor_inputs(two)
    small = image.resize((24, 24))
    mixed = processor(images=[image, small], text=[PROMPT, PROMPT], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match=r"canvases \[\(32, 56\), \(24, 24\)\]; .* must share one canvas size"):
        adapter.processor_inputs(mixed)
    with pytest.raises(ValueError, match="flattened pixel_values"):
        adapter.processor_inputs({"pixel_values": torch.zeros(1, 3, 32, 32)})
    pixels = adapter.processor_inputs(raw_inputs(processor, image))["pixel_values"]
    ids = torch.tensor([[tm.BOS] + [tm.QWEN_IMAGE_TOKEN] * 27 + [9]])
    with pytest.raises(ValueError, match=r"hold \[27\] image tokens but the 4x7 grid .* needs 28"):
        adapter.model_inputs(pixels, ids)


# ----- the layout, by planting a feature ---------------------------------------------------------
def _embeds_and_layout(model, pixels, ids):
    """The language model's input embeddings ``[B, L, D]`` and the adapter's layout."""
    adapter, seen = get_adapter(model), {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(x=k["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad(), adapter.image_layout(pixels, ids) as layout:
            model(**adapter.model_inputs(pixels, ids))
    finally:
        handle.remove()
    return seen["x"], layout()


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
@pytest.mark.parametrize("cell", [(0, 0), (1, 2), (2, 3)])
def test_layout_finds_a_planted_cell(model, size, cell):
    """With the vision attention silenced (each patch then stays itself through the tower), a
    change to the pixels of one merged cell changes exactly one image token of the language model,
    and the layout maps it back to that cell: the merge blocks, Qwen2.5-VL's window reordering and
    the row-major placement are read right."""
    adapter = get_adapter(model)
    grid = (size[0] // tm.PATCH, size[1] // tm.PATCH)
    pixels = tm.pixels(2, *size)
    ids = torch.tensor([[tm.BOS, 9, tm.QWEN_VISION_START] + [tm.QWEN_IMAGE_TOKEN] * (grid[0] * grid[1])
                        + [tm.QWEN_VISION_END, 11, 12]] * 2)
    silence = [block.attn.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
               for block in adapter.vision_blocks()]
    try:
        before, _ = _embeds_and_layout(model, pixels, ids)
        changed = pixels.clone()
        r, c = cell
        changed[:, :, r * tm.PATCH : (r + 1) * tm.PATCH, c * tm.PATCH : (c + 1) * tm.PATCH] += 1.0
        after, layout = _embeds_and_layout(model, changed, ids)
    finally:
        for handle in silence:
            handle.remove()
    marked = ((after - before).abs().amax(-1) > 1e-6).float()
    assert marked.sum() == 2  # one token per example
    expected = torch.zeros(2, *grid)
    expected[:, r, c] = 1.0
    assert torch.equal(layout.to_grid(marked[:, None])[:, 0], expected)


def test_drop_image_tokens_is_scoped():
    model = tm.qwen2_5_vl()
    adapter = get_adapter(model)
    before = snapshot(model)
    keep = torch.ones(1, 4, 4)
    keep[0, 1] = 0
    ids = torch.tensor([[tm.BOS, 9] + [tm.QWEN_IMAGE_TOKEN] * 16 + [11, 12]])
    with adapter.drop_image_tokens(keep) as stays:
        stay = stays(ids)
        assert stay.sum() == ids.shape[1] - 4 and not stay[0, 6:10].any() and stay[0, 2:6].all()
    assert_unchanged(model, before)
    with pytest.raises(RuntimeError, match="boom"), adapter.drop_image_tokens(keep):
        raise RuntimeError("boom")
    assert_unchanged(model, before)
    assert adapter._dropping is None


# ----- methods against references ---------------------------------------------------------------
def _reference(model, raw):
    """Eager forward on the processor's own inputs with graph: log-probs [B, T-1], attentions."""
    out = model(**raw, output_attentions=True)
    return log_probs(out.logits, raw["input_ids"]), out.attentions


def test_gradcam_equals_reference(model, processor, image):
    raw = raw_inputs(processor, image, [PROMPT, "<|vision_start|><|image_pad|><|vision_end|> how many"])
    adapter = get_adapter(model)
    inputs = adapter.processor_inputs(raw)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    targets = [31, 32]  # text after the image block, in both rows
    got = CrossAttentionGradCAM(model, layer=0).attribute_tokens(
        inputs["pixel_values"], target=targets, additional_forward_args=(ids, mask), return_grid=True)
    ref = eager_copy(model)
    log_p, attentions = _reference(ref, raw)
    image_cols = (ids[0] == tm.QWEN_IMAGE_TOKEN).nonzero()[:, 0]
    for t in targets:
        grad = torch.autograd.grad(log_p[:, t - 1].sum(), attentions[0], retain_graph=True)[0]
        cam = (attentions[0] * grad.clamp(min=0)).mean(1)  # [B, Q, K]
        for b in range(2):
            text_rows = mask[b].bool() & (ids[b] != tm.QWEN_IMAGE_TOKEN)
            want = cam[b][text_rows][:, image_cols].sum(0).reshape(4, 7)
            assert_close_scaled(got[b, t], want)


def test_relevancy_equals_joint_rule(model, processor, image):
    raw = raw_inputs(processor, image)
    adapter = get_adapter(model)
    inputs = adapter.processor_inputs(raw)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    got = BimodalRelevancy(model).attribute_tokens(inputs["pixel_values"], target=[32, 33],
                                                   additional_forward_args=(ids, mask), return_grid=True)
    log_p, attentions = _reference(eager_copy(model), raw)
    image_cols = (ids[0] == tm.QWEN_IMAGE_TOKEN).nonzero()[:, 0]
    for t in (32, 33):
        grads = torch.autograd.grad(log_p[:, t - 1].sum(), attentions, retain_graph=True)
        r = torch.eye(ids.shape[1])
        for a, g in zip(attentions, grads):
            r = r + (a * g).clamp(min=0).mean(1)[0] @ r
        assert_close_scaled(got[0, t], r[t - 1, image_cols].reshape(4, 7))


def _summed_log_p(model, raw_or_embeds: dict, ids: torch.Tensor) -> torch.Tensor:
    """TokenLogProbs(reduction="sum") by hand: every text position after the first."""
    logits = model(**raw_or_embeds).logits
    scored = (ids[:, 1:] != tm.QWEN_IMAGE_TOKEN) & raw_or_embeds["attention_mask"][:, 1:].bool()
    return (log_probs(logits, ids) * scored).sum(1)


def test_integrated_gradients_equal_a_hand_made_path_integral(processor, image):
    model = tm.qwen2_5_vl().double()
    raw = {k: (v.double() if v.is_floating_point() else v) for k, v in raw_inputs(processor, image).items()}
    adapter = get_adapter(model)
    inputs = adapter.processor_inputs(raw)
    n_steps = 4
    got, delta = TokenIntegratedGradients(model).attribute(
        inputs["pixel_values"], additional_forward_args=(inputs["input_ids"], inputs["attention_mask"]),
        n_steps=n_steps, method="riemann_trapezoid", return_grid=True, return_convergence_delta=True)
    # by hand: the patch embeddings scaled from 0 (the embedding of zero pixels) to their value
    embed = model.model.visual.patch_embed
    attributions, base = embedding_path_integral(
        embed, raw["pixel_values"], lambda: _summed_log_p(model, raw, raw["input_ids"]).sum(), n_steps)
    per_patch = attributions.sum(-1)  # processor order: 2x2 blocks of the 4 x 7 merged grid
    want = per_patch.reshape(4, 7, 4).sum(-1)
    assert_close_scaled(got[0], want)
    with torch.no_grad():
        change = _summed_log_p(model, raw, raw["input_ids"])
        handle = embed.register_forward_hook(lambda m, a, out: base)
        try:
            change = change - _summed_log_p(model, raw, raw["input_ids"])
        finally:
            handle.remove()
    torch.testing.assert_close(delta, want.sum()[None] - change)


def _drop_reference(model, raw, cells):
    """The summed log-probability with the image tokens of ``cells`` (flat merged-grid indices)
    removed from the language model's input, built from the model's own pieces: its input
    embeddings with the image features written in, its M-RoPE positions of the whole sequence,
    and the columns of the dropped tokens deleted."""
    inner = model.model
    ids, mask = raw["input_ids"], raw["attention_mask"]
    with torch.no_grad():
        features = torch.cat(inner.get_image_features(raw["pixel_values"], raw["image_grid_thw"]).pooler_output)
        embeds = inner.get_input_embeddings()(ids)
        image = ids == tm.QWEN_IMAGE_TOKEN
        embeds[image] = features.to(embeds.dtype)
        positions, _ = inner.get_rope_index(ids, raw["mm_token_type_ids"], raw["image_grid_thw"],
                                            attention_mask=mask)
        image_cols = image[0].nonzero()[:, 0]
        stay = torch.ones(ids.shape[1], dtype=torch.bool)
        stay[image_cols[list(cells)]] = False
        shortened = {"inputs_embeds": embeds[:, stay], "position_ids": positions[:, :, stay],
                     "attention_mask": mask[:, stay]}
        return _summed_log_p(model, shortened, ids[:, stay])


def test_occlusion_drop_and_paint_equal_references(processor, image):
    model = tm.qwen2_5_vl().double()
    raw = {k: (v.double() if v.is_floating_point() else v) for k, v in raw_inputs(processor, image).items()}
    adapter = get_adapter(model)
    inputs = adapter.processor_inputs(raw)
    pixels, args = inputs["pixel_values"], (inputs["input_ids"], inputs["attention_mask"])
    occlusion = CausalOcclusion(model)
    # (Captum's Occlusion returns float32 maps for this float64 model, as for LLaVA)
    dropped = occlusion.attribute(pixels, additional_forward_args=args, window=1, return_grid=True)[0]
    with torch.no_grad():
        intact = _summed_log_p(model, raw, raw["input_ids"])[0]
    for r, c in [(0, 0), (1, 3), (3, 6)]:
        want = intact - _drop_reference(model, raw, [r * 7 + c])[0]
        assert_close_scaled(dropped[r, c], want)
    # a 2x2 window that the grid's right edge cuts to 2x1 drops those two tokens
    windows = occlusion.attribute(pixels, additional_forward_args=args, window=2, return_grid=True)[0]
    assert_close_scaled(windows[0, 6], intact - _drop_reference(model, raw, [6, 13])[0])
    # paint: grey (0) over one cell's pixels, through the processor's patch layout by hand
    painted = occlusion.attribute(pixels, additional_forward_args=args, window=1, intervention="paint",
                                  return_grid=True)[0]
    flat = raw["pixel_values"].reshape(4, 7, 2, 2, 3, 2, tm.QWEN_PATCH, tm.QWEN_PATCH).clone()
    flat[1, 3] = 0.0  # the four patches of merged cell (1, 3), both temporal copies
    with torch.no_grad():
        want = intact - _summed_log_p(model, {**raw, "pixel_values": flat.reshape(raw["pixel_values"].shape)},
                                      raw["input_ids"])[0]
    assert_close_scaled(painted[1, 3], want)


# ----- explain and the CLI on the model's own answer ---------------------------------------------
@pytest.mark.parametrize("method", ["cross-attention-gradcam", "bimodal-relevancy"])
def test_explain_explains_each_generated_token(processor, image, method):
    model = tm.qwen2_5_vl()
    prompts = [PROMPT, "<|vision_start|><|image_pad|><|vision_end|> how many"]
    result = explain(model, processor, image, prompts, methods=[method], max_new_tokens=3, evidence=False)
    explainer = {"cross-attention-gradcam": CrossAttentionGradCAM, "bimodal-relevancy": BimodalRelevancy}[method](model)
    adapter = get_adapter(model)
    for prompt in prompts:
        raw = raw_inputs(processor, image, [prompt])  # this prompt alone
        with torch.no_grad():
            sequence = model.generate(**raw, max_new_tokens=3, do_sample=False)
            start = raw["input_ids"].shape[1]
            long_raw = {**raw, "input_ids": sequence, "attention_mask": torch.ones_like(sequence),
                        "mm_token_type_ids": (sequence == tm.QWEN_IMAGE_TOKEN).long()}
            logits = model(**long_raw).logits
        log_p = log_probs(logits, sequence)[0, start - 1 :].sum()
        answer = processor.tokenizer.decode(sequence[0, start:], skip_special_tokens=True).strip()
        title = f"{prompt} → {answer}"
        assert result.scores[title] == pytest.approx(float(log_p.exp()), rel=1e-4)
        pixels = adapter.processor_inputs(raw)["pixel_values"]
        generated = list(range(start, sequence.shape[1]))
        whole = explainer.attribute(pixels, target=generated, additional_forward_args=(sequence, torch.ones_like(sequence)),
                                    return_grid=True)[0]
        record = next(r for r in result.records if r.target == title)
        assert record.grid.shape == (4, 7)
        assert_close_scaled(record.grid, whole)


def test_cli_explains_a_qwen_model(processor, image, tmp_path, monkeypatch, capsys):
    """The CLI end to end; the loader is replaced because AutoProcessor would rebuild the video
    processor, which needs torchvision (not installed here)."""
    from captum_vlm import cli

    model = tm.qwen2_5_vl()
    monkeypatch.setattr(cli, "load_model", lambda spec: (model, processor))
    path = tmp_path / "scene.png"
    image.save(path)
    out = tmp_path / "report.html"
    code = cli.main(["explain", str(path), "--text", PROMPT, "--model", "tiny-qwen", "--method",
                     "cross-attention-gradcam", "--out", str(out), "--png", str(tmp_path / "png"), "--quiet"])
    assert code == 0, capsys.readouterr()
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert len(list((tmp_path / "png").glob("*.png"))) >= 1


def test_logit_lens_reads_the_models_own_layers(processor, image):
    from captum_vlm.lens import logit_lens

    model = tm.qwen2_5_vl()
    before = snapshot(model)
    lens = logit_lens(model, processor, image, PROMPT, k=3, max_new_tokens=3, words=["red"])
    assert_unchanged(model, before)
    assert lens.image_grid == (4, 7)
    raw = raw_inputs(processor, image)
    start = raw["input_ids"].shape[1]
    tokens = torch.cat([raw["input_ids"], lens.produced_ids[None]], 1)
    adapter = get_adapter(model)
    with torch.no_grad():
        assert torch.equal(model.generate(**raw, max_new_tokens=3, do_sample=False)[0, start:], lens.produced_ids)
        out = model(**{**raw, "input_ids": tokens, "attention_mask": torch.ones_like(tokens),
                       "mm_token_type_ids": (tokens == tm.QWEN_IMAGE_TOKEN).long()}, output_hidden_states=True)
        last = torch.softmax(out.logits[0, start - 1 : -1], -1)
        image_cols = (tokens[0] == tm.QWEN_IMAGE_TOKEN).nonzero()[:, 0]
        layer = 1
        probs = torch.softmax(adapter.lm_head()(adapter.final_norm()(out.hidden_states[layer][0, image_cols])), -1)
    assert_close_scaled(lens.produced_probs[-1], last.gather(1, lens.produced_ids[:, None])[:, 0])
    red = processor.tokenizer.convert_tokens_to_ids("red")
    assert_close_scaled(lens.word_map("red", layer), probs[:, red].reshape(4, 7))


# ----- lens: head statistics on the processor's own inputs --------------------------------------------
def test_head_statistics_text_stream_on_the_processors_inputs(model, processor, image):
    from captum_vlm.lens import attention_statistics, head_statistics

    raw = raw_inputs(processor, image, [PROMPT, "<|vision_start|><|image_pad|><|vision_end|> how many"])
    pixels = get_adapter(model).processor_inputs(raw)["pixel_values"]  # [2, 3, 32, 56]
    masks = torch.zeros(2, *pixels.shape[-2:], dtype=torch.bool)
    masks[0, :, :32] = True  # merged tokens of 8 pixels: columns 0..3 of the 4 x 7 grid
    masks[1, 16:] = True  # rows 2..3
    before = snapshot(model)
    stats = head_statistics(model, raw, stream="text", masks=masks)
    assert_unchanged(model, before)
    with torch.no_grad():  # reference: the eager model on the processor's own inputs
        attentions = eager_copy(model)(**raw, output_attentions=True).attentions
    ids = raw["input_ids"]
    image_positions = (ids[0] == tm.QWEN_IMAGE_TOKEN).nonzero()[:, 0]  # both rows: the same place
    assert torch.equal(image_positions, (ids[1] == tm.QWEN_IMAGE_TOKEN).nonzero()[:, 0])
    assert len(image_positions) == 4 * 7  # merged tokens row by row on the 4 x 7 grid
    want = attention_statistics(attentions, torch.tensor([0]), image_positions, image_positions, (4, 7),
                                masks=masks)
    for name in ("entropy", "sink_mass", "distance"):
        assert_close_scaled(getattr(stats, name), getattr(want, name))
    assert_close_scaled(stats.pointing + 1, want.pointing + 1)  # hit rates, 0 where no head points there
    assert np.isfinite(stats.pointing).all() and (want.pointing > 0).any()
    again = head_statistics(model, {**get_adapter(model).processor_inputs(raw), "input_ids": ids,
                                    "attention_mask": raw["attention_mask"]}, stream="text", masks=masks)
    assert_close_scaled(again.entropy, stats.entropy)  # the image tensor itself gives the same
    with pytest.raises(ValueError, match="stream: .* has no 'vision' attention"):
        head_statistics(model, raw, stream="vision")
