"""The HTML report: escaped text, self-contained, renders in headless Chromium, clicks switch maps."""

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from captum_vlm.viz.report import ReportView, render_report

XSS = "<img src=x onerror=alert(1)>"


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), colour, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def views():
    return [
        ReportView("grad-eclip", "a red circle", png(200), {"layers": "3"}, ["a", "red", XSS], [0.1, 0.7, 0.2]),
        ReportView("grad-eclip", XSS, png(50), {"layers": "3"}),
        ReportView("rollout", "a red circle", png(120), {"heads": "mean"}),
    ]


def test_report_escapes_text_and_is_self_contained():
    page = render_report(XSS, png(0), views(), scores={XSS: 0.5}, notes={"rollout": XSS}, meta={"model": XSS})
    assert "<img src=x" not in page
    assert page.count("<img") == 2  # the input image and the first map, nothing injected
    assert "http://" not in page and "https://" not in page
    data_block = page.split('data-part="report-data">')[1].split("</script>")[0]
    assert "<" not in data_block  # every "<" in the data is escaped, so nothing can close the block


def test_report_fragment_for_notebooks_has_unique_ids():
    first = render_report("a", png(0), views(), full_page=False)
    second = render_report("a", png(0), views(), full_page=False)
    assert first.startswith('<div class="cv-report" id="cv-report-') and "<html" not in first
    assert first.split('"')[3] != second.split('"')[3]


def test_report_rejects_bad_input():
    with pytest.raises(ValueError, match="views"):
        render_report("t", png(0), [])
    with pytest.raises(ValueError, match="image_png"):
        render_report("t", b"not a png", views())
    with pytest.raises(ValueError, match="first view needs image_png"):
        render_report("t", png(0), [ReportView("m", "t", None, grid=np.eye(2))])
    with pytest.raises(ValueError, match=r"views\[1\]: give image_png or grid"):
        render_report("t", png(0), [views()[0], ReportView("m", "t")])
    with pytest.raises(ValueError, match="grid: 1 of 4 values are NaN"):
        render_report("t", png(0), [views()[0], ReportView("m", "t", grid=np.array([[0, np.nan], [1, 2]]))])


def _chromium():
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: `make test` installs Debian's chromium package")
        pytest.skip("chromium is not installed (make test installs it)")
    return path


