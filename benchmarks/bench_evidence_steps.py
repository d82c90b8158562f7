"""Do fewer evidence steps change which method looks more faithful? (not a test; issue #17)

The evidence ``explain()`` attaches to every map (:func:`captum_vlm.metrics.maps_evidence`:
deletion AUC with baseline 0 and insertion AUC from a blurred image, of the similarity logit,
against 3 random patch orders) costs ``2 (steps - 1)`` images per map, so steps 4 costs
3/7 of steps 8. This script scores the maps of every two-tower method on the same held-out
``shapes-clip`` scenes at several step counts and reports how far the readings agree:

* the methods ranked by mean deletion / insertion AUC (Kendall's tau between step counts);
* per map, the methods ordered by AUC (mean Kendall's tau over maps);
* per map, the ``beats_random`` verdict ``explain()`` prints (share of maps with the same verdict);
* the Pearson correlation of the per-map AUCs;
* CPU time of the evidence (``time.process_time``, one thread) per step count.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_evidence_steps.py --scenes 50 --steps 4 8 16
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import kendalltau, pearsonr  # noqa: E402

from captum_vlm import zoo  # noqa: E402
from captum_vlm.attr import (  # noqa: E402
    AttentionRollout,
    CausalOcclusion,
    GradECLIP,
    GradientWeightedRelevancy,
    PatchWordSimilarity,
    RawAttention,
    TokenIntegratedGradients,
)
from captum_vlm.metrics import maps_evidence  # noqa: E402
from captum_vlm.targets import ImageTextSimilarity  # noqa: E402
from captum_vlm.zoo import scenes as sc  # noqa: E402

HELDOUT_SEED = 123_456


def method_grids(model, pixels, targets, args) -> dict[str, torch.Tensor]:
    """``{method: [B, h, w]}`` maps of every image for its target prompt (explain()'s settings)."""
    makers = {
        "Grad-ECLIP": lambda: GradECLIP(model),
        "Grad-ECLIP (paper)": lambda: GradECLIP(model, mode="paper"),
        "Raw attention (mean)": lambda: RawAttention(model),
        "Raw attention (grad)": lambda: RawAttention(model, head_fusion="grad"),
        "Attention rollout": lambda: AttentionRollout(model),
        "Chefer relevancy": lambda: GradientWeightedRelevancy(model),
        "Patch-word similarity": lambda: PatchWordSimilarity(model),
        "Occlusion (drop)": lambda: CausalOcclusion(model),
        "Integrated gradients (32 steps)": lambda: TokenIntegratedGradients(model),
    }
    extra = {"Occlusion (drop)": dict(perturbations_per_eval=16),
             "Integrated gradients (32 steps)": dict(n_steps=32, internal_batch_size=16)}
    grids = {}
    for name, make in makers.items():
        out = make().attribute(pixels, target=targets, additional_forward_args=args, return_grid=True,
                               **extra.get(name, {}))
        grids[name] = out.reshape(len(pixels), *out.shape[-2:]).detach().double()
    generator = torch.Generator().manual_seed(0)
    grids["Random map"] = torch.rand(len(pixels), *grids["Grad-ECLIP"].shape[-2:], generator=generator,
                                     dtype=torch.float64)
    return grids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--n-random", type=int, default=3)
    parser.add_argument("--save", default=None, help="write the per-map AUCs here (.npz)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, processor = zoo.load("shapes-clip")
    side = model.config.vision_config.image_size
    scenes = sc.make_scenes(HELDOUT_SEED, args.scenes, size=side, n_objects=2)
    pixels = processor(images=[s.pil() for s in scenes], return_tensors="pt")["pixel_values"]
    tokens = processor(text=sc.zero_shot_prompts(), return_tensors="pt", padding=True)
    fargs = (tokens["input_ids"], tokens["attention_mask"])
    labels = sc.all_labels()
    similarity = ImageTextSimilarity(model)

    def forward(images):
        return similarity(images, *fargs)  # [N, 12] logits, as explain() scores two-tower maps

    start = time.process_time()
    per_object = []
    for obj in range(2):
        targets = [labels.index(s.labels[obj]) for s in scenes]
        per_object.append((targets, method_grids(model, pixels, targets, fargs)))
    print(f"maps: {time.process_time() - start:.1f} CPU s", flush=True)
    names = list(per_object[0][1])
    # auc[steps][kind]: [maps, methods]; verdict[steps]: [maps, methods]
    auc = {s: {"deletion": [], "insertion": []} for s in args.steps}
    verdict = {s: [] for s in args.steps}
    seconds = dict.fromkeys(args.steps, 0.0)
    for targets, grids in per_object:
        for i, target in enumerate(targets):
            stack = torch.stack([grids[n][i] for n in names])
            for steps in args.steps:
                t0 = time.process_time()
                found = maps_evidence(forward, pixels[i : i + 1], stack, [target] * len(names), steps=steps,
                                      n_random=args.n_random)
                seconds[steps] += time.process_time() - t0
                auc[steps]["deletion"].append([e.deletion_auc for e in found])
                auc[steps]["insertion"].append([e.insertion_auc for e in found])
                verdict[steps].append([e.beats_random for e in found])
        print(f"object {len(auc[args.steps[0]]['deletion']) // len(scenes)} of 2 scored", flush=True)
    auc = {s: {k: np.array(v) for k, v in d.items()} for s, d in auc.items()}
    verdict = {s: np.array(v) for s, v in verdict.items()}
    n_maps = len(verdict[args.steps[0]])
    if args.save:
        np.savez(args.save, names=np.array(names), steps=np.array(args.steps),
                 **{f"{k}_{s}": auc[s][k] for s in args.steps for k in ("deletion", "insertion")},
                 **{f"beats_{s}": verdict[s] for s in args.steps})

    print(f"\n{n_maps} maps per method ({args.scenes} held-out two-object scenes x 2 objects), "
          f"{args.n_random} random orders; evidence CPU s for all {len(names)} methods: "
          + ", ".join(f"steps {s}: {seconds[s]:.1f}" for s in args.steps))
    head = " | ".join(f"deletion, steps {s} | insertion, steps {s} | beats random, steps {s}" for s in args.steps)
    print(f"\n| method | {head} |\n|---|" + "---|" * (3 * len(args.steps)))
    for m, name in enumerate(names):
        cells = " | ".join(f"{auc[s]['deletion'][:, m].mean():.3f} | {auc[s]['insertion'][:, m].mean():.3f} | "
                           f"{verdict[s][:, m].mean():.2f}" for s in args.steps)
        print(f"| {name} | {cells} |")

    print("\n| steps a vs b | curve | Kendall tau of the methods' mean AUC | mean Kendall tau per map "
          "(methods ordered) | Pearson r of per-map AUCs | same `beats_random` verdict |\n|---|---|---|---|---|---|")
    for a, b in itertools.combinations(args.steps, 2):
        same = (verdict[a] == verdict[b]).mean()
        for kind in ("deletion", "insertion"):
            x, y = auc[a][kind], auc[b][kind]
            tau_means = kendalltau(x.mean(0), y.mean(0)).statistic
            taus = [kendalltau(x[i], y[i]).statistic for i in range(n_maps)]
            r = pearsonr(x.ravel(), y.ravel()).statistic
            print(f"| {a} vs {b} | {kind} | {tau_means:.3f} | {np.nanmean(taus):.3f} | {r:.3f} | {same:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
