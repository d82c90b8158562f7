"""The audit on the planted language prior (not a test).

shapes-blip-vqa-prior was trained on squares that are mostly blue and on "what color is the
square?" mostly answered "blue"; on held-out scenes with a square that is *not* blue it still
answers "blue" for about a tenth of them (its card). Here the audit asks that question of
held-out scenes with one square (``--against`` non-blue squares, ``--agree`` blue ones; labels:
the square's colour; masks: the square's), explains each answer with bi-modal relevancy and runs
the grounding test twice: on the map's top patches, and on the square's own patches (the
object mask). The pattern finder groups the records by question → answer (``[wrong]`` when the
label disagrees); expected: "what color is the square? → blue [wrong]" (the prior-driven
answers) stands out as not grounded. ``--models`` adds shapes-blip-vqa (no prior) as a control.

    OMP_NUM_THREADS=1 python benchmarks/audit_prior.py --against 150 --agree 40
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import captum_vlm as cv  # noqa: E402
from captum_vlm.zoo import train_blip  # noqa: E402

HELDOUT_SEED = 123_456


def prior_items(against: int, agree: int) -> list[dict]:
    """Held-out scenes with one square, asked the prior's question; label and mask: the square's."""
    prior = train_blip.language_prior(train_blip.RECIPES["shapes-blip-vqa-prior"])
    scenes = (train_blip.prior_scenes(prior, HELDOUT_SEED, against, against=True)
              + train_blip.prior_scenes(prior, HELDOUT_SEED + 1, agree, against=False))
    items = []
    for i, scene in enumerate(scenes):
        colour, index = train_blip.prior_object(prior, scene)
        items.append({"id": f"scene-{i:04d}", "image": scene.image, "question": prior.question, "label": colour,
                      "mask": scene.objects[index].mask})
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=int, default=150, help="scenes whose square is not blue")
    parser.add_argument("--agree", type=int, default=40, help="scenes whose square is blue")
    parser.add_argument("--method", default="bimodal-relevancy")
    parser.add_argument("--models", nargs="+", default=["shapes-blip-vqa-prior"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    items = prior_items(args.against, args.agree)
    for name in args.models:
        model, processor = cv.zoo.load(name)
        start = time.perf_counter()
        result = cv.audit(model, processor, items, [], methods=[args.method], checks=("grounding",),
                          output=tempfile.mkdtemp(prefix="audit-prior-"), model_name=name)
        seconds = time.perf_counter() - start
        print(f"\n{name}: {len(items)} scenes ({args.against} non-blue squares, {args.agree} blue), "
              f"{args.method}, grounding test (fraction 0.2); {seconds:.0f} s, load average "
              f"{os.getloadavg()[0]:.1f}; errors: {len(result.errors())}\n")
        print("| question → answer | count | accuracy | not grounded (map's top patches) | "
              "not grounded (the square's patches) |")
        print("|---|---|---|---|---|")
        for row in sorted(result.label_table(), key=lambda r: -r["count"]):
            print(f"| {row['label']} | {row['count']} | {row['accuracy']:.2f} | {row['not_grounded']:.2f} | "
                  f"{row['object_not_grounded']:.2f} |")
        findings = result.patterns()
        print("\npattern finder:", "; ".join(f.summary() for f in findings) or "nothing flagged", flush=True)


if __name__ == "__main__":
    main()
