"""Idefics3 / SmolVLM: the processor's tiles as one canvas tensor and back, the global view the
adapter recomputes against the processor's (measured), the tile + global-view layout found by
planting a feature, Grad-CAM / relevancy / IG / occlusion against references computed here from
the model's own outputs (eager attentions, autograd, inputs_embeds), and ``explain`` / the CLI on
the model's own generated answer.

The processor is the real ``Idefics3Processor`` (PIL image processor: longest edge 96 px, 32-px
tiles) with the zoo's word tokenizer plus the Idefics3 tokens; both models take its outputs. The
tiny SmolVLM is also run with its own real ``SmolVLMProcessor`` (``SmolVLMImageProcessorPil``, the
same tiles; it needs the ``num2words`` package, in the ``test`` extra; its video processor, which
needs torchvision, is left out): the canvas exact, ``explain`` and the CLI on its generated answer.
"""

from __future__ import annotations

import copy
import html as html_lib

import numpy as np
import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from ig_refs import embedding_path_integral
from joint_refs import (
    assert_tower_views_refused,
    assert_varied,
    explained_lenses,
    mean_over_covering,
    sharpened,
    word_probs_at,
)
from model_state import assert_unchanged, snapshot
from numerics import assert_close_scaled
from PIL import Image
from transformers import Idefics3Processor, SmolVLMProcessor
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from captum_vlm.adapters import get_adapter
from captum_vlm.attr import (
    BimodalRelevancy,
    CausalOcclusion,
    CrossAttentionGradCAM,
    TokenIntegratedGradients,
)
from captum_vlm.explain import explain
from captum_vlm.zoo.processing import build_tokenizer

FACTORIES = [tm.idefics3, tm.smolvlm]
PROMPTS = ["<image> what color is the circle", "<image> how many"]
ROWS, COLS, K = 2, 3, 4  # the 40 x 64 image: a 64 x 96 canvas of 2 x 3 tiles, 4 x 4 tokens per tile
GRID = (ROWS * K, COLS * K)
N_TILE = ROWS * COLS * K * K
IMAGE = tm.IDEFICS_IMAGE_TOKEN


def tiny_processor(split: bool = True) -> Idefics3Processor:
    tokenizer = build_tokenizer(256)
    tokens = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
        f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    ids = tokenizer.convert_tokens_to_ids(tokens[:4])
    assert ids == [tm.IDEFICS_FAKE, IMAGE, tm.IDEFICS_END, tm.IDEFICS_GLOBAL] and len(tokenizer) <= tm.VOCAB
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 96}, max_image_size={"longest_edge": tm.IMAGE_SIZE},
                                                do_image_splitting=split)
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=K * K)


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=FACTORIES, ids=lambda f: f.__name__)
def model(request):
    return request.param()


def raw_inputs(processor, image, prompts=tuple(PROMPTS)):
    return processor(images=[[image]] * len(prompts), text=list(prompts), return_tensors="pt", padding=True)


def eager_copy(model):
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin


def log_probs(logits, ids):
    return F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]


def reference_views(raw, canvas):
    """The processor's tiles with the global view replaced by the canvas resized with torch
    (bicubic, antialias): what the model sees in every method."""
    views = raw["pixel_values"].clone()
    views[:, -1] = F.interpolate(canvas, size=(tm.IMAGE_SIZE, tm.IMAGE_SIZE), mode="bicubic", antialias=True,
                                 align_corners=False)
    return {**raw, "pixel_values": views}


def token_grid(scores):
    """Token scores ``[N_TILE + K*K]`` (tiles row by row, then the global view) on the canvas grid,
    by hand: a tile token on its cell, a global token spread evenly over its 2 x 3 cells."""
    grid = torch.zeros(GRID, dtype=scores.dtype)
    for t in range(ROWS * COLS):
        r, c = divmod(t, COLS)
        grid[r * K : (r + 1) * K, c * K : (c + 1) * K] += scores[t * K * K : (t + 1) * K * K].reshape(K, K)
    for g in range(K * K):
        i, j = divmod(g, K)
        grid[i * ROWS : (i + 1) * ROWS, j * COLS : (j + 1) * COLS] += scores[N_TILE + g] / (ROWS * COLS)
    return grid


