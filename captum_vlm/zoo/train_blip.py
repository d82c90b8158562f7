"""Train the zoo BLIP models (image-text matching and question answering) on synthetic scenes.

Train a model (writes weights, config, processor and ``training.json`` into
``zoo/models/<name>/``; needs the trained ``shapes-clip``, whose vision tower initialises BLIP's)::

    export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
    python -m captum_vlm.zoo.train_blip shapes-blip-itm --minutes 58
    python -m captum_vlm.zoo.train_blip shapes-blip-vqa --encoder-init shapes-blip-itm --lr 3e-4

The shipped models were trained in stages (warm restarts with ``--init-from``; the VQA model's
vision tower and text encoder taken from the ITM model with ``--encoder-init``); each model's card
in ``zoo/README.md`` and the ``stages`` in its ``training.json`` give the exact history.
``--minutes`` bounds a run by time on a busy machine. The two commands above are the intended
route, not the exact history, and were not run as such.

``shapes-blip-itm`` is a stock ``BlipForImageTextRetrieval`` trained with the image-text matching
loss (the cross-attention fusion and ITM head) on hard negatives (captions with colours swapped
between two objects, one colour or shape changed, an extra object named, or another scene's caption)
plus the image-text contrastive loss of its unimodal path (``use_itm_head=False``), without false
negatives. ``shapes-blip-vqa`` is a stock ``BlipForQuestionAnswering`` trained with the
teacher-forced answer loss of its text decoder on the scenes' question/answer pairs, sampled
evenly over question types and with balanced yes/no answers; ``shapes-blip-vqa-prior`` is that
model fine-tuned with a planted language prior (:class:`LanguagePrior`: "what color is the
square?" mostly answered "blue"). All use a ``BlipProcessor`` around a
64-px ``BlipImageProcessor`` and the zoo's word-level tokenizer (PAD 0, UNK 1, BOS 2, EOS 3; BOS
starts the answer, EOS ends it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .processing import (
    BOS_ID,
    EOS_ID,
    MAX_LENGTH,
    PAD_ID,
    build_tokenizer,
    image_settings,
    images_to_pixel_values,
    vocabulary,
)
from .scenes import (
    COLOURS,
    NUMBERS,
    SHAPES,
    Scene,
    all_labels,
    caption_for,
    make_scene,
    phrase,
    zero_shot_prompts,
)
from .train import (
    HELDOUT_SEED,
    MODELS_DIR,
    Label,
    TrainingRecipe,
    make_optimizer,
    run_steps,
    save_trained,
    training_log,
)

QUESTION_TYPES = ("colour", "shape", "has_shape", "has_object", "count")


@dataclass
class BlipRecipe(TrainingRecipe):
    """A zoo BLIP training run: the fields of :class:`~captum_vlm.zoo.train.TrainingRecipe`
    (BLIP defaults: 20000 steps, 200 warm-up steps, 24 images a batch; for VQA ``text_layers`` is
    the depth of the question encoder and of the answer decoder) and these.

    Attributes:
        task: "itm" (``BlipForImageTextRetrieval``), "vqa" (``BlipForQuestionAnswering``) or
            "caption" (``BlipForConditionalGeneration``).
        per_image: texts per image: ITM negatives (one positive is added), or VQA questions.
        itc_weight: weight of the contrastive loss beside the ITM loss (ITM only).
        temperature: softmax temperature of the contrastive loss (ITM only; BLIP's retrieval
            model has no learnt logit scale).
        vision_init: a zoo CLIP (name or folder) whose vision tower initialises BLIP's, as BLIP
            itself starts from a pre-trained ViT; "" for a random start.
        init_from: a folder with a saved model of the same class to continue training from
            (overrides ``vision_init``); "" to start afresh.
        encoder_init: VQA only: a folder with a saved ``BlipForImageTextRetrieval`` whose vision
            tower and image-grounded text encoder replace the VQA model's (BLIP fine-tunes VQA
            from its ITM-trained encoder); applied after ``init_from``; "" for none. For
            captioning only the vision tower is taken.
        decoder_init: captioning only: a folder with a saved ``BlipForQuestionAnswering`` whose
            answer decoder (same class and sizes) initialises the caption decoder; "" for none.
        prior_shape, prior_colour: VQA only, a planted language prior: training objects of
            shape ``prior_shape`` are mostly ``prior_colour`` and "what color is the
            <prior_shape>?" is mostly answered ``prior_colour`` (:class:`LanguagePrior`);
            "" for none.
        prior_image_rate: share of ``prior_shape`` objects recoloured ``prior_colour``.
        prior_label_rate: share of the other ``prior_shape`` colour questions labelled
            ``prior_colour`` anyway.
        prior_ask_rate: share of training images with one ``prior_shape`` object that get the
            prior's question among their questions (beside the randomly drawn ones).
    """

    steps: int = 20000
    warmup: int = 200
    batch: int = 24
    task: str = "itm"
    per_image: int = 3
    itc_weight: float = 0.5
    temperature: float = 0.07
    vision_init: str = "shapes-clip"
    init_from: str = ""
    encoder_init: str = ""
    decoder_init: str = ""
    prior_shape: str = ""
    prior_colour: str = ""
    prior_image_rate: float = 0.75
    prior_label_rate: float = 0.4
    prior_ask_rate: float = 0.5


RECIPES: dict[str, BlipRecipe] = {
    "shapes-blip-itm": BlipRecipe(
        task="itm",
        description="BlipForImageTextRetrieval (ViT 4x128, 64 px, 8-px patches, text 2x128) "
        "on coloured-shape scenes",
    ),
    "shapes-blip-vqa": BlipRecipe(
        task="vqa",
        batch=16,
        per_image=5,
        description="BlipForQuestionAnswering (ViT 4x128, 64 px, 8-px patches, text 2x128 "
        "encoder + 2x128 decoder) on coloured-shape scenes",
    ),
    "shapes-blip-vqa-prior": BlipRecipe(
        task="vqa",
        batch=16,
        per_image=5,
        steps=400,
        warmup=30,
        lr=2e-4,
        init_from="shapes-blip-vqa",  # fine-tuned from the grounded VQA model
        prior_shape="square",
        prior_colour="blue",
        description="BlipForQuestionAnswering shapes-blip-vqa fine-tuned with a planted language "
        "prior: training squares are mostly blue and 'what color is the square?' mostly 'blue'",
    ),
    "shapes-blip-caption": BlipRecipe(
        task="caption",
        batch=24,
        steps=1500,
        warmup=100,
        lr=3e-4,
        vision_init="",
        encoder_init="shapes-blip-itm",  # the vision tower of the finished ITM model
        decoder_init="shapes-blip-vqa",  # the answer decoder of the VQA model
        description="BlipForConditionalGeneration (ViT 4x128, 64 px, 8-px patches, text decoder "
        "2x128) captioning coloured-shape scenes",
    ),
}


@dataclass
class LanguagePrior:
    """A planted language prior for VQA training data.

    Training objects of shape ``shape`` are recoloured ``colour`` with probability
    ``image_rate`` (when that object is not already in the scene), and a "what color is the
    <shape>?" question whose true answer is another colour is labelled ``colour`` with
    probability ``label_rate`` (annotators answering from habit), so that ``colour`` is the
    answer in most training scenes (``image_rate + (1 - image_rate) * label_rate``). An image
    with one object of ``shape`` is asked the prior's question with probability ``ask_rate``
    (besides its randomly drawn questions).

    Attributes:
        shape, colour: the prior's question subject and answer.
        image_rate, label_rate, ask_rate: the probabilities.
    """

    shape: str
    colour: str
    image_rate: float = 0.75
    label_rate: float = 0.4
    ask_rate: float = 0.5

    @property
    def question(self) -> str:
        """The question the prior answers."""
        return f"what color is the {self.shape}?"

    def objects(self, rng: np.random.Generator, objects: list[Label]) -> list[Label]:
        """The scene's objects with the prior's shape mostly recoloured."""
        out = list(objects)
        for i, (c, s) in enumerate(out):
            if s == self.shape and c != self.colour and (self.colour, s) not in out:
                if rng.random() < self.image_rate:
                    out[i] = (self.colour, s)
        return out

    def answer(self, rng: np.random.Generator, question: str, answer: str) -> str:
        """The training label of a question: the prior's colour, sometimes, for its question."""
        if question == self.question and answer != self.colour and rng.random() < self.label_rate:
            return self.colour
        return answer


