"""The adapter base class and the registry that picks an adapter from a model's class.

An adapter tells the rest of captum-vlm where things live inside one model family (the vision
blocks and their attention modules, the text blocks, cross-attention, the embedding layers, the
final norm and LM head) and how to read it: what each class computes (:attr:`VLMAdapter.task`),
capability flags (image stream, pooling, padding rule, how a score becomes a probability), the
patch grid for an actual input, where the image tokens sit (:meth:`VLMAdapter.image_layout`), how
to run without some of them (:meth:`VLMAdapter.drop_image_tokens`), the special and pad token ids
and the pooled text position. Code in ``captum_vlm.attr``, ``explain`` and ``metrics`` asks the
adapter instead of naming a family or a model class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from captum_vlm._checks import check_pixel_values
from captum_vlm.adapters.layout import ImageTokenLayout

#: what a model class computes, the values of :attr:`VLMAdapter.task`
TASKS = {
    "similarity": "two-tower logits of images against K prompts",
    "match": "one image-text match logit per example",
    "answer_label": "VQA answer-classifier logits (the answer is a label)",
    "caption": "teacher-forced log-probabilities of the caption in input_ids",
    "answer_tokens": "teacher-forced log-probabilities of separate answer_ids after the question",
    "generate": "a language model continuing input_ids, which hold the image tokens",
}
#: tasks whose scores are log-probabilities of tokens (one backward per explained token)
TOKEN_TASKS = ("caption", "answer_tokens", "generate")
#: tasks explained through the model's own answer to each text
ANSWER_TASKS = ("answer_label", "answer_tokens", "generate")
_CONFIG_TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                      "decoder_start_token_id", "image_token_id", "image_token_index", "boi_token_id",
                      "eoi_token_id")

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
    #: what each of :attr:`model_classes` computes, one of :data:`TASKS`
    tasks: dict[str, str] = {}
    #: attention modules whose forward must be asked for ``output_attentions`` (ViLT)
    attention_needs_output_flag: bool = False

    # ----- capability flags (class attributes; subclasses override what differs) -------------
    #: two towers embed image and text apart and compare the embeddings
    two_tower: bool = False
    #: where text meets the image tokens: ``"separate"`` (two towers, never), ``"cross"`` (text
    #: cross-attends to a separate image stream), ``"joint"`` (one sequence of both)
    image_stream: str = "separate"
    #: how the image side is pooled: ``"cls"`` (a prefix token), ``"attention_head"`` (a probe
    #: query attends over the patch tokens after the encoder), ``"none"`` (all image tokens used)
    image_pooling: str = "cls"
    #: the processor's ``padding=`` the text tower was trained with
    text_padding: bool | str = True
    #: special tokens at the start of every text (a BOS) that carry no word
    text_start_tokens: int = 0
    #: the image tokens sit in ``input_ids`` as placeholders (one per image feature)
    image_tokens_in_input_ids: bool = False
    #: what an image token stands for: ``"patches"`` (one cell of the patch grid) or ``"queries"``
    #: (a learned query that cross-attends to the vision tokens, e.g. a Q-Former's; it maps to
    #: the grid through the bridge, see :meth:`bridge_blocks`)
    image_tokens: str = "patches"
    #: two-tower models: how similarity logits become probabilities, ``"softmax"`` over the
    #: prompts or ``"sigmoid"`` of each
    similarity_probability: str = "softmax"
    #: the registry methods ``explain`` uses when given none: the most faithful on this family's
    #: zoo model (benchmarks/RESULTS.md); ``()`` where no zoo ranking exists (the first that fits)
    default_methods: tuple[str, ...] = ()
    #: the model embeds images of any size (dynamic resolution): the grid follows the input
    any_image_size: bool = False
    #: processor outputs beyond ``input_ids`` and ``attention_mask`` that the model takes,
    #: passed after them in ``additional_forward_args`` and read by :meth:`language_kwargs`
    #: (PaliGemma: ``token_type_ids``; InstructBLIP: the instruction as its Q-Former reads it)
    extra_text_inputs: tuple[str, ...] = ()
    #: the model's forward passes ``interpolate_pos_encoding`` on to its vision tower, so it
    #: takes other image sizes than the trained one
    interpolates_positions: bool = True
    #: the vision tower runs once per view of the image (tiles and a global or base view, each
    #: its own sequence), so one run of it on the whole ``pixel_values`` is not what the model
    #: computes and its tokens are no single patch grid: lens views of the tower refuse it
    vision_tower_per_view: bool = False

    def __init__(self, model: nn.Module):
        self.model = model

    # ----- what the model computes ---------------------------------------------------------------
    @property
    def task(self) -> str:
        """What this model class computes (one of :data:`TASKS`), read from :attr:`tasks` along
        the class's bases."""
        for klass in type(self.model).__mro__:
            if klass.__name__ in self.tasks:
                return self.tasks[klass.__name__]
        if self.two_tower:
            return "similarity"
        raise NotImplementedError(f"{self.family}: no task declared for {type(self.model).__name__}")

    @property
    def scores_tokens(self) -> bool:
        """The score is the log-probability of tokens, each explained by its own backward."""
        return self.task in TOKEN_TASKS

    @property
    def answers_questions(self) -> bool:
        """Its maps explain the model's own answer to each text (VQA, generative models)."""
        return self.task in ANSWER_TASKS

    @property
    def takes_answer_ids(self) -> bool:
        """The scored tokens are separate ``answer_ids`` after the question (not ``input_ids``)."""
        return self.task == "answer_tokens"

    @property
    def probability(self) -> str:
        """How the model's score becomes a probability: ``"softmax"`` (over prompts),
        ``"sigmoid"`` (a logit) or ``"exp"`` (a log-probability)."""
        if self.task == "similarity":
            return self.similarity_probability
        return "exp" if self.scores_tokens else "sigmoid"

    def to_probability(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` (logits ``[..., K]`` or log-probabilities) as probabilities, see
        :attr:`probability`."""
        how = self.probability
        if how == "softmax":
            return scores.softmax(-1)
        return scores.exp() if how == "exp" else torch.sigmoid(scores)

    def default_target(self):
        """The scalar a method explains when given the bare model, see
        :func:`captum_vlm.targets.default_target`."""
        from captum_vlm.targets import default_target

        return default_target(self.model)

    def processor_images(self, image, n_texts: int):
        """What the processor's ``images=`` takes to pair ``image`` with ``n_texts`` texts: the
        image once (two towers compare it with every text) or once per text; families whose
        processor reads a flat list as several images of one text override this."""
        return image if self.two_tower else [image] * n_texts

    # ----- special tokens ---------------------------------------------------------------------
    def config_token_ids(self) -> dict[str, int]:
        """Special token ids named by the model's config (or its text config):
        ``{"pad_token_id": 0, "eos_token_id": 2, ...}``."""
        found: dict[str, int] = {}
        config = getattr(self.model, "config", None)
        for part in (config, getattr(config, "text_config", None)):
            if part is None:
                continue
            for key in _CONFIG_TOKEN_KEYS:
                value = getattr(part, key, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    found.setdefault(key, value)
        return found

    @property
    def pad_token_id(self) -> int | None:
        """The pad token id, if the config names one."""
        return self.config_token_ids().get("pad_token_id")

    @property
    def special_token_ids(self) -> set[int]:
        """Ids of the special tokens that are not padding (BOS, EOS, SEP, CLS, image placeholder)."""
        return {v for k, v in self.config_token_ids().items() if k != "pad_token_id"}

    def special_token_mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_token_ids: Sequence[int] = ()
    ) -> torch.Tensor:
        """Positions a text baseline or a text occlusion must leave alone ``[B, T]`` (bool):
        position 0 (BOS/CLS), the special tokens, the pooled position, padding and
        ``keep_token_ids``."""
        keep = torch.zeros_like(input_ids, dtype=torch.bool)
        for token in self.special_token_ids | {int(t) for t in keep_token_ids}:
            keep |= input_ids == token
        keep[:, 0] = True
        keep |= ~attention_mask.bool()
        pooled = self.pooled_text_position(input_ids, attention_mask).to(input_ids.device)
        keep[torch.arange(input_ids.shape[0], device=input_ids.device), pooled] = True
        return keep

    # ----- vision tower -------------------------------------------------------------------
    # The defaults below fit the transformers ViTs (CLIP, SigLIP, BLIP, LLaVA's tower): blocks
    # at ``vision_model().encoder.layers``, attention at ``block.self_attn``, the patch
    # convolution at ``vision_model().embeddings.patch_embedding``. Other towers override them.
    def vision_model(self) -> nn.Module:
        """The vision transformer (embeddings + encoder)."""
        raise NotImplementedError(f"{self.family}: no separate vision model")

    def vision_outputs(self, pixel_values: torch.Tensor, **kwargs):
        """The vision model's outputs for one image tensor ``[B, 3, H, W]`` (``kwargs`` such as
        ``interpolate_pos_encoding`` passed on); families whose tower takes its image otherwise
        (NaFlex patches) convert here."""
        return self.vision_model()(pixel_values=pixel_values, **kwargs)

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
        """Height and width in pixels of one cell of the map grid (:meth:`patch_grid`): the
        patch, or the block of patches one merged image token stands for."""
        conv = self._patch_conv()
        ph, pw = (int(s) for s in conv.kernel_size)
        kh, kw = self.patches_per_cell
        return ph * kh, pw * kw

    @property
    def patches_per_cell(self) -> tuple[int, int]:
        """Vision patches ``(rows, cols)`` in one cell of the grid, i.e. pooled into one image
        token (Gemma 3: ``(4, 4)``); ``(1, 1)`` where each image token is one patch."""
        return 1, 1

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

    def vision_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """The vision tower's own patch grid for these ``pixel_values``: :meth:`patch_grid` times
        :attr:`patches_per_cell` (the same grid where each image token is one patch)."""
        (h, w), (kh, kw) = self.patch_grid(pixel_values), self.patches_per_cell
        return h * kh, w * kw

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in the vision sequence (CLS, registers)."""
        return 1

    # ----- the model's image inputs ---------------------------------------------------------------
    # Every method takes (and every map is drawn over) one image tensor ``[B, 3, H, W]`` per
    # example, the processed image. Families whose processor hands the image over otherwise
    # (flattened patches with their grid, tiles) convert in these two methods.
    def processor_inputs(self, outputs: Mapping) -> dict:
        """The processor's outputs with ``pixel_values`` as one image tensor ``[B, 3, H, W]``
        (and the keys :meth:`model_inputs` rebuilds from it dropped). Default: as they are.

        Example:
            >>> inputs = adapter.processor_inputs(processor(images=image, text=texts, return_tensors="pt"))  # doctest: +SKIP
        """
        return dict(outputs)

    def model_inputs(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, extra: Sequence[torch.Tensor | None] = (),
    ) -> dict:
        """The keyword arguments of the model's forward (and ``generate``) for one image tensor
        ``[B, 3, H, W]`` and the text. Default: the three as they are. ``extra``: the
        :attr:`extra_text_inputs` (the model's own come from :meth:`language_kwargs`; a family
        whose image inputs depend on them reads them here, default: ignored).

        Example:
            >>> logits = model(**adapter.model_inputs(pixel_values, input_ids, attention_mask)).logits  # doctest: +SKIP
        """
        kwargs = {"pixel_values": pixel_values}
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return kwargs

    def patch_embedding_grid(
        self, layer_attr: torch.Tensor, pixel_values: torch.Tensor, extra: Sequence[torch.Tensor | None] = ()
    ) -> torch.Tensor:
        """Attributions at :meth:`patch_embedding`'s output (``[B, D, h * kh, w * kw]`` or
        ``[B, N, D]``) summed per map-grid cell ``[B, h, w]``, a cell holding
        :attr:`patches_per_cell` ``= (kh, kw)`` patches (pooled image tokens). ``extra``: the
        :attr:`extra_text_inputs` (default: ignored)."""
        (h, w), (kh, kw) = self.patch_grid(pixel_values), self.patches_per_cell
        per_patch = layer_attr.sum(1) if layer_attr.dim() == 4 else layer_attr.sum(-1)
        return per_patch.reshape(layer_attr.shape[0], h, kh, w, kw).sum(dim=(2, 4))

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

    def final_norm(self) -> nn.Module:
        """The norm applied to the last hidden state before the LM head (logit lens)."""
        raise NotImplementedError(f"{self.family}: final_norm")

    def lm_head(self) -> nn.Module:
        """The module mapping final hidden states to vocabulary logits."""
        raise NotImplementedError(f"{self.family}: lm_head")

    # ----- image-token layout ------------------------------------------------------------------
    def image_token_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask ``[B, T]`` of the positions holding image tokens in a joint sequence."""
        raise NotImplementedError(f"{self.family}: image tokens do not sit in the text sequence")

    def num_image_tokens(self, pixel_values: torch.Tensor) -> int:
        """How many image tokens the model makes of each image of ``pixel_values`` (the number of
        image placeholders ``input_ids`` must hold when they sit there)."""
        h, w = self.patch_grid(pixel_values)
        return h * w

    def check_image_tokens(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> None:
        """Before a forward: ``input_ids`` hold the image placeholders this model fills (query
        image tokens; a model whose placeholders are patches checks its own). ValueError if not."""
        if self.image_tokens == "queries":
            ImageTokenLayout.queries(self.image_token_positions(input_ids), self.patch_grid(pixel_values),
                                     self.num_image_tokens(pixel_values))

    # ----- the bridge of query image tokens (image_tokens == "queries") -------------------------
    def bridge_blocks(self) -> list[tuple[nn.Module, nn.Module | None]]:
        """Per layer of the module that turns learned queries into image tokens (a Q-Former),
        first to last: ``(self_attention, cross_attention or None)``. The self-attention runs over
        the queries (and any text they read, after them); the cross-attention goes from the
        queries to the vision tokens (output ``[1]`` = probabilities ``[B, heads, N, K]``, K the
        vision tokens, prefix first). ``[]`` when the image tokens are patches."""
        return []

    def bridge_attentions(self) -> list[nn.Module]:
        """The cross-attentions of :meth:`bridge_blocks` (queries to vision tokens), first to last."""
        return [cross for _, cross in self.bridge_blocks() if cross is not None]

    def bridge_embedding(self) -> nn.Module | None:
        """The module whose output is the bridge's input sequence (the embedded queries); methods
        make it differentiable so that gradients reach the bridge's first attention."""
        return None
    def language_kwargs(self, input_ids: torch.Tensor, extra: Sequence[torch.Tensor | None] = ()) -> dict:
        """Keyword inputs of the model's forward beside ``pixel_values``, ``input_ids`` and
        ``attention_mask``: the :attr:`extra_text_inputs` given in ``extra`` (``None`` left out);
        families whose forward needs more read it from ``input_ids`` here.

        Raises:
            ValueError: more ``extra`` tensors than :attr:`extra_text_inputs` names.
        """
        extra = tuple(extra)
        if len(extra) > len(self.extra_text_inputs):
            names = ", ".join(("input_ids", "attention_mask", *self.extra_text_inputs))
            raise ValueError(f"additional_forward_args: {type(self.model).__name__} takes ({names}), got "
                             f"{2 + len(extra)} tensors")
        found = {}
        for name, value in zip(self.extra_text_inputs, extra):
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.shape != input_ids.shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name}: expected a tensor shaped like input_ids {tuple(input_ids.shape)}, got {shape}")
            found[name] = value.to(input_ids.device)
        return found

    def unscored_positions(self, input_ids: torch.Tensor, extra: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
        """Positions ``[B, T]`` (bool) of a joint sequence whose token is no prediction of the
        model: the image placeholders (and a prefix-LM's prefix, where ``extra`` marks one)."""
        return self.image_token_positions(input_ids)

    @contextmanager
    def image_layout(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None
    ) -> Iterator[Callable[[], ImageTokenLayout]]:
        """Scope one forward and read where its image tokens sit.

        Yields a function that returns the :class:`ImageTokenLayout` of the forward run inside
        the block, over the sequence whose columns a method scores: the vision tokens (two
        towers, cross-attention) or the joint sequence (``input_ids`` with image tokens in it).
        Families whose layout the forward decides (ViLT shuffles its patches) override this.

        Example:
            >>> with adapter.image_layout(pixel_values, input_ids) as layout:    # doctest: +SKIP
            ...     model(pixel_values=pixel_values, input_ids=input_ids)
            >>> grids = layout().to_grid(scores)                                  # doctest: +SKIP
        """
        grid = self.patch_grid(pixel_values)
        batch = pixel_values.shape[0]
        if self.image_tokens == "queries":  # the columns only; methods bring the bridge
            if input_ids is None:
                raise ValueError("input_ids: needed to find the image tokens of this model")
            found = ImageTokenLayout.queries(self.image_token_positions(input_ids), grid,
                                             self.num_image_tokens(pixel_values), self.num_prefix_tokens)
            yield lambda: found  # checked before the forward: the model would fill too few silently
            return
        if self.image_tokens_in_input_ids:
            if input_ids is None:
                raise ValueError("input_ids: needed to find the image tokens of this model")
            positions = self.image_token_positions(input_ids)
            with_prefix = bool((positions.sum(1) == grid[0] * grid[1] + self.num_prefix_tokens).all())
            skip = self.num_prefix_tokens if with_prefix else 0  # the CLS feature, when kept
            yield lambda: ImageTokenLayout.at_positions(positions, grid, skip=skip)
            return
        prefix = self.num_prefix_tokens
        yield lambda: ImageTokenLayout.plain(batch, grid, start=prefix)

    @contextmanager
    def drop_image_tokens(self, keep: torch.Tensor) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """Inside the block the model runs without the patch tokens where ``keep`` ``[B, h, w]``
        is False (every row must drop equally many). Restored on exit, also on error.

        Yields:
            ``stays(input_ids, extra=()) -> [B, T]`` bool: which ``input_ids`` positions stay in
            the text (all of them, unless image placeholders must go with their dropped
            features); ``extra``: the :attr:`extra_text_inputs`.
        """
        keep_flat = keep.reshape(keep.shape[0], -1) > 0.5
        module, prefix = self._token_drop_site()
        handle = module.register_forward_hook(_token_dropper(keep_flat, prefix))
        with self._dropping_scope(handle, keep_flat) as stays:
            yield stays

    #: the image tokens that stay ``[B, N]`` while :meth:`drop_image_tokens` runs, else ``None``:
    #: :meth:`model_inputs` then skips its placeholder count check (the dropped tokens' are gone)
    _dropping: torch.Tensor | None = None

    @contextmanager
    def _dropping_scope(self, handle, token_keep: torch.Tensor) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """The body of every :meth:`drop_image_tokens`: :attr:`_dropping` set to ``token_keep``
        (the image tokens in the order their placeholders stand) and :meth:`_staying_positions`
        yielded; on exit, also on error, :attr:`_dropping` cleared and the drop's hook ``handle``
        removed."""
        self._dropping = token_keep
        try:
            yield self._staying_positions(token_keep)
        finally:
            self._dropping = None
            handle.remove()

    def _token_drop_site(self) -> tuple[nn.Module, int]:
        """The module whose output ``[B, prefix + cells, D]`` holds one row per grid cell after
        ``prefix`` rows, for :meth:`drop_image_tokens`: the vision embeddings by default."""
        return self.vision_model().embeddings, self.num_prefix_tokens

    def _staying_positions(self, keep_flat: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``stays(input_ids)`` for :meth:`drop_image_tokens`: with image placeholders in
        ``input_ids``, the placeholders of dropped patches go too (a prefix feature stays); query
        image tokens all stay (the queries attend to the patches that are left)."""

        def stays(input_ids: torch.Tensor, extra: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
            if not self.image_tokens_in_input_ids or self.image_tokens == "queries":
                return torch.ones_like(input_ids, dtype=torch.bool)
            image = self.image_token_positions(input_ids)
            n_patches = keep_flat.shape[1]
            offset = image.sum(1, keepdim=True) - n_patches  # a CLS feature, when the strategy keeps it
            patch = image.long().cumsum(1) - 1 - offset
            kept_patch = keep_flat.to(input_ids.device).gather(1, patch.clamp(0, n_patches - 1))
            return ~(image & (patch >= 0) & ~kept_patch)

        return stays

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__})"

    # ----- joint image-text embedding space (captum_vlm.lens) ------------------------------
    #: model classes of this family whose image and text embeddings share one space
    joint_embedding_classes: tuple[str, ...] = ()
    # (texts are tokenised with ``text_padding``; logits become probabilities by
    # ``similarity_probability``)

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

    # ----- inside the model (lens: logit lens, head statistics, head ablation) -----------------
    @property
    def has_decoder(self) -> bool:
        """Whether the model has a language decoder with an LM head (logit lens): its task
        scores tokens."""
        try:
            return self.scores_tokens
        except NotImplementedError:
            return False

    def decoder_blocks(self) -> list[nn.Module]:
        """The language decoder's blocks, first to last; their outputs feed :meth:`final_norm`."""
        raise NotImplementedError(f"{self.family}: {type(self.model).__name__} has no language decoder")

    def lens_sequence(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_ids: torch.Tensor,
        extra: Sequence[torch.Tensor] = (),
    ) -> tuple[tuple[torch.Tensor, ...], int]:
        """Teacher-forced inputs for ``TokenLogProbs(model).logits(pixel_values, *args)`` scoring
        ``answer_ids`` ``[1, n]`` (continuation tokens, no start token) after the prompt, and the
        index in the scored token sequence of the first answer token. ``extra``: the prompt's
        :attr:`extra_text_inputs` as the processor gave them (``[1, ...]``), for families whose
        forward needs them (others lay out their own)."""
        raise NotImplementedError(f"{self.family}: {type(self.model).__name__} has no language decoder")

    def greedy_answer(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        max_new_tokens: int, extra: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """The model's own greedy continuation ``[1, n]`` in :meth:`lens_sequence`'s convention
        (new tokens only, up to and including the end token); ``extra`` as there."""
        raise NotImplementedError(f"{self.family}: {type(self.model).__name__} has no language decoder")

    def stream_attentions(self, stream: str) -> list[nn.Module]:
        """Attention modules of ``stream``: ``"vision"``, ``"text"`` or ``"cross"``."""
        found = {"vision": self.vision_attentions, "text": self.text_attentions,
                 "cross": self.cross_attentions}[stream]()
        if not found:
            raise NotImplementedError(f"{self.family}: no {stream} attention")
        return found

    def head_projections(self, stream: str) -> list[nn.Module]:
        """Per layer of ``stream``, the linear module whose input is the heads' outputs
        concatenated ``[..., heads * head_dim]`` (head h at columns ``h*d:(h+1)*d``)."""
        if stream == "vision":
            return [block.self_attn.out_proj for block in self.vision_blocks()]
        if stream == "text":
            return [block.self_attn.out_proj for block in self.text_blocks()]
        raise NotImplementedError(f"{self.family}: no {stream} attention heads")

    def num_heads(self, stream: str) -> int:
        """Attention heads per layer in ``stream``."""
        config = self.model.config
        sub = config.vision_config if stream == "vision" else config.text_config
        return int(sub.num_attention_heads)


def classes_with_decoder() -> list[str]:
    """Names of the supported model classes that have a language decoder (logit lens)."""
    return classes_for_tasks(TOKEN_TASKS)


def register_adapter(cls: type[VLMAdapter] | None = None, *, overwrite: bool = False):
    """Class decorator: make ``cls`` the adapter of every class named in ``cls.model_classes``.

    Args:
        cls: the adapter class (when used as ``@register_adapter``).
        overwrite: replace an adapter already registered for one of the classes; without it a
            class served by another adapter is refused (ValueError).

    Example:
        >>> @register_adapter
        ... class MyAdapter(VLMAdapter):
        ...     family = "mine"
        ...     model_classes = ("MyVLModel",)
        >>> @register_adapter(overwrite=True)          # replace it
        ... class MyBetterAdapter(VLMAdapter):
        ...     family = "mine"
        ...     model_classes = ("MyVLModel",)
    """
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite: expected a bool, got {overwrite!r}")

    def wrap(adapter: type[VLMAdapter]) -> type[VLMAdapter]:
        if not (isinstance(adapter, type) and issubclass(adapter, VLMAdapter)):
            raise TypeError(f"register_adapter: expected a VLMAdapter subclass, got {adapter!r}")
        if not adapter.model_classes:
            raise ValueError(f"{adapter.__name__}.model_classes is empty: name the model classes it serves")
        taken = {n: _REGISTRY[n] for n in adapter.model_classes if _REGISTRY.get(n) not in (None, adapter)}
        if taken and not overwrite:
            held = ", ".join(f"{n} (by {c.__name__})" for n, c in taken.items())
            raise ValueError(
                f"register_adapter: {adapter.__name__} names model classes that already have an adapter: "
                f"{held}; pass overwrite=True to replace it"
            )
        for name in adapter.model_classes:
            _REGISTRY[name] = adapter
        return adapter

    return wrap if cls is None else wrap(cls)


def supported_model_classes(tasks: Sequence[str] | None = None) -> list[str]:
    """Names of the model classes that have a registered adapter, optionally only those whose
    :attr:`VLMAdapter.task` is one of ``tasks``."""
    if tasks is None:
        return sorted(_REGISTRY)
    return sorted(name for name, cls in _REGISTRY.items() if class_task(cls, name) in tasks)


def classes_for_tasks(tasks: Sequence[str]) -> list[str]:
    """Names of the supported model classes whose task is one of ``tasks`` (for error messages
    that say what a method takes)."""
    return supported_model_classes(tasks=tasks)


def class_task(adapter: type[VLMAdapter], class_name: str) -> str | None:
    """The task ``adapter`` declares for the model class ``class_name`` (``None`` if none)."""
    return adapter.tasks.get(class_name, "similarity" if adapter.two_tower else None)


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


def _token_dropper(keep: torch.Tensor, prefix: int):
    """Forward hook on ViT embeddings ``[B, prefix + N, D]``: keep the prefix and kept patches."""

    def hook(module, args, output):
        if output.shape[0] != keep.shape[0] or output.shape[1] != prefix + keep.shape[1]:
            raise RuntimeError(
                f"occlusion: vision embeddings {tuple(output.shape)} do not match {keep.shape[0]} images of "
                f"{prefix} prefix + {keep.shape[1]} patch tokens"
            )
        counts = keep.sum(1)
        if not bool((counts == counts[0]).all()):
            raise RuntimeError("occlusion: every example must lose the same number of patches")
        patches = output[:, prefix:][keep].view(output.shape[0], int(counts[0]), output.shape[2])
        return torch.cat([output[:, :prefix], patches], dim=1)

    return hook


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
