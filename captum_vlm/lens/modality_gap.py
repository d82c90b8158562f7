"""The modality gap between image and text embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from captum_vlm._checks import check_count
from captum_vlm.lens.embeddings import Embeddings


def nearest_neighbours(points: np.ndarray, k: int) -> np.ndarray:
    """Indices ``[P, k]`` of each point's ``k`` nearest other points (Euclidean, brute force;
    ties broken by index)."""
    points = np.asarray(points, dtype=np.float64)
    squared = (points**2).sum(axis=1)
    distances = squared[:, None] + squared[None, :] - 2.0 * points @ points.T
    np.fill_diagonal(distances, np.inf)
    return np.argsort(distances, axis=1, kind="stable")[:, :k]


def check_neighbours(k: object, n_points: int, name: str = "k") -> int:
    """``k`` must be an int with ``1 <= k < n_points``."""
    check_count(k, name)
    if k >= n_points:
        raise ValueError(f"{name}: {k} neighbours need more than {k} points, got {n_points}")
    return int(k)


@dataclass
class ModalityGap:
    """The modality gap of Liang et al., "Mind the Gap: Understanding the Modality Gap in
    Multi-modal Contrastive Representation Learning" (NeurIPS 2022): unit-normalised image and
    text embeddings sit in two separate cones, so the centroids of the two modalities are apart.

    Attributes:
        centroid_distance: ``||mean(image) - mean(text)||`` of the unit-normalised embeddings.
        image_neighbours_text: mean share of each image's ``k`` nearest neighbours (among all
            images and texts) that are texts.
        text_neighbours_image: mean share of each text's ``k`` nearest neighbours that are images.
        cross_modal_share: the same share over all points together.
        k: neighbours per point.
        model_name: for titles.
    """

    centroid_distance: float
    image_neighbours_text: float
    text_neighbours_image: float
    cross_modal_share: float
    k: int
    model_name: str = "model"

    def as_dict(self) -> dict[str, float]:
        return {
            "centroid distance": self.centroid_distance,
            f"image {self.k}-NN that are texts": self.image_neighbours_text,
            f"text {self.k}-NN that are images": self.text_neighbours_image,
            f"{self.k}-NN of the other modality": self.cross_modal_share,
        }


def modality_gap(embeddings: Embeddings, k: int = 10) -> ModalityGap:
    """Centroid distance and cross-modal neighbour share of image and text embeddings.

    Args:
        embeddings: from :func:`captum_vlm.lens.embed`, with images and texts.
        k: neighbours per point.

    Returns:
        :class:`ModalityGap`.

    Example:
        >>> modality_gap(emb).centroid_distance     # doctest: +SKIP
        0.82
    """
    embeddings.require(images=True, texts=True, view="the modality gap")
    points = embeddings.stacked().double().numpy()
    k = check_neighbours(k, len(points))
    n = len(embeddings.image)
    is_text = np.arange(len(points)) >= n
    neighbours = nearest_neighbours(points, k)
    other = (is_text[neighbours] != is_text[:, None]).mean(axis=1)
    centroid = embeddings.image.double().mean(0) - embeddings.text.double().mean(0)
    return ModalityGap(
        centroid_distance=float(centroid.norm()),
        image_neighbours_text=float(other[:n].mean()),
        text_neighbours_image=float(other[n:].mean()),
        cross_modal_share=float(other.mean()),
        k=k,
        model_name=embeddings.model_name,
    )