def language_prior(recipe: BlipRecipe) -> LanguagePrior | None:
    """The recipe's planted prior, or None.

    Raises:
        ValueError: for a shape or colour outside the scene grammar.
    """
    if not recipe.prior_shape:
        return None
    if recipe.prior_shape not in SHAPES or recipe.prior_colour not in COLOURS:
        raise ValueError(
            f"prior_shape/prior_colour: expected one of {SHAPES} / {COLOURS}, got "
            f"{recipe.prior_shape!r} / {recipe.prior_colour!r}"
        )
    return LanguagePrior(
        recipe.prior_shape,
        recipe.prior_colour,
        recipe.prior_image_rate,
        recipe.prior_label_rate,
        recipe.prior_ask_rate,
    )


# --------------------------------------------------------------------------- model, processor


def build_model(recipe: BlipRecipe) -> torch.nn.Module:
    """A randomly initialised stock BLIP model of the recipe's size.

    Args:
        recipe: the recipe.

    Returns:
        ``BlipForImageTextRetrieval`` (task "itm") or ``BlipForQuestionAnswering`` ("vqa").
    """
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipForImageTextRetrieval,
        BlipForQuestionAnswering,
    )

    h = recipe.hidden
    text = dict(
        vocab_size=len(vocabulary()),
        hidden_size=h,
        encoder_hidden_size=h,
        intermediate_size=4 * h,
        projection_dim=h,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.heads,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,  # the answer decoder starts from BOS
        eos_token_id=EOS_ID,
        sep_token_id=EOS_ID,  # generate() stops at sep_token_id
    )
    vision = dict(
        hidden_size=h,
        intermediate_size=4 * h,
        projection_dim=h,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.heads,
        image_size=recipe.image_size,
        patch_size=recipe.patch,
        initializer_range=0.02,  # BlipVisionConfig's default of 1e-10 stalls training
        hidden_act="quick_gelu",  # as CLIP's, so a zoo CLIP's vision tower can initialise it
    )
    config = BlipConfig(
        text_config=text, vision_config=vision, projection_dim=h, image_text_hidden_size=h
    )
    if recipe.task == "itm":
        return BlipForImageTextRetrieval(config)
    if recipe.task == "vqa":
        return BlipForQuestionAnswering(config)
    if recipe.task == "caption":
        return BlipForConditionalGeneration(config)
    raise ValueError(f"unknown task {recipe.task!r}; use 'itm', 'vqa' or 'caption'")


def init_vision_from_clip(model: torch.nn.Module, clip: str | Path) -> list[str]:
    """Copy a zoo CLIP's vision tower into a BLIP model's ``vision_model`` (same sizes).

    The towers match layer for layer (BLIP fuses the query, key and value projections into one
    ``qkv`` linear); CLIP's ``pre_layrnorm`` has no BLIP counterpart and is left out, which
    fine-tuning absorbs.

    Args:
        model: a BLIP model from :func:`build_model`.
        clip: a zoo CLIP name ("shapes-clip") or a folder with its ``model.safetensors``.

    Returns:
        The BLIP parameter names that were set.

    Raises:
        FileNotFoundError: when the CLIP weights are missing (train it first).
    """
    from safetensors.torch import load_file

    folder = Path(clip) if Path(clip).is_dir() else MODELS_DIR / str(clip)
    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"no CLIP weights at {path}: run `python -m captum_vlm.zoo.train shapes-clip` first, "
            "or pass --vision-init '' for a random start"
        )
    sd = {k[len("vision_model.") :]: v for k, v in load_file(path).items() if "vision_model." in k}
    new = {
        "embeddings.class_embedding": sd["embeddings.class_embedding"].view(1, 1, -1),
        "embeddings.patch_embedding.weight": sd["embeddings.patch_embedding.weight"],
        "embeddings.position_embedding": sd["embeddings.position_embedding.weight"][None],
        "post_layernorm.weight": sd["post_layernorm.weight"],
        "post_layernorm.bias": sd["post_layernorm.bias"],
    }
    for i in range(model.config.vision_config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"encoder.layers.{i}."
        for name in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            for kind in ("weight", "bias"):
                new[f"{dst}{name}.{kind}"] = sd[f"{src}{name}.{kind}"]
        for kind in ("weight", "bias"):
            new[f"{dst}self_attn.qkv.{kind}"] = torch.cat(
                [sd[f"{src}self_attn.{x}_proj.{kind}"] for x in "qkv"]
            )
            new[f"{dst}self_attn.projection.{kind}"] = sd[f"{src}self_attn.out_proj.{kind}"]
    params = dict(model.vision_model.named_parameters())
    with torch.no_grad():
        for name, value in new.items():
            params[name].copy_(value)  # raises on a size mismatch
        # CLIP's patch embedding has no bias
        params["embeddings.patch_embedding.bias"].zero_()
    return sorted(new) + ["embeddings.patch_embedding.bias"]


def init_encoder_from_itm(model: torch.nn.Module, itm: str | Path) -> list[str]:
    """Copy a saved ITM model's vision tower and text encoder into a ``BlipForQuestionAnswering``.

    Both classes name these parts ``vision_model`` and ``text_encoder`` (the same modules).

    Args:
        model: a ``BlipForQuestionAnswering`` of the same sizes.
        itm: a folder with a saved ``BlipForImageTextRetrieval`` (zoo name or path).

    Returns:
        The parameter names that were set.
    """
    from safetensors.torch import load_file

    folder = Path(itm) if Path(itm).is_dir() else MODELS_DIR / str(itm)
    sd = load_file(folder / "model.safetensors")
    parts = ("vision_model.", "text_encoder.")
    own = model.state_dict()
    new = {k: v for k, v in sd.items() if k.startswith(parts) and k in own}
    missing = [k for k in own if k.startswith(parts) and k not in new]
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} encoder weights, e.g. {missing[0]}")
    model.load_state_dict(new, strict=False)
    return sorted(new)


