"""The alignment lens on the zoo (not a test).

(a) retrieval: 200 held-out scenes (``zoo.scenes.make_scenes(HELDOUT_SEED, 200)``) with their
    captions (duplicates merged, each image paired with its own caption) through shapes-clip,
    shapes-siglip and shapes-blip-itm: recall@1/5 both ways, mean ranks, block-diagonal share;
    the modality gap of the same embeddings.
(b) projection: 200 held-out single-object scenes (``make_scenes(HELDOUT_SEED, 200, n_objects=1)``,
    the zero-shot set of zoo/train.py) plus the 12 zero-shot prompts, projected with PCA, t-SNE
    and UMAP: trustworthiness, 10-NN agreement, and the share of each point's 10 nearest
    neighbours with the same colour / same shape, in 2-D and in the full space.
(c) speed: images embedded per second at batch sizes 1, 8 and 32 (best of ``--repeats``).
(d) memory: peak resident memory of ``embed`` over 100, 500 and 1000 image files, each in a fresh
    process, with and without thumbnails, against embedding 1000 images in one forward
    (``--skip-memory`` to leave it out; ``--only-memory`` to run it alone).

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_lens.py
    OMP_NUM_THREADS=1 python benchmarks/bench_lens.py --models shapes-clip --skip-memory

Prints Markdown tables for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from bench_ig_occlusion import _status_kib  # noqa: E402  (this folder is on sys.path when run as a script)

from captum_vlm import lens, zoo  # noqa: E402
from captum_vlm.lens.projection import label_agreement  # noqa: E402
from captum_vlm.zoo.train import HELDOUT_SEED  # noqa: E402

MODELS = ("shapes-clip", "shapes-siglip", "shapes-blip-itm")


def retrieval_and_gap(names: list[str], n: int) -> None:
    scenes = zoo.scenes.make_scenes(HELDOUT_SEED, n)
    captions = list(dict.fromkeys(s.caption for s in scenes))
    pairs = [captions.index(s.caption) for s in scenes]
    print(f"\n## (a) Retrieval on {n} held-out scenes (seed {HELDOUT_SEED}), {len(captions)} distinct captions")
    print("| model | i→t R@1 | i→t R@5 | t→i R@1 | t→i R@5 | mean rank i→t | mean rank t→i | diagonal = row max "
          "| centroid distance | 10-NN of other modality | embed s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        model, processor = zoo.load(name)
        start = time.perf_counter()
        emb = lens.embed(model, processor, images=[s.pil() for s in scenes], texts=captions, pairs=pairs)
        seconds = time.perf_counter() - start
        s = lens.alignment_scores(emb.similarity(), pairs, ks=(1, 5))
        gap = lens.modality_gap(emb, k=10)
        print(f"| {name} | {s.image_to_text[1]:.3f} | {s.image_to_text[5]:.3f} | {s.text_to_image[1]:.3f} | "
              f"{s.text_to_image[5]:.3f} | {s.mean_rank_image_to_text:.2f} | {s.mean_rank_text_to_image:.2f} | "
              f"{s.diagonal_row_max:.3f} | {gap.centroid_distance:.3f} | {gap.cross_modal_share:.3f} | {seconds:.1f} |")


def projections(names: list[str], n: int, methods: list[str]) -> None:
    scenes = zoo.scenes.make_scenes(HELDOUT_SEED, n, n_objects=1)
    prompts = zoo.scenes.zero_shot_prompts()
    colours = [s.labels[0][0] for s in scenes] + [c for c, _ in zoo.scenes.all_labels()]
    shapes = [s.labels[0][1] for s in scenes] + [sh for _, sh in zoo.scenes.all_labels()]
    print(f"\n## (b) Projections of {n} held-out single-object scenes + the 12 prompts (k = 10)")
    print("| model | method | trustworthiness | 10-NN agreement | same colour 2-D | same colour full "
          "| same shape 2-D | same shape full | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        model, processor = zoo.load(name)
        emb = lens.embed(model, processor, images=[s.pil() for s in scenes], texts=prompts)
        full = emb.stacked().double().numpy()
        colour_full, shape_full = label_agreement(full, colours, 10), label_agreement(full, shapes, 10)
        for method in methods:
            start = time.perf_counter()
            p = lens.project(emb, method, k=10)
            seconds = time.perf_counter() - start
            print(f"| {name} | {method} | {p.trustworthiness:.3f} | {p.neighbour_agreement:.3f} | "
                  f"{label_agreement(p.coords, colours, 10):.3f} | {colour_full:.3f} | "
                  f"{label_agreement(p.coords, shapes, 10):.3f} | {shape_full:.3f} | {seconds:.1f} |")


def speed(names: list[str], n: int, repeats: int) -> None:
    images = [s.pil() for s in zoo.scenes.make_scenes(HELDOUT_SEED + 10, n)]
    print(f"\n## (c) Images embedded per second ({n} images, best of {repeats}; wall clock / CPU time)")
    print("| model | batch 1 | batch 8 | batch 32 | batch 32 / batch 1 |")
    print("|---|---|---|---|---|")
    for name in names:
        model, processor = zoo.load(name)
        lens.embed(model, processor, images=images[:8], batch_size=8)  # warm-up
        rates = {}
        for batch in (1, 8, 32):
            walls, cpus = [], []
            for _ in range(repeats):
                wall, cpu = time.perf_counter(), time.process_time()
                lens.embed(model, processor, images=images, batch_size=batch)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            rates[batch] = (n / min(walls), n / min(cpus))
        cells = " | ".join(f"{w:.0f} / {c:.0f}" for w, c in rates.values())
        print(f"| {name} | {cells} | {rates[32][1] / rates[1][1]:.1f}x (CPU) |")


def memory_child(folder: str, count: int, mode: str) -> None:
    """Runs in a fresh process; prints a JSON line with the peak memory of one embed call."""
    torch.set_num_threads(1)
    model, processor = zoo.load("shapes-clip")
    files = sorted(Path(folder).glob("*.png"))[:count]
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    if mode.startswith("embed"):
        thumbnails = None if mode == "embed-no-thumbnails" else 48
        emb = lens.embed(model, processor, images=files, batch_size=32, thumbnail_size=thumbnails)
        rows = len(emb.image)
    else:  # everything at once: the naive loop the batching avoids
        from PIL import Image

        with torch.no_grad():
            pixels = processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")
            rows = len(model.get_image_features(**pixels))
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024, "seconds": seconds, "rows": rows}))


def memory() -> None:
    print("\n## (d) Peak memory of embed (shapes-clip, batch 32, image files; fresh process each; "
          "peak RSS (VmHWM, reset just before the call) minus RSS then)")
    print("| images | how | peak MiB | seconds |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for i, scene in enumerate(zoo.scenes.make_scenes(HELDOUT_SEED + 20, 1000)):
            scene.pil().save(Path(folder) / f"{i:04d}.png")
        how = {"embed": "embed (batches of 32, 48-px thumbnails)", "embed-no-thumbnails":
               "embed (batches of 32, thumbnail_size=None)", "one forward": "all in one forward"}
        for count, mode in ((100, "embed"), (500, "embed"), (1000, "embed"), (100, "embed-no-thumbnails"),
                            (1000, "embed-no-thumbnails"), (1000, "one forward")):
            env = dict(os.environ, OMP_NUM_THREADS="1")
            out = subprocess.run([sys.executable, __file__, "--memory-child", folder, str(count), mode],
                                 capture_output=True, text=True, env=env, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {count} | {how[mode]} | "
                  f"{r['peak_mib']:.0f} | {r['seconds']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--methods", nargs="+", default=["pca", "tsne", "umap"])
    parser.add_argument("--speed-images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--only-memory", action="store_true")
    parser.add_argument("--memory-child", nargs=3, metavar=("FOLDER", "COUNT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_child:
        folder, count, mode = args.memory_child
        memory_child(folder, int(count), mode)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch thread, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if not args.only_memory:
        retrieval_and_gap(args.models, args.scenes)
        projections(args.models, args.scenes, args.methods)
        speed(args.models, args.speed_images, args.repeats)
    if not args.skip_memory:
        memory()


if __name__ == "__main__":
    main()
