"""One image per example, one canvas size per batch: the refusals the tiled and dynamic-resolution
families share (Qwen2-VL / Qwen2.5-VL, LLaVA-NeXT, LLaVA-OneVision, Idefics3, SmolVLM, Gemma 3
with pan and scan on), checked
on each family's real processor (built as its family test builds it).

For every family: several images in one text (also OneVision's multi-image input, whose
``batch_num_images`` counts them) are refused by ``processor_inputs`` with the counts; a text
whose placeholders do not match its image is refused by ``model_inputs`` and by every method
before any forward runs (forward pre-hooks count the calls; the same call with the right text
does run them); images of different canvases in one batch are refused, naming the canvases; and
the model is left as found after each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import tiny_models as tm
import torch
from captum.attr import Attribution
from model_state import assert_unchanged, snapshot
from PIL import Image
from test_family_anyres import make_processor as anyres_processor
from test_family_gemma3 import PAN
from test_family_gemma3 import tiny_processor as gemma3_processor
from test_family_idefics3 import smolvlm_processor, tiny_processor
from test_qwen_vl import make_processor as qwen_processor

import captum_vlm.attr as attr
from captum_vlm.adapters import get_adapter
from captum_vlm.attr import CrossAttentionGradCAM

METHODS = {n: getattr(attr, n) for n in attr.__all__
           if isinstance(getattr(attr, n), type) and issubclass(getattr(attr, n), Attribution)}
SETTINGS = {"TokenIntegratedGradients": dict(n_steps=2), "CausalOcclusion": dict(window=2)}


@dataclass(frozen=True)
class Family:
    """A family, its tiny model and real processor, and the images the checks use.

    Attributes:
        model: the tiny model's factory.
        processor: the processor's factory.
        prompt: a text with one image placeholder (the processor expands it).
        nested: the processor takes one list of images per text (else a flat list).
        size: the image ``(height, width)``.
        mixed: other image sizes, each with the regex of the refusal of a batch of it and ``size``.
    """

    model: Callable[[], torch.nn.Module]
    processor: Callable[[], object]
    prompt: str
    nested: bool
    size: tuple[int, int]
    mixed: tuple[tuple[tuple[int, int], str], ...]


_QWEN = dict(processor=qwen_processor, prompt="<|vision_start|><|image_pad|><|vision_end|> what color", nested=False,
             size=(40, 64), mixed=(((24, 24), r"give canvases \[\(32, 56\), \(24, 24\)\]"),))
_ANYRES = dict(prompt="<image> what color", nested=False, size=(40, 28),
               mixed=(((30, 64), r"image_sizes \[\[40, 28\], \[30, 64\]\] give canvases \[\(48, 32\), \(32, 48\)\]"),))
_IDEFICS = dict(prompt="<image> what color", nested=True, size=(40, 64),
                mixed=(((64, 40), r"global views give canvases \[\(64, 96\), \(96, 64\)\]"),  # as many views
                       ((20, 20), r"padded examples \[0\] with empty views")))  # 3 x 3 tiles: more views


class _Panning:
    """Gemma 3's processor with pan and scan on in every call (its call defaults turn it off)."""

    def __init__(self, processor):
        self.processor, self.tokenizer = processor, processor.tokenizer

    def __call__(self, **kwargs):
        return self.processor(**kwargs, **PAN)


def _gemma3():
    tok = gemma3_processor().tokenizer
    return tm.gemma3(image_token_id=tok.image_token_id, boi_token_id=tok.boi_token_id, eoi_token_id=tok.eoi_token_id)


# a square image is one view; a 40 x 90 one the global view and 2 crops side by side
_GEMMA3 = dict(prompt="<start_of_image> what color", nested=True, size=(40, 40),
               mixed=(((40, 90), r"views per text \[1, 3\] give canvases \[\(32, 32\), \(32, 64\)\]"),))
FAMILIES = {
    "qwen2_5_vl": Family(tm.qwen2_5_vl, **_QWEN),
    "qwen2_vl": Family(tm.qwen2_vl, **_QWEN),
    "llava_next": Family(tm.llava_next, lambda: anyres_processor("next"), **_ANYRES),
    "llava_onevision": Family(tm.llava_onevision, lambda: anyres_processor("onevision"), **_ANYRES),
    "idefics3": Family(tm.idefics3, tiny_processor, **_IDEFICS),
    "smolvlm": Family(tm.smolvlm, smolvlm_processor, **_IDEFICS),
    "gemma3": Family(_gemma3, lambda: _Panning(gemma3_processor()), **_GEMMA3),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """``(family, model, processor)``, built once per family."""
    found = FAMILIES[request.param]
    return found, found.model(), found.processor()


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def process(family: Family, processor, images_per_text: list[list[Image.Image]], texts: list[str]) -> dict:
    """The processor's outputs, its images given per text as the family's processor takes them."""
    images = images_per_text if family.nested else [image for row in images_per_text for image in row]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def one_example(family: Family, model, processor):
    """``(pixel_values, input_ids, attention_mask, extra)`` of one image with its text."""
    adapter = get_adapter(model)
    inputs = adapter.processor_inputs(process(family, processor, [[noise(family.size)]], [family.prompt]))
    extra = tuple(inputs[name] for name in adapter.extra_text_inputs)
    return inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], extra