# ----- the processor's image inputs ------------------------------------------------------------
def test_processor_inputs_are_the_tile_canvas_exactly(model, processor, image):
    raw = raw_inputs(processor, image)
    adapter = get_adapter(model)
    inputs = adapter.processor_inputs(raw)
    canvas = inputs["pixel_values"]
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    assert canvas.shape == (2, 3, 64, 96) and adapter.patch_grid(canvas) == GRID
    assert adapter.patch_size() == (tm.PATCH, tm.PATCH)
    assert torch.equal(canvas[:, :, 32:64, 64:96], raw["pixel_values"][:, 5])  # tile (row 2, col 3)
    kwargs = adapter.model_inputs(canvas, inputs["input_ids"], inputs["attention_mask"])
    assert torch.equal(kwargs["pixel_values"][:, :-1], raw["pixel_values"][:, :-1])
    assert torch.equal(kwargs["pixel_values"], reference_views(raw, canvas)["pixel_values"])
    given = adapter.processor_inputs({**raw, "rows": [[ROWS], [ROWS]], "cols": [[COLS], [COLS]]})
    assert torch.equal(given["pixel_values"], canvas)


def test_a_single_image_without_splitting_is_exact(model, image):
    processor = tiny_processor(split=False)
    raw = raw_inputs(processor, image)
    assert raw["pixel_values"].shape == (2, 1, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE)
    adapter = get_adapter(model)
    inputs = adapter.processor_inputs(raw)
    assert adapter.patch_grid(inputs["pixel_values"]) == (K, K)
    kwargs = adapter.model_inputs(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    assert torch.equal(kwargs["pixel_values"], raw["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(model(**kwargs).logits, model(**raw).logits, rtol=0, atol=0)


def test_torch_global_view_is_close_to_the_processors(model, processor, image):
    """The one approximation: the global view resized from the canvas with torch, not PIL's
    Lanczos from the 8-bit canvas: the largest next-token logit change relative to the largest
    logit stays small and the greedy answer is the same (numbers over more seeds and pictures:
    benchmarks/idefics3_global_view.py, benchmarks/RESULTS.md)."""
    raw = raw_inputs(processor, image)
    adapter = get_adapter(model)
    inputs = adapter.processor_inputs(raw)
    kwargs = adapter.model_inputs(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    pixel_gap = float((kwargs["pixel_values"][:, -1] - raw["pixel_values"][:, -1]).abs().max())
    with torch.no_grad():
        ours, theirs = model(**kwargs).logits, model(**raw).logits
        relative = float((ours - theirs).abs().max() / theirs.abs().max())
        same = []
        for b in range(2):
            row = {k: v[b : b + 1] for k, v in kwargs.items()}
            raw_row = {k: v[b : b + 1] for k, v in raw.items()}
            length = int(raw_row["attention_mask"].sum())
            row = {**row, "input_ids": row["input_ids"][:, :length], "attention_mask": row["attention_mask"][:, :length]}
            raw_row = {**raw_row, "input_ids": raw_row["input_ids"][:, :length],
                       "attention_mask": raw_row["attention_mask"][:, :length]}
            a = model.generate(**row, max_new_tokens=5, do_sample=False)
            b_ = model.generate(**raw_row, max_new_tokens=5, do_sample=False)
            same.append(torch.equal(a, b_))
    assert pixel_gap < 0.5 and relative < 0.2 and all(same)


def test_processor_inputs_refuse_padding_and_other_layouts(model, processor, image):
    adapter = get_adapter(model)
    small = image.resize((20, 20))  # resized to 96 x 96, 3 x 3 tiles: more views than the 2 x 3 canvas
    mixed = processor(images=[[image], [small]], text=PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match=r"padded examples \[0\] with empty views"):
        adapter.processor_inputs(mixed)
    with pytest.raises(ValueError, match="pixel_values"):
        adapter.processor_inputs({"pixel_values": torch.zeros(1, 3, 32, 32)})
    canvas = adapter.processor_inputs(raw_inputs(processor, image))["pixel_values"]
    with pytest.raises(ValueError, match="whole 32x32 tiles"):
        adapter.model_inputs(canvas[..., :40])
    ids = torch.tensor([[tm.BOS] + [IMAGE] * (N_TILE + 15) + [9]] * 2)
    with pytest.raises(ValueError, match=r"hold \[111, 111\] image tokens but the 2x3-tile canvas .* needs 112"):
        adapter.model_inputs(canvas, ids)


# ----- the layout, by planting a feature ---------------------------------------------------------
def _embeds(model, adapter, canvas, ids):
    seen = {}
    handle = model.model.text_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(x=k["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**adapter.model_inputs(canvas, ids))
    finally:
        handle.remove()
    return seen["x"]


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("cell", [(0, 0), (1, 5), (3, 11)])
def test_layout_finds_a_planted_cell_in_every_tile_and_the_global_view(model, split, cell):
    """With the vision attention silenced (each patch then stays itself through the tower), a
    change to one canvas cell changes one tile token and, through the global view, the global
    token(s) whose box holds the cell; the layout maps each back onto that cell's box. With an
    area resize the global view's change stays inside one global token exactly; with the default
    bicubic resize it leaks to neighbours, the largest change staying on the cell's own token."""
    adapter = get_adapter(model)
    size = (64, 96) if split else (32, 32)
    r, c = cell if split else (cell[0] % K, cell[1] % K)
    canvas = tm.pixels(1, *size)
    n = adapter.num_image_tokens(canvas)
    ids = torch.tensor([[tm.BOS, 9, tm.IDEFICS_FAKE] + [IMAGE] * n + [tm.IDEFICS_FAKE, 11, 12]])
    silence = [block.self_attn.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), *out[1:]))
               for block in adapter.vision_blocks()]
    changed = canvas.clone()
    changed[:, :, r * tm.PATCH : (r + 1) * tm.PATCH, c * tm.PATCH : (c + 1) * tm.PATCH] += 1.0
    grid = adapter.patch_grid(canvas)
    try:
        for mode in ("area", "bicubic"):
            adapter.global_view_mode = mode
            change = (_embeds(model, adapter, changed, ids) - _embeds(model, adapter, canvas, ids)).abs().amax(-1)
            with adapter.image_layout(canvas, ids) as layout:
                pass
            image_cols = layout().columns[0]
            tile_part, global_part = change[0, image_cols[: N_TILE if split else n]], change[0, image_cols[N_TILE:]]
            tile_marked = (tile_part > 1e-6).float()
            assert tile_marked.sum() == 1
            one_tile = torch.zeros(1, 1, ids.shape[1])
            one_tile[0, 0, image_cols[: tile_part.shape[0]]] = tile_marked
            expected = torch.zeros(1, 1, *grid)
            expected[..., r, c] = 1.0
            assert torch.equal(layout().to_grid(one_tile), expected)
            if not split:
                continue
            i, j = r // ROWS, c // COLS  # the global token whose box holds the cell
            if mode == "area":
                assert (global_part > 1e-6).sum() == 1
            assert int(global_part.argmax()) == i * K + j
            strongest = torch.zeros(1, 1, ids.shape[1])
            strongest[0, 0, image_cols[N_TILE + int(global_part.argmax())]] = 1.0
            box = torch.zeros(1, 1, *grid)
            box[..., i * ROWS : (i + 1) * ROWS, j * COLS : (j + 1) * COLS] = 1.0 / (ROWS * COLS)
            assert_close_scaled(layout().to_grid(strongest), box)
    finally:
        adapter.global_view_mode = "bicubic"
        for handle in silence:
            handle.remove()


# ----- methods against references ---------------------------------------------------------------
def _setup(model, processor, image, prompts=tuple(PROMPTS)):
    raw = raw_inputs(processor, image, prompts)
    adapter = get_adapter(model)
    inputs = adapter.processor_inputs(raw)
    return raw, inputs, reference_views(raw, inputs["pixel_values"])


def test_gradcam_equals_reference(model, processor, image):
    raw, inputs, ref_inputs = _setup(model, processor, image)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    targets = [128, 129]  # the first words after the image block, in both rows
    got = CrossAttentionGradCAM(model, layer=0).attribute_tokens(
        inputs["pixel_values"], target=targets, additional_forward_args=(ids, mask), return_grid=True)
    out = eager_copy(model)(**ref_inputs, output_attentions=True)
    log_p, attentions = log_probs(out.logits, ids), out.attentions
    for t in targets:
        grad = torch.autograd.grad(log_p[:, t - 1].sum(), attentions[0], retain_graph=True)[0]
        cam = (attentions[0] * grad.clamp(min=0)).mean(1)
        for b in range(2):
            image_cols = (ids[b] == IMAGE).nonzero()[:, 0]
            text_rows = mask[b].bool() & (ids[b] != IMAGE)
            assert_close_scaled(got[b, t], token_grid(cam[b][text_rows][:, image_cols].sum(0)))


def test_relevancy_equals_joint_rule(model, processor, image):
    raw, inputs, ref_inputs = _setup(model, processor, image, PROMPTS[:1])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    positions = [ids.shape[1] - 2, ids.shape[1] - 1]
    got = BimodalRelevancy(model).attribute_tokens(inputs["pixel_values"], target=positions,
                                                   additional_forward_args=(ids, mask), return_grid=True)
    out = eager_copy(model)(**ref_inputs, output_attentions=True)
    log_p, attentions = log_probs(out.logits, ids), out.attentions
    image_cols = (ids[0] == IMAGE).nonzero()[:, 0]
    for t in positions:
        grads = torch.autograd.grad(log_p[:, t - 1].sum(), attentions, retain_graph=True)
        r = torch.eye(ids.shape[1])
        for a, g in zip(attentions, grads):
            r = r + (a * g).clamp(min=0).mean(1)[0] @ r
        assert_close_scaled(got[0, t], token_grid(r[t - 1, image_cols]))


def _summed_log_p(model, kwargs, ids):
    logits = model(**kwargs).logits
    scored = (ids[:, 1:] != IMAGE) & kwargs["attention_mask"][:, 1:].bool()
    return (log_probs(logits, ids) * scored).sum(1)


def _double(raw):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in raw.items()}


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_integrated_gradients_equal_a_hand_made_path_integral(factory, processor, image):
    model = factory().double()
    raw, inputs, ref = _setup(model, processor, image, PROMPTS[:1])
    raw, ref = _double(raw), _double(ref)
    canvas = get_adapter(model).processor_inputs(raw)["pixel_values"]
    n_steps = 3
    got, delta = TokenIntegratedGradients(model).attribute(
        canvas, additional_forward_args=(inputs["input_ids"], inputs["attention_mask"]), n_steps=n_steps,
        method="riemann_trapezoid", return_grid=True, return_convergence_delta=True)
    embed = model.model.vision_model.embeddings.patch_embedding
    views = ref["pixel_values"].flatten(0, 1)
    attributions, base = embedding_path_integral(
        embed, views, lambda: _summed_log_p(model, ref, ref["input_ids"]).sum(), n_steps)
    per_patch = attributions.sum(1)  # [views, 8, 8]
    per_token = per_patch.reshape(-1, K, 2, K, 2).sum(dim=(2, 4)).flatten()  # each token's 2x2 patches
    want = token_grid(per_token)
    assert_close_scaled(got[0], want)
    with torch.no_grad():
        intact = _summed_log_p(model, ref, ref["input_ids"])
        handle = embed.register_forward_hook(lambda m, a, out: base.clone())
        try:
            at_base = _summed_log_p(model, ref, ref["input_ids"])
        finally:
            handle.remove()
    torch.testing.assert_close(delta, want.sum()[None] - (intact - at_base))


def _drop_reference(model, ref, tokens):
    """The summed log-probability with the image tokens ``tokens`` (indices in fill order)
    removed from the language model's input, from the model's own pieces."""
    inner = model.model
    ids, mask = ref["input_ids"], ref["attention_mask"]
    with torch.no_grad():
        features = torch.cat(list(inner.get_image_features(ref["pixel_values"], ref["pixel_attention_mask"]).pooler_output))
        embeds = inner.get_input_embeddings()(ids)
        image = ids == IMAGE
        embeds[image] = features.to(embeds.dtype)
        image_cols = image[0].nonzero()[:, 0]
        stay = torch.ones(ids.shape[1], dtype=torch.bool)
        stay[image_cols[list(tokens)]] = False
        return _summed_log_p(model, {"inputs_embeds": embeds[:, stay], "attention_mask": mask[:, stay]}, ids[:, stay])


def test_occlusion_drop_and_paint_equal_references(processor, image):
    model = tm.idefics3().double()
    raw, inputs, ref = _setup(model, processor, image, PROMPTS[:1])
    raw, ref = _double(raw), _double(ref)
    canvas = get_adapter(model).processor_inputs(raw)["pixel_values"]
    args = (inputs["input_ids"], inputs["attention_mask"])
    occlusion = CausalOcclusion(model)
    before = snapshot(model)
    dropped = occlusion.attribute(canvas, additional_forward_args=args, window=1, return_grid=True)[0]
    assert_unchanged(model, before)
    with torch.no_grad():
        intact = _summed_log_p(model, ref, ref["input_ids"])[0]
    for r, c in [(0, 0), (1, 5), (7, 11)]:
        tile = (r // K) * COLS + c // K
        token = tile * K * K + (r % K) * K + c % K
        # one cell: its tile token goes, and the global token whose box holds it (the region leaves both)
        global_token = N_TILE + (r // ROWS) * K + c // COLS
        assert_close_scaled(dropped[r, c], intact - _drop_reference(model, ref, [token, global_token])[0])
    # a 2 x 3 window on a global token's box drops the box's six tile tokens and that global token
    windows = occlusion.attribute(canvas, additional_forward_args=args, window=(2, 3), stride=(2, 3),
                                  return_grid=True)[0]
    tiles = [((r // K) * COLS + c // K) * K * K + (r % K) * K + c % K for r in (2, 3) for c in (3, 4, 5)]
    want = intact - _drop_reference(model, ref, tiles + [N_TILE + 1 * K + 1])[0]
    assert_close_scaled(windows[2, 3], want)  # each cell of the window gets its drop
    # paint: grey (0) over one cell of the canvas, the tiles and the global view rebuilt by hand
    painted = occlusion.attribute(canvas, additional_forward_args=args, window=1, intervention="paint",
                                  return_grid=True)[0]
    grey = canvas.clone()
    grey[:, :, 8:16, 40:48] = 0.0  # cell (1, 5)
    with torch.no_grad():
        painted_inputs = reference_views({**ref, "pixel_values": _painted_views(ref, grey)}, grey)
        want = intact - _summed_log_p(model, painted_inputs, ref["input_ids"])[0]
    assert_close_scaled(painted[1, 5], want)


def _painted_views(raw, canvas):
    """The processor's view layout cut from a (painted) canvas by hand."""
    views = raw["pixel_values"].clone()
    for t in range(ROWS * COLS):
        r, c = divmod(t, COLS)
        views[:, t] = canvas[:, :, r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32]
    return views


def test_drop_image_tokens_is_scoped(model):
    adapter = get_adapter(model)
    before = snapshot(model)
    keep = torch.ones(1, *GRID)
    keep[0, 0:2, 0:3] = 0  # global token 0's whole box, and those six tile tokens
    canvas = tm.pixels(1, 64, 96)
    ids = torch.tensor([[tm.BOS, 9] + [IMAGE] * (N_TILE + K * K) + [11, 12]])
    with adapter.drop_image_tokens(keep) as stays:
        stay = stays(ids)
        assert stay.sum() == ids.shape[1] - 7 and not stay[0, 2 + N_TILE] and stay[0, 3 + N_TILE]
        with torch.no_grad():
            model(**adapter.model_inputs(canvas, ids[:, stay[0]]))
    assert_unchanged(model, before)
    with pytest.raises(RuntimeError, match="boom"), adapter.drop_image_tokens(keep):
        raise RuntimeError("boom")
    assert_unchanged(model, before)
    assert adapter._dropping is None


# ----- explain and the CLI on the model's own answer ---------------------------------------------
def test_explain_explains_each_generated_token(model, processor, image):
    before = snapshot(model)
    result = explain(model, processor, image, PROMPTS, methods=["bimodal-relevancy"], max_new_tokens=3,
                     evidence=False)
    assert_unchanged(model, before)
    method = BimodalRelevancy(model)
    adapter = get_adapter(model)
    for prompt in PROMPTS:
        raw = raw_inputs(processor, image, [prompt])
        canvas = adapter.processor_inputs(raw)["pixel_values"]
        kwargs = adapter.model_inputs(canvas, raw["input_ids"], raw["attention_mask"])
        with torch.no_grad():
            sequence = model.generate(**kwargs, max_new_tokens=3, do_sample=False)
            start = raw["input_ids"].shape[1]
            logits = model(**adapter.model_inputs(canvas, sequence, torch.ones_like(sequence))).logits
        log_p = log_probs(logits, sequence)[0, start - 1 :].sum()
        answer = processor.tokenizer.decode(sequence[0, start:], skip_special_tokens=True).strip()
        title = f"{prompt} → {answer}"
        assert result.scores[title] == pytest.approx(float(log_p.exp()), rel=1e-4)
        whole = method.attribute(canvas, target=list(range(start, sequence.shape[1])),
                                 additional_forward_args=(sequence, torch.ones_like(sequence)), return_grid=True)[0]
        record = next(r for r in result.records if r.target == title)
        assert record.grid.shape == GRID
        assert_close_scaled(record.grid, whole)


def test_cli_explains_an_idefics3_checkpoint(processor, image, tmp_path, capsys):
    from captum_vlm.cli import main

    model = tm.idefics3()
    folder = tmp_path / "tiny-idefics3"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    picture = tmp_path / "scene.png"
    image.save(picture)
    out = tmp_path / "report.html"
    code = main(["explain", str(picture), "--text", PROMPTS[0], "--model", str(folder), "--method",
                 "cross-attention-gradcam", "--out", str(out), "--png", str(tmp_path / "png"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    reference = explain(model, processor, image, [PROMPTS[0]], methods=["cross-attention-gradcam"], evidence=False)
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and list(reference.scores)[0].split(" → ")[1] in html
    assert len(list((tmp_path / "png").glob("*.png"))) >= 1


def test_lens_views_of_the_per_view_tower_refuse_before_any_work(model, processor, image):
    """The tower runs once per tile and once on the global view, so a lens view of one tower run
    on the canvas would be wrong: each refuses (naming the argument) before any forward, and the
    model is left as found."""
    raw = dict(raw_inputs(processor, image))
    assert_tower_views_refused(model, raw, get_adapter(model).processor_inputs(raw)["pixel_values"])


def test_logit_lens_last_layer_is_the_models_probability_of_its_answer(model, processor, image):
    """The logit lens on the tiles + global view: its last layer is the model's own next-token
    softmax (on the adapter's inputs), the produced probabilities multiply to the explained
    answer's probability, and the image-token rows are the model's softmax at the image tokens."""
    import captum_vlm as cv

    before = snapshot(model)
    lenses = explained_lenses(model, processor, image, PROMPTS)
    adapter = get_adapter(model)
    raw = raw_inputs(processor, image, [PROMPTS[0]])
    canvas, ids = adapter.processor_inputs(raw)["pixel_values"], raw["input_ids"]
    sequence = torch.cat([ids, lenses[0].produced_ids[None]], 1)
    with torch.no_grad():  # reference: the model's own forward over prompt + answer
        logits = model(**adapter.model_inputs(canvas, sequence, torch.ones_like(sequence))).logits
    start = ids.shape[1]
    own = F.softmax(logits[0].double(), -1)
    assert_close_scaled(lenses[0].produced_probs[-1].double(), own[start - 1 : -1].gather(-1, sequence[0, start:, None])[:, 0])
    positions = lenses[0].image_positions
    assert torch.equal(positions, (sequence[0] == IMAGE).nonzero()[:, 0])  # every tile token, then the global view's
    assert lenses[0].image_grid == GRID
    assert_close_scaled(lenses[0].image_top_probs[-1].double(), own[positions].topk(5, -1).values)
    from_inputs = cv.lens.logit_lens_from_inputs(model, canvas, ids, raw["attention_mask"], max_new_tokens=3)
    assert torch.equal(from_inputs.top_ids, lenses[0].top_ids)
    assert_unchanged(model, before)



def own_covers() -> torch.Tensor:
    """``[N_TILE + K*K, GRID cells]`` (bool), by hand: tile ``t`` (row by row) token ``(i, j)`` on
    its cell, global token ``(i, j)`` on the ``ROWS x COLS`` block its part of the global view was
    resized from."""
    covers = torch.zeros(N_TILE + K * K, *GRID, dtype=torch.bool)
    for t in range(ROWS * COLS):
        r, c = divmod(t, COLS)
        for i in range(K):
            for j in range(K):
                covers[t * K * K + i * K + j, r * K + i, c * K + j] = True
    for g in range(K * K):
        i, j = divmod(g, K)
        covers[N_TILE + g, i * ROWS : (i + 1) * ROWS, j * COLS : (j + 1) * COLS] = True
    return covers.flatten(1)


def test_logit_lens_word_maps_are_the_tokens_probabilities_on_their_cells(model, processor, image):
    """The word map at every layer equals, per canvas cell, the mean probability of the word over
    the tile token and the global-view tokens that read the cell, computed here from
    ``output_hidden_states`` (final norm, LM head) of the processor's tiles (global view resized
    with torch, as the adapter does) and placed by hand (:func:`own_covers`)."""
    import captum_vlm as cv

    sharp, words = sharpened(model), [5, 11]
    before = snapshot(sharp)
    lens = cv.lens.logit_lens(sharp, processor, image, PROMPTS[0], max_new_tokens=2, words=words)
    assert_unchanged(sharp, before)
    raw = raw_inputs(processor, image, [PROMPTS[0]])
    canvas = get_adapter(sharp).processor_inputs(raw)["pixel_values"]
    sequence = torch.cat([raw["input_ids"], lens.produced_ids[None]], 1)
    positions = (sequence[0] == IMAGE).nonzero()[:, 0]
    assert torch.equal(lens.image_positions, positions) and lens.image_grid == GRID
    kwargs = {**reference_views(raw, canvas), "input_ids": sequence, "attention_mask": torch.ones_like(sequence)}
    probs = word_probs_at(sharp, kwargs, positions, words)  # [layers, N, words]
    for k, word in enumerate(words):
        want = mean_over_covering(probs[..., k], own_covers(), GRID)
        assert_varied(want[-1])
        assert_close_scaled(lens.word_maps[str(word)].double(), want)


# ----- SmolVLM with its own processor (needs num2words) ----------------------------------------
def smolvlm_processor() -> SmolVLMProcessor:
    """The SmolVLM processor as the Idefics3 one above: 96-px longest edge, 32-px tiles."""
    tokenizer = tiny_processor().tokenizer
    image_processor = SmolVLMImageProcessorPil(size={"longest_edge": 96}, max_image_size={"longest_edge": tm.IMAGE_SIZE},
                                               do_image_splitting=True)
    return tm.image_only(SmolVLMProcessor)(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=K * K)


@pytest.fixture(scope="module")
def smol():
    return tm.smolvlm(), smolvlm_processor()


def test_smolvlm_processor_inputs_are_the_tile_canvas_exactly(smol, image):
    model, processor = smol
    raw = raw_inputs(processor, image)
    assert raw["pixel_values"].shape == (2, ROWS * COLS + 1, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE)
    adapter = get_adapter(model)
    inputs = adapter.processor_inputs(raw)
    canvas = inputs["pixel_values"]
    assert canvas.shape == (2, 3, 64, 96) and adapter.patch_grid(canvas) == GRID
    for t in range(ROWS * COLS):  # every tile in its place, bit for bit
        r, c = divmod(t, COLS)
        assert torch.equal(canvas[:, :, r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32], raw["pixel_values"][:, t])
    kwargs = adapter.model_inputs(canvas, inputs["input_ids"], inputs["attention_mask"])
    assert torch.equal(kwargs["pixel_values"][:, :-1], raw["pixel_values"][:, :-1])
    assert torch.equal(kwargs["pixel_values"], reference_views(raw, canvas)["pixel_values"])
    assert int((raw["input_ids"][0] == IMAGE).sum()) == adapter.num_image_tokens(canvas) == N_TILE + K * K


def test_smolvlm_explain_and_cli_on_its_generated_answer(smol, image, tmp_path, monkeypatch, capsys):
    """``explain`` with SmolVLM's own processor scores the model's greedy answer (its probability
    from the model's own forward on the adapter's inputs); the CLI end to end (the loader replaced:
    the tiny processor is built here, offline)."""
    from captum_vlm import cli

    model, processor = smol
    before = snapshot(model)
    result = explain(model, processor, image, [PROMPTS[0]], methods=["cross-attention-gradcam"], evidence=False)
    assert_unchanged(model, before)
    adapter = get_adapter(model)
    raw = raw_inputs(processor, image, [PROMPTS[0]])
    canvas = adapter.processor_inputs(raw)["pixel_values"]
    with torch.no_grad():
        sequence = model.generate(**adapter.model_inputs(canvas, raw["input_ids"], raw["attention_mask"]),
                                  max_new_tokens=10, do_sample=False)  # explain's and the CLI's default
        logits = model(**adapter.model_inputs(canvas, sequence, torch.ones_like(sequence))).logits
    start = raw["input_ids"].shape[1]
    answer = processor.tokenizer.decode(sequence[0, start:], skip_special_tokens=True).strip()
    title = f"{PROMPTS[0]} → {answer}"
    assert result.scores[title] == pytest.approx(float(log_probs(logits, sequence)[0, start - 1 :].sum().exp()), rel=1e-4)
    monkeypatch.setattr(cli, "load_model", lambda spec: (model, processor))
    picture, out = tmp_path / "scene.png", tmp_path / "report.html"
    image.save(picture)
    code = cli.main(["explain", str(picture), "--text", PROMPTS[0], "--model", "tiny-smolvlm", "--method",
                     "cross-attention-gradcam", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and html_lib.escape(title) in html
    assert_unchanged(model, before)
