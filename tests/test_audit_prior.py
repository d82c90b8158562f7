"""The issue's proof on the zoo's prior-driven VQA model: shapes-blip-vqa-prior answers "what
color is the square?" with "blue" for about a tenth of the scenes whose square is not blue (the
planted language prior). On a small sample, found by a deterministic scan of held-out zoo
scenes with the model's own answers, the audit's records and pattern finder single out those
prior-driven answers as not grounded, and the correct answers are not. A negative control runs
the same finder on the same records with the verdicts shuffled: then nothing stands out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import captum_vlm as cv
from captum_vlm.audit import group_of, ungrounded_labels
from captum_vlm.zoo import train_blip

MODEL = "shapes-blip-vqa-prior"
SCAN_SEED = 2026  # held-out scenes (the zoo trains on other seeds); the picks come from the model's answers
PRIOR, CORRECT = 16, 20  # prior-driven answers, correct answers
METHOD = "bimodal-relevancy"


@pytest.fixture(scope="module")
def picked():
    """The first PRIOR scenes (of a non-blue square) answered "blue", and the first CORRECT
    answered right, scanning held-out scenes in order with the model's own answers."""
    torch.set_num_threads(1)
    model, processor = cv.zoo.load(MODEL)
    prior = train_blip.language_prior(train_blip.RECIPES[MODEL])
    scenes = train_blip.prior_scenes(prior, SCAN_SEED, 400, against=True)
    prior_driven, correct = [], []
    for start in range(0, len(scenes), 40):
        chunk = scenes[start : start + 40]
        answers = train_blip.answer(model, processor, [s.image for s in chunk], [prior.question] * len(chunk))
        for scene, said in zip(chunk, answers):
            colour, index = train_blip.prior_object(prior, scene)
            if said == prior.colour and len(prior_driven) < PRIOR:
                prior_driven.append((scene, colour, index, said))
            elif said == colour and len(correct) < CORRECT:
                correct.append((scene, colour, index, said))
        if (len(prior_driven), len(correct)) == (PRIOR, CORRECT):
            break
    assert (len(prior_driven), len(correct)) == (PRIOR, CORRECT), "the scan found too few prior-driven answers"
    return model, processor, prior, prior_driven, correct


@pytest.fixture(scope="module")
def audited(picked, tmp_path_factory):
    model, processor, prior, prior_driven, correct = picked
    items = [{"id": f"{kind}-{i}", "image": scene.image, "question": prior.question, "label": colour,
              "mask": scene.objects[index].mask}
             for kind, group in (("prior", prior_driven), ("correct", correct))
             for i, (scene, colour, index, _) in enumerate(group)]
    result = cv.audit(model, processor, items, [], methods=[METHOD], checks=("grounding",),
                      output=tmp_path_factory.mktemp("prior"), model_name=MODEL)
    return result


def test_the_records_hold_the_answers_of_the_scan(picked, audited):
    _, _, prior, prior_driven, correct = picked
    records = {r["id"]: r for r in audited.records()}
    assert all(r["error"] is None for r in records.values())
    for kind, group in (("prior", prior_driven), ("correct", correct)):
        for i, (_, colour, _, said) in enumerate(group):
            record = records[f"{kind}-{i}"]
            assert (record["prediction"], record["label"], record["correct"]) == (said, colour, said == colour)
    assert {group_of(records[f"prior-{i}"]) for i in range(PRIOR)} == {f"{prior.question} → blue [wrong]"}


def test_prior_driven_answers_are_not_grounded_far_more_often(picked, audited):
    _, _, prior, _, _ = picked
    records = audited.records()
    prior_rows = [r for r in records if r["id"].startswith("prior-")]
    correct_rows = [r for r in records if r["id"].startswith("correct-")]

    def not_grounded(rows, key):
        return sum(r[key] is False for r in rows) / len(rows)

    # the answer survives losing what its own map points at, and losing the square (object mask)
    for key in (f"{METHOD}.grounded", "object_grounded"):
        assert not_grounded(prior_rows, key) >= not_grounded(correct_rows, key) + 0.4, key
    # the audit's own pattern finder names that group, and only it (the correct answers' colour
    # groups are tested too: min_count=5)
    wanted = f"{prior.question} → blue [wrong]"
    findings = audited.patterns(min_count=5)
    flagged = {(f.kind, f.method, f.label) for f in findings}
    assert {("not grounded", METHOD, wanted), ("not grounded", "object mask", wanted)} <= flagged
    assert {label for _, _, label in flagged} == {wanted}


def test_shuffled_verdicts_single_out_nothing(audited):
    """The negative control: the same groups with their verdicts shuffled (and swapped between
    prior-driven and correct answers) are not flagged, so the finding above comes from the verdicts."""
    records = [r for r in audited.records() if r["error"] is None]
    labels = [group_of(r) for r in records]
    verdicts = [r["object_grounded"] for r in records]
    swapped = [not v if v is not None else None for v in verdicts]
    assert not [f for f in ungrounded_labels(labels, swapped, min_count=5) if "[wrong]" in f.label]
    rng = np.random.default_rng(0)
    for _ in range(5):
        shuffled = list(rng.permutation(np.array(verdicts, dtype=object)))
        assert not [f for f in ungrounded_labels(labels, shuffled, min_count=5) if "[wrong]" in f.label]
