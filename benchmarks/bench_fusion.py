"""Grounding of the fusion-model methods on the zoo: does each word's map point at its object?

For every zoo model whose class is a fusion model (BLIP ITM/captioning, ViLT), on held-out
two-object scenes captioned "a <colour> <shape> and a <colour> <shape>", each colour and shape word
gets its own map (``attribute_tokens`` merged by word), and the pointing game
(:func:`captum_vlm.metrics.pointing_game`, default tolerance) checks whether the map's maximum lies
on the object the word names. Two baselines: a random map on the same patch grid, and the same
map scored against the *other* object (a map that only finds salient objects, without reading
the word, scores as high there as on the named one).

* match models (ITM): the match logit of the true caption, the word's text row;
* captioning models: the teacher-forced log-probability of the word's own token(s);
* BLIP VQA: the questions "what color is the <shape>?" and "what shape is the <colour> object?";
  the map of the answer token's teacher-forced log-probability should point at the object asked
  about (its answer word is the "colour" or "shape" word).

Run::

    python benchmarks/bench_fusion.py                      # every fusion model in the zoo
    python benchmarks/bench_fusion.py --models shapes-blip-itm --scenes 200
    python benchmarks/bench_fusion.py --every-layer        # Grad-CAM at each cross-attention layer
    python benchmarks/bench_fusion.py --smoke              # code path on a random BLIP, no zoo

Prints a Markdown table for ``benchmarks/RESULTS.md``; with no fusion model in the zoo it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from captum_vlm import zoo  # noqa: E402
from captum_vlm.adapters import classes_for_tasks, get_adapter  # noqa: E402
from captum_vlm.attr import BimodalRelevancy, CrossAttentionGradCAM  # noqa: E402
from captum_vlm.attr._fusion import FUSION_KINDS  # noqa: E402
from captum_vlm.metrics import pointing_game  # noqa: E402

FUSION_CLASSES = classes_for_tasks(list(FUSION_KINDS))  # FUSION_KINDS is keyed by adapter task
HELDOUT_SEED = 123_456  # the zoo's held-out scene seed (zoo/train.py)
WORD_KINDS = ("colour", "shape")


def fusion_zoo_models() -> list[str]:
    """Zoo models whose ``config.json`` names a fusion class."""
    names = []
    for name in zoo.list_models():
        config = json.loads((zoo.model_dir(name) / "config.json").read_text())
        if any(arch in FUSION_CLASSES for arch in config.get("architectures") or []):
            names.append(name)
    return names


def load_fusion(name: str):
    """The zoo model as its own fusion class (``zoo.load`` uses ``AutoModel``, which would give
    the bare ``BlipModel``), and its processor."""
    import transformers

    folder = zoo.model_dir(name)
    config = json.loads((folder / "config.json").read_text())
    arch = next(a for a in config["architectures"] if a in FUSION_CLASSES)
    model = getattr(transformers, arch).from_pretrained(folder, local_files_only=True).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    return model, processor


def object_words(caption: str, labels: list[tuple[str, str]]) -> list[tuple[int, str, int]]:
    """``(word index, kind, object index)`` of each object's colour and shape word, in caption order."""
    words = caption.replace(",", " , ").split()
    found, start = [], 0
    for i, (colour, shape) in enumerate(labels):
        for j in range(start, len(words) - 1):
            if words[j] == colour and words[j + 1] == shape:
                found += [(j, "colour", i), (j + 1, "shape", i)]
                start = j + 2
                break
    return found


def image_size(model) -> int:
    config = getattr(model.config, "vision_config", model.config)
    return int(config.image_size)


def grounding(
    model, processor, n_scenes: int, seed: int = HELDOUT_SEED, every_layer: bool = False
) -> dict[str, dict[str, float]]:
    """Pointing-game hit rates per method and word kind (plus a random-map baseline).

    Args:
        model: a fusion model (a class of :data:`FUSION_CLASSES`).
        processor: its processor (``images=``, ``text=``).
        n_scenes: held-out two-object scenes to use.
        seed: scene seed.
        every_layer: Grad-CAM at every cross-attention layer, not only the default one.

    Returns:
        ``{method: {"colour": rate, "shape": rate, "all": rate, "other": rate, "n": count}}``;
        ``"other"`` is the hit rate on the object the word does not name.
    """
    default = CrossAttentionGradCAM(model)
    methods = {f"cross-attention Grad-CAM, layer {default.layer} (default)": default}
    if every_layer:
        n_layers = len(default.adapter.cross_attentions())
        # match models read CLS only: at their last layer every word row has zero gradient
        last = n_layers - 1 if default.kind == "match" else n_layers
        for layer in range(last):
            if layer != default.layer:
                methods[f"cross-attention Grad-CAM, layer {layer}"] = CrossAttentionGradCAM(model, layer=layer)
    methods["bi-modal relevancy"] = BimodalRelevancy(model)
    vqa = type(model).__name__ == "BlipForQuestionAnswering"
    if FUSION_KINDS[get_adapter(model).task] == "answer":
        raise ValueError("grounding: ViLT VQA explains an answer label, not words; use a match, caption or BLIP VQA model")
    hits: dict[str, dict[str, list[bool]]] = {
        m: {k: [] for k in (*WORD_KINDS, "other")} for m in [*methods, "random map"]
    }
    generator = torch.Generator().manual_seed(seed)
    for scene in zoo.scenes.make_scenes(seed, n_scenes, size=image_size(model), n_objects=2):
        if vqa:
            for name, word_kind, obj, heat in _vqa_maps(methods, processor, scene, generator):
                _score(hits[name], word_kind, heat, scene, obj)
            continue
        inputs = processor(images=scene.pil(), text=scene.caption, return_tensors="pt")
        word_ids = inputs.word_ids(0) if hasattr(inputs, "word_ids") else processor.tokenizer(scene.caption).word_ids()
        args = (inputs["input_ids"], inputs["attention_mask"])
        maps = {
            name: method.attribute_tokens(inputs["pixel_values"], additional_forward_args=args, word_ids=word_ids,
                                          return_grid=True)[0]
            for name, method in methods.items()
        }
        grid = next(iter(maps.values())).shape[-2:]
        maps["random map"] = torch.rand(max(w for w in word_ids if w is not None) + 1, *grid, generator=generator)
        for word, word_kind, obj in object_words(scene.caption, scene.labels):
            for name, per_word in maps.items():
                _score(hits[name], word_kind, per_word[word], scene, obj)
    table = {}
    for name, by_kind in hits.items():
        every = by_kind["colour"] + by_kind["shape"]
        table[name] = {k: sum(v) / max(len(v), 1) for k, v in by_kind.items()}
        table[name].update({"all": sum(every) / max(len(every), 1), "n": len(every)})
    return table


