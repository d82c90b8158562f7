"""Train the zoo LLaVA (``shapes-llava``, a stock ``LlavaForConditionalGeneration``).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 \\
        python -m captum_vlm.zoo.train shapes-llava         # add --resume to continue a stopped run

LLaVA (Liu et al., 2023, "Visual Instruction Tuning"): a CLIP vision tower, a two-layer MLP
projector and a decoder-only language model; the projected patch features of the vision tower's
penultimate layer (CLS dropped, ``vision_feature_select_strategy="default"``) replace the image
placeholder tokens of the prompt. The zoo model takes its vision tower from ``shapes-clip``, has a
small stock Llama decoder (``LlamaConfig``) and is trained with the next-token loss on the answer
only, on the question grammar of ``shapes-blip-vqa`` and, on a plain prompt, on captions.

Prompts follow the LLaVA-1.5 conversation format, which the processor's chat template produces::

    USER: <image>
    what color is the circle? ASSISTANT: red[EOS]

``LlavaProcessor`` expands ``<image>`` into one placeholder per patch (64 for a 64-px image and
8-px patches: ``patch_size=8``, ``num_additional_image_tokens=1`` for the CLS token and the
``"default"`` strategy that drops it, as hub LLaVA-1.5 checkpoints are set up).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import train_blip as tb
from .checkpoint import TrainingState
from .processing import BOS_ID, EOS_ID, PAD_ID, build_tokenizer, image_settings
from .scenes import caption_for, make_scene
from .train import (
    HELDOUT_SEED,
    MODELS_DIR,
    TrainingRecipe,
    make_optimizer,
    run_steps,
    save_trained,
    training_log,
)
from .train_vilt import cosine_lr

IMAGE_TOKEN = "<image>"
CAPTION_REQUEST = "describe the image."
#: LLaVA-1.5's conversation format ("USER: <image>\n<text> ASSISTANT:"), rendering a message's
#: images and texts in the order given (so a question can also come before the image)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
MAX_TEXT = 128  # Llama positions: 64 image tokens + prompt + answer


@dataclass
class LlavaRecipe(TrainingRecipe):
    """The ``shapes-llava`` run: the fields of :class:`~captum_vlm.zoo.train.TrainingRecipe`
    (``text_layers`` is the Llama depth) and these.

    Attributes:
        per_image: questions per image; one caption request is added to each image with
            probability ``caption_rate``.
        caption_rate: share of images that are also asked for their caption.
        vision_init: zoo CLIP whose vision tower (and vision config) is used; "" for a random
            tower of the recipe's size.
        minutes: time budget (see :class:`~captum_vlm.zoo.train_vilt.ViltRecipe`; 0: none).
        image_first: the image placeholder before the request (LLaVA-1.5's order) or after it
            (then the image tokens can attend to the question in the causal LM).
        init_from: a saved ``shapes-llava`` folder to continue from (a second stage with a fresh
            schedule); "" to start from ``vision_init``.
        text_scenes: text-only scenes per batch (:func:`text_batch`), each asked ``per_image``
            questions with its caption in place of the image, so that the decoder learns to match
            the words of a question against the words of the content (the step a pretrained
            language model brings to real LLaVA); 0: none.
    """

    steps: int = 2500
    lr: float = 5e-4
    warmup: int = 100
    batch: int = 16
    per_image: int = 3
    text_layers: int = 3
    caption_rate: float = 0.5
    vision_init: str = "shapes-clip"
    minutes: float = 0.0
    image_first: bool = True
    init_from: str = ""
    text_scenes: int = 0


RECIPES: dict[str, LlavaRecipe] = {
    "shapes-llava": LlavaRecipe(
        minutes=52,  # a time budget: the shared machine's speed varies 2-3x
        text_scenes=16,  # without them "is there a <shape>?" stayed at chance (0.53 after 3424 steps)
        description="LlavaForConditionalGeneration (shapes-clip vision tower, MLP projector, "
        "Llama 3x128) answering questions about and captioning coloured-shape scenes",
    ),
}


def prompt(question: str, image_first: bool = True) -> str:
    """The chat-template prompt for one request with one image (ends with "ASSISTANT:").

    Args:
        question: the request.
        image_first: "USER: <image>\\n<question> ASSISTANT:" (LLaVA-1.5's order), else
            "USER: <question> <image>\\nASSISTANT:".
    """
    if image_first:
        return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"
    return f"USER: {question} {IMAGE_TOKEN}\nASSISTANT:"


def build_processor(image_size: int = 64, patch: int = 8):
    """A stock ``LlavaProcessor``: the zoo's 64-px CLIP image processor, the zoo tokenizer with
    the chat words and ``<image>`` (BOS only, left padding, as Llama tokenizers) and
    :data:`CHAT_TEMPLATE`.

    Args:
        image_size: image side in pixels.
        patch: the vision tower's patch size.

    Returns:
        A ``transformers.LlavaProcessor``.
    """
    from transformers import LlavaProcessor

    from .processing import _image_processor_class

    image_processor = _image_processor_class()(
        **image_settings(image_size),
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size},
    )
    tokenizer = build_tokenizer(
        MAX_TEXT,
        extra_words=["user", "assistant", ":", "describe"],
        special_tokens=[IMAGE_TOKEN],
        add_eos=False,
        padding_side="left",
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_model(recipe: LlavaRecipe, processor) -> torch.nn.Module:
    """A stock ``LlavaForConditionalGeneration``; the vision tower from ``recipe.vision_init``.

    Args:
        recipe: the recipe.
        processor: from :func:`build_processor` (vocabulary size, image token id).

    Returns:
        The model.
    """
    from safetensors.torch import load_file
    from transformers import (
        CLIPConfig,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    h = recipe.hidden
    folder = None
    if recipe.vision_init:
        folder = Path(recipe.vision_init)
        folder = folder if folder.is_dir() else MODELS_DIR / recipe.vision_init
        vision = CLIPConfig.from_pretrained(folder, local_files_only=True).vision_config
    else:
        vision = CLIPVisionConfig(
            hidden_size=h, intermediate_size=4 * h, num_hidden_layers=recipe.vision_layers,
            num_attention_heads=recipe.heads, image_size=recipe.image_size, patch_size=recipe.patch,
        )
    tokenizer = processor.tokenizer
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=h,
        intermediate_size=4 * h,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=MAX_TEXT,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=processor.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(recipe.image_size // recipe.patch) ** 2,
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    if folder is not None:
        sd = {k: v for k, v in load_file(folder / "model.safetensors").items() if k.startswith("vision_model.")}
        tower = model.model.vision_tower
        if not hasattr(tower, "vision_model"):  # transformers builds the bare CLIPVisionTransformer
            sd = {k[len("vision_model.") :]: v for k, v in sd.items()}
        tower.load_state_dict(sd, strict=True)  # raises on any mismatch
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    return model


def llava_batch(rng: np.random.Generator, recipe: LlavaRecipe):
    """One batch: :func:`train_blip.vqa_batch` questions plus caption requests.

    Returns:
        ``pixel_values`` ``(N, 3, S, S)``, the request texts, their target texts and
        ``owner`` ``(Q,)`` (the image of each request).
    """
    objects = [tb._random_objects(rng, int(rng.choice([1, 2, 3]))) for _ in range(recipe.batch)]
    requests, targets, owner = [], [], []
    for i, obj in enumerate(objects):
        if rng.random() < recipe.caption_rate:
            requests.append(CAPTION_REQUEST)
            targets.append(caption_for([obj[j] for j in rng.permutation(len(obj))]))
            owner.append(i)
        for question, answer in _questions(rng, obj, recipe.per_image):
            requests.append(question)
            targets.append(answer)
            owner.append(i)
    images = [tb._draw(rng, obj, recipe.image_size) for obj in objects]
    return tb.images_to_pixel_values(images), requests, targets, torch.tensor(owner)


def text_batch(rng: np.random.Generator, recipe: LlavaRecipe) -> tuple[list[str], list[str], list[str]]:
    """Text-only requests: ``recipe.text_scenes`` random scenes, each described by its caption
    (objects in random order) and asked ``recipe.per_image`` questions of the
    :func:`train_blip.sample_question` grammar, e.g. "a red circle and a blue square" /
    "is there a square?" -> "yes".

    Returns:
        The requests, their target texts and the captions that stand in for the image
        (``contexts`` of :func:`training_ids`).
    """
    requests, targets, contexts = [], [], []
    for _ in range(recipe.text_scenes):
        obj = tb._random_objects(rng, int(rng.choice([1, 2, 3])))
        described = caption_for([obj[j] for j in rng.permutation(len(obj))])
        for question, answer in _questions(rng, obj, recipe.per_image):
            requests.append(question)
            targets.append(answer)
            contexts.append(described)
    return requests, targets, contexts


def _questions(rng: np.random.Generator, objects, count: int) -> list[tuple[str, str]]:
    """``count`` ``(question, answer)`` pairs about ``objects``, each of a random type of
    :data:`train_blip.QUESTION_TYPES` (a type the scene has no question of is drawn again)."""
    pairs = []
    while len(pairs) < count:
        qa = tb.sample_question(rng, objects, str(rng.choice(tb.QUESTION_TYPES)))
        if qa is not None:
            pairs.append(qa)
    return pairs


def training_ids(
    processor,
    requests: list[str],
    targets: list[str],
    n_image: int,
    image_first: bool = True,
    contexts: list[str] | None = None,
):
    """Token ids, attention mask and labels (-100 except on the target and its EOS) of
    ``prompt(request) + " " + target + EOS``, right-padded.

    Args:
        processor: from :func:`build_processor`.
        requests, targets: the texts.
        n_image: placeholders per image (the processor's expansion of ``<image>``).
        image_first: the prompt order (:func:`prompt`).
        contexts: for text-only rows (:func:`text_batch`), the text put where the image
            placeholders would be (one per request); None: image rows.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``, each ``(Q, L)``.
    """
    tok = processor.tokenizer
    fill = contexts if contexts is not None else [IMAGE_TOKEN * n_image] * len(requests)
    expanded = [prompt(r, image_first).replace(IMAGE_TOKEN, f) for r, f in zip(requests, fill)]
    heads = tok(expanded).input_ids
    tails = tok(targets, add_special_tokens=False).input_ids
    rows = [h + t + [EOS_ID] for h, t in zip(heads, tails)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (h, row) in enumerate(zip(heads, rows)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(h) : len(row)] = torch.tensor(row[len(h) :])
    return ids, mask, labels


def llava_loss(model, pixel_values, ids, mask, labels, owner) -> torch.Tensor:
    """The next-token loss of ``model(pixel_values=pixel_values[owner], input_ids=ids, ...)``
    with the vision tower run once per image (not once per request).

    Returns:
        Scalar loss.
    """
    feats = model.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    ).pooler_output
    feats = torch.stack(list(feats))[owner]  # (Q, patches, hidden)
    embeds = model.get_input_embeddings()(ids)
    where = (ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(where, feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
    return model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss


@torch.no_grad()
def generate_text(
    model, processor, images: list, requests: list[str], max_new_tokens: int = 4, image_first: bool = True
) -> list[str]:
    """Greedy replies through the processor and ``generate``, as a user would; requests of
    equal token length are batched together (no padding).

    Args:
        model: ``LlavaForConditionalGeneration`` in eval mode.
        processor: its processor.
        images: PIL images or uint8 arrays.
        requests: one question (or :data:`CAPTION_REQUEST`) per image.
        max_new_tokens: reply length limit.
        image_first: the prompt order (:func:`prompt`).

    Returns:
        The decoded replies.
    """
    texts = [prompt(r, image_first) for r in requests]
    lengths = [len(processor.tokenizer(t).input_ids) for t in texts]
    out = [""] * len(texts)
    for length in sorted(set(lengths)):
        idx = [i for i, k in enumerate(lengths) if k == length]
        inputs = processor(images=[images[i] for i in idx], text=[texts[i] for i in idx], return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = ids[:, inputs["input_ids"].shape[1] :]
        for i, reply in zip(idx, processor.batch_decode(new, skip_special_tokens=True)):
            out[i] = reply.strip()
    return out


def answer(model, processor, images: list, questions: list[str], image_first: bool = True) -> list[str]:
    """Greedy answers (at most 4 tokens), for :func:`train_blip.evaluate_vqa`."""
    return generate_text(model, processor, images, questions, 4, image_first)


def caption(model, processor, images: list, max_new_tokens: int = 20, image_first: bool = True) -> list[str]:
    """Greedy captions on the plain caption prompt."""
    return generate_text(model, processor, images, [CAPTION_REQUEST] * len(images), max_new_tokens, image_first)


def evaluate(
    model, processor, seed: int = HELDOUT_SEED, n: int = 400, image_first: bool | None = None
) -> dict[str, float]:
    """Held-out answer accuracy (:func:`train_blip.evaluate_vqa`) and caption exact object set
    (``caption_object_set``, as :func:`train_blip.evaluate_caption`) on ``n // 2`` scenes.

    ``image_first`` is the prompt order (:func:`prompt`); None: the shipped recipe's."""
    if image_first is None:
        image_first = RECIPES["shapes-llava"].image_first
    res = tb.evaluate_vqa(model, processor, seed=seed, n=n, answer_fn=partial(answer, image_first=image_first))
    scenes = [make_scene(seed + i) for i in range(max(1, n // 2))]
    named = [tb.caption_objects(t) for t in caption(model, processor, [s.image for s in scenes], image_first=image_first)]
    res["caption_object_set"] = float(np.mean([m == set(s.labels) for m, s in zip(named, scenes)]))
    return res


def train(
    recipe: LlavaRecipe,
    out_dir: str | Path | None = None,
    eval_every: int = 250,
    eval_seed: int = 90_000,
    check_scenes: int = 100,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> tuple[torch.nn.Module, object, dict]:
    """Train ``shapes-llava`` from a recipe; optionally save it (arguments as
    :func:`~captum_vlm.zoo.train_vilt.train`; a resumed scene stream is ``[seed, 4, step]``).

    Returns:
        (model in eval mode, processor, log with the per-step ``losses``).
    """
    torch.manual_seed(recipe.seed)
    processor = build_processor(recipe.image_size, recipe.patch)
    model = build_model(recipe, processor)
    if recipe.init_from:
        model = type(model).from_pretrained(recipe.init_from, local_files_only=True)
    n_image = (recipe.image_size // recipe.patch) ** 2
    opt = make_optimizer(model, recipe)
    state = TrainingState(model, opt, checkpoint_dir)
    if resume:
        state.restore()
    rng = np.random.default_rng([recipe.seed, 4, state.first] if state.first else [recipe.seed, 4])
    budget = recipe.minutes * 60

    def progress(step: int) -> float:
        done = step / recipe.steps
        if budget:
            done = max(done, (time.time() - state.start) / budget)
        return min(done, 1.0)

    def make_batch():
        images = llava_batch(rng, recipe)
        return images, text_batch(rng, recipe) if recipe.text_scenes else None

    def batch_loss(data) -> torch.Tensor:
        (pixel_values, requests, targets, owner), texts = data
        ids, mask, labels = training_ids(processor, requests, targets, n_image, recipe.image_first)
        loss = llava_loss(model, pixel_values, ids, mask, labels, owner)
        if texts is not None:  # text-only rows: the plain language-model loss, added
            ids, mask, labels = training_ids(processor, *texts[:2], n_image, recipe.image_first, texts[2])
            loss = loss + model(input_ids=ids, attention_mask=mask, labels=labels).loss
        return loss

    run_steps(
        model,
        opt,
        make_batch,
        batch_loss,
        lambda step: cosine_lr(recipe, step, progress(step)),
        recipe.steps,
        state.losses,
        state.checks,
        state.start,
        first=state.first,
        finished=lambda step: progress(step) >= 1.0,
        quick_check=lambda: evaluate(model, processor, eval_seed, check_scenes, recipe.image_first),
        on_check=state.save,
        eval_every=eval_every,
        show_progress=show_progress,
        desc="llava",
    )
    log = training_log(recipe, state.losses, state.checks, state.start)
    save_trained(model, processor, log, out_dir)
    log["losses"] = state.losses
    return model, processor, log


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m captum_vlm.zoo.train shapes-llava [--steps N] [--resume] ...``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(RECIPES), help="zoo model to train")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    parser.add_argument("--lr", type=float, default=None, help="override the recipe's lr")
    parser.add_argument("--minutes", type=float, default=None, help="training time budget")
    parser.add_argument("--vision-init", default=None, help="zoo CLIP for the vision tower ('' none)")
    parser.add_argument("--out", default=None, help="output folder (default: zoo/models/NAME)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: in /tmp)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between checks")
    parser.add_argument("--eval-scenes", type=int, default=1000, help="scenes in the final test")
    parser.add_argument("--image-last", action="store_true", help="put the image after the request")
    parser.add_argument("--init-from", default=None, help="saved shapes-llava folder to continue from")
    parser.add_argument("--warmup", type=int, default=None, help="override the warm-up steps")
    parser.add_argument("--text-scenes", type=int, default=None, help="text-only scenes per batch")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    keys = ("steps", "lr", "minutes", "vision_init", "init_from", "warmup", "text_scenes")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.image_last:
        overrides["image_first"] = False
    recipe = LlavaRecipe(**{**asdict(RECIPES[args.name]), **overrides})
    out = Path(args.out) if args.out else MODELS_DIR / args.name
    checkpoint = Path(args.checkpoint) if args.checkpoint else Path("/tmp") / f"captum_vlm_zoo_{args.name}_checkpoint"
    print(f"training {args.name}: {json.dumps(asdict(recipe))}", flush=True)
    model, processor, log = train(recipe, out, args.eval_every, checkpoint_dir=checkpoint, resume=args.resume)
    print(f"trained {log['steps']} steps in {log['elapsed_s']:.0f} s; saved to {out}", flush=True)
    start = time.time()
    metrics = evaluate(model, processor, HELDOUT_SEED, args.eval_scenes, recipe.image_first)
    log.pop("losses")
    log["heldout"] = {"seed": HELDOUT_SEED, "scenes": args.eval_scenes, **metrics}
    (out / "training.json").write_text(json.dumps(log, indent=2))
    print(f"held-out (seed {HELDOUT_SEED}, {time.time() - start:.0f} s): {json.dumps(metrics)}", flush=True)


if __name__ == "__main__":
    main()
