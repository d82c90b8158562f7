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
