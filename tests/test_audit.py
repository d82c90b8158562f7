"""cv.audit with the local engine: records against independent computations, resume, errors,
the report's escaping, the pattern finder on planted patterns, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from audit_data import PROMPTS, same_records, scene_folder, tiny_clip, write_image
from model_state import assert_unchanged, snapshot

import captum_vlm as cv
from captum_vlm.audit import Audit, fixed_peak_labels, rows_from, ungrounded_labels
from captum_vlm.audit.store import RunStore
from captum_vlm.audit.summaries import box_to_mask, map_entropy, mask_cells, mass_inside, peak_cell
from captum_vlm.cli import main
from captum_vlm.zoo import scenes


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return scene_folder(tmp_path_factory.mktemp("scenes"), 12)


# ----- map summaries -----------------------------------------------------------------------------
def test_summaries_equal_hand_formulas():
    grid = np.array([[1.0, -2.0, 0.0], [3.0, 0.0, 4.0]])
    p = np.array([1.0, 3.0, 4.0]) / 8
    assert peak_cell(grid) == (1, 2)
    assert map_entropy(grid) == pytest.approx(-(p * np.log(p)).sum() / np.log(6))
    assert math.isnan(map_entropy(-np.ones((2, 2))))
    cells = np.array([[1.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    assert mass_inside(grid, cells) == pytest.approx((1 + 0.5 * 3) / 8)
    mask = np.zeros((4, 6), bool)
    mask[:2, :2] = True  # the whole top-left cell of a 2x3 grid, and a quarter of nothing else
    mask[2, 2] = True  # one of the 4 pixels of cell (1, 1)
    assert mask_cells(mask, (2, 3)).tolist() == [[1.0, 0.0, 0.0], [0.0, 0.25, 0.0]]
    # the crop box keeps the left 2x2 pixels -> one cell, fully covered
    assert mask_cells(mask, (1, 1), crop_box=(0, 0, 2, 2)).tolist() == [[1.0]]
    box = box_to_mask((1, 0, 3, 2), (4, 3))
    assert box.tolist() == [[False, True, True, False], [False, True, True, False], [False] * 4]
    with pytest.raises(ValueError, match="box"):
        box_to_mask((3, 0, 1, 2), (4, 3))


# ----- records against an independent computation on the zoo CLIP ------------------------------
def _deletion_auc_by_hand(model, pixels, ids, mask, order, target, steps, patch):
    """Deletion written out: zero the top-ranked patches (row-major ties), softmax score, trapezoid."""
    rows, cols = order.shape
    ranking = sorted(range(rows * cols), key=lambda i: (-float(order.flatten()[i]), i))
    scores = []
    for k in range(steps + 1):
        image = pixels.clone()
        for i in ranking[: k * rows * cols // steps]:
            r, c = divmod(i, cols)
            image[:, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = 0
        with torch.no_grad():
            logits = model(pixel_values=image, input_ids=ids, attention_mask=mask).logits_per_image
        scores.append(float(logits.softmax(-1)[0, target]))
    return sum((a + b) / 2 for a, b in zip(scores[:-1], scores[1:])) / steps


def test_records_equal_an_independent_computation(tmp_path):
    model, processor = cv.zoo.load("shapes-clip")
    prompts = scenes.zero_shot_prompts()
    picked = [scenes.make_scene(seed, n_objects=1) for seed in (3, 6, 4)]  # seed 4: an all-zero map
    before = snapshot(model)
    result = cv.audit(model, processor, [s.pil() for s in picked], prompts, methods=["grad-eclip"],
                      labels=[scenes.phrase(*s.labels[0]) for s in picked], masks=[s.objects[0].mask for s in picked],
                      output=tmp_path / "a", checks=("deletion",), deletion_steps=4, keep_maps=True)
    assert_unchanged(model, before)
    text = processor(text=prompts, return_tensors="pt", padding=True)
    for scene, record in zip(picked, result.records()):
        pixels = processor(images=scene.pil(), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            probs = model(pixel_values=pixels, **text).logits_per_image.softmax(-1)[0]
        k = int(probs.argmax())
        assert record["prediction"] == prompts[k] and record["confidence"] == pytest.approx(float(probs[k]), rel=1e-5)
        assert record["correct"] == (prompts[k] == scenes.phrase(*scene.labels[0]))
        grid = cv.GradECLIP(model).attribute(pixels, target=k, additional_forward_args=(text["input_ids"],
                                             text["attention_mask"]), return_grid=True)[0].detach().numpy()
        np.testing.assert_allclose(np.reshape(record["grad-eclip.map"], (8, 8)), grid, rtol=1e-4,
                                   atol=1e-4 * np.abs(grid).max())
        positive = np.clip(grid, 0, None)
        if positive.sum() == 0:  # points nowhere: no peak, no mass, no entropy
            assert record["grad-eclip.peak_row"] is None and record["grad-eclip.peak_col"] is None
            assert math.isnan(record["grad-eclip.mass_inside"]) and math.isnan(record["grad-eclip.entropy"])
            continue
        r, c = np.unravel_index(np.argmax(grid), grid.shape)
        assert (record["grad-eclip.peak_row"], record["grad-eclip.peak_col"]) == (r, c)
        cells = scene.objects[0].mask.reshape(8, 8, 8, 8).mean(axis=(1, 3))  # 64 px, 8 px patches
        assert record["grad-eclip.mass_inside"] == pytest.approx((positive * cells).sum() / positive.sum(), rel=1e-4)
        assert record["grad-eclip.mass_outside"] == pytest.approx(1 - record["grad-eclip.mass_inside"])
        want = _deletion_auc_by_hand(model, pixels, text["input_ids"], text["attention_mask"], grid, k, 4, 8)
        assert record["grad-eclip.deletion_auc"] == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert record["grad-eclip.grounded"] is None and record["error"] is None
    assert sum(row["empty_maps"] for row in result.label_table()) == 1


def test_a_copy_of_the_zoo_model_writes_the_same_records(tmp_path):
    """What a Ray actor does: audit an unpickled copy of the model. Bit-identical records need the
    copy to compute the same bits as the original; zoo weights left as views into the checkpoint
    file (64-byte misaligned) once made MKL's matrix-vector product round differently."""
    import pickle

    from captum_vlm.audit import AuditWorker

    model, processor = cv.zoo.load("shapes-clip")
    prompts = scenes.zero_shot_prompts()
    picked = [scenes.make_scene(seed, n_objects=1) for seed in range(16)]
    images, labels = [s.pil() for s in picked], [scenes.phrase(*s.labels[0]) for s in picked]
    masks = [s.objects[0].mask for s in picked]
    result = cv.audit(model, processor, images, prompts, methods=["grad-eclip"], labels=labels, masks=masks,
                      checks=(), keep_maps=True, output=tmp_path / "a")
    copy = AuditWorker(pickle.loads(pickle.dumps(model)), pickle.loads(pickle.dumps(processor)), result.config)
    copied = copy(rows_from(images, labels=labels, masks=masks)).sort_by("id")
    assert copied.num_rows == 16 and copied.column("error").null_count == 16
    assert same_records(copied, result.table())


