"""How much the base view computed from the tile canvas changes LLaVA-NeXT / OneVision (not a test).

captum-vlm feeds these models one image tensor, the tile canvas, and computes their base (global)
view from it (the canvas resized to one tile, bicubic with antialiasing); the processor's own base
view is a separate resize of the original image. This script runs tiny random models of both
classes (``tests/tiny_models.py``) on smooth pictures of several sizes, once with the processor's
inputs and once with the adapter's, and prints per case the largest logit difference relative
to the logits' range (over every position, and at the last prompt position) and whether the
greedy answer (4 new tokens) changed.

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


def compare(kind: str, seed: int, size: tuple[int, int]) -> tuple[float, float, bool]:
    model, processor = MODELS[kind](seed=seed), make_processor(kind)
    adapter = get_adapter(model)
    raw = processor(images=[scene(*size)], text=[PROMPT], return_tensors="pt")
    inputs = adapter.processor_inputs(raw)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    ours = {**adapter.model_inputs(inputs["pixel_values"], ids, mask),
            **adapter.language_kwargs(ids, (inputs["image_sizes"],))}
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
    print("| class | image (h, w) | canvas | max rel. logit diff, all positions | at the last position | greedy answer changed |")
    print("|---|---|---|---|---|---|")
    for kind in ("next", "onevision"):
        name = "LlavaNext" if kind == "next" else "LlavaOnevision"
        for size, what in SIZES.items():
            runs = [compare(kind, seed, size) for seed in range(args.seeds)]
            every = max(r[0] for r in runs)
            last = max(r[1] for r in runs)
            changed = sum(not r[2] for r in runs)
            print(f"| {name} | {size} | {what} | {every:.4f} | {last:.4f} | {changed} of {len(runs)} |")


if __name__ == "__main__":
    main()
