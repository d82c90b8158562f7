"""Throughput, CPU time and driver memory of ``cv.audit`` on shapes-clip (not a test).

One invocation, engines interleaved per size: for each ``--counts`` size (e.g. 1000, 3000,
10 000 images) the local engine, then Ray Data with 1 and 2 actors, over folders of held-out
one-object scenes (64 px PNGs, masks, ``labels.csv``; the smaller folders are the first images of
the largest). Per run: wall time, images/s, CPU time of the driver and of Ray's processes (the
cluster's daemons and actors, sampled every 0.25 s), CPU seconds per image (the figure that does
not depend on the machine's load: what the other engineers take shows up in wall time, not in
our CPU time), the driver's peak resident memory (sampled every 20 ms) and its memory at the
start of the run, the 1-minute load average before and after, and whether the records equal the
local engine's (a NaN-aware digest). Ray's own overheads are measured too: ``ray.init``, and a
no-op callable class through the audit's pipeline (``from_items`` -> ``map_batches`` over one
actor -> ``write_parquet``) at two sizes: its fixed cost and its cost per batch.

Each result is appended to ``--results`` (JSON lines) as soon as it is measured, so a stopped
run keeps what it did; the Markdown table is printed at the end (``--table-only`` prints it
from the file).

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_audit.py --counts 16 64
    OMP_NUM_THREADS=1 python benchmarks/bench_audit.py --counts 1000 3000 10000 \\
        --method raw-attention --checks --batch-size 32 --results bench_audit.jsonl   # scale
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
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
ENGINES = {"local": ("local", 1), "ray1": ("ray", 1), "ray2": ("ray", 2)}


def scene_folder(folder: Path, count: int) -> Path:
    """``count`` held-out one-object scenes with masks and ``labels.csv`` (same seed: the first
    ``k`` of any folder are the same ``k`` scenes)."""
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


def sub_folder(source: Path, folder: Path, count: int) -> Path:
    """The first ``count`` scenes of ``source`` (hard links) with their part of ``labels.csv``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = (source / "labels.csv").read_text().splitlines()[: count + 1]
    for line in lines[1:]:
        image, _, mask = line.split(",")
        for name in (image, mask):
            os.link(source / name, folder / name)
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


def _tree_cpu(process: psutil.Process) -> dict[int, float]:
    """CPU seconds (user + system) of every live descendant of ``process``, by pid."""
    found = {}
    for child in process.children(recursive=True):
        try:
            times = child.cpu_times()
            found[child.pid] = times.user + times.system
        except psutil.Error:
            pass
    return found


class Usage:
    """While the block runs: the driver's peak resident memory (every 20 ms) and the CPU time
    of the driver and of its descendant processes (Ray's daemons and workers; every 0.25 s, by
    pid, so a worker that exits keeps the time last seen)."""

    def __enter__(self):
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.rss_start = self.process.memory_info().rss
        self.before = _tree_cpu(self.process)
        self.seen: dict[int, float] = dict(self.before)
        self.cpu_start, self.wall_start = time.process_time(), time.perf_counter()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        last = 0.0
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            if time.perf_counter() - last > 0.25:
                self.seen.update(_tree_cpu(self.process))
                last = time.perf_counter()
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.wall = time.perf_counter() - self.wall_start
        self.driver_cpu = time.process_time() - self.cpu_start
        self.seen.update(_tree_cpu(self.process))
        self.children_cpu = sum(v - self.before.get(pid, 0.0) for pid, v in self.seen.items())


def digest(table) -> str:
    """A digest of the records (NaN equal to NaN; the path column left out)."""
    table = table.drop_columns(["path"])
    hasher = hashlib.sha256(str(table.schema).encode())
    for row in table.to_pylist():
        hasher.update(repr([("nan" if isinstance(v, float) and math.isnan(v) else v) for v in row.values()]).encode())
    return hasher.hexdigest()[:16]


class NoOp:
    """A callable class that returns each batch's ids: Ray Data's own cost per batch."""

    def __call__(self, batch):
        return {"id": batch["id"]}


def ray_pipeline_cost(ray, rows: int, batch_size: int, out: Path) -> float:
    """Seconds for ``rows`` rows through from_items -> map_batches(NoOp, 1 actor) -> write_parquet."""
    shutil.rmtree(out, ignore_errors=True)
    items = [{"id": f"{i:05d}", "path": f"img-{i:05d}.png"} for i in range(rows)]
    start = time.perf_counter()
    blocks = max(1, min(rows // batch_size, 32))
    ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        NoOp, batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1,
    ).write_parquet(str(out))
    return time.perf_counter() - start


def load() -> float:
    return round(os.getloadavg()[0], 2)


def emit(results: Path, entry: dict) -> None:
    entry = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), **entry}
    with results.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")
    print(json.dumps(entry), flush=True)


