"""The zoo table benchmark (benchmarks/bench_zoo_table.py): one row's numbers, recomputed here
by hand on 2 held-out scenes of shapes-clip (Grad-ECLIP called directly, the model's own forward,
numpy for the pointing game, deletion and the rank correlation)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from captum_vlm import zoo
from captum_vlm.attr import GradECLIP
from captum_vlm.metrics import reinitialize
from captum_vlm.zoo import scenes as sc

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_zoo_table.py"
STEPS = 8


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_zoo_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _hit(grid: np.ndarray, mask: np.ndarray, tolerance: float = 4.0) -> bool:
    """Pointing game by hand: a pixel of the top patch within ``tolerance`` px of the mask."""
    patch = mask.shape[0] // grid.shape[0]
    if grid.max() == grid.min():
        return False
    peak = np.argwhere(np.kron(grid == grid.max(), np.ones((patch, patch))) > 0)
    on = np.argwhere(mask)
    distances = np.sqrt(((peak[:, None, :] - on[None, :, :]) ** 2).sum(-1))
    return bool(distances.min() <= tolerance)


def _relative_deletion(model, pixel_values, ids, mask, k: int, grid: np.ndarray) -> float:
    """Deletion AUC / unperturbed probability by hand: zero the top patches, read the softmax
    over the prompts of the model's own forward, trapezoid rule on [0, 1]."""
    h, w = grid.shape
    patch = pixel_values.shape[-1] // w
    order = np.argsort(-grid.flatten(), kind="stable")
    scores = []
    for step in range(STEPS + 1):
        image = pixel_values.clone()
        for cell in order[: step * h * w // STEPS]:
            r, c = divmod(int(cell), w)
            image[..., r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = 0.0
        with torch.no_grad():
            logits = model(pixel_values=image, input_ids=ids, attention_mask=mask).logits_per_image
        scores.append(float(logits.softmax(-1)[0, k]))
    auc = sum((a + b) / 2 for a, b in zip(scores, scores[1:])) / STEPS
    return auc / scores[0]


def test_one_row_against_a_computation_by_hand(bench):
    torch.set_num_threads(1)
    model, processor = zoo.load("shapes-clip")
    items = bench.prepare(model, processor, n_scenes=2)
    row = bench.method_row(items, "grad-eclip", steps=STEPS, n_sanity=1)

    torch.manual_seed(0)
    untrained = type(model)(model.config).eval()
    scenes = sc.make_scenes(bench.HELDOUT_SEED, 2, size=64, n_objects=2)
    texts = sc.zero_shot_prompts()
    want = {"trained": ([], []), "untrained": ([], [])}
    rhos = []
    for i, scene in enumerate(scenes):
        inputs = processor(images=scene.pil(), text=texts, return_tensors="pt", padding=True)
        pixel_values, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
        for obj in scene.objects:
            k = texts.index(f"a {obj.colour} {obj.shape}")
            for variant, m in (("trained", model), ("untrained", untrained)):
                grid = GradECLIP(m).attribute(pixel_values, target=k, additional_forward_args=(ids, mask),
                                              return_grid=True)[0].detach().double().numpy()
                want[variant][0].append(_hit(grid, obj.mask))
                want[variant][1].append(_relative_deletion(m, pixel_values, ids, mask, k, grid))
                if i == 0 and variant == "trained":  # randomisation: every vision block re-initialised, top first
                    work = copy.deepcopy(model)
                    torch.manual_seed(0)
                    for block in list(work.vision_model.encoder.layers)[::-1]:
                        reinitialize(block)
                    random_grid = GradECLIP(work).attribute(pixel_values, target=k, additional_forward_args=(ids, mask),
                                                            return_grid=True)[0].detach().double().numpy()
                    rhos.append(spearmanr(grid.ravel(), random_grid.ravel()).statistic)

    assert row["trained"]["pointing"]["n"] == 4 and row["trained"]["sanity"]["n"] == 2
    for variant, (hits, aucs) in want.items():
        assert row[variant]["pointing"]["mean"] == pytest.approx(np.mean(hits), abs=1e-12), variant
        assert row[variant]["deletion"]["mean"] == pytest.approx(np.mean(aucs), rel=1e-4), variant
    assert row["trained"]["sanity"]["mean"] == pytest.approx(np.mean(rhos), abs=1e-4)
    # the trained model's maps delete faster than the untrained model's (the table's point)
    assert row["trained"]["deletion"]["mean"] < row["untrained"]["deletion"]["mean"]


def test_caption_case_sums_the_object_word_maps(bench):
    """The caption task explains the object's two word tokens: their positions in the true caption."""
    tokens = ["[BOS]", "a", "red", "circle", "and", "a", "red", "square", "[EOS]"]
    assert bench._word_positions(tokens, [("red", "circle"), ("red", "square")]) == [(2, 3), (6, 7)]
    assert bench._word_positions(tokens, [("red", "square"), ("red", "circle")]) == [(6, 7), None]
