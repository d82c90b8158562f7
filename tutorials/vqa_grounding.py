"""Which part of the image did the VQA model's answer rely on? Two fusion-model methods on the
bundled BLIP VQA model, checked against the scene's object masks.

Run with ``.venv/bin/python tutorials/vqa_grounding.py`` after ``make demo`` (or ``make setup``).
Writes ``tutorials/out/vqa-*.png`` and ``tutorials/out/vqa.html``.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import captum_vlm as cv  # noqa: E402
from captum_vlm import metrics, viz, zoo  # noqa: E402

out = Path(__file__).parent / "out"
out.mkdir(exist_ok=True)

# 1. The bundled BlipForQuestionAnswering and a scene with two objects of different colours.
model, processor = zoo.load("shapes-blip-vqa")
scene = zoo.scenes.make_scene(11, labels=[("red", "circle"), ("blue", "square")])
question = "what shape is the blue object?"

# 2. What does the model answer? (greedy, as generate() does)
inputs = processor(images=scene.pil(), text=question, return_tensors="pt")
answer_ids = model.generate(**inputs, max_new_tokens=5)
answer = processor.decode(answer_ids[0], skip_special_tokens=True).strip()
print(f"{question} -> {answer}")

# 3. One map per answer token: position 1 is the answer word (0 is the start token).
methods = {"bi-modal relevancy": cv.BimodalRelevancy(model),
           "Grad-CAM, cross-attention 0": cv.CrossAttentionGradCAM(model, layer=0)}
args = (inputs["input_ids"], inputs["attention_mask"], answer_ids, (answer_ids != 0).long())
for name, method in methods.items():
    heat = method.attribute(inputs["pixel_values"], target=1, additional_forward_args=args)
    fig = viz.overlay(scene.image, heat[0], method=name, target=f"{question} -> {answer}")
    fig.savefig(out / f"vqa-{name.split(',')[0].replace(' ', '-')}.png", dpi=120, bbox_inches="tight")

# 3b. One scene proves little: does the answer's map point at the object asked about, over 30
# scenes? (benchmarks/bench_fusion.py does this on 200 held-out scenes.)
hits = {name: 0 for name in methods}
scenes = zoo.scenes.make_scenes(2024, 30, size=64, n_objects=2)
asked = [s for s in scenes if len({c for c, _ in s.labels}) == 2]
for s in asked:
    colour, shape = s.labels[0]
    inputs = processor(images=s.pil(), text=f"what shape is the {colour} object?", return_tensors="pt")
    answer = processor.tokenizer(shape, return_tensors="pt")
    args = (inputs["input_ids"], inputs["attention_mask"], answer["input_ids"], answer["attention_mask"])
    for name, method in methods.items():
        heat = method.attribute(inputs["pixel_values"], target=1, additional_forward_args=args, return_grid=True)
        hits[name] += int(metrics.pointing_game(heat[0], s.objects[0].mask).mean == 1)
for name, n in hits.items():
    print(f"{name}: the map's peak lies on the object asked about in {n} of {len(asked)} scenes")

# 4. The same through explain(): it generates the answer itself and writes one report.
report = cv.explain(model, processor, scene.pil(), [question, "what color is the circle?"],
                    methods=["bimodal-relevancy", "cross-attention-gradcam"])
report.to_html(out / "vqa.html")
print("wrote", out / "vqa.html")
