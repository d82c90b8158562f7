"""Idefics3 / SmolVLM: the global view captum-vlm recomputes from the tile canvas (torch bicubic,
antialiased) against the processor's (PIL Lanczos of the 8-bit canvas).

For tiny random models of both classes (``tests/tiny_models.py``) and the real ``Idefics3Processor``
(``tests/test_family_idefics3.py``'s), per image: the largest |pixel| difference of the two global
views (normalised units), the largest next-token logit difference relative to the largest logit
(all positions, and the last one), and whether the greedy answer of 5 new tokens changes.

    PYTHONPATH=.:tests python benchmarks/idefics3_global_view.py --seeds 3
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image, ImageDraw


def pictures(seed: int, sizes=((40, 64), (64, 40))) -> dict[str, Image.Image]:
    """A smooth picture (a disc and a square on a gradient) and random noise of each ``(h, w)``."""
    rng = np.random.default_rng(seed)
    found = {}
    for h, w in sizes:
        smooth = Image.new("RGB", (w, h))
        draw = ImageDraw.Draw(smooth)
        for x in range(w):
            draw.line([(x, 0), (x, h)], fill=(int(255 * x / w), 90, 160))
        cx, cy = int(rng.integers(10, w - 10)), int(rng.integers(10, h - 10))
        draw.ellipse([cx - 8, cy - 8, cx + 8, cy + 8], fill=(230, 40, 40))
        draw.rectangle([2, 2, 14, 14], fill=(40, 40, 230))
        found[f"smooth {h}x{w}"] = smooth
        found[f"noise {h}x{w}"] = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return found


def main() -> None:
    import test_family_idefics3 as fam
    import tiny_models as tm

    from captum_vlm.adapters import get_adapter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    processor = fam.tiny_processor()
    prompt = "<image> what color is the circle"
    rows = []
    for factory in (tm.idefics3, tm.smolvlm):
        for seed in range(args.seeds):
            model = factory(seed)
            adapter = get_adapter(model)
            for name, image in pictures(seed).items():
                raw = processor(images=[[image]], text=[prompt], return_tensors="pt")
                canvas = adapter.processor_inputs(raw)["pixel_values"]
                ours = adapter.model_inputs(canvas, raw["input_ids"], raw["attention_mask"])
                with torch.no_grad():
                    a, b = model(**ours).logits, model(**raw).logits
                    scale = b.abs().max()
                    answer_a = model.generate(**ours, max_new_tokens=5, do_sample=False)
                    answer_b = model.generate(**raw, max_new_tokens=5, do_sample=False)
                rows.append((type(model).__name__, name, tuple(canvas.shape[-2:]),
                             float((ours["pixel_values"][:, -1] - raw["pixel_values"][:, -1]).abs().max()),
                             float((a - b).abs().max() / scale), float((a[:, -1] - b[:, -1]).abs().max() / scale),
                             not torch.equal(answer_a, answer_b)))
    print("| class | image | canvas | max abs pixel diff | max rel. logit diff, all positions | at the last position "
          "| greedy answer changed |")
    print("|---|---|---|---|---|---|---|")
    keys = sorted({(r[0], r[1], r[2]) for r in rows}, key=lambda k: (k[0], k[1]))
    for key in keys:
        sel = [r for r in rows if (r[0], r[1], r[2]) == key]
        print(f"| {key[0].replace('ForConditionalGeneration', '')} | {key[1]} | {key[2][0]}x{key[2][1]} "
              f"| {max(r[3] for r in sel):.3f} | {max(r[4] for r in sel):.4f} | {max(r[5] for r in sel):.4f} "
              f"| {sum(r[6] for r in sel)} of {len(sel)} |")


if __name__ == "__main__":
    main()
