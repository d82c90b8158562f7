"""BLIP-2 and InstructBLIP (``Blip2ForConditionalGeneration``, ``InstructBlipForConditionalGeneration``,
OPT language model): the adapters' facts, the query layout (planted features), and every map
against a reference written here from the model's own pieces with eager attentions and autograd:
Grad-CAM and relevancy composed word -> queries -> patches, per-query maps, IG's completeness,
occlusion's drops; then explain() and the CLI on the model's own generated answer."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from joint_refs import explained_lenses
from model_state import assert_unchanged, snapshot
from numerics import assert_close_scaled
from PIL import Image

import captum_vlm as cv
from captum_vlm.adapters import classes_for_tasks, get_adapter
from captum_vlm.attr import (
    BimodalRelevancy,
    CausalOcclusion,
    CrossAttentionGradCAM,
    TokenIntegratedGradients,
)
from captum_vlm.targets import TokenLogProbs

GRID = (tm.IMAGE_SIZE // tm.PATCH, tm.IMAGE_SIZE // tm.PATCH)
N = tm.BLIP2_QUERIES
WORDS = [9, 11, 12, 13]


FAMILIES = {"blip2": tm.blip2, "instructblip": tm.instructblip}


@functools.cache
def model_of(family: str = "blip2", frequency: int = 1):
    """``family`` of FAMILIES, or ``"instructblip-llama"`` (a Llama-style language model, as
    InstructBLIP's Vicuna checkpoints)."""
    if family == "instructblip-llama":
        return tm.instructblip(cross_attention_frequency=frequency, language_model="llama").double()
    return FAMILIES[family](cross_attention_frequency=frequency).double()


def _inputs(model, batch: int = 2):
    """``pixel_values`` and ``additional_forward_args``: the prompt with its placeholders (and
    InstructBLIP's instruction for the Q-Former), the second row one word shorter (padded)."""
    pixels = tm.pixels(batch, seed=3).double()
    ids, mask = tm.image_prompt(model, WORDS, batch)
    mask[1, -1] = 0
    return pixels, (ids, mask, *tm.extra_text_inputs(model, batch))


# ----- the adapter -----------------------------------------------------------------------------------
def test_adapter_facts():
    model = model_of("blip2", 2)
    adapter = get_adapter(model)
    assert (adapter.family, adapter.task, adapter.image_stream, adapter.image_tokens) == (
        "blip2", "generate", "joint", "queries")
    assert adapter.image_tokens_in_input_ids and adapter.probability == "exp"
    assert type(adapter.default_target()) is TokenLogProbs
    assert "Blip2ForConditionalGeneration" in classes_for_tasks(["generate"])
    assert adapter.num_image_tokens(tm.pixels(1)) == N and adapter.patch_grid(tm.pixels(1)) == GRID
    assert {tm.BOS, tm.EOS, tm.BLIP2_IMAGE_TOKEN} <= adapter.special_token_ids
    layers = model.qformer.encoder.layer
    assert adapter.bridge_blocks() == [(layers[0].attention.attention, layers[0].crossattention.attention),
                                       (layers[1].attention.attention, None)]  # every other layer, as on the hub
    assert adapter.bridge_attentions() == [layers[0].crossattention.attention]
    decoder = model.language_model.model.decoder
    assert adapter.text_attentions() == [b.self_attn for b in decoder.layers] == adapter.cross_attentions()
    assert adapter.final_norm() is decoder.final_layer_norm and adapter.lm_head() is model.language_model.lm_head
    assert adapter.text_embedding() is decoder.embed_tokens
    ids, mask = tm.image_prompt(model, WORDS)
    keep = adapter.special_token_mask(ids, mask)
    assert keep[0].tolist() == [True] * N + [True] + [False] * 3 + [True]  # queries, BOS, words, pooled
    assert adapter.extra_text_inputs == ()


def test_instructblip_adapter_facts_and_the_instruction_moves_the_queries():
    """The Q-Former reads the instruction: another instruction, other per-query maps, with the
    language model's input unchanged."""
    model = model_of("instructblip", 2)
    adapter = get_adapter(model)
    assert (adapter.family, adapter.task, adapter.image_tokens) == ("instructblip", "generate", "queries")
    assert adapter.extra_text_inputs == ("qformer_input_ids", "qformer_attention_mask")
    assert adapter.bridge_embedding() is model.qformer.embeddings
    assert len(adapter.bridge_blocks()) == 2 and len(adapter.bridge_attentions()) == 1
    pixels, (ids, mask, q_ids, q_mask) = _inputs(model)
    inputs = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask, "qformer_attention_mask": q_mask}
    one = cv.lens.query_maps(model, {**inputs, "qformer_input_ids": q_ids})
    other = cv.lens.query_maps(model, {**inputs, "qformer_input_ids": q_ids.flip(1)})
    assert (one - other).abs().max() > 1e-6
    with pytest.raises(ValueError, match="also needs qformer_input_ids"):
        TokenLogProbs(model)(pixels, ids, mask)
    with pytest.raises(ValueError, match="also needs qformer_input_ids, qformer_attention_mask"):
        CrossAttentionGradCAM(model).attribute(pixels, additional_forward_args=(ids, mask))
    with pytest.raises(ValueError, match="also needs qformer_input_ids, qformer_attention_mask .* got 3 tensors"):
        TokenLogProbs(model)(pixels, ids, mask, q_ids)
    with pytest.raises(ValueError, match=r"qformer_input_ids: expected an integer tensor \[B, Q\], got torch.float32"):
        TokenLogProbs(model)(pixels, ids, mask, q_ids.float(), q_mask)
    with pytest.raises(ValueError, match=r"expected two \[B=2, Q\] tensors alike, got \(1, 5\) and \(1, 5\)"):
        TokenLogProbs(model)(pixels, ids, mask, q_ids[:1], q_mask[:1])
    # the Q-Former's instruction has its own length: not checked against input_ids'
    assert q_ids.shape[1] != ids.shape[1]
    assert torch.isfinite(TokenLogProbs(model, reduction="sum")(pixels, ids, mask, q_ids, q_mask)).all()


