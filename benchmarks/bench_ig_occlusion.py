"""Benchmarks for TokenIntegratedGradients and CausalOcclusion (issue #6), printed side by side.

1. Occlusion speed: token-drop occlusion vs Captum ``Occlusion`` painting pixels, same windows,
   same ``perturbations_per_eval``; and the deletion AUC of both maps.
2. IG peak memory with and without ``internal_batch_size``: each run in a fresh subprocess,
   peak resident memory (``ru_maxrss``) minus resident memory just before ``attribute``.
3. Pointing game of both methods on zoo scenes, when ``shapes-clip`` is installed.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_ig_occlusion.py`` (CPU, one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from captum.attr import Occlusion
from transformers import CLIPConfig, CLIPModel

from captum_vlm.attr import CausalOcclusion, TokenIntegratedGradients
from captum_vlm.metrics import deletion_curve, pointing_game
from captum_vlm.targets import ImageTextSimilarity

IMAGE, PATCH = 224, 16  # ViT-B/16 geometry: a 14 x 14 grid


def vit_clip(seed: int = 0) -> CLIPModel:
    """A random-initialised CLIP with ViT-B/16 geometry (196 patches) but a narrower width."""
    torch.manual_seed(seed)
    vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                  image_size=IMAGE, patch_size=PATCH)
    text = dict(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=32, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=128)).eval()


def prompts(k: int = 8, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 1000, (k, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    return ids, torch.ones_like(ids)


def best_time(fn, repeats: int = 2) -> tuple[float, object]:
    """Least CPU time (``time.process_time``: one torch thread, so this is the work done and
    not the waiting on a shared machine) over ``repeats`` runs, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.process_time()
        out = fn()
        best = min(best, time.process_time() - start)
    return best, out


def occlusion_speed(repeats: int) -> None:
    model = vit_clip()
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    ids, mask = prompts()
    target, per_eval = 3, 16
    occ = CausalOcclusion(model)
    sim = ImageTextSimilarity(model)
    print("\n## 1. Occlusion: token drop vs Captum Occlusion painting pixels (CLIP ViT-B/16 geometry, "
          f"14x14 grid, width 256, 6 layers, 1 image, {ids.shape[0]} prompts, perturbations_per_eval={per_eval}, "
          f"CPU seconds, best of {repeats} interleaved runs; naive: one run)")
    print(f"{'window/stride (patches)':>24} {'evals':>6} {'drop s':>8} {'paint s':>8} {'naive s':>8} "
          f"{'paint/drop':>10} {'naive/drop':>10} {'AUC drop':>9} {'AUC paint':>9}")

    def naive(pix, input_ids, attention_mask):  # the model's own forward: text re-encoded every eval
        return model(input_ids=input_ids, pixel_values=pix, attention_mask=attention_mask).logits_per_image

    def captum_paint(forward, window, stride, per_eval=per_eval):
        return Occlusion(forward).attribute(
            pixels, sliding_window_shapes=(3, window * PATCH, window * PATCH),
            strides=(3, stride * PATCH, stride * PATCH), baselines=0.0, target=target,
            additional_forward_args=(ids, mask), perturbations_per_eval=per_eval,
        )

    for window, stride in ((1, 1), (2, 2), (4, 2)):
        n_windows = (1 + (14 - window) // stride) ** 2
        common = dict(target=target, additional_forward_args=(ids, mask), window=window, stride=stride,
                      perturbations_per_eval=per_eval, intervention="drop")
        t_drop = t_paint = float("inf")
        for _ in range(repeats):  # interleaved, best of each: the machine is shared
            seconds, drop_map = best_time(lambda c=common: occ.attribute(pixels, **c), 1)
            t_drop = min(t_drop, seconds)
            seconds, paint_map = best_time(lambda w=window, s=stride: captum_paint(sim, w, s), 1)
            t_paint = min(t_paint, seconds)
        with torch.no_grad():
            t_naive, _ = best_time(lambda w=window, s=stride: captum_paint(naive, w, s), 1)
        if window == 2:
            t_drop_2x2 = t_drop
        aucs = []
        for heat in (drop_map, paint_map):
            curve = deletion_curve(sim, pixels, heat, target=target, additional_forward_args=(ids, mask),
                                   patch_size=PATCH, steps=14, baseline=0.0)
            aucs.append(curve.mean_auc)
        print(f"{f'{window}x{window} / {stride}':>24} {n_windows:>6} {t_drop:>8.2f} {t_paint:>8.2f} {t_naive:>8.2f} "
              f"{t_paint / t_drop:>9.2f}x {t_naive / t_drop:>9.2f}x {aucs[0]:>9.3f} {aucs[1]:>9.3f}")
    with torch.no_grad():
        t_default, _ = best_time(lambda: captum_paint(naive, 2, 2, per_eval=1), 1)
    print(f"Captum Occlusion as a user calls it by default (model forward, perturbations_per_eval=1), 2x2 / 2: "
          f"{t_default:.2f} s, {t_default / t_drop_2x2:.2f}x the token-drop time with 16 per eval "
          "(this ratio is mostly batching, not dropping)")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def ig_memory_child(internal_batch_size: int | None, n_steps: int) -> None:
    """Runs in a fresh process; prints a JSON line with peak memory and time."""
    torch.set_num_threads(1)
    model = vit_clip()
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    ids, mask = prompts()
    ig = TokenIntegratedGradients(model)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    (image, text), delta = ig.attribute(pixels, target=3, additional_forward_args=(ids, mask), modality="both",
                                        n_steps=n_steps, internal_batch_size=internal_batch_size,
                                        return_convergence_delta=True, return_grid=True)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - before) / 1024, "seconds": seconds, "delta": float(delta.abs().max()),
                      "image_sum": float(image.sum()), "text_sum": float(text.sum())}))


