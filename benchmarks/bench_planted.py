"""Do the diagnostics catch the zoo's planted failures?

1. **Shortcut** (``shapes-clip-shortcut`` against ``shapes-clip``): held-out single-object scenes
   that carry the planted marker (``make_scene(..., marker=True)``) and whose object is not the
   shortcut's concept. For each method, the share of the map's positive mass that lies on the
   marker's patches (the patches the marker touches: 2 of the 64, 3.1 % of the image, so a
   uniform map scores 0.031), explaining (a) the shortcut concept's prompt ("a blue square") and
   (b) the prompt of the object that is really there. A model that reads the marker should put
   clearly more mass there than one that does not.
2. **Language prior** (``shapes-blip-vqa-prior``, with ``shapes-blip-vqa`` as a control): held-out
   scenes with one square that is *not* blue, asked "what color is the square?". Answers are
   split into prior-driven ("blue", wrong) and correct ones; ``CausalOcclusion.grounding_test``
   (drop intervention, default target: the summed log-probability of the model's own answer)
   masks the top ``fraction`` of patches of a map and as many random ones. Two maps: the
   square's own mask (masking the object asked about) and the ``CausalOcclusion`` 1x1 map of
   the answer. A prior-driven answer should survive losing the square: "not grounded".

Run::

    python benchmarks/bench_planted.py                        # both parts
    python benchmarks/bench_planted.py --part shortcut --scenes 40 --steps 16
    python benchmarks/bench_planted.py --part prior --questions 300

Prints Markdown tables for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from captum_vlm import zoo  # noqa: E402
from captum_vlm.attr import (  # noqa: E402
    CausalOcclusion,
    GradECLIP,
    GradientWeightedRelevancy,
    TokenIntegratedGradients,
)
from captum_vlm.zoo import scenes as sc  # noqa: E402
from captum_vlm.zoo import train_blip  # noqa: E402
from captum_vlm.zoo.train import HELDOUT_SEED, RECIPES, marker_label  # noqa: E402

FRACTIONS = (0.05, 0.1, 0.2, 0.3)


# --------------------------------------------------------------------------- 1. shortcut


def marker_patches(hw: tuple[int, int], patch: int) -> torch.Tensor:
    """Pixel mask ``[H, W]`` of the patches the marker touches."""
    mask = torch.from_numpy(sc.make_scene(0, size=hw, marker=True).marker_mask)
    h, w = hw[0] // patch, hw[1] // patch
    touched = mask[: h * patch, : w * patch].reshape(h, patch, w, patch).any(3).any(1)
    return touched.repeat_interleave(patch, 0).repeat_interleave(patch, 1)


def marker_share(maps: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Share ``[B]`` of each map's positive mass inside ``region`` (channels summed first)."""
    if maps.dim() == 4:
        maps = maps.sum(1)
    positive = maps.clamp(min=0)
    total = positive.flatten(1).sum(1)
    inside = (positive * region).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp(min=1e-30), torch.zeros_like(total))


def shortcut_scenes(concept: tuple[str, str], n: int, seed: int) -> list[sc.Scene]:
    """``n`` held-out single-object scenes with the marker, whose object is not ``concept``."""
    rng = np.random.default_rng([seed, 20])
    out = []
    while len(out) < n:
        scene = sc.make_scene(rng, n_objects=1, marker=True)
        if scene.labels[0] != tuple(concept):
            out.append(scene)
    return out


