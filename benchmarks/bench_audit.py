"""Throughput and driver memory of ``cv.audit`` on shapes-clip (not a test).

One run, side by side: the local engine, and Ray Data with 1 and 2 actors, over the same folder of
held-out one-object scenes (64 px PNGs, masks, labels.csv), Grad-ECLIP with the deletion and
grounding checks. For each engine: wall time and images/s over ``--images`` images, the fixed cost
(a run of ``--small`` images: process start, model shipping, Ray start-up), and the marginal
images/s between the two; and what the pattern finder flags on these records. The driver's resident memory is sampled every 20 ms during each run;
runs go small then large, so a peak that does not rise with the number of images shows memory flat
in the data set's size.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_audit.py --images 96 --small 16
    OMP_NUM_THREADS=1 python benchmarks/bench_audit.py --images 10000 --small 1000 --checks   # scale

Prints a Markdown table for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

import captum_vlm as cv  # noqa: E402
from captum_vlm.audit.engines import start_local_ray  # noqa: E402
from captum_vlm.zoo import scenes  # noqa: E402

HELDOUT_SEED = 123_456


def scene_folder(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(HELDOUT_SEED)
    lines = ["file,label,mask"]
    for i in range(count):
        scene = scenes.make_scene(rng, n_objects=1)
        scene.pil().save(folder / f"img-{i:05d}.png")
        np.save(folder / f"mask-{i:05d}.npy", scene.objects[0].mask)
        lines.append(f"img-{i:05d}.png,{scenes.phrase(*scene.labels[0])},mask-{i:05d}.npy")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


class PeakRSS:
    """The highest resident memory of this process while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def timed_run(model, processor, folder, engine, concurrency, out, batch_size, method, checks):
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    with PeakRSS() as memory:
        result = cv.audit(model, processor, folder, scenes.zero_shot_prompts(), methods=[method],
                          checks=checks, engine=engine, concurrency=concurrency,
                          batch_size=batch_size, output=out)
    seconds = time.perf_counter() - start
    assert len(result) == len(list(folder.glob("img-*.png"))) and not result.errors()
    return seconds, memory.peak / 2**20, result


def _same(left, right) -> bool:
    """Equal tables, NaN equal to NaN."""
    def key(row):
        return [("nan" if isinstance(v, float) and v != v else v) for v in row.values()]

    return left.schema == right.schema and [key(r) for r in left.to_pylist()] == [key(r) for r in right.to_pylist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--small", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--engines", nargs="+", default=["local", "ray1", "ray2"],
                        help="local, ray1 (1 actor), ray2 (2 actors)")
    parser.add_argument("--method", default="grad-eclip")
    parser.add_argument("--ray-startup-timeout", type=float, default=600.0, help="seconds Ray may take to start")
    parser.add_argument("--checks", nargs="*", default=["deletion", "grounding"],
                        help="deletion and/or grounding; none: --checks with no value")
    args = parser.parse_args()
    checks = tuple(args.checks)
    torch.set_num_threads(1)
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    small, large = scene_folder(work / "small", args.small), scene_folder(work / "large", args.images)
    model, processor = cv.zoo.load("shapes-clip")
    ray_start = float("nan")
    rows, tables, findings = [], {}, []
    chosen = {"local": ("local", 1), "ray1": ("ray", 1), "ray2": ("ray", 2)}
    for engine, concurrency in [chosen[e] for e in args.engines]:
        name = "local" if engine == "local" else f"ray, {concurrency} actor{'s' * (concurrency > 1)}"
        if engine == "ray" and not ray.is_initialized():  # after the local engine: its rows survive a failed start
            start = time.perf_counter()
            os.environ["RAY_worker_niceness"] = "0"  # Ray's default 15 starves its workers on a shared machine
            start_local_ray(args.ray_startup_timeout, num_cpus=2, object_store_memory=200 * 2**20)
            ray_start = time.perf_counter() - start
            print(f"ray.init: {ray_start:.1f} s", flush=True)
        t_small, m_small, _ = timed_run(model, processor, small, engine, concurrency, work / "o-small",
                                        args.batch_size, args.method, checks)
        t_large, m_large, result = timed_run(model, processor, large, engine, concurrency, work / "o-large",
                                             args.batch_size, args.method, checks)
        tables[name] = result.table().drop_columns(["path"])
        if engine == "local":
            findings = result.patterns()
        marginal = (args.images - args.small) / max(t_large - t_small, 1e-9)
        rows.append((name, t_small, t_large, args.images / t_large, marginal, m_small, m_large))
        print(f"{name}: {t_small:.1f} s / {args.small} images, {t_large:.1f} s / {args.images} images "
              f"(marginal {marginal:.2f} images/s; driver peak RSS {m_small:.0f} / {m_large:.0f} MiB; "
              f"load average {os.getloadavg()[0]:.1f}; records identical to the first engine's: "
              f"{_same(tables[name], next(iter(tables.values())))})", flush=True)
    if ray.is_initialized():
        ray.shutdown()
    same = "n/a (one engine)" if len(tables) < 2 else all(_same(t, next(iter(tables.values()))) for t in tables.values())
    print(f"\n{args.images} held-out one-object scenes (seed {HELDOUT_SEED}), shapes-clip, {args.method}, checks "
          f"{', '.join(checks) or 'none'} (deletion: 16 steps), batch {args.batch_size}; ray.init: {ray_start:.1f} s; "
          f"records identical across engines: {same}\n")
    print(f"| engine | {args.small} images (s) | {args.images} images (s) | images/s (whole run) | "
          f"images/s (marginal) | driver peak RSS, {args.small} / {args.images} images (MiB) |")
    print("|---|---|---|---|---|---|")
    for name, t_small, t_large, rate, marginal, m_small, m_large in rows:
        print(f"| {name} | {t_small:.1f} | {t_large:.1f} | {rate:.2f} | {marginal:.2f} | {m_small:.0f} / {m_large:.0f} |")
    print("\npattern finder on the local run's records (no masks used):",
          "; ".join(f.summary() for f in findings) or "nothing flagged")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
