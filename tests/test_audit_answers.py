"""cv.audit on a model that answers questions (a tiny random BlipForQuestionAnswering): the
records against an independent computation, and the not-grounded rates and findings of the
question → answer groups against a hand count."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny_models as tm
import torch
from model_state import assert_unchanged, snapshot
from scipy.stats import fisher_exact

import captum_vlm as cv
from captum_vlm.audit import Audit, AuditConfig, group_of
from captum_vlm.audit.store import RunStore
from captum_vlm.audit.worker import AuditWorker, record_schema
from captum_vlm.zoo import scenes
from captum_vlm.zoo.train_blip import build_blip_processor

QUESTION = "what color is the circle?"


@pytest.fixture(scope="module")
def vqa():
    return tm.blip_vqa(), build_blip_processor(tm.IMAGE_SIZE)


def _log_prob_by_hand(model, pixels, ids, mask, answer, answer_mask):
    """log p(answer | image, question): BLIP's vision tower, question encoder and answer decoder
    written out; the answer's first token is the decoder start, every later unmasked token scored."""
    image = model.vision_model(pixel_values=pixels).last_hidden_state
    question = model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image).last_hidden_state
    tokens = answer.clone()
    tokens[:, 0] = model.config.text_config.bos_token_id
    logits = model.text_decoder(input_ids=tokens, attention_mask=answer_mask, encoder_hidden_states=question,
                                encoder_attention_mask=mask).logits
    log_p = logits[:, :-1].log_softmax(-1).gather(2, tokens[:, 1:, None])[..., 0]
    return float((log_p * answer_mask[:, 1:]).sum())


