"""Adapter for BLIP-2 (``Blip2ForConditionalGeneration``): a ViT, a Q-Former whose learned query
tokens cross-attend to the patches, a projection, and a decoder-only language model (OPT) that
sees the projected queries where ``input_ids`` hold the image placeholders."""

from __future__ import annotations

from torch import nn

from captum_vlm.adapters.base import register_adapter
from captum_vlm.adapters.llava import LlavaAdapter


@register_adapter
class Blip2Adapter(LlavaAdapter):
    """BLIP-2 (Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image
    Encoders and Large Language Models", ICML 2023).

    The language model's input holds ``config.num_query_tokens`` image placeholders
    (``config.image_token_index``, before the BOS, as ``Blip2Processor`` writes them); each is
    filled with one projected Q-Former output. Those image tokens are learned *queries*, not
    patches (:attr:`image_tokens` ``"queries"``): a score on query ``j`` reaches the patch grid
    through the bridge, the Q-Former's cross-attention from the queries to the vision tokens
    (:meth:`bridge_blocks`; CLS first on its key axis). The language model's self-attention from
    text positions to the placeholders is its image attention, as for LLaVA.

    Only decoder-only language models are read (the OPT checkpoints); a T5 one is refused.

    Example:
        >>> adapter = get_adapter(blip2_model)                       # doctest: +SKIP
        >>> adapter.image_tokens, adapter.num_image_tokens(pixel_values)  # doctest: +SKIP
        ('queries', 32)
    """

    family = "blip2"
    #: no zoo model (so no ranking of its own): the BLIP ranking of the same two fusion methods
    #: (shapes-blip-itm / -vqa pointing 0.830 / 0.752 for bi-modal relevancy against Grad-CAM
    #: 0.733 / 0.596, benchmarks/RESULTS.md), as for LLaVA; InstructBLIP inherits it
    default_methods = ("bimodal-relevancy",)
    model_classes = ("Blip2ForConditionalGeneration",)
    tasks = {"Blip2ForConditionalGeneration": "generate"}
    image_tokens = "queries"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if not getattr(model.config, "use_decoder_only_language_model", True):
            raise TypeError(
                f"model: {type(model).__name__} with an encoder-decoder language model "
                f"({model.config.text_config.model_type}) is not supported; captum-vlm reads the "
                "decoder-only ones (OPT)"
            )

    def vision_model(self) -> nn.Module:
        return self.model.vision_model

    @property
    def num_prefix_tokens(self) -> int:
        return 1  # the vision tower's CLS; the Q-Former attends to it too

    def _decoder(self) -> nn.Module:
        """The language model's stack of blocks (OPT: ``model.decoder``; Llama-style: ``model``)."""
        inner = self.model.language_model.model
        return getattr(inner, "decoder", inner)

    def text_blocks(self) -> list[nn.Module]:
        return list(self._decoder().layers)

    def text_embedding(self) -> nn.Module:
        return self.model.language_model.get_input_embeddings()

    def final_norm(self) -> nn.Module:
        decoder = self._decoder()
        norm = getattr(decoder, "final_layer_norm", None) or getattr(decoder, "norm", None) or nn.Identity()
        project = getattr(decoder, "project_out", None)
        return norm if project is None else nn.Sequential(norm, project)

    def lm_head(self) -> nn.Module:
        return self.model.language_model.get_output_embeddings()

    def num_image_tokens(self, pixel_values) -> int:
        self.patch_grid(pixel_values)  # checks the image
        return int(self.model.config.num_query_tokens)

    # ----- the Q-Former: the bridge from the query tokens to the patches ---------------------------
    def qformer_layers(self) -> list[nn.Module]:
        """The Q-Former's layers, first to last."""
        return list(self.model.qformer.encoder.layer)

    def bridge_blocks(self) -> list[tuple[nn.Module, nn.Module | None]]:
        return [(layer.attention.attention, layer.crossattention.attention if layer.has_cross_attention else None)
                for layer in self.qformer_layers()]

    def bridge_embedding(self) -> nn.Module:
        return self.model.qformer.layernorm

    # ----- inside the model (lens) ----------------------------------------------------------------
    def head_projections(self, stream: str) -> list[nn.Module]:
        if stream == "vision":
            return [block.self_attn.projection for block in self.vision_blocks()]
        if stream in ("text", "cross"):
            return [getattr(block.self_attn, "out_proj", None) or block.self_attn.o_proj for block in self.text_blocks()]
        return super().head_projections(stream)