@pytest.mark.parametrize("texts,per_text", [(1, [2]), (2, [2, 2]), (2, [2, 0])], ids=["2-in-1", "2-in-each", "2-and-0"])
def test_several_images_in_a_text_are_refused_with_the_counts(family, texts, per_text):
    found, model, processor = family
    placeholder = found.prompt.split(" ")[0]
    prompts = [found.prompt + f" and {placeholder}" * (n - 1) if n else "what color" for n in per_text]
    images = [[noise(found.size, seed=k) for k in range(n)] for n in per_text]
    if found.model is tm.llava_onevision:  # its multi-image input: one list of images per text, counted
        raw = processor(images=[row for row in images if row], text=prompts, return_tensors="pt", padding=True)
        assert raw["batch_num_images"].tolist() == [n for n in per_text if n]
    else:
        raw = process(found, processor, images, prompts)
    adapter, before = get_adapter(model), snapshot(model)
    want = rf"inputs: {sum(per_text)} images for {texts} texts; captum-vlm explains one image per example, the texts hold \[{', '.join(map(str, per_text))}\] images"
    with pytest.raises(ValueError, match=want):
        adapter.processor_inputs(raw)
    assert_unchanged(model, before)
    if found.model is tm.llava_onevision and 0 not in per_text:  # batch_num_images alone is enough
        with pytest.raises(ValueError, match=want):
            adapter.processor_inputs({k: v for k, v in raw.items() if k not in ("input_ids", "attention_mask")})
    # the same texts, one image each, are taken
    one = process(found, processor, [[noise(found.size, seed=k)] for k in range(texts)], [found.prompt] * texts)
    assert adapter.processor_inputs(one)["pixel_values"].shape[0] == texts


class _Forwards:
    """Counts the forwards of the model, its vision tower and its token embedding while active."""

    def __init__(self, model):
        adapter = get_adapter(model)
        self.modules = [model, adapter.vision_model(), adapter.text_embedding()]
        self.calls = 0

    def __enter__(self):
        self.handles = [m.register_forward_pre_hook(self._count) for m in self.modules]
        return self

    def _count(self, module, args):
        self.calls += 1

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _wrong_text(ids: torch.Tensor, mask: torch.Tensor, image: torch.Tensor, how: str):
    """``input_ids`` with one image placeholder less, or with the image's run of placeholders twice."""
    positions = image[0].nonzero()[:, 0]
    if how == "one-less":
        keep = torch.ones(ids.shape[1], dtype=torch.bool)
        keep[positions[-1]] = False
        return ids[:, keep], mask[:, keep]
    end = int(positions[-1]) + 1
    return (torch.cat([ids[:, :end], ids[:, positions], ids[:, end:]], 1),
            torch.cat([mask[:, :end], mask[:, positions], mask[:, end:]], 1))


@pytest.mark.parametrize("how", ["one-less", "twice"])
def test_placeholders_that_do_not_match_the_image_are_refused_before_any_forward(family, how):
    found, model, processor = family
    adapter = get_adapter(model)
    pixels, ids, mask, extra = one_example(found, model, processor)
    n = int(adapter.image_token_positions(ids).sum())
    wrong_ids, wrong_mask = _wrong_text(ids, mask, adapter.image_token_positions(ids), how)
    given = n - 1 if how == "one-less" else 2 * n
    counts = rf"{given}\]? image tokens.*(needs|holds) {n}\b"
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"input_ids: .*" + counts):
        adapter.model_inputs(pixels, wrong_ids, wrong_mask, extra)
    supported = []
    for name, cls in METHODS.items():
        try:
            method = cls(model)
        except TypeError:  # not a method for this class (refused by name: test_conventions)
            continue
        supported.append(name)
        with _Forwards(model) as forwards, pytest.raises(ValueError, match=counts):
            method.attribute(pixels, additional_forward_args=(wrong_ids, wrong_mask, *extra), **SETTINGS.get(name, {}))
        assert forwards.calls == 0, name
        assert_unchanged(model, before)
    assert {"CrossAttentionGradCAM", "BimodalRelevancy", "TokenIntegratedGradients", "CausalOcclusion"} <= set(supported)
    with _Forwards(model) as forwards:  # the right text runs: the counter counts
        CrossAttentionGradCAM(model).attribute(pixels, additional_forward_args=(ids, mask, *extra))
    assert forwards.calls > 0
    assert_unchanged(model, before)


def test_images_of_different_canvases_in_one_batch_are_refused(family):
    found, model, processor = family
    adapter, before = get_adapter(model), snapshot(model)
    for size, message in found.mixed:
        raw = process(found, processor, [[noise(found.size)], [noise(size, seed=1)]], [found.prompt] * 2)
        with pytest.raises(ValueError, match=rf"inputs: .*{message}.*the images of one batch must share one canvas size"):
            adapter.processor_inputs(raw)
        assert_unchanged(model, before)
        alone = adapter.processor_inputs(process(found, processor, [[noise(size, seed=1)]] * 2, [found.prompt] * 2))
        assert alone["pixel_values"].shape[0] == 2  # each size on its own is taken
