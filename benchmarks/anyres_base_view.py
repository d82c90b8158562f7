"""How much the base view computed from the tile canvas changes LLaVA-NeXT / OneVision (not a test).

captum-vlm feeds these models one image tensor, the tile canvas, and computes their base (global)
view from it: the canvas's content box (the pixels the resized image fills, placed by
``image_sizes``) resized to one tile, bicubic with antialiasing; before, the whole canvas, padding
included. The processor's own base view is a separate resize of the original image. This script
runs tiny random models of both classes (``tests/tiny_models.py``) on smooth pictures of several
sizes, with the processor's inputs and with the adapter's (base view from the whole canvas, and
from the content box), and prints per case the largest logit difference relative to the logits'
range (over every position, and at the last prompt position) and whether the greedy answer
(4 new tokens) changed.

Run: ``PYTHONPATH=. python benchmarks/anyres_base_view.py [--seeds 3]``
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import tiny_models as tm  # noqa: E402
from test_family_anyres import MODELS, PROMPT, make_processor, scene  # noqa: E402

from captum_vlm.adapters import get_adapter  # noqa: E402

#: (height, width) of the original picture -> what its canvas holds
SIZES = {(48, 32): "fills its 48x32 pinpoint", (32, 32): "fills 32x32", (40, 28): "48x32, 2 px padding",
         (12, 40): "16x48, 2 of 16 rows padding", (30, 64): "32x48, 9 of 32 rows padding"}


def compare(kind: str, seed: int, size: tuple[int, int], content: bool) -> tuple[float, float, bool]:
    """Largest logit difference to the processor's inputs relative to their range (every position,
    the last one) and whether the greedy answer is the same; ``content``: the base view from the
    content box (as shipped), else from the whole canvas (before)."""
    model, processor = MODELS[kind](seed=seed), make_processor(kind)
    adapter = get_adapter(model)
    raw = processor(images=[scene(*size)], text=[PROMPT], return_tensors="pt")
    inputs = adapter.processor_inputs(raw)
    ids, mask, sizes = inputs["input_ids"], inputs["attention_mask"], inputs["image_sizes"]
    ours = {**adapter.model_inputs(inputs["pixel_values"], ids, mask, (sizes,) if content else ()),
            **adapter.language_kwargs(ids, (sizes,))}
    with torch.no_grad():
        a, b = model(**ours).logits, model(**raw).logits
        same = torch.equal(model.generate(**ours, max_new_tokens=4, do_sample=False),
                           model.generate(**raw, max_new_tokens=4, do_sample=False))
    every = float((a - b).abs().max() / (b.max() - b.min()))
    last = float((a[:, -1] - b[:, -1]).abs().max() / (b[:, -1].max() - b[:, -1].min()))
    return every, last, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"tiny models: {tm.ANYRES_TILE} px tiles, pinpoints {tm.ANYRES_PINPOINTS}; seeds 0..{args.seeds - 1}")
    print("| class | image (h, w) | canvas | base view from | max rel. logit diff, all positions "
          "| at the last position | greedy answer changed |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("next", "onevision"):
        name = "LlavaNext" if kind == "next" else "LlavaOnevision"
        for size, what in SIZES.items():
            for content in (False, True):
                runs = [compare(kind, seed, size, content) for seed in range(args.seeds)]
                every = max(r[0] for r in runs)
                last = max(r[1] for r in runs)
                changed = sum(not r[2] for r in runs)
                source = "content box" if content else "whole canvas (before)"
                print(f"| {name} | {size} | {what} | {source} | {every:.4f} | {last:.4f} | {changed} of {len(runs)} |")

if __name__ == "__main__":
    main()
