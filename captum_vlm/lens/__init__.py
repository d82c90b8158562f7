"""The lens: views of how a model encodes images and text that are not attributions.

Alignment (issue 12): :func:`embed` puts images and texts into the model's joint space; the
similarity matrix, zero-shot bars, retrieval lists, projections, the modality gap, a TensorBoard
Projector export and a self-contained HTML report read those :class:`Embeddings`.

Inside the model (issue 13): the logit lens (:func:`logit_lens`), linear probes per layer
(:func:`probe`), attention-head statistics (:func:`head_statistics`) and scoped head ablation
(:func:`ablate_heads`, :func:`head_importance`); every one also in a self-contained HTML report
(:func:`inside_report`, or each result's ``to_html``). Models whose image tokens are learned queries
(BLIP-2): each query's cross-attention over the patches (:func:`query_maps`).

Example:
    >>> emb = cv.lens.embed(model, processor, images=scenes, texts=captions, pairs="diagonal")  # doctest: +SKIP
    >>> emb.similarity("cosine").shape                                                        # doctest: +SKIP
    >>> cv.lens.report(emb, "lens.html")                                                      # doctest: +SKIP
"""

from captum_vlm.lens.alignment import AlignmentScores, alignment_scores
from captum_vlm.lens.embed import embed, joint_embedding_classes
from captum_vlm.lens.embeddings import Embeddings
from captum_vlm.lens.heads import (
    HeadImportance,
    HeadStatistics,
    ablate_heads,
    attention_statistics,
    head_importance,
    head_statistics,
)
from captum_vlm.lens.inside_report import inside_report
from captum_vlm.lens.logit_lens import (
    LogitLens,
    logit_lens,
    logit_lens_from_inputs,
    logit_lens_scored,
)
from captum_vlm.lens.modality_gap import ModalityGap, modality_gap
from captum_vlm.lens.probes import ProbeResult, layer_features, patch_labels, probe
from captum_vlm.lens.projection import Projection, neighbour_agreement, project, projection
from captum_vlm.lens.queries import query_maps
from captum_vlm.lens.report import report
from captum_vlm.lens.views import gap_view, retrieval, similarity_matrix, top_matches, zero_shot

__all__ = [
    # alignment
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
    # inside the model
    "LogitLens",
    "logit_lens",
    "logit_lens_from_inputs",
    "logit_lens_scored",
    "inside_report",
    "ProbeResult",
    "probe",
    "layer_features",
    "patch_labels",
    "HeadStatistics",
    "HeadImportance",
    "attention_statistics",
    "head_statistics",
    "ablate_heads",
    "head_importance",
    # query image tokens
    "query_maps",
]
