"""TokenIntegratedGradients and CausalOcclusion: equal to Captum run by hand, complete, batched
like one by one, leave the model as found, and refuse bad arguments by name."""

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, NoiseTunnel, Occlusion
from model_state import assert_unchanged, snapshot
from numerics import assert_close_scaled
from transformers import CLIPModel

from captum_vlm.adapters import get_adapter
from captum_vlm.attr import CausalOcclusion, GroundingResult, TokenIntegratedGradients
from captum_vlm.attr.token_ig import text_baseline_ids
from captum_vlm.targets import AnswerLogits, ImageTextSimilarity, MatchLogit, TokenLogProbs


def llava_ids(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[tm.BOS, 9] + [tm.LLAVA_IMAGE_TOKEN] * 16 + [11, 12, 13]] * batch)
    ids[1:, 1] = 20
    return ids, torch.ones_like(ids)


def _replacing(module, value):
    """Forward hook making ``module`` return ``value`` (a copy: some models add to it in place)."""
    return module.register_forward_hook(lambda m, a, o: value.clone())


# ----- Integrated Gradients ----------------------------------------------------------------------


def test_image_ig_equals_captum_ig_on_patch_embeddings():
    model = tm.clip()
    pixels, (ids, mask) = tm.pixels(2), tm.text_ids(3, 8)
    ours = TokenIntegratedGradients(model).attribute(
        pixels, target=[2, 0], additional_forward_args=(ids, mask), n_steps=8, return_grid=True
    )
    conv = model.vision_model.embeddings.patch_embedding
    sim = ImageTextSimilarity(model)
    with torch.no_grad():
        embeds, start = conv(pixels), conv(torch.zeros_like(pixels))

    def on_embeddings(e):
        handle = _replacing(conv, e)
        try:
            return sim(torch.zeros(e.shape[0], 3, 32, 32), ids, mask)
        finally:
            handle.remove()

    expected = IntegratedGradients(on_embeddings).attribute(embeds, start, target=[2, 0], n_steps=8).sum(1)
    assert ours.shape == (2, 4, 4)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    pixel_map = TokenIntegratedGradients(model).attribute(
        pixels, target=[2, 0], additional_forward_args=(ids, mask), n_steps=8
    )
    assert pixel_map.shape == pixels.shape
    torch.testing.assert_close(pixel_map[:, 1, 8:16, 0:8], ours[:, 1:2, 0:1].expand(2, 8, 8))


@pytest.mark.parametrize("factory", [tm.blip_itm, tm.llava])
def test_multimodal_ig_equals_captum_ig_on_both_embeddings(factory):
    model = factory()
    pixels = tm.pixels(2)
    ids, mask = llava_ids(2) if factory is tm.llava else tm.text_ids(2, 8)
    adapter, target = get_adapter(model), (MatchLogit(model) if factory is tm.blip_itm else TokenLogProbs(model, "sum"))
    image, text = TokenIntegratedGradients(model).attribute(
        pixels, additional_forward_args=(ids, mask), modality="both", n_steps=6, return_grid=True
    )
    conv, words = adapter.patch_embedding(), adapter.text_embedding()
    base_ids = text_baseline_ids(adapter, ids, mask)
    with torch.no_grad():
        inputs = (conv(pixels), words(ids))
        starts = (conv(torch.zeros_like(pixels)), words(base_ids))

    def on_embeddings(patch_embeds, word_embeds):
        n = patch_embeds.shape[0] // ids.shape[0]
        handles = [_replacing(conv, patch_embeds), _replacing(words, word_embeds)]
        try:
            return target(pixels.repeat(n, 1, 1, 1), ids.repeat(n, 1), mask.repeat(n, 1))
        finally:
            for handle in handles:
                handle.remove()

    expected = IntegratedGradients(on_embeddings).attribute(inputs, starts, n_steps=6)
    assert_close_scaled(image, expected[0].sum(1))
    assert_close_scaled(text, expected[1].sum(-1))
    if factory is tm.llava:  # image placeholders are kept in the baseline and filled by the image
        assert torch.equal(base_ids[adapter.image_token_positions(ids)], ids[adapter.image_token_positions(ids)])
        assert text[adapter.image_token_positions(ids)].abs().max() == 0


