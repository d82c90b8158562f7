"""Shared set-up of the audit tests: a tiny CLIP and folders of labelled scenes with masks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import tiny_models as tm
from PIL import Image

from captum_vlm.zoo import scenes
from captum_vlm.zoo.processing import build_clip_processor

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


def tiny_clip():
    """A random tiny ``CLIPModel`` (32 px, 8 px patches: a 4x4 grid) and a 32 px processor."""
    return tm.clip(), build_clip_processor(image_size=tm.IMAGE_SIZE, max_length=24)


def scene_folder(folder: Path, count: int, seed: int = 0, size: int = 32) -> Path:
    """``count`` one-object scenes as PNGs, their masks as ``.npy``, and ``labels.csv``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["file,label,mask"]
    rng = np.random.default_rng(seed)
    for i in range(count):
        scene = scenes.make_scene(rng, size=size, n_objects=1)
        name = f"img-{i:03d}.png"
        scene.pil().save(folder / name)
        np.save(folder / f"mask-{i:03d}.npy", scene.objects[0].mask)
        lines.append(f"{name},{scenes.phrase(*scene.labels[0])},mask-{i:03d}.npy")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def same_records(left: pa.Table, right: pa.Table) -> bool:
    """Equal tables, NaN equal to NaN."""
    if left.schema != right.schema or left.num_rows != right.num_rows:
        return False

    def key(value):
        return "nan" if isinstance(value, float) and math.isnan(value) else value

    return all([key(v) for v in row.values()] == [key(v) for v in other.values()]
               for row, other in zip(left.to_pylist(), right.to_pylist()))


def write_image(path: Path, seed: int = 0, size: int = 32) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path
