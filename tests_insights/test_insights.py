"""captum_vlm.insights under captum 0.8: our methods in Insights, served over HTTP, equal ours."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.insights.attr_vis import config as insights_config
from captum.insights.attr_vis.features import ImageFeature
from insights_server import ANSWERS, example
from numerics import assert_close_scaled
from PIL import Image

import captum_vlm as cv
import captum_vlm.insights as cvi

HERE = Path(__file__).resolve().parent
STARTUP_S = 300  # the server loads torch, transformers and the model on a shared CPU
IG = {"n_steps": 8, "method": "gausslegendre"}
BLUE = ANSWERS.index("blue")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, path: str, payload: dict | None = None, timeout: float = 300):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read())


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses in LISTEN state on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
                found.add(address)
    return found


@pytest.fixture
def server(tmp_path):
    """The Insights server of insights_server.py in a subprocess; terminated at the end, also when
    the test fails."""
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen([sys.executable, str(HERE / "insights_server.py"), str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n{(tmp_path / 'server.log').read_text()}")
            try:
                _request(port, "/init", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not answer in {STARTUP_S} s")
                time.sleep(1)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    assert process.poll() is not None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def _png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _ours(label: int):
    """Token IG (both modalities) of candidate ``label``'s log-probability, computed directly."""
    model, processor, image, question = example()
    x = processor(images=image, text=question, return_tensors="pt")
    answers = processor.tokenizer(ANSWERS, return_tensors="pt", padding=True)
    args = (x["input_ids"], x["attention_mask"], answers["input_ids"][label:label + 1],
            answers["attention_mask"][label:label + 1])
    image_map, text_map = cv.TokenIntegratedGradients(model).attribute(
        x["pixel_values"], additional_forward_args=args, modality="both", **IG)
    with torch.no_grad():
        log_probs = torch.stack([cv.TokenLogProbs(model, reduction="sum")(
            x["pixel_values"], x["input_ids"], x["attention_mask"], answers["input_ids"][c:c + 1],
            answers["attention_mask"][c:c + 1])[0] for c in range(len(ANSWERS))])
    return x["pixel_values"], image_map, text_map, log_probs.softmax(0)


def test_insights_server_returns_our_map(server):
    port = server
    if Path("/proc/net/tcp").exists():  # Linux: the listening socket is 127.0.0.1 only
        assert _listening_addresses(port) == {"0100007F"}

    init = _request(port, "/init")
    assert init["classes"] == ANSWERS
    name = "captum-vlm integrated-gradients"
    assert name in init["methods"]
    assert set(init["method_arguments"][name]) == {"n_steps", "method"}

    _request(port, "/fetch", {"attribution_method": name, "arguments": dict(IG), "prediction": "all",
                              "classes": []})
    served = _request(port, "/attribute", {"inputIndex": 0, "modelIndex": 0, "labelIndex": BLUE})
    pixel_values, image_map, text_map, probs = _ours(BLUE)

    assert served["active_index"] == BLUE
    top = sorted(range(len(ANSWERS)), key=lambda c: -float(probs[c]))
    assert [p["index"] for p in served["predicted"]] == top
    assert_close_scaled(torch.tensor([p["score"] for p in served["predicted"]]), probs[top])

    image_out, text_out = served["feature_outputs"]
    # text: Insights sends the map over the question tokens scaled to max |value| = 100
    assert_close_scaled(torch.tensor(text_out["modified"]), text_map[0] / text_map.abs().max() * 100)
    # the two features' net contributions: their sums, normalised to sum |.| = 1
    sums = torch.stack([image_map.sum(), text_map.sum()])
    assert_close_scaled(torch.tensor([image_out["contribution"], text_out["contribution"]]), sums / sums.abs().sum())
    # image: Insights sends a rendered heat map; ours rendered by the same feature is identical
    feature = ImageFeature("image", baseline_transforms=None, input_transforms=None)
    rendered = feature.visualize(image_map, pixel_values, image_out["contribution"]).modified
    assert np.array_equal(_png_pixels(image_out["modified"]), _png_pixels(rendered))

    # the comparisons can fail: another answer's map differs in every respect checked above
    _, other_image, other_text, _ = _ours(ANSWERS.index("red"))
    other = feature.visualize(other_image, pixel_values, 1.0).modified
    assert not np.array_equal(_png_pixels(image_out["modified"]), _png_pixels(other))
    with pytest.raises(AssertionError):
        assert_close_scaled(torch.tensor(text_out["modified"]), other_text[0] / other_text.abs().max() * 100)


