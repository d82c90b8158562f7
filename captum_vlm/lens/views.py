"""The alignment views: similarity matrix, zero-shot bars, retrieval lists, modality gap."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from captum_vlm._checks import check_count
from captum_vlm.lens.alignment import alignment_scores
from captum_vlm.lens.embed import check_pairs
from captum_vlm.lens.embeddings import Embeddings
from captum_vlm.lens.modality_gap import modality_gap

SCALE_LABELS = {
    "cosine": "cosine similarity",
    "logits": "model logit",
    "softmax": "probability over texts (softmax)",
    "sigmoid": "pair probability (sigmoid)",
}


def probability_scale(embeddings: Embeddings) -> str:
    """The scale on which the model's own probabilities live: ``"softmax"`` or ``"sigmoid"``."""
    return "sigmoid" if embeddings.probability == "sigmoid" else "softmax"


def similarity_matrix(
    embeddings: Embeddings,
    scale: str = "cosine",
    *,
    pairs: str | Sequence[int] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    title: str | None = None,
):
    """The N images x M texts matrix with thumbnails, the best text per image marked.

    When pairs are known (``pairs`` here or given to ``embed``), the title carries image→text
    and text→image recall@k, mean ranks and the share of images whose own text is the row
    maximum (the block-diagonal check).

    Args:
        embeddings: from :func:`captum_vlm.lens.embed`, with images and texts.
        scale: ``"cosine"``, ``"logits"``, ``"softmax"`` or ``"sigmoid"`` (SigLIP).
        pairs: overrides ``embeddings.pairs``.
        ks: the k of recall@k.
        title: figure title (default: the model's name).

    Returns:
        A matplotlib Figure; ``fig.scores`` is the :class:`AlignmentScores` (None without pairs).

    Example:
        >>> fig = similarity_matrix(emb, "logits", pairs="diagonal")   # doctest: +SKIP
        >>> fig.scores.image_to_text[1]                               # doctest: +SKIP
    """
    from captum_vlm.viz.lens_views import similarity_figure

    matrix = embeddings.similarity(scale)
    pairs = check_pairs(pairs, len(embeddings.image), len(embeddings.text)) if pairs is not None else embeddings.pairs
    scores = alignment_scores(matrix, pairs, ks) if pairs is not None else None
    footer = None
    if scores is not None:
        footer = " | ".join(
            [f"i→t R@{k} {v:.2f}" for k, v in scores.image_to_text.items()]
            + [f"t→i R@{k} {v:.2f}" for k, v in scores.text_to_image.items()]
            + [f"mean rank {scores.mean_rank_image_to_text:.1f} / {scores.mean_rank_text_to_image:.1f}",
               f"diagonal = row max {scores.diagonal_row_max:.2f}"]
        )
    fig = similarity_figure(
        matrix.numpy(),
        embeddings.texts,
        embeddings.thumbnails,
        scale_label=SCALE_LABELS[scale],
        title=f"{title or embeddings.model_name}: similarity matrix ({SCALE_LABELS[scale]})",
        pairs=pairs,
        footer=footer,
    )
    fig.scores = scores
    return fig


