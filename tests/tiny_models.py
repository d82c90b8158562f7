"""Random-initialised small models of the real transformers classes, for tests.

The code path is the one a user with a hub checkpoint takes; only the size differs.
Special-token ids are kept inside the small vocabulary (PAD 0, UNK 1, BOS 2, EOS 3).
"""

from __future__ import annotations

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    CLIPConfig,
    CLIPModel,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipConfig,
    SiglipModel,
    ViltConfig,
    ViltForImageAndTextRetrieval,
    ViltForQuestionAnswering,
)

VOCAB = 64
PAD, UNK, BOS, EOS = 0, 1, 2, 3
IMAGE_SIZE = 32
PATCH = 8
HIDDEN = 32
HEADS = 4


def _vision(**extra) -> dict:
    cfg = dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        initializer_range=0.02,
    )
    cfg.update(extra)
    return cfg


def _text(**extra) -> dict:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        max_position_embeddings=24,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=0.02,
    )
    cfg.update(extra)
    return cfg


def _finish(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    return model.eval()


def clip(seed: int = 0, **kwargs) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=_text(), vision_config=_vision(), projection_dim=16)
    return _finish(CLIPModel(config, **kwargs), seed)


def siglip(seed: int = 0) -> SiglipModel:
    torch.manual_seed(seed)
    config = SiglipConfig(text_config=_text(projection_size=HIDDEN), vision_config=_vision())
    return _finish(SiglipModel(config), seed)


def _blip_config() -> BlipConfig:
    text = _text(sep_token_id=EOS, encoder_hidden_size=HIDDEN, max_position_embeddings=24)
    return BlipConfig(text_config=text, vision_config=_vision(), projection_dim=16, image_text_hidden_size=16)


def blip_itm(seed: int = 0) -> BlipForImageTextRetrieval:
    torch.manual_seed(seed)
    return _finish(BlipForImageTextRetrieval(_blip_config()), seed)


def blip_caption(seed: int = 0) -> BlipForConditionalGeneration:
    torch.manual_seed(seed)
    return _finish(BlipForConditionalGeneration(_blip_config()), seed)


def blip_vqa(seed: int = 0) -> BlipForQuestionAnswering:
    torch.manual_seed(seed)
    return _finish(BlipForQuestionAnswering(_blip_config()), seed)


def _vilt_config(**extra) -> ViltConfig:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=64,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        max_position_embeddings=24,
        pad_token_id=PAD,
        initializer_range=0.02,
        max_image_length=-1,
    )
    cfg.update(extra)
    return ViltConfig(**cfg)


def vilt_vqa(seed: int = 0, num_labels: int = 5) -> ViltForQuestionAnswering:
    torch.manual_seed(seed)
    config = _vilt_config(num_labels=num_labels, id2label={i: f"a{i}" for i in range(num_labels)},
                         label2id={f"a{i}": i for i in range(num_labels)})
    return _finish(ViltForQuestionAnswering(config), seed)


def vilt_itm(seed: int = 0) -> ViltForImageAndTextRetrieval:
    torch.manual_seed(seed)
    return _finish(ViltForImageAndTextRetrieval(_vilt_config()), seed)


LLAVA_IMAGE_TOKEN = 60


def llava(seed: int = 0, image_token_id: int = LLAVA_IMAGE_TOKEN) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    text = dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=0.02,
    )
    vision = dict(model_type="clip_vision_model", **_vision(projection_dim=16))
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return _finish(LlavaForConditionalGeneration(config), seed)


#: the Qwen placeholders, where the zoo tokenizer puts them once added (tests/test_qwen_vl.py)
QWEN_IMAGE_TOKEN, QWEN_VISION_START, QWEN_VISION_END, QWEN_VIDEO_TOKEN = 46, 47, 48, 49
QWEN_PATCH, QWEN_MERGE = PATCH // 2, 2  # one merged token covers PATCH x PATCH pixels, as the others' patch


def _qwen_config(config_class, seed: int, **vision_extra):
    torch.manual_seed(seed)
    text = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD,
                bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.02,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
    vision = dict(depth=2, num_heads=HEADS, patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE,
                  temporal_patch_size=2, in_channels=3, initializer_range=0.02, **vision_extra)
    return config_class(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE_TOKEN,
                        video_token_id=QWEN_VIDEO_TOKEN, vision_start_token_id=QWEN_VISION_START,
                        vision_end_token_id=QWEN_VISION_END)


