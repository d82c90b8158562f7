"""What each map's evidence costs beside the map it scores, side by side in one run (not a test).

The evidence of :func:`captum_vlm.explain` per map: deletion and insertion AUC of the explained
score against random patch orders (:mod:`captum_vlm.metrics.evidence`). One image, K prompts
(default 16) on the random CLIP of ViT-B/16 geometry of ``bench_peers.py`` (224 px, 14 x 14
patches; ``--width``/``--layers``). Contenders, interleaved within each repeat (medians of CPU
time, ``time.process_time``, one torch thread):

* the maps: ``GradientWeightedRelevancy`` and ``GradECLIP``, all K prompts in one call;
* the evidence of those K maps from :func:`~captum_vlm.metrics.maps_evidence` (shared batched
  forwards: each scores every prompt; the random orders' curves and the curves' ends once for
  all maps), as the first method of an ``explain()`` call pays it, and as a second method on the
  same input pays it (shared curves reused);
* the evidence one map at a time with nothing shared (:func:`~captum_vlm.metrics.map_evidence`
  per map, each with its own random orders; timed as one map x K).

``--steps`` takes several values (the curves' points after the first; ``explain()`` uses 8).
Also prints the number of images each evidence variant sends through the model.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_evidence.py --repeats 3

Prints Markdown tables for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from bench_peers import interleaved_medians, prompts, vit_b16_clip  # noqa: E402  (this folder is on sys.path)

from captum_vlm.attr import GradECLIP, GradientWeightedRelevancy  # noqa: E402
from captum_vlm.metrics import map_evidence, maps_evidence  # noqa: E402
from captum_vlm.targets import ImageTextSimilarity  # noqa: E402

IMAGE = 224


def contenders(args) -> tuple[dict, dict[str, int]]:
    """``{name: build}`` for :func:`interleaved_medians` and the images each evidence call runs."""
    model = vit_b16_clip(args.width, args.layers)
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    ids, mask = prompts(args.prompts)
    k = args.prompts
    grids = GradientWeightedRelevancy(model).attribute_prompts(pixels, additional_forward_args=(ids, mask),
                                                               return_grid=True)[0]  # [K, 14, 14]
    similarity = ImageTextSimilarity(model)
    counted = {"n": 0}

    def forward(images):
        counted["n"] += len(images)
        return similarity(images, ids, mask)  # [N, K]

    def relevancy():
        method = GradientWeightedRelevancy(model)
        return lambda: method.attribute_prompts(pixels, additional_forward_args=(ids, mask), return_grid=True)

    def eclip():
        method = GradECLIP(model)
        return lambda: method.attribute_prompts(pixels, additional_forward_args=(ids, mask), return_grid=True)

    built = {f"map: relevancy, {k} prompts in one call": relevancy,
             f"map: Grad-ECLIP, {k} prompts in one call": eclip}
    images: dict[str, int] = {}
    for steps in args.steps:
        def batched(steps=steps):
            return lambda: maps_evidence(forward, pixels, grids, list(range(k)), steps=steps, n_random=args.n_random)

        def second(steps=steps):
            shared = maps_evidence(forward, pixels, grids[:1], [0], steps=steps, n_random=args.n_random)[0].shared
            return lambda: maps_evidence(forward, pixels, grids, list(range(k)), steps=steps, shared=shared)

        def alone(steps=steps):
            return lambda: map_evidence(forward, pixels, grids[0], target=0, steps=steps, n_random=args.n_random), k

        for name, build in [
            (f"evidence, {k} maps in shared batched forwards, steps {steps} (first method)", batched),
            (f"evidence, {k} maps, steps {steps}, shared curves reused (second method)", second),
            (f"evidence, {k} maps one at a time, nothing shared, steps {steps} (1 map x {k})", alone),
        ]:
            built[name] = build
            call = build()
            call = call[0] if isinstance(call, tuple) else call
            counted["n"] = 0
            call()
            images[name] = counted["n"] * (k if "one at a time" in name else 1)
    return built, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[8])
    parser.add_argument("--n-random", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    built, images = contenders(args)
    medians = interleaved_medians(built, args.repeats)
    maps = [name for name in medians if name.startswith("map:")]
    print(f"torch {torch.__version__}, one thread; width {args.width}, {args.layers} layers, "
          f"{args.prompts} prompts, {args.n_random} random orders, medians of {args.repeats}\n")
    print("| call | images through the model | median CPU s | / relevancy map | / Grad-ECLIP map |")
    print("|---|---|---|---|---|")
    for name, seconds in medians.items():
        ratios = " | ".join(f"{seconds / medians[m]:.2f}x" for m in maps)
        print(f"| {name} | {images.get(name, '-')} | {seconds:.3f} | {ratios} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