def test_query_layout_to_grid_by_hand():
    """Two queries at positions 3 and 1 of a 5-token sequence, a 1x2 grid behind a CLS: a query's
    score is spread over the patches by its bridge row (one bridge for all rows, or one per row)."""
    from captum_vlm.adapters.layout import ImageTokenLayout

    layout = ImageTokenLayout.queries(torch.tensor([[False, True, False, True, False]]), (1, 2), 2, bridge_prefix=1)
    assert layout.needs_bridge and layout.columns.tolist() == [[1, 3]]
    values = torch.tensor([[[0.0, 2.0, 0.0, 10.0, 5.0]]])
    bridge = torch.tensor([[[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]]])  # query 0 (position 1), query 1 (position 3)
    assert layout.to_grid(values, bridge).tolist() == [[[[2 * 0.25 + 10 * 1.0, 2 * 0.25]]]]
    per_row = torch.stack([bridge, bridge.flip(-1)], 1)  # [B, R=2, N, K]
    two = layout.to_grid(values.expand(1, 2, 5), per_row)
    assert two[0, 1].tolist() == [[2 * 0.25 + 10 * 1.0, 2 * 0.5]]  # row 1: the flipped bridge
    assert layout.bridge_grid(bridge).tolist() == [[[[0.25, 0.25]], [[1.0, 0.0]]]]
    with pytest.raises(ValueError, match="bridge: expected \\[B, 2 queries, 1 \\+ 1x2 vision tokens\\]"):
        layout.to_grid(values, bridge[..., 1:])
    with pytest.raises(ValueError, match=r"input_ids: the text holds \[1\] image tokens"):
        ImageTokenLayout.queries(torch.tensor([[True, False]]), (1, 2), 2)