def test_text_baseline_keeps_special_tokens_and_pooled_position():
    model = tm.clip()
    ids, mask = tm.text_ids(2, 6)
    base = text_baseline_ids(get_adapter(model), ids, mask)
    expected = torch.where((ids == tm.BOS) | (ids == tm.EOS) | (mask == 0), ids, torch.full_like(ids, tm.PAD))
    assert torch.equal(base, expected)
    with pytest.raises(ValueError, match="text_baseline"):  # EOS everywhere moves CLIP's pooled EOS
        text_baseline_ids(get_adapter(model), ids, mask, text_baseline=tm.EOS)
    with pytest.raises(ValueError, match="text_baseline"):
        text_baseline_ids(get_adapter(model), ids, mask, text_baseline=ids[:1])


@pytest.mark.parametrize(
    "factory, target",
    [(tm.clip, 1), (tm.siglip, 0), (tm.blip_caption, None), (tm.vilt_vqa, 3), (tm.llava, None)],
)
def test_completeness_at_default_steps(factory, target):
    model = factory()
    pixels = tm.pixels(1, seed=3) * 3
    ids, mask = llava_ids(1) if factory is tm.llava else tm.text_ids(2 if factory in (tm.clip, tm.siglip) else 1, 7)
    ig = TokenIntegratedGradients(model)
    kwargs = dict(target=target, additional_forward_args=(ids, mask), modality="both",
                  return_convergence_delta=True, return_grid=True)
    _, delta = ig.attribute(pixels, **kwargs)
    # f at the baseline, computed without IG: the model on the baseline tokens and a zero image; for
    # captions and LLaVA the scored tokens stay those of input_ids, so only the embeddings change
    fwd, adapter = ig.target_fn, get_adapter(model)
    base_ids = text_baseline_ids(adapter, ids, mask)
    with torch.no_grad():
        f_x = fwd(pixels, ids, mask)
        if isinstance(fwd, TokenLogProbs):
            handles = [_replacing(adapter.text_embedding(), adapter.text_embedding()(base_ids)),
                       _replacing(adapter.patch_embedding(), adapter.patch_embedding()(torch.zeros_like(pixels)))]
            try:
                f_b = fwd(pixels, ids, mask)
            finally:
                for handle in handles:
                    handle.remove()
        else:
            f_b = fwd(torch.zeros_like(pixels), base_ids, mask)
    change = (f_x[:, target] - f_b[:, target]) if target is not None else f_x - f_b
    assert delta.abs().item() < 0.01 * change.abs().item()
    # the delta is the map's sum minus f's change: checked at one step, where it is of the size of the
    # change (at default steps it is ~1e-8, below the float32 noise of the change it is taken from)
    (image, text), delta = ig.attribute(pixels, n_steps=1, **kwargs)
    assert_close_scaled(image.sum() + text.sum() - change, delta)


def test_blip_vqa_explains_the_question_tokens():
    model = tm.blip_vqa()
    pixels, (question, q_mask), (answer, a_mask) = tm.pixels(1), tm.text_ids(1, 6), tm.text_ids(1, 4, seed=1)
    args = (question, q_mask, answer, a_mask)
    (image, text), delta = TokenIntegratedGradients(model).attribute(
        pixels, additional_forward_args=args, modality="both", return_convergence_delta=True, return_grid=True
    )
    assert image.shape == (1, 4, 4) and text.shape == question.shape
    assert delta.abs().item() < 0.01 * (image.sum() + text.sum() - delta).abs().item()
    deleted = CausalOcclusion(model).attribute(pixels, additional_forward_args=args, modality="text",
                                               text_intervention="delete")
    assert deleted.shape == question.shape and deleted[0, 1:5].abs().min() > 0