def qwen2_5_vl(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL with window attention in block 0 (windows of 2x2 merged tokens) and full
    attention in block 1."""
    config = _qwen_config(Qwen2_5_VLConfig, seed, hidden_size=HIDDEN, intermediate_size=64, out_hidden_size=HIDDEN,
                          window_size=2 * PATCH, fullatt_block_indexes=[1])
    return _finish(Qwen2_5_VLForConditionalGeneration(config), seed)


def qwen2_vl(seed: int = 0) -> Qwen2VLForConditionalGeneration:
    config = _qwen_config(Qwen2VLConfig, seed, embed_dim=HIDDEN, hidden_size=HIDDEN, mlp_ratio=2)
    return _finish(Qwen2VLForConditionalGeneration(config), seed)
def _gemma_text(model_type: str = "gemma", **extra) -> dict:
    cfg = dict(
        model_type=model_type,
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=0.02,
    )
    cfg.update(extra)
    return cfg


def paligemma(seed: int = 0, image_token_id: int = LLAVA_IMAGE_TOKEN) -> PaliGemmaForConditionalGeneration:
    """SigLIP tower (no CLS: 16 image tokens at 32 px), Gemma language model, prefix-LM."""
    torch.manual_seed(seed)
    vision = dict(model_type="siglip_vision_model", **_vision(projection_dim=HIDDEN))
    config = PaliGemmaConfig(vision_config=vision, text_config=_gemma_text(), image_token_id=image_token_id,
                             projection_dim=HIDDEN)
    return _finish(PaliGemmaForConditionalGeneration(config), seed)


GEMMA3_BOI, GEMMA3_EOI = 61, 62
GEMMA3_TOKENS = 4  # 4x4 patches average-pooled 2x2 -> a 2x2 token grid


def gemma3(seed: int = 0, image_token_id: int = LLAVA_IMAGE_TOKEN, boi_token_id: int = GEMMA3_BOI,
           eoi_token_id: int = GEMMA3_EOI) -> Gemma3ForConditionalGeneration:
    """SigLIP tower (4x4 patches at 32 px), average-pooled 2x2 into 4 image tokens, Gemma 3 text."""
    torch.manual_seed(seed)
    vision = dict(model_type="siglip_vision_model", **_vision())
    text = _gemma_text("gemma3_text", query_pre_attn_scalar=HIDDEN // HEADS, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"])
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=GEMMA3_TOKENS,
                          image_token_index=image_token_id, boi_token_index=boi_token_id,
                          eoi_token_index=eoi_token_id)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # transformers leaves the projection at zero (no image signal at all)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    return _finish(model, seed)


#: one tiny model per supported class, by class name
FACTORIES = {
    "CLIPModel": clip,
    "SiglipModel": siglip,
    "BlipForImageTextRetrieval": blip_itm,
    "BlipForConditionalGeneration": blip_caption,
    "BlipForQuestionAnswering": blip_vqa,
    "ViltForQuestionAnswering": vilt_vqa,
    "ViltForImageAndTextRetrieval": vilt_itm,
    "LlavaForConditionalGeneration": llava,
    "Qwen2_5_VLForConditionalGeneration": qwen2_5_vl,
    "Qwen2VLForConditionalGeneration": qwen2_vl,
    "PaliGemmaForConditionalGeneration": paligemma,
    "Gemma3ForConditionalGeneration": gemma3,
}


def text_ids(batch: int, length: int, seed: int = 0, eos: int = EOS) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids ``[BOS, w..., EOS, PAD...]`` with varied lengths, and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), PAD, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        n = length - (b % 2)  # alternate full and one-shorter rows
        ids[b, 0] = BOS
        ids[b, 1 : n - 1] = torch.randint(4, 50, (n - 2,), generator=g)
        ids[b, n - 1] = eos
        mask[b, :n] = 1
    return ids, mask


def pixels(batch: int, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=g)


BLIP2_IMAGE_TOKEN = 60
BLIP2_QUERIES = 4


def _blip2_parts(seed: int, cross_attention_frequency: int = 1, language_model: str = "opt") -> dict:
    vision = _vision(qkv_bias=True)
    qformer = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
                   cross_attention_frequency=cross_attention_frequency, vocab_size=VOCAB, max_position_embeddings=24,
                   pad_token_id=PAD, initializer_range=0.02)
    text = dict(model_type="opt", vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=2,
                num_attention_heads=HEADS, max_position_embeddings=64, word_embed_proj_dim=HIDDEN,
                pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, init_std=0.02)
    if language_model == "llama":  # InstructBLIP's Vicuna checkpoints
        text = dict(model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                    max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    return dict(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=BLIP2_QUERIES,
                image_token_index=BLIP2_IMAGE_TOKEN)


def _distinct_queries(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """transformers starts the learned queries at zero (all alike); a trained model's differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape, generator=g))
    return model


def blip2(seed: int = 0, cross_attention_frequency: int = 1) -> Blip2ForConditionalGeneration:
    """BLIP-2 with a 2-layer OPT; ``cross_attention_frequency=2`` as in the hub checkpoints
    (only every other Q-Former layer cross-attends)."""
    torch.manual_seed(seed)
    config = Blip2Config(**_blip2_parts(seed, cross_attention_frequency))
    return _finish(_distinct_queries(Blip2ForConditionalGeneration(config), seed), seed)


def image_prompt(model: torch.nn.Module, words: list[int], batch: int = 1, pixel_values: torch.Tensor | None = None):
    """``input_ids`` and mask for a model whose ``input_ids`` hold image placeholders: LLaVA
    ``[BOS, w0, <image> x N, w1...]``, BLIP-2 ``[<image> x N, BOS, w...]`` as their processors
    write them."""
    from captum_vlm.adapters import get_adapter

    adapter = get_adapter(model)
    n = adapter.num_image_tokens(pixels(1) if pixel_values is None else pixel_values)
    image = [adapter.image_token_id] * n
    row = image + [BOS] + words if adapter.image_tokens == "queries" else [BOS, words[0]] + image + words[1:]
    return torch.tensor([row] * batch), torch.ones(batch, len(row), dtype=torch.long)


def instructblip(seed: int = 0, cross_attention_frequency: int = 1,
                 language_model: str = "opt") -> InstructBlipForConditionalGeneration:
    """InstructBLIP: BLIP-2 whose Q-Former also reads the instruction (``qformer_input_ids``);
    ``language_model="llama"`` as in the Vicuna checkpoints."""
    torch.manual_seed(seed)
    config = InstructBlipConfig(**_blip2_parts(seed, cross_attention_frequency, language_model))
    return _finish(_distinct_queries(InstructBlipForConditionalGeneration(config), seed), seed)


def extra_text_inputs(model: torch.nn.Module, batch: int, seed: int = 2) -> tuple:
    """What the forward takes after ``(input_ids, attention_mask)`` (InstructBLIP: the
    instruction as its Q-Former reads it), random tokens; LLaVA-NeXT's ``image_sizes``; ``()`` for the others (PaliGemma's
    optional ``token_type_ids`` are left to the test)."""
    from captum_vlm.adapters import get_adapter

    names = get_adapter(model).extra_text_inputs
    if "image_sizes" in names:  # LLaVA-NeXT / OneVision: an original that fills a 32 x 32 canvas
        return (torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * batch),)
    return text_ids(batch, 5, seed=seed) if "qformer_input_ids" in names else ()


