"""Adapters answer how to read the model: tasks and capability flags, the image-token layout
(checked by planting a feature in one image region), drop_image_tokens and special ids."""

import pytest
import tiny_models as tm
import torch
from model_state import assert_unchanged, snapshot

from captum_vlm.adapters import classes_for_tasks, get_adapter
from captum_vlm.adapters.layout import ImageTokenLayout
from captum_vlm.targets import AnswerLogits, ImageTextSimilarity, MatchLogit, TokenLogProbs

GRID = (tm.IMAGE_SIZE // tm.PATCH, tm.IMAGE_SIZE // tm.PATCH)
EXPECTED = {  # class: (task, two_tower, image_stream, probability, default target)
    "CLIPModel": (tm.clip, "similarity", True, "separate", "softmax", ImageTextSimilarity),
    "SiglipModel": (tm.siglip, "similarity", True, "separate", "sigmoid", ImageTextSimilarity),
    "BlipForImageTextRetrieval": (tm.blip_itm, "match", False, "cross", "sigmoid", MatchLogit),
    "BlipForConditionalGeneration": (tm.blip_caption, "caption", False, "cross", "exp", TokenLogProbs),
    "BlipForQuestionAnswering": (tm.blip_vqa, "answer_tokens", False, "cross", "exp", TokenLogProbs),
    "ViltForQuestionAnswering": (tm.vilt_vqa, "answer_label", False, "joint", "sigmoid", AnswerLogits),
    "ViltForImageAndTextRetrieval": (tm.vilt_itm, "match", False, "joint", "sigmoid", MatchLogit),
    "LlavaForConditionalGeneration": (tm.llava, "generate", False, "joint", "exp", TokenLogProbs),
    "PaliGemmaForConditionalGeneration": (tm.paligemma, "generate", False, "joint", "exp", TokenLogProbs),
    "Gemma3ForConditionalGeneration": (tm.gemma3, "generate", False, "joint", "exp", TokenLogProbs),
}
#: classes with one image token per patch of the 4x4 grid (Gemma 3 pools: tests/test_family_gemma3.py)
PER_PATCH = [n for n in EXPECTED if get_adapter(EXPECTED[n][0]()).patches_per_cell == (1, 1)]


def _llava_ids(batch=2):
    row = [tm.BOS, 9] + [tm.LLAVA_IMAGE_TOKEN] * (GRID[0] * GRID[1]) + [11, 12]
    return torch.tensor([row] * batch), torch.ones(batch, len(row), dtype=torch.long)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_task_and_capability_flags(name):
    factory, task, two_tower, stream, probability, target = EXPECTED[name]
    adapter = get_adapter(factory())
    assert (adapter.task, adapter.two_tower, adapter.image_stream, adapter.probability) == (
        task, two_tower, stream, probability)
    assert type(adapter.default_target()) is target
    assert name in classes_for_tasks([task])
    scores = torch.tensor([[0.5, -1.0, 2.0]])
    expected = {"softmax": scores.softmax(-1), "sigmoid": 1 / (1 + (-scores).exp()), "exp": scores.exp()}
    torch.testing.assert_close(adapter.to_probability(scores), expected[probability])


def test_special_and_pad_ids_come_from_the_config():
    adapter = get_adapter(tm.llava())
    assert adapter.pad_token_id == tm.PAD
    assert {tm.BOS, tm.EOS, tm.LLAVA_IMAGE_TOKEN} <= adapter.special_token_ids
    ids, mask = _llava_ids(1)
    keep = adapter.special_token_mask(ids, mask)
    assert keep[0].tolist() == [True, False] + [True] * 16 + [False, True]  # last = pooled position
    assert adapter.final_norm() is adapter.model.model.language_model.norm
    assert adapter.lm_head() is adapter.model.lm_head
    with pytest.raises(NotImplementedError, match="lm_head"):
        get_adapter(tm.clip()).lm_head()


def test_layout_to_grid_by_hand():
    layout = ImageTokenLayout(grid=(2, 2), columns=torch.tensor([[5, 3, 4, 2]]), cells=torch.tensor([[0, 1, 2, 3]]),
                              length=6)
    values = torch.arange(6.0)[None, None]
    assert layout.to_grid(values).tolist() == [[[[5.0, 3.0], [4.0, 2.0]]]]
    with pytest.raises(ValueError, match="the model saw 7 tokens"):
        layout.to_grid(torch.zeros(1, 1, 7))
    with pytest.raises(ValueError, match="holds \\[3\\] image tokens"):
        ImageTokenLayout.at_positions(torch.tensor([[False, True, True, True]]), (2, 2))


def _vision_tokens(model, pixels, ids, mask):
    """The image tokens' embeddings as the model's sequence holds them, ``[B, L, D]``."""
    adapter = get_adapter(model)
    if adapter.image_stream == "joint" and not adapter.image_tokens_in_input_ids:  # ViLT
        seen = {}
        handle = model.vilt.embeddings.register_forward_hook(lambda m, a, out: seen.update(x=out[0]))
        try:
            torch.manual_seed(0)  # ViLT samples its patch order
            with adapter.image_layout(pixels, ids) as layout:
                model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            return seen["x"], layout()
        finally:
            handle.remove()
    if adapter.image_tokens_in_input_ids:  # LLaVA: the language model's input embeddings
        seen = {}
        handle = model.model.language_model.register_forward_pre_hook(
            lambda m, a, k: seen.update(x=k["inputs_embeds"]), with_kwargs=True)
        try:
            with adapter.image_layout(pixels, ids) as layout:
                model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            return seen["x"], layout()
        finally:
            handle.remove()
    with adapter.image_layout(pixels, ids) as layout:
        out = adapter.vision_model().embeddings(pixels)
    return out, layout()


@pytest.mark.parametrize("name", PER_PATCH)
@pytest.mark.parametrize("cell", [(0, 0), (1, 2), (3, 3)])
def test_layout_finds_a_planted_patch(name, cell):
    """Change one patch of the image: the image tokens whose embeddings change must map back to
    that patch and no other (LLaVA: a feature planted in the projector's output for that patch
    must land in the grid cell of that patch)."""
    model = EXPECTED[name][0]()
    adapter = get_adapter(model)
    pixels = tm.pixels(2)
    ids, mask = _llava_ids(2) if adapter.image_tokens_in_input_ids else tm.text_ids(2, 6)
    n = GRID[0] * GRID[1]
    flat = cell[0] * GRID[1] + cell[1]
    with torch.no_grad():
        if adapter.image_tokens_in_input_ids:
            handle = model.model.multi_modal_projector.register_forward_hook(
                lambda m, a, out: out.index_fill(1, torch.tensor([flat]), 7.0))
            try:
                planted, layout = _vision_tokens(model, pixels, ids, mask)
            finally:
                handle.remove()
            marked = (planted == 7.0).all(-1).float()  # [B, L]: where the planted feature sits
        else:
            before, _ = _vision_tokens(model, pixels, ids, mask)
            changed = pixels.clone()
            r, c = cell
            changed[:, :, r * tm.PATCH : (r + 1) * tm.PATCH, c * tm.PATCH : (c + 1) * tm.PATCH] += 1.0
            after, layout = _vision_tokens(model, changed, ids, mask)
            marked = ((after - before).abs().amax(-1) > 1e-6).float()
    grid = layout.to_grid(marked[:, None])[:, 0]
    expected = torch.zeros(2, *GRID)
    expected[:, cell[0], cell[1]] = 1.0
    assert torch.equal(grid, expected)
    assert marked.sum() == 2  # one token per example, and it is an image token
    assert layout.columns.shape == (2, n)


# ViLT masks dropped patches out of attention instead; tests/test_attr_ig_occlusion.py checks it
@pytest.mark.parametrize("name", [n for n in PER_PATCH if not n.startswith("Vilt")])
def test_drop_image_tokens_is_scoped(name):
    model = EXPECTED[name][0]()
    adapter = get_adapter(model)
    pixels = tm.pixels(1)
    keep = torch.ones(1, *GRID)
    keep[0, 1, :] = 0  # drop the second row of patches
    before = snapshot(model)
    with torch.no_grad(), adapter.drop_image_tokens(keep) as stays:
        out = adapter.vision_model().embeddings(pixels)
        assert out.shape[1] == adapter.num_prefix_tokens + 12
        if adapter.image_tokens_in_input_ids:
            ids, _ = _llava_ids(1)
            stay = stays(ids)
            assert stay.sum() == ids.shape[1] - 4
            assert not stay[0, 2 + 4 : 2 + 8].any() and stay[0, 2 : 2 + 4].all()
    assert adapter.vision_model().embeddings(pixels).shape[1] == adapter.num_prefix_tokens + 16
    assert_unchanged(model, before)
    with pytest.raises(RuntimeError, match="boom"), adapter.drop_image_tokens(keep):
        raise RuntimeError("boom")
    assert_unchanged(model, before)


# ----- many-to-one and one-to-many layouts, by hand -------------------------------------------------
def test_merged_layout_spreads_each_token_over_its_block_by_hand():
    # a 3 x 4 grid, 2 x 2 blocks: tokens at (0, 0), (0, 1) cover 4 cells; the bottom row's 2
    layout = ImageTokenLayout.merged(torch.tensor([[1, 2, 3, 4]]), grid=(3, 4), merge=2, length=6)
    assert layout.cells.tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, -1, -1], [10, 11, -1, -1]]]
    values = torch.tensor([[[9.0, 4.0, 8.0, 2.0, 6.0, 9.0]]])  # columns 1..4 are the image tokens
    grid = layout.to_grid(values)
    assert grid.tolist() == [[[[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]]]]
    assert float(grid.sum()) == 4 + 8 + 2 + 6  # mass-conserving
    with pytest.raises(ValueError, match="columns: 3 image tokens per row, but 2-merging the 3x4 grid gives 2x2 = 4"):
        ImageTokenLayout.merged(torch.tensor([[1, 2, 3]]), grid=(3, 4), merge=2)