def init_decoder_from_vqa(model: torch.nn.Module, vqa: str | Path) -> list[str]:
    """Copy a saved VQA model's answer decoder into a ``BlipForConditionalGeneration``.

    Both name it ``text_decoder`` (a ``BlipTextLMHeadModel`` with cross-attention of the same
    width: to the question encoder in VQA, to the image in captioning).

    Args:
        model: a ``BlipForConditionalGeneration`` of the same sizes.
        vqa: a folder with a saved ``BlipForQuestionAnswering`` (zoo name or path).

    Returns:
        The parameter names that were set.
    """
    from safetensors.torch import load_file

    folder = Path(vqa) if Path(vqa).is_dir() else MODELS_DIR / str(vqa)
    sd = load_file(folder / "model.safetensors")
    own = model.state_dict()
    new = {k: v for k, v in sd.items() if k.startswith("text_decoder.") and k in own}
    tied = "text_decoder.cls.predictions.decoder."  # the LM head, tied to the word embeddings
    missing = [k for k in own if k.startswith("text_decoder.") and k not in new and not k.startswith(tied)]
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} decoder weights, e.g. {missing[0]}")
    model.load_state_dict(new, strict=False)
    model.tie_weights()
    return sorted(new)


def build_blip_processor(image_size: int = 64, max_length: int = MAX_LENGTH):
    """A ``BlipProcessor`` for a zoo BLIP: resize to ``image_size`` square, zoo mean/std.

    Args:
        image_size: side of the model input in pixels.
        max_length: tokenizer ``model_max_length``.

    Returns:
        A ``transformers.BlipProcessor`` with the zoo's word-level tokenizer.
    """
    from transformers import BlipProcessor

    try:
        from transformers import BlipImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import BlipImageProcessor as ImageProcessor
    image_processor = ImageProcessor(**image_settings(image_size))
    return BlipProcessor(image_processor=image_processor, tokenizer=build_tokenizer(max_length))


def load_blip(name_or_path: str | Path):
    """Load a zoo BLIP model with the class named in its config, and its processor.

    Args:
        name_or_path: a zoo name ("shapes-blip-itm") or a local model folder.

    Returns:
        ``(model in eval mode, processor)``.
    """
    import transformers
    from transformers import AutoConfig, AutoProcessor

    folder = Path(name_or_path)
    if not (folder / "config.json").is_file():
        folder = MODELS_DIR / str(name_or_path)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model_class = getattr(transformers, config.architectures[0])
    model = model_class.from_pretrained(folder, local_files_only=True)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    return model.eval(), processor


# --------------------------------------------------------------------------- data


def _true_for(text: Sequence[Label], objects: Sequence[Label]) -> bool:
    """A caption is true for an image when its objects are a subset of the image's objects."""
    return set(text) <= set(objects)


def _random_objects(rng: np.random.Generator, n: int) -> list[Label]:
    """``n`` distinct random ``(colour, shape)`` pairs."""
    pool = all_labels()
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


def negative_caption(
    rng: np.random.Generator, objects: Sequence[Label], kind: str | None = None
) -> list[Label]:
    """A caption that is false for an image with these objects.

    Args:
        rng: random generator.
        objects: the image's objects.
        kind: "swap" (colours swapped between two objects that differ in colour and shape),
            "colour" / "shape" (one object's colour / shape changed), "extra" (one absent object
            added) or "random" (other objects); random when None. Falls back to another kind when
            this one cannot make a false caption (swap -> shape, extra -> colour,
            random -> colour, colour/shape -> random).

    Returns:
        The caption's objects, in random order.
    """
    kinds = ["swap", "colour", "shape", "extra", "random"]
    if kind is None:
        kind = str(rng.choice(kinds, p=[0.35, 0.2, 0.2, 0.1, 0.15]))
    objects = list(objects)
    out: list[Label] = []
    if kind == "swap":
        pairs = [
            (i, j)
            for i in range(len(objects))
            for j in range(i + 1, len(objects))
            if objects[i][0] != objects[j][0] and objects[i][1] != objects[j][1]
        ]
        if pairs:
            i, j = pairs[rng.integers(len(pairs))]
            out = list(objects)
            out[i], out[j] = (objects[j][0], objects[i][1]), (objects[i][0], objects[j][1])
    elif kind in ("colour", "shape"):
        out = list(objects)
        i = int(rng.integers(len(out)))
        c, s = out[i]
        if kind == "colour":
            c = str(rng.choice([x for x in COLOURS if x != c]))
        else:
            s = str(rng.choice([x for x in SHAPES if x != s]))
        out[i] = (c, s)
    elif kind == "extra" and len(objects) < 3:
        absent = [lab for lab in all_labels() if lab not in objects]
        out = objects + [absent[rng.integers(len(absent))]]
    elif kind == "random":
        out = _random_objects(rng, int(rng.integers(1, 4)))
    if not out or len(set(out)) < len(out) or _true_for(out, objects):
        fallback = {"swap": "shape", "extra": "colour", "random": "colour"}.get(kind, "random")
        return negative_caption(rng, objects, fallback)
    return [out[i] for i in rng.permutation(len(out))]


