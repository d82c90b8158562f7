"""Every method that supports a new zoo model's class runs on it through the CLI (all methods in
one call, with evidence), and the captioning model through ``cv.explain`` (its maps checked
against the method called directly)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from model_state import assert_unchanged, snapshot
from numerics import assert_close_scaled

from captum_vlm import zoo
from captum_vlm.adapters import get_adapter
from captum_vlm.zoo import train_llava as tl
from captum_vlm.zoo.scenes import make_scene

SCENE = dict(rng_or_seed=5, labels=[("red", "circle"), ("green", "square")])


@pytest.mark.parametrize("name,texts", [
    ("shapes-clip-shortcut", ["a red circle", "a green square"]),
    ("shapes-blip-vqa-prior", ["what color is the square?"]),
    ("shapes-blip-caption", ["a red circle and a green square"]),
    ("shapes-vilt", ["what color is the circle?"]),
    ("shapes-llava", [tl.prompt("what color is the circle?")]),
])
def test_the_cli_runs_every_method_of_the_class(name, texts, tmp_path):
    from captum_vlm.cli import main
    from captum_vlm.explain import method_names

    assert name in zoo.list_models()
    model, _ = zoo.load(name)
    methods = method_names(get_adapter(model))
    assert len(methods) >= 2
    image = tmp_path / "scene.png"
    make_scene(**SCENE).pil().save(image)
    args = ["explain", str(image), "--model", f"zoo:{name}", "--out", str(tmp_path / "r.html"),
            "--png", str(tmp_path / "png"), "--quiet"]
    for text in texts:
        args += ["--text", text]
    for method in methods:
        args += ["--method", method]
    assert main(args) == 0
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    saved = json.loads((tmp_path / "png" / "explanation.json").read_text())
    assert sorted({m["method"] for m in saved["maps"]}) == sorted(methods)
    for entry in saved["maps"]:
        grid = np.asarray(entry["grid"])
        assert grid.shape == (8, 8) and np.isfinite(grid).all(), (entry["method"], entry["target"])
    for method in methods:  # each method's whole-text maps carry the evidence explain attaches
        whole = [m for m in saved["maps"] if m["method"] == method and "randomisation check" in m["evidence"]]
        assert whole, method
        assert all(np.abs(np.asarray(m["grid"])).max() > 0 for m in whole), method


def test_explain_on_the_caption_model_is_the_method_called_directly():
    from captum_vlm.attr import BimodalRelevancy, CrossAttentionGradCAM
    from captum_vlm.explain import explain, method_names

    model, processor = zoo.load("shapes-blip-caption")
    scene = make_scene(**SCENE)
    caption = "a red circle and a green square"
    methods = method_names(get_adapter(model))
    assert sorted(methods) == ["bimodal-relevancy", "cross-attention-gradcam"]
    own = CrossAttentionGradCAM(model)  # first call: transformers adds its lazy hooks
    inputs = processor(images=scene.pil(), text=[caption], return_tensors="pt", padding=True)
    args = (inputs["input_ids"], inputs["attention_mask"])
    before = snapshot(model)
    result = explain(model, processor, scene.pil(), [caption], methods=methods, evidence=False)
    assert_unchanged(model, before)
    classes = {"cross-attention-gradcam": own, "bimodal-relevancy": BimodalRelevancy(model)}
    for method, attr in classes.items():
        records = [r for r in result.records if r.method == method]
        whole = next(r for r in records if r.text_index == 0)
        want = attr.attribute(inputs["pixel_values"], additional_forward_args=args, return_grid=True)[0]
        assert_close_scaled(torch.as_tensor(whole.grid), want.detach())
        # one map per caption word token, each tagged with its position
        words = {r.token[1] for r in records if r.token is not None}
        assert words and words <= set(range(1, inputs["input_ids"].shape[1]))
