"""Image and text embeddings in a model's joint space, with what each row came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from captum_vlm._checks import check_choice

SCALES = ("cosine", "logits", "softmax", "sigmoid")


@dataclass
class Embeddings:
    """What :func:`captum_vlm.lens.embed` returns.

    Attributes:
        image: ``[N, D]`` unit-normalised image embeddings (``N`` may be 0).
        text: ``[M, D]`` unit-normalised text embeddings (``M`` may be 0).
        image_sources: where each image came from (its path, or ``"image i"``).
        texts: the texts, one per row of :attr:`text`.
        thumbnails: a small RGB thumbnail of each image (for the views and the sprite).
        image_labels: optional label of each image (colours the projection).
        text_labels: optional label of each text.
        pairs: optional ``pairs[i]`` = index of the text that belongs to image ``i``.
        logit_scale: the model's logit is ``logit_scale * cosine + logit_bias``.
        logit_bias: see ``logit_scale``.
        probability: how the model turns logits into probabilities: ``"softmax"`` over texts
            (CLIP, BLIP) or ``"sigmoid"`` per pair (SigLIP).
        model_name: the model's name, for titles.

    Example:
        >>> emb.similarity("softmax")[0]          # doctest: +SKIP
        tensor([0.97, 0.01, ...])
    """

    image: torch.Tensor
    text: torch.Tensor
    image_sources: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    thumbnails: list[Image.Image] = field(default_factory=list)
    image_labels: list[str] | None = None
    text_labels: list[str] | None = None
    pairs: list[int] | None = None
    logit_scale: float = 1.0
    logit_bias: float = 0.0
    probability: str = "softmax"
    model_name: str = "model"

    @property
    def modality(self) -> list[str]:
        """``"image"`` or ``"text"`` for each row of :meth:`stacked` (images first)."""
        return ["image"] * len(self.image) + ["text"] * len(self.text)

    def stacked(self) -> torch.Tensor:
        """Image rows then text rows, ``[N + M, D]``."""
        return torch.cat([self.image, self.text])

    def labels(self) -> list[str] | None:
        """The label of each row of :meth:`stacked`, or None when no labels were given.

        A missing side's labels fall back to the text itself (texts) or the source (images).
        """
        if self.image_labels is None and self.text_labels is None:
            return None
        image = self.image_labels if self.image_labels is not None else list(self.image_sources)
        text = self.text_labels if self.text_labels is not None else list(self.texts)
        return list(image) + list(text)

    def require(self, images: bool = False, texts: bool = False, view: str = "this view") -> None:
        """ValueError naming what ``view`` needs when images or texts are missing."""
        if images and len(self.image) == 0:
            raise ValueError(f"embeddings: {view} needs images; embed(..., images=[...]) gave none")
        if texts and len(self.text) == 0:
            raise ValueError(f"embeddings: {view} needs texts; embed(..., texts=[...]) gave none")

    def similarity(self, scale: str = "cosine") -> torch.Tensor:
        """The ``[N, M]`` image x text matrix.

        Args:
            scale: ``"cosine"``; ``"logits"``, the model's own ``logits_per_image``;
                ``"softmax"``, probabilities over the texts of each image; ``"sigmoid"``, the
                per-pair probability of models trained with a sigmoid loss (SigLIP).

        Returns:
            ``[N, M]`` float tensor.

        Raises:
            ValueError: unknown scale, ``"sigmoid"`` for a softmax-trained model, or no images
                or texts.
        """
        check_choice(scale, SCALES, "scale")
        self.require(images=True, texts=True, view="the similarity matrix")
        if scale == "sigmoid" and self.probability != "sigmoid":
            raise ValueError(
                f"scale: 'sigmoid' is for models trained with a sigmoid loss (SigLIP); "
                f"{self.model_name} turns logits into probabilities with {self.probability!r}"
            )
        cosine = self.image @ self.text.T
        if scale == "cosine":
            return cosine
        logits = self.logit_scale * cosine + self.logit_bias
        if scale == "logits":
            return logits
        if scale == "softmax":
            return logits.softmax(dim=1)
        return torch.sigmoid(logits)

    def to_projector(self, logdir: str | Path, thumbnail_size: int = 32) -> Path:
        """Write image and text rows for TensorBoard's Embedding Projector.

        See :func:`captum_vlm.lens.projector.to_projector`.
        """
        from captum_vlm.lens.projector import to_projector

        return to_projector(self, logdir, thumbnail_size=thumbnail_size)

    def __repr__(self) -> str:
        dim = self.image.shape[1] if len(self.image) else self.text.shape[-1]
        return (
            f"Embeddings({len(self.image)} images, {len(self.text)} texts, dim {dim}, "
            f"model {self.model_name!r}, pairs {'yes' if self.pairs is not None else 'no'})"
        )
