"""The shared promises, checked once for every registered method x every supported class, in
the style of transformers' ``ModelTesterMixin``: the model left as found (also when the method
raises), batched equals one at a time, sdpa equals eager, Captum's ``NoiseTunnel`` wraps it,
non-square and odd sizes, bad arguments named in the error, and a class a method cannot explain
refused with a message that names it.

The matrix is built from ``captum_vlm.attr.__all__`` and the tiny models, so a new method or a
new class is checked without touching this file (give a costly method small settings in SETTINGS).
A class whose inputs change shape with the canvas (tiles and a global view) has a row per canvas
in CANVASES, named ``Class[rows x cols]``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import tiny_models as tm
import torch
from captum.attr import Attribution, NoiseTunnel
from model_state import assert_unchanged, snapshot
from numerics import assert_close_scaled

import captum_vlm.attr as attr
from captum_vlm._grid import grid_to_pixels
from captum_vlm.adapters import get_adapter
from captum_vlm.targets import ImageTextSimilarity, MatchLogit, TokenLogProbs

METHODS = {n: getattr(attr, n) for n in attr.__all__
           if isinstance(getattr(attr, n), type) and issubclass(getattr(attr, n), Attribution)}
SETTINGS = {  # attribute() settings that keep it quick
    "TokenIntegratedGradients": dict(n_steps=4),
    "CausalOcclusion": dict(window=2, perturbations_per_eval=4),
}
#: rows of a class on another canvas than the one-tile default: ``row -> (class, (height, width))``
#: (Idefics3 / SmolVLM: 2 x 3 tiles of 32 px and the global view)
CANVASES = {f"{name}[2x3]": (name, (2 * tm.IMAGE_SIZE, 3 * tm.IMAGE_SIZE))
            for name in ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")}
CANVASES["Gemma3ForConditionalGeneration[1x2]"] = ("Gemma3ForConditionalGeneration", (tm.IMAGE_SIZE, 2 * tm.IMAGE_SIZE))
CLASSES = [*tm.FACTORIES, *CANVASES]


def class_of(row: str) -> str:
    """The model class of a matrix row."""
    return CANVASES[row][0] if row in CANVASES else row


def size_of(row: str) -> tuple[int, int]:
    """The image size of a matrix row."""
    return CANVASES[row][1] if row in CANVASES else (tm.IMAGE_SIZE, tm.IMAGE_SIZE)


def model_of(row: str):
    """The row's tiny model (one per class, shared by its canvases)."""
    return _model(class_of(row))


@functools.cache
def _model(name: str):
    """float64: a tiny random model's occlusion drops are near float32's noise on its logits."""
    return tm.FACTORIES[name]().double()


def _make(method_name: str, model, odd_size: bool = False):
    """The method on ``model``; for other sizes than the trained one, the two-tower methods
    interpolate their position embeddings (the caller's choice, as in the README)."""
    cls = METHODS[method_name]
    adapter = get_adapter(model)
    if not odd_size or adapter.any_image_size or not (adapter.two_tower or _interpolates(adapter)):
        return cls(model)
    if method_name in ("TokenIntegratedGradients", "CausalOcclusion"):
        if adapter.two_tower:
            return cls(ImageTextSimilarity(model, interpolate_pos_encoding=True))
        if adapter.task == "match":
            return cls(MatchLogit(model, interpolate_pos_encoding=True))
        return cls(TokenLogProbs(model, reduction="sum", interpolate_pos_encoding=True))
    return cls(model, interpolate_pos_encoding=True)


def _interpolates(adapter) -> bool:
    """A fusion model whose targets pass interpolate_pos_encoding to its vision tower (BLIP, LLaVA)."""
    return adapter.interpolates_positions and (adapter.task == "match" and adapter.image_stream == "cross"
                                               or adapter.scores_tokens)


def _supported(method_name: str, class_name: str) -> bool:
    try:
        METHODS[method_name](model_of(class_name))
    except TypeError:
        return False
    return True


PAIRS = [(m, c) for m in METHODS for c in CLASSES if _supported(m, c)]
REFUSED = [(m, c) for m in METHODS for c in tm.FACTORIES if (m, c) not in PAIRS]  # (by class: one row each)


def inputs_for(class_name: str, batch: int = 2, size: tuple[int, int] | None = None):
    """``(pixel_values, additional_forward_args, target)`` for ``batch`` examples of a matrix row
    (at its size, or ``size``)."""
    adapter = get_adapter(model_of(class_name))
    pixels = tm.pixels(batch, *(size or size_of(class_name)), seed=3).double()
    if adapter.two_tower:
        ids, mask = tm.text_ids(3, 6)
        return pixels, (ids, mask), [2, 0, 1][:batch]
    if adapter.image_tokens_in_input_ids:  # the processor's placeholders: one per patch, or per query
        ids, mask = tm.image_prompt(adapter.model, [9, 11, 12, 13], batch, pixels)
        args = (ids, mask, *tm.extra_text_inputs(adapter.model, batch))
        if "token_type_ids" in adapter.extra_text_inputs:  # a prefix-LM: the last two tokens are the suffix
            length = ids.shape[1]
            args = (*args, (torch.arange(length) >= length - 2).long().expand(batch, -1).clone())
        return pixels, args, None
    ids, mask = tm.text_ids(batch, 6)
    if adapter.takes_answer_ids:
        answer, answer_mask = tm.text_ids(batch, 4, seed=1)
        return pixels, (ids, mask, answer, answer_mask), None
    if adapter.task == "answer_label":
        return pixels, (ids, mask), [1, 3, 2][:batch]
    return pixels, (ids, mask), None