def test_ig_batched_and_chunked_equal_one_by_one(capsys):
    model = tm.vilt_vqa()
    pixels, (ids, mask) = tm.pixels(2), tm.text_ids(2, 6)
    ig = TokenIntegratedGradients(model)
    kwargs = dict(modality="both", n_steps=5, return_grid=True)
    together = ig.attribute(pixels, target=[1, 4], additional_forward_args=(ids, mask), **kwargs)
    chunked = ig.attribute(pixels, target=[1, 4], additional_forward_args=(ids, mask), internal_batch_size=4,
                           show_progress=True, **kwargs)
    assert "TokenIntegratedGradients" in capsys.readouterr().err
    for b, t in enumerate([1, 4]):
        alone = ig.attribute(pixels[b : b + 1], target=t, additional_forward_args=(ids[b : b + 1], mask[b : b + 1]),
                             **kwargs)
        for got, want in zip(together, alone):
            assert_close_scaled(got[b : b + 1], want)
    for got, want in zip(chunked, together):
        assert_close_scaled(got, want)


def test_two_tower_text_ig_explains_the_target_prompt_per_image():
    model = tm.siglip()
    pixels, (ids, mask) = tm.pixels(2), tm.text_ids(3, 6)
    ig = TokenIntegratedGradients(model)
    both = ig.attribute(pixels, target=[2, 1], additional_forward_args=(ids, mask), modality="text", n_steps=5)
    one = ig.attribute(pixels[1:], target=1, additional_forward_args=(ids, mask), modality="text", n_steps=5)
    assert both.shape == (2, 6)
    torch.testing.assert_close(both[1:], one)
    assert both[0, 1:5].abs().min() > 0 and both[0, 0] == 0  # prompt tokens scored, BOS kept in baseline


def test_methods_work_inside_captum_noise_tunnel():
    model = tm.blip_itm()
    pixels, (ids, mask) = tm.pixels(2), tm.text_ids(2, 6)
    for method, kwargs in ((TokenIntegratedGradients(model), dict(n_steps=3)), (CausalOcclusion(model), {})):
        smooth = NoiseTunnel(method).attribute(pixels, nt_samples=2, stdevs=0.0, additional_forward_args=(ids, mask),
                                               **kwargs)
        plain = method.attribute(pixels, additional_forward_args=(ids, mask), **kwargs)
        assert_close_scaled(smooth, plain)


# ----- occlusion ---------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [tm.clip, tm.vilt_vqa])
def test_paint_occlusion_equals_captum_occlusion(factory):
    model = factory().double()  # float64: ViLT's maps (~1e-4) are near the float32 noise of its logits
    pixels = tm.pixels(2).double()
    ids, mask = tm.text_ids(3 if factory is tm.clip else 2, 6)
    target = [2, 0]
    ours = CausalOcclusion(model).attribute(
        pixels, target=target, additional_forward_args=(ids, mask), intervention="paint", window=2, stride=1,
        baselines=0.5, perturbations_per_eval=3,
    )
    fwd = ImageTextSimilarity(model) if factory is tm.clip else AnswerLogits(model)
    expected = Occlusion(fwd).attribute(
        pixels, sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8), baselines=0.5, target=target,
        additional_forward_args=(ids, mask),
    )
    assert ours.dtype == torch.float64 and expected.dtype == torch.float32  # Captum's last division
    assert_close_scaled(ours, expected.double())


