"""LLaVA-NeXT and LLaVA-OneVision: the processor's tiles as one tile canvas and back, the layout
(base view, tiles, newlines, unpadding, OneVision's pooling) read from the model's own
``pack_image_features`` and found by planting a feature, Grad-CAM / relevancy / IG / occlusion
against references computed here from the eager model's attentions, autograd and the model's own
image features, and ``explain`` / the CLI on the model's own generated answer.

The processors are the real ``LlavaNextProcessor`` / ``LlavaOnevisionProcessor`` (PIL image
processors with 16 px tiles on the tiny models' pinpoints, the zoo's word tokenizer plus
``<image>``); OneVision's video processor needs torchvision, so the test class leaves it out.
Images: 40 x 28 px -> a 48 x 32 canvas of 3 x 2 tiles (6 x 4 cells, no unpadding; OneVision
pools it to 4 x 3 tokens), 30 x 64 px -> a 32 x 48 canvas (4 x 6 cells, its first and last row
unpadded; the content box is pixel rows 4..27), 12 x 10 px -> a 16 x 32 canvas whose first and
last cell columns hold padding only (content box: pixel columns 9..23).
"""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from ig_refs import embedding_path_integral
from joint_refs import (
    assert_tower_views_refused,
    assert_varied,
    eager_copy,
    explained_lenses,
    gradcam_rows,
    log_probs,
    mean_over_covering,
    relevancy,
    sharpened,
    word_probs_at,
)
from model_state import assert_unchanged, snapshot
from numerics import assert_close_scaled
from PIL import Image, ImageDraw
from transformers import LlavaNextProcessor, LlavaOnevisionProcessor
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from captum_vlm.adapters import get_adapter
from captum_vlm.attr import (
    AttentionRollout,
    BimodalRelevancy,
    CausalOcclusion,
    CrossAttentionGradCAM,
    TokenIntegratedGradients,
)
from captum_vlm.explain import explain
from captum_vlm.zoo.processing import build_tokenizer

IMG = tm.ANYRES_IMAGE_TOKEN
PROMPT = "<image> what color is the circle"
SIZES = {"filled": (40, 28), "unpadded": (30, 64)}
CLASSES = ["next", "onevision"]


def make_processor(kind: str):
    tokenizer = build_tokenizer(256)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tokenizer.convert_tokens_to_ids("<image>") == IMG and len(tokenizer) <= tm.VOCAB
    s = tm.ANYRES_TILE
    if kind == "next":
        image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                                     image_grid_pinpoints=tm.ANYRES_PINPOINTS)
        return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=tm.PATCH,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": s, "width": s},
                                                      image_grid_pinpoints=tm.ANYRES_PINPOINTS)
    return tm.image_only(LlavaOnevisionProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                       num_image_tokens=(s // tm.PATCH) ** 2, vision_feature_select_strategy="full",
                                       vision_aspect_ratio="anyres_max_4")


MODELS = {"next": tm.llava_next, "onevision": tm.llava_onevision}


@pytest.fixture(scope="module", params=CLASSES)
def kind(request):
    return request.param


def warmed(model):
    """``model`` after one forward: transformers installs its output-capturing hooks on the vision
    tower at the first forward that selects a hidden layer (not a change of ours)."""
    raw = raw_inputs(make_processor("next" if type(model).__name__.startswith("LlavaNext") else "onevision"),
                     noise(16, 16))
    with torch.no_grad():
        model(**{k: v.to(model.dtype) if v.is_floating_point() else v for k, v in raw.items()})
    return model


@pytest.fixture(scope="module")
def model(kind):
    return warmed(MODELS[kind]())


@pytest.fixture(scope="module")
def processor(kind):
    return make_processor(kind)


def scene(height: int, width: int) -> Image.Image:
    """A smooth picture (a red disc and a blue square on sky blue)."""
    image = Image.new("RGB", (width, height), (200, 220, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width * 0.2, height * 0.2, width * 0.6, height * 0.6], fill=(220, 30, 30))
    draw.rectangle([width * 0.55, height * 0.5, width * 0.9, height * 0.9], fill=(30, 30, 200))
    return image


def noise(height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))


def raw_inputs(processor, image, prompts=(PROMPT,)):
    return processor(images=[image] * len(prompts), text=list(prompts), return_tensors="pt", padding=True)


def adapted(model, processor, image, prompts=(PROMPT,)):
    raw = raw_inputs(processor, image, prompts)
    inputs = get_adapter(model).processor_inputs(raw)
    return raw, inputs, (inputs["input_ids"], inputs["attention_mask"], inputs["image_sizes"])


def forward_kwargs(model, pixels, ids, mask, sizes) -> dict:
    adapter = get_adapter(model)
    return {**adapter.model_inputs(pixels, ids, mask, (sizes,)), **adapter.language_kwargs(ids, (sizes,))}


