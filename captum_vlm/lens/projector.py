"""Export embeddings for TensorBoard's Embedding Projector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from captum_vlm._checks import check_count
from captum_vlm.lens.embeddings import Embeddings


def text_tile(text: str, size: int) -> Image.Image:
    """A white ``size x size`` tile with ``text`` drawn on it, wrapped to fit (for the sprite)."""
    tile = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(tile)
    per_line = max(1, size // 6)
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > per_line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    draw.multiline_text((1, 1), "\n".join(lines)[: 4 * per_line * 2], fill="black", spacing=0)
    draw.rectangle((0, 0, size - 1, size - 1), outline=(150, 150, 150))
    return tile


def _tile(image: Image.Image, size: int) -> Image.Image:
    return image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)


def _tag(name: str) -> str:
    """The model's name as one folder name (hub names hold slashes)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "embeddings"


def _cell(value: str) -> str:
    """A metadata cell: tabs and newlines would break the TSV."""
    return " ".join(str(value).split())


def to_projector(embeddings: Embeddings, logdir: str | Path, thumbnail_size: int = 32) -> Path:
    """Write image and text rows through ``SummaryWriter.add_embedding``.

    Writes ``projector_config.pbtxt`` in ``logdir`` and, in its step folder, ``tensors.tsv``
    (one row per image, then per text), ``metadata.tsv`` with columns kind, label, text (the
    source path for images) and ``sprite.png`` (image thumbnails; text rows get a tile with
    their text drawn). Open with ``tensorboard --logdir LOGDIR``.

    Args:
        embeddings: from :func:`captum_vlm.lens.embed`.
        logdir: folder to write (created).
        thumbnail_size: side of each sprite tile in pixels.

    Returns:
        ``logdir`` as a Path.

    Raises:
        ImportError: tensorboard is missing; the message names the extra.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError("to_projector needs tensorboard: pip install captum-vlm[tensorboard]") from err
    check_count(thumbnail_size, "thumbnail_size")
    points = embeddings.stacked()
    if len(points) == 0:
        raise ValueError("embeddings: nothing to export (no images and no texts)")
    labels = embeddings.labels() or [""] * len(points)
    names = list(embeddings.image_sources) + list(embeddings.texts)
    metadata = [[kind, _cell(label), _cell(name)] for kind, label, name in
                zip(embeddings.modality, labels, names)]
    thumbs = embeddings.thumbnails
    if len(thumbs) != len(embeddings.image):  # built by hand without thumbnails: grey tiles
        thumbs = [Image.new("RGB", (thumbnail_size, thumbnail_size), "grey")] * len(embeddings.image)
    tiles = [_tile(t, thumbnail_size) for t in thumbs]
    tiles += [text_tile(t, thumbnail_size) for t in embeddings.texts]
    sprite = torch.from_numpy(np.stack([np.asarray(t) for t in tiles])).permute(0, 3, 1, 2).float() / 255
    logdir = Path(logdir)
    writer = SummaryWriter(log_dir=str(logdir))
    try:
        writer.add_embedding(points.float(), metadata=metadata, label_img=sprite,
                             metadata_header=["kind", "label", "text"], tag=_tag(embeddings.model_name))
    finally:
        writer.close()
    return logdir
