"""captum-vlm against the tools a user would otherwise pick, side by side in one run (not a test).

Groups (each contender builds its callable once, then every repeat calls all contenders of the
group in turn, so load from other jobs on a shared machine hits them alike; medians of CPU time,
``time.process_time``, one torch thread). A contender that is K identical calls, one per prompt
(the peers, and our one-prompt-at-a-time loop), is timed as one call for prompt 0 times K: the
calls differ only in the target index, so their costs are the same.

* ``gradient``: one image, K prompts (default 16) on a random CLIP of ViT-B/16 geometry (224 px,
  16-px patches, 14 x 14 grid; width and depth from ``--width``/``--layers``). Ours:
  ``GradECLIP.attribute_prompts`` (all K maps from one forward and one batched backward), the same
  one prompt at a time, ``GradientWeightedRelevancy`` for 1 and for K prompts (all layers, and
  the last block only, ``start_layer=-1``, the authors' CLIP notebook's default),
  ``RawAttention(head_fusion="grad")`` for K prompts. Peers: pytorch-grad-cam's own CLIP usage
  example (``usage_examples/clip_example.py``: ``GradCAM`` at the last block's ``layer_norm1``
  with its ``reshape_transform``, a model wrapper that runs both towers and returns the softmax
  over the labels) called once per label, and once on a batch of K copies with one target each;
  Captum's ``LayerGradientXActivation`` and ``LayerGradCam`` at the same layer on a hand wrapper
  (``model(...).logits_per_image``), one call per prompt.
* ``occlusion``: same model and prompts, windows of 2 x 2 patches, stride 2 (49 windows), 16
  perturbations per forward. Ours: ``CausalOcclusion(...).attribute(target=None)`` (drop and
  paint): every prompt from one sweep. Peer: Captum ``Occlusion`` on the hand wrapper painting
  0 over 32 x 32 px, one call per prompt.
* ``fusion``: a random ``BlipForConditionalGeneration`` of base size (``BlipConfig()``: ViT-B/16
  at 384 px, 577 image tokens, 12-layer caption decoder) and a caption of 8 scored tokens.
  ``CrossAttentionGradCAM.attribute_tokens`` for one token, for all 8 from one batched backward,
  and for all 8 with one backward per token (``TOKEN_CHUNK = 1``, the old path); with
  ``--fusion-relevancy`` the same for ``BimodalRelevancy`` (a backward through the whole vision
  tower per token: slow on a CPU).

* ``generative``: the tests' tiny random ``LlavaForConditionalGeneration`` (32 px, 4 x 4 patches),
  a 4-token answer. Ours: ``CausalOcclusion(TokenLogProbs(...)).attribute(target=None)``, one map
  per answer token from one sweep (drop, and paint with Captum's white baseline). Peer: Captum's
  ``LLMAttribution(FeatureAblation(model))`` with ``ImageMaskInput`` (one feature per patch), which
  gives the sequence's and each token's attribution, token by token (its default) and with one
  forward per feature (``forward_in_tokens=False``); both with ``use_cached_outputs=False``,
  because with its default cache transformers 5 never shows LLaVA the image (see ``captum_llm``).

``--memory`` also runs every contender once in a fresh process and reports its peak resident
memory (``VmHWM`` reset through ``/proc/self/clear_refs`` just before the call, minus the
resident size then).

pytorch-grad-cam (``pip install --no-deps grad-cam==1.5.7``, plus ``ttach`` and
``opencv-python-headless`` from the ``bench`` extra) imports torchvision at module level (its
``utils/image.py``, ``utils/model_targets.py`` and ``sess.py``) but its CLIP recipe runs none of
it. This project never installs torchvision (its wheels pin another torch), so when torchvision
is missing the script registers placeholder modules under those names before importing
pytorch-grad-cam; calling anything in them raises. The wrapper gets the prompts already
tokenised (the recipe runs the processor in every forward; that cost is left out, in the peer's
favour) and does not print the probabilities as the recipe does.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py --groups gradient occlusion --repeats 3
    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py --groups fusion --repeats 3 --memory

Prints Markdown tables for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from bench_ig_occlusion import _status_kib  # noqa: E402  (this folder is on sys.path when run as a script)
from torch import nn  # noqa: E402

from captum_vlm.attr import (  # noqa: E402
    BimodalRelevancy,
    CausalOcclusion,
    CrossAttentionGradCAM,
    GradECLIP,
    GradientWeightedRelevancy,
    RawAttention,
)

IMAGE, PATCH = 224, 16
# name -> builder of the timed call, or of (call, n): a contender that is n identical calls (one per
# prompt) is timed as one call times n
Contenders = dict[str, Callable[[], "Callable[[], object] | tuple[Callable[[], object], int]"]]


# ----- models and inputs --------------------------------------------------------------------------


def vit_b16_clip(width: int, layers: int):
    """Random CLIP with ViT-B/16 geometry (224 px, 14 x 14 patches); width/depth as given."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    heads = max(1, width // 64)
    vision = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=IMAGE, patch_size=PATCH)
    text = dict(vocab_size=1000, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=32, pad_token_id=0, bos_token_id=2,
                eos_token_id=3)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=min(512, width))).eval()