FACTORIES["Blip2ForConditionalGeneration"] = blip2
FACTORIES["InstructBlipForConditionalGeneration"] = instructblip


# ----- SigLIP 2 (NaFlex) ---------------------------------------------------------------------------
def siglip2(seed: int = 0) -> torch.nn.Module:
    """SigLIP 2 whose learned position embeddings form a 4x4 grid (``num_patches=16``), resized to
    every image's own patch grid."""
    from transformers import Siglip2Config, Siglip2Model

    torch.manual_seed(seed)
    vision = {k: v for k, v in _vision(num_patches=16).items() if k != "image_size"}
    config = Siglip2Config(text_config=_text(projection_size=HIDDEN), vision_config=vision)
    return _finish(Siglip2Model(config), seed)


FACTORIES["Siglip2Model"] = siglip2


# ----- Idefics3 / SmolVLM (tiles, global view, pixel shuffle) -------------------------------------
#: the Idefics3 text tokens, where the zoo tokenizer puts them once added (tests/test_family_idefics3.py)
IDEFICS_FAKE, IDEFICS_IMAGE_TOKEN, IDEFICS_END, IDEFICS_GLOBAL = 46, 47, 48, 49
IDEFICS_PATCH, IDEFICS_SCALE = PATCH // 2, 2  # one image token covers PATCH x PATCH pixels, as the others' patch


