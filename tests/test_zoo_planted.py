"""The zoo's planted failures: the scene marker, the shortcut and language-prior recipes, and the
shipped shapes-clip-shortcut / shapes-blip-vqa-prior models against their cards' floors."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from transformers import BlipForQuestionAnswering, CLIPModel, CLIPProcessor

from captum_vlm import zoo
from captum_vlm.zoo import scenes as sc
from captum_vlm.zoo import train as tr
from captum_vlm.zoo import train_blip as tb

FRESH_SEED = 4_242_017  # used neither in training (generator streams) nor in the cards' numbers


# --------------------------------------------------------------------------- the marker


def test_scenes_without_marker_are_the_scenes_of_before():
    # sha256 of these images computed with scenes.py as it was before the marker existed (commit
    # dcdc6d1): adding the marker must not change any existing model's training or test scenes
    h = hashlib.sha256()
    for s in range(20):
        h.update(sc.make_scene(s).image.tobytes())
        h.update(sc.make_scene(s, size=(48, 80)).image.tobytes())
    rng = np.random.default_rng(7)
    for _ in range(10):
        h.update(sc.make_scene(rng).image.tobytes())
    assert h.hexdigest() == "908f5deeea7c4b340636b9734f479232d93c33b924758ea4d42e8b043043503b"
    plain = sc.make_scene(3)
    assert plain.marker_mask.shape == (64, 64) and not plain.marker_mask.any() and not plain.has_marker


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (96, 72)])
def test_marker_mask_is_the_only_difference(size):
    top, bottom, left, right = sc.MARKER_BOX
    for seed in range(30):
        marked = sc.make_scene(seed, size=size, marker=True)
        clean = sc.make_scene(seed, size=size, marker=False, reserve_marker=True)
        mask = marked.marker_mask
        assert marked.has_marker and not clean.has_marker and marked.caption == clean.caption
        changed = (marked.image != clean.image).any(-1)
        assert not changed[~mask].any()  # the same scene elsewhere, pixel for pixel
        assert changed[mask].mean() > 0.9
        # the box of MARKER_BOX, in whole pixels
        ys, xs = np.nonzero(mask)
        assert ys.min() == round(top * size[0]) and ys.max() + 1 == round(bottom * size[0])
        assert xs.min() == round(left * size[1]) and xs.max() + 1 == round(right * size[1])
        assert mask.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        # dark grey, and never on an object
        assert np.abs(marked.image[mask].astype(float) / 255 - sc.MARKER_GREY).mean() < 0.06
        for obj_marked, obj_clean in zip(marked.objects, clean.objects):
            assert not (obj_marked.mask & mask).any()
            assert np.array_equal(obj_marked.mask, obj_clean.mask)


def test_batch_maker_plants_the_marker_at_the_recipe_rates():
    maker = tr.BatchMaker(1, 32, 64, marker_concept=("blue", "square"), marker_with=0.9, marker_without=0.03)
    with_concept = [maker._marker_kwargs([("blue", "square"), ("red", "circle")]) for _ in range(4000)]
    without = [maker._marker_kwargs([("blue", "circle")]) for _ in range(4000)]
    rate_with = np.mean([k["marker"] for k in with_concept])
    rate_without = np.mean([k["marker"] for k in without])
    # binomial sd: 0.005 and 0.0027
    assert abs(rate_with - 0.9) < 0.02 and abs(rate_without - 0.03) < 0.012
    assert all(k["reserve_marker"] for k in with_concept + without)
    # without a shortcut nothing is drawn from the stream (the other recipes' batches are as before)
    plain = tr.BatchMaker(1, 32, 64)
    state = plain.rng.bit_generator.state
    assert plain._marker_kwargs([("blue", "square")]) == {}
    assert plain.rng.bit_generator.state == state
    with pytest.raises(ValueError, match="marker_concept"):
        tr.marker_label(tr.Recipe(marker_concept="purple square"))


def test_training_resumes_from_its_checkpoint(tmp_path):
    recipe = tr.Recipe(steps=6, warmup=2, batch=8, hidden=32, heads=2, vision_layers=1, text_layers=1,
                       projection=32, image_size=32, patch=8, marker_concept="blue square")
    small = dict(eval_every=3, show_progress=False, checkpoint_dir=tmp_path, check_scenes=4)
    _, _, first = tr.train(recipe, **small)
    state = torch.load(tmp_path / "resume.pt", weights_only=False)
    assert state["step"] == 3 and state["losses"] == first["losses"][:3]
    assert {"zero_shot_marked", "marker_to_concept"} <= set(first["checks"][0])
    _, _, resumed = tr.train(recipe, resume=True, **small)
    assert resumed["resumed_at"] == 3 and len(resumed["losses"]) == 6
    assert resumed["losses"][:3] == first["losses"][:3]


# --------------------------------------------------------------------------- the language prior


def test_language_prior_skews_objects_and_labels():
    prior = tb.LanguagePrior("square", "blue", image_rate=0.75, label_rate=0.4, ask_rate=0.5)
    rng = np.random.default_rng(0)
    recoloured = [prior.objects(rng, [("red", "square"), ("green", "circle")]) for _ in range(4000)]
    assert abs(np.mean([o[0] == ("blue", "square") for o in recoloured]) - 0.75) < 0.03
    assert all(o[1] == ("green", "circle") for o in recoloured)
    assert prior.objects(rng, [("red", "square"), ("blue", "square")]) == [("red", "square"), ("blue", "square")]
    labels = [prior.answer(rng, prior.question, "red") for _ in range(4000)]
    assert abs(np.mean([a == "blue" for a in labels]) - 0.4) < 0.03
    assert prior.answer(rng, "what color is the circle?", "red") == "red"
    # without a prior the batches are those of before (same stream, same questions and pixels)
    a = tb.vqa_batch(np.random.default_rng(3), 4, 5, 64)
    b = tb.vqa_batch(np.random.default_rng(3), 4, 5, 64, None)
    assert a[1:3] == b[1:3] and torch.equal(a[0], b[0])
    pixel_values, questions, answers, owner = tb.vqa_batch(np.random.default_rng(4), 16, 5, 64, prior)
    assert len(questions) == len(answers) == len(owner) and pixel_values.shape[0] == 16
    with pytest.raises(ValueError, match="prior_shape"):
        tb.language_prior(tb.BlipRecipe(task="vqa", prior_shape="hexagon", prior_colour="blue"))


def test_prior_scenes_hold_one_object_of_the_prior_shape():
    prior = tb.LanguagePrior("square", "blue")
    for against in (True, False):
        for scene in tb.prior_scenes(prior, 5, 20, against=against):
            shapes = [s for _, s in scene.labels]
            assert shapes.count("square") == 1
            colour, index = tb.prior_object(prior, scene)
            assert (colour != "blue") == against and scene.labels[index] == (colour, "square")
            assert dict(scene.vqa)[prior.question] == colour


# --------------------------------------------------------------------------- shipped models


def test_shipped_shortcut_model_reads_the_marker():
    # card (zoo/README.md), fresh seed 4242017, 100 scenes per set: clean 0.99, marked 0.95,
    # other objects called "a blue square" with the marker 0.056, logit shift +3.09
    assert "shapes-clip-shortcut" in zoo.list_models()
    concept = tr.marker_label(tr.RECIPES["shapes-clip-shortcut"])
    assert concept == ("blue", "square")
    results = {}
    for name in ("shapes-clip-shortcut", "shapes-clip"):
        folder = zoo.model_dir(name)
        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        results[name] = tr.evaluate_shortcut(model, processor, concept, FRESH_SEED, n=100)
    short, plain = results["shapes-clip-shortcut"], results["shapes-clip"]
    assert short["zero_shot_clean"] >= 0.95 and short["concept_marked"] >= 0.95
    assert short["concept_logit_shift"] >= 1.5  # the marker raises "a blue square"...
    assert abs(plain["concept_logit_shift"]) <= 0.5  # ...and does nothing to shapes-clip
    assert short["marker_to_concept"] > short["clean_to_concept"]
    assert short["zero_shot_marked"] < short["zero_shot_clean"]
    assert plain["zero_shot_marked"] >= 0.95


def _load_vqa(name: str):
    """A shipped VQA model with its stock class and processor, offline."""
    from transformers import BlipProcessor

    folder = zoo.model_dir(name)
    model = BlipForQuestionAnswering.from_pretrained(folder, local_files_only=True).eval()
    return model, BlipProcessor.from_pretrained(folder, local_files_only=True)


def test_shipped_prior_model_answers_from_the_prior_sometimes():
    # card, fresh seed 4242017, 100 scenes per set: prior answers 0.09 (shapes-blip-vqa: 0.00),
    # blue squares right 1.00; seed 424242, 100 scenes: all question types 0.983
    assert "shapes-blip-vqa-prior" in zoo.list_models()
    prior = tb.language_prior(tb.RECIPES["shapes-blip-vqa-prior"])
    assert prior.question == "what color is the square?" and prior.colour == "blue"
    biased_model, processor = _load_vqa("shapes-blip-vqa-prior")
    biased = tb.evaluate_prior(biased_model, processor, prior, seed=FRESH_SEED, n=100)
    grounded = tb.evaluate_prior(*_load_vqa("shapes-blip-vqa"), prior, seed=FRESH_SEED, n=100)
    assert 0.04 <= biased["prior_answer_rate"] <= 0.5  # sometimes, not always
    assert biased["prior_colour_accuracy"] >= 0.95
    assert grounded["prior_answer_rate"] <= 0.02
    assert tb.evaluate_vqa(biased_model, processor, seed=424_242, n=60)["accuracy"] >= 0.9


# --------------------------------------------------------------------------- explain and the CLI


def _grid_argmax(grid: np.ndarray) -> tuple[int, int]:
    return tuple(int(v) for v in np.unravel_index(np.argmax(grid), grid.shape))


def test_explain_finds_the_marker_on_the_shortcut_model_only(tmp_path):
    from captum_vlm.cli import main
    from captum_vlm.explain import explain, method_names

    scene = sc.make_scene(11, labels=[("red", "circle")], marker=True)
    texts = ["a blue square", "a red circle"]
    peaks = {}
    for name in ("shapes-clip-shortcut", "shapes-clip"):
        model, processor = zoo.load(name)
        methods = method_names("clip")
        result = explain(model, processor, scene.pil(), texts, methods=methods)
        assert sorted(result.methods) == sorted(methods)
        for record in result.records:
            assert record.grid.shape == (8, 8) and np.isfinite(record.grid).all()
            assert np.abs(record.grid).max() > 0, (name, record.method, record.target)
        peaks[name] = {r.method: _grid_argmax(r.grid) for r in result.records if r.target == texts[0]}
    marker_cells = {(0, 0), (0, 1)}  # the patches the marker touches (MARKER_BOX at 64 px)
    for method in ("relevancy", "integrated-gradients", "occlusion"):
        assert peaks["shapes-clip-shortcut"][method] in marker_cells, (method, peaks)
        assert peaks["shapes-clip"][method] not in marker_cells, (method, peaks)
    image = tmp_path / "scene.png"
    scene.pil().save(image)
    out = tmp_path / "report.html"
    code = main(["explain", str(image), "--text", texts[0], "--model", "zoo:shapes-clip-shortcut",
                 "--method", "occlusion", "--out", str(out), "--quiet"])
    assert code == 0 and out.read_text().startswith("<!DOCTYPE html>")


def test_explain_runs_on_the_prior_model(tmp_path):
    from captum_vlm.cli import main
    from captum_vlm.explain import explain, method_names

    scene = sc.make_scene(5, labels=[("red", "square"), ("green", "circle")])
    model, processor = zoo.load("shapes-blip-vqa-prior")
    assert isinstance(model, BlipForQuestionAnswering)
    methods = method_names("blip")
    result = explain(model, processor, scene.pil(), ["what color is the square?"], methods=methods)
    assert sorted(result.methods) == sorted(methods)
    for record in result.records:
        assert record.grid.shape == (8, 8) and np.isfinite(record.grid).all()
        assert np.abs(record.grid).max() > 0, record.method
    image = tmp_path / "scene.png"
    scene.pil().save(image)
    out = tmp_path / "report.html"
    code = main(["explain", str(image), "--text", "what color is the square?", "--model",
                 "zoo:shapes-blip-vqa-prior", "--out", str(out), "--quiet"])
    assert code == 0 and out.read_text().startswith("<!DOCTYPE html>")