def _two_tower_without_patch(model, pixels, ids, mask, patch):
    """Logits of the vision tower run by hand on the embeddings minus one patch token."""
    vision, clip = model.vision_model, isinstance(model, CLIPModel)
    prefix = 1 if clip else 0
    with torch.no_grad():
        tokens = vision.embeddings(pixels)
        tokens = torch.cat([tokens[:, : prefix + patch], tokens[:, prefix + patch + 1 :]], dim=1)
        if clip:
            hidden = vision.encoder(inputs_embeds=vision.pre_layrnorm(tokens)).last_hidden_state
            image = model.visual_projection(vision.post_layernorm(hidden[:, 0]))
            text = model.text_projection(model.text_model(input_ids=ids, attention_mask=mask).pooler_output)
            return model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
        image = vision.head(vision.post_layernorm(vision.encoder(inputs_embeds=tokens).last_hidden_state))
        text = model.text_model(input_ids=ids, attention_mask=mask).pooler_output
        cos = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
        return model.logit_scale.exp() * cos + model.logit_bias


@pytest.mark.parametrize("factory", [tm.clip, tm.siglip])
def test_token_drop_equals_two_tower_run_on_fewer_tokens(factory):
    model = factory()
    pixels, (ids, mask) = tm.pixels(1), tm.text_ids(2, 6)
    grid = CausalOcclusion(model).attribute(
        pixels, target=1, additional_forward_args=(ids, mask), return_grid=True, perturbations_per_eval=5
    )
    full = ImageTextSimilarity(model)(pixels, ids, mask)[0, 1]
    for patch in (0, 5, 15):
        reduced = _two_tower_without_patch(model, pixels, ids, mask, patch)[0, 1]
        torch.testing.assert_close(grid.flatten()[patch], (full - reduced).detach(), atol=1e-5, rtol=1e-4)


def test_non_square_input_gives_non_square_grid():
    model = tm.clip()
    pixels, (ids, mask) = tm.pixels(1, 32, 48), tm.text_ids(2, 6)
    target = ImageTextSimilarity(model, interpolate_pos_encoding=True)
    ig = TokenIntegratedGradients(target).attribute(pixels, target=0, additional_forward_args=(ids, mask),
                                                   modality="both", n_steps=4, return_grid=True)
    occ = CausalOcclusion(target).attribute(pixels, target=0, additional_forward_args=(ids, mask), window=(2, 3))
    assert ig[0].shape == (1, 4, 6) and ig[1].shape == (1, 6)
    assert occ.shape == pixels.shape and occ[0, 0, :16, :24].unique().numel() == 1


def test_token_drop_equals_vilt_run_on_fewer_tokens():
    model = tm.vilt_vqa().double()  # float64: the entries (~1e-5) are near the float32 noise of the logits
    pixels, (ids, mask) = tm.pixels(1).double(), tm.text_ids(1, 6)
    grid = CausalOcclusion(model).attribute(pixels, target=2, additional_forward_args=(ids, mask), return_grid=True)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[0, 2]
        embeds = model.vilt.embeddings
        x, x_mask, (where, _) = embeds.visual_embed(pixels, torch.ones(1, 32, 32, dtype=torch.long), max_image_length=-1)
        for row, col in ((0, 0), (2, 3)):
            token = 1 + int(((where[0, :, 0] == row) & (where[0, :, 1] == col)).nonzero())
            fewer = torch.cat([x[:, :token], x[:, token + 1 :]], dim=1)
            reduced = model(input_ids=ids, attention_mask=mask, image_embeds=fewer,
                            pixel_mask=torch.ones(fewer.shape[:2], dtype=torch.long)).logits[0, 2]
            assert_close_scaled(grid[0, row, col].double(), full - reduced)  # Captum's Occlusion returns float32