def test_answer_records_equal_an_independent_computation(vqa, tmp_path):
    model, processor = vqa
    picked = [scenes.make_scene(seed, size=tm.IMAGE_SIZE, n_objects=1) for seed in range(3)]
    items = [{"image": s.pil(), "label": "red", "mask": s.objects[0].mask} for s in picked]
    items[1]["question"] = "how many objects?"  # its own question; the others are asked texts[0]
    before = snapshot(model)
    result = cv.audit(model, processor, items, [QUESTION], methods=["bimodal-relevancy"], keep_maps=True,
                      deletion_steps=4, output=tmp_path / "a")
    assert_unchanged(model, before)
    occlusion = cv.CausalOcclusion(model)
    for i, (scene, record) in enumerate(zip(picked, result.records())):
        question = items[i].get("question", QUESTION)
        inputs = processor(images=scene.pil(), text=[question], return_tensors="pt")
        pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
        with torch.no_grad():
            answer = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=10,
                                    do_sample=False)
        sep = model.config.text_config.sep_token_id
        answer_mask = ((answer == sep).long().cumsum(1) - (answer == sep).long() == 0).long()  # up to the first SEP
        text = processor.tokenizer.decode(answer[0][answer_mask[0].bool()], skip_special_tokens=True).strip()
        assert record["error"] is None and record["question"] == question and record["prediction"] == text
        assert record["explained"] == f"{question} → {text}" and record["correct"] == (text == "red")
        with torch.no_grad():
            log_p = _log_prob_by_hand(model, pixels, ids, mask, answer, answer_mask)
        assert record["confidence"] == pytest.approx(math.exp(log_p), rel=1e-4)
        grid = np.reshape(record["bimodal-relevancy.map"], (4, 4))
        # deletion by hand: zero the top patches (row-major ties), exp(log p) of the same answer
        ranking = sorted(range(16), key=lambda j: (-float(np.float32(grid.flat[j])), j))
        curve = []
        for k in range(5):
            image = pixels.clone()
            for j in ranking[: k * 4]:
                r, c = divmod(j, 4)
                image[:, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = 0
            with torch.no_grad():
                curve.append(math.exp(_log_prob_by_hand(model, image, ids, mask, answer, answer_mask)))
        auc = sum((a + b) / 2 for a, b in zip(curve[:-1], curve[1:])) / 4
        assert record["bimodal-relevancy.deletion_auc"] == pytest.approx(auc, rel=1e-3, abs=1e-12)
        # the grounding tests: the map's top patches, and the object's own (mask share per patch)
        args = (ids, mask, answer, answer_mask)
        seed = __import__("zlib").crc32(record["id"].encode()) % 2**31
        cells = torch.as_tensor(scene.objects[0].mask.reshape(4, 8, 4, 8).mean(axis=(1, 3)))[None]
        for heat, key in ((torch.as_tensor(grid)[None], "bimodal-relevancy.grounded"), (cells, "object_grounded")):
            test = occlusion.grounding_test(pixels, heat, additional_forward_args=args, fraction=0.2, seed=seed)
            assert record[key] == bool(test.grounded[0])
        assert record["object_grounding_drop"] == pytest.approx(float(test.drop_relevant[0]), rel=1e-4, abs=1e-9)


def test_answer_models_refuse_bad_input_before_any_work(vqa, tmp_path):
    model, processor = vqa
    image = scenes.make_scene(0, size=tm.IMAGE_SIZE).pil()
    with pytest.raises(ValueError, match="texts: no question"):
        cv.audit(model, processor, [image], [], methods=["bimodal-relevancy"], output=tmp_path / "o")
    with pytest.raises(ValueError, match="texts"):
        cv.audit(model, processor, [image], ["q one?", "q two?"], methods=["bimodal-relevancy"], output=tmp_path / "o")
    with pytest.raises(ValueError, match="explain"):
        cv.audit(model, processor, [image], [QUESTION], explain="label", methods=["bimodal-relevancy"],
                 output=tmp_path / "o")
    with pytest.raises(ValueError, match="methods"):
        cv.audit(model, processor, [image], [QUESTION], methods=["grad-eclip"], output=tmp_path / "o")
    with pytest.raises(ValueError, match="model: .*BlipForImageTextRetrieval computes 'match'"):
        cv.audit(tm.blip_itm(), processor, [image], [QUESTION], output=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def vilt():
    return cv.zoo.load("shapes-vilt")


def _vilt_scores(model, pixels, ids, mask):
    """Sigmoid of ViLT's answer logits, straight from the model ``[B, num_answers]``."""
    with torch.no_grad():
        return torch.sigmoid(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits)


def test_label_answer_records_equal_an_independent_computation(vilt, tmp_path):
    """ViLT VQA (shapes-vilt): the answer is the top label of config.id2label; the records'
    prediction, confidences and deletion AUC from the model's own logits and a hand deletion."""
    model, processor = vilt
    picked = [scenes.make_scene(seed, size=64, n_objects=1) for seed in range(3)]
    questions = [f"what color is the {s.labels[0][1]}?" for s in picked]
    labels = [picked[0].labels[0][0], "RED" if picked[1].labels[0][0] != "red" else "blue", "yes"]
    items = [{"image": s.pil(), "label": lab, "question": q, "mask": s.objects[0].mask}
             for s, lab, q in zip(picked, labels, questions)]
    before = snapshot(model)
    result = cv.audit(model, processor, items, [], methods=["bimodal-relevancy"], keep_maps=True,
                      deletion_steps=4, output=tmp_path / "a")
    assert_unchanged(model, before)
    occlusion = cv.CausalOcclusion(model)
    records = result.records()
    assert len(records) == 3
    for scene, item, record in zip(picked, items, records):
        inputs = processor(images=scene.pil(), text=[item["question"]], return_tensors="pt")
        pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
        scores = _vilt_scores(model, pixels, ids, mask)[0]
        top, label_id = int(scores.argmax()), model.config.label2id[item["label"].lower()]
        assert record["error"] is None and record["prediction"] == model.config.id2label[top]
        assert record["prediction_index"] == top and record["label_index"] == label_id
        assert record["correct"] == (top == label_id)
        assert record["explained"] == f"{item['question']} → {model.config.id2label[top]}"
        assert record["confidence"] == pytest.approx(float(scores[top]), rel=1e-4)
        assert record["label_confidence"] == pytest.approx(float(scores[label_id]), rel=1e-4, abs=1e-6)
        grid = np.reshape(record["bimodal-relevancy.map"], (8, 8))
        ranking = sorted(range(64), key=lambda j: (-float(np.float32(grid.flat[j])), j))
        curve = []
        for k in range(5):  # 4 steps of 16 patches: zero the map's top patches, the answer's probability
            image = pixels.clone()
            for j in ranking[: k * 16]:
                r, c = divmod(j, 8)
                image[:, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = 0
            curve.append(float(_vilt_scores(model, image, ids, mask)[0, top]))
        auc = sum((a + b) / 2 for a, b in zip(curve[:-1], curve[1:])) / 4
        assert record["bimodal-relevancy.deletion_auc"] == pytest.approx(auc, rel=1e-3, abs=1e-9)
        seed = __import__("zlib").crc32(record["id"].encode()) % 2**31
        test = occlusion.grounding_test(pixels, torch.as_tensor(grid)[None], target=top,
                                        additional_forward_args=(ids, mask), fraction=0.2, seed=seed)
        assert record["bimodal-relevancy.grounded"] == bool(test.grounded[0])
        assert record["bimodal-relevancy.grounding_drop"] == pytest.approx(float(test.drop_relevant[0]), rel=1e-3)
    assert [r["correct"] for r in records][1] is False  # a wrong label: its own, lower confidence
    assert records[1]["label_confidence"] < records[1]["confidence"]


def test_label_answers_not_in_the_vocabulary_are_refused_by_name(vilt, tmp_path):
    model, processor = vilt
    image = scenes.make_scene(0, size=64).pil()
    with pytest.raises(ValueError, match=r"labels: \['purple'\] are not answers of ViltForQuestionAnswering"):
        cv.audit(model, processor, [image, image], [QUESTION], labels=["red", "purple"],
                 methods=["bimodal-relevancy"], output=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    # a row that reaches a worker with an unknown label (a ray.data.Dataset is not read up front): an error record
    worker = AuditWorker(model, processor, AuditConfig(texts=(QUESTION,), methods=("bimodal-relevancy",), checks=()))
    record = worker([{"id": "x", "image": np.asarray(image), "label": "purple"}]).to_pylist()[0]
    assert "label 'purple' is not an answer of this model" in record["error"]


def test_not_grounded_rates_and_findings_equal_a_hand_count(tmp_path):
    """Planted records: 12 wrong 'blue' answers (10 not grounded), 30 'red' (3), 30 'green' (4);
    the object verdicts planted the other way round for 'red'."""
    config = AuditConfig(texts=(), methods=("m",))
    store = RunStore(tmp_path / "o", config)
    plan = [("blue", "red", 12, 10, 11), ("red", "red", 30, 3, 2), ("green", "green", 30, 4, 3)]
    rows, n = [], 0
    for answer, label, count, not_grounded, object_not in plan:
        for i in range(count):
            rows.append({"id": f"{n:03d}", "label": label, "question": "q?", "prediction": answer,
                         "explained": f"q? → {answer}", "correct": answer == label, "confidence": 0.5,
                         "m.grounded": i >= not_grounded, "object_grounded": i >= object_not,
                         "m.peak_row": i % 4, "m.peak_col": i // 4 % 4})
            n += 1
    store.write_shard(pa.Table.from_pylist(rows, schema=record_schema(config)))
    result = Audit(tmp_path / "o")
    assert sorted({group_of(r) for r in result.records()}) == ["q? → blue [wrong]", "q? → green", "q? → red"]
    table = {r["label"]: r for r in result.label_table("m")}
    assert table["q? → blue [wrong]"]["not_grounded"] == pytest.approx(10 / 12)
    assert table["q? → red"]["not_grounded"] == pytest.approx(3 / 30)
    assert table["q? → green"]["object_not_grounded"] == pytest.approx(3 / 30)
    assert table["q? → blue [wrong]"]["accuracy"] == 0 and table["q? → red"]["accuracy"] == 1
    found = [f for f in result.patterns() if f.kind == "not grounded"]
    assert [(f.label, f.method) for f in found] == [("q? → blue [wrong]", "m"), ("q? → blue [wrong]", "object mask")]
    _, p = fisher_exact([[10, 2], [7, 53]], alternative="greater")
    assert found[0].p_value == pytest.approx(3 * p) and found[0].rate_rest == pytest.approx(7 / 60)
    _, p = fisher_exact([[11, 1], [5, 55]], alternative="greater")
    assert found[1].p_value == pytest.approx(3 * p) and found[1].rate == pytest.approx(11 / 12)
    assert "q? → blue [wrong]" in result.to_html()
    pq.read_table(store.shard_paths()[0])  # a whole shard


# ----- the CLI on a VQA model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def vqa_checkpoint(vqa, tmp_path_factory):
    model, processor = vqa
    checkpoint = tmp_path_factory.mktemp("vqa") / "ckpt"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    return checkpoint


def _vqa_folder(folder, questions):
    """One-object scenes, their masks and a labels.csv with a question column (empty: none)."""
    folder.mkdir(parents=True)
    lines = ["file,label,mask,question"]
    for i, question in enumerate(questions):
        scene = scenes.make_scene(i, size=tm.IMAGE_SIZE, n_objects=1)
        scene.pil().save(folder / f"img-{i}.png")
        np.save(folder / f"mask-{i}.npy", scene.objects[0].mask)
        lines.append(f"img-{i}.png,{scene.labels[0][0]},mask-{i}.npy,{question}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_cli_vqa_records_equal_the_python_api(vqa_checkpoint, tmp_path, capsys):
    from audit_data import same_records

    from captum_vlm.cli import main

    folder = _vqa_folder(tmp_path / "data", ["how many objects?", "", "what shape is it?"])
    out = tmp_path / "cli"
    args = ["audit", str(folder), "--model", str(vqa_checkpoint), "--question", QUESTION, "--check", "grounding",
            "--keep-maps", "--quiet", "--out", str(out)]
    assert main(args) == 0
    assert "audited 3 images (0 errors)" in capsys.readouterr().out
    model, processor = cv.zoo.load(vqa_checkpoint)
    api = cv.audit(model, processor, folder, [QUESTION], methods=["bimodal-relevancy"], checks=("grounding",),
                   keep_maps=True, output=tmp_path / "api", model_name=str(vqa_checkpoint))
    cli = Audit(out)
    assert cli.config == api.config
    assert same_records(cli.table().drop_columns(["path"]), api.table().drop_columns(["path"]))
    assert [r["question"] for r in cli.records()] == ["how many objects?", QUESTION, "what shape is it?"]
    assert (out / "report.html").is_file()
    # every row with its own question: no --question needed, the same records for those rows
    own = _vqa_folder(tmp_path / "own", ["how many objects?", "what shape is it?"])
    assert main(["audit", str(own), "--model", str(vqa_checkpoint), "--no-checks", "--quiet",
                 "--out", str(tmp_path / "own-out")]) == 0
    api = cv.audit(model, processor, own, [], methods=["bimodal-relevancy"], checks=(), output=tmp_path / "own-api",
                   model_name=str(vqa_checkpoint))
    assert same_records(Audit(tmp_path / "own-out").table().drop_columns(["path"]), api.table().drop_columns(["path"]))


@pytest.mark.parametrize("extra, message", [
    (["--text", "a", "--text", "b"], "--text: BlipForQuestionAnswering answers questions"),
    ([], "--question: no question to ask img-1.png"),
    (["--question", "q?", "--text", "a"], "not both"),
    (["--question", "q?", "--method", "grad-eclip"], "methods"),
])
def test_cli_vqa_errors_are_one_line_and_exit_2(vqa_checkpoint, tmp_path, capsys, extra, message):
    from captum_vlm.cli import main

    folder = _vqa_folder(tmp_path / "data", ["how many objects?", ""])
    assert main(["audit", str(folder), "--model", str(vqa_checkpoint), "--quiet", "--out", str(tmp_path / "o"),
                 *extra]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("captum-vlm: error:") and message in lines[0]
    assert not (tmp_path / "o").exists()


def test_cli_two_tower_model_refuses_a_question(tmp_path, capsys):
    from captum_vlm.cli import main

    folder = _vqa_folder(tmp_path / "data", ["q?"])
    assert main(["audit", str(folder), "--question", "q?", "--quiet", "--out", str(tmp_path / "o")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "Loading weights" not in line]
    assert len(lines) == 1 and "--question: CLIPModel does not answer questions" in lines[0]


def test_cli_label_answers_not_in_the_vocabulary_exit_2(tmp_path, capsys):
    from captum_vlm.cli import main

    folder = _vqa_folder(tmp_path / "data", ["what color is it?"])
    (folder / "labels.csv").write_text("file,label\nimg-0.png,purple\n", encoding="utf-8")
    assert main(["audit", str(folder), "--model", "zoo:shapes-vilt", "--question", "q?", "--quiet",
                 "--out", str(tmp_path / "o")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "Loading weights" not in line]
    assert len(lines) == 1 and "labels: ['purple'] are not answers of ViltForQuestionAnswering" in lines[0]