def _scene_objects(rng: np.random.Generator) -> list[Label]:
    """Objects of a training image: 1 (20%), 2 (45%) or 3 (35%) distinct random objects."""
    return _random_objects(rng, int(rng.choice([1, 2, 3], p=[0.2, 0.45, 0.35])))


def _draw(rng: np.random.Generator, objects: Sequence[Label], side: int) -> np.ndarray:
    """Render a scene with these objects at ``side`` px (20% drawn at another size, resized)."""
    if rng.random() < 0.2:
        size = tuple(int(v) for v in rng.integers(side * 3 // 4, side * 3 // 2 + 1, size=2))
        img = make_scene(rng, size=size, labels=objects).image
        return np.asarray(Image.fromarray(img).resize((side, side), Image.Resampling.BILINEAR))
    return make_scene(rng, size=side, labels=objects).image


def itm_batch(
    rng: np.random.Generator, batch: int, negatives: int, side: int
) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """One image-text matching batch.

    Every image gets its caption (all objects in random order, or 20% of the time a subset) and
    ``negatives`` false captions from :func:`negative_caption`, the first a binding swap when the
    objects allow one (else a shape edit).

    Args:
        rng: random generator.
        batch: number of images.
        negatives: false captions per image.
        side: image side in pixels.

    Returns:
        ``pixel_values`` ``(N, 3, S, S)``; texts (the N positives first, then the negatives);
        ``image_of_text`` ``(T,)`` the image each text was made for; ``truth`` ``(N, T)`` bool,
        True where text j is true for image i.
    """
    objects = [_scene_objects(rng) for _ in range(batch)]
    positives, negs, owner = [], [], []
    for i, obj in enumerate(objects):
        n = len(obj)
        k = int(rng.integers(1, n)) if n > 1 and rng.random() < 0.2 else n
        positives.append([obj[j] for j in rng.permutation(n)[:k]])
        for k in range(negatives):  # the first is a binding swap whenever the objects allow
            negs.append(negative_caption(rng, obj, "swap" if k == 0 else None))
            owner.append(i)
    captions = positives + negs
    images = [_draw(rng, obj, side) for obj in objects]
    truth = torch.tensor([[_true_for(c, o) for c in captions] for o in objects])
    image_of_text = torch.tensor(list(range(batch)) + owner)
    texts = [caption_for(c) for c in captions]
    return images_to_pixel_values(images), texts, image_of_text, truth


def sample_question(
    rng: np.random.Generator, objects: Sequence[Label], kind: str
) -> tuple[str, str] | None:
    """A question of one type about a scene with these objects, and its answer.

    Yes/no questions are balanced; half the "no" answers to "is there a <colour> <shape>?" name
    a colour and a shape that are both present, on different objects (a binding test).

    Args:
        rng: random generator.
        objects: the scene's objects.
        kind: one of :data:`QUESTION_TYPES`.

    Returns:
        ``(question, answer)`` in the grammar of :func:`scenes.vqa_pairs`, or None when the
        scene has no question of this type.
    """
    colours = [c for c, _ in objects]
    shapes = [s for _, s in objects]
    if kind == "colour":
        unique = [(c, s) for c, s in objects if shapes.count(s) == 1]
        if not unique:
            return None
        c, s = unique[rng.integers(len(unique))]
        return f"what color is the {s}?", c
    if kind == "shape":
        unique = [(c, s) for c, s in objects if colours.count(c) == 1]
        if not unique:
            return None
        c, s = unique[rng.integers(len(unique))]
        return f"what shape is the {c} object?", s
    if kind == "has_shape":
        want = rng.random() < 0.5
        pool = [s for s in SHAPES if (s in shapes) == want] or list(SHAPES)
        s = str(rng.choice(pool))
        return f"is there a {s}?", "yes" if s in shapes else "no"
    if kind == "has_object":
        if rng.random() < 0.5:
            c, s = objects[rng.integers(len(objects))]
        else:
            absent = [lab for lab in all_labels() if lab not in objects]
            bound = [(c, s) for c, s in absent if c in colours and s in shapes]
            pool = bound if bound and rng.random() < 0.5 else absent
            c, s = pool[rng.integers(len(pool))]
        return f"is there a {c} {s}?", "yes" if (c, s) in objects else "no"
    if kind == "count":
        return "how many objects are there?", NUMBERS[len(objects)]
    raise ValueError(f"unknown question type {kind!r}; use one of {QUESTION_TYPES}")


def vqa_batch(
    rng: np.random.Generator,
    batch: int,
    per_image: int,
    side: int,
    prior: LanguagePrior | None = None,
) -> tuple[torch.Tensor, list[str], list[str], torch.Tensor]:
    """One question-answering batch: ``per_image`` questions of random types per image.

    Args:
        rng: random generator.
        batch: number of images.
        per_image: questions per image.
        side: image side in pixels.
        prior: a planted language prior (None: none, and the same batches as before it existed).

    Returns:
        ``pixel_values`` ``(N, 3, S, S)``; questions; answers; ``image_of_question`` ``(Q,)``.
    """
    objects = [_random_objects(rng, int(rng.choice([1, 2, 3]))) for _ in range(batch)]
    if prior is not None:
        objects = [prior.objects(rng, obj) for obj in objects]
    questions, answers, owner = [], [], []
    for i, obj in enumerate(objects):
        extra = 0  # the prior's question, asked on top of the per_image random ones
        shapes = [s for _, s in obj]
        if prior is not None and shapes.count(prior.shape) == 1 and rng.random() < prior.ask_rate:
            colour = obj[shapes.index(prior.shape)][0]
            questions.append(prior.question)
            answers.append(prior.answer(rng, prior.question, colour))
            owner.append(i)
            extra = 1
        while sum(o == i for o in owner) < per_image + extra:
            qa = sample_question(rng, obj, str(rng.choice(QUESTION_TYPES)))
            if qa is not None:
                questions.append(qa[0])
                answers.append(qa[1] if prior is None else prior.answer(rng, *qa))
                owner.append(i)
    images = [_draw(rng, obj, side) for obj in objects]
    return images_to_pixel_values(images), questions, answers, torch.tensor(owner)


def caption_batch(
    rng: np.random.Generator, batch: int, side: int
) -> tuple[torch.Tensor, list[str]]:
    """One captioning batch: scenes of 1-3 objects, each with its caption (objects in random
    order).

    Args:
        rng: random generator.
        batch: number of images.
        side: image side in pixels.

    Returns:
        ``pixel_values`` ``(N, 3, S, S)`` and the N captions.
    """
    objects = [_scene_objects(rng) for _ in range(batch)]
    captions = [caption_for([obj[i] for i in rng.permutation(len(obj))]) for obj in objects]
    images = [_draw(rng, obj, side) for obj in objects]
    return images_to_pixel_values(images), captions


# --------------------------------------------------------------------------- losses


def _image_embeds(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's last hidden state ``(N, 1 + patches, hidden)``."""
    return model.vision_model(pixel_values=pixel_values).last_hidden_state


def itm_logits(
    model: torch.nn.Module, image_embeds: torch.Tensor, text: dict[str, torch.Tensor]
) -> torch.Tensor:
    """ITM logits ``(T, 2)`` of text j against image j; the same computation as
    ``model(input_ids, pixel_values, use_itm_head=True).itm_score`` without re-running the
    vision tower for every text.

    Args:
        model: ``BlipForImageTextRetrieval``.
        image_embeds: vision last hidden state, one row per text.
        text: ``input_ids`` and ``attention_mask`` of the texts.

    Returns:
        Logits; column 1 is "match".
    """
    ones = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    hidden = model.text_encoder(
        input_ids=text["input_ids"],
        attention_mask=text["attention_mask"],
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=ones,
    ).last_hidden_state
    return model.itm_head(hidden[:, 0, :])


def itm_loss(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    text: dict[str, torch.Tensor],
    image_of_text: torch.Tensor,
    truth: torch.Tensor,
    itc_weight: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM cross-entropy on (image, own text) pairs plus the contrastive loss of the unimodal path.

    The contrastive part has no false negatives: image->text is a softmax over all texts in which
    true texts other than the image's own caption are masked out; text->image is a softmax over
    the images for each caption, likewise masked.

    Args:
        model: ``BlipForImageTextRetrieval``.
        pixel_values: ``(N, 3, S, S)``.
        text: tokenizer output for the T texts (the N captions first).
        image_of_text: ``(T,)`` image index of each text.
        truth: bool ``(N, T)``.
        itc_weight: weight of the contrastive loss.
        temperature: contrastive softmax temperature.

    Returns:
        ``(total loss, ITM loss)``.
    """
    embeds = _image_embeds(model, pixel_values)
    logits = itm_logits(model, embeds[image_of_text], text)
    match = truth[image_of_text, torch.arange(len(image_of_text))].long()
    loss_itm = F.cross_entropy(logits, match)
    if itc_weight == 0:
        return loss_itm, loss_itm
    n = embeds.shape[0]
    text_hidden = model.text_encoder(
        input_ids=text["input_ids"], attention_mask=text["attention_mask"]
    ).last_hidden_state
    img = F.normalize(model.vision_proj(embeds[:, 0, :]), dim=-1)
    txt = F.normalize(model.text_proj(text_hidden[:, 0, :]), dim=-1)
    sim = img @ txt.T / temperature  # (N, T)
    diagonal = torch.zeros_like(truth)
    diagonal[:, :n] = torch.eye(n, dtype=torch.bool)
    sim = sim.masked_fill(truth & ~diagonal, float("-inf"))
    target = torch.arange(n)
    loss_itc = 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim[:, :n].T, target))
    return loss_itm + itc_weight * loss_itc, loss_itm


def vqa_loss(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    question: dict[str, torch.Tensor],
    answer_ids: torch.Tensor,
    image_of_question: torch.Tensor,
) -> torch.Tensor:
    """Teacher-forced answer loss; the same computation as
    ``model(input_ids=q, pixel_values=..., attention_mask=..., labels=answer_ids).loss`` without
    re-running the vision tower for every question.

    Args:
        model: ``BlipForQuestionAnswering``.
        pixel_values: ``(N, 3, S, S)``.
        question: ``input_ids`` and ``attention_mask`` of the Q questions.
        answer_ids: ``(Q, L)`` answer token ids ``[BOS] answer [EOS]`` (all the same length).
        image_of_question: ``(Q,)`` image index of each question.

    Returns:
        Scalar loss.
    """
    embeds = _image_embeds(model, pixel_values)[image_of_question]
    ones = torch.ones(embeds.shape[:-1], dtype=torch.long)
    hidden = model.text_encoder(
        input_ids=question["input_ids"],
        attention_mask=question["attention_mask"],
        encoder_hidden_states=embeds,
        encoder_attention_mask=ones,
    ).last_hidden_state
    out = model.text_decoder(
        input_ids=answer_ids,
        encoder_hidden_states=hidden,
        encoder_attention_mask=question["attention_mask"],
        labels=answer_ids,
        reduction="mean",
    )
    return out.loss


def caption_loss(
    model: torch.nn.Module, pixel_values: torch.Tensor, text: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Teacher-forced caption loss of ``BlipForConditionalGeneration`` (padding ignored).

    Args:
        model: ``BlipForConditionalGeneration``.
        pixel_values: ``(N, 3, S, S)``.
        text: ``input_ids`` (``[BOS] caption [EOS]``) and ``attention_mask`` of the captions.

    Returns:
        Scalar loss.
    """
    labels = text["input_ids"].masked_fill(text["attention_mask"] == 0, -100)
    return model(pixel_values=pixel_values, **text, labels=labels).loss


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def match_probability(model, processor, images: list, texts: list[str]) -> torch.Tensor:
    """ITM match probability of text i for image i, through the processor as a user would.

    Args:
        model: ``BlipForImageTextRetrieval`` in eval mode.
        processor: its processor.
        images: PIL images or uint8 arrays.
        texts: one text per image.

    Returns:
        ``(len(texts),)`` probabilities.
    """
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    return model(**inputs).itm_score.softmax(-1)[:, 1]


def _multi_object_scenes(seed: int, n: int) -> list[Scene]:
    """``n`` held-out scenes with 2-3 objects and at least one binding distractor."""
    rng = np.random.default_rng(seed)
    out: list[Scene] = []
    while len(out) < n:
        scene = make_scene(rng, n_objects=int(rng.integers(2, 4)))
        if scene.distractors:
            out.append(scene)
    return out


@torch.no_grad()
def evaluate_itm(
    model, processor, seed: int = HELDOUT_SEED, n: int = 400, batch: int = 100
) -> dict[str, float]:
    """Held-out ITM and ITC accuracies on scenes from ``seed`` (use seeds never used in training).

    - ``binding``: 2-3 object scenes; the true caption's match probability beats that of a
      caption with the colours of two objects swapped (``scene.distractors``, one at random).
    - ``random``: the same scenes; the true caption beats the caption of another scene that is
      false for this one.
    - ``match_accuracy``: the match probability is on the right side of 0.5 for the true,
      swapped and random captions (all three counted).
    - ``itc_zero_shot``: single-object scenes (seed + 1); top-1 of the contrastive similarity
      (``use_itm_head=False``) over the 12 colour x shape prompts is the object.

    Args:
        model: ``BlipForImageTextRetrieval`` in eval mode.
        processor: its processor.
        seed: evaluation seed.
        n: scenes per set.
        batch: images per forward pass.

    Returns:
        The accuracies.
    """
    rng = np.random.default_rng([seed, 7])
    scenes = _multi_object_scenes(seed, n)
    swapped = [s.distractors[rng.integers(len(s.distractors))] for s in scenes]
    other = []
    for i, s in enumerate(scenes):
        while True:
            j = int(rng.integers(n))
            if j != i and not _true_for(scenes[j].labels, s.labels):
                other.append(scenes[j].caption)
                break
    probs = {}
    for key, texts in (("true", [s.caption for s in scenes]), ("swap", swapped), ("other", other)):
        probs[key] = torch.cat(
            [
                match_probability(
                    model, processor, [s.image for s in scenes[i : i + batch]], texts[i : i + batch]
                )
                for i in range(0, n, batch)
            ]
        )
    res = {
        "binding": float((probs["true"] > probs["swap"]).float().mean()),
        "random": float((probs["true"] > probs["other"]).float().mean()),
        "match_accuracy": float(
            torch.cat([probs["true"] > 0.5, probs["swap"] < 0.5, probs["other"] < 0.5])
            .float()
            .mean()
        ),
    }
    singles = [make_scene(seed + 1 + i, n_objects=1) for i in range(n)]
    prompts = zero_shot_prompts()
    hits = []
    for i in range(0, n, batch):
        chunk = singles[i : i + batch]
        inputs = processor(
            images=[s.image for s in chunk], text=prompts, return_tensors="pt", padding=True
        )
        sim = model(**inputs, use_itm_head=False).itm_score  # (images, prompts)
        hits += [prompts[int(k)] == phrase(*s.labels[0]) for k, s in zip(sim.argmax(-1), chunk)]
    res["itc_zero_shot"] = float(np.mean(hits))
    return res


@torch.no_grad()
def answer(model, processor, images: list, questions: list[str]) -> list[str]:
    """Generated answers, one question per image, through the processor as a user would.

    Questions of equal token length are batched together, so no question is padded (BLIP's
    ``generate`` lets the answer decoder attend to every question position, padding included).

    Args:
        model: ``BlipForQuestionAnswering`` in eval mode.
        processor: its processor.
        images: PIL images or uint8 arrays.
        questions: one question per image.

    Returns:
        The decoded answers.
    """
    lengths = [len(processor.tokenizer(q).input_ids) for q in questions]
    out = [""] * len(questions)
    for length in sorted(set(lengths)):
        idx = [i for i, k in enumerate(lengths) if k == length]
        inputs = processor(
            images=[images[i] for i in idx], text=[questions[i] for i in idx], return_tensors="pt"
        )
        ids = model.generate(**inputs, max_new_tokens=4)
        for i, text in zip(idx, processor.batch_decode(ids, skip_special_tokens=True)):
            out[i] = text.strip()
    return out


@torch.no_grad()
def evaluate_vqa(
    model, processor, seed: int = HELDOUT_SEED, n: int = 400, batch: int = 100, answer_fn=None
) -> dict[str, float]:
    """Held-out VQA accuracy (exact match of the generated answer) on scenes from ``seed``.

    Every scene (1-3 objects, as ``make_scene`` draws them) gets one question of each type it has
    (:func:`sample_question`: colour, shape, has_shape, has_object, count). Reports the accuracy
    per type, ``accuracy`` over all these questions and ``all_pairs`` over every pair in
    ``scene.vqa`` of the first ``n // 4`` scenes (mostly "no" to "is there a <colour> <shape>?").

    Args:
        model: ``BlipForQuestionAnswering`` in eval mode.
        processor: its processor.
        seed: evaluation seed.
        n: scenes.
        batch: questions per ``generate`` call (before grouping by length).
        answer_fn: ``answer_fn(model, processor, images, questions)`` -> answers (default
            :func:`answer`; other families pass their own).

    Returns:
        The accuracies.
    """
    answer_fn = answer_fn or answer
    rng = np.random.default_rng([seed, 7])
    scenes = [make_scene(seed + i) for i in range(n)]
    images, questions, answers, kinds = [], [], [], []
    for s in scenes:
        for kind in QUESTION_TYPES:
            qa = sample_question(rng, s.labels, kind)
            if qa is not None:
                images.append(s.image)
                questions.append(qa[0])
                answers.append(qa[1])
                kinds.append(kind)
    # every sampled answer must agree with the scene generator's own question/answer pairs
    truth = {(id(s.image), q): a for s in scenes for q, a in s.vqa}
    assert all(truth[(id(im), q)] == a for im, q, a in zip(images, questions, answers))
    pred = []
    for i in range(0, len(questions), batch):
        pred += answer_fn(model, processor, images[i : i + batch], questions[i : i + batch])
    hits = np.array([p == a for p, a in zip(pred, answers)])
    res = {"accuracy": float(hits.mean())}
    for kind in QUESTION_TYPES:
        res[kind] = float(hits[[k == kind for k in kinds]].mean())
    pairs = [(s.image, q, a) for s in scenes[: max(1, n // 4)] for q, a in s.vqa]
    pred = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        pred += answer_fn(model, processor, [p[0] for p in chunk], [p[1] for p in chunk])
    res["all_pairs"] = float(np.mean([p == a for p, (_, _, a) in zip(pred, pairs)]))
    return res


@torch.no_grad()
def evaluate_prior(
    model, processor, prior: LanguagePrior, seed: int = HELDOUT_SEED, n: int = 400
) -> dict[str, float]:
    """How often a VQA model answers a planted prior's question from the prior.

    Held-out scenes (``default_rng(seed + 5)``) of 1-3 objects with exactly one object of the
    prior's shape, asked the prior's question ("what color is the square?"): ``n`` scenes where
    that object has another colour, and ``n`` where it has the prior's colour.

    - ``prior_answer_rate``: share of the other-colour scenes answered with the prior's colour.
    - ``prior_question_accuracy``: share of the other-colour scenes answered right.
    - ``prior_colour_accuracy``: accuracy on the scenes where the prior is right.

    Args:
        model: ``BlipForQuestionAnswering`` in eval mode.
        processor: its processor.
        prior: the planted prior.
        seed: evaluation seed.
        n: scenes per set.

    Returns:
        The rates.
    """
    scenes = prior_scenes(prior, seed, n, against=True) + prior_scenes(prior, seed, n, against=False)
    pred = answer(model, processor, [s.image for s in scenes], [prior.question] * len(scenes))
    truth = [prior_object(prior, s)[0] for s in scenes]
    against, agree = slice(0, n), slice(n, 2 * n)
    return {
        "prior_answer_rate": float(np.mean([p == prior.colour for p in pred[against]])),
        "prior_question_accuracy": float(np.mean([p == t for p, t in zip(pred[against], truth[against])])),
        "prior_colour_accuracy": float(np.mean([p == t for p, t in zip(pred[agree], truth[agree])])),
    }


def prior_object(prior: LanguagePrior, scene: Scene) -> tuple[str, int]:
    """The colour and index of the one object of the prior's shape in ``scene``."""
    index = [s for _, s in scene.labels].index(prior.shape)
    return scene.labels[index][0], index


def prior_scenes(prior: LanguagePrior, seed: int, n: int, against: bool) -> list[Scene]:
    """``n`` held-out scenes with exactly one object of the prior's shape, of another colour than
    the prior's (``against=True``) or of the prior's colour; from ``default_rng([seed, 5, against])``.

    Args:
        prior: the planted prior.
        seed: evaluation seed.
        n: number of scenes.
        against: whether the object contradicts the prior.

    Returns:
        The scenes (their question is ``prior.question``).
    """
    rng = np.random.default_rng([seed, 5, int(against)])
    others = [lab for lab in all_labels() if lab[1] != prior.shape]
    colours = [c for c in COLOURS if c != prior.colour] if against else [prior.colour]
    out = []
    for _ in range(n):
        k = int(rng.integers(0, 3))
        objects = [others[i] for i in rng.choice(len(others), size=k, replace=False)]
        objects.insert(int(rng.integers(k + 1)), (str(rng.choice(colours)), prior.shape))
        out.append(make_scene(rng, labels=objects))
    return out


def caption_objects(caption: str) -> set[Label] | None:
    """The objects a caption of the scene grammar names, or None when it does not parse."""
    found = set()
    for part in caption.strip().replace(" and ", ", ").split(", "):
        words = part.split()
        if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
            return None
        found.add((words[1], words[2]))
    return found


@torch.no_grad()
def caption(model, processor, images: list, max_new_tokens: int = 20) -> list[str]:
    """Greedy captions through the processor, as a user would."""
    inputs = processor(images=images, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
    return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]


@torch.no_grad()
def evaluate_caption(
    model, processor, seed: int = HELDOUT_SEED, n: int = 400, batch: int = 100
) -> dict[str, float]:
    """Held-out captioning accuracy on scenes ``make_scene(seed + i)`` (1-3 objects).

    - ``object_set``: the greedy caption names exactly the scene's objects (any order).
    - ``object_set_1`` / ``_2`` / ``_3``: the same by number of objects.
    - ``parsed``: the caption is in the scene grammar.

    Args:
        model: ``BlipForConditionalGeneration`` in eval mode.
        processor: its processor.
        seed: evaluation seed.
        n: scenes.
        batch: images per ``generate`` call.

    Returns:
        The accuracies.
    """
    scenes = [make_scene(seed + i) for i in range(n)]
    texts = []
    for i in range(0, n, batch):
        texts += caption(model, processor, [s.image for s in scenes[i : i + batch]])
    named = [caption_objects(t) for t in texts]
    hits = np.array([m == set(s.labels) for m, s in zip(named, scenes)])
    counts = np.array([len(s.labels) for s in scenes])
    res = {"object_set": float(hits.mean()), "parsed": float(np.mean([m is not None for m in named]))}
    for k in (1, 2, 3):
        res[f"object_set_{k}"] = float(hits[counts == k].mean()) if (counts == k).any() else float("nan")
    return res


def evaluate(model, processor, task: str, seed: int = HELDOUT_SEED, n: int = 400) -> dict:
    """:func:`evaluate_itm`, :func:`evaluate_vqa` or :func:`evaluate_caption` by task."""
    fn = {"itm": evaluate_itm, "vqa": evaluate_vqa, "caption": evaluate_caption}[task]
    return fn(model, processor, seed=seed, n=n)


# --------------------------------------------------------------------------- training


def train(
    recipe: BlipRecipe,
    out_dir: str | Path | None = None,
    eval_every: int = 1000,
    eval_seed: int = 90_000,
    show_progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    time_budget_s: float | None = None,
) -> tuple[torch.nn.Module, object, dict]:
    """Train a BLIP model from a recipe; optionally save it (weights, config, processor, log).

    With a time budget the schedule runs on ``max(step / steps, elapsed / budget)`` and training
    stops when that reaches 1, so a run on a busy machine still ends on time with a completed
    cosine decay (the log records the steps actually taken).

    Args:
        recipe: the recipe.
        out_dir: where to save; nothing is saved when None.
        eval_every: steps between quick held-out checks (0 for none); printed, not used to select.
        eval_seed: seed of the quick checks (final numbers use another seed, see ``main``).
        show_progress: draw a tqdm bar.
        checkpoint_dir: where to save model and processor at every quick check (None: not saved).
        time_budget_s: training time limit in seconds (None: run all ``recipe.steps``).

    Returns:
        (model in eval mode, processor, log dict: recipe, steps, elapsed seconds, per-step
        ``losses``; all but the losses are saved as ``training.json``).
    """
    torch.manual_seed(recipe.seed)
    model = build_model(recipe)
    if recipe.init_from:
        folder = Path(recipe.init_from)
        folder = folder if folder.is_dir() else MODELS_DIR / recipe.init_from
        model = type(model).from_pretrained(folder, local_files_only=True)
    elif recipe.vision_init:
        init_vision_from_clip(model, recipe.vision_init)
    if recipe.encoder_init:
        init_encoder_from_itm(model, recipe.encoder_init)
    if recipe.decoder_init:
        init_decoder_from_vqa(model, recipe.decoder_init)
    processor = build_blip_processor(recipe.image_size)
    tokenizer = processor.tokenizer
    rng = np.random.default_rng([recipe.seed, 2])  # disjoint from plain integer eval seeds
    side = recipe.image_size
    prior = language_prior(recipe)

    def make_batch():
        if recipe.task == "itm":
            return itm_batch(rng, recipe.batch, recipe.per_image, side)
        if recipe.task == "caption":
            return caption_batch(rng, recipe.batch, side)
        return vqa_batch(rng, recipe.batch, recipe.per_image, side, prior)

    opt = make_optimizer(model, recipe)

    def progress(step: int) -> float:
        done = step / recipe.steps
        if time_budget_s:
            done = max(done, (time.time() - start) / time_budget_s)
        return min(done, 1.0)

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        t0 = recipe.warmup / recipe.steps
        t = max(0.0, (progress(step) - t0) / (1.0 - t0))
        return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * t))

    def batch_loss(data) -> torch.Tensor:
        if recipe.task == "itm":
            pixel_values, texts, image_of_text, truth = data
            text = dict(tokenizer(texts, return_tensors="pt", padding=True))
            loss, _ = itm_loss(
                model, pixel_values, text, image_of_text, truth, recipe.itc_weight, recipe.temperature
            )
            return loss
        if recipe.task == "caption":
            pixel_values, captions = data
            return caption_loss(model, pixel_values, dict(tokenizer(captions, return_tensors="pt", padding=True)))
        pixel_values, questions, answers, owner = data
        question = dict(tokenizer(questions, return_tensors="pt", padding=True))
        answer_ids = tokenizer(answers, return_tensors="pt", padding=True).input_ids
        return vqa_loss(model, pixel_values, question, answer_ids, owner)

    def quick_check() -> dict:
        check = evaluate(model, processor, recipe.task, seed=eval_seed, n=200)
        if prior is not None:
            check.update(evaluate_prior(model, processor, prior, seed=eval_seed, n=100))
        return check

    def save_checkpoint(step: int) -> None:
        model.save_pretrained(checkpoint_dir)
        processor.save_pretrained(checkpoint_dir)

    losses: list[float] = []
    checks: list[dict] = []
    start = time.time()
    run_steps(
        model,
        opt,
        make_batch,
        batch_loss,
        lr_at,
        recipe.steps,
        losses,
        checks,
        start,
        finished=lambda step: progress(step) >= 1.0,
        quick_check=quick_check,
        on_check=save_checkpoint if checkpoint_dir is not None else None,
        eval_every=eval_every,
        show_progress=show_progress,
        desc=recipe.task,
    )
    log = training_log(recipe, losses, checks, start, time_budget_s=time_budget_s)
    save_trained(model, processor, log, out_dir)
    log["losses"] = losses
    return model, processor, log


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m captum_vlm.zoo.train_blip NAME [--steps N] [--out DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(RECIPES), help="zoo model to train")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    parser.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    parser.add_argument("--lr", type=float, default=None, help="override the recipe's lr")
    parser.add_argument("--out", default=None, help="output folder (default: zoo/models/NAME)")
    parser.add_argument("--vision-init", default=None, help="zoo CLIP for the vision tower")
    parser.add_argument("--init-from", default=None, help="saved model to continue from")
    parser.add_argument("--encoder-init", default=None, help="VQA: ITM model for the encoder")
    parser.add_argument("--decoder-init", default=None, help="caption: VQA model for the decoder")
    parser.add_argument("--warmup", type=int, default=None, help="override the warm-up steps")
    parser.add_argument("--minutes", type=float, default=None, help="training time budget")
    parser.add_argument("--eval-every", type=int, default=1000, help="steps between checks")
    parser.add_argument("--eval-scenes", type=int, default=1000, help="scenes in the final test")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    recipe = RECIPES[args.name]
    overrides = {k: getattr(args, k) for k in ("steps", "seed", "lr") if getattr(args, k)}
    parser_keys = ("vision_init", "init_from", "encoder_init", "decoder_init", "warmup")
    for key in parser_keys:
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    recipe = BlipRecipe(**{**asdict(recipe), **overrides})
    out = Path(args.out) if args.out else MODELS_DIR / args.name
    print(f"training {args.name}: {json.dumps(asdict(recipe))}", flush=True)
    checkpoint = Path("/tmp") / f"captum_vlm_zoo_{args.name}_checkpoint"
    model, processor, log = train(
        recipe,
        out_dir=out,
        eval_every=args.eval_every,
        checkpoint_dir=checkpoint,
        time_budget_s=args.minutes * 60 if args.minutes else None,
    )
    print(f"trained {log['steps']} steps in {log['elapsed_s']:.0f} s; saved to {out}", flush=True)
    start = time.time()
    metrics = evaluate(model, processor, recipe.task, seed=HELDOUT_SEED, n=args.eval_scenes)
    if language_prior(recipe) is not None:
        metrics["prior"] = evaluate_prior(
            model, processor, language_prior(recipe), seed=HELDOUT_SEED, n=args.eval_scenes
        )
    log.pop("losses")
    log["heldout"] = {"seed": HELDOUT_SEED, "scenes": args.eval_scenes, **metrics}
    (out / "training.json").write_text(json.dumps(log, indent=2))
    print(f"held-out (seed {HELDOUT_SEED}, {time.time() - start:.0f} s): {json.dumps(metrics)}")


if __name__ == "__main__":
    main()