def _rows(args: tuple, b: int, two_tower: bool) -> tuple:
    return args if two_tower else tuple(a[b : b + 1] for a in args)


def _run(method, method_name, pixels, args, target, **extra):
    return method.attribute(pixels, target=target, additional_forward_args=args,
                            **SETTINGS.get(method_name, {}), **extra)


@pytest.mark.parametrize("method_name,class_name", PAIRS)
def test_batched_equals_one_at_a_time_and_model_unchanged(method_name, class_name):
    model = model_of(class_name)
    two_tower = get_adapter(model).two_tower
    pixels, args, target = inputs_for(class_name)
    before = snapshot(model)
    method = _make(method_name, model)
    torch.manual_seed(0)
    together = _run(method, method_name, pixels, args, target)
    assert_unchanged(model, before)
    assert together.shape == pixels.shape and torch.isfinite(together).all()
    for b in range(2):
        alone = _run(method, method_name, pixels[b : b + 1], _rows(args, b, two_tower),
                     None if target is None else [target[b]])
        assert_close_scaled(together[b : b + 1], alone)
    assert_unchanged(model, before)


@pytest.mark.parametrize("method_name,class_name", PAIRS)
def test_sdpa_equals_eager(method_name, class_name):
    model = model_of(class_name)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    pixels, args, target = inputs_for(class_name, batch=1)
    torch.manual_seed(0)
    got = _run(_make(method_name, model), method_name, pixels, args, target, return_grid=True)
    torch.manual_seed(0)
    want = _run(_make(method_name, eager), method_name, pixels, args, target, return_grid=True)
    assert_close_scaled(got, want)


@pytest.mark.parametrize("method_name,class_name", PAIRS)
def test_noise_tunnel_wraps_it(method_name, class_name):
    """Without noise, NoiseTunnel's average of copies is the plain map. Two-tower models explain
    one prompt here: NoiseTunnel repeats every tensor of additional_forward_args, prompts
    included, which renumbers several prompts."""
    model = model_of(class_name)
    pixels, args, target = inputs_for(class_name, batch=1)
    if get_adapter(model).two_tower:
        args, target = (args[0][:1], args[1][:1]), 0
    method = _make(method_name, model)
    torch.manual_seed(0)
    plain = _run(method, method_name, pixels, args, target)
    torch.manual_seed(0)
    smooth = NoiseTunnel(method).attribute(pixels, nt_samples=2, stdevs=0.0, target=target,
                                           additional_forward_args=args, **SETTINGS.get(method_name, {}))
    assert_close_scaled(smooth, plain)


def _takes_other_sizes(class_name: str) -> bool:
    adapter = get_adapter(model_of(class_name))
    # two towers, BLIP and LLaVA interpolate their position embeddings; ViLT and dynamic-resolution
    # models embed any size; PaliGemma and Gemma 3 run their vision tower at its trained size only
    joint_encoder = adapter.image_stream == "joint" and not adapter.image_tokens_in_input_ids
    return adapter.two_tower or adapter.any_image_size or joint_encoder or _interpolates(adapter)


@pytest.mark.parametrize("method_name,class_name", [p for p in PAIRS if _takes_other_sizes(p[1])])
@pytest.mark.parametrize("size", [(24, 40), (35, 43)])
def test_non_square_and_odd_sizes(method_name, class_name, size):
    """The grid comes from the actual size; the pixel map is that grid over the pixels each patch
    covers, 0 on the margin no patch sees."""
    model = model_of(class_name)
    pixels, args, target = inputs_for(class_name, batch=1, size=size)
    method = _make(method_name, model, odd_size=True)
    torch.manual_seed(0)
    grid = _run(method, method_name, pixels, args, target, return_grid=True)
    torch.manual_seed(0)
    heat = _run(method, method_name, pixels, args, target)
    h, w = size[0] // tm.PATCH, size[1] // tm.PATCH
    assert grid.shape == (1, h, w) and heat.shape == pixels.shape
    expected = grid_to_pixels(grid[0].double().numpy(), size, (tm.PATCH, tm.PATCH))
    assert_close_scaled(heat[0, 0].double(), torch.from_numpy(expected))
    assert torch.equal(heat[0, 0], heat[0, 2])


@pytest.mark.parametrize("method_name,class_name", PAIRS)
def test_bad_arguments_named_and_model_unchanged_on_error(method_name, class_name):
    model = model_of(class_name)
    pixels, args, target = inputs_for(class_name)
    method = _make(method_name, model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="inputs: expected 4 dimensions"):
        _run(method, method_name, pixels[0], args, target)
    with pytest.raises(ValueError, match="upsample"):
        _run(method, method_name, pixels, args, target, upsample="cubic")
    with pytest.raises(TypeError, match="additional_forward_args"):
        _run(method, method_name, pixels, "a red circle", target)
    with pytest.raises((TypeError, ValueError), match="target"):
        _run(method, method_name, pixels, args, 99 if target is not None else 1.5)
    assert_unchanged(model, before)

    def fail(module, inputs, output):
        raise RuntimeError("planted failure")

    handle = get_adapter(model).vision_blocks()[-1].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="planted failure"):
            _run(method, method_name, pixels, args, target)
    finally:
        handle.remove()
    assert_unchanged(model, before)


@pytest.mark.parametrize("method_name,class_name", REFUSED)
def test_a_class_a_method_cannot_explain_is_refused_by_name(method_name, class_name):
    with pytest.raises(TypeError, match=f"model: .*{class_name}"):
        METHODS[method_name](model_of(class_name))


def test_the_matrix_covers_every_method_and_class():
    assert {m for m, _ in PAIRS} == set(METHODS)
    assert {c for _, c in PAIRS} == set(CLASSES)
