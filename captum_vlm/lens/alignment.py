"""Retrieval scores of an image x text similarity matrix when the true pairs are known."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from captum_vlm.lens.embed import check_pairs


@dataclass
class AlignmentScores:
    """Image→text and text→image retrieval scores of one similarity matrix.

    Ranks start at 1; a true match shares its rank with nothing it ties (ties count in its
    favour). Image→text: the rank of image i's own text among all texts. Text→image: for each
    text that belongs to at least one image, the rank of its best-scoring own image among the
    images (other images that share the text are not counted against it).

    Attributes:
        image_to_text: ``{k: recall@k}``.
        text_to_image: ``{k: recall@k}``.
        mean_rank_image_to_text: mean rank of the true text.
        mean_rank_text_to_image: mean rank of the true image.
        diagonal_row_max: share of images whose own text is the row maximum (the
            "block-diagonal" check: a bright diagonal in a matrix ordered by pairs).
        diagonal_column_max: share of images whose own text has this image as column maximum.
        image_ranks: rank of each image's own text ``[N]``.
        text_ranks: rank of each paired text's best own image ``[T]`` (texts in index order).
    """

    image_to_text: dict[int, float]
    text_to_image: dict[int, float]
    mean_rank_image_to_text: float
    mean_rank_text_to_image: float
    diagonal_row_max: float
    diagonal_column_max: float
    image_ranks: torch.Tensor
    text_ranks: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        """Flat ``{name: value}`` for tables and reports."""
        out = {f"image→text R@{k}": v for k, v in self.image_to_text.items()}
        out.update({f"text→image R@{k}": v for k, v in self.text_to_image.items()})
        out["mean rank image→text"] = self.mean_rank_image_to_text
        out["mean rank text→image"] = self.mean_rank_text_to_image
        out["diagonal is row max"] = self.diagonal_row_max
        out["diagonal is column max"] = self.diagonal_column_max
        return out


def alignment_scores(
    similarity: torch.Tensor, pairs: str | Sequence[int], ks: Sequence[int] = (1, 5, 10)
) -> AlignmentScores:
    """Recall@k both ways, mean rank and the block-diagonal share.

    Args:
        similarity: ``[N, M]`` image x text scores (any monotone scale gives the same result).
        pairs: ``"diagonal"`` or ``pairs[i]`` = index of image i's own text.
        ks: the k of recall@k.

    Returns:
        :class:`AlignmentScores`.

    Example:
        >>> alignment_scores(emb.similarity(), emb.pairs).image_to_text[1]   # doctest: +SKIP
        0.93
    """
    if not isinstance(similarity, torch.Tensor) or similarity.dim() != 2 or 0 in similarity.shape:
        shape = tuple(similarity.shape) if isinstance(similarity, torch.Tensor) else type(similarity).__name__
        raise ValueError(f"similarity: expected a non-empty [N, M] tensor, got {shape}")
    if not torch.isfinite(similarity).all():
        raise ValueError("similarity: holds NaN or infinite values")
    n, m = similarity.shape
    pair = torch.tensor(check_pairs(pairs, n, m))
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad or not ks:
        raise ValueError(f"ks: expected positive ints, got {list(ks)}")
    sim = similarity.double()
    rows = torch.arange(n)
    true = sim[rows, pair]
    image_ranks = 1 + (sim > true[:, None]).sum(dim=1)
    owner = torch.zeros(n, m, dtype=torch.bool)
    owner[rows, pair] = True
    paired_texts = owner.any(dim=0).nonzero().flatten()
    best_own = sim.masked_fill(~owner, float("-inf")).max(dim=0).values[paired_texts]
    others = sim[:, paired_texts].masked_fill(owner[:, paired_texts], float("-inf"))
    text_ranks = 1 + (others > best_own[None, :]).sum(dim=0)
    return AlignmentScores(
        image_to_text={k: float((image_ranks <= k).double().mean()) for k in ks},
        text_to_image={k: float((text_ranks <= k).double().mean()) for k in ks},
        mean_rank_image_to_text=float(image_ranks.double().mean()),
        mean_rank_text_to_image=float(text_ranks.double().mean()),
        diagonal_row_max=float((true >= sim.max(dim=1).values).double().mean()),
        diagonal_column_max=float((true >= sim.max(dim=0).values[pair]).double().mean()),
        image_ranks=image_ranks,
        text_ranks=text_ranks,
    )