# ----- resume, no duplicates, no partial shards ----------------------------------------------------
def test_resume_after_an_interruption_equals_an_uninterrupted_run(clip, folder, tmp_path, monkeypatch):
    model, processor = clip
    kwargs = dict(methods=["grad-eclip"], batch_size=3, checks=("deletion", "grounding"))
    whole = cv.audit(model, processor, folder, PROMPTS, output=tmp_path / "whole", **kwargs).table()

    real_write, written = RunStore.write_shard, []

    def write_then_stop(self, table):
        if len(written) == 2:  # Ctrl-C while the third shard is being written: a partial file remains
            (self.records / ".tmp-shard-cut.parquet").write_bytes(b"PAR1 half a shard")
            raise KeyboardInterrupt
        written.append(table.num_rows)
        return real_write(self, table)

    monkeypatch.setattr(RunStore, "write_shard", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        cv.audit(model, processor, folder, PROMPTS, output=tmp_path / "cut", **kwargs)
    monkeypatch.setattr(RunStore, "write_shard", real_write)
    assert len(Audit(tmp_path / "cut")) == 6
    resumed = cv.audit(model, processor, folder, PROMPTS, output=tmp_path / "cut", **kwargs)
    ids = resumed.table().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 12
    assert same_records(resumed.table(), whole)
    assert not list((tmp_path / "cut" / "records").glob(".tmp-*"))
    # once complete, a rerun computes nothing
    calls = []
    monkeypatch.setattr(RunStore, "write_shard", lambda self, table: calls.append(table))
    cv.audit(model, processor, folder, PROMPTS, output=tmp_path / "cut", **kwargs)
    assert calls == []


def test_another_configuration_in_the_same_output_is_refused(clip, folder, tmp_path):
    model, processor = clip
    cv.audit(model, processor, folder, PROMPTS, methods=["rollout"], checks=(), output=tmp_path / "o")
    with pytest.raises(ValueError, match="another configuration"):
        cv.audit(model, processor, folder, PROMPTS, methods=["grad-eclip"], checks=(), output=tmp_path / "o")


def test_the_audit_computes_no_explain_evidence(clip, folder, tmp_path, monkeypatch):
    """The records hold the audit's own checks; explain's per-map evidence (deletion, insertion
    and the randomisation check) would only be thrown away, at several times the cost of a map."""
    import importlib

    pipeline = importlib.import_module("captum_vlm.explain.pipeline")  # cv.explain is the function
    def refuse(*args, **kwargs):
        raise AssertionError("the audit asked explain for evidence")

    monkeypatch.setattr(pipeline, "attach_evidence", refuse)
    model, processor = clip
    result = cv.audit(model, processor, folder, PROMPTS, methods=["grad-eclip"], checks=(), output=tmp_path / "o")
    assert len(result) > 0 and result.errors() == []


# ----- errors ------------------------------------------------------------------------------------
def test_corrupt_images_become_error_records(clip, tmp_path):
    model, processor = clip
    data = scene_folder(tmp_path / "data", 3)
    (data / "garbage.png").write_bytes(b"this is not a png")
    good = (data / "img-000.png").read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    result = cv.audit(model, processor, data, PROMPTS, methods=["rollout"], checks=("deletion",),
                      output=tmp_path / "out")
    by_id = {r["id"]: r for r in result.records()}
    assert set(by_id) == {"img-000.png", "img-001.png", "img-002.png", "garbage.png", "truncated.png"}
    for bad in ("garbage.png", "truncated.png"):
        assert by_id[bad]["error"].startswith("cannot read image") and by_id[bad]["prediction"] is None
    assert all(by_id[f"img-00{i}.png"]["error"] is None and by_id[f"img-00{i}.png"]["has_mask"] for i in range(3))
    assert len(result.errors()) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"texts": ["only one"]}, "texts"),
    ({"texts": "a red circle"}, "texts"),
    ({"methods": ["nope"]}, "methods"),
    ({"methods": ["cross-attention-gradcam"]}, "methods"),
    ({"checks": ["pointing"]}, "checks"),
    ({"engine": "spark"}, "engine"),
    ({"engine": "ray", "num_cpus": 0}, "num_cpus: expected a number > 0"),
    ({"engine": "ray", "num_gpus": -1}, "num_gpus: expected a number >= 0"),
    ({"batch_size": 0}, "batch_size"),
    ({"explain": "everything"}, "explain"),
    ({"grounding_fraction": 1.5}, "grounding_fraction"),
    ({"data": "/no/such/folder"}, "data"),
    ({"data": 42}, "data"),
    ({"labels": ["a"]}, "labels"),
])
def test_bad_input_is_refused_before_any_work(clip, tmp_path, kwargs, message):
    model, processor = clip
    args = {"data": [write_image(tmp_path / "x.png"), write_image(tmp_path / "y.png", 1)], "texts": PROMPTS,
            **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        cv.audit(model, processor, args.pop("data"), args.pop("texts"), output=tmp_path / "o", **args)
    assert not (tmp_path / "o" / "records").exists() or not list((tmp_path / "o" / "records").iterdir())


def test_a_fusion_model_is_refused_with_a_clear_error(tmp_path):
    import tiny_models as tm

    with pytest.raises(ValueError, match="two-tower"):
        cv.audit(tm.blip_itm(), None, [write_image(tmp_path / "x.png")], PROMPTS, output=tmp_path / "o")


def test_ray_missing_names_the_extra(monkeypatch):
    import sys

    from captum_vlm.audit.engines import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"captum-vlm\[ray\]"):
        import_ray()