def test_llava_token_drop_removes_matching_placeholders():
    model = tm.llava()
    pixels, (ids, mask) = tm.pixels(1), llava_ids(1)
    occ = CausalOcclusion(model)
    grid = occ.attribute(pixels, additional_forward_args=(ids, mask), window=(1, 2), stride=(1, 2), return_grid=True)
    # by hand: the vision tower without patches 4 and 5 (row 1, cols 0-1), and two fewer placeholders
    vision = get_adapter(model).vision_model()
    keep = torch.ones(1, 17, dtype=torch.bool)
    keep[0, 1 + 4 : 1 + 6] = False
    handle = vision.embeddings.register_forward_hook(lambda m, a, o: o[keep].view(1, 15, -1))
    try:
        with torch.no_grad():
            stay = torch.ones_like(ids, dtype=torch.bool)
            stay[0, 2 + 4 : 2 + 6] = False
            fewer = TokenLogProbs(model, "sum")(pixels, ids[stay][None], mask[stay][None])
    finally:
        handle.remove()
    full = TokenLogProbs(model, "sum")(pixels, ids, mask)
    torch.testing.assert_close(grid[0, 1, 0], (full - fewer)[0].detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grid[0, 1, 1], grid[0, 1, 0])
    # scoring only the answer (positions >= 19) follows the answer when placeholders go
    answer = TokenLogProbs(model, "sum", score_from=19)
    grid = CausalOcclusion(answer).attribute(pixels, additional_forward_args=(ids, mask), window=(1, 2), stride=(1, 2),
                                             return_grid=True)
    handle = vision.embeddings.register_forward_hook(lambda m, a, o: o[keep].view(1, 15, -1))
    try:
        with torch.no_grad():
            fewer = TokenLogProbs(model, "sum", score_from=17)(pixels, ids[stay][None], mask[stay][None])
    finally:
        handle.remove()
    torch.testing.assert_close(grid[0, 1, 0], (answer(pixels, ids, mask) - fewer)[0].detach(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("intervention", ["drop", "paint"])
def test_float64_occlusion_maps_are_float64_and_equal_the_drop_by_hand(intervention):
    """A float64 model's maps keep its dtype (Captum divides by its window counts in float32) and
    equal the float64 difference worked by hand to float64 precision relative to the map."""
    model = tm.llava().double()
    pixels, (ids, mask) = tm.pixels(1).double(), llava_ids(1)
    grid = CausalOcclusion(model).attribute(pixels, additional_forward_args=(ids, mask), window=1,
                                            intervention=intervention, return_grid=True)
    heat = CausalOcclusion(model).attribute(pixels, additional_forward_args=(ids, mask), window=1,
                                            intervention=intervention)
    assert grid.dtype == heat.dtype == torch.float64
    target = TokenLogProbs(model, "sum")
    with torch.no_grad():
        full = target(pixels, ids, mask)[0]
        if intervention == "paint":
            blank = pixels.clone()
            blank[:, :, 8:16, 0:8] = 0.0  # cell (1, 0)
            want = full - target(blank, ids, mask)[0]
        else:
            vision = get_adapter(model).vision_model()
            keep = torch.ones(1, 17, dtype=torch.bool)
            keep[0, 1 + 4] = False
            stay = torch.ones_like(ids, dtype=torch.bool)
            stay[0, 2 + 4] = False
            handle = vision.embeddings.register_forward_hook(lambda m, a, o: o[keep].view(1, 16, -1))
            try:
                want = full - target(pixels, ids[stay][None], mask[stay][None])[0]
            finally:
                handle.remove()
    torch.testing.assert_close(grid[0, 1, 0], want, rtol=1e-6, atol=1e-6 * float(grid.abs().max()))


@pytest.mark.parametrize("factory, target", [(tm.clip, [2, 0]), (tm.blip_itm, None), (tm.vilt_vqa, [1, 3])])
def test_occlusion_batched_equals_one_by_one(factory, target):
    model = factory().double()  # float64: ViLT's maps (~1e-4) are near the float32 noise of its logits
    pixels = tm.pixels(2).double()
    ids, mask = tm.text_ids(3 if factory is tm.clip else 2, 6)
    occ = CausalOcclusion(model)
    for modality in ("image", "text"):
        together = occ.attribute(pixels, target=target, additional_forward_args=(ids, mask), modality=modality,
                                 window=2, stride=1, perturbations_per_eval=4)
        for b in range(2):
            rows = (ids, mask) if factory is tm.clip else (ids[b : b + 1], mask[b : b + 1])
            alone = occ.attribute(pixels[b : b + 1], target=None if target is None else target[b],
                                  additional_forward_args=rows, modality=modality, window=2, stride=1)
            assert_close_scaled(together[b : b + 1], alone)


def test_two_tower_occlusion_encodes_the_prompts_once():
    model = tm.clip()
    calls = []
    handle = model.text_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        for intervention in ("drop", "paint"):
            calls.clear()
            CausalOcclusion(model).attribute(tm.pixels(2), target=0, additional_forward_args=tm.text_ids(3, 6),
                                             intervention=intervention, perturbations_per_eval=3)
            assert len(calls) == 1, intervention
    finally:
        handle.remove()


def test_text_occlusion_equals_editing_the_tokens():
    model = tm.clip()
    pixels, (ids, mask) = tm.pixels(2), tm.text_ids(2, 6)
    occ = CausalOcclusion(model)
    replaced = occ.attribute(pixels, target=[1, 0], additional_forward_args=(ids, mask), modality="text")
    deleted = occ.attribute(pixels, target=[1, 0], additional_forward_args=(ids, mask), modality="text",
                            text_intervention="delete")
    sim = ImageTextSimilarity(model)
    with torch.no_grad():
        full = sim(pixels, ids, mask)
        for b, k in enumerate([1, 0]):
            for t in range(1, int(mask[k].sum()) - 1):
                edited = ids.clone()
                edited[k, t] = tm.PAD
                torch.testing.assert_close(replaced[b, t], full[b, k] - sim(pixels, edited, mask)[b, k],
                                           atol=1e-5, rtol=1e-4)
                short = torch.cat([ids[k, :t], ids[k, t + 1 :], torch.tensor([tm.PAD])])[None]
                short_mask = torch.cat([mask[k, :t], mask[k, t + 1 :], torch.tensor([0])])[None]
                score = ImageTextSimilarity(model)(pixels[b : b + 1], short, short_mask)[0, 0]
                torch.testing.assert_close(deleted[b, t], full[b, k] - score, atol=1e-5, rtol=1e-4)
    assert replaced[:, 0].abs().max() == 0  # BOS is never occluded


def test_grounding_test_reads_the_occlusion_it_was_given():
    model = tm.clip()
    pixels, (ids, mask) = tm.pixels(1, seed=2), tm.text_ids(2, 6)
    occ = CausalOcclusion(model)
    grid = occ.attribute(pixels, target=0, additional_forward_args=(ids, mask), return_grid=True)
    args = dict(target=0, additional_forward_args=(ids, mask), fraction=1 / 16, n_random=6)
    good = occ.grounding_test(pixels, grid, **args)
    bad = occ.grounding_test(pixels, -grid, **args)
    assert isinstance(good, GroundingResult) and good.n_masked == 1
    torch.testing.assert_close(good.drop_relevant, grid.flatten()[None].max(1).values, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bad.drop_relevant, grid.flatten()[None].min(1).values, atol=1e-5, rtol=1e-4)
    assert bool(good.grounded[0]) == bool(good.drop_relevant[0] > good.drop_random[0] + 2 * good.score_random_std[0])
    assert not bool(bad.grounded[0])
    assert good.flip_rate_relevant is not None and 0 <= good.flip_rate_relevant <= 1
    pixel_map = occ.attribute(pixels, target=0, additional_forward_args=(ids, mask))
    same = occ.grounding_test(pixels, pixel_map, **args)
    torch.testing.assert_close(same.drop_relevant, good.drop_relevant)
    assert "grounded" in good.summary()


# ----- the model is left as found; bad arguments ---------------------------------------------------


class _FailsOnThirdCall(TokenLogProbs):
    """Raises in the middle of a method: after the target check, inside the perturbed/IG forwards."""

    calls = 0

    def __call__(self, *args, **kwargs):
        type(self).calls += 1
        if type(self).calls == 3:
            raise RuntimeError("boom")
        return super().__call__(*args, **kwargs)


def test_model_left_as_found_also_when_raising():
    model = tm.llava()
    pixels, (ids, mask) = tm.pixels(1), llava_ids(1)
    before = snapshot(model)
    TokenIntegratedGradients(model).attribute(pixels, additional_forward_args=(ids, mask), modality="both", n_steps=2)
    CausalOcclusion(model).attribute(pixels, additional_forward_args=(ids, mask), window=2)
    assert_unchanged(model, before)
    failing = _FailsOnThirdCall(model, reduction="sum")
    for run in (
        lambda: TokenIntegratedGradients(failing).attribute(pixels, additional_forward_args=(ids, mask), n_steps=2),
        lambda: CausalOcclusion(failing).attribute(pixels, additional_forward_args=(ids, mask), window=2),
    ):
        _FailsOnThirdCall.calls = 0
        with pytest.raises(RuntimeError, match="boom"):
            run()
        assert_unchanged(model, before)
    # LLaVA still returns its hidden states afterwards (transformers' lazily installed hooks)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == 3


def test_bad_arguments_are_named():
    model = tm.clip()
    pixels, (ids, mask) = tm.pixels(1), tm.text_ids(2, 6)
    occ, ig = CausalOcclusion(model), TokenIntegratedGradients(model)
    args = (ids, mask)
    with pytest.raises(ValueError, match="window"):
        occ.attribute(pixels, target=0, additional_forward_args=args, window=5)
    with pytest.raises(ValueError, match="stride"):
        occ.attribute(pixels, target=0, additional_forward_args=args, stride=0)
    with pytest.raises(TypeError, match="window"):
        occ.attribute(pixels, target=0, additional_forward_args=args, window=(1, 2, 3))
    with pytest.raises(ValueError, match="target"):
        occ.attribute(pixels, target=2, additional_forward_args=args)
    with pytest.raises(ValueError, match="target"):
        ig.attribute(pixels, target=-3, additional_forward_args=args)
    with pytest.raises(ValueError, match="intervention"):
        occ.attribute(pixels, target=0, additional_forward_args=args, intervention="blur")
    with pytest.raises(ValueError, match="modality"):
        ig.attribute(pixels, target=0, additional_forward_args=args, modality="audio")
    with pytest.raises(ValueError, match="n_steps"):
        ig.attribute(pixels, target=0, additional_forward_args=args, n_steps=0)
    with pytest.raises(ValueError, match="internal_batch_size"):
        ig.attribute(pixels, target=0, additional_forward_args=args, internal_batch_size=0)
    with pytest.raises(ValueError, match="perturbations_per_eval"):
        occ.attribute(pixels, target=0, additional_forward_args=args, perturbations_per_eval=0)
    with pytest.raises(ValueError, match="fraction"):
        occ.grounding_test(pixels, torch.zeros(1, 4, 4), target=0, additional_forward_args=args, fraction=1.5)
    with pytest.raises(ValueError, match="attribution"):
        occ.grounding_test(pixels, torch.zeros(1, 5, 5), target=0, additional_forward_args=args)
    with pytest.raises(TypeError, match="additional_forward_args"):
        ig.attribute(pixels, target=0, additional_forward_args=None)
    itm, vqa = tm.blip_itm(), tm.vilt_vqa()
    pair = tm.text_ids(1, 6)
    with pytest.raises(ValueError, match="target"):  # a match logit has one number per example
        CausalOcclusion(itm).attribute(pixels, target=1, additional_forward_args=pair)
    with pytest.raises(ValueError, match="target"):
        TokenIntegratedGradients(vqa).attribute(pixels, target=5, additional_forward_args=pair)
    with pytest.raises(ValueError, match="text_intervention"):
        CausalOcclusion(tm.blip_caption()).attribute(pixels, additional_forward_args=pair, modality="text",
                                                     text_intervention="delete")
