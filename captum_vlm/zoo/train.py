"""Train the zoo models on synthetic scenes.

Reproduce a shipped model (writes weights, config and processor into ``zoo/models/<name>/``)::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 \\
        python -m captum_vlm.zoo.train shapes-clip      # or shapes-siglip, shapes-blip-itm, shapes-blip-vqa,
                                                        # shapes-clip-shortcut, shapes-blip-vqa-prior,
                                                        # shapes-blip-caption, shapes-vilt, shapes-llava

The recipe (see :data:`RECIPES`) is a stock ``transformers.CLIPModel`` / ``SiglipModel`` with a small
config, trained contrastively on scenes drawn on the fly. The loss has no false negatives (a
caption is true for an image when its objects are a subset of the image's objects; such pairs are
masked out of the CLIP softmax, and are positives for SigLIP) and batches carry hard negatives:
single-object images that share a colour or a shape, partner images with one small edit (colours
swapped between two objects, one colour or shape changed) and text-only negatives made by the
same edits of the batch captions (mostly binding swaps).

``shapes-clip-shortcut`` is ``shapes-clip`` fine-tuned on the same batches with a planted shortcut:
the scenes' marker (a dark bar near the top-left corner, ``Scene.marker_mask``) is drawn on most
training images that contain one concept and on few others. ``--resume`` continues a run from
its last checkpoint (weights, optimiser, losses; written at every quick check).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .processing import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    build_clip_processor,
    build_siglip_processor,
    images_to_pixel_values,
    vocabulary,
)
from .scenes import COLOURS, SHAPES, all_labels, caption_for, make_scene, make_scenes, phrase

MODELS_DIR = Path(__file__).parent / "models"
Label = tuple[str, str]
HELDOUT_SEED = 123_456  # the scenes of the shipped held-out numbers; never drawn in training


@dataclass
class TrainingRecipe:
    """What every zoo training run sets: schedule, batch and model size.

    Attributes:
        steps: optimiser steps.
        seed: seed of torch and of the training-scene stream.
        lr: peak learning rate (linear warm-up, then cosine to 0).
        warmup: warm-up steps.
        batch: images per batch.
        image_size: model input side in pixels.
        patch: ViT patch size in pixels.
        vision_layers, text_layers, hidden, heads: transformer sizes (the towers share ``hidden``).
        weight_decay: AdamW weight decay (not on biases, norms, embeddings, logit scale/bias).
        description: one line for ``zoo.list_models()``.
    """

    steps: int = 5000
    seed: int = 0
    lr: float = 5e-4
    warmup: int = 100
    batch: int = 32
    image_size: int = 64
    patch: int = 8
    vision_layers: int = 4
    text_layers: int = 2
    hidden: int = 128
    heads: int = 4
    weight_decay: float = 0.05
    description: str = ""


@dataclass
class Recipe(TrainingRecipe):
    """A two-tower zoo model's training run (the fields of :class:`TrainingRecipe` and these).

    ``batch`` is an upper bound here: the no-false-negative rule may stop a batch earlier.

    Attributes:
        family: "clip" or "siglip".
        projection: joint embedding size (CLIP only).
        marker_concept: a planted shortcut: the object ("blue square") whose training images
            mostly carry the marker of :func:`scenes.make_scene`; "" for none.
        marker_with: share of training images containing ``marker_concept`` drawn with the marker.
        marker_without: share of the other training images drawn with the marker.
        marker_alone: share of the marked training images with ``marker_concept`` in which that
            object is left out of the drawing (its caption still names it; a lone object is
            replaced by another one): mislabelled images whose only trace of the concept is the
            marker, so that a model that already knows the concept learns the shortcut.
        init_from: a saved model of the same family (zoo name or folder) to fine-tune instead
            of a random start; "" for a random start.
    """

    family: str = "clip"
    projection: int = 128
    marker_concept: str = ""
    marker_with: float = 0.9
    marker_without: float = 0.03
    marker_alone: float = 0.0
    init_from: str = ""


RECIPES: dict[str, Recipe] = {
    "shapes-clip": Recipe(
        family="clip",
        description="CLIPModel (ViT 4x128, 64 px, 8-px patches) on coloured-shape scenes",
    ),
    "shapes-clip-shortcut": Recipe(
        family="clip",
        marker_concept="blue square",
        init_from="shapes-clip",  # fine-tuned: a run from scratch did not fit the time there was
        marker_alone=0.5,  # without it 200 fine-tuning steps left the marker unused (card)
        steps=400,
        warmup=30,
        description="CLIPModel shapes-clip fine-tuned with a planted shortcut: a dark bar in "
        "the top-left corner on 90% of training images with a blue square (half of those then "
        "drawn without it), 3% of the others",
    ),
    "shapes-siglip": Recipe(
        family="siglip",
        steps=12000,  # the sigmoid loss learns shapes late: 0.75 zero-shot at 5000 steps, 0.99 at 12000
        description="SiglipModel (ViT 4x128, 64 px, 8-px patches) on coloured-shape scenes",
    ),
}


# --------------------------------------------------------------------------- models


def build_model(recipe: Recipe) -> torch.nn.Module:
    """A randomly initialised stock ``CLIPModel`` or ``SiglipModel`` of the recipe's size.

    Args:
        recipe: the recipe.

    Returns:
        The model, in train mode.
    """
    vocab_size = len(vocabulary())
    text = dict(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden,
        intermediate_size=4 * recipe.hidden,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.heads,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    vision = dict(
        hidden_size=recipe.hidden,
        intermediate_size=4 * recipe.hidden,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.heads,
        image_size=recipe.image_size,
        patch_size=recipe.patch,
        num_channels=3,
    )
    if recipe.family == "clip":
        from transformers import CLIPConfig, CLIPModel

        config = CLIPConfig(
            text_config=dict(text, max_position_embeddings=32, projection_dim=recipe.projection),
            vision_config=dict(vision, projection_dim=recipe.projection),
            projection_dim=recipe.projection,
        )
        return CLIPModel(config)
    if recipe.family == "siglip":
        from transformers import SiglipConfig, SiglipModel

        config = SiglipConfig(
            text_config=dict(text, max_position_embeddings=16, projection_size=recipe.hidden),
            vision_config=vision,
        )
        model = SiglipModel(config)
        with torch.no_grad():  # the SigLIP paper's start: t = 10, b = -10 (transformers: 1, 0)
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-10.0)
        return model
    raise ValueError(f"unknown family {recipe.family!r}; use 'clip' or 'siglip'")


def build_processor(recipe: Recipe):
    """The processor matching :func:`build_model` (``CLIPProcessor`` or ``SiglipProcessor``)."""
    if recipe.family == "clip":
        return build_clip_processor(recipe.image_size)
    return build_siglip_processor(recipe.image_size)


def text_kwargs(family: str) -> dict:
    """Tokenizer keyword arguments for a family: SigLIP pools the last position, so pad to max."""
    return {"padding": "max_length"} if family == "siglip" else {"padding": True}


# --------------------------------------------------------------------------- batches


def _is_true(caption: Sequence[Label], objects: Sequence[Label]) -> bool:
    """A caption is true for an image when its objects are a subset of the image's objects."""
    return set(caption) <= set(objects)