# ----- inputs --------------------------------------------------------------------------------------
def test_a_column_of_nans_in_a_ray_batch_reads_as_missing():
    """Ray's numpy batch of rows that have no mask or label holds NaN in those columns (float32,
    seen with Ray 2.60's ``from_items`` of rows without them)."""
    from captum_vlm.audit.worker import _rows

    batch = {"id": np.array(["a", "b"], dtype=object), "path": np.array(["a.png", "b.png"], dtype=object),
             "mask_path": np.array([math.nan, math.nan], dtype=np.float32), "label": np.array([math.nan, math.nan]),
             "box": np.array([np.array([1.0, 2.0, 3.0, 4.0]), None], dtype=object)}
    rows = _rows(batch)
    assert [(r["id"], r["path"], r["mask_path"], r["label"]) for r in rows] == [("a", "a.png", None, None),
                                                                                 ("b", "b.png", None, None)]
    assert rows[0]["box"].tolist() == [1.0, 2.0, 3.0, 4.0] and rows[1]["box"] is None


def test_rows_from_lists_folders_and_boxes(tmp_path):
    a, b = write_image(tmp_path / "a.png"), write_image(tmp_path / "b.png", 1)
    rows = rows_from([a, b], labels=["x", "y"], boxes=[(0, 0, 4, 4), None])
    assert [r["id"] for r in rows] == [str(a), str(b)] and rows[0]["box"] == [0, 0, 4, 4] and rows[1]["box"] is None
    (tmp_path / "labels.jsonl").write_text(json.dumps({"file": "b.png", "label": "y", "box": [1, 1, 5, 5]}) + "\n")
    rows = rows_from(tmp_path)
    assert [(r["id"], r["label"], r["box"]) for r in rows] == [("a.png", None, None), ("b.png", "y", [1, 1, 5, 5])]
    with pytest.raises(ValueError, match="unique"):
        rows_from([{"image": a, "id": "same"}, {"image": b, "id": "same"}])