def test_t5_language_model_is_refused_by_name():
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    parts = tm._blip2_parts(0)
    parts["text_config"] = dict(model_type="t5", vocab_size=tm.VOCAB, d_model=tm.HIDDEN, d_ff=64, num_layers=1,
                                num_heads=tm.HEADS, d_kv=8, pad_token_id=tm.PAD, eos_token_id=tm.EOS)
    model = Blip2ForConditionalGeneration(Blip2Config(**parts))
    with pytest.raises(TypeError, match="model: Blip2ForConditionalGeneration with an encoder-decoder"):
        get_adapter(model)
    with pytest.raises(TypeError, match="model: Blip2ForConditionalGeneration"):
        CrossAttentionGradCAM(model)


def test_a_llama_language_model_is_read_too():
    """InstructBLIP's Vicuna checkpoints: the blocks, norm, head and embedding of a Llama-style
    language model (its maps are checked against the reference below)."""
    model = model_of("instructblip-llama")
    adapter = get_adapter(model)
    inner = model.language_model.model
    assert adapter.text_attentions() == [b.self_attn for b in inner.layers]
    assert adapter.final_norm() is inner.norm and adapter.lm_head() is model.language_model.lm_head
    assert adapter.head_projections("text") == [b.self_attn.o_proj for b in inner.layers]


@pytest.mark.parametrize("family", FAMILIES)
def test_query_layout_planted_features(family):
    """(1) A feature planted in the projection of query j lands in the language model's input at
    the layout's column j, and a score there reaches the grid through bridge row j. (2) Every
    query reads every patch, so a changed region changes all queries; the region is found on the
    bridge's key axis instead: the vision token that changes when patch (r, c) changes maps back
    to cell (r, c), CLS dropped."""
    model = model_of(family)
    adapter = get_adapter(model)
    pixels, args = _inputs(model)
    ids, mask = args[:2]
    forward = dict(zip(("input_ids", "attention_mask", *adapter.extra_text_inputs), args))
    seen = {}
    lm_hook = model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(x=k["inputs_embeds"]), with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    bridge = torch.rand(2, N, 1 + GRID[0] * GRID[1], generator=g, dtype=torch.float64)
    try:
        for j in range(N):
            plant = model.language_projection.register_forward_hook(
                lambda m, a, out, j=j: out.index_fill(1, torch.tensor([j]), 7.0))
            try:
                with torch.no_grad(), adapter.image_layout(pixels, ids) as layout:
                    model(pixel_values=pixels, **forward)
            finally:
                plant.remove()
            marked = (seen["x"] == 7.0).all(-1)
            assert marked.sum(1).tolist() == [1, 1]
            assert torch.equal(marked.nonzero()[:, 1], layout().columns[:, j])
            grid = layout().to_grid(marked[:, None].double(), bridge)[:, 0]
            torch.testing.assert_close(grid, bridge[:, j, 1:].reshape(2, *GRID))
    finally:
        lm_hook.remove()
    for r, c in [(0, 0), (1, 2), (3, 3)]:
        changed = pixels.clone()
        changed[:, :, r * tm.PATCH : (r + 1) * tm.PATCH, c * tm.PATCH : (c + 1) * tm.PATCH] += 1.0
        with torch.no_grad():
            moved = (model.vision_model.embeddings(changed) - model.vision_model.embeddings(pixels)).abs().amax(-1) > 0
        grids = layout().bridge_grid(moved[:, None, :].expand(2, N, -1).double())
        expected = torch.zeros(2, N, *GRID, dtype=torch.float64)
        expected[:, :, r, c] = 1
        assert torch.equal(grids, expected)
    with pytest.raises(ValueError, match="bridge: the 4 image tokens are learned queries"):
        layout().to_grid(torch.zeros(2, 1, ids.shape[1]))


@pytest.mark.parametrize("family", FAMILIES)
def test_too_few_placeholders_named_before_any_forward(family):
    model = model_of(family)
    pixels, (ids, mask, *extra) = _inputs(model)
    before = snapshot(model)
    for method in (CrossAttentionGradCAM(model), BimodalRelevancy(model), TokenIntegratedGradients(model)):
        with pytest.raises(ValueError, match=r"input_ids: the text holds \[3, 3\] image tokens .* 4 query"):
            method.attribute(pixels, additional_forward_args=(ids[:, 1:], mask[:, 1:], *extra))
    assert_unchanged(model, before)


