"""Word-level tokenizer and processors for the zoo models.

The tokenizer is a ``tokenizers`` WordLevel model over the fixed vocabulary of the scene grammar,
wrapped as a ``transformers.PreTrainedTokenizerFast`` so that ``save_pretrained`` and
``from_pretrained`` work. It goes inside the model family's own processor (``CLIPProcessor``,
``SiglipProcessor``), so ``processor(images=..., text=[...], return_tensors="pt", padding=True)``
followed by ``model(**inputs)`` behaves as for a hub checkpoint.

Special tokens are kept inside the small vocabulary: PAD 0, UNK 1, BOS 2, EOS 3 (an EOS id of
exactly 2 would make ``CLIPTextModel`` fall back to legacy pooling at the highest token id).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from .scenes import COLOURS, NUMBERS, SHAPES

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MAX_LENGTH = 32

# The scene grammar (captions and questions) plus a few common prompt words.
_WORDS = (
    list(COLOURS)
    + list(SHAPES)
    + [s + "s" for s in SHAPES]
    + list(NUMBERS)
    + "a an and the of with , . ? is are there what which how many color colour shape object "
    "objects yes no photo picture image in on".split()
)

# Pixel normalisation of the zoo models (images are scaled to [0, 1] first).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def vocabulary(extra: Sequence[str] = ()) -> dict[str, int]:
    """The token-to-id map: special tokens first (PAD 0, UNK 1, BOS 2, EOS 3), then the words,
    then ``extra`` words (so the ids of the shared vocabulary never move)."""
    vocab = {PAD: PAD_ID, UNK: UNK_ID, BOS: BOS_ID, EOS: EOS_ID}
    for word in [*_WORDS, *extra]:
        vocab.setdefault(word, len(vocab))
    return vocab


def build_tokenizer(
    max_length: int = MAX_LENGTH,
    extra_words: Sequence[str] = (),
    special_tokens: Sequence[str] = (),
    add_eos: bool = True,
    padding_side: str = "right",
) -> PreTrainedTokenizerFast:
    """Build the word-level tokenizer.

    Text is lower-cased and split on whitespace and punctuation; ``[BOS]`` and ``[EOS]`` are added
    around every sequence; unknown words map to ``[UNK]``.

    Args:
        max_length: ``model_max_length`` (the text model's position embeddings must cover it).
        extra_words: words added after the shared vocabulary (e.g. a chat template's).
        special_tokens: tokens matched verbatim before splitting (e.g. LLaVA's ``"<image>"``),
            added after ``extra_words``.
        add_eos: append ``[EOS]`` to every sequence (False for a decoder-only LM's prompts,
            which get ``[BOS]`` only, as Llama tokenizers do).
        padding_side: "right" or "left".

    Returns:
        A ``PreTrainedTokenizerFast``.
    """
    from tokenizers import AddedToken

    tok = Tokenizer(WordLevel(vocab=vocabulary([*extra_words, *special_tokens]), unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    end = f" {EOS}" if add_eos else ""
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A{end}",
        pair=f"{BOS} $A{end} $B{end}",
        special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if special_tokens:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side=padding_side,
    )


def _image_processor_class():
    """``CLIPImageProcessorPil`` when transformers has it (no torchvision needed), else the default."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def image_settings(image_size: int) -> dict:
    """The image-processor settings every zoo model shares: resize to ``image_size`` square
    (PIL bilinear), scale to [0, 1], normalise with :data:`IMAGE_MEAN`/:data:`IMAGE_STD`.

    Args:
        image_size: side of the model input in pixels.

    Returns:
        Keyword arguments for a transformers image processor.
    """
    return dict(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=2,  # PIL bilinear
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )


def build_clip_processor(image_size: int = 64, max_length: int = MAX_LENGTH):
    """A ``CLIPProcessor`` for a zoo CLIP: resize to ``image_size`` square, no centre crop.

    Args:
        image_size: side of the model input in pixels.
        max_length: tokenizer ``model_max_length``.

    Returns:
        A ``transformers.CLIPProcessor``.
    """
    from transformers import CLIPProcessor

    image_processor = _image_processor_class()(
        **image_settings(image_size),
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size},
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=build_tokenizer(max_length))


def build_siglip_processor(image_size: int = 64, max_length: int = 16):
    """A ``SiglipProcessor`` for a zoo SigLIP (text is meant to be padded to ``max_length``).

    Args:
        image_size: side of the model input in pixels.
        max_length: tokenizer ``model_max_length``; SigLIP pools the last position, so pass
            ``padding="max_length"`` as for hub SigLIP checkpoints.

    Returns:
        A ``transformers.SiglipProcessor``.
    """
    from transformers import SiglipProcessor

    try:
        from transformers import SiglipImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import SiglipImageProcessor as ImageProcessor
    image_processor = ImageProcessor(**image_settings(image_size))
    return SiglipProcessor(image_processor=image_processor, tokenizer=build_tokenizer(max_length))


def images_to_pixel_values(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """Fast path for uint8 ``(H, W, 3)`` images already at the model size (used in training).

    Gives the same ``pixel_values`` as the processor for such images (checked in the tests).

    Args:
        images: uint8 arrays of shape ``(H, W, 3)``, all the same size.

    Returns:
        Float tensor ``(N, 3, H, W)``.
    """
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std
