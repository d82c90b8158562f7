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
from captum_vlm.audit.worker import record_schema
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
    with pytest.raises(ValueError, match="model: .*ViltForQuestionAnswering computes 'answer_label'"):
        cv.audit(tm.vilt_vqa(), processor, [image], [QUESTION], output=tmp_path / "o")  # answers by label: not yet
    assert not (tmp_path / "o").exists()


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
