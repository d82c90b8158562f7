"""explain() attaches each map's evidence: checked against independent computations on the zoo."""

import json
from importlib.resources import files

import numpy as np
import pytest
import torch
from model_state import assert_unchanged, snapshot
from PIL import Image
from scipy.stats import spearmanr

import captum_vlm as cv
from captum_vlm.attr import GradECLIP
from captum_vlm.cli import demo_summary
from captum_vlm.explain.evidence import confidence, rank_agreement
from captum_vlm.metrics import deletion_curve, insertion_curve, model_randomization_check
from captum_vlm.metrics.evidence import patch_orders
from captum_vlm.targets import ImageTextSimilarity

TEXTS = ["a red circle", "a blue square", "a yellow triangle", "a green circle"]


@pytest.fixture(scope="module")
def clip():
    return cv.zoo.load("shapes-clip")


@pytest.fixture(scope="module")
def scene():
    return Image.open(files("captum_vlm.zoo") / "assets" / "demo-scene.png").convert("RGB")


@pytest.fixture(scope="module")
def result(clip, scene):
    model, processor = clip
    before = snapshot(model)
    found = cv.explain(model, processor, scene, TEXTS, methods=["grad-eclip", "rollout"])
    assert_unchanged(model, before)
    return found


@pytest.fixture(scope="module")
def inputs(clip, scene):
    return clip[1](images=scene, text=TEXTS, return_tensors="pt", padding=True)


def test_absent_object_is_marked_and_present_ones_are_not(result):
    grad = [r for r in result.records if r.method == "grad-eclip"]
    assert [r.evidence_values["absent"] for r in grad] == [False, False, False, True]
    assert "does not see" in grad[3].evidence["model's confidence"]
    html = result.to_html()
    assert html.count('<tr class="absent">') == 1 and "The model does not see &#x27;a green circle&#x27;" in html


def test_confidence_is_the_softmax_over_prompts(result, clip, inputs):
    with torch.no_grad():
        logits = ImageTextSimilarity(clip[0])(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    probabilities = logits.softmax(-1)[0].tolist()
    assert list(result.scores.values()) == pytest.approx(probabilities, abs=1e-6)
    line, absent = confidence(probabilities, "probability over prompts", 3)
    assert absent == (probabilities[3] < 1 / 8) and f"{probabilities[3]:.4f}" in line


def test_prompt_independent_method_is_shown_once(result):
    rollout = [r for r in result.records if r.method == "rollout"]
    assert len(rollout) == 1 and rollout[0].target == "every prompt (prompt-independent)"
    assert set(rollout[0].evidence_values["per_prompt"]) == set(TEXTS)
    assert len([r for r in result.records if r.method == "grad-eclip"]) == 4  # depends on the prompt: kept


def test_faithfulness_equals_independent_deletion_and_insertion_curves(result, clip, inputs):
    model = clip[0]
    forward = ImageTextSimilarity(model)
    args = (inputs["input_ids"], inputs["attention_mask"])
    for k, record in enumerate(r for r in result.records if r.method == "grad-eclip"):
        grid = torch.as_tensor(record.grid)
        patch = inputs["pixel_values"].shape[-1] // grid.shape[-1]
        ref_del = deletion_curve(forward, inputs["pixel_values"], grid, target=k, additional_forward_args=args,
                                 patch_size=patch, steps=8, baseline=0.0)
        ref_ins = insertion_curve(forward, inputs["pixel_values"], grid, target=k, additional_forward_args=args,
                                  patch_size=patch, steps=8, baseline="blur")
        values = record.evidence_values
        assert values["deletion_auc"] == pytest.approx(ref_del.auc.item(), rel=1e-4, abs=1e-4)
        assert values["insertion_auc"] == pytest.approx(ref_ins.auc.item(), rel=1e-4, abs=1e-4)
        randoms = []
        for order in patch_orders(grid, 3)[1:]:
            ranked = torch.empty(grid.numel())
            ranked[order] = torch.arange(grid.numel(), 0, -1, dtype=torch.float)
            randoms.append(deletion_curve(forward, inputs["pixel_values"], ranked.view(grid.shape), target=k,
                                          additional_forward_args=args, patch_size=patch, steps=8).auc.item())
        assert values["random_deletion_auc"] == pytest.approx(np.mean(randoms), rel=1e-4, abs=1e-4)
        assert values["beats_random"] == (values["deletion_auc"] < values["random_deletion_auc"]
                                          and values["insertion_auc"] > values["random_insertion_auc"])


def test_randomisation_verdict_equals_the_check_run_by_hand(result, clip, inputs):
    model = clip[0]
    args = (inputs["input_ids"], inputs["attention_mask"])

    def grad_eclip(m, _):
        return GradECLIP(m).attribute(inputs["pixel_values"], target=0, additional_forward_args=args,
                                      return_grid=True)

    blocks = list(model.vision_model.encoder.layers)[::-1]
    rho = model_randomization_check(model, grad_eclip, None, layers=blocks).spearman[-1]
    record = next(r for r in result.records if r.method == "grad-eclip")
    assert record.evidence_values["randomisation_spearman"] == pytest.approx(rho, abs=1e-6)
    assert record.evidence["randomisation check"].startswith("passes" if abs(rho) < 0.5 else "FAILS")


def test_rank_agreement_is_the_mean_spearman_over_texts(result):
    grads = {r.text_index: r.grid for r in result.records if r.method == "grad-eclip"}
    shared = next(r.grid for r in result.records if r.method == "rollout")
    expected = np.mean([spearmanr(grads[k].ravel(), shared.ravel()).statistic for k in range(4)])
    assert result.agreement() == {("grad-eclip", "rollout"): pytest.approx(expected)}
    assert rank_agreement([]) == {}
    html = result.to_html()
    assert 'data-part="agreement"' in html and f"<td>{expected:.2f}</td>" in html


def test_single_prompt_reports_the_logit_not_a_probability_of_one(clip, scene):
    model, processor = clip
    one = cv.explain(model, processor, scene, ["a red circle"], methods=["grad-eclip"])
    assert one.score_kind.startswith("logit") and list(one.scores.values())[0] != pytest.approx(1.0)
    assert one.records[0].evidence_values["absent"] is False


def test_default_method_is_the_benchmark_best(clip, scene):
    model, processor = clip
    found = cv.explain(model, processor, scene, ["a red circle", "a blue square"], evidence=False)
    assert found.methods == ["relevancy"]
    assert all(r.evidence == {} for r in found.records)


def test_titles_and_colour_bars_use_one_vocabulary(result):
    record = result.records[0]
    assert record.details["layers"] == "vision block 3 (last)"
    assert record.details["value"].startswith("Grad-ECLIP relevance")


def test_save_into_a_used_folder_removes_its_own_stale_files(result, clip, scene, tmp_path):
    first = result.save(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    smaller = cv.explain(clip[0], clip[1], scene, ["a red circle"], methods=["rollout"], evidence=False)
    second = smaller.save(tmp_path)
    assert len(first) == len(result.records) + 1 and len(second) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in second), "notes.txt"])
    saved = json.loads((tmp_path / "explanation.json").read_text())
    assert saved["files"] == [second[0].name]


def test_demo_summary_names_absent_prompt_evidence_and_agreement(result):
    lines = demo_summary(result)
    assert lines[0] == "the model does not see 'a green circle': its maps are marked in the report"
    assert any(line.startswith("rollout (prompt-independent: one map): beats a random order on ") for line in lines)
    assert "methods agree at most" in lines[-1]