def content_box(size) -> tuple[int, int, int, int]:
    """The canvas pixels ``(top, bottom, left, right)`` the processor's resized image fills, by
    transformers' own pinpoint choice and resize size and the processors' even padding rule."""
    best = select_best_resolution(tuple(size), tm.ANYRES_PINPOINTS)
    new_h, new_w = get_patch_output_size(np.zeros((*size, 3)), best, ChannelDimension.LAST)
    top, left = divmod(best[0] - new_h, 2)[0], divmod(best[1] - new_w, 2)[0]
    return top, top + new_h, left, left + new_w


def base_cells(size, grid) -> torch.Tensor:
    """``[g, g, H, W]``: the canvas cells base-view patch ``(i, j)`` reads, i.e. those whose pixels
    meet its ``1/g`` share of the content box (rows and columns by exact fractions, by hand)."""
    from fractions import Fraction

    h, w = grid
    p = tm.PATCH  # pixels per cell side
    g = tm.ANYRES_TILE // p
    top, bottom, left, right = content_box(size)
    out = torch.zeros(g, g, h, w, dtype=torch.float64)

    def meets(cell: int, start: int, size: int, i: int) -> bool:
        lo, hi = start + Fraction(i * size, g), start + Fraction((i + 1) * size, g)
        return cell * p < hi and lo < (cell + 1) * p

    for i in range(g):
        for j in range(g):
            for r in range(h):
                for c in range(w):
                    if meets(r, top, bottom - top, i) and meets(c, left, right - left, j):
                        out[i, j, r, c] = 1.0
    return out


def base_view(pixels, size) -> torch.Tensor:
    """The content box of the canvas resized to one tile (bicubic, antialiased), by hand."""
    top, bottom, left, right = content_box(size)
    s = tm.ANYRES_TILE
    return F.interpolate(pixels[:, :, top:bottom, left:right], size=(s, s), mode="bicubic", antialias=True,
                         align_corners=False)


def double(model):
    return model.double()


# ----- the reference layout: the model's own packing of one-hot features -------------------------
def reference_token_cells(model, size, grid, tiles) -> torch.Tensor:
    """``[N, H * W]``: per image placeholder of one image, the canvas cells it reads, each with an
    equal share (newlines: none). Tile patch features are one-hot vectors of their canvas cell, the
    base view's patch ``(i, j)`` the cells of its share of the content box (:func:`base_cells`;
    the base view is a resize of the content box, not of the whole canvas), and the model's own
    ``pack_image_features`` (unpadding, OneVision's bilinear pooling, newlines) packs them."""
    (h, w), (a, b) = grid, tiles
    g, n = h // a, h * w
    cells = torch.arange(n).reshape(a, g, b, g).permute(0, 2, 1, 3).reshape(a * b, g * g)
    tile_features = F.one_hot(cells, n).double()
    base = base_cells(size, grid)
    features = [torch.cat([base.reshape(1, g * g, n), tile_features])]
    sizes = torch.tensor([size])
    newline = torch.zeros(n, dtype=torch.float64)
    inner = model.model
    if type(model).__name__.startswith("LlavaOnevision"):
        packed, _ = inner.pack_image_features(features, sizes, image_newline=newline,
                                              vision_aspect_ratio=model.config.vision_aspect_ratio)
    else:
        packed, _ = inner.pack_image_features(features, sizes, "default", image_newline=newline)
    support = (packed[0].abs() > 1e-12).double()
    return support / support.sum(-1, keepdim=True).clamp_min(1)


