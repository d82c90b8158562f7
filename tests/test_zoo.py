"""Tests of the zoo: scene generator, processor, bundled models, training."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from captum_vlm import zoo
from captum_vlm.zoo import processing, scenes
from captum_vlm.zoo.scenes import COLOURS, SHAPES, make_scene
from captum_vlm.zoo.train import BatchMaker, Recipe, _is_true, evaluate, train

# Seeds of the held-out checks here; training draws from default_rng([seed, 1]) and the model
# card's numbers use seeds 90000 and 123456.
HELDOUT_SEED = 4_242_001


def _nearest_colour(rgb: np.ndarray) -> str:
    dist = {c: np.sum((rgb / 255.0 - np.array(scenes._RGB[c])) ** 2) for c in COLOURS}
    return min(dist, key=dist.get)


def test_scene_is_deterministic_for_a_seed():
    a, b, c = make_scene(11, size=(64, 96)), make_scene(11, size=(64, 96)), make_scene(12)
    assert a.image.shape == (64, 96, 3) and a.image.dtype == np.uint8
    assert a.pil().size == (96, 64) and a.pil().mode == "RGB"
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
    assert not np.array_equal(a.image[:, :64], c.image)
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    assert np.array_equal(make_scene(rng1).image, make_scene(rng2).image)
    assert [len(make_scene(s, n_objects=3).objects) for s in range(5)] == [3] * 5
    with pytest.raises(ValueError, match="n_objects"):
        make_scene(0, n_objects=4)
    with pytest.raises(ValueError, match="unknown object"):
        make_scene(0, labels=[("purple", "circle")])


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 72)])
def test_masks_match_the_drawn_colours(size):
    for seed in range(40):
        scene = make_scene(seed, size=size)
        assert 1 <= len(scene.objects) <= 3
        total = np.zeros(size, dtype=int)
        for colour, shape, mask in scene.objects:
            assert mask.shape == size and mask.dtype == bool
            assert mask.sum() > 0.005 * mask.size, (seed, colour, shape)
            total += mask
            inside = scene.image[mask].astype(float)
            assert _nearest_colour(np.median(inside, axis=0)) == colour
            # the object's colour is not the background's: a ring around the mask differs
        assert total.max() == 1  # masks do not overlap
        background = scene.image[total == 0].astype(float).mean(axis=0) / 255.0
        assert np.ptp(background) < 0.2  # nearly neutral background


def test_shapes_are_told_apart_by_their_masks():
    # area over squared circumradius: circle pi, square 2, triangle 3 sqrt(3) / 4 ~ 1.30
    ratio = {s: [] for s in SHAPES}
    for seed in range(60):
        for _, shape, mask in make_scene(seed, size=96).objects:
            ys, xs = np.nonzero(mask)
            r2 = np.max((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
            ratio[shape].append(mask.sum() / r2)
    assert 2.7 < np.median(ratio["circle"]) < 3.4
    assert 1.7 < np.median(ratio["square"]) < 2.3
    assert 1.1 < np.median(ratio["triangle"]) < 1.5


def test_captions_vqa_and_distractors_agree_with_the_objects():
    for seed in range(50):
        scene = make_scene(seed)
        labels = scene.labels
        assert scene.caption == scenes.caption_for(labels)
        for c, s in labels:
            assert f"a {c} {s}" in scene.caption
        assert len(set(labels)) == len(labels)
        qa = dict(scene.vqa)
        assert qa["how many objects are there?"] == scenes.NUMBERS[len(labels)]
        for s in SHAPES:
            assert qa[f"is there a {s}?"] == ("yes" if s in [x for _, x in labels] else "no")
            shapes = [x for _, x in labels]
            if shapes.count(s) == 1:
                assert qa[f"what color is the {s}?"] == labels[shapes.index(s)][0]
        for c, s in scenes.all_labels():
            assert qa[f"is there a {c} {s}?"] == ("yes" if (c, s) in labels else "no")
        for text in scene.distractors:
            assert text != scene.caption
            named = [tuple(p.split()[-2:]) for p in text.replace(" and ", ", ").split(", ")]
            assert not set(named) <= set(labels)  # false for the scene
            assert sorted(c for c, _ in named) == sorted(c for c, _ in labels)  # same colours
    two = make_scene(0, labels=[("red", "circle"), ("blue", "square")])
    assert two.caption == "a red circle and a blue square"
    assert two.distractors == ["a blue circle and a red square"]
    assert len(scenes.zero_shot_prompts()) == 12 and scenes.zero_shot_prompts()[0] == "a red circle"


def test_processor_round_trips(tmp_path):
    processor = processing.build_clip_processor()
    texts = ["a red circle", "a red circle, a blue square and a green triangle", "a Zebra?"]
    images = [make_scene(i).image for i in range(3)]
    before = processor(images=images, text=texts, return_tensors="pt", padding=True)
    ids = before["input_ids"]
    assert ids[0, 0] == processing.BOS_ID and ids[0, 4] == processing.EOS_ID
    assert ids[0, -1] == processing.PAD_ID and processing.UNK_ID in ids[2].tolist()
    # the training fast path gives the processor's pixel values
    assert torch.allclose(before["pixel_values"], processing.images_to_pixel_values(images))

    processor.save_pretrained(tmp_path)
    from transformers import AutoProcessor, CLIPProcessor

    for loaded in (
        CLIPProcessor.from_pretrained(tmp_path, local_files_only=True),
        AutoProcessor.from_pretrained(tmp_path, local_files_only=True),
    ):
        after = loaded(images=images, text=texts, return_tensors="pt", padding=True)
        for key in before:
            assert torch.equal(before[key], after[key]), key
    # a non-square image is resized to the model size, not cropped
    wide = make_scene(3, size=(64, 96)).pil()
    assert processor(images=wide, return_tensors="pt")["pixel_values"].shape == (1, 3, 64, 64)


def test_batches_have_no_false_negatives():
    maker = BatchMaker(seed=3, batch=32, image_size=64)
    for _ in range(5):
        objects, captions = maker.labels()
        assert len(objects) == 32 and len(captions) >= 32
        for i, obj in enumerate(objects):
            assert _is_true(captions[i], obj)
        singles = [o[0] for o in objects if len(o) == 1]
        assert len({c for c, _ in singles}) < len(singles)  # colour alone does not separate
    pixels, texts, truth = maker()
    assert pixels.shape == (32, 3, 64, 64) and truth.shape == (32, len(texts))
    assert truth[:, :32].diagonal().all()


def test_list_and_load_errors(tmp_path):
    models = zoo.list_models()
    assert "shapes-clip" in models and models["shapes-clip"]
    with pytest.raises(ValueError, match="shapes-clip"):
        zoo.load("no-such-model")
    model, processor = zoo.load(zoo.model_dir("shapes-clip"))  # a directory path works too
    assert not model.training
    text = model.config.text_config
    tok = processor.tokenizer
    assert (text.eos_token_id, text.bos_token_id, text.pad_token_id) == (
        tok.eos_token_id,
        tok.bos_token_id,
        tok.pad_token_id,
    )
    assert text.eos_token_id != 2 and text.vocab_size == len(tok)


def _zero_shot_hits(name: str, padding: bool | str) -> list[bool]:
    """Top-1 over the 12 prompts on 200 fresh single-object scenes, batched, via the processor."""
    model, processor = zoo.load(name)
    prompts = scenes.zero_shot_prompts()
    labels = scenes.all_labels()
    held = scenes.make_scenes(HELDOUT_SEED, 200, n_objects=1)
    hits = []
    with torch.no_grad():
        for i in range(0, len(held), 100):
            chunk = held[i : i + 100]
            inputs = processor(
                images=[s.pil() for s in chunk], text=prompts, return_tensors="pt", padding=padding
            )
            top = model(**inputs).logits_per_image.argmax(-1)
            hits += [labels[int(t)] == s.labels[0] for t, s in zip(top, chunk)]
    assert len(hits) == 200
    return hits


def test_shipped_shapes_clip_meets_its_floor():
    assert np.mean(_zero_shot_hits("shapes-clip", padding=True)) >= zoo.ZERO_SHOT_FLOOR
    model, processor = zoo.load("shapes-clip")
    metrics = evaluate(model, processor, seed=HELDOUT_SEED + 10, n=100)
    assert metrics["zero_shot_any"] >= 0.95
    assert metrics["binding"] >= 0.9


def test_shipped_shapes_siglip_meets_its_floor():
    assert "below" not in zoo.list_models()["shapes-siglip"]
    assert np.mean(_zero_shot_hits("shapes-siglip", padding="max_length")) >= zoo.ZERO_SHOT_FLOOR
    model, processor = zoo.load("shapes-siglip")
    metrics = evaluate(model, processor, seed=HELDOUT_SEED + 10, n=100, family="siglip")
    assert metrics["colour"] == 1.0 and metrics["binding"] >= 0.9


def test_short_training_lowers_the_loss():
    torch.set_num_threads(1)
    recipe = Recipe(
        steps=40,
        warmup=5,
        lr=1e-3,
        batch=16,
        hidden=32,
        heads=2,
        vision_layers=1,
        text_layers=1,
        projection=32,
        image_size=32,
        patch=8,
    )
    model, processor, log = train(recipe, eval_every=0, show_progress=False)
    losses = log["losses"]
    assert len(losses) == 40 and not model.training
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.3


def test_load_is_quiet_and_restores_the_progress_bar_setting(capfd):
    from transformers.utils import logging as hf_logging

    for enabled in (True, False):
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        try:
            zoo.load("shapes-clip")
            captured = capfd.readouterr()
            assert "Loading weights" not in captured.err + captured.out
            assert hf_logging.is_progress_bar_enabled() is enabled
        finally:
            hf_logging.enable_progress_bar()