# ----- the reference: BLIP-2's forward written out, every attention kept -------------------------------
def _reference(model, pixels, ids, mask, q_ids=None, q_mask=None):
    """Logits and the attentions (vision, Q-Former self and cross, language model) of the eager
    model, computed from transformers' own modules without captum-vlm (InstructBLIP: the
    Q-Former reads the instruction ``q_ids`` after the queries)."""
    vision = model.vision_model(pixel_values=pixels, output_attentions=True)
    image = vision.last_hidden_state
    queries = model.query_tokens.expand(pixels.shape[0], -1, -1)
    instruction = {}
    if q_ids is not None:
        instruction = dict(input_ids=q_ids, attention_mask=torch.cat([torch.ones(q_ids.shape[0], N, dtype=torch.long),
                                                                      q_mask], 1))
    qformer = model.qformer(query_embeds=queries, encoder_hidden_states=image, output_attentions=True,
                            encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long), **instruction)
    features = model.language_projection(qformer.last_hidden_state[:, :N])
    embeds = model.language_model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == tm.BLIP2_IMAGE_TOKEN)[..., None], features)
    lm = model.language_model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True)
    # transformers' recorder lists the cross-attentions among qformer.attentions too: keep the
    # self-attentions, square over the queries (and the instruction)
    own = [a for a in qformer.attentions if a.shape[-1] == a.shape[-2]]
    return lm.logits, list(vision.attentions), own, list(qformer.cross_attentions), list(lm.attentions)


def _log_p(logits, ids, t):
    """log p(ids[:, t] | ids[:, <t]) per row."""
    return F.log_softmax(logits[:, t - 1], -1).gather(1, ids[:, t, None])[:, 0]


def _abar(a, g):
    return (a * g).clamp(min=0).mean(1)


def _eager(family="blip2", frequency=1):
    eager = copy.deepcopy(model_of(family, frequency))
    eager.set_attn_implementation("eager")
    return eager


def _scored(ids, mask):
    """Positions with a map: attended, not an image placeholder, not position 0."""
    scored = mask.bool() & (ids != tm.BLIP2_IMAGE_TOKEN)
    scored[:, 0] = False
    return [t for t in range(ids.shape[1]) if bool(scored[:, t].any())], scored


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_is_the_models_forward(family):
    model = _eager(family)
    pixels, args = _inputs(model)
    names = ("input_ids", "attention_mask", *get_adapter(model).extra_text_inputs)
    with torch.no_grad():
        torch.testing.assert_close(_reference(model, pixels, *args)[0],
                                   model(pixel_values=pixels, **dict(zip(names, args))).logits)


@pytest.mark.parametrize("family", [*FAMILIES, "instructblip-llama"])
def test_gradcam_composes_word_queries_patches(family):
    """Token t's map: the language model's Grad-CAM at the middle layer summed over text rows,
    read at the query columns, times the Q-Former's gradient-weighted cross-attention (mean over
    its cross-attention layers), CLS dropped."""
    model = model_of(family)
    pixels, args = _inputs(model)
    ids, mask = args[:2]
    positions, scored = _scored(ids, mask)
    got = CrossAttentionGradCAM(model).attribute_tokens(pixels, additional_forward_args=args, return_grid=True)
    whole = CrossAttentionGradCAM(model).attribute(pixels, additional_forward_args=args, return_grid=True)
    logits, _, _, cross, lm = _reference(_eager(family), pixels, *args)
    text_rows = (mask.bool() & (ids != tm.BLIP2_IMAGE_TOKEN)).double()
    image_cols = ids[0] == tm.BLIP2_IMAGE_TOKEN
    expected = torch.zeros_like(got)
    for t in positions:
        grads = torch.autograd.grad(_log_p(logits, ids, t).sum(), [lm[1], *cross], retain_graph=True)
        cam = (lm[1] * grads[0].clamp(min=0)).mean(1)  # [B, L, L]
        to_queries = (cam * text_rows[:, :, None]).sum(1)[:, image_cols]  # [B, N]
        bridge = torch.stack([_abar(a, g) for a, g in zip(cross, grads[1:])]).mean(0)[:, :, 1:]
        expected[:, t] = torch.einsum("bn,bnp->bp", to_queries, bridge).reshape(-1, *GRID) * scored[:, t, None, None]
    assert expected.abs().sum() > 0
    assert_close_scaled(got, expected)
    mean = expected.sum(1) / scored.sum(1)[:, None, None]
    assert_close_scaled(whole, mean)


