"""The bad-input catalogue: one case per misuse, across explain, every method, metrics, viz, zoo
and the CLI. Each asserts the exception type, a message naming the argument, and that the model
is left as it was."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest
import tiny_models as tm
import torch
from model_state import assert_unchanged, snapshot
from PIL import Image
from torch import nn

import captum_vlm as cv
from captum_vlm import zoo
from captum_vlm.attr import (
    AttentionRollout,
    BimodalRelevancy,
    CausalOcclusion,
    CrossAttentionGradCAM,
    GradECLIP,
    GradientWeightedRelevancy,
    PatchWordSimilarity,
    RawAttention,
    TokenIntegratedGradients,
)
from captum_vlm.cli import main
from captum_vlm.metrics import (
    deletion_curve,
    insertion_curve,
    map_evidence,
    model_randomization_check,
    pointing_game,
    road_curve,
)
from captum_vlm.targets import ImageTextSimilarity
from captum_vlm.viz import overlay, overlay_grid, resize_map, tokens_html
from captum_vlm.viz.report import ReportView, encode_grid, render_report

TEXTS = ["a red circle", "a blue square"]


@dataclass
class World:
    clip: nn.Module
    processor: Any
    image: Image.Image
    pixels: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    blip: nn.Module
    blip_pixels: torch.Tensor
    blip_ids: torch.Tensor
    blip_mask: torch.Tensor


@pytest.fixture(scope="module")
def world() -> World:
    model, processor = zoo.load("shapes-clip")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    inputs = processor(images=image, text=TEXTS, return_tensors="pt", padding=True)
    blip_ids, blip_mask = tm.text_ids(1, 6)
    return World(model, processor, image, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"],
                 tm.blip_itm(), tm.pixels(1), blip_ids, blip_mask)


def nan_pixels(w: World) -> torch.Tensor:
    p = w.pixels.clone()
    p[0, 0, 0, 0] = float("nan")
    return p


def oov(ids: torch.Tensor) -> torch.Tensor:
    bad = ids.clone()
    bad[0, 1] = 10**6
    return bad


def _png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    return buffer.getvalue()


def args(w: World):
    return (w.ids, w.mask)


@dataclass
class Case:
    call: Callable[[World], Any]
    error: type[Exception]
    match: str
    model: str | None = "clip"  # whose state must be unchanged


grid = np.ones((8, 8))
f_sum = lambda x, *a: x.sum(dim=(1, 2, 3))  # noqa: E731
f_two = lambda x, *a: torch.stack([x.sum(dim=(1, 2, 3)), -x.sum(dim=(1, 2, 3))], 1)  # noqa: E731
nan_map = np.array([[1.0, np.nan], [0.0, 1.0]])
inf_map = np.array([[1.0, np.inf], [0.0, 1.0]])

CASES: dict[str, Case] = {
    # ---------------------------------------------------------------- explain
    "explain-processor-none": Case(lambda w: cv.explain(w.clip, None, w.image, TEXTS), TypeError, "processor"),
    "explain-processor-not-callable": Case(lambda w: cv.explain(w.clip, "clip", w.image, TEXTS), TypeError, "processor"),
    "explain-model-not-supported": Case(lambda w: cv.explain(nn.Linear(2, 2), w.processor, w.image, TEXTS),
                                        TypeError, "Linear", None),
    "explain-image-float-out-of-range": Case(
        lambda w: cv.explain(w.clip, w.processor, np.full((8, 8, 3), -0.5), TEXTS), ValueError, "image: values from"),
    "explain-image-float-above-255": Case(
        lambda w: cv.explain(w.clip, w.processor, np.full((8, 8, 3), 300.0), TEXTS), ValueError, "image: values from"),
    "explain-image-nan": Case(
        lambda w: cv.explain(w.clip, w.processor, np.full((8, 8, 3), np.nan), TEXTS), ValueError, "image: .*NaN"),
    "explain-image-list": Case(lambda w: cv.explain(w.clip, w.processor, [[1, 2]], TEXTS), TypeError, "image"),
    "explain-image-2d": Case(lambda w: cv.explain(w.clip, w.processor, np.zeros((8, 8)), TEXTS), TypeError, "image"),
    "explain-image-missing-file": Case(lambda w: cv.explain(w.clip, w.processor, "/nope.png", TEXTS),
                                       ValueError, "image: no file"),
    "explain-texts-string": Case(lambda w: cv.explain(w.clip, w.processor, w.image, "a red circle"),
                                 ValueError, "texts"),
    "explain-texts-empty": Case(lambda w: cv.explain(w.clip, w.processor, w.image, []), ValueError, "texts"),
    "explain-texts-blank": Case(lambda w: cv.explain(w.clip, w.processor, w.image, ["a", " "]), ValueError, "texts"),
    "explain-texts-not-strings": Case(lambda w: cv.explain(w.clip, w.processor, w.image, ["a", 3]),
                                      ValueError, "texts"),
    "explain-texts-duplicate": Case(lambda w: cv.explain(w.clip, w.processor, w.image, ["a", "b", "a"]),
                                    ValueError, "texts: .*more than once"),
    "explain-target-text": Case(lambda w: cv.explain(w.clip, w.processor, w.image, TEXTS, target="a red circle"),
                                TypeError, "target"),
    "explain-target-out-of-range": Case(lambda w: cv.explain(w.clip, w.processor, w.image, TEXTS, target=5),
                                        ValueError, "target"),
    "explain-target-repeated": Case(lambda w: cv.explain(w.clip, w.processor, w.image, TEXTS, target=[0, 0]),
                                    ValueError, "target: .*more than once"),
    "explain-target-bool": Case(lambda w: cv.explain(w.clip, w.processor, w.image, TEXTS, target=True),
                                TypeError, "target"),
    "explain-target-float": Case(lambda w: cv.explain(w.clip, w.processor, w.image, TEXTS, target=1.5),
                                 TypeError, "target"),
    "explain-method-unknown": Case(lambda w: cv.explain(w.clip, w.processor, w.image, TEXTS, methods=["nope"]),
                                   ValueError, "methods"),
    "explain-methods-empty": Case(lambda w: cv.explain(w.clip, w.processor, w.image, TEXTS, methods=[]),
                                  ValueError, "methods"),
    "explain-method-wrong-family": Case(
        lambda w: cv.explain(w.clip, w.processor, w.image, TEXTS, methods=["bimodal-relevancy"]), ValueError, "methods"),
    "explain-max-new-tokens": Case(lambda w: cv.explain(w.clip, w.processor, w.image, TEXTS, max_new_tokens=0),
                                   ValueError, "max_new_tokens"),
    # ---------------------------------------------------------------- methods
    "grad-eclip-3d-pixels": Case(lambda w: GradECLIP(w.clip).attribute(w.pixels[0], 0, args(w)),
                                 ValueError, "inputs: expected 4 dimensions"),
    "grad-eclip-nan-pixels": Case(lambda w: GradECLIP(w.clip).attribute(nan_pixels(w), 0, args(w)),
                                  ValueError, "inputs: .*NaN"),
    "grad-eclip-empty-batch": Case(lambda w: GradECLIP(w.clip).attribute(w.pixels[:0], 0, args(w)),
                                   ValueError, "inputs: the batch is empty"),
    "grad-eclip-int-pixels": Case(lambda w: GradECLIP(w.clip).attribute(w.pixels.long(), 0, args(w)),
                                  TypeError, "floating"),
    "grad-eclip-swapped-ids-mask": Case(lambda w: GradECLIP(w.clip).attribute(w.pixels, 0, (w.mask, w.ids)),
                                        ValueError, "attention_mask: .*wrong order"),
    "grad-eclip-oov-ids": Case(lambda w: GradECLIP(w.clip).attribute(w.pixels, 0, (oov(w.ids), w.mask)),
                               ValueError, "input_ids: token ids must lie"),
    "grad-eclip-target-out-of-range": Case(lambda w: GradECLIP(w.clip).attribute(w.pixels, 9, args(w)),
                                           ValueError, "target"),
    "grad-eclip-target-text": Case(lambda w: GradECLIP(w.clip).attribute(w.pixels, "a red circle", args(w)),
                                   TypeError, "target"),
    "grad-eclip-no-texts": Case(lambda w: GradECLIP(w.clip).attribute(w.pixels, 0, None),
                                TypeError, "additional_forward_args"),
    "raw-attention-nan-pixels": Case(lambda w: RawAttention(w.clip).attribute(nan_pixels(w), 0, args(w)),
                                     ValueError, "inputs: .*NaN"),
    "rollout-oov-ids": Case(lambda w: AttentionRollout(w.clip).attribute(w.pixels, 0, (oov(w.ids), w.mask)),
                            ValueError, "input_ids"),
    "relevancy-swapped": Case(lambda w: GradientWeightedRelevancy(w.clip).attribute(w.pixels, 0, (w.mask, w.ids)),
                              ValueError, "attention_mask"),
    "patch-word-nan-pixels": Case(lambda w: PatchWordSimilarity(w.clip).attribute(nan_pixels(w), 0, args(w)),
                                  ValueError, "inputs: .*NaN"),
    "ig-nan-baselines": Case(lambda w: TokenIntegratedGradients(w.clip).attribute(
        w.pixels, target=0, additional_forward_args=args(w), baselines=float("nan"), modality="image", n_steps=2),
        ValueError, "baselines"),
    "ig-nan-pixels": Case(lambda w: TokenIntegratedGradients(w.clip).attribute(
        nan_pixels(w), target=0, additional_forward_args=args(w), modality="image", n_steps=2),
        ValueError, "inputs: .*NaN"),
    "ig-oov-ids": Case(lambda w: TokenIntegratedGradients(w.clip).attribute(
        w.pixels, target=0, additional_forward_args=(oov(w.ids), w.mask), modality="image", n_steps=2),
        ValueError, "input_ids"),
    "occlusion-nan-baselines": Case(lambda w: CausalOcclusion(w.clip).attribute(
        w.pixels, target=0, additional_forward_args=args(w), intervention="paint",
        baselines=torch.full_like(w.pixels, float("nan"))), ValueError, "baselines"),
    "occlusion-nan-pixels": Case(lambda w: CausalOcclusion(w.clip).attribute(
        nan_pixels(w), target=0, additional_forward_args=args(w)), ValueError, "inputs: .*NaN"),
    "occlusion-intervention": Case(lambda w: CausalOcclusion(w.clip).attribute(
        w.pixels, target=0, additional_forward_args=args(w), intervention="cut"), ValueError, "intervention"),
    "gradcam-nan-pixels": Case(lambda w: CrossAttentionGradCAM(w.blip).attribute(
        w.blip_pixels * float("nan"), additional_forward_args=(w.blip_ids, w.blip_mask)),
        ValueError, "inputs: .*NaN", "blip"),
    "gradcam-swapped": Case(lambda w: CrossAttentionGradCAM(w.blip).attribute(
        w.blip_pixels, additional_forward_args=(w.blip_mask, w.blip_ids)), ValueError, "attention_mask", "blip"),
    "bimodal-oov-ids": Case(lambda w: BimodalRelevancy(w.blip).attribute(
        w.blip_pixels, additional_forward_args=(oov(w.blip_ids), w.blip_mask)), ValueError, "input_ids", "blip"),
    "bimodal-empty-batch": Case(lambda w: BimodalRelevancy(w.blip).attribute(
        w.blip_pixels[:0], additional_forward_args=(w.blip_ids, w.blip_mask)), ValueError, "inputs", "blip"),
    # ---------------------------------------------------------------- metrics
    "deletion-target-out-of-range": Case(lambda w: deletion_curve(f_two, torch.rand(1, 3, 8, 8), grid, target=9),
                                         ValueError, "target: 9 is out of range", None),
    "deletion-nan-attribution": Case(lambda w: deletion_curve(f_sum, torch.rand(1, 3, 8, 8), grid * np.nan),
                                     ValueError, "attribution", None),
    "deletion-nan-inputs": Case(lambda w: deletion_curve(f_sum, torch.full((1, 3, 8, 8), np.nan), grid),
                                ValueError, "inputs: .*NaN", None),
    "deletion-nan-baseline": Case(lambda w: deletion_curve(f_sum, torch.rand(1, 3, 8, 8), grid, baseline=float("nan")),
                                  ValueError, "baseline: .*NaN", None),
    "deletion-steps-zero": Case(lambda w: deletion_curve(f_sum, torch.rand(1, 3, 8, 8), grid, steps=0),
                                ValueError, "steps", None),
    "insertion-patch-size": Case(lambda w: insertion_curve(f_sum, torch.rand(1, 3, 8, 8), grid, patch_size=0),
                                 ValueError, "patch_size", None),
    "evidence-grid-3d": Case(lambda w: map_evidence(f_sum, torch.rand(1, 3, 8, 8), np.ones((1, 2, 2))),
                             ValueError, "grid", None),
    "evidence-grid-nan": Case(lambda w: map_evidence(f_sum, torch.rand(1, 3, 8, 8), nan_map),
                              ValueError, "grid: .*NaN", None),
    "evidence-n-random": Case(lambda w: map_evidence(f_sum, torch.rand(1, 3, 8, 8), grid, n_random=0),
                              ValueError, "n_random", None),
    "evidence-two-images": Case(lambda w: map_evidence(f_sum, torch.rand(2, 3, 8, 8), grid),
                                ValueError, "inputs: expected one image", None),
    "evidence-model-target": Case(lambda w: map_evidence(ImageTextSimilarity(w.clip), w.pixels, np.ones((8, 8)),
                                                         target=7, additional_forward_args=args(w)),
                                  ValueError, "target: 7 is out of range"),
    "road-fractions": Case(lambda w: road_curve(f_sum, torch.rand(1, 3, 8, 8), grid, fractions=[0.0, 1.0]),
                           ValueError, "fractions", None),
    "road-order": Case(lambda w: road_curve(f_sum, torch.rand(1, 3, 8, 8), grid, order="most"),
                       ValueError, "order", None),
    "road-nan-inputs": Case(lambda w: road_curve(f_sum, torch.full((1, 3, 8, 8), np.nan), grid),
                            ValueError, "inputs: .*NaN", None),
    "pointing-empty-mask": Case(lambda w: pointing_game(grid, np.zeros((8, 8))), ValueError, "mask is empty", None),
    "randomisation-explain-fn": Case(lambda w: model_randomization_check(w.clip, "grad-eclip", None),
                                     TypeError, "explain_fn"),
    # ---------------------------------------------------------------- viz
    "overlay-nan-map": Case(lambda w: overlay(w.image, nan_map), ValueError, "attribution: 1 of 4 values", None),
    "overlay-inf-map": Case(lambda w: overlay(w.image, inf_map), ValueError, "attribution: 1 of 4 values", None),
    "overlay-alpha": Case(lambda w: overlay(w.image, grid, alpha=2.0), ValueError, "alpha", None),
    "overlay-nan-image": Case(lambda w: overlay(np.full((4, 4, 3), np.nan), grid), ValueError, "image", None),
    "overlay-many-maps": Case(lambda w: overlay(w.image, np.ones((2, 3, 4, 4))), ValueError, "one map", None),
    "overlay-grid-empty": Case(lambda w: overlay_grid(w.image, {}), ValueError, "maps is empty", None),
    "tokens-nan-scores": Case(lambda w: tokens_html(["a", "b"], [0.1, np.nan]), ValueError, "scores", None),
    "tokens-length": Case(lambda w: tokens_html(["a", "b"], [0.1]), ValueError, "scores", None),
    "report-no-views": Case(lambda w: render_report("t", b"", []), ValueError, "views", None),
    "report-nan-grid": Case(lambda w: encode_grid(nan_map), ValueError, "grid", None),
    "report-first-view-png": Case(lambda w: render_report("t", b"", [ReportView("m", "t", grid=grid)]),
                                  ValueError, "first view", None),
    "report-nan-token-scores": Case(lambda w: render_report("t", _png(), [ReportView("m", "t", _png()), ReportView(
        "m", "u", grid=grid, tokens=["a"], token_scores=[np.nan])]), ValueError, r"views\[1\].token_scores", None),
    "report-nan-scores": Case(lambda w: render_report("t", _png(), [ReportView("m", "t", _png())],
                                                      scores={"a": float("nan")}), ValueError, "scores", None),
    "resize-interpolation": Case(lambda w: resize_map(grid, (4, 4), "cubic"), ValueError, "interpolation", None),
    # ---------------------------------------------------------------- zoo
    "zoo-load-none": Case(lambda w: zoo.load(None), TypeError, "name_or_path", None),
    "zoo-load-number": Case(lambda w: zoo.load(3), TypeError, "name_or_path", None),
    "zoo-load-unknown": Case(lambda w: zoo.load("shapes-nope"), ValueError, "unknown zoo model", None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_clearly(world, name):
    case = CASES[name]
    model = getattr(world, case.model) if case.model else None
    before = snapshot(model) if model is not None else None
    with pytest.raises(case.error, match=case.match):
        case.call(world)
    if model is not None:
        assert_unchanged(model, before)
    plt.close("all")


def test_float_images_in_0_255_are_explained_like_uint8(world):
    as_uint8 = np.asarray(world.image)
    a = cv.explain(world.clip, world.processor, as_uint8, TEXTS, methods=["rollout"], evidence=False)
    b = cv.explain(world.clip, world.processor, as_uint8.astype(np.float32), TEXTS, methods=["rollout"],
                   evidence=False)
    c = cv.explain(world.clip, world.processor, as_uint8 / 255.0, TEXTS, methods=["rollout"], evidence=False)
    np.testing.assert_array_equal(a.records[0].grid, b.records[0].grid)
    np.testing.assert_array_equal(a.records[0].grid, c.records[0].grid)


# ---------------------------------------------------------------- CLI: one line, exit code 2, before any work
@pytest.fixture(scope="module")
def scene_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(path)
    return path


CLI_CASES = {
    "out-is-directory": (lambda s, d: ["explain", s, "--text", "a", "--out", d], "is a directory"),
    "png-is-file": (lambda s, d: ["explain", s, "--text", "a", "--out", f"{d}/r.html", "--png", s], "is a file"),
    "out-parent-is-file": (lambda s, d: ["explain", s, "--text", "a", "--out", f"{s}/r.html"], "is a file"),
    "demo-out-is-file": (lambda s, d: ["demo", "--out", s], "is a file"),
    "image-missing": (lambda s, d: ["explain", f"{d}/none.png", "--text", "a", "--out", f"{d}/r.html"], "not found"),
    "image-unreadable": (lambda s, d: ["explain", f"{d}/bad.png", "--text", "a", "--out", f"{d}/r.html"], "cannot read"),
    "method-unknown": (lambda s, d: ["explain", s, "--text", "a", "--method", "x", "--out", f"{d}/r.html"],
                       "unknown method"),
    "method-wrong-family": (lambda s, d: ["explain", s, "--text", "a", "--method", "bimodal-relevancy",
                                          "--out", f"{d}/r.html"], "methods"),
    "zoo-model-unknown": (lambda s, d: ["explain", s, "--text", "a", "--model", "zoo:nope", "--out", f"{d}/r.html"],
                          "unknown zoo model"),
    "model-folder-missing": (lambda s, d: ["explain", s, "--text", "a", "--model", f"{d}/none",
                                           "--out", f"{d}/r.html"], "neither zoo"),
    "target-out-of-range": (lambda s, d: ["explain", s, "--text", "a", "--target", "9", "--out", f"{d}/r.html"],
                            "target"),
    "text-duplicate": (lambda s, d: ["explain", s, "--text", "a", "--text", "a", "--out", f"{d}/r.html"],
                       "more than once"),
    "text-empty": (lambda s, d: ["explain", s, "--text", "", "--out", f"{d}/r.html"], "--text: every text"),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, scene_file, capsys, name):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    argv, expected = CLI_CASES[name]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv(str(scene_file), str(tmp_path))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("captum-vlm: error:") and "\n" not in err and "Traceback" not in err
    assert expected in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_save_into_a_file_is_refused(world, tmp_path):
    result = cv.explain(world.clip, world.processor, world.image, TEXTS, methods=["rollout"], evidence=False)
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(ValueError, match="directory: .* is a file"):
        result.save(target)