def shortcut_table(n_scenes: int, steps: int, seed: int = HELDOUT_SEED) -> list[str]:
    """Rows of the marker-mass table (both models, every method, both targets)."""
    concept = marker_label(RECIPES["shapes-clip-shortcut"])
    labels = sc.all_labels()
    scenes = shortcut_scenes(concept, n_scenes, seed)
    methods = {
        "Grad-ECLIP": lambda m: (lambda p, t, a: GradECLIP(m).attribute(p, target=t, additional_forward_args=a)),
        "Grad-ECLIP, all blocks": lambda m: (
            lambda p, t, a: GradECLIP(m, layers=list(range(-len(m.vision_model.encoder.layers), 0))).attribute(
                p, target=t, additional_forward_args=a
            )
        ),
        "Chefer relevancy": lambda m: (
            lambda p, t, a: GradientWeightedRelevancy(m).attribute(p, target=t, additional_forward_args=a)
        ),
        f"TokenIntegratedGradients ({steps} steps)": lambda m: (
            lambda p, t, a: TokenIntegratedGradients(m).attribute(
                p, target=t, additional_forward_args=a, n_steps=steps, internal_batch_size=4 * steps
            )
        ),
        "CausalOcclusion drop 1x1": lambda m: (
            lambda p, t, a: CausalOcclusion(m).attribute(
                p, target=t, additional_forward_args=a, perturbations_per_eval=16
            )
        ),
    }
    rows = [
        f"Held-out scenes: {n_scenes} single objects with the marker, none a {' '.join(concept)} "
        f"(`default_rng([{seed}, 20])`); marker region = the 2 patches it touches (uniform map: 0.031).",
        "",
        "| model | method | marker share, prompt 'a " + " ".join(concept) + "' (mean ± sd; median) "
        "| marker share, the object's own prompt (mean ± sd; median) | s |",
        "|---|---|---|---|---|",
    ]
    generator = torch.Generator().manual_seed(0)
    for name in ("shapes-clip-shortcut", "shapes-clip"):
        model, processor = zoo.load(name)
        inputs = processor(images=[s.pil() for s in scenes], text=sc.zero_shot_prompts(), return_tensors="pt",
                           padding=True)
        pixel_values, args = inputs["pixel_values"], (inputs["input_ids"], inputs["attention_mask"])
        patch = model.config.vision_config.patch_size
        region = marker_patches(tuple(pixel_values.shape[-2:]), patch)
        with torch.no_grad():
            top = model(**inputs).logits_per_image.argmax(-1)
        called = float((top == labels.index(tuple(concept))).float().mean())
        targets = {
            "concept": [labels.index(tuple(concept))] * len(scenes),
            "own": [labels.index(s.labels[0]) for s in scenes],
        }
        for method_name, make in methods.items():
            start = time.perf_counter()
            cells = []
            for key in ("concept", "own"):
                shares = torch.cat([
                    marker_share(make(model)(pixel_values[i : i + 10], targets[key][i : i + 10], args), region)
                    for i in range(0, len(scenes), 10)
                ])
                cells.append(f"{shares.mean():.3f} ± {shares.std():.3f}; {shares.median():.3f}")
            rows.append(f"| {name} | {method_name} | {cells[0]} | {cells[1]} | {time.perf_counter() - start:.0f} |")
        noise = marker_share(torch.rand(len(scenes), *pixel_values.shape[-2:], generator=generator), region)
        rows.append(f"| {name} | random map | {noise.mean():.3f} ± {noise.std():.3f} | same | |")
        rows.append(f"| {name} | (top-1 prompt is 'a {' '.join(concept)}' on {called:.2f} of these scenes) | | | |")
    return rows


# --------------------------------------------------------------------------- 2. language prior


def _grid_of(mask: np.ndarray, patch: int) -> torch.Tensor:
    """Share of each patch covered by a pixel mask, ``[h, w]``."""
    m = torch.from_numpy(mask).float()
    h, w = m.shape[0] // patch, m.shape[1] // patch
    return m[: h * patch, : w * patch].reshape(h, patch, w, patch).mean((1, 3))


