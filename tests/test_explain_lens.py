"""explain(..., logit_lens=True): the lens of exactly the tokens the maps explain; its last layer
is the model's own score of them; a section of the report."""

import numpy as np
import pytest
import tiny_models as tm
from html_tables import read_tables, table
from model_state import assert_unchanged, snapshot
from test_explain_fusion import QUESTIONS, TinyProcessor, image, llava_and_processor  # noqa: F401

from captum_vlm.explain import explain

METHOD = ["cross-attention-gradcam"]


def _check_report(result):
    parsed = read_tables(result.to_html())
    offset = parsed.sections.index("logit-lens")
    assert parsed.sections[offset:] == ["logit-lens"] * len(result.lenses)
    for i, lens in enumerate(result.lenses):
        np.testing.assert_array_equal(table(parsed, offset + i, "produced-rank"), lens.produced_ranks.numpy())
        np.testing.assert_array_equal(table(parsed, offset + i, "top-1"), lens.top_probs[:, :, 0].numpy())
    assert [m["text"] for m in result.to_dict()["logit_lens"]] == [lens.prompt for lens in result.lenses]


def test_vqa_lens_is_the_explained_answer(image):  # noqa: F811
    model, processor = tm.blip_vqa(), TinyProcessor()
    before = snapshot(model)
    result = explain(model, processor, image, QUESTIONS, methods=METHOD, evidence=False, logit_lens=True)
    assert_unchanged(model, before)
    assert [lens.prompt for lens in result.lenses] == QUESTIONS
    for lens, (title, probability) in zip(result.lenses, result.scores.items()):
        assert title.startswith(lens.prompt)
        # the last layer's probabilities of the produced tokens multiply to the explained answer's
        assert float(lens.produced_probs[-1].double().prod()) == pytest.approx(probability, rel=1e-4)
        assert (lens.produced_ranks[-1] == 1).all()  # greedy answers: top at the last layer
    assert result.logit_lens(1) is result.lenses[1] and result.logit_lens(QUESTIONS[0]) is result.lenses[0]
    _check_report(result)


def test_caption_lens_scores_the_caption(image):  # noqa: F811
    model, processor = tm.blip_caption(), TinyProcessor()
    captions = ["a red circle", 'a blue square <script>alert("x")</script>']
    result = explain(model, processor, image, captions, methods=METHOD, evidence=False, logit_lens=True, target=[1])
    assert len(result.lenses) == 1 and result.lenses[0].prompt == captions[1]
    lens = result.lenses[0]
    ids = processor.tokenizer(captions[1])["input_ids"]
    assert lens.produced_ids.tolist() == ids[1:]
    assert float(lens.produced_probs[-1].double().log().sum()) == pytest.approx(result.scores[captions[1]], rel=1e-4)
    page = result.to_html()
    assert '<script>alert("x")</script>' not in page and "Logit lens: a blue square &lt;script&gt;" in page
    _check_report(result)


def test_llava_lens_is_the_generated_continuation(image, llava_and_processor):  # noqa: F811
    model, processor = llava_and_processor
    prompts = ["<image> what color is the circle", "<image> how many"]
    result = explain(model, processor, image, prompts, methods=METHOD, evidence=False, logit_lens=True,
                     max_new_tokens=3)
    for lens, probability in zip(result.lenses, result.scores.values()):
        assert len(lens.produced_ids) == 3 and lens.image_grid == (4, 4)
        assert float(lens.produced_probs[-1].double().prod()) == pytest.approx(probability, rel=1e-4)
    _check_report(result)


def test_without_a_decoder_it_is_refused_before_any_work(image):  # noqa: F811
    with pytest.raises(TypeError, match="logit_lens: .*Classes with a decoder: .*BlipForQuestionAnswering"):
        explain(tm.clip(), TinyProcessor(), image, ["a", "b"], logit_lens=True)
    result = explain(tm.blip_vqa(), TinyProcessor(), image, QUESTIONS[:1], methods=METHOD, evidence=False)
    assert result.lenses == [] and "logit-lens" not in result.to_html()
    with pytest.raises(ValueError, match="logit_lens=True"):
        result.logit_lens()
