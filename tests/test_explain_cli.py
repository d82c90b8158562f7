"""cv.explain, the Explanation object and the captum-vlm command on a small saved CLIP."""

import json

import numpy as np
import pytest
import tiny_models as tm
import torch
from numerics import assert_close_scaled
from PIL import Image

from captum_vlm.attr import GradECLIP
from captum_vlm.cli import main
from captum_vlm.explain import METHODS, Explanation, explain, method_names, processor_crop_box
from captum_vlm.zoo.processing import build_clip_processor

TEXTS = ["a red circle", "a blue square", "<b>bold</b>"]


@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory):
    """A tiny CLIPModel and the zoo's CLIPProcessor at 32 px, saved like a hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    model = tm.clip()
    processor = build_clip_processor(image_size=tm.IMAGE_SIZE, max_length=24)
    assert len(processor.tokenizer) <= tm.VOCAB
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_explain_maps_equal_the_method(saved_clip, image_file):
    _, model, processor = saved_clip
    image = Image.open(image_file)
    result = explain(model, processor, image, TEXTS, methods=["grad-eclip"], target=[0, 2])
    assert isinstance(result, Explanation)
    assert [r.target for r in result.records] == ["a red circle", "<b>bold</b>"]
    inputs = processor(images=image, text=TEXTS, return_tensors="pt", padding=True)
    for k, record in zip([0, 2], result.records):
        expected = GradECLIP(model).attribute(
            inputs["pixel_values"], target=k, additional_forward_args=(inputs["input_ids"], inputs["attention_mask"]),
            return_grid=True,
        )[0]
        np.testing.assert_allclose(record.grid, expected.numpy(), rtol=1e-5, atol=1e-7)
        assert record.method == "grad-eclip" and "layers" in record.details
        text = GradECLIP(model).attribute_text(  # the prompt's tokens coloured by the text-side map
            inputs["pixel_values"], target=k, additional_forward_args=(inputs["input_ids"], inputs["attention_mask"])
        )[0]
        attended = inputs["attention_mask"][k].bool()
        assert record.tokens == processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][k][attended].tolist())
        if k == 0 or text.abs().sum() > 0:  # a map with nothing positive is all zero
            assert_close_scaled(record.token_scores, text[attended].numpy())
            assert record.token_scores.sum() == pytest.approx(1, abs=1e-5)
        else:
            assert not record.token_scores.any()
    with torch.no_grad():
        probs = model(**inputs).logits_per_image.softmax(-1)[0]
    assert list(result.scores) == TEXTS
    np.testing.assert_allclose(list(result.scores.values()), probs.numpy(), rtol=1e-5)


def test_explanation_draws_saves_and_reports(saved_clip, image_file, tmp_path):
    import matplotlib.pyplot as plt

    _, model, processor = saved_clip
    result = explain(model, processor, str(image_file), TEXTS, methods=["grad-eclip"])
    fig = result.plot()
    assert len([ax for ax in fig.axes if ax.images]) == len(TEXTS)
    plt.close(fig)
    written = result.save(tmp_path / "out")
    assert len(written) == len(TEXTS) + 1
    data = json.loads((tmp_path / "out" / "explanation.json").read_text())
    np.testing.assert_allclose(np.array(data["maps"][1]["grid"]), result.records[1].grid)
    page = result.to_html(tmp_path / "r.html")
    assert "<b>bold</b>" not in page and (tmp_path / "r.html").read_text() == page
    assert result._repr_html_().startswith("<div class=\"cv-report\"")
    with pytest.raises(ValueError, match="method: 'rollout' is not in this explanation"):
        result.plot("rollout")


def test_explain_bad_input(saved_clip):
    _, model, processor = saved_clip
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="methods: unknown \\['nope'\\]"):
        explain(model, processor, image, TEXTS, methods=["nope"])
    with pytest.raises(ValueError, match="texts: expected a non-empty list"):
        explain(model, processor, image, [])
    with pytest.raises(ValueError, match="target: \\[5\\] out of range for 3 texts"):
        explain(model, processor, image, TEXTS, target=5)
    with pytest.raises(TypeError, match="image: expected a PIL image"):
        explain(model, processor, 3, TEXTS)
    with pytest.raises(ValueError, match="max_new_tokens: expected an int >= 1, got 0"):
        explain(model, processor, image, TEXTS, max_new_tokens=0)
    fusion = [m for m in METHODS if "clip" not in METHODS[m].families]
    if fusion:
        with pytest.raises(ValueError, match="do not support CLIPModel"):
            explain(model, processor, image, TEXTS, methods=fusion[:1])


def test_crop_box_of_a_centre_cropping_processor(saved_clip):
    _, _, processor = saved_clip
    assert processor_crop_box(processor, (100, 50)) is None  # the zoo processor keeps the whole image
    from transformers import CLIPImageProcessor

    cropping = CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 20, "width": 20})
    assert processor_crop_box(cropping, (100, 50)) == (25.0, 0.0, 75.0, 50.0)


def test_cli_explain_writes_report_and_pngs(saved_clip, image_file, tmp_path, capsys):
    folder, _, _ = saved_clip
    out = tmp_path / "report.html"
    code = main(["explain", str(image_file), "--text", "a red circle", "--text", "a blue square",
                 "--model", str(folder), "--method", "grad-eclip", "--out", str(out), "--png",
                 str(tmp_path / "png"), "--quiet"])
    assert code == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert len(list((tmp_path / "png").glob("*.png"))) == 2
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["explain", "missing.png", "--text", "a"], "image not found: missing.png"),
    (["explain", "{bad}", "--text", "a"], "cannot read image"),
    (["explain", "{img}", "--text", "a", "--method", "nope"], "unknown method nope"),
    (["explain", "{img}", "--text", "a", "--model", "zoo:nope"], "unknown zoo model 'nope'"),
    (["explain", "{img}", "--text", "a", "--model", "/no/such/dir"], "neither zoo:NAME nor a local"),
])
def test_cli_errors_are_one_line_and_exit_2(args, message, image_file, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    args = [a.replace("{img}", str(image_file)).replace("{bad}", str(bad)) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and "Traceback" not in err


def test_cli_help_lists_methods(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in method_names():
        assert name in out


def test_explain_ig_and_occlusion_equal_their_classes(saved_clip, image_file):
    from captum_vlm.attr import CausalOcclusion, TokenIntegratedGradients

    _, model, processor = saved_clip
    image = Image.open(image_file)
    result = explain(model, processor, image, TEXTS[:2], methods=["integrated-gradients", "occlusion"], target=1)
    inputs = processor(images=image, text=TEXTS[:2], return_tensors="pt", padding=True)
    args = (inputs["input_ids"], inputs["attention_mask"])
    ig = TokenIntegratedGradients(model).attribute(inputs["pixel_values"], target=1, additional_forward_args=args,
                                                   n_steps=32, return_grid=True)[0]
    occ = CausalOcclusion(model).attribute(inputs["pixel_values"], target=1, additional_forward_args=args,
                                           return_grid=True)[0]
    assert [r.method for r in result.records] == ["integrated-gradients", "occlusion"]
    np.testing.assert_allclose(result.records[0].grid, ig.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.records[1].grid, occ.numpy(), rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def blip_itm_and_processor():
    from transformers import BlipImageProcessor, BlipProcessor

    from captum_vlm.zoo.processing import build_tokenizer

    image_processor = BlipImageProcessor(size={"height": tm.IMAGE_SIZE, "width": tm.IMAGE_SIZE})
    return tm.blip_itm(), BlipProcessor(image_processor=image_processor, tokenizer=build_tokenizer(24))


def test_explain_fusion_model_maps_per_caption_and_word(blip_itm_and_processor, image_file):
    from captum_vlm.attr import CrossAttentionGradCAM
    from captum_vlm.targets import MatchLogit

    model, processor = blip_itm_and_processor
    image = Image.open(image_file)
    texts = ["a red circle", "a blue square and a green triangle"]
    result = explain(model, processor, image, texts, methods=["cross-attention-gradcam"])
    inputs = processor(images=[image] * 2, text=texts, return_tensors="pt", padding=True)
    args = (inputs["input_ids"], inputs["attention_mask"])
    whole = CrossAttentionGradCAM(model).attribute(inputs["pixel_values"], additional_forward_args=args,
                                                   return_grid=True)
    per_token = CrossAttentionGradCAM(model).attribute_tokens(inputs["pixel_values"], additional_forward_args=args,
                                                              return_grid=True)
    captions = [r for r in result.records if r.target in texts]
    assert [r.target for r in captions] == texts
    for k, record in enumerate(captions):
        assert_close_scaled(record.grid, whole[k])
        assert record.tokens[1:-1] == texts[k].split()  # word-level tokenizer, BOS/EOS around
    words = [r for r in result.records if r.target.startswith("a red circle · ")]
    assert [w.target.split(" · ")[1] for w in words] == ["[BOS]", "a", "red", "circle", "[EOS]"][: len(words)]
    assert_close_scaled(words[2].grid, per_token[0, 2])
    with torch.no_grad():
        probs = torch.sigmoid(MatchLogit(model)(inputs["pixel_values"], *args))
    np.testing.assert_allclose(list(result.scores.values()), probs.numpy(), rtol=1e-5)
    assert result.score_kind == "match probability"
    with pytest.raises(ValueError, match="do not support BlipForImageTextRetrieval"):
        explain(model, processor, image, texts, methods=["grad-eclip"])