def prior_table(n_questions: int, seed: int = HELDOUT_SEED, chunk: int = 25) -> list[str]:
    """Rows of the grounding-test table: not-grounded rate by answer kind, map and fraction."""
    prior = train_blip.language_prior(train_blip.RECIPES["shapes-blip-vqa-prior"])
    scenes = train_blip.prior_scenes(prior, seed, n_questions, against=True)
    rows = [
        f"Held-out scenes: {n_questions} with one non-{prior.colour} {prior.shape} "
        f"(`train_blip.prior_scenes(seed={seed}, against=True)`), asked '{prior.question}'. "
        "Cells: share judged NOT grounded (n answers).",
        "",
        "| model | answers | map | " + " | ".join(f"fraction {f}" for f in FRACTIONS) + " |",
        "|---|---|---|" + "---|" * len(FRACTIONS),
    ]
    for name in ("shapes-blip-vqa-prior", "shapes-blip-vqa"):
        model, processor = train_blip.load_blip(name)
        patch = model.config.vision_config.patch_size
        answers = train_blip.answer(model, processor, [s.image for s in scenes], [prior.question] * len(scenes))
        truth = [train_blip.prior_object(prior, s) for s in scenes]
        groups = {
            f"prior-driven ('{prior.colour}', wrong)": [i for i, a in enumerate(answers) if a == prior.colour],
            "correct": [i for i, (a, t) in enumerate(zip(answers, truth)) if a == t[0]],
        }
        occ = CausalOcclusion(model)
        for group, idx in groups.items():
            if not idx:
                rows.append(f"| {name} | {group} | - | " + " | ".join("(0)" for _ in FRACTIONS) + " |")
                continue
            start = time.perf_counter()
            verdicts = {("square mask", f): [] for f in FRACTIONS} | {("occlusion map", f): [] for f in FRACTIONS}
            for c in range(0, len(idx), chunk):
                part = idx[c : c + chunk]
                inputs = processor(images=[scenes[i].image for i in part], text=[prior.question] * len(part),
                                   return_tensors="pt")
                ans = processor.tokenizer([answers[i] for i in part], return_tensors="pt", padding=True)
                args = (inputs["input_ids"], inputs["attention_mask"], ans["input_ids"], ans["attention_mask"])
                pixel_values = inputs["pixel_values"]
                maps = {
                    "square mask": torch.stack([_grid_of(scenes[i].objects[truth[i][1]].mask, patch) for i in part]),
                    "occlusion map": occ.attribute(pixel_values, additional_forward_args=args, return_grid=True,
                                                   perturbations_per_eval=16),
                }
                for map_name, heat in maps.items():
                    for f in FRACTIONS:
                        result = occ.grounding_test(pixel_values, heat, additional_forward_args=args, fraction=f)
                        verdicts[(map_name, f)] += (~result.grounded).tolist()
            for map_name in ("square mask", "occlusion map"):
                cells = [f"{np.mean(verdicts[(map_name, f)]):.2f}" for f in FRACTIONS]
                rows.append(f"| {name} | {group} (n={len(idx)}) | {map_name} | " + " | ".join(cells) + " |")
            rows.append(f"| {name} | ({group}: {time.perf_counter() - start:.0f} s) | | " + " | " * len(FRACTIONS))
        rate = len(groups[f"prior-driven ('{prior.colour}', wrong)"]) / len(scenes)
        rows.append(f"| {name} | (answered '{prior.colour}' on {rate:.3f} of these scenes; "
                    f"correct on {len(groups['correct']) / len(scenes):.3f}) | | " + " | " * len(FRACTIONS))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("shortcut", "prior", "both"), default="both")
    parser.add_argument("--scenes", type=int, default=40, help="shortcut part: held-out scenes")
    parser.add_argument("--steps", type=int, default=16, help="shortcut part: IG steps")
    parser.add_argument("--questions", type=int, default=300, help="prior part: held-out scenes")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    missing = [m for m in ("shapes-clip-shortcut", "shapes-blip-vqa-prior") if m not in zoo.list_models()]
    if args.part in ("shortcut", "both"):
        if "shapes-clip-shortcut" in missing:
            print("shapes-clip-shortcut is not in the zoo yet; train it first.")
        else:
            print("## Planted shortcut: attribution mass on the marker\n")
            print("\n".join(shortcut_table(args.scenes, args.steps)), end="\n\n")
    if args.part in ("prior", "both"):
        if "shapes-blip-vqa-prior" in missing:
            print("shapes-blip-vqa-prior is not in the zoo yet; train it first.")
        else:
            print("## Planted language prior: grounding test\n")
            print("\n".join(prior_table(args.questions)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
