"""The adapter base class and the registry that picks an adapter from a model's class.

An adapter tells the rest of captum-vlm where things live inside one model family: the vision
blocks and their attention modules, the text blocks, cross-attention, the embedding layers, the
patch grid for an actual input, the prefix tokens and the pooled text position. Methods in
``captum_vlm.attr`` ask the adapter instead of knowing model internals.
"""

from __future__ import annotations

import torch
from torch import nn

from captum_vlm._checks import check_pixel_values

_REGISTRY: dict[str, type[VLMAdapter]] = {}


class VLMAdapter:
    """Where things live inside one vision-language model family.

    Subclasses set :attr:`family` and :attr:`model_classes` and implement the accessors they
    can answer; an accessor a family does not have raises ``NotImplementedError`` naming it.

    Args:
        model: a model of one of :attr:`model_classes`.

    Example:
        >>> adapter = get_adapter(model)               # doctest: +SKIP
        >>> adapter.patch_grid(pixel_values)           # doctest: +SKIP
        (7, 7)
    """

    family: str = ""
    model_classes: tuple[str, ...] = ()
    #: attention modules whose forward must be asked for ``output_attentions`` (ViLT)
    attention_needs_output_flag: bool = False

    def __init__(self, model: nn.Module):
        self.model = model

    # ----- vision tower -------------------------------------------------------------------
    # The defaults below fit the transformers ViTs (CLIP, SigLIP, BLIP, LLaVA's tower): blocks
    # at ``vision_model().encoder.layers``, attention at ``block.self_attn``, the patch
    # convolution at ``vision_model().embeddings.patch_embedding``. Other towers override them.
    def vision_model(self) -> nn.Module:
        """The vision transformer (embeddings + encoder)."""
        raise NotImplementedError(f"{self.family}: no separate vision model")

    def vision_blocks(self) -> list[nn.Module]:
        """The vision transformer blocks, first to last."""
        return list(self.vision_model().encoder.layers)

    def vision_attentions(self) -> list[nn.Module]:
        """The attention modules of :meth:`vision_blocks` whose output ``[1]`` is the
        attention probabilities ``[B, heads, N, N]`` (under eager attention)."""
        return [block.self_attn for block in self.vision_blocks()]

    def patch_embedding(self) -> nn.Module:
        """The module whose output is the patch embeddings (for image-side IG)."""
        return self.vision_model().embeddings.patch_embedding

    def patch_size(self) -> tuple[int, int]:
        """Patch height and width in pixels."""
        conv = self._patch_conv()
        return tuple(int(s) for s in conv.kernel_size)  # type: ignore[return-value]

    def _patch_conv(self) -> nn.Conv2d:
        """The patch convolution (its kernel is the patch size)."""
        return self.patch_embedding()

    def patch_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """The patch grid ``(rows, cols)`` for these actual ``pixel_values``.

        Args:
            pixel_values: ``[B, 3, H, W]`` as the processor returns it.

        Returns:
            ``(H // patch_h, W // patch_w)``; non-square inputs give non-square grids.

        Raises:
            ValueError: the image is smaller than one patch.
        """
        check_pixel_values(pixel_values)
        ph, pw = self.patch_size()
        h, w = pixel_values.shape[-2:]
        if h < ph or w < pw:
            raise ValueError(f"pixel_values: image {(h, w)} is smaller than one {ph}x{pw} patch")
        return h // ph, w // pw

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in the vision sequence (CLS, registers)."""
        return 1

    # ----- text side --------------------------------------------------------------------
    def text_blocks(self) -> list[nn.Module]:
        """The text transformer blocks, first to last."""
        raise NotImplementedError(f"{self.family}: text_blocks")

    def text_attentions(self) -> list[nn.Module]:
        """Self-attention modules of the text blocks (output ``[1]`` = probabilities)."""
        raise NotImplementedError(f"{self.family}: text_attentions")

    def text_embedding(self) -> nn.Module:
        """The token-embedding module (``nn.Embedding``) used for token IG."""
        raise NotImplementedError(f"{self.family}: text_embedding")

    def cross_attentions(self) -> list[nn.Module]:
        """Modules where text queries attend to image tokens (output ``[1]`` = probabilities).

        Two-tower families have none and return ``[]``.
        """
        return []

    def pooled_text_position(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Index of the token whose state becomes the pooled text embedding, per row ``[B]``."""
        raise NotImplementedError(f"{self.family}: pooled_text_position")

    def max_text_length(self) -> int | None:
        """Longest token sequence the text model accepts (position embeddings), if bounded."""
        return None

    # ----- multimodal sequence ----------------------------------------------------------------
    def image_token_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask ``[B, T]`` of the positions holding image tokens in a joint sequence."""
        raise NotImplementedError(f"{self.family}: image tokens do not sit in the text sequence")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__})"

    # ----- joint image-text embedding space (captum_vlm.lens) ------------------------------
    #: model classes of this family whose image and text embeddings share one space
    joint_embedding_classes: tuple[str, ...] = ()
    #: how the joint space's logits become probabilities: "softmax" over texts or "sigmoid"
    joint_probability: str = "softmax"
    #: tokenizer ``padding`` the text tower was trained with (SigLIP pools the last position)
    text_padding: bool | str = True

    @property
    def has_joint_embeddings(self) -> bool:
        """Whether this model maps images and texts into one embedding space."""
        return any(k.__name__ in self.joint_embedding_classes for k in type(self.model).__mro__)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit-normalised image embeddings ``[B, D]`` in the joint space."""
        raise NotImplementedError(f"{self.family}: {type(self.model).__name__} has no joint embedding space")

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unit-normalised text embeddings ``[K, D]`` in the joint space."""
        raise NotImplementedError(f"{self.family}: {type(self.model).__name__} has no joint embedding space")

    def joint_logit_scale_bias(self) -> tuple[float, float]:
        """``(scale, bias)`` with which the model turns a cosine into its logit: ``scale * cos + bias``."""
        raise NotImplementedError(f"{self.family}: {type(self.model).__name__} has no joint embedding space")


def register_adapter(cls: type[VLMAdapter]) -> type[VLMAdapter]:
    """Class decorator: make ``cls`` the adapter of every class named in ``cls.model_classes``.

    Example:
        >>> @register_adapter
        ... class MyAdapter(VLMAdapter):
        ...     family = "mine"
        ...     model_classes = ("MyVLModel",)
    """
    if not cls.model_classes:
        raise ValueError(f"{cls.__name__}.model_classes is empty: name the model classes it serves")
    for name in cls.model_classes:
        _REGISTRY[name] = cls
    return cls


def supported_model_classes() -> list[str]:
    """Names of the model classes that have a registered adapter."""
    return sorted(_REGISTRY)


def get_adapter(model: nn.Module | VLMAdapter) -> VLMAdapter:
    """Pick the adapter for ``model`` from its class (walking its base classes).

    Args:
        model: a transformers vision-language model, or an adapter (returned as is).

    Returns:
        The family's adapter bound to ``model``.

    Raises:
        TypeError: the class has no adapter; the message lists the supported classes.
    """
    if isinstance(model, VLMAdapter):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for klass in type(model).__mro__:
        if klass.__name__ in _REGISTRY:
            return _REGISTRY[klass.__name__](model)
    raise TypeError(
        f"model: captum-vlm has no adapter for {type(model).__name__}. Supported classes: "
        f"{', '.join(supported_model_classes())}. To add your own, subclass "
        "captum_vlm.adapters.VLMAdapter, set model_classes = ('YourModelClass',) and decorate it "
        "with @captum_vlm.adapters.register_adapter."
    )


def first_position_of(
    input_ids: torch.Tensor, token_id: int, what: str
) -> torch.Tensor:
    """Index of the first ``token_id`` in each row; ValueError naming ``what`` if a row has none."""
    hits = input_ids == token_id
    missing = ~hits.any(dim=1)
    if missing.any():
        rows = missing.nonzero().flatten().tolist()
        raise ValueError(
            f"input_ids: rows {rows} hold no {what} token (id {token_id}); the model pools there. "
            "Tokenise with the model's own processor."
        )
    return hits.int().argmax(dim=1)
