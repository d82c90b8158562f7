"""Quick start: where does the bundled CLIP look, and does that agree with the scene's masks?

Run with ``.venv/bin/python tutorials/quickstart.py`` after ``make demo`` (or ``make setup``).
Writes ``tutorials/out/quickstart-*.png`` and ``tutorials/out/quickstart.html``.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import captum_vlm as cv  # noqa: E402
from captum_vlm import metrics, viz, zoo  # noqa: E402
from captum_vlm.attr import GradECLIP  # noqa: E402

out = Path(__file__).parent / "out"
out.mkdir(exist_ok=True)

# 1. A bundled model and a synthetic scene whose object masks are known.
model, processor = zoo.load("shapes-clip")
scene = zoo.scenes.make_scene(7, n_objects=2)
prompts = zoo.scenes.zero_shot_prompts()
print("scene caption:", scene.caption)

# 2. The Captum layer: an Attribution with Captum's attribute() conventions.
inputs = processor(images=scene.pil(), text=prompts, return_tensors="pt", padding=True)
target = prompts.index(" ".join(["a", scene.objects[0].colour, scene.objects[0].shape]))
heat = GradECLIP(model).attribute(
    inputs["pixel_values"],
    additional_forward_args=(inputs["input_ids"], inputs["attention_mask"]),
    target=target,
)
print("map shape (like pixel_values):", tuple(heat.shape))

# 3. Does the map point at the object the prompt names?
hit = metrics.pointing_game(heat[0], scene.objects[0].mask)
print(f"pointing game for {prompts[target]!r}: {'hit' if hit.mean == 1 else 'miss'}")

fig = viz.overlay(scene.image, heat[0], method="grad-eclip", layers="last vision block", target=prompts[target])
fig.savefig(out / "quickstart-grad-eclip.png", dpi=120, bbox_inches="tight")

# 4. The convenience layer: several methods, one self-contained HTML report.
report = cv.explain(model, processor, scene.pil(), [prompts[target], "a green triangle"],
                    methods=["grad-eclip", "rollout", "relevancy"])
report.to_html(out / "quickstart.html")
print("wrote", out / "quickstart.html")
