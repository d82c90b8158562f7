"""Speed and faithfulness of the two-tower image methods (not a test).

(a) time of each method / one forward of the same model (goal for Grad-ECLIP: <= 3x);
(b) Grad-ECLIP on 16 prompts in one call (``attribute_prompts``) / on 1 prompt (goal <= 3x);
(c) on every two-tower zoo model (``shapes-clip``, ...): pointing game and deletion AUC of every
    method and of a random map, on held-out two-object scenes; each object's prompt is explained
    and scored against that object's mask.

(a) and (b) use a random-initialised CLIP of ViT-B/32 size (``CLIPConfig()`` defaults: 224 px,
12 + 12 layers) and, when present, the zoo model; medians of repeated calls, after a warm-up.
"Forward" is ``model(pixel_values, input_ids, attention_mask)`` (both towers); "warm" calls reuse
the method's cached text embeddings, "cold" ones build a new explainer each time.

Run::

    python benchmarks/bench_two_tower.py                 # everything
    python benchmarks/bench_two_tower.py --skip-speed --scenes 100
    python benchmarks/bench_two_tower.py --skip-speed --models shapes-siglip

Prints Markdown tables for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from captum_vlm import zoo  # noqa: E402
from captum_vlm.attr import (  # noqa: E402
    AttentionRollout,
    GradECLIP,
    GradientWeightedRelevancy,
    PatchWordSimilarity,
    RawAttention,
)
from captum_vlm.attr._base import upsample_grid  # noqa: E402
from captum_vlm.targets import ImageTextSimilarity  # noqa: E402

HELDOUT_SEED = 123_456  # the zoo's held-out scene seed (zoo/train.py); never used in training
TWO_TOWER = ("CLIPModel", "SiglipModel")

METHODS = {
    "Grad-ECLIP": lambda m: GradECLIP(m),
    "Grad-ECLIP (paper)": lambda m: GradECLIP(m, mode="paper"),
    "Grad-ECLIP, last 3 blocks": lambda m: GradECLIP(m, layers=[-3, -2, -1]),
    "Grad-ECLIP, all blocks": lambda m: GradECLIP(m, layers=list(range(-len(m.vision_model.encoder.layers), 0))),
    "Raw attention (mean)": lambda m: RawAttention(m),
    "Raw attention (grad)": lambda m: RawAttention(m, head_fusion="grad"),
    "Attention rollout": lambda m: AttentionRollout(m),
    "Chefer relevancy": lambda m: GradientWeightedRelevancy(m),
    "Chefer relevancy, last 2 blocks (`start_layer=-2`)": lambda m: GradientWeightedRelevancy(m, start_layer=-2),
    "Chefer relevancy, last block (`start_layer=-1`, the authors' CLIP notebook)":
        lambda m: GradientWeightedRelevancy(m, start_layer=-1),
    "Patch-word similarity": lambda m: PatchWordSimilarity(m),
}


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    return CLIPModel(CLIPConfig()).eval()


def speed(model, pixel_values, input_ids, attention_mask, label: str, repeats: int) -> list[str]:
    """Rows of the speed table for one model."""
    args = (input_ids[:1], attention_mask[:1])
    with torch.no_grad():
        forward = median_seconds(lambda: model(pixel_values=pixel_values, input_ids=args[0],
                                               attention_mask=args[1]), repeats)
    rows = [f"| {label} | forward (1 image, 1 prompt) | {forward * 1000:.1f} ms | 1.00 |"]
    similarity = ImageTextSimilarity(model)
    with torch.no_grad():
        image_only = median_seconds(lambda: similarity(pixel_values, *args), repeats)
    rows.append(f"| {label} | image-tower forward (text cached) | {image_only * 1000:.1f} ms | "
                f"{image_only / forward:.2f} |")
    for name, make in METHODS.items():
        method = make(model)
        warm = median_seconds(lambda m=method: m.attribute(pixel_values, target=0, additional_forward_args=args), repeats)
        rows.append(f"| {label} | {name}, 1 prompt (warm) | {warm * 1000:.1f} ms | {warm / forward:.2f} |")
    cold = median_seconds(lambda: GradECLIP(model).attribute(pixel_values, target=0, additional_forward_args=args), repeats)
    rows.append(f"| {label} | Grad-ECLIP, 1 prompt (cold) | {cold * 1000:.1f} ms | {cold / forward:.2f} |")
    many = (input_ids[:16], attention_mask[:16])
    explainer = GradECLIP(model)
    one = median_seconds(lambda: explainer.attribute(pixel_values, target=0, additional_forward_args=args), repeats)
    sixteen = median_seconds(lambda: explainer.attribute_prompts(pixel_values, additional_forward_args=many), repeats)
    rows.append(f"| {label} | Grad-ECLIP, 16 prompts in one call (warm) | {sixteen * 1000:.1f} ms | "
                f"{sixteen / forward:.2f} (= {sixteen / one:.2f} x 1 prompt) |")
    cold16 = median_seconds(lambda: GradECLIP(model).attribute_prompts(pixel_values, additional_forward_args=many), repeats)
    rows.append(f"| {label} | Grad-ECLIP, 16 prompts in one call (cold) | {cold16 * 1000:.1f} ms | "
                f"{cold16 / forward:.2f} (= {cold16 / cold:.2f} x 1 prompt cold) |")
    return rows


def zoo_two_tower() -> list[str]:
    names = []
    for name in zoo.list_models():
        config = json.loads((zoo.model_dir(name) / "config.json").read_text())
        if any(arch in TWO_TOWER for arch in config.get("architectures") or []):
            names.append(name)
    return names


def tokenise(processor, model, texts: list[str]):
    padding = "max_length" if type(model).__name__ == "SiglipModel" else True
    tokens = processor(text=texts, return_tensors="pt", padding=padding)
    mask = tokens.get("attention_mask")
    return tokens["input_ids"], (torch.ones_like(tokens["input_ids"]) if mask is None else mask)


def faithfulness(name: str, n_scenes: int, steps: int, only: list[str] | None = None) -> list[str]:
    """Rows of the faithfulness table for one zoo model (``only``: these rows' method names)."""
    from captum_vlm.metrics import deletion_curve, pointing_game
    from captum_vlm.zoo import scenes as sc

    model, processor = zoo.load(name)
    side = model.config.vision_config.image_size
    patch = model.config.vision_config.patch_size
    scenes = sc.make_scenes(HELDOUT_SEED, n_scenes, size=side, n_objects=2)
    pixel_values = processor(images=[s.pil() for s in scenes], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape[-2:] == (side, side)
    labels = sc.all_labels()
    input_ids, attention_mask = tokenise(processor, model, sc.zero_shot_prompts())
    args = (input_ids, attention_mask)
    similarity = ImageTextSimilarity(model)

    def probabilities(pv, ids, mask):
        return similarity(pv, ids, mask).softmax(-1)

    targets = [[labels.index(s.labels[obj]) for s in scenes] for obj in range(2)]
    masks = [torch.from_numpy(np.stack([s.objects[obj].mask for s in scenes])) for obj in range(2)]
    # ambiguous for a model without binding: the other object has the target's colour
    clear = torch.tensor([s.objects[0].colour != s.objects[1].colour for s in scenes] * 2)
    with torch.no_grad():
        top2 = probabilities(pixel_values, *args).topk(2, dim=-1).indices
    found = torch.cat([(top2 == torch.tensor(t)[:, None]).any(-1) for t in targets]).float().mean()

    torch.manual_seed(0)
    untrained = type(model)(model.config).eval()  # same architecture, random weights
    makers = dict(METHODS)
    makers["Grad-ECLIP on the untrained model"] = lambda m: GradECLIP(untrained)
    makers["Random map"] = None
    generator = torch.Generator().manual_seed(0)
    grid = (side // patch, side // patch)
    rows = []
    for method_name, make in makers.items():
        if only and method_name not in only:
            continue
        hits, aucs = [], []
        start = time.perf_counter()
        try:
            method = None if make is None else make(model)
        except ValueError as error:  # a setting this family does not have (SigLIP: no pooled token in the blocks)
            rows.append(f"| {name} | {method_name} | n/a: {str(error).split(';')[0]} | | | |")
            continue
        for obj in range(2):
            if method is None:
                maps = upsample_grid(torch.rand(len(scenes), *grid, generator=generator), (side, side), (patch, patch))
            else:
                maps = method.attribute(pixel_values, target=targets[obj], additional_forward_args=args)
            hits.append(pointing_game(maps, masks[obj]).hits.float())
            curve = deletion_curve(probabilities, pixel_values, maps, target=targets[obj], additional_forward_args=args,
                                   patch_size=patch, steps=steps, baseline=0.0, batch_size=64)
            aucs.append(curve.auc.float())
        seconds = time.perf_counter() - start
        hit, auc = torch.cat(hits), torch.cat(aucs)
        rows.append(f"| {name} | {method_name} | {hit.mean():.3f} | {hit[clear].mean():.3f} | "
                    f"{auc.mean():.3f} ± {auc.std() / len(auc) ** 0.5:.3f} | {seconds:.0f} s |")
    rows.append(f"| {name} | ({n_scenes} scenes x 2 objects; {int(clear.sum()) // 2} scenes with two colours; "
                f"the named object's prompt is in the model's top 2 for {found:.3f}) | | | | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scenes", type=int, default=100, help="held-out two-object scenes per model")
    parser.add_argument("--steps", type=int, default=16, help="deletion steps")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-faithfulness", action="store_true")
    parser.add_argument("--models", nargs="*", help="zoo models for (c) (default: every two-tower one)")
    parser.add_argument("--methods", nargs="*", help="(c): only these rows (method names as printed)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")

    if not args.skip_speed:
        print("\n| model | call | median time | / forward |\n|---|---|---|---|")
        g = torch.Generator().manual_seed(0)
        model = random_clip()
        ids = torch.randint(1, 49000, (16, 9), generator=g)
        ids[:, 0], ids[:, -1] = 49406, 49407
        mask = torch.ones_like(ids)
        pixel_values = torch.randn(1, 3, 224, 224, generator=g)
        for row in speed(model, pixel_values, ids, mask, "random CLIP ViT-B/32 size", args.repeats):
            print(row, flush=True)
        for name in zoo_two_tower():
            zmodel, processor = zoo.load(name)
            from captum_vlm.zoo import scenes as sc

            side = zmodel.config.vision_config.image_size
            pv = processor(images=[sc.make_scene(HELDOUT_SEED, size=side).pil()], return_tensors="pt")["pixel_values"]
            prompts = sc.zero_shot_prompts() + sc.zero_shot_prompts()[:4]
            zids, zmask = tokenise(processor, zmodel, prompts)
            for row in speed(zmodel, pv, zids, zmask, name, args.repeats):
                print(row, flush=True)

    if not args.skip_faithfulness:
        names = args.models or zoo_two_tower()
        if not names:
            print("\nno two-tower model in the zoo yet: faithfulness (c) skipped")
            return
        print("\n| model | method | pointing game | pointing game, two-colour scenes | "
              "deletion AUC (probability, lower is better) | time |\n|---|---|---|---|---|---|")
        for name in names:
            for row in faithfulness(name, args.scenes, args.steps, args.methods):
                print(row, flush=True)


if __name__ == "__main__":
    main()
