"""The lens: views of how a model encodes images and text that are not attributions.

Alignment (issue 12): :func:`embed` puts images and texts into the model's joint space; the
similarity matrix, zero-shot bars, retrieval lists, projections, the modality gap, a TensorBoard
Projector export and a self-contained HTML report read those :class:`Embeddings`.

Example:
    >>> emb = cv.lens.embed(model, processor, images=scenes, texts=captions, pairs="diagonal")  # doctest: +SKIP
    >>> emb.similarity("cosine").shape                                                        # doctest: +SKIP
    >>> cv.lens.report(emb, "lens.html")                                                      # doctest: +SKIP
"""

from captum_vlm.lens.alignment import AlignmentScores, alignment_scores
from captum_vlm.lens.embed import embed, joint_embedding_classes
from captum_vlm.lens.embeddings import Embeddings
from captum_vlm.lens.modality_gap import ModalityGap, modality_gap
from captum_vlm.lens.projection import Projection, neighbour_agreement, project, projection
from captum_vlm.lens.report import report
from captum_vlm.lens.views import gap_view, retrieval, similarity_matrix, top_matches, zero_shot

__all__ = [
    "AlignmentScores",
    "Embeddings",
    "ModalityGap",
    "Projection",
    "alignment_scores",
    "embed",
    "gap_view",
    "joint_embedding_classes",
    "modality_gap",
    "neighbour_agreement",
    "project",
    "projection",
    "report",
    "retrieval",
    "similarity_matrix",
    "top_matches",
    "zero_shot",
]