def _idefics3_config(config_class, seed: int):
    torch.manual_seed(seed)
    text = dict(model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=256, pad_token_id=PAD,
                bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.02)
    vision = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
                  image_size=IMAGE_SIZE, patch_size=IDEFICS_PATCH, initializer_range=0.02)
    return config_class(text_config=text, vision_config=vision, scale_factor=IDEFICS_SCALE,
                        image_token_id=IDEFICS_IMAGE_TOKEN)


def idefics3(seed: int = 0) -> torch.nn.Module:
    """Idefics3 with 32-px tiles of 4-px patches, pixel shuffle 2: 4 x 4 image tokens per tile."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    return _finish(Idefics3ForConditionalGeneration(_idefics3_config(Idefics3Config, seed)), seed)


def smolvlm(seed: int = 0) -> torch.nn.Module:
    """SmolVLM, the same sizes as :func:`idefics3`."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    return _finish(SmolVLMForConditionalGeneration(_idefics3_config(SmolVLMConfig, seed)), seed)


FACTORIES["Idefics3ForConditionalGeneration"] = idefics3
FACTORIES["SmolVLMForConditionalGeneration"] = smolvlm


#: LLaVA-NeXT / OneVision: 16 px tiles (2x2 patches of 8 px) on canvases of up to 3x3 tiles
ANYRES_TILE = 16
ANYRES_PINPOINTS = [[16, 32], [32, 16], [32, 32], [32, 48], [48, 32], [48, 48], [16, 48], [48, 16]]
ANYRES_IMAGE_TOKEN = 46  # where the zoo tokenizer puts "<image>" once added (tests/test_family_anyres.py)


def _anyres_text(**extra) -> dict:
    return dict(model_type="qwen2" if extra.pop("qwen", False) else "llama", vocab_size=VOCAB, hidden_size=HIDDEN,
                intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                initializer_range=0.02, **extra)


def llava_next(seed: int = 0, image_token_id: int = ANYRES_IMAGE_TOKEN):
    """LLaVA-NeXT: CLIP tower on 16 px tiles (CLS dropped), any-resolution canvases of
    :data:`ANYRES_PINPOINTS`, a Llama language model."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(model_type="clip_vision_model", **_vision(image_size=ANYRES_TILE, projection_dim=16))
    config = LlavaNextConfig(vision_config=vision, text_config=_anyres_text(), image_token_id=image_token_id,
                             image_grid_pinpoints=ANYRES_PINPOINTS, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return _finish(LlavaNextForConditionalGeneration(config), seed)


def llava_onevision(seed: int = 0, image_token_id: int = ANYRES_IMAGE_TOKEN, max_tiles: int = 4):
    """LLaVA-OneVision: SigLIP tower on 16 px tiles (every patch kept), a Qwen2 language model;
    a canvas of more than ``max_tiles`` tiles' worth of tokens after unpadding is bilinearly
    pooled (``vision_aspect_ratio="anyres_max_{max_tiles}"``)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(model_type="siglip_vision_model", **_vision(image_size=ANYRES_TILE))
    config = LlavaOnevisionConfig(vision_config=vision, text_config=_anyres_text(qwen=True),
                                  image_token_id=image_token_id, image_grid_pinpoints=ANYRES_PINPOINTS,
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  vision_aspect_ratio=f"anyres_max_{max_tiles}", projector_hidden_act="gelu")
    return _finish(LlavaOnevisionForConditionalGeneration(config), seed)


FACTORIES["LlavaNextForConditionalGeneration"] = llava_next
FACTORIES["LlavaOnevisionForConditionalGeneration"] = llava_onevision


def image_only(processor_class: type) -> type:
    """``processor_class`` (a processor with a video processor, which needs torchvision) built
    from an image processor and a tokenizer alone, as the tests use it.

    Example:
        >>> processor = image_only(Qwen2_5_VLProcessor)(image_processor=..., tokenizer=...)  # doctest: +SKIP
    """

    class ImageOnly(processor_class):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, **kwargs):
            super().__init__(image_processor, tokenizer, video_processor=None, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{processor_class.__name__}"
    return ImageOnly
