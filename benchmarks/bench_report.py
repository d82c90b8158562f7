"""Report size and time for many prompts: maps as 8-bit grids drawn on a canvas vs one PNG per map.

Builds an :class:`~captum_vlm.explain.Explanation` of the bundled demo scene with N synthetic
8 x 8 maps (random values; the report does not care where they came from), then measures, in one
run:

- ``to_html`` with the current scheme (static first view + grids), for N = 100 and N = 1000;
- the earlier scheme (one overlay PNG per map, base64 in the page), reconstructed as the PNGs
  ``Explanation._record_png`` draws, for 100 maps, and its per-map cost scaled to 1000;
- optionally (``--browser``) the time Debian's chromium takes to open the 1000-prompt page and
  switch through 20 maps.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_report.py [--browser]``
"""

from __future__ import annotations

import argparse
import base64
import shutil
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
from PIL import Image

from captum_vlm.explain import Explanation, MapRecord


def explanation(n: int) -> Explanation:
    rng = np.random.default_rng(0)
    image = Image.open(files("captum_vlm.zoo") / "assets" / "demo-scene.png").convert("RGB")
    texts = [f"prompt {i}" for i in range(n)]
    records = [
        MapRecord("grad-eclip", t, rng.random((8, 8)), {"layers": "vision block 3 (last)", "heads": "all",
                                                        "target": f"prompt {i}: {t}", "value": "relevance"},
                  text_index=i, evidence={"faithfulness": "deletion AUC 0.1 (random 0.3 ± 0.02)",
                                          "model's confidence": "0.001 (probability over prompts)"})
        for i, t in enumerate(texts)
    ]
    scores = dict(zip(texts, rng.dirichlet(np.ones(n)).tolist()))
    return Explanation(image, texts, records, scores, "probability over prompts", "synthetic")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def browser_seconds(page_path: Path, n: int) -> tuple[float, float]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"),
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            start = time.perf_counter()
            page.goto(page_path.as_uri())
            page.wait_for_selector("[data-part=targets] button")
            opened = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(0, n, max(1, n // 20)):
                page.locator(f'[data-part=targets] button[data-value="prompt {i}"]').click()
            switched = (time.perf_counter() - start) / 20
        finally:
            browser.close()
    return opened, switched


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--browser", action="store_true", help="also time chromium opening the 1000-prompt page")
    args = parser.parse_args()
    rows = []
    for n in (100, 1000):
        page, seconds = timed(lambda n=n: explanation(n).to_html())
        rows.append((f"grids on a canvas, {n} prompts", len(page.encode()) / 1e6, seconds))
    small = explanation(100)
    pngs, seconds = timed(lambda: [small._record_png(r) for r in small.records])
    per_map_bytes = np.mean([len(base64.b64encode(p)) for p in pngs])
    base = len(explanation(1).to_html().encode())
    rows.append(("one PNG per map, 100 prompts", (base + 100 * per_map_bytes) / 1e6, seconds))
    rows.append(("one PNG per map, 1000 prompts (100 scaled x10)", (base + 1000 * per_map_bytes) / 1e6, 10 * seconds))
    print("| report | size MB | seconds to build |")
    print("|---|---|---|")
    for name, mb, sec in rows:
        print(f"| {name} | {mb:.2f} | {sec:.1f} |")
    print(f"\nper map: PNG {per_map_bytes / 1e3:.1f} kB base64; grid size ratio 1000 prompts: "
          f"{rows[3][1] / rows[1][1]:.0f}x smaller, time ratio {rows[3][2] / rows[1][2]:.0f}x faster")
    if args.browser:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "report.html"
            path.write_text(explanation(1000).to_html(), encoding="utf-8")
            opened, switched = browser_seconds(path, 1000)
        print(f"chromium: 1000-prompt page ready in {opened:.2f} s; switching to a map {switched * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
