"""The zoo table benchmark (benchmarks/bench_zoo_table.py): one row's numbers, recomputed here
by hand on 2 held-out scenes of shapes-clip (Grad-ECLIP called directly, the model's own forward,
numpy for the pointing game, deletion and the rank correlation)."""

from __future__ import annotations

import copy
import importlib.util
import json
import statistics
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


def _deletion(model, pixel_values, ids, mask, k: int, grid: np.ndarray) -> tuple[float, float]:
    """Deletion AUC and unperturbed probability by hand: zero the top patches, read the softmax
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
    return auc, scores[0]


def test_one_row_against_a_computation_by_hand(bench):
    torch.set_num_threads(1)
    model, processor = zoo.load("shapes-clip")
    items = bench.prepare(model, processor, n_scenes=2)
    row = bench.method_row(items, "grad-eclip", steps=STEPS, n_sanity=1)

    torch.manual_seed(0)
    untrained = type(model)(model.config).eval()
    scenes = sc.make_scenes(bench.HELDOUT_SEED, 2, size=64, n_objects=2)
    texts = sc.zero_shot_prompts()
    want = {"trained": ([], [], []), "untrained": ([], [], [])}
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
                auc, p0 = _deletion(m, pixel_values, ids, mask, k, grid)
                want[variant][1].append(auc)
                want[variant][2].append(p0)
                if i == 0 and variant == "trained":  # randomisation: every vision block re-initialised, top first
                    work = copy.deepcopy(model)
                    torch.manual_seed(0)
                    for block in list(work.vision_model.encoder.layers)[::-1]:
                        reinitialize(block)
                    random_grid = GradECLIP(work).attribute(pixel_values, target=k, additional_forward_args=(ids, mask),
                                                            return_grid=True)[0].detach().double().numpy()
                    rhos.append(spearmanr(grid.ravel(), random_grid.ravel()).statistic)

    assert row["trained"]["pointing"]["n"] == 4 and row["trained"]["sanity"]["n"] == 2
    for variant, (hits, aucs, p0) in want.items():
        got = row[variant]
        assert got["pointing"]["mean"] == pytest.approx(np.mean(hits), abs=1e-12), variant
        # per-map values stored, map by map
        assert got["per_map"]["hit"] == [float(h) for h in hits], variant
        assert got["per_map"]["auc"] == pytest.approx(aucs, rel=1e-4, abs=1e-7), variant
        assert got["per_map"]["score"] == pytest.approx(p0, rel=1e-4), variant
        # the table's figures: mean ± se of the absolute AUC, median of AUC / score, mean of ratios
        ratios = [a / b for a, b in zip(aucs, p0)]
        assert got["deletion_auc"]["mean"] == pytest.approx(np.mean(aucs), rel=1e-4), variant
        assert got["deletion_auc"]["se"] == pytest.approx(np.std(aucs, ddof=1) / 2, rel=1e-3), variant
        assert got["deletion_ratio"]["median"] == pytest.approx(statistics.median(ratios), rel=1e-4), variant
        assert got["deletion_ratio"]["n"] == 4
        assert got["deletion_ratio"]["q1"] <= got["deletion_ratio"]["median"] <= got["deletion_ratio"]["q3"]
        assert got["deletion"]["mean"] == pytest.approx(np.mean(ratios), rel=1e-4), variant
    assert row["trained"]["sanity"]["mean"] == pytest.approx(np.mean(rhos), abs=1e-4)
    assert row["trained"]["per_map"]["rho"] == pytest.approx(rhos, abs=1e-4)
    # the trained model's maps delete faster than the untrained model's (the table's point)
    assert row["trained"]["deletion_ratio"]["median"] < row["untrained"]["deletion_ratio"]["median"]

    # the random-map row stores the same per-map values; its AUCs are the deletion of those maps
    rand = bench.random_row(items, steps=STEPS)
    assert len(rand["per_map"]["auc"]) == 4
    assert rand["per_map"]["score"] == pytest.approx(want["trained"][2], rel=1e-4)  # same model, same scores
    assert rand["deletion_auc"]["mean"] == pytest.approx(np.mean(rand["per_map"]["auc"]), rel=1e-12)


def _stored_row(model: str, method: str, ratios: list[float], per_map: bool) -> dict:
    """A row as the script writes it (``per_map=False``: as stored before per-map values)."""
    variant = {"pointing": {"mean": 0.5, "se": 0.1, "n": len(ratios)},
               "deletion": {"mean": float(np.mean(ratios)), "se": 0.0, "n": len(ratios)},
               "sanity": {"mean": 0.25, "se": 0.05, "n": 2}, "sanity_pass": {"mean": 1.0, "se": 0.0, "n": 2}}
    if per_map:
        aucs, scores = [r / 2 for r in ratios], [0.5] * len(ratios)
        variant.update({"deletion_auc": {"mean": float(np.mean(aucs)), "se": 0.0, "n": len(aucs)},
                        "deletion_ratio": {"median": statistics.median(ratios), "q1": min(ratios),
                                           "q3": max(ratios), "n": len(ratios)},
                        "per_map": {"hit": [1.0] * len(ratios), "auc": aucs, "score": scores}})
    if method == "random map":
        return {"model": model, "method": method, **{k: v for k, v in variant.items() if "sanity" not in k}}
    notes = {"class": "C", "task": "t", "target": "its p", "maps": len(ratios), "scenes_used": 1, "scenes": 1,
             "score": {"mean": 0.5, "se": 0.0, "n": len(ratios)}, "sanity_scenes": 1, "weights_sha256": "ab"}
    return {"model": model, "method": method, "trained": variant, "untrained": variant, "cpu_s": 3.0, **notes}


def test_table_reads_old_and_new_rows(bench, tmp_path, capsys):
    """``--table-only``: a row with per-map values shows its absolute AUC and median ratio; a row
    stored before them shows its mean ratio, marked "mean", and "n/a" for the absolute AUC."""
    rows = [_stored_row("m-new", "random map", [1.0, 3.0, 50.0], True),
            _stored_row("m-new", "x", [0.2, 0.4, 9.0], True),
            _stored_row("m-old", "random map", [1.0, 2.0], False),
            _stored_row("m-old", "x", [0.5, 0.7], False)]
    out = tmp_path / "rows.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = bench.markdown(rows)
    new, old = (next(line for line in table.splitlines() if line.startswith(f"| {m} |")) for m in ("m-new", "m-old"))
    cells = [c.strip() for c in new.split("|")[1:-1]]
    assert cells[5:10] == ["1.600 ± 0.000", "9.000 ± 0.000", "0.40 [0.20, 9.00]", "0.40 [0.20, 9.00]",
                           "3.00 [1.00, 50.00]"]
    cells = [c.strip() for c in old.split("|")[1:-1]]
    assert cells[5:10] == ["n/a", "n/a", "mean 0.60 ± 0.00", "mean 0.60 ± 0.00", "mean 1.50 ± 0.00"]
    assert bench.main(["--table-only", "--out", str(out)]) == 0  # reads the file, computes nothing
    assert capsys.readouterr().out.startswith(table + "\n")


def test_redone_row_keeps_the_randomisation_check(bench):
    """``--redo-deletion`` replaces pointing and deletion, keeps the stored ρ and says whether the
    recomputed means reproduce the stored ones."""
    stored = _stored_row("m", "x", [0.5, 0.7], False)
    again = _stored_row("m", "x", [0.5, 0.7], True)
    for variant in ("trained", "untrained"):
        again[variant]["sanity"] = {"mean": float("nan"), "se": float("nan"), "n": 0}
        again[variant]["per_map"]["rho"] = []
    merged = bench._merge_redone(stored, again, cpu_s=1.5)
    assert merged["trained"]["sanity"] == stored["trained"]["sanity"]
    assert merged["trained"]["deletion_ratio"]["median"] == pytest.approx(0.6)
    assert "rho" not in merged["trained"]["per_map"]
    assert merged["deletion_redone"]["old_means_reproduced"] is True
    moved = _stored_row("m", "x", [0.5, 0.9], True)
    assert bench._merge_redone(stored, moved, cpu_s=1.0)["deletion_redone"]["old_means_reproduced"] is False


def test_caption_case_sums_the_object_word_maps(bench):
    """The caption task explains the object's two word tokens: their positions in the true caption."""
    tokens = ["[BOS]", "a", "red", "circle", "and", "a", "red", "square", "[EOS]"]
    assert bench._word_positions(tokens, [("red", "circle"), ("red", "square")]) == [(2, 3), (6, 7)]
    assert bench._word_positions(tokens, [("red", "square"), ("red", "circle")]) == [(6, 7), None]