def test_boxes_give_the_mass_inside(clip, tmp_path):
    model, processor = clip
    image = write_image(tmp_path / "a.png")  # 32 px, 4x4 grid of 8 px cells
    result = cv.audit(model, processor, [image], PROMPTS, methods=["grad-eclip"], boxes=[(0, 0, 16, 8)],
                      checks=(), keep_maps=True, output=tmp_path / "o")
    record = result.records()[0]
    grid = np.clip(np.reshape(record["grad-eclip.map"], (4, 4)), 0, None)
    assert record["grad-eclip.mass_inside"] == pytest.approx(grid[0, :2].sum() / grid.sum(), rel=1e-5)


# ----- the report ---------------------------------------------------------------------------------
def test_report_escapes_labels_captions_and_ids(clip, tmp_path):
    model, processor = clip
    evil_label = '<script>alert("label")</script>'
    evil_text = "<img src=x onerror=alert(1)> & co"
    images = [write_image(tmp_path / f"<i>{i}&.png", i) for i in range(3)]
    result = cv.audit(model, processor, images, [evil_text, "a blue square"], methods=["grad-eclip"],
                      labels=[evil_label, evil_text, "a blue square"], keep_maps=True, output=tmp_path / "o")
    page = result.to_html(tmp_path / "report.html")
    assert "<script" not in page and "<img src=x" not in page and "<i>" not in page
    assert "&lt;i&gt;0&amp;.png" in page
    assert "&lt;script&gt;alert(&quot;label&quot;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; co" in page
    assert page.count("data:image/png;base64,") == 3  # the gallery shows the maps