def test_tiles_and_a_global_view_add_up_per_cell_by_hand():
    # a 2 x 2 grid: four tile tokens (one cell each) and one global token over the whole grid
    boxes = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 2], [1, 0, 2, 1], [1, 1, 2, 2], [0, 0, 2, 2]])
    layout = ImageTokenLayout.boxes(torch.tensor([[0, 1, 2, 3, 4]]), (2, 2), boxes)
    values = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 8.0]]])
    assert layout.to_grid(values).tolist() == [[[[3.0, 4.0], [5.0, 6.0]]]]  # tile + 8 / 4
    torch.testing.assert_close(layout.matrix()[0] @ values[0, 0].double(), torch.tensor([3.0, 4.0, 5.0, 6.0],
                                                                                         dtype=torch.float64))
    # per-example boxes; an empty box covers nothing and its score is left out
    per_row = torch.tensor([[[0, 0, 1, 2], [1, 0, 2, 2]], [[0, 1, 2, 2], [0, 0, 0, 0]]])
    layout = ImageTokenLayout.boxes(torch.tensor([[0, 1], [1, 0]]), (2, 2), per_row)
    got = layout.to_grid(torch.tensor([[[2.0, 6.0]], [[4.0, 10.0]]]))
    assert got.tolist() == [[[[1.0, 1.0], [3.0, 3.0]]], [[[0.0, 5.0], [0.0, 5.0]]]]


