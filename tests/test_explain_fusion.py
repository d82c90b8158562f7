"""explain() on fusion models that generate or answer: captions token by token, and the model's
own answer for VQA (BLIP: one map per answer token; ViLT: the answer label's logit) and LLaVA (its
greedy continuation), checked against the method classes and hand-written scores."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from numerics import assert_close_scaled
from PIL import Image

from captum_vlm.attr import BimodalRelevancy, CrossAttentionGradCAM
from captum_vlm.explain import answer_questions, explain

QUESTIONS = ["what color is the circle", "how many objects are there"]


class TinyProcessor:
    """Processor stand-in for the tiny models: BLIP's image processor at 32 px and the zoo's
    word-level tokenizer (its ids fit the tiny vocabulary)."""

    def __init__(self):
        from transformers import BlipImageProcessor

        from captum_vlm.zoo.processing import build_tokenizer

        self.image_processor = BlipImageProcessor(size={"height": tm.IMAGE_SIZE, "width": tm.IMAGE_SIZE})
        self.tokenizer = build_tokenizer(24)
        assert len(self.tokenizer) <= tm.VOCAB

    def __call__(self, images, text, return_tensors="pt", padding=True):
        encoded = dict(self.tokenizer(text, return_tensors=return_tensors, padding=padding))
        encoded["pixel_values"] = self.image_processor(images, return_tensors=return_tensors)["pixel_values"]
        return encoded


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("method", ["cross-attention-gradcam", "bimodal-relevancy"])
def test_blip_vqa_explains_the_generated_answer(image, method):
    model, processor = tm.blip_vqa(), TinyProcessor()
    result = explain(model, processor, image, QUESTIONS, methods=[method])
    inputs = processor(images=[image] * 2, text=QUESTIONS)
    pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        generated = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=10)
    answers = answer_questions(model, processor.tokenizer, inputs)
    assert torch.equal(answers.answer_ids, generated)
    # by hand: the answer runs up to and including its first end token
    sep = model.config.text_config.sep_token_id
    for row, row_mask in zip(generated.tolist(), answers.answer_mask.tolist()):
        last = row.index(sep) if sep in row else len(row) - 1
        assert row_mask == [1] * (last + 1) + [0] * (len(row) - last - 1)
    args = (ids, mask, answers.answer_ids, answers.answer_mask)
    explainer = {"cross-attention-gradcam": CrossAttentionGradCAM, "bimodal-relevancy": BimodalRelevancy}[method](model)
    whole = explainer.attribute(pixels, additional_forward_args=args, return_grid=True).numpy()
    per_token = explainer.attribute_tokens(pixels, additional_forward_args=args, return_grid=True).numpy()
    for k, question in enumerate(QUESTIONS):
        title = f"{question} → {answers.texts[k]}"
        record = next(r for r in result.records if r.target == title)
        assert_close_scaled(record.grid, whole[k])
        scored = answers.answer_mask[k].nonzero().flatten().tolist()[1:]  # the start token is not predicted
        assert record.tokens == [answers.tokens[k][j] for j in scored]
        token_records = [r for r in result.records if r.target.startswith(f"{title} · ")]
        with_map = [j for j in scored if np.abs(per_token[k, j]).sum() > 0]
        assert len(with_map) > 1 and len(token_records) == len(with_map)
        for j, token in zip(with_map, token_records):
            assert token.target == f"{title} · {answers.tokens[k][j]}"
            assert_close_scaled(token.grid, per_token[k, j])
    # the score: probability of the answer tokens, teacher-forced, by hand from the decoder's logits
    with torch.no_grad():
        image_states = model.vision_model(pixel_values=pixels).last_hidden_state
        question = model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_states).last_hidden_state
        tokens = generated.clone()
        tokens[:, 0] = model.config.text_config.bos_token_id
        logits = model.text_decoder(input_ids=tokens, attention_mask=answers.answer_mask,
                                    encoder_hidden_states=question, encoder_attention_mask=mask).logits
    log_p = F.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0] * answers.answer_mask[:, 1:]
    expected = {f"{q} → {a}": p for q, a, p in zip(QUESTIONS, answers.texts, log_p.sum(1).exp().tolist())}
    assert result.score_kind == "answer probability"
    assert result.scores.keys() == expected.keys()
    np.testing.assert_allclose(list(result.scores.values()), list(expected.values()), rtol=1e-5)


def test_vilt_vqa_explains_the_top_answer_label(image):
    model, processor = tm.vilt_vqa(), TinyProcessor()
    result = explain(model, processor, image, QUESTIONS, methods=["cross-attention-gradcam"], target=1)
    inputs = processor(images=[image] * 2, text=QUESTIONS)
    pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    label = int(logits[1].argmax())
    args = (ids[1:], mask[1:])
    whole = CrossAttentionGradCAM(model).attribute(pixels[1:], target=label, additional_forward_args=args,
                                                   return_grid=True).numpy()
    per_token = CrossAttentionGradCAM(model).attribute_tokens(pixels[1:], target=label, additional_forward_args=args,
                                                              return_grid=True).numpy()
    title = f"{QUESTIONS[1]} → a{label}"
    record = next(r for r in result.records if r.target == title)
    assert_close_scaled(record.grid, whole[0])
    assert record.tokens[1:-1] == QUESTIONS[1].split()
    word = next(r for r in result.records if r.target == f"{title} · objects")
    assert_close_scaled(word.grid, per_token[0, QUESTIONS[1].split().index("objects") + 1])
    assert result.scores == pytest.approx({f"{q} → a{int(i)}": float(torch.sigmoid(row.max()))
                                           for q, i, row in zip(QUESTIONS, logits.argmax(-1), logits)})


def test_zoo_vqa_answer_ends_at_its_end_token():
    """On the trained zoo model: the answer is right, and only its word and end token are scored."""
    from captum_vlm import zoo
    from captum_vlm.zoo.scenes import make_scene

    model, processor = zoo.load("shapes-blip-vqa")
    scene = make_scene(7, labels=[("red", "circle"), ("blue", "square")])
    questions = ["what color is the circle?", "how many objects are there?"]
    result = explain(model, processor, scene.pil(), questions, methods=["bimodal-relevancy"])
    assert list(result.scores) == ["what color is the circle? → red", "how many objects are there? → two"]
    assert all(0.5 < p <= 1 for p in result.scores.values())
    whole = [r for r in result.records if r.target in result.scores]
    assert [r.tokens for r in whole] == [["red", "[EOS]"], ["two", "[EOS]"]]
    red = next(r for r in result.records if r.target == "what color is the circle? → red · red")
    assert red.details["target"] == "token 1 of answer 'red' to text 0"


@pytest.fixture(scope="module")
def llava_and_processor():
    from transformers import CLIPImageProcessor, LlavaProcessor

    from captum_vlm.zoo.processing import build_tokenizer

    tokenizer = build_tokenizer(64)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(size={"shortest_edge": tm.IMAGE_SIZE},
                                         crop_size={"height": tm.IMAGE_SIZE, "width": tm.IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=tm.PATCH,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1)
    return tm.llava(image_token_id=tokenizer.convert_tokens_to_ids("<image>")), processor


@pytest.mark.parametrize("method", ["cross-attention-gradcam", "bimodal-relevancy"])
def test_llava_explains_each_generated_token(image, llava_and_processor, method):
    model, processor = llava_and_processor
    prompts = ["<image> what color is the circle", "<image> how many"]  # padded together by explain()
    result = explain(model, processor, image, prompts, methods=[method], max_new_tokens=3)
    explainer = {"cross-attention-gradcam": CrossAttentionGradCAM, "bimodal-relevancy": BimodalRelevancy}[method](model)
    for k, prompt in enumerate(prompts):
        inputs = processor(images=image, text=prompt, return_tensors="pt")  # this prompt alone
        with torch.no_grad():
            sequence = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            logits = model(input_ids=sequence, pixel_values=inputs["pixel_values"]).logits
        start = inputs["input_ids"].shape[1]
        generated = list(range(start, sequence.shape[1]))
        assert len(generated) == 3
        log_p = F.log_softmax(logits[0, start - 1 : -1], -1).gather(-1, sequence[0, start:, None]).sum()
        answer = processor.tokenizer.decode(sequence[0, start:], skip_special_tokens=True).strip()
        title = f"{prompt} → {answer}"
        assert result.scores[title] == pytest.approx(float(log_p.exp()), rel=1e-4)
        args = (sequence, torch.ones_like(sequence))
        whole = explainer.attribute(inputs["pixel_values"], target=generated, additional_forward_args=args,
                                    return_grid=True)[0]
        per_token = explainer.attribute_tokens(inputs["pixel_values"], target=generated, additional_forward_args=args,
                                               return_grid=True)[0]
        record = next(r for r in result.records if r.target == title)
        assert_close_scaled(record.grid, whole)
        assert record.details["target"] == f"answer '{answer}' to text {k}"
        assert len(record.tokens) == 3
        token_records = [r for r in result.records if r.target.startswith(f"{title} · ")]
        with_map = [t for t in generated if per_token[t].abs().sum() > 0]
        assert len(with_map) >= 2 and len(token_records) == len(with_map)
        for t, token in zip(with_map, token_records):
            assert token.details["target"] == f"token {t} of answer '{answer}' to text {k}"
            assert_close_scaled(token.grid, per_token[t])


def test_blip_captioning_explains_each_caption_token(image):
    model, processor = tm.blip_caption(), TinyProcessor()
    captions = ["a red circle", "a blue square and a green triangle"]
    result = explain(model, processor, image, captions, methods=["bimodal-relevancy"])
    inputs = processor(images=[image] * 2, text=captions)
    pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    method = BimodalRelevancy(model)
    whole = method.attribute(pixels, additional_forward_args=(ids, mask), return_grid=True)
    per_token = method.attribute_tokens(pixels, additional_forward_args=(ids, mask), return_grid=True)
    tokens = ids.clone()
    tokens[:, 0] = model.config.text_config.bos_token_id
    with torch.no_grad():
        logits = model(pixel_values=pixels, input_ids=tokens, attention_mask=mask).logits
    log_p = (F.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0] * mask[:, 1:]).sum(1)
    assert result.score_kind == "log-probability"
    np.testing.assert_allclose(list(result.scores.values()), log_p.numpy(), rtol=1e-5)
    for k, caption in enumerate(captions):
        record = next(r for r in result.records if r.target == caption)
        assert_close_scaled(record.grid, whole[k])
        assert record.details["target"] == f"caption log-probability of text {k}"
        assert record.tokens[1:-1] == caption.split()
        word = next(r for r in result.records if r.target == f"{caption} · {caption.split()[1]}")
        assert_close_scaled(word.grid, per_token[k, 2])