def reference_matrix(model, ids_row, size, pixels) -> torch.Tensor:
    """``[H * W, L]``: sequence scores to canvas-cell scores for one row of ``input_ids``."""
    grid = get_adapter(model).patch_grid(pixels)
    s = tm.ANYRES_TILE
    tiles = (pixels.shape[-2] // s, pixels.shape[-1] // s)
    per_token = reference_token_cells(model, size, grid, tiles)
    columns = (ids_row == IMG).nonzero()[:, 0]
    assert len(columns) == per_token.shape[0]
    out = torch.zeros(grid[0] * grid[1], ids_row.shape[0], dtype=torch.float64)
    out[:, columns] = per_token.T
    return out


# ----- the processor's image inputs ------------------------------------------------------------
@pytest.mark.parametrize("which", list(SIZES))
def test_processor_inputs_are_the_tile_canvas_exactly(model, processor, which):
    raw, inputs, (ids, mask, sizes) = adapted(model, processor, noise(*SIZES[which]),
                                              [PROMPT, "<image> how many"])
    adapter = get_adapter(model)
    pixels = inputs["pixel_values"]
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    canvas = (48, 32) if which == "filled" else (32, 48)
    assert pixels.shape == (2, 3, *canvas) and adapter.patch_grid(pixels) == (canvas[0] // 8, canvas[1] // 8)
    # tile (0, 1) is the canvas's top right 16 x 16 pixels, as the processor cut it
    assert torch.equal(pixels[:, :, :16, 16:32], raw["pixel_values"][:, 2])
    kwargs = forward_kwargs(model, pixels, ids, mask, sizes)
    n = kwargs["pixel_values"].shape[1]
    assert torch.equal(kwargs["pixel_values"][:, 1:], raw["pixel_values"][:, 1:n])
    assert torch.equal(kwargs["image_sizes"], raw["image_sizes"])
    # the base view is the content box resized (bicubic, antialiased), not the processor's own resize
    torch.testing.assert_close(kwargs["pixel_values"][:, 0], base_view(pixels, SIZES[which]), rtol=0, atol=0)
    with torch.no_grad():
        ours, theirs = model(**kwargs).logits, model(**raw).logits
        raw_base = {**raw, "pixel_values": raw["pixel_values"].clone()}
        raw_base["pixel_values"][:, 0] = kwargs["pixel_values"][:, 0]
        torch.testing.assert_close(model(**raw_base).logits, ours, rtol=0, atol=0)  # only the base view differs
    assert not torch.equal(ours, theirs)


def test_base_view_of_a_filled_canvas_is_close_to_the_processors():
    """A smooth picture that fills its pinpoint (no padding): the base view from the canvas and
    the processor's own differ by their resampling only; the logits by under 1% of their range
    and the greedy answer not at all (benchmarks/anyres_base_view.py measures more)."""
    for kind in CLASSES:
        model, processor = MODELS[kind](), make_processor(kind)
        raw, inputs, (ids, mask, sizes) = adapted(model, processor, scene(48, 32))
        kwargs = forward_kwargs(model, inputs["pixel_values"], ids, mask, sizes)
        with torch.no_grad():
            ours, theirs = model(**kwargs).logits, model(**raw).logits
            assert torch.equal(model.generate(**kwargs, max_new_tokens=4, do_sample=False),
                               model.generate(**raw, max_new_tokens=4, do_sample=False))
        assert (ours - theirs).abs().max() < 0.01 * (theirs.max() - theirs.min())


@pytest.mark.parametrize("size", [(30, 64), (12, 10)])
def test_base_view_is_the_content_box_and_close_to_the_processors(size):
    """On a padded canvas the base view is the content box (placed by image_sizes by transformers'
    own resize size and the even padding rule) resized with torch, exactly (the same bicubic
    antialiased call on the hand-cut box: tolerance 0); it is within 10% of the pixels' range of
    the processor's own base view (a PIL resize of the original image; the two resamplings differ);
    and the logits' difference to the processor's inputs, relative to their range, is under 5% and
    under a fifth of what the whole padded canvas as base view gives."""
    for kind in CLASSES:
        model, processor = MODELS[kind](), make_processor(kind)
        adapter = get_adapter(model)
        raw, inputs, (ids, mask, sizes) = adapted(model, processor, scene(*size))
        pixels = inputs["pixel_values"]
        top, bottom, left, right = content_box(size)
        assert (bottom - top, right - left) != tuple(pixels.shape[-2:])  # padded
        kwargs = forward_kwargs(model, pixels, ids, mask, sizes)
        torch.testing.assert_close(kwargs["pixel_values"][:, 0], base_view(pixels, size), rtol=0, atol=0)
        theirs_base = raw["pixel_values"][:, 0]
        spread = theirs_base.max() - theirs_base.min()
        assert (kwargs["pixel_values"][:, 0] - theirs_base).abs().max() < 0.1 * spread
        whole = {**kwargs, "pixel_values": adapter.tiles(pixels)}  # the base view from the whole canvas
        whole_base = F.interpolate(pixels, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
        torch.testing.assert_close(whole["pixel_values"][:, 0], whole_base, rtol=0, atol=0)
        with torch.no_grad():
            theirs = model(**raw).logits
            scale = theirs.max() - theirs.min()
            now = float((model(**kwargs).logits - theirs).abs().max() / scale)
            before = float((model(**whole).logits - theirs).abs().max() / scale)
        assert now < 0.05 and now < before / 5, (kind, now, before)


@pytest.mark.parametrize("cell", [(0, 0), (1, 3), (0, 1), (1, 2)])
def test_a_cell_outside_the_content_box_changes_no_base_token(model, processor, cell):
    """12 x 10 px on a 16 x 32 canvas: cell columns 0 and 3 hold padding only. With the vision
    attention silenced, changing such a cell's pixels changes no base-view token, and no base box
    of the layout covers it; a cell inside changes every base token whose box holds it."""
    size = (12, 10)
    _, inputs, (ids, mask, sizes) = adapted(model, processor, noise(*size))
    adapter = get_adapter(model)
    pixels = inputs["pixel_values"]
    assert pixels.shape[-2:] == (16, 32) and content_box(size) == (0, 16, 9, 23)
    marked = _changed_language_inputs(model, pixels, ids, mask, sizes, cell)
    r, c = cell
    with adapter.image_layout(pixels, ids, image_sizes=sizes) as layout:
        pass
    h, w = layout().grid
    cells, columns = layout().cells[0], layout().columns[0]
    g2 = adapter.geometry_of_size(size).side ** 2
    flat = r * w + c
    covering = [k for k in range(g2) if flat in set(cells[k][cells[k] >= 0].tolist())]
    base_marked = [k for k in range(g2) if bool(marked[columns[k]])]
    if c in (0, 3):
        assert covering == [] and base_marked == []
    else:
        assert covering and set(covering) <= set(base_marked)


def test_processor_inputs_refuse_what_is_not_one_image_per_example(model, processor):
    adapter = get_adapter(model)
    two = processor(images=[noise(40, 28), noise(40, 28)], text=[PROMPT + " <image>"], return_tensors="pt")
    with pytest.raises(ValueError, match="2 images for 1 texts; captum-vlm explains one image per example"):
        adapter.processor_inputs(two)
    mixed = processor(images=[noise(40, 28), noise(30, 64)], text=[PROMPT, PROMPT], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="must share one canvas"):
        adapter.processor_inputs(mixed)
    with pytest.raises(ValueError, match="tiles pixel_values"):
        adapter.processor_inputs({"pixel_values": torch.zeros(1, 3, 32, 32)})


def test_bad_inputs_are_named(model, processor):
    adapter = get_adapter(model)
    _, inputs, (ids, mask, sizes) = adapted(model, processor, noise(30, 64))
    pixels = inputs["pixel_values"]
    with pytest.raises(ValueError, match=r"pixel_values: expected a tile canvas of one of the grid pinpoints"):
        adapter.patch_grid(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ValueError, match="image_sizes: .* needs the processor's image_sizes"):
        CrossAttentionGradCAM(model).attribute(pixels, target=[ids.shape[1] - 1], additional_forward_args=(ids, mask))
    with pytest.raises(ValueError, match=r"image_sizes: expected \[1, 2\]"):
        adapter.language_kwargs(ids, (sizes[0],))
    with pytest.raises(ValueError, match=r"input_ids: the texts hold \[\d+\] image tokens but image_sizes \[\[40, 28\]\] .* needs \d+"):
        adapter.language_kwargs(ids, (torch.tensor([[40, 28]]),))
    fewer = torch.cat([ids[:, :1], ids[:, 2:]], 1)  # one placeholder less
    with pytest.raises(ValueError, match="input_ids: .* image tokens, no unpadding of the 4x6 canvas grid"):
        adapter.model_inputs(pixels, fewer)
    with pytest.raises(ValueError, match=r"image_sizes: an image of size \(40, 28\) goes on a canvas of \(3, 2\)"):
        adapter.model_inputs(pixels, ids, None, (torch.tensor([[40, 28]]),))


@pytest.mark.parametrize("size", [(40, 28), (30, 64), (20, 44), (12, 40), (45, 20), (16, 16), (64, 64)])
def test_geometry_read_from_the_placeholders_is_the_models(size):
    """The unpadding (and pooling) read back from the number of placeholders is the one
    ``image_sizes`` gives, and that number is the processor's."""
    for kind in CLASSES:
        model, processor = MODELS[kind](), make_processor(kind)
        adapter = get_adapter(model)
        _, inputs, (ids, _, _) = adapted(model, processor, noise(*size))
        geometry = adapter.geometry_of_size(size)
        assert int((ids == IMG).sum()) == geometry.num_tokens
        read = adapter._text_geometry(inputs["pixel_values"], ids)  # (the text alone cannot place the content box)
        assert (read.grid, read.tiles, read.kept, read.pooled) == (geometry.grid, geometry.tiles, geometry.kept,
                                                                   geometry.pooled)
        assert geometry.content == content_box(size)


# ----- the layout -------------------------------------------------------------------------------
@pytest.mark.parametrize("which", list(SIZES))
def test_layout_is_the_models_own_packing(model, processor, which):
    """The layout's linear map equals the one built from the model's pack_image_features on one-hot
    features: base-view tokens on their blocks, tile tokens on their cells, pooled tokens on the
    cells their bilinear weights read, newlines and unpadded cells on nothing."""
    _, inputs, (ids, _, sizes) = adapted(model, processor, noise(*SIZES[which]))
    adapter = get_adapter(model)
    with adapter.image_layout(inputs["pixel_values"], ids, image_sizes=sizes) as layout:
        pass
    got = torch.zeros(int(np.prod(layout().grid)), ids.shape[1], dtype=torch.float64)
    got[:, layout().columns[0]] = layout().matrix()[0]
    want = reference_matrix(model, ids[0], sizes[0].tolist(), inputs["pixel_values"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # the layout keeps float32 shares
    geometry = adapter.geometry_of_size(SIZES[which])
    if which == "unpadded":
        assert want[:6].abs().sum(1).gt(0).all()  # the base view sees content pixels 4..7 of row 0 ...
        assert geometry.kept == (1, 3, 0, 6)  # ... no tile token does
    if type(model).__name__.startswith("LlavaOnevision") and which == "filled":
        assert geometry.pooled == (4, 3)


def _changed_language_inputs(model, pixels, ids, mask, sizes, cell) -> torch.Tensor:
    """Which language-model input positions change when one 8-px canvas cell is brightened, with
    the vision tower's attention silenced (so a patch reaches only its own tokens): ``[T]`` bool."""
    silence = [a.register_forward_hook(lambda m, args, out: (torch.zeros_like(out[0]), *out[1:]))
               for a in [block.self_attn for block in get_adapter(model).vision_blocks()]]
    try:
        before = _language_input(model, pixels, ids, mask, sizes)
        changed = pixels.clone()
        r, c = cell
        changed[:, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] += 1.0
        after = _language_input(model, changed, ids, mask, sizes)
    finally:
        for handle in silence:
            handle.remove()
    return (after - before).abs().amax(-1) > 1e-6


def _language_input(model, pixels, ids, mask, sizes):
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(x=k["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**forward_kwargs(model, pixels, ids, mask, sizes))
    finally:
        handle.remove()
    return seen["x"][0]


@pytest.mark.parametrize("which", list(SIZES))
@pytest.mark.parametrize("cell", [(0, 0), (1, 2), (3, 3), (2, 1)])
def test_layout_finds_a_planted_cell(model, processor, which, cell):
    """With the vision attention silenced (each patch then stays itself through the tower), a change
    to the pixels of one canvas cell changes exactly the tile tokens the layout puts on that cell
    (none where it was unpadded), every base-view token whose block holds it (and at most the
    neighbours the bicubic kernel reaches, one cell on), and no newline."""
    _, inputs, (ids, mask, sizes) = adapted(model, processor, noise(*SIZES[which]))
    adapter = get_adapter(model)
    pixels = inputs["pixel_values"]
    marked = _changed_language_inputs(model, pixels, ids, mask, sizes, cell)
    r, c = cell
    with adapter.image_layout(pixels, ids, image_sizes=sizes) as layout:
        pass
    h, w = layout().grid
    cells = layout().cells[0]  # [N, M]
    columns = layout().columns[0]
    flat = r * w + c
    near = {(rr * w + cc) for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2) if 0 <= rr < h and 0 <= cc < w}
    g2 = adapter.geometry_of_size(SIZES[which]).side ** 2
    for k, column in enumerate(columns.tolist()):
        covers = set(cells[k][cells[k] >= 0].tolist())
        if k < g2:  # base view
            if flat in covers:
                assert marked[column], f"base token {k} covers the cell but did not change"
            elif marked[column]:
                assert covers & near, f"base token {k} changed far from the cell"
        else:
            assert bool(marked[column]) == (flat in covers), f"tile token {k}"
    newlines = (ids[0] == IMG) & ~torch.isin(torch.arange(ids.shape[1]), columns)
    assert newlines.sum() > 0 and not marked[newlines].any()
    assert marked[ids[0] != IMG].sum() == 0
    tile_hits = sum(bool(marked[col]) for col in columns[g2:].tolist())
    kept = adapter.geometry_of_size(SIZES[which]).kept
    assert (tile_hits > 0) == (kept[0] <= r < kept[1] and kept[2] <= c < kept[3])


# ----- methods against references ---------------------------------------------------------------
def _reference(model, pixels, ids, mask, sizes):
    out = model(**forward_kwargs(model, pixels, ids, mask, sizes), output_attentions=True)
    return log_probs(out.logits, ids), out.attentions


@pytest.mark.parametrize("which", list(SIZES))
def test_gradcam_equals_reference(model, processor, which):
    _, inputs, args = adapted(model, processor, noise(*SIZES[which]), [PROMPT, "<image> how many"])
    ids, mask, sizes = args
    pixels = inputs["pixel_values"]
    start = int((ids[0] == IMG).nonzero()[-1]) + 1
    targets = [start + 1, start + 2]  # scored after the first word that follows the image, in both rows
    got = CrossAttentionGradCAM(model, layer=0).attribute_tokens(pixels, target=targets, additional_forward_args=args,
                                                                 return_grid=True)
    log_p, attentions = _reference(eager_copy(model), pixels, ids, mask, sizes)
    grid = got.shape[-2:]
    for t in targets:
        cam = gradcam_rows(attentions[0], log_p[:, t - 1].sum())
        for b in range(2):
            text_rows = mask[b].bool() & (ids[b] != IMG)
            matrix = reference_matrix(model, ids[b], sizes[b].tolist(), pixels)
            want = (matrix @ cam[b][text_rows].sum(0).double()).reshape(grid)
            assert_close_scaled(got[b, t].double(), want)


def test_relevancy_equals_joint_rule(model, processor):
    _, inputs, args = adapted(model, processor, noise(*SIZES["unpadded"]))
    ids, mask, sizes = args
    pixels = inputs["pixel_values"]
    targets = [ids.shape[1] - 2, ids.shape[1] - 1]
    got = BimodalRelevancy(model).attribute_tokens(pixels, target=targets, additional_forward_args=args,
                                                   return_grid=True)
    log_p, attentions = _reference(eager_copy(model), pixels, ids, mask, sizes)
    matrix = reference_matrix(model, ids[0], sizes[0].tolist(), pixels)
    for t in targets:
        r = relevancy(attentions, log_p[:, t - 1].sum())
        assert_close_scaled(got[0, t].double(), (matrix @ r[t - 1].double()).reshape(got.shape[-2:]))


def test_vision_stream_methods_say_why_they_refuse(model):
    with pytest.raises(TypeError, match=f"model: .*{type(model).__name__}"):
        AttentionRollout(model)


def _summed_log_p(model, kwargs: dict, ids: torch.Tensor) -> torch.Tensor:
    """TokenLogProbs(reduction="sum") by hand: every text position after the first."""
    logits = model(**kwargs).logits
    scored = (ids[:, 1:] != IMG) & kwargs["attention_mask"][:, 1:].bool()
    return (log_probs(logits, ids) * scored).sum(1)


def _cells_of_patches(per_patch: torch.Tensor, grid, tiles, size) -> torch.Tensor:
    """Per-patch scores ``[1 + a*b, g, g]`` (base view, then tiles) on the canvas grid: a tile
    patch in its cell, a base-view patch shared evenly by the cells of its share of the content
    box (loops, by hand)."""
    (h, w), (a, b) = grid, tiles
    g = h // a
    out = torch.zeros(h, w, dtype=per_patch.dtype)
    base = base_cells(size, grid)
    for i in range(g):
        for j in range(g):
            out += per_patch[0, i, j] * base[i, j].to(out) / base[i, j].sum()
            for ta in range(a):
                for tb in range(b):
                    out[ta * g + i, tb * g + j] += per_patch[1 + ta * b + tb, i, j]
    return out


def test_integrated_gradients_equal_a_hand_made_path_integral(kind, processor):
    model = MODELS[kind]().double()
    _, inputs, (ids, mask, sizes) = adapted(model, processor, noise(*SIZES["unpadded"]))
    pixels = inputs["pixel_values"].double()
    n_steps = 4
    got, delta = TokenIntegratedGradients(model).attribute(
        pixels, additional_forward_args=(ids, mask, sizes), n_steps=n_steps, method="riemann_trapezoid",
        return_grid=True, return_convergence_delta=True)
    adapter = get_adapter(model)
    embed = adapter.patch_embedding()
    kwargs = forward_kwargs(model, pixels, ids, mask, sizes)
    tiles5 = kwargs["pixel_values"]
    attributions, base = embedding_path_integral(
        embed, tiles5.flatten(0, 1), lambda: _summed_log_p(model, kwargs, ids).sum(), n_steps)
    per_patch = attributions.sum(1)  # [1 + a*b, g, g]
    want = _cells_of_patches(per_patch, (4, 6), (2, 3), SIZES["unpadded"])
    assert_close_scaled(got[0], want)
    with torch.no_grad():
        change = _summed_log_p(model, kwargs, ids)
        handle = embed.register_forward_hook(lambda m, a, out: base)
        try:
            change = change - _summed_log_p(model, kwargs, ids)
        finally:
            handle.remove()
    torch.testing.assert_close(delta, want.sum()[None] - change)


def _drop_reference(model, pixels, ids, mask, sizes, cells):
    """The summed log-probability with every image token that reads one of ``cells`` (flat canvas
    cells, by the reference layout) removed from the language model's input, built from the
    model's own image features written into its input embeddings."""
    inner = model.model
    kwargs = forward_kwargs(model, pixels, ids, mask, sizes)
    with torch.no_grad():
        features = inner.get_image_features(kwargs["pixel_values"], sizes).pooler_output[0]
        embeds = inner.get_input_embeddings()(ids)
        image = ids[0] == IMG
        embeds[0, image] = features.to(embeds.dtype)
        matrix = reference_matrix(model, ids[0], sizes[0].tolist(), pixels)  # [cells, L]
        stay = ~(matrix[list(cells)] > 0).any(0)
        shortened = {"inputs_embeds": embeds[:, stay], "attention_mask": mask[:, stay]}
        return _summed_log_p(model, shortened, ids[:, stay])


@pytest.mark.parametrize("which", list(SIZES))
def test_occlusion_drop_and_paint_equal_references(kind, processor, which):
    model = warmed(MODELS[kind]().double())
    _, inputs, (ids, mask, sizes) = adapted(model, processor, noise(*SIZES[which]))
    pixels = inputs["pixel_values"].double()
    args = (ids, mask, sizes)
    before = snapshot(model)
    occlusion = CausalOcclusion(model)
    dropped = occlusion.attribute(pixels, additional_forward_args=args, window=1, return_grid=True)[0]
    assert_unchanged(model, before)
    h, w = dropped.shape
    with torch.no_grad():
        intact = _summed_log_p(model, forward_kwargs(model, pixels, ids, mask, sizes), ids)[0]
    for r, c in [(0, 0), (1, 3), (h - 1, w - 1), (2, 1)]:
        want = intact - _drop_reference(model, pixels, ids, mask, sizes, [r * w + c])[0]
        assert_close_scaled(dropped[r, c], want)
    # paint: grey (0) over one cell's pixels reaches its tile and the base view
    painted = occlusion.attribute(pixels, additional_forward_args=args, window=1, intervention="paint",
                                  return_grid=True)[0]
    grey = pixels.clone()
    grey[:, :, 8:16, 24:32] = 0.0  # cell (1, 3)
    tiles = forward_kwargs(model, pixels, ids, mask, sizes)["pixel_values"].clone()
    tiles[:, 1 + 1, :, 8:16, 8:16] = 0.0  # tile (0, 1) holds the cell at its rows 8..16, columns 8..16
    tiles[:, 0] = base_view(grey, SIZES[which])  # (a painted cell outside the content box leaves it)
    with torch.no_grad():
        want = intact - _summed_log_p(model, {**forward_kwargs(model, pixels, ids, mask, sizes),
                                              "pixel_values": tiles}, ids)[0]
    assert_close_scaled(painted[1, 3], want)


def test_drop_image_tokens_is_scoped(model, processor):
    adapter = get_adapter(model)
    _, inputs, (ids, mask, sizes) = adapted(model, processor, noise(*SIZES["unpadded"]))
    before = snapshot(model)
    keep = torch.ones(1, 4, 6)
    keep[0, 1, 2] = 0
    matrix = reference_matrix(model, ids[0], sizes[0].tolist(), inputs["pixel_values"])
    with adapter.drop_image_tokens(keep) as stays:
        stay = stays(ids, (sizes,))
        assert torch.equal(~stay[0], matrix[1 * 6 + 2] > 0)
    assert_unchanged(model, before)
    with pytest.raises(RuntimeError, match="boom"), adapter.drop_image_tokens(keep):
        raise RuntimeError("boom")
    assert_unchanged(model, before)
    from captum_vlm.adapters.llava_next import _DROPPING

    assert not _DROPPING


# ----- explain and the CLI on the model's own answer ---------------------------------------------
@pytest.mark.parametrize("method", ["cross-attention-gradcam", "bimodal-relevancy"])
def test_explain_explains_each_generated_token(model, processor, method):
    image = scene(48, 32)
    prompts = [PROMPT, "<image> how many"]
    before = snapshot(model)
    result = explain(model, processor, image, prompts, methods=[method], max_new_tokens=3, evidence=False)
    assert_unchanged(model, before)
    explainer = {"cross-attention-gradcam": CrossAttentionGradCAM, "bimodal-relevancy": BimodalRelevancy}[method](model)
    for prompt in prompts:
        raw, inputs, (ids, mask, sizes) = adapted(model, processor, image, [prompt])  # this prompt alone
        pixels = inputs["pixel_values"]
        with torch.no_grad():
            sequence = model.generate(**forward_kwargs(model, pixels, ids, mask, sizes), max_new_tokens=3,
                                      do_sample=False)
            assert torch.equal(sequence, model.generate(**raw, max_new_tokens=3, do_sample=False))
            start = ids.shape[1]
            logits = model(**forward_kwargs(model, pixels, sequence, torch.ones_like(sequence), sizes)).logits
        log_p = log_probs(logits, sequence)[0, start - 1 :].sum()
        answer = processor.tokenizer.decode(sequence[0, start:], skip_special_tokens=True).strip()
        title = f"{prompt} → {answer}"
        assert result.scores[title] == pytest.approx(float(log_p.exp()), rel=1e-4)
        generated = list(range(start, sequence.shape[1]))
        whole = explainer.attribute(pixels, target=generated,
                                    additional_forward_args=(sequence, torch.ones_like(sequence), sizes),
                                    return_grid=True)[0]
        record = next(r for r in result.records if r.target == title)
        assert record.grid.shape == (6, 4)
        assert_close_scaled(record.grid, whole)


def test_cli_explains_an_anyres_model(model, processor, tmp_path, monkeypatch, capsys):
    """The CLI end to end (the loader replaced: the tiny processor is built here, offline)."""
    from captum_vlm import cli

    monkeypatch.setattr(cli, "load_model", lambda spec: (model, processor))
    path = tmp_path / "scene.png"
    scene(48, 32).save(path)
    out = tmp_path / "report.html"
    code = cli.main(["explain", str(path), "--text", PROMPT, "--model", "tiny-anyres", "--method",
                     "cross-attention-gradcam", "--out", str(out), "--png", str(tmp_path / "png"), "--quiet"])
    assert code == 0, capsys.readouterr()
    reference = explain(model, processor, scene(48, 32), [PROMPT], methods=["cross-attention-gradcam"],
                        evidence=False)
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and list(reference.scores)[0].split(" → ")[1] in html
    assert len(list((tmp_path / "png").glob("*.png"))) >= 1


def test_batched_windows_that_drop_unequally_ask_for_one_at_a_time():
    model = warmed(MODELS["onevision"]())
    _, inputs, args = adapted(model, make_processor("onevision"), noise(*SIZES["filled"]))  # pooled 4 x 3
    before = snapshot(model)
    occlusion = CausalOcclusion(model)
    with pytest.raises(ValueError, match="perturbations_per_eval: the occlusion windows of one forward drop"):
        occlusion.attribute(inputs["pixel_values"], additional_forward_args=args, window=1, perturbations_per_eval=4)
    assert_unchanged(model, before)


def test_lens_views_of_the_per_view_tower_refuse_before_any_work(model, processor):
    """The tower runs once per tile and once on the base view, so a lens view of one tower run
    on the canvas would be wrong: each refuses (naming the argument) before any forward, and the
    model is left as found."""
    raw = dict(raw_inputs(processor, noise(*SIZES["filled"])))
    assert_tower_views_refused(model, raw, get_adapter(model).processor_inputs(raw)["pixel_values"])


def test_logit_lens_last_layer_is_the_models_probability_of_its_answer(model, processor):
    """The logit lens passes ``image_sizes`` on: its last layer is the model's own next-token
    softmax (on the adapter's inputs), the produced probabilities multiply to the explained
    answer's probability, and the image-token rows are the model's softmax at the image tokens."""
    import captum_vlm as cv

    image, prompts = scene(48, 32), [PROMPT, "<image> how many"]
    before = snapshot(model)
    lenses = explained_lenses(model, processor, image, prompts)
    _, inputs, (ids, mask, sizes) = adapted(model, processor, image, [PROMPT])
    pixels = inputs["pixel_values"]
    sequence = torch.cat([ids, lenses[0].produced_ids[None]], 1)
    with torch.no_grad():  # reference: the model's own forward over prompt + answer
        logits = model(**forward_kwargs(model, pixels, sequence, torch.ones_like(sequence), sizes)).logits
    start = ids.shape[1]
    own = F.softmax(logits[0].double(), -1)
    assert_close_scaled(lenses[0].produced_probs[-1].double(), own[start - 1 : -1].gather(-1, sequence[0, start:, None])[:, 0])
    positions = lenses[0].image_positions
    assert (sequence[0, positions] == IMG).all() and len(set(positions.tolist())) == len(positions)  # newlines left out
    assert_close_scaled(lenses[0].image_top_probs[-1].double(), own[positions].topk(5, -1).values)
    from_inputs = cv.lens.logit_lens_from_inputs(model, pixels, ids, mask, max_new_tokens=3, extra_text_inputs=(sizes,))
    assert torch.equal(from_inputs.top_ids, lenses[0].top_ids)
    with pytest.raises(ValueError, match="image_sizes"):  # said by name, before any work
        cv.lens.logit_lens_from_inputs(model, pixels, ids, mask)
    assert_unchanged(model, before)


@pytest.mark.parametrize("which", list(SIZES))
def test_logit_lens_word_maps_are_the_tokens_probabilities_on_their_cells(model, processor, which):
    """The word map at every layer equals, per canvas cell, the mean probability of the word over
    the image tokens that read the cell, computed here from ``output_hidden_states`` (final norm,
    LM head) and placed by the cells the model's own ``pack_image_features`` gives each
    placeholder (base view on its content-box block, tile tokens on their cells, pooled tokens on
    what they read; newlines and unpadded cells on nothing)."""
    import captum_vlm as cv

    sharp, words = sharpened(model), [5, 11]
    image = noise(*SIZES[which])
    before = snapshot(sharp)
    lens = cv.lens.logit_lens(sharp, processor, image, PROMPT, max_new_tokens=2, words=words)
    assert_unchanged(sharp, before)
    _, inputs, (ids, _, sizes) = adapted(sharp, processor, image)
    pixels = inputs["pixel_values"]
    grid = get_adapter(sharp).patch_grid(pixels)
    s = tm.ANYRES_TILE
    covers = reference_token_cells(sharp, sizes[0].tolist(), grid, (pixels.shape[-2] // s, pixels.shape[-1] // s)) > 0
    image_tokens = covers.any(1)  # the placeholders that are no newline
    positions = (ids[0] == IMG).nonzero()[:, 0][image_tokens]
    assert torch.equal(lens.image_positions, positions) and lens.image_grid == grid
    sequence = torch.cat([ids, lens.produced_ids[None]], 1)
    probs = word_probs_at(sharp, forward_kwargs(sharp, pixels, sequence, torch.ones_like(sequence), sizes),
                          positions, words)  # [layers, N, words]
    for k, word in enumerate(words):
        want = mean_over_covering(probs[..., k], covers[image_tokens], grid)
        assert_varied(want[-1])
        assert_close_scaled(lens.word_maps[str(word)].double(), want)
    if which == "unpadded":  # the content rows no tile token kept: the base view's tokens alone
        geometry = get_adapter(sharp).geometry_of_size(SIZES[which])
        assert geometry.kept[0] > 0 and (lens.word_maps["5"][:, 0] > 0).all()