def table(results: Path) -> str:
    entries = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    runs = [e for e in entries if e["kind"] == "run"]
    lines = ["| engine | images | wall (s) | images/s | CPU s / image (driver + Ray processes) | "
             "driver peak RSS (MiB; at start) | records = local | load average (before → after) |",
             "|---|---|---|---|---|---|---|---|"]
    for e in runs:
        lines.append(f"| {e['engine']} | {e['images']} | {e['wall_s']:.1f} | {e['images_per_s']:.2f} | "
                     f"{e['cpu_per_image_s']:.4f} ({e['driver_cpu_s']:.0f} + {e['ray_cpu_s']:.0f} s) | "
                     f"{e['peak_rss_mib']:.0f} ({e['start_rss_mib']:.0f}) | {e['same_as_local']} | "
                     f"{e['load_before']} → {e['load_after']} |")
    for e in entries:
        if e["kind"] != "run":
            lines.append(f"\n{e['kind']}: " + ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("kind",)))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[16, 64], help="images per run, ascending")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES),
                        help="local, ray1 (1 actor), ray2 (2 actors)")
    parser.add_argument("--method", default="grad-eclip")
    parser.add_argument("--ray-startup-timeout", type=float, default=600.0, help="seconds Ray may take to start")
    parser.add_argument("--checks", nargs="*", default=["deletion", "grounding"],
                        help="deletion and/or grounding; none: --checks with no value")
    parser.add_argument("--results", type=Path, default=Path("bench_audit.jsonl"), help="JSON lines, appended")
    parser.add_argument("--overhead-batches", type=int, nargs=2, default=[8, 128],
                        help="no-op batches for Ray's fixed and per-batch cost")
    parser.add_argument("--table-only", action="store_true", help="print the table of --results and stop")
    args = parser.parse_args()
    if args.table_only:
        print(table(args.results))
        return
    checks, counts = tuple(args.checks), sorted(args.counts)
    torch.set_num_threads(1)
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    start = time.perf_counter()
    largest = scene_folder(work / f"n{counts[-1]}", counts[-1])
    folders = {n: largest if n == counts[-1] else sub_folder(largest, work / f"n{n}", n) for n in counts}
    model, processor = cv.zoo.load("shapes-clip")
    emit(args.results, {"kind": "setup", "method": args.method, "checks": list(checks), "batch_size": args.batch_size,
                        "counts": counts, "engines": args.engines, "seed": HELDOUT_SEED,
                        "scenes_s": round(time.perf_counter() - start, 1), "cores": psutil.cpu_count(),
                        "torch": torch.__version__, "ray": ray.__version__, "load": load()})
    try:
        for count in counts:
            local_digest = None
            for name in args.engines:
                engine, concurrency = ENGINES[name]
                if engine == "ray" and not ray.is_initialized():
                    before = load()
                    os.environ["RAY_worker_niceness"] = "0"  # Ray's default 15 starves its workers here
                    with Usage() as usage:
                        start_local_ray(args.ray_startup_timeout, num_cpus=2, object_store_memory=200 * 2**20)
                    emit(args.results, {"kind": "ray.init", "wall_s": round(usage.wall, 2),
                                        "cpu_s": round(usage.driver_cpu + usage.children_cpu, 2),
                                        "load_before": before, "load_after": load()})
                    for batches in args.overhead_batches:
                        before = load()
                        seconds = ray_pipeline_cost(ray, batches * args.batch_size, args.batch_size, work / "noop")
                        emit(args.results, {"kind": "ray no-op pipeline", "batches": batches,
                                            "batch_size": args.batch_size, "wall_s": round(seconds, 2),
                                            "load_before": before, "load_after": load()})
                out = work / f"o-{name}-{count}"
                before = load()
                with Usage() as usage:
                    result = cv.audit(model, processor, folders[count], scenes.zero_shot_prompts(),
                                      methods=[args.method], checks=checks, engine=engine,
                                      concurrency=concurrency, batch_size=args.batch_size, output=out)
                    n, errors = len(result), len(result.errors())
                after = load()
                records = digest(result.table())
                local_digest = records if name == "local" else local_digest
                del result
                shutil.rmtree(out, ignore_errors=True)
                cpu = usage.driver_cpu + usage.children_cpu
                emit(args.results, {
                    "kind": "run", "engine": name, "images": count, "records": n, "errors": errors,
                    "wall_s": round(usage.wall, 2), "images_per_s": round(count / usage.wall, 3),
                    "driver_cpu_s": round(usage.driver_cpu, 2), "ray_cpu_s": round(usage.children_cpu, 2),
                    "cpu_per_image_s": round(cpu / count, 5),
                    "peak_rss_mib": round(usage.peak / 2**20, 1), "start_rss_mib": round(usage.rss_start / 2**20, 1),
                    "digest": records, "same_as_local": None if local_digest is None else records == local_digest,
                    "load_before": before, "load_after": after})
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(args.results))


if __name__ == "__main__":
    main()