def _score(hits: dict[str, list[bool]], word_kind: str, heat: torch.Tensor, scene, obj: int) -> None:
    """Pointing game of one map on the object it should name and on the other object."""
    hits[word_kind].append(bool(pointing_game(heat, torch.from_numpy(scene.objects[obj].mask)).hits[0]))
    hits["other"].append(bool(pointing_game(heat, torch.from_numpy(scene.objects[1 - obj].mask)).hits[0]))


def _vqa_maps(methods: dict, processor, scene, generator: torch.Generator):
    """``(method, word kind, object, grid map)`` for the scene's colour and shape questions."""
    shapes = [s for _, s in scene.labels]
    colours = [c for c, _ in scene.labels]
    for obj, (colour, shape) in enumerate(scene.labels):
        asked = []
        if shapes.count(shape) == 1:
            asked.append(("colour", f"what color is the {shape}?", colour))
        if colours.count(colour) == 1:
            asked.append(("shape", f"what shape is the {colour} object?", shape))
        for word_kind, question, answer in asked:
            inputs = processor(images=scene.pil(), text=question, return_tensors="pt")
            answer_ids = processor.tokenizer(answer, return_tensors="pt")
            args = (inputs["input_ids"], inputs["attention_mask"], answer_ids["input_ids"], answer_ids["attention_mask"])
            for name, method in methods.items():
                heat = method.attribute(inputs["pixel_values"], target=1, additional_forward_args=args, return_grid=True)[0]
                yield name, word_kind, obj, heat
            yield "random map", word_kind, obj, torch.rand(*heat.shape, generator=generator)


def smoke_models():
    """Random 64-px BLIP ITM and VQA models with the zoo's tokenizer (the code path only)."""
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipForQuestionAnswering

    from captum_vlm.zoo.processing import build_clip_processor, vocabulary

    torch.manual_seed(0)
    text = dict(vocab_size=len(vocabulary()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, pad_token_id=0, bos_token_id=2,
                eos_token_id=3, sep_token_id=3, encoder_hidden_size=32)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=64, patch_size=8)
    processor = build_clip_processor(64)  # stands in for a BlipProcessor: same fields
    for model_class in (BlipForImageTextRetrieval, BlipForQuestionAnswering):
        yield model_class(BlipConfig(text_config=text, vision_config=vision)).eval(), processor


def markdown(name: str, table: dict[str, dict[str, float]], seconds: float, what: str = "words") -> str:
    """The table for RESULTS.md; ``what`` is "words" (captions) or "answers" (VQA)."""
    lines = [
        f"**{name}** ({next(iter(table.values()))['n']} {what} on held-out two-object scenes, seed "
        f"{HELDOUT_SEED}; pointing game, default tolerance; {seconds:.0f} s on CPU)",
        "",
        f"| method | colour {what} | shape {what} | all {what} | same maps on the other object |",
        "|---|---|---|---|---|",
    ]
    for method, row in table.items():
        lines.append(f"| {method} | {row['colour']:.3f} | {row['shape']:.3f} | {row['all']:.3f} | {row['other']:.3f} |")
    return "\n".join(lines)


def _what(model) -> str:
    return "answers" if type(model).__name__ == "BlipForQuestionAnswering" else "words"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", help="zoo names (default: every fusion model in the zoo)")
    parser.add_argument("--scenes", type=int, default=200, help="held-out scenes per model")
    parser.add_argument("--every-layer", action="store_true", help="Grad-CAM at every cross-attention layer")
    parser.add_argument("--smoke", action="store_true", help="run the code path on a random model")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.smoke:
        for model, processor in smoke_models():
            start = time.time()
            table = grounding(model, processor, min(args.scenes, 5), every_layer=args.every_layer)
            print(markdown(f"smoke: random {type(model).__name__}", table, time.time() - start, _what(model)), end="\n\n")
        return 0
    names = args.models or fusion_zoo_models()
    if not names:
        print(f"No fusion model in the zoo yet ({Path(zoo.MODELS_DIR)} holds {sorted(zoo.list_models()) or 'none'}); "
              "the grounding benchmark is waiting on shapes-blip-itm and a generative zoo model.")
        return 0
    for name in names:
        model, processor = load_fusion(name)
        start = time.time()
        table = grounding(model, processor, args.scenes, every_layer=args.every_layer)
        print(markdown(f"{name} ({type(model).__name__})", table, time.time() - start, _what(model)), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