@pytest.mark.parametrize("family,frequency", [("blip2", 1), ("blip2", 2), ("instructblip", 2),
                                              ("instructblip-llama", 1)])
def test_relevancy_composes_word_queries_patches(family, frequency):
    """Token t's map: row t-1 of the language model's relevancy (R += A_bar R) at the query
    columns, times the queries' relevancy over the patches through the Q-Former (rules 6-7 for its
    self-attention, rule 10 for its cross-attention against the vision tower's normalised
    self-relevancy), CLS dropped. InstructBLIP's Q-Former self-attention also runs over the
    instruction after the queries; only the queries cross-attend."""
    model = model_of(family, frequency)
    pixels, args = _inputs(model)
    ids, mask = args[:2]
    positions, scored = _scored(ids, mask)
    got = BimodalRelevancy(model).attribute_tokens(pixels, additional_forward_args=args, return_grid=True)
    eager = _eager(family, frequency)
    logits, vision, own, cross, lm = _reference(eager, pixels, *args)
    has_cross = [layer.has_cross_attention for layer in eager.qformer.encoder.layer]
    image_cols = ids[0] == tm.BLIP2_IMAGE_TOKEN

    def eye(n):
        return torch.eye(n, dtype=torch.float64).expand(2, n, n)

    def normalised(r):
        residual = r - eye(r.shape[-1])
        return residual / residual.sum(-1, keepdim=True).clamp_min(1e-12) + eye(r.shape[-1])  # zero rows stay 0

    expected = torch.zeros_like(got)
    every = lm + vision + own + cross
    for t in positions:
        grads = torch.autograd.grad(_log_p(logits, ids, t).sum(), every, retain_graph=True)
        g_lm, g_vision = grads[: len(lm)], grads[len(lm) : len(lm) + len(vision)]
        g_own, g_cross = grads[len(lm) + len(vision) : -len(cross)], grads[-len(cross) :]
        r = eye(ids.shape[1])
        for a, g in zip(lm, g_lm):
            r = r + _abar(a, g) @ r
        to_queries = r[:, t - 1][:, image_cols]
        r_ii = eye(vision[0].shape[-1])
        for a, g in zip(vision, g_vision):
            r_ii = r_ii + _abar(a, g) @ r_ii
        n_own = own[0].shape[-1]  # the queries, then the instruction's tokens
        r_qq, r_qi, crossed = eye(n_own), torch.zeros(2, n_own, r_ii.shape[-1], dtype=torch.float64), iter(zip(cross, g_cross))
        for layer, (a, g) in enumerate(zip(own, g_own)):
            s = _abar(a, g)
            r_qq, r_qi = r_qq + s @ r_qq, r_qi + s @ r_qi
            if has_cross[layer]:
                c, gc = next(crossed)
                rows = torch.zeros(2, n_own, c.shape[-1], dtype=torch.float64)
                rows[:, :N] = _abar(c, gc)  # only the queries cross-attend
                r_qi = r_qi + normalised(r_qq).transpose(-1, -2) @ rows @ normalised(r_ii)
        expected[:, t] = torch.einsum("bn,bnp->bp", to_queries, r_qi[:, :N, 1:]).reshape(-1, *GRID)
        expected[:, t] *= scored[:, t, None, None]
    assert expected.abs().sum() > 0
    assert_close_scaled(got, expected)


