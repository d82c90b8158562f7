"""The ``captum-vlm lens-inside`` views on the bundled zoo models, and the HTML section helper."""

import pytest
from PIL import Image

from captum_vlm import zoo
from captum_vlm.cli import main
from captum_vlm.lens import logit_lens
from captum_vlm.viz.lens_inside import lens_page, lens_section


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    zoo.scenes.make_scene(7, size=64, labels=[("red", "circle"), ("blue", "square")]).pil().save(path)
    return path


def test_logit_lens_page_on_the_vqa_model(scene_file, tmp_path, capsys):
    out = tmp_path / "lens.html"
    code = main(["lens-inside", "logit-lens", str(scene_file), "--model", "zoo:shapes-blip-vqa",
                 "--text", "what color is the circle?", "--out", str(out)])
    assert code == 0
    page = out.read_text()
    model, processor = zoo.load("shapes-blip-vqa")
    lens = logit_lens(model, processor, Image.open(scene_file).convert("RGB"), "what color is the circle?")
    assert "produced: " + " ".join(lens.produced_tokens) in page
    assert lens.produced_tokens[0] == "red"  # the bundled model answers this scene right
    assert page.count("<img") == 1 and "wrote" in capsys.readouterr().out


def test_heads_page(scene_file, tmp_path):
    out = tmp_path / "heads.html"
    assert main(["lens-inside", "heads", str(scene_file), "--out", str(out)]) == 0
    assert "vision attention heads" in out.read_text()