# ----- the pattern finder on planted patterns ------------------------------------------------------
def _planted(seed=0, n=40, labels=("cat", "dog", "cow", "owl", "ant", "bee")):
    rng = np.random.default_rng(seed)
    names, peaks = [], []
    for label in labels:
        for _ in range(n):
            names.append(label)
            if label == "dog" and rng.random() < 0.8:  # a marker in the top-right corner
                peaks.append((0, 7) if rng.random() < 0.6 else (1, 7))
            else:
                peaks.append(tuple(rng.integers(0, 8, 2)))
    return names, peaks


def test_pattern_finder_names_the_planted_label_and_cells():
    names, peaks = _planted()
    found = fixed_peak_labels(names, peaks, method="m")
    assert [f.label for f in found] == ["dog"]
    assert found[0].cells == [(0, 7), (1, 7)] and found[0].rate > 0.6 and found[0].p_value < 1e-6
    # the same data without the plant flags nothing, over several draws
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        assert fixed_peak_labels(names, [tuple(rng.integers(0, 8, 2)) for _ in names]) == []


def test_pattern_finder_flags_the_label_not_grounded_far_more_often():
    rng = np.random.default_rng(1)
    names = [lab for lab in ("cat", "dog", "cow", "owl") for _ in range(50)]
    grounded = [bool(rng.random() > (0.7 if lab == "cow" else 0.15)) for lab in names]
    found = ungrounded_labels(names, grounded, method="m")
    assert [f.label for f in found] == ["cow"] and found[0].rate > 0.5 and found[0].rate_rest < 0.25
    assert ungrounded_labels(names, [bool(rng.random() > 0.15) for _ in names]) == []


def test_audit_patterns_read_the_records(clip, tmp_path, monkeypatch):
    """Audit.patterns runs the finder on the stored peaks: plant them in the records."""
    model, processor = clip
    images = [write_image(tmp_path / f"{i}.png", i) for i in range(30)]
    labels = [PROMPTS[i % 3] for i in range(30)]
    result = cv.audit(model, processor, images, PROMPTS, methods=["rollout"], checks=(), labels=labels,
                      output=tmp_path / "o")
    table = result.table()
    rng = np.random.default_rng(0)
    rows = [(0, 0) if lab == PROMPTS[1] else tuple(rng.integers(0, 4, 2)) for lab in table.column("label").to_pylist()]
    import pyarrow as pa

    table = table.set_column(table.schema.get_field_index("rollout.peak_row"), "rollout.peak_row",
                             pa.array([r for r, _ in rows], pa.int32()))
    table = table.set_column(table.schema.get_field_index("rollout.peak_col"), "rollout.peak_col",
                             pa.array([c for _, c in rows], pa.int32()))
    for shard in (tmp_path / "o" / "records").glob("*.parquet"):
        shard.unlink()
    pq.write_table(table, tmp_path / "o" / "records" / "planted.parquet")
    found = Audit(tmp_path / "o").patterns()
    assert [(f.label, f.cells) for f in found] == [(PROMPTS[1], [(0, 0)])]
    assert "fixed peaks" in Audit(tmp_path / "o").to_html()