def prompts(k: int, length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 1000, (k, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    return ids, torch.ones_like(ids)


class HandWrapper(nn.Module):
    """What a user writes for Captum: the model's logits over fixed prompts, both towers each call."""

    def __init__(self, model, ids, mask, softmax: bool = False):
        super().__init__()
        self.clip, self.ids, self.mask, self.softmax = model, ids, mask, softmax

    def forward(self, pixel_values):
        logits = self.clip(pixel_values=pixel_values, input_ids=self.ids, attention_mask=self.mask).logits_per_image
        return logits.softmax(dim=1) if self.softmax else logits


def import_grad_cam():
    """pytorch-grad-cam's ``GradCAM`` and ``ClassifierOutputTarget`` (see the module docstring)."""
    import transformers.models.clip  # noqa: F401  (transformers probes for torchvision when imported: before the placeholder)

    try:
        import torchvision  # noqa: F401
    except ImportError:
        def unavailable(*args, **kwargs):
            raise RuntimeError("torchvision is not installed; this benchmark only has a placeholder")

        root = types.ModuleType("torchvision")
        transforms = types.ModuleType("torchvision.transforms")
        functional = types.ModuleType("torchvision.transforms.functional")
        for name in ("Compose", "Normalize", "ToTensor"):
            setattr(transforms, name, unavailable)
        functional.resize = unavailable
        root.transforms, transforms.functional = transforms, functional
        sys.modules.update({"torchvision": root, "torchvision.transforms": transforms,
                            "torchvision.transforms.functional": functional})
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as error:
        raise ImportError("the pytorch-grad-cam contenders need pip install captum-vlm[bench] and "
                          "pip install --no-deps grad-cam==1.5.7") from error

    return GradCAM, ClassifierOutputTarget


def grad_cam_reshape(tensor, height: int = IMAGE // PATCH, width: int = IMAGE // PATCH):
    """The recipe's ``reshape_transform``: drop CLS, tokens to a channels-first grid."""
    result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


# ----- groups -------------------------------------------------------------------------------------


def gradient_group(args) -> Contenders:
    from captum.attr import LayerGradCam, LayerGradientXActivation

    k = args.prompts

    def setup():
        model = vit_b16_clip(args.width, args.layers)
        pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
        return model, pixels, prompts(k)

    def ours_eclip_all():
        model, pixels, (ids, mask) = setup()
        method = GradECLIP(model)
        return lambda: method.attribute_prompts(pixels, additional_forward_args=(ids, mask), return_grid=True)

    def ours_eclip_loop():
        model, pixels, (ids, mask) = setup()
        method = GradECLIP(model)
        return lambda: method.attribute(pixels, target=0, additional_forward_args=(ids, mask), return_grid=True), k

    def ours_relevancy(n, start_layer=0):
        def build():
            model, pixels, (ids, mask) = setup()
            method = GradientWeightedRelevancy(model, start_layer=start_layer)
            return lambda: method.attribute_prompts(pixels, additional_forward_args=(ids, mask),
                                                    prompts=list(range(n)), return_grid=True)
        return build

    def ours_raw_grad():
        model, pixels, (ids, mask) = setup()
        method = RawAttention(model, head_fusion="grad")
        return lambda: method.attribute_prompts(pixels, additional_forward_args=(ids, mask), return_grid=True)

    def grad_cam(batched: bool):
        def build():
            GradCAM, ClassifierOutputTarget = import_grad_cam()
            model, pixels, (ids, mask) = setup()
            wrapper = HandWrapper(model, ids, mask, softmax=True).eval()
            cam = GradCAM(model=wrapper, target_layers=[model.vision_model.encoder.layers[-1].layer_norm1],
                          reshape_transform=grad_cam_reshape)
            if batched:
                return lambda: cam(input_tensor=pixels.expand(k, -1, -1, -1).contiguous(),
                                   targets=[ClassifierOutputTarget(p) for p in range(k)])
            return lambda: cam(input_tensor=pixels, targets=[ClassifierOutputTarget(0)]), k
        return build

    def captum_layer(cls):
        def build():
            model, pixels, (ids, mask) = setup()
            wrapper = HandWrapper(model, ids, mask)
            method = cls(wrapper, model.vision_model.encoder.layers[-1].layer_norm1)
            return lambda: method.attribute(pixels, target=0), k
        return build

    return {
        f"ours: Grad-ECLIP, {k} prompts in one call": ours_eclip_all,
        f"ours: Grad-ECLIP, {k} calls of 1 prompt (1 call x {k})": ours_eclip_loop,
        "ours: relevancy, 1 prompt": ours_relevancy(1),
        f"ours: relevancy, {k} prompts in one call": ours_relevancy(k),
        "ours: relevancy, last block only (start_layer=-1), 1 prompt": ours_relevancy(1, -1),
        f"ours: relevancy, last block only (start_layer=-1), {k} prompts in one call": ours_relevancy(k, -1),
        f"ours: raw attention (grad), {k} prompts in one call": ours_raw_grad,
        f"pytorch-grad-cam CLIP recipe, {k} calls of 1 label (1 call x {k})": grad_cam(False),
        f"pytorch-grad-cam CLIP recipe, 1 call on {k} copies": grad_cam(True),
        f"Captum LayerGradientXActivation, {k} calls (1 call x {k})": captum_layer(LayerGradientXActivation),
        f"Captum LayerGradCam, {k} calls (1 call x {k})": captum_layer(LayerGradCam),
    }


def occlusion_group(args) -> Contenders:
    from captum.attr import Occlusion

    k, per_eval = args.prompts, 16

    def setup():
        model = vit_b16_clip(args.width, args.layers)
        pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
        return model, pixels, prompts(k)

    def ours(intervention):
        def build():
            model, pixels, (ids, mask) = setup()
            occ = CausalOcclusion(model)
            return lambda: occ.attribute(pixels, target=None, additional_forward_args=(ids, mask), window=2,
                                         stride=2, intervention=intervention, perturbations_per_eval=per_eval,
                                         return_grid=True)
        return build

    def captum_occlusion():
        model, pixels, (ids, mask) = setup()
        occlusion = Occlusion(HandWrapper(model, ids, mask))

        def run():
            with torch.no_grad():
                return occlusion.attribute(pixels, sliding_window_shapes=(3, 2 * PATCH, 2 * PATCH),
                                           strides=(3, 2 * PATCH, 2 * PATCH), baselines=0.0, target=0,
                                           perturbations_per_eval=per_eval)
        return run, k

    return {
        f"ours: occlusion (drop), {k} prompts from one sweep": ours("drop"),
        f"ours: occlusion (paint), {k} prompts from one sweep": ours("paint"),
        f"Captum Occlusion on the hand wrapper, {k} calls (1 call x {k})": captum_occlusion,
    }


def fusion_group(args) -> Contenders:
    from captum_vlm.attr import _fusion

    def setup():
        from transformers import BlipConfig, BlipForConditionalGeneration

        torch.manual_seed(0)
        config = BlipConfig()
        model = BlipForConditionalGeneration(config).eval()
        size = config.vision_config.image_size
        pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        caption = torch.randint(1000, 2000, (1, 9), generator=torch.Generator().manual_seed(1))
        caption[:, 0], caption[:, -1] = config.text_config.bos_token_id, config.text_config.sep_token_id
        return model, pixels, (caption, torch.ones_like(caption))

    def build(cls, target, chunk):
        def make():
            model, pixels, forward_args = setup()
            method = cls(model)

            def run():
                saved, _fusion.TOKEN_CHUNK = _fusion.TOKEN_CHUNK, chunk
                try:
                    return method.attribute_tokens(pixels, target=target, additional_forward_args=forward_args,
                                                   return_grid=True)
                finally:
                    _fusion.TOKEN_CHUNK = saved
            return run
        return make

    methods = [("Grad-CAM", CrossAttentionGradCAM)] + ([("relevancy", BimodalRelevancy)] if args.fusion_relevancy else [])
    out: Contenders = {}
    for label, cls in methods:
        out[f"ours: {label}, 1 token"] = build(cls, 4, 8)
        out[f"ours: {label}, 8 tokens, one batched backward"] = build(cls, None, 8)
        out[f"ours: {label}, 8 tokens, one backward each"] = build(cls, None, 1)
    return out


class _IdTokenizer:
    """The little of a tokenizer that Captum's ``LLMAttribution`` uses when the target is given as
    token ids: the tiny random LLaVA has no vocabulary, so tokens print as their ids."""

    def decode(self, ids, **kwargs) -> str:
        return " ".join(str(int(i)) for i in torch.as_tensor(ids).flatten())

    def encode(self, text, add_special_tokens: bool = True, return_tensors=None, **kwargs):
        ids = [int(t) for t in str(text).split()]
        return torch.tensor([ids]) if return_tensors == "pt" else ids

    def convert_ids_to_tokens(self, ids):
        return [str(int(i)) for i in ids]

    def __call__(self, text, return_offsets_mapping: bool = False, **kwargs) -> dict:
        ids, offsets, start = [], [], 0
        for word in str(text).split(" "):
            ids.append(int(word))
            offsets.append((start, start + len(word)))
            start += len(word) + 1
        return {"input_ids": ids, "offset_mapping": offsets}


def generative_group(args) -> Contenders:
    import numpy as np
    from captum.attr import FeatureAblation, ImageMaskInput, LLMAttribution
    from PIL import Image

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import tiny_models as tm

    from captum_vlm.targets import TokenLogProbs

    answer = [13, 14, 15, 16]

    def setup():
        model = tm.llava().eval()
        prompt = torch.tensor([[tm.BOS, 9] + [tm.LLAVA_IMAGE_TOKEN] * 16 + [11, 12]])
        rgb = np.random.default_rng(0).integers(0, 256, (tm.IMAGE_SIZE, tm.IMAGE_SIZE, 3), dtype=np.uint8)
        return model, prompt, Image.fromarray(rgb)

    def to_pixels(image):
        array = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)[None] / 255
        return (array - 0.5) / 0.5

    def ours(intervention):
        def build():
            model, prompt, image = setup()
            ids = torch.cat([prompt, torch.tensor([answer])], dim=1)
            occ = CausalOcclusion(TokenLogProbs(model, score_from=prompt.shape[1]))
            pixels = to_pixels(image)
            # Captum paints the absent pixels white, (255, 255, 255): 1.0 after the normalisation
            return lambda: occ.attribute(pixels, target=None, additional_forward_args=(ids, torch.ones_like(ids)),
                                         intervention=intervention, baselines=1.0, perturbations_per_eval=16,
                                         return_grid=True)
        return build

    def captum_llm(in_tokens: bool = True):
        model, prompt, image = setup()
        rows = torch.arange(tm.IMAGE_SIZE)[:, None] // tm.PATCH
        cols = torch.arange(tm.IMAGE_SIZE)[None, :] // tm.PATCH
        mask = rows * (tm.IMAGE_SIZE // tm.PATCH) + cols  # one feature per patch

        def processor_fn(img):
            return {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "pixel_values": to_pixels(img)}

        llm = LLMAttribution(FeatureAblation(model), _IdTokenizer())

        def run():
            # use_cached_outputs=False: with the default (True) transformers 5 drops pixel_values
            # from every step (Captum 0.9 does not pass is_first_iteration), so the image is never
            # seen and every attribution is 0
            with torch.no_grad():
                return llm.attribute(ImageMaskInput(image, mask=mask, processor_fn=processor_fn),
                                     target=torch.tensor(answer), use_cached_outputs=False,
                                     forward_in_tokens=in_tokens)
        return run

    def agreement() -> str:
        """Our painted per-token maps against Captum's token attributions (same quantity)."""
        ours_maps = ours("paint")()()[0]  # [T, 4, 4]
        mine = ours_maps[-len(answer):].reshape(len(answer), -1)
        lines = []
        for in_tokens in (True, False):
            theirs = captum_llm(in_tokens)().token_attr  # [answer tokens, 16 patches]
            gap = float((mine - theirs).abs().max() / theirs.abs().max())
            lines.append(f"ours (paint white) vs Captum LLMAttribution token attributions (forward_in_tokens="
                         f"{in_tokens}): max |difference| / max |Captum| = {gap:.1e}")
        return "\n".join(lines)

    generative_group.agreement = agreement
    return {
        "ours: occlusion (drop), per answer token, one sweep": ours("drop"),
        "ours: occlusion (paint white), per answer token, one sweep": ours("paint"),
        "Captum LLMAttribution(FeatureAblation) + ImageMaskInput, token by token": captum_llm,
        "Captum LLMAttribution(FeatureAblation) + ImageMaskInput, one forward per feature":
            lambda: captum_llm(in_tokens=False),
    }


GROUPS = {"gradient": gradient_group, "occlusion": occlusion_group, "fusion": fusion_group,
          "generative": generative_group}


# ----- timing and memory ------------------------------------------------------------------------


def _built(build) -> tuple[Callable[[], object], int]:
    made = build()
    return made if isinstance(made, tuple) else (made, 1)


def interleaved_medians(contenders: Contenders, repeats: int) -> dict[str, float]:
    """Median CPU seconds (``time.process_time``: with one torch thread this is the work done, not
    the waiting on a shared machine) of each contender, times its number of identical calls."""
    calls = {}
    for name, build in contenders.items():
        calls[name] = _built(build)
        calls[name][0]()  # warm-up (text embeddings cached, lazy initialisation)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (call, n) in calls.items():
            start = time.process_time()
            call()
            times[name].append((time.process_time() - start) * n)
    return {name: statistics.median(values) for name, values in times.items()}


def memory_child(group: str, name: str, args) -> None:
    """Runs in a fresh process: one call of one contender, peak RSS above the RSS before it."""
    if group == "fusion":
        torch.set_flush_denormal(True)
    call, _ = _built(GROUPS[group](args)[name])
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    before = _status_kib("VmRSS")
    call()
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def peak_memory(group: str, names: list[str], args) -> dict[str, float]:
    out = {}
    for name in names:
        command = [sys.executable, __file__, "--child", group, name, "--prompts", str(args.prompts),
                   "--width", str(args.width), "--layers", str(args.layers)]
        if args.fusion_relevancy:
            command.append("--fusion-relevancy")
        done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if done.returncode:
            print(f"memory run of {name!r} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]
    return out


def report(group: str, medians: dict[str, float], memory: dict[str, float]) -> None:
    names = list(medians)
    ours = [n for n in names if n.startswith("ours")]
    reference = ours[0]
    print(f"\n### {group}\n")
    print(f"| contender | median CPU s | / {reference} | peak MiB (fresh process, one call) |")
    print("|---|---|---|---|")
    for name in names:
        mib = f"{memory[name]:.0f}" if name in memory else "-"
        print(f"| {name} | {medians[name]:.3f} | {medians[name] / medians[reference]:.2f}x | {mib} |")
    print("\nPer-pair ratios (row / column):\n")
    print("| | " + " | ".join(ours) + " |")
    print("|---|" + "---|" * len(ours))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{medians[name] / medians[o]:.2f}x" for o in ours) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", nargs="+", default=["gradient", "occlusion"], choices=list(GROUPS))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed calls per contender")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--width", type=int, default=256, help="CLIP width (768 is ViT-B/16's)")
    parser.add_argument("--layers", type=int, default=6, help="CLIP depth per tower (12 is ViT-B/16's)")
    parser.add_argument("--fusion-relevancy", action="store_true", help="fusion group: also BimodalRelevancy")
    parser.add_argument("--memory", action="store_true", help="peak memory of each contender, fresh process")
    parser.add_argument("--memory-only", action="store_true", help="only the peak memory, no timing")
    parser.add_argument("--only", nargs="*", default=None, help="contender names (substrings) to keep")
    parser.add_argument("--child", nargs=2, metavar=("GROUP", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.child:
        memory_child(*args.child, args)
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); CLIP width {args.width}, "
          f"{args.layers} layers per tower, {args.prompts} prompts; medians of {args.repeats} interleaved calls")
    for group in args.groups:
        if group == "fusion":
            torch.set_flush_denormal(True)  # random BLIP's vision gradients are denormal (bench_fusion_cost.py)
        contenders = GROUPS[group](args)
        if args.only:
            contenders = {n: b for n, b in contenders.items() if any(s in n for s in args.only)}
        if args.memory_only:
            for name, mib in peak_memory(group, list(contenders), args).items():
                print(f"| {name} | peak {mib:.0f} MiB |")
            continue
        medians = interleaved_medians(contenders, args.repeats)
        memory = peak_memory(group, list(contenders), args) if args.memory else {}
        report(group, medians, memory)
        if hasattr(GROUPS[group], "agreement"):
            print("\n" + GROUPS[group].agreement())
    return 0


if __name__ == "__main__":
    sys.exit(main())