def test_one_cell_per_token_is_the_old_rule():
    cells = torch.tensor([[2, 0, 3, 1]])
    columns = torch.tensor([[5, 3, 4, 2]])
    values = torch.randn(1, 3, 6)
    flat = ImageTokenLayout((2, 2), columns, cells, 6).to_grid(values)
    padded = ImageTokenLayout((2, 2), columns, torch.stack([cells, torch.full_like(cells, -1)], -1), 6)
    assert torch.equal(padded.to_grid(values), flat)
    assert torch.equal(padded.one_cell_each, cells)
    expected = torch.zeros(1, 3, 4)
    expected[0, :, cells[0]] = values[0][:, columns[0]]
    assert torch.equal(flat, expected.reshape(1, 3, 2, 2))
    assert ImageTokenLayout.merged(torch.tensor([[0, 1]]), (2, 4), 2).one_cell_each is None


def test_layout_refuses_cells_off_the_grid():
    with pytest.raises(ValueError, match="cells: expected flat cells 0..3 of the 2x2 grid"):
        ImageTokenLayout((2, 2), torch.tensor([[0, 1]]), torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="cells: expected \\[B, N\\] or \\[B, N, M\\]"):
        ImageTokenLayout((2, 2), torch.tensor([[0, 1]]), torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="boxes: expected"):
        ImageTokenLayout.boxes(torch.tensor([[0, 1]]), (2, 2), torch.tensor([[0, 0, 1, 1]]))