# ----- the CLI -------------------------------------------------------------------------------------
def test_cli_audit_writes_records_and_report(clip, folder, tmp_path, capsys):
    model, processor = clip
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    out = tmp_path / "out"
    args = ["audit", str(folder), "--model", str(checkpoint), "--method", "rollout", "--no-checks", "--quiet",
            "--out", str(out)] + [x for t in PROMPTS for x in ("--text", t)]
    assert main(args) == 0
    assert "audited 12 images (0 errors)" in capsys.readouterr().out
    assert (out / "report.html").is_file() and len(Audit(out)) == 12


@pytest.mark.parametrize("args, message", [
    (["audit", "/no/such/folder", "--text", "a", "--text", "b"], "data folder not found"),
    (["audit", "{folder}", "--text", "a"], "texts"),
    (["audit", "{folder}", "--text", "a", "--text", "b", "--method", "nope"], "methods"),
    (["audit", "{folder}", "--text", "a", "--text", "b", "--model", "zoo:nope"], "unknown zoo model"),
])
def test_cli_audit_errors_are_one_line_and_exit_2(folder, args, message, tmp_path, capsys):
    args = [a.replace("{folder}", str(folder)) for a in args] + ["--out", str(tmp_path / "o"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "Loading weights" not in line]  # transformers' own bar
    assert len(lines) == 1 and lines[0].startswith("captum-vlm: error:") and message in lines[0]


def test_staged_ray_files_are_adopted_whole_and_without_duplicates(tmp_path):
    """What Ray's Parquet writer left behind: a complete file that repeats a recorded id, and a
    file cut short. The first is adopted without the repeat, the second dropped."""
    import pyarrow as pa

    from captum_vlm.audit import AuditConfig
    from captum_vlm.audit.worker import record_schema

    config = AuditConfig(texts=("a", "b"), methods=("grad-eclip",))
    schema = record_schema(config)
    store = RunStore(tmp_path / "o", config)
    store.write_shard(pa.Table.from_pylist([{"id": "a", "label": "x"}, {"id": "b", "label": "y"}], schema=schema))
    staged = store.new_staging()
    pq.write_table(pa.Table.from_pylist([{"id": "b", "label": "y"}, {"id": "c", "label": "z"}], schema=schema),
                   staged / "one.parquet")
    pq.write_table(pa.Table.from_pylist([{"id": "d", "label": "w"}], schema=schema), staged / "cut.parquet")
    whole = (staged / "cut.parquet").read_bytes()
    (staged / "cut.parquet").write_bytes(whole[: len(whole) - 12])  # no footer
    assert store.adopt_staged() == 1
    assert store.table().column("id").to_pylist() == ["a", "b", "c"]
    assert store.done_ids() == {"a", "b", "c"} and not store.staging.exists()


def test_a_hugging_face_dataset_gives_the_records_of_the_same_list(clip, tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    model, processor = clip
    images = [Image.open(write_image(tmp_path / f"{i}.png", i)).convert("RGB") for i in range(4)]
    names = ["a red circle", "a blue square"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    hf = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 1, 0]}, features=features)
    from_hf = cv.audit(model, processor, hf, PROMPTS, methods=["rollout"], checks=("deletion",), output=tmp_path / "h")
    from_list = cv.audit(model, processor, images, PROMPTS, methods=["rollout"], checks=("deletion",),
                         labels=[names[k] for k in (0, 1, 1, 0)], output=tmp_path / "l")
    assert from_hf.table().column("label").to_pylist() == ["a red circle", "a blue square", "a blue square",
                                                           "a red circle"]
    assert same_records(from_hf.table(), from_list.table())


def test_pattern_finder_flags_the_label_whose_maps_are_empty():
    from captum_vlm.audit import empty_map_labels

    rng = np.random.default_rng(2)
    names = [lab for lab in ("cat", "dog", "cow", "owl") for _ in range(20)]
    empty = [bool(rng.random() < (0.9 if lab == "owl" else 0.1)) for lab in names]
    found = empty_map_labels(names, empty, method="m")
    assert [f.label for f in found] == ["owl"] and found[0].kind == "empty maps"
    assert empty_map_labels(names, [bool(rng.random() < 0.1) for _ in names]) == []