def ig_memory(n_steps: int) -> None:
    print(f"\n## 2. TokenIntegratedGradients peak memory (same model, modality='both', n_steps={n_steps}; "
          "each run in a fresh process; peak RSS (VmHWM, reset through /proc/self/clear_refs just before "
          "attribute) minus RSS at that moment)")
    print(f"{'internal_batch_size':>20} {'peak MiB':>9} {'seconds':>8} {'|delta|':>9} {'sum image':>10} {'sum text':>10}")
    rows = {}
    for ibs in (None, 16, 4):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run([sys.executable, __file__, "--ig-child", str(ibs), "--steps", str(n_steps)],
                             capture_output=True, text=True, env=env, check=True)
        rows[ibs] = json.loads(out.stdout.strip().splitlines()[-1])
        r = rows[ibs]
        print(f"{str(ibs):>20} {r['peak_mib']:>9.0f} {r['seconds']:>8.2f} {r['delta']:>9.2e} "
              f"{r['image_sum']:>10.4f} {r['text_sum']:>10.4f}")
    print(f"peak memory ratio None/4: {rows[None]['peak_mib'] / max(rows[4]['peak_mib'], 1e-9):.1f}x")


def pointing(n_scenes: int) -> None:
    print("\n## 3. Zoo scenes: pointing game, deletion AUC and time of both methods")
    try:
        from captum_vlm import zoo

        model, processor = zoo.load("shapes-clip")
    except Exception as error:  # noqa: BLE001 - any failure means the zoo model is not there
        print(f"skipped: shapes-clip is not available ({type(error).__name__}: {error})")
        return
    zoo_table(model, processor, n_scenes)


def zoo_table(model, processor, n_scenes: int) -> None:
    """Pointing game (mask of the object the target prompt names, in scenes of two objects),
    deletion AUC of the target's logit against the 12 zero-shot prompts, the grounding test, and CPU time per
    image, on ``n_scenes`` scenes."""
    from captum_vlm import zoo

    texts = zoo.scenes.zero_shot_prompts()
    scenes = zoo.scenes.make_scenes(seed=12345, count=n_scenes, n_objects=2)
    ig, occ = TokenIntegratedGradients(model), CausalOcclusion(model)
    sim = ImageTextSimilarity(model)
    methods = {
        "TokenIntegratedGradients (image, 50 steps)": lambda p, k, a: ig.attribute(p, target=k, additional_forward_args=a),
        "CausalOcclusion drop 1x1": lambda p, k, a: occ.attribute(p, target=k, additional_forward_args=a,
                                                                  perturbations_per_eval=16),
        "CausalOcclusion paint 1x1": lambda p, k, a: occ.attribute(p, target=k, additional_forward_args=a,
                                                                   intervention="paint", perturbations_per_eval=16),
    }

    results = {name: {"maps": [], "auc": [], "seconds": 0.0, "grounded": [], "flip": [], "flip_random": []}
               for name in methods}
    masks, correct = [], 0
    for scene in scenes:
        inputs = processor(images=scene.pil(), text=texts, return_tensors="pt", padding=True)
        args = (inputs["input_ids"], inputs["attention_mask"])
        pix = inputs["pixel_values"]
        k = texts.index(f"a {scene.objects[0].colour} {scene.objects[0].shape}")
        with torch.no_grad():
            correct += int(sim(pix, *args).argmax(-1).item() == k)
        masks.append(torch.as_tensor(scene.objects[0].mask))
        for name, method in methods.items():
            start = time.process_time()
            heat = method(pix, k, args)
            results[name]["seconds"] += time.process_time() - start
            results[name]["maps"].append(heat[0])
            patch = model.config.vision_config.patch_size
            curve = deletion_curve(sim, pix, heat, target=k, additional_forward_args=args,
                                   patch_size=patch, steps=16, baseline=0.0)
            results[name]["auc"].append(curve.mean_auc)
            verdict = occ.grounding_test(pix, heat, target=k, additional_forward_args=args, fraction=0.25,
                                         n_random=5, seed=0)
            results[name]["grounded"].append(float(verdict.grounded.float().mean()))
            results[name]["flip"].append(verdict.flip_rate_relevant)
            results[name]["flip_random"].append(verdict.flip_rate_random)
    mask = torch.stack(masks)
    print(f"{n_scenes} two-object scenes (seed 12345), target = the first object's prompt among 12, mask = that "
          f"object; the target prompt is the top-1 prompt in {correct}/{n_scenes} scenes; "
          "deletion over 16 steps of 1/16 of the patches, baseline 0, score = the target's logit.")
    print("grounding test: drop the top 25% patches of the map vs 5 draws of 25% random patches")
    print(f"{'method':>44} {'pointing game':>14} {'deletion AUC':>13} {'CPU s/image':>12} {'grounded':>9} "
          f"{'flip top':>9} {'flip random':>12}")
    for name, r in results.items():
        heat = torch.stack(r["maps"])
        if heat.shape[-2:] != mask.shape[-2:]:
            heat = torch.nn.functional.interpolate(heat, size=mask.shape[-2:], mode="nearest")
        hits = pointing_game(heat, mask).mean
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        print(f"{name:>44} {hits:>14.3f} {mean(r['auc']):>13.3f} {r['seconds'] / n_scenes:>12.3f} "
              f"{mean(r['grounded']):>9.2f} {mean(r['flip']):>9.2f} {mean(r['flip_random']):>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ig-child", default=None)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scenes", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.ig_child is not None:
        ig_memory_child(None if args.ig_child == "None" else int(args.ig_child), args.steps)
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU")
    occlusion_speed(args.repeats)
    ig_memory(args.steps)
    pointing(args.scenes)


if __name__ == "__main__":
    main()