def test_query_maps_are_each_querys_cross_attention():
    model = model_of("blip2", 2)
    pixels, (ids, mask) = _inputs(model)
    before = snapshot(model)
    maps = cv.lens.query_maps(model, {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask})
    assert_unchanged(model, before)
    with torch.no_grad():
        cross = _reference(_eager("blip2", 2), pixels, ids, mask)[3]
    expected = torch.stack([a.mean(1) for a in cross]).mean(0)[:, :, 1:].reshape(2, N, *GRID)
    torch.testing.assert_close(maps.double(), expected)
    assert not torch.allclose(maps[:, 0], maps[:, 1])  # the queries read different places
    with pytest.raises(TypeError, match="model: query_maps .* LlavaForConditionalGeneration"):
        cv.lens.query_maps(tm.llava(), {"pixel_values": pixels, "input_ids": ids})
    with pytest.raises(ValueError, match="layers"):
        cv.lens.query_maps(model, {"pixel_values": pixels, "input_ids": ids}, layers=3)


# ----- IG and occlusion --------------------------------------------------------------------------------
def _summed_log_p(model, pixels, args):
    """The default target by hand: the log-probabilities of the scored tokens, summed per row."""
    names = ("input_ids", "attention_mask", *get_adapter(model).extra_text_inputs)
    ids, mask = args[:2]
    logits = model(pixel_values=pixels, **dict(zip(names, args))).logits
    positions, scored = _scored(ids, mask)
    return sum(_log_p(logits, ids, t) * scored[:, t] for t in positions)


@pytest.mark.parametrize("family", FAMILIES)
def test_ig_is_complete_against_the_zero_patch_embedding(family):
    model = model_of(family)
    pixels, args = _inputs(model)
    grid = TokenIntegratedGradients(model).attribute(pixels, additional_forward_args=args, n_steps=32,
                                                     return_grid=True)
    conv = model.vision_model.embeddings.patch_embedding
    with torch.no_grad():
        full = _summed_log_p(model, pixels, args)
        handle = conv.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        try:
            empty = _summed_log_p(model, pixels, args)
        finally:
            handle.remove()
    assert (full - empty).abs().min() > 1e-4
    torch.testing.assert_close(grid.sum((1, 2)), full - empty, rtol=1e-2, atol=1e-7)  # 32 steps


@pytest.mark.parametrize("family", FAMILIES)
def test_occlusion_drop_equals_the_models_score_without_each_patch(family):
    model = model_of(family)
    pixels, args = _inputs(model)
    got = CausalOcclusion(model).attribute(pixels, additional_forward_args=args, return_grid=True)
    with torch.no_grad():
        full = _summed_log_p(model, pixels, args)
        expected = torch.zeros(2, GRID[0] * GRID[1], dtype=torch.float64)
        for p in range(GRID[0] * GRID[1]):
            kept = [k for k in range(1 + GRID[0] * GRID[1]) if k != 1 + p]
            handle = model.vision_model.embeddings.register_forward_hook(lambda m, a, out, kept=kept: out[:, kept])
            try:
                expected[:, p] = full - _summed_log_p(model, pixels, args)
            finally:
                handle.remove()
    assert_close_scaled(got.double(), expected.reshape(2, *GRID))


# ----- explain() and the CLI on the model's own answer ---------------------------------------------------
@pytest.fixture(scope="module", params=list(FAMILIES))
def blip2_and_processor(request):
    """The tiny model and its real processor class (the zoo's word-level tokenizer; InstructBLIP's
    Q-Former tokenizer another copy of it)."""
    from transformers import Blip2Processor, BlipImageProcessor, InstructBlipProcessor

    from captum_vlm.zoo.processing import build_tokenizer

    tokenizer = build_tokenizer(64)
    image_processor = BlipImageProcessor(size={"height": tm.IMAGE_SIZE, "width": tm.IMAGE_SIZE})
    if request.param == "blip2":
        processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=N)
    else:
        processor = InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          qformer_tokenizer=build_tokenizer(24), num_query_tokens=N)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    assert image_token < tm.VOCAB
    model = FAMILIES[request.param]()
    model.config.image_token_index = image_token
    return model, processor


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))


