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
    assert page.count("<img") == 2  # the input image and the map slot, nothing injected
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
