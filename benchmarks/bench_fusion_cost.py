"""Cost of the fusion-model methods on a BLIP VQA model of real size (not a test).

A random-initialised ``BlipForQuestionAnswering`` built from ``BlipConfig()`` defaults (the
size of ``Salesforce/blip-vqa-base``: ViT-B/16 at 384 px, 577 image tokens, 12-layer question
encoder and answer decoder), one image, a 10-token question and a 4-token answer (start token,
two words, end token: three scored tokens). Times are medians of ``--repeats`` calls after a
warm-up, each set against one no-grad forward of the same model:

* Grad-CAM: ``CrossAttentionGradCAM.attribute_tokens`` (one backward per scored token, through
  the question encoder down to its cross-attention layer);
* relevancy: ``BimodalRelevancy.attribute_tokens`` (one backward per scored token through the
  whole model, then the relevancy rules over all 60 recorded attention maps).

Random BLIP is a trap on CPUs: its vision ``initializer_range`` is 1e-10, so gradients inside
the vision tower are denormal floats, which x86 CPUs process far more slowly. The script
therefore runs with ``torch.set_flush_denormal(True)`` (trained checkpoints do not have such
gradients) and, with ``--denormal-check``, also times one plain backward with and without it.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_fusion_cost.py --denormal-check

Prints a Markdown table for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from bench_two_tower import median_seconds  # noqa: E402  (this folder is on sys.path when run as a script)

from captum_vlm.attr import BimodalRelevancy, CrossAttentionGradCAM  # noqa: E402
from captum_vlm.targets import TokenLogProbs  # noqa: E402


def base_size_vqa():
    """Random BLIP VQA of base size, its inputs and the forward arguments of the methods."""
    from transformers import BlipConfig, BlipForQuestionAnswering

    torch.manual_seed(0)
    config = BlipConfig()
    model = BlipForQuestionAnswering(config).eval()
    size = config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size)
    question = torch.randint(1000, 2000, (1, 10))
    question[:, 0] = 101
    answer = torch.tensor([[config.text_config.bos_token_id, 2001, 2002, config.text_config.sep_token_id]])
    return model, pixels, (question, torch.ones_like(question), answer, torch.ones_like(answer))


def plain_backward_seconds(model, pixels, args) -> float:
    """One forward with graph and the backward of one answer token's log-probability to the pixels."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    pix = pixels.clone().requires_grad_(True)
    try:
        score = TokenLogProbs(model)(pix, *args)[:, 1].sum()
        start = time.perf_counter()
        torch.autograd.grad(score, pix)
        return time.perf_counter() - start
    finally:
        for parameter in model.parameters():
            parameter.requires_grad_(True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method")
    parser.add_argument("--denormal-check", action="store_true",
                        help="also time one plain backward with denormals kept (slow: ~40 s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, pixels, forward_args = base_size_vqa()
    question, q_mask, answer, _ = forward_args
    lines = []
    if args.denormal_check:
        kept = plain_backward_seconds(model, pixels, forward_args)
        torch.set_flush_denormal(True)
        flushed = plain_backward_seconds(model, pixels, forward_args)
        lines.append(f"Plain backward of one answer token to the pixels: {kept:.2f} s with denormals, "
                     f"{flushed:.2f} s flushed ({kept / flushed:.1f}x).")
    if not torch.set_flush_denormal(True):
        print("this CPU cannot flush denormals; timings will be inflated", file=sys.stderr)

    def forward():
        with torch.no_grad():
            model(input_ids=question, attention_mask=q_mask, pixel_values=pixels, decoder_input_ids=answer)

    base = median_seconds(forward, args.repeats)
    rows = [("forward (no grad)", base)]
    for name, method in (("cross-attention Grad-CAM", CrossAttentionGradCAM(model)),
                         ("bi-modal relevancy", BimodalRelevancy(model))):
        rows.append((name, median_seconds(
            lambda method=method: method.attribute_tokens(pixels, additional_forward_args=forward_args), args.repeats)))
    print("| call (3 scored answer tokens) | seconds | / forward |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / base:.1f}x |")
    for line in lines:
        print("\n" + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