@pytest.mark.parametrize("method", ["cross-attention-gradcam", "bimodal-relevancy"])
def test_explain_maps_each_generated_token(blip2_and_processor, image, method):
    model, processor = blip2_and_processor
    prompts = ["what color is the circle", "how many"]
    result = cv.explain(model, processor, image, prompts, methods=[method], max_new_tokens=3, evidence=False)
    explainer = {"cross-attention-gradcam": CrossAttentionGradCAM, "bimodal-relevancy": BimodalRelevancy}[method](model)
    for k, prompt in enumerate(prompts):
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        assert inputs["input_ids"][0, :N].tolist() == [model.config.image_token_index] * N
        extra = {name: inputs[name] for name in get_adapter(model).extra_text_inputs}  # InstructBLIP's instruction
        with torch.no_grad():
            sequence = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            logits = model(input_ids=sequence, pixel_values=inputs["pixel_values"], **extra).logits
        start = inputs["input_ids"].shape[1]
        generated = list(range(start, sequence.shape[1]))
        log_p = F.log_softmax(logits[0, start - 1 : -1], -1).gather(-1, sequence[0, start:, None]).sum()
        answer = processor.tokenizer.decode(sequence[0, start:], skip_special_tokens=True).strip()
        title = f"{prompt} → {answer}"
        assert result.scores[title] == pytest.approx(float(log_p.exp()), rel=1e-4)
        whole = explainer.attribute(inputs["pixel_values"], target=generated,
                                    additional_forward_args=(sequence, torch.ones_like(sequence), *extra.values()),
                                    return_grid=True)[0]
        record = next(r for r in result.records if r.target == title)
        assert_close_scaled(record.grid, whole)
        assert record.details["target"] == f"answer '{answer}' to text {k}"


def test_cli_explains_the_generated_answer(blip2_and_processor, image, tmp_path, capsys):
    from captum_vlm.cli import main

    model, processor = blip2_and_processor
    folder = tmp_path / "tiny-blip2"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    picture = tmp_path / "scene.png"
    image.save(picture)
    out = tmp_path / "report.html"
    code = main(["explain", str(picture), "--text", "what color is the circle", "--model", str(folder),
                 "--method", "bimodal-relevancy", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr()
    html = out.read_text()
    inputs = processor(images=image, text="what color is the circle", return_tensors="pt")
    with torch.no_grad():
        sequence = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = processor.tokenizer.decode(sequence[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert f"what color is the circle → {answer}" in html


# ----- the logit lens (InstructBLIP: the instruction reaches the Q-Former) -------------------------------
def test_logit_lens_last_layer_is_the_models_probability_of_its_answer(blip2_and_processor, image):
    model, processor = blip2_and_processor
    prompts = ["what color is the circle", "how many"]
    lenses = explained_lenses(model, processor, image, prompts)
    inputs = processor(images=image, text=prompts[0], return_tensors="pt")
    extra = {name: inputs[name] for name in get_adapter(model).extra_text_inputs}
    with torch.no_grad():  # reference: the model's own forward over prompt + answer, with the instruction
        sequence = torch.cat([inputs["input_ids"], lenses[0].produced_ids[None]], 1)
        logits = model(input_ids=sequence, pixel_values=inputs["pixel_values"], **extra).logits
    start = inputs["input_ids"].shape[1]
    own = F.softmax(logits[0, start - 1 : -1].double(), -1).gather(-1, sequence[0, start:, None])[:, 0]
    assert_close_scaled(lenses[0].produced_probs[-1].double(), own)
    from_inputs = cv.lens.logit_lens_from_inputs(
        model, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], max_new_tokens=3,
        extra_text_inputs=tuple(extra.values()))
    assert torch.equal(from_inputs.top_ids, lenses[0].top_ids)
    if extra:  # without the instruction the Q-Former cannot run: said by name, before any work
        with pytest.raises(ValueError, match="qformer_input_ids, qformer_attention_mask"):
            cv.lens.logit_lens_from_inputs(model, inputs["pixel_values"], inputs["input_ids"])
        with pytest.raises(ValueError, match="qformer_input_ids: expected a tensor with one row per image"):
            cv.lens.logit_lens_from_inputs(model, inputs["pixel_values"], inputs["input_ids"],
                                           extra_text_inputs=(extra["qformer_input_ids"][0],))
