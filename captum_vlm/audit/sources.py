"""Turn what the user passes as ``data`` into rows the audit workers read.

A row is a plain dict, the same for both engines (Ray Data builds its blocks from them):
``id`` (str, unique), ``path`` (image file or ``None``), ``image`` (encoded image bytes or an
``(H, W, 3)`` array, or ``None``), ``label`` (str or ``None``), ``mask`` (``.npy`` bytes, or
``None``), ``mask_path`` (an ``.npy`` or image file, or ``None``), ``box``
(``[x0, y0, x1, y1]`` in pixels, or ``None``) and ``question`` (what a VQA model is asked about
this image, or ``None``: then the audit's one question). Images are opened by the workers, batch by batch,
so a folder of any size costs the driver only its file names.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "LABEL_FILES", "ROW_KEYS", "rows_from"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LABEL_FILES = ("labels.csv", "labels.jsonl")
ROW_KEYS = ("id", "path", "image", "label", "mask", "mask_path", "box", "question")


def _row(id_: str, **values: Any) -> dict[str, Any]:
    row = dict.fromkeys(ROW_KEYS)
    row.update(values, id=str(id_))
    return row


def _npy_bytes(array: Any) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=bool), allow_pickle=False)
    return buffer.getvalue()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _read_label_file(path: Path) -> dict[str, dict[str, Any]]:
    """``{file: {"label", "mask_path", "box", "question"}}`` from ``labels.csv`` (columns ``file``,
    ``label`` and optionally ``mask``, ``box`` as "x0 y0 x1 y1", ``question``) or ``labels.jsonl``
    (the same keys)."""
    if path.suffix == ".jsonl":
        entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        with path.open(newline="", encoding="utf-8") as handle:
            entries = list(csv.DictReader(handle))
    found = {}
    for number, entry in enumerate(entries, start=1):
        if "file" not in entry:
            raise ValueError(f"labels: {path} entry {number} has no 'file' field; it has {sorted(entry)}")
        box = entry.get("box") or None
        if isinstance(box, str):
            box = [float(v) for v in box.replace(",", " ").split()]
        mask = entry.get("mask") or None
        found[str(entry["file"])] = {
            "label": None if entry.get("label") in (None, "") else str(entry["label"]),
            "mask_path": None if mask is None else str(path.parent / mask),
            "box": box,
            "question": None if entry.get("question") in (None, "") else str(entry["question"]),
        }
    return found


def _folder_rows(folder: Path, labels: Any) -> list[dict[str, Any]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    label_file = Path(labels) if isinstance(labels, (str, Path)) else None
    if label_file is None and labels is None:
        label_file = next((folder / n for n in LABEL_FILES if (folder / n).is_file()), None)
    known = _read_label_file(label_file) if label_file is not None else {}
    masks = {Path(v["mask_path"]).resolve() for v in known.values() if v["mask_path"]}
    rows = []
    for file in files:
        if file.resolve() in masks:
            continue
        name = file.relative_to(folder).as_posix()
        rows.append(_row(name, path=str(file), **known.get(name, {})))
    if label_file is not None:
        missing = sorted(set(known) - {r["id"] for r in rows})
        if missing:
            raise ValueError(f"labels: {label_file} names files that are not in {folder}: {missing[:5]}")
    return rows


def _per_item(values: Any, n: int, name: str) -> list[Any]:
    if values is None:
        return [None] * n
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | np.ndarray):
        raise TypeError(f"{name}: expected one entry per image (a list of {n}), got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"{name}: expected one entry per image ({n}), got {len(values)}")
    return list(values)


def _item_row(index: int, item: Any, label: Any, mask: Any, box: Any, question: Any = None) -> dict[str, Any]:
    if isinstance(item, Mapping):
        extra = {k: item[k] for k in ("label", "mask", "mask_path", "box", "question") if k in item}
        mask = extra.get("mask", extra.get("mask_path", mask))
        label, box = extra.get("label", label), extra.get("box", box)
        question = extra.get("question", question)
        id_ = item.get("id", index)
        item = item.get("image", item.get("path"))
    else:
        id_ = index
    values: dict[str, Any] = {"label": None if label is None else str(label),
                              "box": None if box is None else [float(v) for v in box],
                              "question": None if question is None else str(question)}
    if isinstance(mask, (str, Path)):
        values["mask_path"] = str(mask)
    elif mask is not None:
        values["mask"] = _npy_bytes(mask)
    if isinstance(item, (str, Path)):
        return _row(str(item) if id_ == index else id_, path=str(item), **values)
    if isinstance(item, Image.Image):
        return _row(id_, image=_png_bytes(item.convert("RGB")), **values)
    if isinstance(item, np.ndarray) and item.ndim == 3:
        return _row(id_, image=_png_bytes(Image.fromarray(np.asarray(item, dtype=np.uint8))), **values)
    raise TypeError(f"data: item {index} is a {type(item).__name__}; expected a path, a PIL image, "
                    "an (H, W, 3) uint8 array or a dict with 'image'")


def _hf_rows(dataset: Any) -> list[dict[str, Any]]:
    """Rows of a Hugging Face ``datasets.Dataset`` with an ``image`` column (and optionally
    ``label`` — class indices are turned into their names —, ``mask``, ``box``, ``id``, ``question``)."""
    names = set(dataset.column_names)
    if "image" not in names:
        raise ValueError(f"data: the datasets.Dataset needs an 'image' column; it has {sorted(names)}")
    feature = dataset.features.get("label")
    to_name = getattr(feature, "int2str", None)
    rows = []
    for index, example in enumerate(dataset):
        label = example.get("label")
        if label is not None and to_name is not None:
            label = to_name(int(label))
        rows.append(_item_row(index, example["image"], label, example.get("mask"), example.get("box"),
                              example.get("question")))
        if "id" in example:
            rows[-1]["id"] = str(example["id"])
    return rows


def rows_from(data: Any, labels: Any = None, masks: Any = None, boxes: Any = None) -> list[dict[str, Any]]:
    """The audit rows of ``data``.

    Args:
        data: a folder of images (its ``labels.csv``/``labels.jsonl`` is read when present),
            a list of image paths, PIL images, ``(H, W, 3)`` arrays or dicts with ``image`` (and
            ``label``, ``mask`` or ``mask_path``, ``box``, ``id``, ``question``), or a Hugging Face
            ``datasets.Dataset``.
        labels: one label per image, or the labels file of a folder.
        masks: one boolean ``(H, W)`` mask (array or file) per image, or ``None``.
        boxes: one ``(x0, y0, x1, y1)`` box per image, or ``None``.

    Returns:
        One row per image (see the module docstring), ids unique.

    Example:
        >>> rows_from(["a.png", "b.png"], labels=["cat", "dog"])[1]["label"]
        'dog'
    """
    if isinstance(data, (str, Path)):
        folder = Path(data)
        if not folder.is_dir():
            raise ValueError(f"data: {str(data)!r} is not a folder; pass a folder of images or a list")
        if masks is not None or boxes is not None:
            raise ValueError("masks/boxes: for a folder, name them in its labels file ('mask', 'box' columns)")
        rows = _folder_rows(folder, labels)
    elif type(data).__module__.split(".")[0] == "datasets":
        rows = _hf_rows(data)
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        n = len(data)
        rows = [_item_row(i, item, lab, m, b) for i, (item, lab, m, b) in
                enumerate(zip(data, _per_item(labels, n, "labels"), _per_item(masks, n, "masks"),
                              _per_item(boxes, n, "boxes")))]
    else:
        raise TypeError(f"data: expected a folder, a list of images, a datasets.Dataset or a "
                        f"ray.data.Dataset, got {type(data).__name__}")
    if not rows:
        raise ValueError(f"data: no images found in {data!r}")
    seen: set[str] = set()
    repeated = [r["id"] for r in rows if r["id"] in seen or seen.add(r["id"])]
    if repeated:
        raise ValueError(f"data: ids must be unique; repeated {repeated[:5]}")
    return rows
