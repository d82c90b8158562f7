"""The pattern finder on the planted shortcut (not a test).

shapes-clip-shortcut reads a dark bar near the top-left corner as "a blue square". Here every
"a blue square" scene carries the bar (a biased data set), the other 11 classes do not; each
model is audited with Grad-ECLIP and Chefer relevancy (no checks, no masks) and the pattern finder reports what stands
out. Expected: on shapes-clip-shortcut, label "a blue square" with peaks in the bar's cells
(0, 0)/(0, 1); on shapes-clip, nothing comparable.

    OMP_NUM_THREADS=1 python benchmarks/audit_shortcut.py --per-label 8
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import captum_vlm as cv  # noqa: E402
from captum_vlm.zoo import scenes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-label", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images, labels = [], []
    for k, (colour, shape) in enumerate(scenes.all_labels()):
        for i in range(args.per_label):
            marked = (colour, shape) == ("blue", "square")
            scene = scenes.make_scene(123_456 + 100 * k + i, labels=[(colour, shape)], marker=marked)
            images.append(scene.pil())
            labels.append(scenes.phrase(colour, shape))
    for name in ("shapes-clip-shortcut", "shapes-clip"):
        model, processor = cv.zoo.load(name)
        start = time.perf_counter()
        result = cv.audit(model, processor, images, scenes.zero_shot_prompts(), methods=["grad-eclip", "relevancy"],
                          checks=(),
                          labels=labels, output=tempfile.mkdtemp(prefix="audit-shortcut-"), model_name=name)
        findings = result.patterns()
        blue = next(r for r in result.label_table() if r["label"] == "a blue square")
        print(f"{name} ({len(images)} images, {time.perf_counter() - start:.0f} s): accuracy on 'a blue square' "
              f"{blue['accuracy']:.2f}; findings: " + ("; ".join(f.summary() for f in findings) or "none"),
              flush=True)


if __name__ == "__main__":
    main()