def _check_index(value: object, count: int, name: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected the index of one of the {count} {what}, got {type(value).__name__}")
    if not -count <= value < count:
        raise ValueError(f"{name}: {value} is out of range for {count} {what}")
    return int(value) % count


def zero_shot(
    embeddings: Embeddings,
    image: int = 0,
    *,
    true_label: int | str | None = None,
    title: str | None = None,
):
    """One image against the K texts as labels: sorted bars of the model's probabilities.

    Args:
        embeddings: from :func:`captum_vlm.lens.embed`; its texts are the labels.
        image: index of the image.
        true_label: index or text of the true label (marked red); default: the image's pair.
        title: figure title.

    Returns:
        A matplotlib Figure; ``fig.probabilities`` holds the ``[K]`` probabilities.
    """
    from captum_vlm.viz.lens_views import zero_shot_figure

    embeddings.require(images=True, texts=True, view="the zero-shot view")
    image = _check_index(image, len(embeddings.image), "image", "images")
    if isinstance(true_label, str):
        if true_label not in embeddings.texts:
            raise ValueError(f"true_label: {true_label!r} is not one of the texts")
        true_label = embeddings.texts.index(true_label)
    elif true_label is not None:
        true_label = _check_index(true_label, len(embeddings.text), "true_label", "texts")
    elif embeddings.pairs is not None:
        true_label = embeddings.pairs[image]
    scale = probability_scale(embeddings)
    probabilities = embeddings.similarity(scale)[image].numpy()
    thumbs = embeddings.thumbnails
    fig = zero_shot_figure(
        probabilities,
        embeddings.texts,
        thumbnail=thumbs[image] if len(thumbs) == len(embeddings.image) else None,
        true_index=true_label,
        value_label=SCALE_LABELS[scale],
        title=f"{title or embeddings.model_name}: zero-shot, {embeddings.image_sources[image]}",
    )
    fig.probabilities = probabilities
    return fig


def top_matches(embeddings: Embeddings, k: int = 5, scale: str = "cosine") -> dict[str, list]:
    """Top-``k`` texts of every image and top-``k`` images of every text.

    Returns:
        ``{"image_to_text": [[(text index, score), ...] per image],
        "text_to_image": [[(image index, score), ...] per text]}``, best first.
    """
    check_count(k, "k")
    matrix = embeddings.similarity(scale)
    k_texts, k_images = min(k, matrix.shape[1]), min(k, matrix.shape[0])
    rows = torch.topk(matrix, k_texts, dim=1)
    cols = torch.topk(matrix.T, k_images, dim=1)

    def pack(top):
        return [list(zip(i.tolist(), v.tolist())) for i, v in zip(top.indices, top.values)]

    return {"image_to_text": pack(rows), "text_to_image": pack(cols)}


def _queries(value: Sequence[int] | None, count: int, name: str, default: int) -> list[int]:
    if value is None:
        return list(range(min(default, count)))
    if isinstance(value, (int, str)):
        raise TypeError(f"{name}: expected a list of indices, got {type(value).__name__}")
    return [_check_index(v, count, name, "rows") for v in value]


def retrieval(
    embeddings: Embeddings,
    k: int = 5,
    *,
    image_queries: Sequence[int] | None = None,
    text_queries: Sequence[int] | None = None,
    scale: str = "cosine",
    title: str | None = None,
):
    """Top-``k`` texts for each query image and top-``k`` images for each query text.

    Args:
        embeddings: from :func:`captum_vlm.lens.embed`, with images and texts.
        k: results per query.
        image_queries: image indices (default: the first 4).
        text_queries: text indices (default: the first 4).
        scale: the similarity scale to rank and show.
        title: figure title.

    Returns:
        A matplotlib Figure; ``fig.matches`` is :func:`top_matches`'s dict.
    """
    from captum_vlm.viz.lens_views import retrieval_figure

    embeddings.require(images=True, texts=True, view="the retrieval view")
    matches = top_matches(embeddings, k, scale)
    thumbs = embeddings.thumbnails if len(embeddings.thumbnails) == len(embeddings.image) else None

    def thumb(i):
        return thumbs[i] if thumbs is not None else None

    images = _queries(image_queries, len(embeddings.image), "image_queries", 4)
    texts = _queries(text_queries, len(embeddings.text), "text_queries", 4)
    fig = retrieval_figure(
        [(thumb(i), embeddings.image_sources[i], [(embeddings.texts[j], s) for j, s in matches["image_to_text"][i]])
         for i in images],
        [(embeddings.texts[j], [(thumb(i), embeddings.image_sources[i], s) for i, s in matches["text_to_image"][j]])
         for j in texts],
        score_label=SCALE_LABELS[scale],
        title=f"{title or embeddings.model_name}: retrieval",
    )
    fig.matches = matches
    return fig


def gap_view(embeddings: Embeddings, k: int = 10, title: str | None = None):
    """The modality gap: both modalities on their first two principal components, with their
    centroids, titled with :func:`captum_vlm.lens.modality_gap`'s numbers.

    Returns:
        A matplotlib Figure; ``fig.gap`` is the :class:`ModalityGap`.
    """
    from sklearn.decomposition import PCA

    from captum_vlm.viz.lens_views import modality_gap_figure

    gap = modality_gap(embeddings, k)
    coords = PCA(n_components=2).fit_transform(embeddings.stacked().double().numpy())
    summary = (f"centroid distance {gap.centroid_distance:.3f} | "
               f"{gap.k}-NN of the other modality {gap.cross_modal_share:.3f}")
    fig = modality_gap_figure(coords, embeddings.modality, summary=summary,
                              title=title or embeddings.model_name)
    fig.gap = gap
    return fig