def test_registered_methods_with_their_parameters():
    for spec in cvi.METHODS:
        name = "captum-vlm " + spec.name
        assert insights_config.ATTRIBUTION_NAMES_TO_METHODS[name].spec is spec
        assert set(insights_config.ATTRIBUTION_METHOD_CONFIG[name].params) == set(spec.params)
    assert {s.name for s in cvi.METHODS} == set(cv.method_names()) | {"patch-word-similarity"}
    assert cvi.register_methods() == ["captum-vlm " + s.name for s in cvi.METHODS]  # idempotent


@pytest.mark.parametrize("method, arguments, reference", [
    ("grad-eclip", {"layers": -1, "mode": "model"}, lambda m, x, k, a: cv.GradECLIP(m).attribute(
        x, target=k, additional_forward_args=a)),
    ("rollout", {"start_layer": "1", "head_fusion": "max"}, lambda m, x, k, a: cv.AttentionRollout(
        m, start_layer=1, head_fusion="max").attribute(x, target=k, additional_forward_args=a)),
    ("occlusion", {"window": 2, "intervention": "drop"}, lambda m, x, k, a: cv.CausalOcclusion(m).attribute(
        x, target=k, additional_forward_args=a, window=2)),
])
def test_two_tower_visualizer_attributes_like_our_method(method, arguments, reference):
    model, processor = cv.zoo.load("shapes-clip")
    scenes = [cv.zoo.scenes.make_scene(s, n_objects=2) for s in (3, 4)]
    prompts = cv.zoo.scenes.zero_shot_prompts()
    visualizer = cvi.two_tower_visualizer(model, processor, [s.pil() for s in scenes], prompts)
    visualizer._update_config({"attribution_method": "captum-vlm " + method, "arguments": dict(arguments),
                               "prediction": "all", "classes": []})
    outputs = visualizer.visualize()  # what Insights' /fetch returns, before JSON
    text = processor(text=prompts, return_tensors="pt", padding=True)
    args = (text["input_ids"], text["attention_mask"])
    pixels = processor(images=scenes[1].pil(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = cv.ImageTextSimilarity(model)(pixels, *args)[0]
    assert int(outputs[1][0].predicted[0].index) == int(logits.argmax())
    # the attribution Insights computes for prompt 5 of the second image, and ours
    calc = visualizer.attribution_calculation
    _, baselines, inputs = calc.calculate_predicted_scores((pixels,), None, visualizer.models[0])
    (served,) = calc.calculate_attribution(baselines, inputs, None, torch.tensor(5), "captum-vlm " + method,
                                           dict(arguments), visualizer.models[0])
    assert served.shape == (1, 3, 64, 64)
    assert_close_scaled(served, reference(model, pixels, 5, args))


def test_insights_methods_refuse_other_models_and_bad_targets():
    model, processor = cv.zoo.load("shapes-clip")
    cls = insights_config.ATTRIBUTION_NAMES_TO_METHODS["captum-vlm grad-eclip"]
    with pytest.raises(TypeError, match="two_tower_visualizer"):
        cls(model)
    visualizer = cvi.two_tower_visualizer(model, processor, [cv.zoo.scenes.make_scene(0).pil()], ["a red circle", "a blue square"])
    with pytest.raises(TypeError, match="class index"):
        cls(visualizer.models[0]).attribute(torch.zeros(1, 3, 64, 64), target=0.5)
    with pytest.raises(ValueError, match="images"):
        cvi.two_tower_visualizer(model, processor, [], ["a red circle"])
    with pytest.raises(TypeError, match="TokenLogProbs supports"):  # not a VQA model
        cvi.fusion_visualizer(model, processor, [cv.zoo.scenes.make_scene(0).pil()], ["what?"], ["red", "blue"])


def test_answer_classifier_takes_vqa_models_only():
    """Candidate answers are scored as separate answer_ids: a VQA model's task; a captioner is refused
    by name (the check reads the adapter's flag, not a class name)."""
    model, processor, image, question = example()
    answers = processor.tokenizer(ANSWERS, return_tensors="pt", padding=True)
    classifier = cvi.AnswerClassifier(model, answers["input_ids"], answers["attention_mask"])
    x = processor(images=image, text=question, return_tensors="pt")
    with torch.no_grad():
        scores = classifier(x["pixel_values"], x["input_ids"], x["attention_mask"])
        expected = torch.stack([cv.TokenLogProbs(model, reduction="sum")(
            x["pixel_values"], x["input_ids"], x["attention_mask"], answers["input_ids"][c:c + 1],
            answers["attention_mask"][c:c + 1])[0] for c in range(len(ANSWERS))])
    assert_close_scaled(scores[0], expected)
    captioner, _ = cv.zoo.load("shapes-blip-caption")
    with pytest.raises(TypeError, match="BlipForQuestionAnswering.*got BlipForConditionalGeneration"):
        cvi.AnswerClassifier(captioner, answers["input_ids"], answers["attention_mask"])