def test_report_renders_in_chromium_and_clicks_switch_maps(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    path = tmp_path / "report.html"
    path.write_text(render_report("report", png(0), views(), scores={"a red circle": 0.9}), encoding="utf-8")
    problems = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=_chromium(),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(path.as_uri())
            first = page.get_attribute("[data-part=map]", "src")
            assert page.get_attribute("[data-part=map]", "data-target") == "a red circle"
            assert page.locator("[data-part=tokens] span").count() == 3
            assert page.locator("[data-part=tokens] span").nth(2).text_content() == XSS  # shown as text
            page.locator(f'[data-part=targets] button[data-value="{XSS}"]').click()
            second = page.get_attribute("[data-part=map]", "src")
            assert page.get_attribute("[data-part=map]", "data-target") == XSS
            page.locator('[data-part=methods] button[data-value="rollout"]').click()
            third = page.get_attribute("[data-part=map]", "src")
            assert page.locator("img").count() == 2
        finally:
            browser.close()
    assert len({first, second, third}) == 3
    assert problems == []


# ---------------------------------------------------------------- static first view, grids, canvas
def evidence_views():
    first = ReportView("relevancy", "a red circle", png(200), {"layers": "vision block 3 (last)"},
                       evidence={"faithfulness": "deletion AUC 0.1 (random 0.3)"}, value_label="relevancy")
    grid_view = ReportView("relevancy", "a green circle", None, {"layers": "vision block 3 (last)"},
                           grid=np.array([[0.0, 0.0], [0.0, 1.0]]),
                           evidence={"model's confidence": "0.0001 — the model does not see it"},
                           flag="The model does not see 'a green circle'", value_label="relevancy")
    signed_view = ReportView("occlusion", "a red circle", None, grid=np.array([[0.0, -1.0], [0.0, 2.0]]))
    return [first, grid_view, signed_view]


def test_first_view_is_static_html():
    page = render_report("r", png(0), evidence_views(), scores={"a red circle": 0.9, "a green circle": 0.0001},
                         compare_png=png(90), compare_title="a red circle",
                         agreement={("relevancy", "occlusion"): 0.25})
    body = page.split('<script type="application/json"')[0]  # what a reader without scripts gets
    assert body.count('data-part="map" src="data:image/png;base64,') == 1
    assert "deletion AUC 0.1 (random 0.3)" in body and "vision block 3 (last)" in body
    assert body.count("<tr><td>a red circle</td><td>0.9000</td></tr>") == 1  # scores rendered, not scripted
    assert '<tr class="absent"><td>relevancy</td><td>a green circle<br><b>The model does not see' in body
    assert 'data-part="compare" src="data:image/png' in body and "<td>0.25</td>" in body


def test_grid_views_travel_as_bytes_not_pngs():
    one = render_report("r", png(0), evidence_views()[:1])
    many = render_report("r", png(0), evidence_views()[:1] + [
        ReportView("relevancy", f"prompt {i}", grid=np.random.default_rng(i).random((7, 7))) for i in range(100)
    ])
    assert (len(many) - len(one)) / 100 < 400  # a 7x7 map costs a few hundred bytes
    assert many.count("data:image/png") == one.count("data:image/png")


def _browser(pw):
    return pw.chromium.launch(
        executable_path=_chromium(),
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run"],
    )


def test_report_reads_with_javascript_disabled(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    path = tmp_path / "report.html"
    path.write_text(render_report("r", png(0), evidence_views(), scores={"a red circle": 0.9}), encoding="utf-8")
    with sync_api.sync_playwright() as pw:
        browser = _browser(pw)
        try:
            page = browser.new_context(java_script_enabled=False).new_page()
            page.goto(path.as_uri())
            assert page.locator("[data-part=map]").get_attribute("src").startswith("data:image/png")
            assert page.locator("[data-part=map]").bounding_box()["width"] > 0
            assert page.locator("[data-part=scores] tr").count() == 1
            text = page.locator("body").inner_text()
            assert "deletion AUC 0.1 (random 0.3)" in text and "does not see 'a green circle'" in text
            assert "switching maps needs scripts" in text
        finally:
            browser.close()


def test_canvas_draws_grids_like_overlay(tmp_path):
    """A grid view drawn by the page: zero cells leave the input pixels as they are, the maximum
    is the colour map's end blended at the report's alpha."""
    sync_api = pytest.importorskip("playwright.sync_api")
    import matplotlib

    from captum_vlm.viz._style import SIGNED_CMAP

    colour = (200, 100, 50)
    path = tmp_path / "report.html"
    path.write_text(render_report("r", png(colour), evidence_views(), alpha=0.6), encoding="utf-8")
    problems = []
    with sync_api.sync_playwright() as pw:
        browser = _browser(pw)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(path.as_uri())
            assert "switching maps needs scripts" not in page.locator("body").inner_text()
            page.locator('[data-part=targets] button[data-value="a green circle"]').click()
            assert page.locator("[data-part=canvas]").is_visible()
            assert not page.locator("[data-part=map]").is_visible()
            assert "does not see" in page.locator("[data-part=flag]").inner_text()
            pixel = "([x, y]) => Array.from(document.querySelector('[data-part=canvas]').getContext('2d').getImageData(x, y, 1, 1).data)"
            assert page.evaluate(pixel, [1, 1])[:3] == list(colour)  # zero cell: untouched
            top = np.array(matplotlib.colormaps["viridis"](1.0)[:3]) * 255
            expected = 0.4 * np.array(colour) + 0.6 * top
            np.testing.assert_allclose(page.evaluate(pixel, [7, 7])[:3], expected, atol=3)
            page.locator('[data-part=methods] button[data-value="occlusion"]').click()
            assert page.locator("[data-part=canvas]").get_attribute("data-method") == "occlusion"
            positive = np.array(matplotlib.colormaps[SIGNED_CMAP](1.0)[:3]) * 255
            np.testing.assert_allclose(page.evaluate(pixel, [7, 7])[:3], 0.4 * np.array(colour) + 0.6 * positive,
                                       atol=3)
            assert "teal negative" in page.locator("[data-part=bar]").inner_text()
        finally:
            browser.close()
    assert problems == []
