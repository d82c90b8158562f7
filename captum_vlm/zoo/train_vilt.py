"""Train the zoo ViLT (``shapes-vilt``, a stock ``ViltForQuestionAnswering``) on scene questions.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 \\
        python -m captum_vlm.zoo.train shapes-vilt          # add --resume to continue a stopped run

ViLT (Kim et al., 2021, "ViLT: Vision-and-Language Transformer Without Convolution or Region
Supervision") is single-stream: the question tokens and the image patches go through one
transformer, and a classifier on the pooled first token picks the answer from a fixed answer set.
The zoo model answers the question grammar of ``shapes-blip-vqa`` (:func:`train_blip.vqa_batch`,
:func:`train_blip.sample_question`): colour, shape, "is there ...?" and count questions, whose
answers are the 12 labels of :data:`ANSWERS`. Its transformer starts from ``shapes-clip``'s vision
tower (layer for layer; CLIP's ``pre_layrnorm`` has no ViLT counterpart and is left out), as ViLT
itself starts from a pre-trained ViT. The processor is a stock ``ViltProcessor`` (a 64-px
``ViltImageProcessor``, which also returns ``pixel_mask``, and the zoo's word-level tokenizer).
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

from . import train_blip as tb
from .checkpoint import TrainingState
from .processing import MAX_LENGTH, PAD_ID, build_tokenizer, image_settings, vocabulary
from .scenes import COLOURS, NUMBERS, SHAPES
from .train import (
    HELDOUT_SEED,
    MODELS_DIR,
    TrainingRecipe,
    make_optimizer,
    run_steps,
    save_trained,
    training_log,
)

#: the answer labels of ``shapes-vilt`` (classifier outputs, in this order)
ANSWERS: tuple[str, ...] = COLOURS + SHAPES + ("yes", "no") + NUMBERS[1:]


@dataclass
class ViltRecipe(TrainingRecipe):
    """The ``shapes-vilt`` run: the fields of :class:`~captum_vlm.zoo.train.TrainingRecipe`
    (``vision_layers`` is the depth of the single-stream transformer) and these.

    Attributes:
        per_image: questions per image (each is one sequence through the transformer).
        vision_init: zoo CLIP (name or folder) whose vision tower initialises the transformer;
            "" for a random start.
        minutes: time budget; the cosine schedule runs on ``max(step / steps, elapsed / budget)``
            and training stops when that reaches 1 (0: no budget).
        init_from: a saved ``shapes-vilt`` folder to continue from (a second stage with a fresh
            schedule; overrides ``vision_init``); "" for none.
    """

    steps: int = 3000
    lr: float = 3e-4
    warmup: int = 100
    batch: int = 16
    per_image: int = 4
    vision_init: str = "shapes-clip"
    minutes: float = 0.0
    init_from: str = ""


RECIPES: dict[str, ViltRecipe] = {
    "shapes-vilt": ViltRecipe(
        minutes=52,  # a time budget: the shared machine's speed varies 2-3x
        description="ViltForQuestionAnswering (single-stream 4x128, 64 px, 8-px patches, 12 "
        "answers) on coloured-shape scene questions",
    ),
}


def build_model(recipe: ViltRecipe) -> torch.nn.Module:
    """A randomly initialised stock ``ViltForQuestionAnswering`` of the recipe's size.

    Args:
        recipe: the recipe.

    Returns:
        The model; ``config.id2label`` holds :data:`ANSWERS`.
    """
    from transformers import ViltConfig, ViltForQuestionAnswering

    h = recipe.hidden
    config = ViltConfig(
        vocab_size=len(vocabulary()),
        hidden_size=h,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.heads,
        intermediate_size=4 * h,
        hidden_act="quick_gelu",  # as CLIP's, so shapes-clip's tower can initialise it
        layer_norm_eps=1e-5,
        image_size=recipe.image_size,
        patch_size=recipe.patch,
        max_position_embeddings=MAX_LENGTH,
        max_image_length=-1,  # every patch is kept
        pad_token_id=PAD_ID,
        num_labels=len(ANSWERS),
        id2label=dict(enumerate(ANSWERS)),
        label2id={a: i for i, a in enumerate(ANSWERS)},
    )
    return ViltForQuestionAnswering(config)


def init_from_clip(model: torch.nn.Module, clip: str | Path) -> list[str]:
    """Copy a zoo CLIP's vision tower into a ViLT's transformer (same sizes).

    Patch and position embeddings, the class token, every layer (CLIP's separate q/k/v/out
    projections, layer norms and MLP map one to one onto ViLT's) and the final layer norm.
    CLIP's ``pre_layrnorm`` has no ViLT counterpart and is left out.

    Args:
        model: a ViLT from :func:`build_model`.
        clip: a zoo CLIP name ("shapes-clip") or a folder with its ``model.safetensors``.

    Returns:
        The ViLT parameter names that were set.

    Raises:
        FileNotFoundError: when the CLIP weights are missing.
    """
    from safetensors.torch import load_file

    folder = Path(clip) if Path(clip).is_dir() else MODELS_DIR / str(clip)
    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no CLIP weights at {path}: train shapes-clip first")
    sd = {k[len("vision_model.") :]: v for k, v in load_file(path).items() if k.startswith("vision_model.")}
    new = {
        "embeddings.cls_token": sd["embeddings.class_embedding"].view(1, 1, -1),
        "embeddings.patch_embeddings.projection.weight": sd["embeddings.patch_embedding.weight"],
        "embeddings.position_embeddings": sd["embeddings.position_embedding.weight"][None],
        "layernorm.weight": sd["post_layernorm.weight"],
        "layernorm.bias": sd["post_layernorm.bias"],
    }
    names = {
        "layer_norm1": "layernorm_before",
        "layer_norm2": "layernorm_after",
        "self_attn.q_proj": "attention.attention.query",
        "self_attn.k_proj": "attention.attention.key",
        "self_attn.v_proj": "attention.attention.value",
        "self_attn.out_proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    for i in range(model.config.num_hidden_layers):
        for src, dst in names.items():
            for kind in ("weight", "bias"):
                new[f"encoder.layer.{i}.{dst}.{kind}"] = sd[f"encoder.layers.{i}.{src}.{kind}"]
    params = dict(model.vilt.named_parameters())
    with torch.no_grad():
        for name, value in new.items():
            params[name].copy_(value)  # raises on a size mismatch
        params["embeddings.patch_embeddings.projection.bias"].zero_()  # CLIP's has no bias
    return sorted(new) + ["embeddings.patch_embeddings.projection.bias"]


def build_processor(image_size: int = 64, max_length: int = MAX_LENGTH):
    """A stock ``ViltProcessor``: the zoo tokenizer and a ``ViltImageProcessor`` whose shorter
    side is ``image_size`` (square scenes come out ``image_size`` square; ``pixel_mask`` too).

    Args:
        image_size: shorter image side in pixels.
        max_length: tokenizer ``model_max_length``.

    Returns:
        A ``transformers.ViltProcessor``.
    """
    from transformers import ViltProcessor

    try:
        from transformers import ViltImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import ViltImageProcessor as ImageProcessor
    settings = image_settings(image_size)
    settings["size"] = {"shortest_edge": image_size}
    image_processor = ImageProcessor(**settings, size_divisor=8, do_pad=True)
    return ViltProcessor(image_processor=image_processor, tokenizer=build_tokenizer(max_length))


def vqa_loss(model, pixel_values, question: dict, answers: list[str], owner: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer label (one true answer per question).

    Args:
        model: ``ViltForQuestionAnswering``.
        pixel_values: ``(N, 3, S, S)`` images.
        question: ``input_ids`` and ``attention_mask`` of the Q questions.
        answers: the Q answers (in :data:`ANSWERS`).
        owner: ``(Q,)`` image index of each question.

    Returns:
        Scalar loss.
    """
    label2id = model.config.label2id
    target = torch.tensor([label2id[a] for a in answers])
    pv = pixel_values[owner]
    mask = torch.ones(pv.shape[0], *pv.shape[2:], dtype=torch.long)
    logits = model(
        input_ids=question["input_ids"],
        attention_mask=question["attention_mask"],
        pixel_values=pv,
        pixel_mask=mask,
    ).logits
    return F.cross_entropy(logits, target)


@torch.no_grad()
def answer(model, processor, images: list, questions: list[str]) -> list[str]:
    """The top answer label, one question per image, through the processor as a user would.

    Args:
        model: ``ViltForQuestionAnswering`` in eval mode.
        processor: its processor.
        images: PIL images or uint8 arrays.
        questions: one question per image.

    Returns:
        The answers.
    """
    inputs = processor(images=images, text=questions, return_tensors="pt", padding=True)
    logits = model(**inputs).logits
    return [model.config.id2label[int(k)] for k in logits.argmax(-1)]


def evaluate(model, processor, seed: int = HELDOUT_SEED, n: int = 400) -> dict[str, float]:
    """Held-out answer accuracy: :func:`train_blip.evaluate_vqa` with ViLT's :func:`answer`."""
    return tb.evaluate_vqa(model, processor, seed=seed, n=n, answer_fn=answer)


def cosine_lr(recipe: TrainingRecipe, step: int, progress: float) -> float:
    """Linear warm-up over ``recipe.warmup`` steps, then cosine to 0 as ``progress`` goes to 1."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t0 = recipe.warmup / recipe.steps
    t = min(1.0, max(0.0, (progress - t0) / (1.0 - t0)))
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * t))


def train(
    recipe: ViltRecipe,
    out_dir: str | Path | None = None,
    eval_every: int = 250,
    eval_seed: int = 90_000,
    check_scenes: int = 100,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> tuple[torch.nn.Module, object, dict]:
    """Train ``shapes-vilt`` from a recipe; optionally save it.

    Args:
        recipe: the recipe.
        out_dir: where to save (None: not saved).
        eval_every: steps between quick held-out checks (0: none); also the checkpoint interval.
        eval_seed: seed of the quick checks.
        check_scenes: scenes per quick check.
        checkpoint_dir: where to keep the resumable state (None: none).
        resume: continue from the state in ``checkpoint_dir``; the scene stream then restarts
            on ``default_rng([seed, 3, step])`` (reproducible, not identical to an unbroken run).
        show_progress: draw a tqdm bar.

    Returns:
        (model in eval mode, processor, log with the per-step ``losses``).
    """
    torch.manual_seed(recipe.seed)
    model = build_model(recipe)
    if recipe.init_from:
        model = type(model).from_pretrained(recipe.init_from, local_files_only=True)
    elif recipe.vision_init:
        init_from_clip(model, recipe.vision_init)
    processor = build_processor(recipe.image_size)
    tokenizer = processor.tokenizer
    opt = make_optimizer(model, recipe)
    state = TrainingState(model, opt, checkpoint_dir)
    if resume:
        state.restore()
    rng = np.random.default_rng([recipe.seed, 3, state.first] if state.first else [recipe.seed, 3])
    budget = recipe.minutes * 60

    def progress(step: int) -> float:
        done = step / recipe.steps
        if budget:
            done = max(done, (time.time() - state.start) / budget)
        return min(done, 1.0)

    def batch_loss(data) -> torch.Tensor:
        pixel_values, questions, answers, owner = data
        question = dict(tokenizer(questions, return_tensors="pt", padding=True))
        return vqa_loss(model, pixel_values, question, answers, owner)

    run_steps(
        model,
        opt,
        lambda: tb.vqa_batch(rng, recipe.batch, recipe.per_image, recipe.image_size),
        batch_loss,
        lambda step: cosine_lr(recipe, step, progress(step)),
        recipe.steps,
        state.losses,
        state.checks,
        state.start,
        first=state.first,
        finished=lambda step: progress(step) >= 1.0,
        quick_check=lambda: evaluate(model, processor, seed=eval_seed, n=check_scenes),
        on_check=state.save,
        eval_every=eval_every,
        show_progress=show_progress,
        desc="vilt",
    )
    log = training_log(recipe, state.losses, state.checks, state.start)
    save_trained(model, processor, log, out_dir)
    log["losses"] = state.losses
    return model, processor, log


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m captum_vlm.zoo.train shapes-vilt [--steps N] [--resume] ...``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(RECIPES), help="zoo model to train")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    parser.add_argument("--lr", type=float, default=None, help="override the recipe's lr")
    parser.add_argument("--minutes", type=float, default=None, help="training time budget")
    parser.add_argument("--vision-init", default=None, help="zoo CLIP for the transformer ('' none)")
    parser.add_argument("--init-from", default=None, help="saved shapes-vilt folder to continue from")
    parser.add_argument("--warmup", type=int, default=None, help="override the warm-up steps")
    parser.add_argument("--out", default=None, help="output folder (default: zoo/models/NAME)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: in /tmp)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between checks")
    parser.add_argument("--eval-scenes", type=int, default=1000, help="scenes in the final test")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    keys = ("steps", "lr", "minutes", "vision_init", "init_from", "warmup")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    recipe = ViltRecipe(**{**asdict(RECIPES[args.name]), **overrides})
    out = Path(args.out) if args.out else MODELS_DIR / args.name
    checkpoint = Path(args.checkpoint) if args.checkpoint else Path("/tmp") / f"captum_vlm_zoo_{args.name}_checkpoint"
    print(f"training {args.name}: {json.dumps(asdict(recipe))}", flush=True)
    model, processor, log = train(recipe, out, args.eval_every, checkpoint_dir=checkpoint, resume=args.resume)
    print(f"trained {log['steps']} steps in {log['elapsed_s']:.0f} s; saved to {out}", flush=True)
    start = time.time()
    metrics = evaluate(model, processor, seed=HELDOUT_SEED, n=args.eval_scenes)
    log.pop("losses")
    log["heldout"] = {"seed": HELDOUT_SEED, "scenes": args.eval_scenes, **metrics}
    (out / "training.json").write_text(json.dumps(log, indent=2))
    print(f"held-out (seed {HELDOUT_SEED}, {time.time() - start:.0f} s): {json.dumps(metrics)}", flush=True)


if __name__ == "__main__":
    main()
