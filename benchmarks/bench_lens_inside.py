"""Inside the zoo models: logit lens, linear probes and head ablation (issue 13).

1. Logit lens on ``shapes-blip-vqa``: held-out two-object scenes, the questions "what color is
   the <shape>?" and "what shape is the <colour> object?"; the model's own greedy answer is
   lensed at every decoder layer. Reported: the mean rank of the produced token per layer (it
   must be 1 at the last layer) and the answer accuracy. Batching: CPU time of the lens one row
   at a time vs 16 rows per forward, on the same questions, and their largest difference.
2. Probes on ``shapes-clip``: one-object scenes, the object's colour and its shape as labels, a
   probe on the pooled (CLS) token at every vision layer with the label-shuffled control; and a
   patch probe "this patch lies on the object" (labels from the scene masks).
3. Head ablation on ``shapes-clip``: one-object scenes, target the zero-shot logit (and the
   log-probability) of the object's prompt among the 12 prompts. Heads are ranked by single-head ablation on one
   set of scenes; on 50 other scenes the top-k heads are ablated together and compared with k
   random heads (10 draws); spread over scenes. "Ranking stability" is the Spearman correlation
   of the single-head importances measured on the ranking scenes and on the evaluation scenes.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_lens_inside.py
    OMP_NUM_THREADS=1 python benchmarks/bench_lens_inside.py --lens-scenes 20 --probe-scenes 100
    OMP_NUM_THREADS=1 python benchmarks/bench_lens_inside.py --ablation-targets logit log-probability
    OMP_NUM_THREADS=1 python benchmarks/bench_lens_inside.py --only batching --lens-scenes 20

Prints Markdown tables for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from captum_vlm import zoo  # noqa: E402
from captum_vlm.lens import ablate_heads, head_importance, logit_lens, patch_labels, probe  # noqa: E402
from captum_vlm.lens.logit_lens import mean_rank_per_layer  # noqa: E402
from captum_vlm.targets import ImageTextSimilarity  # noqa: E402

HELDOUT_SEED = 123_456  # the zoo's held-out scene seed (zoo/train.py)


def bench_logit_lens(n_scenes: int) -> None:
    model, processor = zoo.load("shapes-blip-vqa")
    lenses, correct, first = [], [], []
    for scene in zoo.scenes.make_scenes(HELDOUT_SEED, n_scenes, size=64, n_objects=2):
        questions = [(q, a) for q, a in scene.vqa if q.startswith(("what color", "what shape"))][:2]
        for question, truth in questions:
            lens = logit_lens(model, processor, scene.pil(), question, k=5, max_new_tokens=5)
            lenses.append(lens)
            first.append(lens.produced_ranks[:, :1].float())
            answer = processor.tokenizer.decode(lens.produced_ids, skip_special_tokens=True).strip()
            correct.append(answer == truth)
    ranks = mean_rank_per_layer(lenses)
    word = torch.cat(first, dim=1).mean(dim=1).numpy()
    n_positions = sum(len(lens.positions) for lens in lenses)
    print(f"\n**Logit lens, shapes-blip-vqa** ({len(lenses)} questions on {n_scenes} held-out two-object "
          f"scenes, seed {HELDOUT_SEED}; greedy answers, accuracy {np.mean(correct):.3f}; "
          f"{n_positions} lensed positions)\n")
    print("| layer | mean rank of produced token (all positions) | mean rank of the answer word |")
    print("|---|---|---|")
    for layer, (r, w) in enumerate(zip(ranks, word)):
        name = "0 (embeddings)" if layer == 0 else str(layer)
        print(f"| {name} | {r:.2f} | {w:.2f} |")


def bench_logit_lens_batch(n_scenes: int, batch_size: int = 16) -> None:
    """CPU time of the logit lens one question at a time vs ``batch_size`` rows per forward, on
    the same questions with their true answers given (no generation), and the largest difference."""
    model, processor = zoo.load("shapes-blip-vqa")
    rows = [(scene.pil(), q, a) for scene in zoo.scenes.make_scenes(HELDOUT_SEED, n_scenes, size=64, n_objects=2)
            for q, a in scene.vqa if q.startswith("what color")]
    images, questions, answers = map(list, zip(*rows))
    timings, results = {}, {}
    for name, size in (("one by one", 1), (f"batch_size={batch_size}", batch_size)):
        start = time.process_time()
        results[name] = logit_lens(model, processor, images, questions, answer=answers, k=5, batch_size=size)
        timings[name] = time.process_time() - start
    alone, batched = results.values()
    diff = max(float((a.produced_probs - b.produced_probs).abs().max()) for a, b in zip(alone, batched))
    same_ranks = all(bool((a.produced_ranks == b.produced_ranks).all()) for a, b in zip(alone, batched))
    one, many = timings.values()
    print(f"\n**Logit lens batching, shapes-blip-vqa** ({len(rows)} 'what color' questions on {n_scenes} held-out "
          "two-object scenes, true answers given; CPU time (process_time), one torch thread)\n")
    print("| rows per forward | CPU s | ratio to one by one | max abs diff of produced-token probability | ranks equal |")
    print("|---|---|---|---|---|")
    print(f"| 1 | {one:.2f} | 1.00 | - | - |")
    print(f"| {batch_size} | {many:.2f} | {many / one:.2f} | {diff:.1e} | {same_ranks} |")


def bench_probes(n_scenes: int) -> None:
    model, processor = zoo.load("shapes-clip")
    scenes = zoo.scenes.make_scenes(HELDOUT_SEED, n_scenes, size=64, n_objects=1)
    pixels = processor(images=[s.pil() for s in scenes], return_tensors="pt")["pixel_values"]
    rows = {}
    for kind, index in (("colour", 0), ("shape", 1)):
        rows[kind] = probe(model, None, pixels, [s.labels[0][index] for s in scenes], cv=5, seed=0)
    grid = rows["colour"].grid
    masks = np.stack([patch_labels(s.objects[0].mask, grid) for s in scenes[: n_scenes // 2]])
    rows["patch on the object"] = probe(model, None, pixels[: n_scenes // 2], masks, where="patches", cv=5)
    print(f"\n**Linear probes, shapes-clip vision tower** ({n_scenes} held-out one-object scenes, seed "
          f"{HELDOUT_SEED}; 5-fold CV, accuracy mean ± sd over folds; control = same probe on shuffled "
          f"labels; patch probe on the first {n_scenes // 2} scenes, {grid[0]}x{grid[1]} patches each, "
          "folds split by image)\n")
    print("| label (chance) | " + " | ".join(f"layer {x}" for x in rows["colour"].layers) + " |")
    print("|---|" + "---|" * len(rows["colour"].layers))
    for kind, result in rows.items():
        cells = [f"{a:.3f} ± {s:.3f} (ctl {c:.3f})"
                 for a, s, c in zip(result.accuracy, result.accuracy_std, result.control)]
        print(f"| {kind} ({result.chance:.2f}) | " + " | ".join(cells) + " |")


class PromptLogProb:
    """The zero-shot log-probability of each prompt (log-softmax of the similarity logits)."""

    def __init__(self, model):
        self.similarity = ImageTextSimilarity(model)

    def __call__(self, pixel_values, input_ids, attention_mask):
        return torch.log_softmax(self.similarity(pixel_values, input_ids, attention_mask), dim=-1)


def bench_head_ablation(n_scenes: int, k: int, draws: int, targets_to_run: tuple[str, ...] = ("logit",)) -> None:
    model, processor = zoo.load("shapes-clip")
    prompts = zoo.scenes.zero_shot_prompts()
    text = processor(text=prompts, return_tensors="pt", padding=True)
    args = (text["input_ids"], text["attention_mask"])
    scenes = zoo.scenes.make_scenes(HELDOUT_SEED, 2 * n_scenes, size=64, n_objects=1)
    targets = torch.tensor([prompts.index(zoo.scenes.phrase(*s.labels[0])) for s in scenes])
    pixels = processor(images=[s.pil() for s in scenes], return_tensors="pt")["pixel_values"]
    rank_px, eval_px = pixels[:n_scenes], pixels[n_scenes:]
    rank_t, eval_t = targets[:n_scenes], targets[n_scenes:]
    print(f"\n**Head ablation, shapes-clip vision tower** (one-object scenes; target: the object's prompt "
          f"among the 12 zero-shot prompts; heads ranked by single-head ablation on {n_scenes} held-out scenes, "
          f"evaluated on {n_scenes} other scenes, seed {HELDOUT_SEED}; the top-{k} heads ablated together vs "
          f"{k} random heads, {draws} draws; drops are baseline - ablated)\n")
    print("| target | mode | top heads | baseline | drop, top heads (mean ± sd over scenes) | drop, random "
          "heads (mean ± sd over scenes x draws) | paired top - random (mean ± sd over scenes) | scenes "
          "top > random | ranking stability |")
    print("|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    maps = {}
    kinds = {"logit": ImageTextSimilarity(model), "log-probability": PromptLogProb(model)}
    for name, target in ((name, kinds[name]) for name in targets_to_run):
        for mode in ("zero", "mean"):
            ranking = head_importance(model, target, rank_px, args, target=rank_t, mode=mode)
            maps[(name, mode)] = ranking.importance
            top = ranking.ranked[:k]
            n_layers, n_heads = ranking.importance.shape
            all_heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
            with torch.no_grad():
                base = target(eval_px, *args).gather(1, eval_t[:, None])[:, 0]
                with ablate_heads(model, top, mode=mode):
                    top_drop = base - target(eval_px, *args).gather(1, eval_t[:, None])[:, 0]
                random_drops = []
                for _ in range(draws):
                    chosen = [all_heads[i] for i in rng.choice(len(all_heads), size=k, replace=False)]
                    with ablate_heads(model, chosen, mode=mode):
                        random_drops.append(base - target(eval_px, *args).gather(1, eval_t[:, None])[:, 0])
            random_drops = torch.stack(random_drops)
            paired = top_drop - random_drops.mean(0)
            again = head_importance(model, target, eval_px, args, target=eval_t, mode=mode).importance
            stability = spearmanr(ranking.importance.ravel(), again.ravel()).statistic
            print(f"| {name} | {mode} | {top} | {base.mean():.2f} | {top_drop.mean():.2f} ± {top_drop.std():.2f} | "
                  f"{random_drops.mean():.2f} ± {random_drops.std():.2f} | {paired.mean():.2f} ± {paired.std():.2f} | "
                  f"{(paired > 0).float().mean():.2f} | {stability:.2f} |")
    for (name, mode), importance in maps.items():
        if mode != "zero":
            continue
        print(f"\nSingle-head importance ({name}, zero ablation, mean drop on the ranking scenes), layer x head:\n")
        print("| layer | " + " | ".join(f"head {h}" for h in range(importance.shape[1])) + " |")
        print("|---|" + "---|" * importance.shape[1])
        for layer, row in enumerate(importance):
            print(f"| {layer} | " + " | ".join(f"{v:.2f}" for v in row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lens-scenes", type=int, default=50)
    parser.add_argument("--probe-scenes", type=int, default=200)
    parser.add_argument("--ablation-scenes", type=int, default=50)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--ablation-targets", nargs="+", default=["logit"], choices=["logit", "log-probability"])
    parser.add_argument("--only", choices=["logit-lens", "batching", "probes", "ablation"], help="run one part")
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = (("logit-lens", lambda: bench_logit_lens(args.lens_scenes)),
             ("batching", lambda: bench_logit_lens_batch(args.lens_scenes)),
             ("probes", lambda: bench_probes(args.probe_scenes)),
             ("ablation", lambda: bench_head_ablation(args.ablation_scenes, args.top_k, args.draws,
                                                      tuple(args.ablation_targets))))
    for name, run in parts:
        if args.only not in (None, name):
            continue
        start = time.perf_counter()
        run()
        print(f"\n({name}: {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