@pytest.mark.parametrize("args, message", [
    (["logit-lens", "IMG", "--model", "zoo:shapes-clip", "--text", "a"], "Classes with a decoder"),
    (["logit-lens", "IMG", "--model", "zoo:shapes-blip-vqa", "--text", "a", "--k", "0"], "k: expected"),
    (["heads", "IMG", "--stream", "text"], "--text"),
    (["heads", "missing.png"], "image not found"),
])
def test_errors_are_one_line_exit_2(args, message, scene_file, tmp_path, capsys):
    args = [str(scene_file) if a == "IMG" else a for a in args]
    assert main(["lens-inside", *args, "--out", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (transformers' weight-loading bar may come before it)
    assert last.startswith("captum-vlm: error:") and message in last and "Traceback" not in err


def test_section_escapes_text():
    html = lens_page([lens_section("<b>x</b>", notes=["a < b & c"])], title="<t>")
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    assert "a &lt; b &amp; c" in html and "<title>&lt;t&gt;</title>" in html


# ----- probe and ablate: the CLI's report holds the Python API's numbers ------------------------
import numpy as np  # noqa: E402
from html_tables import read_tables, table  # noqa: E402

from captum_vlm import lens as cv_lens  # noqa: E402
from captum_vlm.targets import ImageTextSimilarity  # noqa: E402

XSS = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'


def _scenes(n, seed=5):
    return zoo.scenes.make_scenes(seed, n, size=64, n_objects=1)


def test_probe_cli_equals_the_python_api(tmp_path):
    out = tmp_path / "probe.html"
    assert main(["lens-inside", "probe", "--scenes", "12", "--seed", "5", "--label", "colour", "--cv", "2",
                 "--layer", "0", "--layer", "4", "--out", str(out), "--quiet"]) == 0
    model, processor = zoo.load("shapes-clip")
    scenes = _scenes(12)
    pixels = processor(images=[s.pil() for s in scenes], return_tensors="pt")["pixel_values"]
    want = cv_lens.probe(model, None, pixels, [s.labels[0][0] for s in scenes], layers=[0, 4], cv=2)
    got = table(read_tables(out.read_text()), 0, "probe-accuracy")
    np.testing.assert_array_equal(got, np.stack([want.accuracy, want.accuracy_std, want.control, want.control_std], 1))


def test_patch_probe_cli_labels_each_patch_from_the_scene_masks(tmp_path):
    out = tmp_path / "patches.html"
    assert main(["lens-inside", "probe", "--scenes", "4", "--seed", "5", "--where", "patches", "--label", "object",
                 "--cv", "2", "--layer", "2", "--out", str(out), "--quiet"]) == 0
    model, processor = zoo.load("shapes-clip")
    scenes = _scenes(4)
    pixels = processor(images=[s.pil() for s in scenes], return_tensors="pt")["pixel_values"]
    labels = np.stack([cv_lens.patch_labels(s.objects[0].mask, (8, 8)) for s in scenes])  # 64 px scenes, 8 px patches
    want = cv_lens.probe(model, None, pixels, labels, where="patches", layers=[2], cv=2)
    got = table(read_tables(out.read_text()), 0, "probe-accuracy")
    np.testing.assert_array_equal(got[0], [want.accuracy[0], want.accuracy_std[0], want.control[0], want.control_std[0]])


def test_ablate_cli_equals_the_python_api(tmp_path):
    out = tmp_path / "ablate.html"
    assert main(["lens-inside", "ablate", "--scenes", "3", "--seed", "5", "--mode", "mean", "--top", "5",
                 "--out", str(out), "--quiet"]) == 0
    model, processor = zoo.load("shapes-clip")
    scenes, prompts = _scenes(3), zoo.scenes.zero_shot_prompts()
    text = processor(text=prompts, return_tensors="pt", padding=True)
    pixels = processor(images=[s.pil() for s in scenes], return_tensors="pt")["pixel_values"]
    target = [prompts.index(zoo.scenes.phrase(*s.labels[0])) for s in scenes]
    want = cv_lens.head_importance(model, ImageTextSimilarity(model), pixels, (text["input_ids"], text["attention_mask"]),
                                   target=target, mode="mean")
    parsed = read_tables(out.read_text())
    np.testing.assert_array_equal(table(parsed, 0, "importance"), want.importance)
    assert [(int(r[1]), int(r[2])) for r in parsed.rows["0:ranked-heads"][1:]] == want.ranked[:5]


@pytest.fixture()
def folder(tmp_path):
    """Six scenes, two labels (one an XSS payload), masks as .npy files named in labels.csv."""
    data = tmp_path / "data"
    data.mkdir()
    lines = ["file,label,mask"]
    for i, scene in enumerate(_scenes(6, seed=9)):
        scene.pil().save(data / f"s{i}.png")
        np.save(data / f"m{i}.npy", scene.objects[0].mask)
        label = XSS if scene.labels[0][0] in ("red", "green") else "other"
        lines.append(f's{i}.png,"{label.replace(chr(34), chr(34) * 2)}",m{i}.npy')
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    return data


def test_probe_cli_on_a_folder_escapes_its_labels(folder, tmp_path):
    out = tmp_path / "folder.html"
    assert main(["lens-inside", "probe", "--data", str(folder), "--cv", "2", "--layer", "1", "--out", str(out),
                 "--quiet"]) == 0
    page = out.read_text()
    assert "<script>" not in page and "<img src=x" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    model, processor = zoo.load("shapes-clip")
    from captum_vlm.audit.sources import rows_from

    rows = rows_from(str(folder))
    pixels = processor(images=[Image.open(r["path"]).convert("RGB") for r in rows], return_tensors="pt")["pixel_values"]
    want = cv_lens.probe(model, None, pixels, [r["label"] for r in rows], layers=[1], cv=2)
    assert XSS in want.classes
    np.testing.assert_array_equal(table(read_tables(page), 0, "probe-accuracy")[0],
                                  [want.accuracy[0], want.accuracy_std[0], want.control[0], want.control_std[0]])


def test_logit_lens_cli_on_two_images_equals_the_batched_api(scene_file, tmp_path):
    other = tmp_path / "other.png"
    zoo.scenes.make_scene(8, size=64, labels=[("green", "circle")]).pil().save(other)
    out = tmp_path / "two.html"
    question = "what color is the circle?"
    assert main(["lens-inside", "logit-lens", str(scene_file), str(other), "--model", "zoo:shapes-blip-vqa",
                 "--text", question, "--k", "3", "--out", str(out)]) == 0
    model, processor = zoo.load("shapes-blip-vqa")
    images = [Image.open(p).convert("RGB") for p in (scene_file, other)]
    lenses = logit_lens(model, processor, images, question, k=3)
    parsed = read_tables(out.read_text())
    assert parsed.sections == ["logit-lens", "logit-lens"]
    for i, one in enumerate(lenses):
        np.testing.assert_array_equal(table(parsed, i, "produced-rank"), one.produced_ranks.numpy())
        np.testing.assert_array_equal(table(parsed, i, "top-1"), one.top_probs[:, :, 0].numpy())
    assert [one.produced_tokens[0] for one in lenses] == ["red", "green"]


@pytest.mark.parametrize("args, message", [
    (["probe", "--scenes", "1"], "--scenes: expected at least 2"),
    (["probe", "--scenes", "6", "--where", "image", "--label", "object"], "--label object"),
    (["probe", "--scenes", "12", "--layer", "9", "--cv", "2"], "layers: expected ints in 0..4"),
    (["probe", "--data", "DATA-NOLABELS"], "has no labels file"),
    (["probe", "--data", "missing-folder"], "data folder not found"),
    (["probe", "--scenes", "6", "--cv", "5"], "fewer than cv=5"),
    (["ablate", "--scenes", "2", "--top", "0"], "--top must be at least 1"),
    (["ablate", "--data", "DATA", "--text", "a red circle"], "not among the prompts"),
    (["ablate", "--scenes", "2", "--stream", "cross"], "stream: CLIPModel has no 'cross'"),
    (["ablate", "--scenes", "2", "--model", "zoo:shapes-blip-vqa", "--objects", "2", "--text", "what color is it?"],
     "has no answer"),
])
def test_probe_and_ablate_errors_are_one_line_exit_2(args, message, folder, tmp_path, capsys):
    empty = tmp_path / "nolabels"
    empty.mkdir()
    zoo.scenes.make_scene(1, size=64).pil().save(empty / "a.png")
    args = [str(folder) if a == "DATA" else str(empty) if a == "DATA-NOLABELS" else a for a in args]
    assert main(["lens-inside", *args, "--out", str(tmp_path / "x.html"), "--quiet"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("captum-vlm: error:") and message in last and "Traceback" not in err
    assert not (tmp_path / "x.html").exists()


def test_explain_cli_adds_the_logit_lens_of_the_answer(scene_file, tmp_path):
    out = tmp_path / "explain.html"
    question = "what color is the circle?"
    assert main(["explain", str(scene_file), "--model", "zoo:shapes-blip-vqa", "--text", question,
                 "--method", "cross-attention-gradcam", "--logit-lens", "--out", str(out), "--quiet"]) == 0
    parsed = read_tables(out.read_text())
    model, processor = zoo.load("shapes-blip-vqa")
    lens = logit_lens(model, processor, Image.open(scene_file).convert("RGB"), question)
    i = parsed.sections.index("logit-lens")
    np.testing.assert_array_equal(table(parsed, i, "produced-rank"), lens.produced_ranks.numpy())
    np.testing.assert_allclose(table(parsed, i, "produced-probability"), lens.produced_probs.numpy(), rtol=1e-5)
    assert main(["explain", str(scene_file), "--text", "a red circle", "--text", "a blue square", "--logit-lens",
                 "--out", str(tmp_path / "x.html"), "--quiet"]) == 2
