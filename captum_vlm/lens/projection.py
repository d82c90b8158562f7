"""2-D projections of image and text embeddings together, with how much each one distorts."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from captum_vlm._checks import check_choice
from captum_vlm.lens.embeddings import Embeddings
from captum_vlm.lens.modality_gap import check_neighbours, nearest_neighbours

METHODS = ("pca", "tsne", "umap")


@dataclass
class Projection:
    """One 2-D projection of :meth:`Embeddings.stacked` (images first, then texts).

    Attributes:
        method: ``"pca"``, ``"tsne"`` or ``"umap"``.
        coords: ``[N + M, 2]``.
        trustworthiness: :func:`sklearn.manifold.trustworthiness` with ``k`` neighbours
            (1 = every 2-D neighbourhood holds only true neighbours).
        neighbour_agreement: mean share of each point's ``k`` nearest neighbours in 2-D that are
            also among its ``k`` nearest in the full space.
        k: neighbours per point.
    """

    method: str
    coords: np.ndarray
    trustworthiness: float
    neighbour_agreement: float
    k: int

    def summary(self) -> str:
        return (f"trustworthiness {self.trustworthiness:.3f} | "
                f"{self.k}-NN agreement {self.neighbour_agreement:.3f}")


def neighbour_agreement(full: np.ndarray, low: np.ndarray, k: int = 10) -> float:
    """Mean share of each point's ``k`` nearest neighbours in ``low`` that are among its ``k``
    nearest in ``full`` (Euclidean; for unit vectors the same order as cosine)."""
    a, b = nearest_neighbours(full, k), nearest_neighbours(low, k)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def label_agreement(points: np.ndarray, labels: Sequence, k: int = 10) -> float:
    """Mean share of each point's ``k`` nearest neighbours that carry the same label."""
    labels = np.asarray(labels, dtype=object)
    if len(labels) != len(points):
        raise ValueError(f"labels: got {len(labels)} for {len(points)} points")
    neighbours = nearest_neighbours(points, check_neighbours(k, len(points)))
    return float((labels[neighbours] == labels[:, None]).mean())


def _coordinates(points: np.ndarray, method: str, perplexity: float, n_neighbors: int, seed: int) -> np.ndarray:
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(points)
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    try:
        import umap
    except ImportError as err:
        raise ImportError("projection method 'umap' needs umap-learn: pip install captum-vlm[umap]") from err
    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(points) - 1), random_state=seed)
    with warnings.catch_warnings():  # quiet by default: umap warns that a seed means one thread
        warnings.simplefilter("ignore", UserWarning)
        return np.asarray(reducer.fit_transform(points))


def project(
    embeddings: Embeddings,
    method: str = "pca",
    *,
    k: int = 10,
    perplexity: float = 30.0,
    n_neighbors: int = 15,
    seed: int = 0,
) -> Projection:
    """Project image and text embeddings together to 2-D and measure the distortion.

    Args:
        embeddings: from :func:`captum_vlm.lens.embed`.
        method: ``"pca"`` (scikit-learn), ``"tsne"`` (scikit-learn) or ``"umap"`` (umap-learn,
            ``pip install captum-vlm[umap]``).
        k: neighbours for trustworthiness and neighbour agreement (``k < points / 2``).
        perplexity: t-SNE perplexity (must be below the number of points).
        n_neighbors: UMAP neighbours.
        seed: random state of t-SNE and UMAP.

    Returns:
        :class:`Projection`.

    Raises:
        ValueError: unknown method, too few points for ``k``, ``perplexity`` too large.
        ImportError: ``"umap"`` without umap-learn; the message names the extra.
    """
    from sklearn.manifold import trustworthiness

    check_choice(method, METHODS, "method")
    points = embeddings.stacked().double().numpy()
    if len(points) < 3:
        raise ValueError(f"embeddings: a projection needs at least 3 points, got {len(points)}")
    check_neighbours(k, len(points))
    if 2 * k >= len(points):
        raise ValueError(f"k: trustworthiness needs k < points / 2; got k={k} for {len(points)} points")
    if method == "tsne" and not 0 < perplexity < len(points):
        raise ValueError(f"perplexity: t-SNE needs 0 < perplexity < number of points ({len(points)}), "
                         f"got {perplexity}")
    coords = _coordinates(points, method, perplexity, n_neighbors, seed)
    return Projection(
        method=method,
        coords=coords,
        trustworthiness=float(trustworthiness(points, coords, n_neighbors=k)),
        neighbour_agreement=neighbour_agreement(points, coords, k),
        k=k,
    )


def projection(
    embeddings: Embeddings,
    methods: Sequence[str] = ("pca", "tsne"),
    *,
    k: int = 10,
    perplexity: float = 30.0,
    n_neighbors: int = 15,
    seed: int = 0,
    title: str | None = None,
):
    """Several projections side by side, each titled with its trustworthiness and k-NN
    agreement: trust only the structure they share.

    Points are coloured by label (when given), drawn as circles (images) or triangles (texts),
    with a line from each image to its own text when pairs are known.

    Args:
        embeddings: from :func:`captum_vlm.lens.embed`.
        methods: any of ``"pca"``, ``"tsne"``, ``"umap"``.
        k, perplexity, n_neighbors, seed: see :func:`project`.
        title: figure title (default: the model's name).

    Returns:
        A matplotlib Figure; its ``projections`` attribute holds the :class:`Projection` list.

    Example:
        >>> fig = projection(emb, methods=("pca", "tsne", "umap"))   # doctest: +SKIP
        >>> [p.trustworthiness for p in fig.projections]            # doctest: +SKIP
    """
    from captum_vlm.viz.lens_views import projection_figure

    if isinstance(methods, str) or not methods:
        raise ValueError(f"methods: expected a non-empty list of {METHODS}, got {methods!r}")
    for method in methods:
        check_choice(method, METHODS, "methods")
    results = [project(embeddings, m, k=k, perplexity=perplexity, n_neighbors=n_neighbors, seed=seed)
               for m in methods]
    fig = projection_figure(
        [(p.method, p.coords, p.summary()) for p in results],
        kinds=embeddings.modality,
        labels=embeddings.labels(),
        pairs=embeddings.pairs,
        title=title or embeddings.model_name,
    )
    fig.projections = results
    return fig
