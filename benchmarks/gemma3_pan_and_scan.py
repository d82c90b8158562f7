"""Gemma 3 pan and scan: the global view captum-vlm recomputes from the canvas of crops (torch
bilinear, antialiased) against the processor's (PIL's bilinear resize of the original image).

For tiny random Gemma 3 models (``tests/tiny_models.py``) and the real ``Gemma3Processor``
(``tests/test_family_gemma3.py``'s, crops of 8 px or more), per image: the crops (exactly the
processor's, checked), the largest and mean |pixel| difference of the two global views (normalised
units), the largest logit difference relative to the largest logit (all positions, and the last
one), and whether the greedy answer of 5 new tokens changes.

    PYTHONPATH=.:tests python benchmarks/gemma3_pan_and_scan.py --seeds 3
"""

from __future__ import annotations

import argparse

import torch
from idefics3_global_view import pictures

SIZES = ((40, 90), (90, 40), (30, 100))  # 2 crops side by side, 2 stacked, 3 (the last one narrower)


def main() -> None:
    import test_family_gemma3 as fam
    import tiny_models as tm

    from captum_vlm.adapters import get_adapter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    processor = fam.tiny_processor()
    tok = processor.tokenizer
    prompt = "<start_of_image> what color is the circle"
    rows = []
    for seed in range(args.seeds):
        model = tm.gemma3(seed, image_token_id=tok.image_token_id, boi_token_id=tok.boi_token_id,
                          eoi_token_id=tok.eoi_token_id)
        adapter = get_adapter(model)
        for name, image in pictures(seed, SIZES).items():
            raw = processor(images=[[image]], text=[prompt], return_tensors="pt", **fam.PAN)
            canvas = adapter.processor_inputs(raw)["pixel_values"]
            ours = adapter.model_inputs(canvas, raw["input_ids"], raw["attention_mask"])
            assert torch.equal(ours["pixel_values"][1:], raw["pixel_values"][1:])  # the crops exactly
            ours["token_type_ids"] = raw["token_type_ids"]
            gap = (ours["pixel_values"][0] - raw["pixel_values"][0]).abs()
            with torch.no_grad():
                a, b = model(**ours).logits, model(**raw).logits
                scale = b.abs().max()
                answer_a = model.generate(**ours, max_new_tokens=5, do_sample=False)
                answer_b = model.generate(**raw, max_new_tokens=5, do_sample=False)
            rows.append((name, tuple(canvas.shape[-2:]), float(gap.max()), float(gap.mean()),
                         float((a - b).abs().max() / scale), float((a[:, -1] - b[:, -1]).abs().max() / scale),
                         not torch.equal(answer_a, answer_b)))
    print("| image | canvas | max abs pixel diff | mean | max rel. logit diff, all positions | at the last position "
          "| greedy answer changed |")
    print("|---|---|---|---|---|---|---|")
    for key in sorted({(r[0], r[1]) for r in rows}):
        sel = [r for r in rows if (r[0], r[1]) == key]
        print(f"| {key[0]} | {key[1][0]}x{key[1][1]} | {max(r[2] for r in sel):.3f} | {max(r[3] for r in sel):.3f} "
              f"| {max(r[4] for r in sel):.4f} | {max(r[5] for r in sel):.4f} | {sum(r[6] for r in sel)} of {len(sel)} |")


if __name__ == "__main__":
    main()