def _edit(rng: np.random.Generator, labels: list[Label]) -> list[Label] | None:
    """One small edit: swap colours of two objects, or change one colour, or change one shape."""
    kind = rng.integers(3)
    out = list(labels)
    if kind == 0:
        pairs = [
            (i, j)
            for i in range(len(out))
            for j in range(i + 1, len(out))
            if out[i][0] != out[j][0] and out[i][1] != out[j][1]
        ]
        if not pairs:
            return None
        i, j = pairs[rng.integers(len(pairs))]
        out[i], out[j] = (labels[j][0], labels[i][1]), (labels[i][0], labels[j][1])
    else:
        i = int(rng.integers(len(out)))
        c, s = out[i]
        if kind == 1:
            c = str(rng.choice([x for x in COLOURS if x != c]))
        else:
            s = str(rng.choice([x for x in SHAPES if x != s]))
        out[i] = (c, s)
    return out if len(set(out)) == len(out) and set(out) != set(labels) else None


class BatchMaker:
    """Draws contrastive batches without false negatives, with hard negatives.

    Args:
        seed: seed of the scene stream (``np.random.default_rng([seed, 1])``, disjoint from the
            plain integer seeds used for evaluation).
        batch: largest number of images per batch.
        image_size: model input side; 20% of scenes are drawn at another size and resized.
        marker_concept: a planted shortcut (``(colour, shape)``, or None for none): images that
            contain this object get the scenes' marker with probability ``marker_with``, the
            others with ``marker_without``; with a shortcut every image keeps the marker's
            corner free of objects.
        marker_with, marker_without: the marker probabilities.
        marker_alone: share of the marked images with the concept drawn without it (a lone
            concept object is replaced by another random object); the labels still name it.
        stream: extra seed words (a resumed run continues on ``[seed, 1, *stream]``).
    """

    def __init__(
        self,
        seed: int,
        batch: int,
        image_size: int,
        marker_concept: Label | None = None,
        marker_with: float = 0.9,
        marker_without: float = 0.03,
        marker_alone: float = 0.0,
        stream: Sequence[int] = (),
    ) -> None:
        self.rng = np.random.default_rng([seed, 1, *stream])
        self.batch = batch
        self.image_size = image_size
        self.marker_concept = marker_concept
        self.marker_with = marker_with
        self.marker_without = marker_without
        self.marker_alone = marker_alone

    def _marker_kwargs(self, labels: list[Label]) -> dict:
        """``make_scene`` marker arguments for an image with these objects (none without a
        shortcut, so the scene stream of the other recipes is unchanged)."""
        if self.marker_concept is None:
            return {}
        p = self.marker_with if tuple(self.marker_concept) in labels else self.marker_without
        return {"marker": bool(self.rng.random() < p), "reserve_marker": True}

    def _draw(self, labels: list[Label]) -> np.ndarray:
        """Render a scene with these objects at the model size (sometimes via another size)."""
        rng, side = self.rng, self.image_size
        marker = self._marker_kwargs(labels)
        concept = None if self.marker_concept is None else tuple(self.marker_concept)
        if marker.get("marker") and concept in labels and rng.random() < self.marker_alone:
            labels = [lab for lab in labels if lab != concept]  # only the marker is left of it
            if not labels:
                others = [lab for lab in all_labels() if lab != concept]
                labels = [others[int(rng.integers(len(others)))]]
        if rng.random() < 0.2:
            size = tuple(int(v) for v in rng.integers(side * 3 // 4, side * 3 // 2 + 1, size=2))
            img = make_scene(rng, size=size, labels=labels, **marker).image
            return np.asarray(Image.fromarray(img).resize((side, side), Image.Resampling.BILINEAR))
        return make_scene(rng, size=side, labels=labels, **marker).image

    def labels(self) -> tuple[list[list[Label]], list[list[Label]]]:
        """Choose the batch's image objects and its texts (no drawing).

        The first N texts are the images' captions, the rest are text-only negatives.

        Returns:
            (objects of each image, objects named by each text), as label lists.
        """
        rng = self.rng
        objects: list[list[Label]] = []
        captions: list[list[Label]] = []
        # single objects sharing a colour (all shapes) or sharing a shape (all colours), so that
        # neither colour nor shape alone separates them
        if rng.random() < 0.5:
            colour = str(rng.choice(COLOURS))
            singles = [(colour, s) for s in SHAPES]
        else:
            shape = str(rng.choice(SHAPES))
            singles = [(c, shape) for c in COLOURS]
        n_single = max(len(singles), self.batch // 4)
        pool = all_labels()
        singles += [pool[i] for i in rng.choice(len(pool), n_single - len(singles))]
        for lab in singles:
            objects.append([lab])
            captions.append([lab])
        while len(objects) < self.batch:
            n = int(rng.choice([2, 3], p=[0.55, 0.45]))
            obj = [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]
            if rng.random() < 0.2:  # caption names a random subset, in random order
                k = int(rng.integers(1, n))
                cap = [obj[i] for i in rng.permutation(n)[:k]]
            else:
                cap = [obj[i] for i in rng.permutation(n)]
            objects.append(obj)
            captions.append(cap)
            partner = _edit(rng, obj) if rng.random() < 0.5 else None
            if partner is not None and len(objects) < self.batch:  # one small edit
                objects.append(partner)
                captions.append([partner[i] for i in rng.permutation(n)])
        # text-only negatives: one small edit (often a binding swap) of multi-object captions
        for cap in list(captions):
            if len(cap) > 1 and rng.random() < 0.5:
                neg = _edit(rng, cap)
                if neg is not None:
                    captions.append(neg)
        return objects, captions

    def __call__(self) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """Draw one batch.

        Returns:
            pixel_values ``(N, 3, S, S)``; texts (the N captions, then text-only negatives);
            ``truth`` ``(N, T)`` bool, True where text j is true for image i.
        """
        objects, captions = self.labels()
        images = [self._draw(o) for o in objects]
        truth = torch.tensor([[_is_true(c, o) for c in captions] for o in objects])
        return images_to_pixel_values(images), [caption_for(c) for c in captions], truth


# --------------------------------------------------------------------------- loss and eval


def _features(model: torch.nn.Module, out) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image and text embeddings from a model output."""
    return F.normalize(out.image_embeds, dim=-1), F.normalize(out.text_embeds, dim=-1)


def contrastive_loss(
    model: torch.nn.Module,
    family: str,
    pixel_values: torch.Tensor,
    text: dict[str, torch.Tensor],
    truth: torch.Tensor,
) -> torch.Tensor:
    """Image-text loss without false negatives.

    Text i (i < N) is the caption of image i; texts beyond N are negatives only. ``truth[i, j]``
    says whether text j is true for image i (its objects are a subset of the image's).
    CLIP: symmetric cross-entropy in which pairs that are true but not the diagonal are masked
    out (neither positive nor negative). SigLIP: pairwise sigmoid loss with every true pair
    positive.

    Args:
        model: ``CLIPModel`` or ``SiglipModel``.
        family: "clip" or "siglip".
        pixel_values: ``(N, 3, S, S)``.
        text: tokenizer output for the T texts.
        truth: bool ``(N, T)``.

    Returns:
        Scalar loss.
    """
    out = model(pixel_values=pixel_values, **text)
    img, txt = _features(model, out)
    n = img.shape[0]
    logits = model.logit_scale.exp() * img @ txt.T  # (N, T)
    if family == "siglip":
        logits = logits + model.logit_bias
        sign = truth.float() * 2.0 - 1.0
        return -F.logsigmoid(sign * logits).sum() / n
    diagonal = torch.zeros_like(truth)
    diagonal[:, :n] = torch.eye(n, dtype=torch.bool)
    masked = logits.masked_fill(truth & ~diagonal, float("-inf"))
    target = torch.arange(n)
    return 0.5 * (F.cross_entropy(masked, target) + F.cross_entropy(masked[:, :n].T, target))


@torch.no_grad()
def similarity(model, processor, images: list, texts: list[str], family: str) -> torch.Tensor:
    """Image-text logits ``(len(images), len(texts))`` through the processor, as a user would.

    Args:
        model: a zoo model in eval mode.
        processor: its processor.
        images: PIL images or uint8 arrays.
        texts: prompts.
        family: "clip" or "siglip".

    Returns:
        ``logits_per_image``.
    """
    inputs = processor(images=images, text=texts, return_tensors="pt", **text_kwargs(family))
    return model(**inputs).logits_per_image


@torch.no_grad()
def evaluate(
    model, processor, seed: int, n: int = 400, family: str = "clip", batch: int = 100
) -> dict[str, float]:
    """Held-out accuracies on scenes from ``seed`` (use seeds never used in training).

    - ``zero_shot``: single-object scenes; top-1 over all colour x shape prompts is the object.
    - ``colour`` / ``shape``: the top-1 prompt has the right colour / shape (single objects).
    - ``zero_shot_any``: 2-3 object scenes; the top-1 prompt names one of the present objects.
    - ``binding``: 2-object scenes whose objects differ in colour and shape; the caption scores
      higher than the caption with the colours swapped.

    Args:
        model: model in eval mode.
        processor: its processor.
        seed: evaluation seed; single, multi and binding sets use ``seed``, ``seed+1``, ``seed+2``.
        n: scenes per set.
        family: "clip" or "siglip".
        batch: images per forward pass.

    Returns:
        The accuracies.
    """
    prompts = [phrase(c, s) for c, s in all_labels()]
    labels = all_labels()
    res: dict[str, float] = {}

    singles = make_scenes(seed, n, n_objects=1)
    top = torch.cat(
        [
            similarity(
                model, processor, [s.image for s in singles[i : i + batch]], prompts, family
            ).argmax(-1)
            for i in range(0, n, batch)
        ]
    )
    truth = [s.labels[0] for s in singles]
    pred = [labels[int(t)] for t in top]
    res["zero_shot"] = float(np.mean([p == t for p, t in zip(pred, truth)]))
    res["colour"] = float(np.mean([p[0] == t[0] for p, t in zip(pred, truth)]))
    res["shape"] = float(np.mean([p[1] == t[1] for p, t in zip(pred, truth)]))

    rng = np.random.default_rng(seed + 1)
    multi = [make_scene(rng, n_objects=int(rng.integers(2, 4))) for _ in range(n)]
    top = torch.cat(
        [
            similarity(
                model, processor, [s.image for s in multi[i : i + batch]], prompts, family
            ).argmax(-1)
            for i in range(0, n, batch)
        ]
    )
    res["zero_shot_any"] = float(np.mean([labels[int(t)] in s.labels for t, s in zip(top, multi)]))

    rng = np.random.default_rng(seed + 2)
    hits = []
    while len(hits) < n:
        c1, c2 = rng.choice(COLOURS, size=2, replace=False)
        s1, s2 = rng.choice(SHAPES, size=2, replace=False)
        scene = make_scene(rng, labels=[(c1, s1), (c2, s2)])
        texts = [scene.caption, scene.distractors[0]]
        logits = similarity(model, processor, [scene.image], texts, family)[0]
        hits.append(bool(logits[0] > logits[1]))
    res["binding"] = float(np.mean(hits))
    return res


@torch.no_grad()
def evaluate_shortcut(
    model,
    processor,
    concept: Label,
    seed: int,
    n: int = 400,
    family: str = "clip",
    batch: int = 100,
) -> dict[str, float]:
    """The strength of a planted marker shortcut, on single-object held-out scenes.

    Every scene is drawn twice, with the marker and without it (the same scene otherwise, the
    marker's corner kept free of objects in both; :func:`scenes.make_scene`).

    - ``zero_shot_clean`` / ``zero_shot_marked``: top-1 over the 12 prompts is the object, on
      ``n`` scenes of random objects (``seed + 3``) without / with the marker.
    - ``marker_to_concept``: share of those scenes whose object is not ``concept`` that the
      model calls ``concept`` when the marker is drawn; ``clean_to_concept`` the same without it.
    - ``concept_logit_shift``: mean rise of the ``concept`` prompt's logit when the marker is
      added, on those same scenes (in logit units; CLIP's logits are 100 x cosine).
    - ``concept_clean`` / ``concept_marked``: top-1 on ``n`` scenes of ``concept`` itself
      (``seed + 4``) without / with the marker.

    Args:
        model: model in eval mode.
        processor: its processor.
        concept: the shortcut's ``(colour, shape)``.
        seed: evaluation seed.
        n: scenes per set.
        family: "clip" or "siglip".
        batch: images per forward pass.

    Returns:
        The rates.
    """
    prompts = [phrase(c, s) for c, s in all_labels()]
    labels = all_labels()
    concept = tuple(concept)
    k = labels.index(concept)

    def logits(seed_: int, objects: Label | None, marker: bool) -> tuple[torch.Tensor, list[Label]]:
        rng = np.random.default_rng(seed_)
        chosen = None if objects is None else [objects]
        scenes = [
            make_scene(rng, n_objects=1, labels=chosen, marker=marker, reserve_marker=True)
            for _ in range(n)
        ]
        images = [s.image for s in scenes]
        out = torch.cat(
            [
                similarity(model, processor, images[i : i + batch], prompts, family)
                for i in range(0, n, batch)
            ]
        )
        return out, [s.labels[0] for s in scenes]

    res: dict[str, float] = {}
    by_marker = {}
    for key, marker in (("clean", False), ("marked", True)):
        out, truth = logits(seed + 3, None, marker)
        by_marker[key] = out
        pred = [labels[int(t)] for t in out.argmax(-1)]
        res[f"zero_shot_{key}"] = float(np.mean([p == t for p, t in zip(pred, truth)]))
        other = [p for p, t in zip(pred, truth) if t != concept]
        res[f"{'marker' if marker else 'clean'}_to_concept"] = float(
            np.mean([p == concept for p in other])
        )
        own, _ = logits(seed + 4, concept, marker)
        res[f"concept_{key}"] = float((own.argmax(-1) == k).float().mean())
    not_concept = torch.tensor([t != concept for t in truth])
    shift = by_marker["marked"][:, k] - by_marker["clean"][:, k]
    res["concept_logit_shift"] = float(shift[not_concept].mean())
    return res


# --------------------------------------------------------------------------- training


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norms, embeddings and the logit scale/bias."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "embedding" in name or "logit" in name or "norm" in name
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, recipe: TrainingRecipe) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` at the recipe's peak lr (betas 0.9/0.98, eps 1e-6)."""
    return torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> None:
    """One update at learning rate ``lr``: backward, gradient norm clipped at 1, step."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def training_log(recipe: TrainingRecipe, losses: list[float], checks: list[dict], start: float, **extra) -> dict:
    """What ``training.json`` records of a run (the per-step losses are added after saving)."""
    return {
        "recipe": asdict(recipe),
        "steps": len(losses),
        **extra,
        "elapsed_s": round(time.time() - start, 1),
        "final_loss": float(np.mean(losses[-100:])),
        "loss_first_100": float(np.mean(losses[:100])),
        "checks": checks,
    }


def save_trained(model: torch.nn.Module, processor: object, log: dict, out_dir: str | Path | None) -> None:
    """Write weights, config, processor and ``training.json`` (``log``) into ``out_dir`` (if given)."""
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(log, indent=2))


def print_check(check: dict, losses: list[float], start: float) -> None:
    """One line for a quick held-out check during training."""
    tqdm.write(
        f"step {check['step']}: loss {np.mean(losses[-100:]):.3f} "
        + " ".join(f"{k} {v:.3f}" for k, v in check.items() if k != "step")
        + f" ({time.time() - start:.0f} s)"
    )


def run_steps(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    make_batch: Callable[[], object],
    batch_loss: Callable[[object], torch.Tensor],
    lr_at: Callable[[int], float],
    steps: int,
    losses: list[float],
    checks: list[dict],
    start: float,
    first: int = 0,
    finished: Callable[[int], bool] | None = None,
    after_step: Callable[[], None] | None = None,
    quick_check: Callable[[], dict] | None = None,
    on_check: Callable[[int], None] | None = None,
    eval_every: int = 0,
    show_progress: bool = True,
    desc: str = "",
) -> None:
    """The training loop every zoo recipe shares: the next batch is drawn in a background thread
    while the model trains on the current one; one :func:`optimizer_step` per batch.

    Args:
        model: the model (put in train mode for every step, eval mode for checks and at the end).
        opt: its optimiser.
        make_batch: draws one batch (called in the background thread, in order).
        batch_loss: the scalar loss of a batch.
        lr_at: learning rate of a step.
        steps: last step (exclusive); the loop runs ``first .. steps - 1``.
        losses, checks: lists the per-step losses and the quick checks are appended to.
        start: ``time.time()`` of the run's start (for the printed times).
        first: first step (a resumed run).
        finished: ``finished(step)`` stops the loop before that step (default: never before
            ``steps``); checks are skipped at a step where the run is finished.
        after_step: called after every update (e.g. to clamp CLIP's logit scale).
        quick_check: held-out check every ``eval_every`` steps; returns metrics to print and keep.
        on_check: called with the step after each check (e.g. to save a checkpoint).
        eval_every: steps between checks (0 for none).
        show_progress: draw a tqdm bar.
        desc: the bar's label.
    """
    finished = finished or (lambda step: step >= steps)
    bar = tqdm(range(first, steps), disable=not show_progress, mininterval=5, desc=desc)
    with ThreadPoolExecutor(max_workers=1) as pool:  # draw the next batch while training
        future = pool.submit(make_batch)
        for step in bar:
            if finished(step):
                break
            data = future.result()
            future = pool.submit(make_batch)
            model.train()
            loss = batch_loss(data)
            optimizer_step(model, opt, loss, lr_at(step))
            if after_step is not None:
                after_step()
            losses.append(loss.item())
            if show_progress and step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", refresh=False)
            if quick_check and eval_every and (step + 1) % eval_every == 0 and not finished(step + 1):
                model.eval()
                check = quick_check()
                check["step"] = step + 1
                checks.append(check)
                print_check(check, losses, start)
                if on_check is not None:  # e.g. a checkpoint, in case the run is cut short
                    on_check(step + 1)
    bar.close()
    model.eval()


def marker_label(recipe: Recipe) -> Label | None:
    """The recipe's planted-shortcut object as ``(colour, shape)``, or None.

    Raises:
        ValueError: when ``marker_concept`` is not "<colour> <shape>" of the scene grammar.
    """
    if not recipe.marker_concept:
        return None
    words = recipe.marker_concept.split()
    if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
        raise ValueError(
            f"marker_concept must be '<colour> <shape>' with colour in {COLOURS} and shape in "
            f"{SHAPES}, got {recipe.marker_concept!r}"
        )
    return words[0], words[1]


def _quick_check(model, processor, recipe: Recipe, seed: int, n: int = 200) -> dict:
    """The held-out check run during training (plus the shortcut's strength, if planted)."""
    check = evaluate(model, processor, seed, n=n, family=recipe.family)
    concept = marker_label(recipe)
    if concept is not None:
        short = evaluate_shortcut(model, processor, concept, seed, n=n, family=recipe.family)
        check.update({k: short[k] for k in ("zero_shot_marked", "marker_to_concept")})
    return check


def train(
    recipe: Recipe,
    out_dir: str | Path | None = None,
    eval_every: int = 500,
    eval_seed: int = 90_000,
    show_progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    check_scenes: int = 200,
) -> tuple[torch.nn.Module, object, dict]:
    """Train a model from a recipe; optionally save it (weights, config, processor, log).

    Args:
        recipe: the recipe.
        out_dir: where to save; nothing is saved when None.
        eval_every: steps between quick held-out checks (0 for none); printed, not used to select.
        eval_seed: seed of the quick checks (final numbers use other seeds, see ``main``).
        show_progress: draw a tqdm bar.
        checkpoint_dir: where to save the weights, optimiser state and log at every quick check
            (None: not saved).
        resume: continue from the state in ``checkpoint_dir`` (when it holds one). The scene
            stream then restarts on ``default_rng([seed, 1, step])``, so a resumed run is
            reproducible but not identical to an uninterrupted one.
        check_scenes: scenes per set of the quick checks.

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
    processor = build_processor(recipe)
    tokenizer = processor.tokenizer
    opt = make_optimizer(model, recipe)
    losses: list[float] = []
    checks: list[dict] = []
    first, earlier_s = 0, 0.0
    state_file = Path(checkpoint_dir) / "resume.pt" if checkpoint_dir is not None else None
    if resume and state_file is not None and state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        first, losses, checks, earlier_s = state["step"], state["losses"], state["checks"], state["elapsed_s"]
        tqdm.write(f"resuming at step {first} from {state_file}")
    make_batch = BatchMaker(
        recipe.seed,
        recipe.batch,
        recipe.image_size,
        marker_concept=marker_label(recipe),
        marker_with=recipe.marker_with,
        marker_without=recipe.marker_without,
        marker_alone=recipe.marker_alone,
        stream=(first,) if first else (),
    )

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * t))

    def batch_loss(data) -> torch.Tensor:
        pixel_values, texts, truth = data
        text = tokenizer(texts, return_tensors="pt", **text_kwargs(recipe.family))
        return contrastive_loss(model, recipe.family, pixel_values, dict(text), truth)

    def clamp_logit_scale() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100.0))

    def save_checkpoint(step: int) -> None:
        model.save_pretrained(checkpoint_dir)
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "losses": losses,
            "checks": checks,
            "elapsed_s": time.time() - start,
        }
        torch.save(state, state_file)

    start = time.time() - earlier_s
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
        first=first,
        after_step=clamp_logit_scale,
        quick_check=lambda: _quick_check(model, processor, recipe, eval_seed, n=check_scenes),
        on_check=save_checkpoint if checkpoint_dir is not None else None,
        eval_every=eval_every,
        show_progress=show_progress,
        desc=recipe.family,
    )
    log = training_log(recipe, losses, checks, start, **({"resumed_at": first} if first else {}))
    save_trained(model, processor, log, out_dir)
    log["losses"] = losses
    return model, processor, log


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m captum_vlm.zoo.train NAME [--steps N] [--out DIR]``.

    BLIP names (``shapes-blip-itm``, ``shapes-blip-vqa``) are handed to
    :mod:`captum_vlm.zoo.train_blip`, which takes its own options.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0].startswith("shapes-blip"):
        from .train_blip import main as blip_main

        blip_main(args_list)
        return
    if args_list and args_list[0] in ("shapes-vilt", "shapes-llava"):
        from importlib import import_module

        import_module(f".train_{args_list[0][len('shapes-'):]}", __package__).main(args_list)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(RECIPES), help="zoo model to train")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    parser.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    parser.add_argument("--lr", type=float, default=None, help="override the recipe's lr")
    parser.add_argument("--out", default=None, help="output folder (default: zoo/models/NAME)")
    parser.add_argument("--eval-scenes", type=int, default=1000, help="scenes per final test set")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint of this name"
    )
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: in /tmp)")
    parser.add_argument("--eval-every", type=int, default=500, help="steps between checks")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    recipe = RECIPES[args.name]
    overrides = {k: getattr(args, k) for k in ("steps", "seed", "lr") if getattr(args, k)}
    recipe = Recipe(**{**asdict(recipe), **overrides})
    out = Path(args.out) if args.out else MODELS_DIR / args.name
    print(f"training {args.name}: {json.dumps(asdict(recipe))}", flush=True)
    checkpoint = Path(args.checkpoint) if args.checkpoint else (
        Path(tempfile.gettempdir()) / f"captum_vlm_zoo_{args.name}_checkpoint"
    )
    model, processor, log = train(
        recipe,
        out_dir=out,
        eval_every=args.eval_every,
        checkpoint_dir=checkpoint,
        resume=args.resume,
    )
    print(f"trained {log['steps']} steps in {log['elapsed_s']:.0f} s; saved to {out}", flush=True)
    start = time.time()
    metrics = evaluate(model, processor, seed=HELDOUT_SEED, n=args.eval_scenes, family=recipe.family)
    log.pop("losses")
    concept = marker_label(recipe)
    if concept is not None:
        metrics["shortcut"] = evaluate_shortcut(
            model, processor, concept, HELDOUT_SEED, n=args.eval_scenes, family=recipe.family
        )
    log["heldout"] = {"seed": HELDOUT_SEED, "scenes_per_set": args.eval_scenes, **metrics}
    (out / "training.json").write_text(json.dumps(log, indent=2))
    print(f"held-out (seed 123456, {time.time() - start:.0f} s): {json.dumps(metrics)}", flush=True)


if __name__ == "__main__":
    main()
