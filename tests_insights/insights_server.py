"""The Insights server the HTTP test talks to: ``python insights_server.py PORT``.

It serves :func:`captum_vlm.insights.fusion_visualizer` on the bundled BLIP VQA model, for the
scene and question of :func:`example`, on 127.0.0.1 (Insights' default host), until terminated.
"""

from __future__ import annotations

import sys

import torch

ANSWERS = ["red", "blue", "green", "yellow"]


def example():
    """The model, processor, scene image and question both sides use."""
    import captum_vlm as cv

    torch.set_num_threads(1)
    model, processor = cv.zoo.load("shapes-blip-vqa")
    scene = cv.zoo.scenes.make_scene(11, labels=[("red", "circle"), ("blue", "square")])
    return model, processor, scene.pil(), "what color is the square?"


def visualizer():
    import captum_vlm.insights as cvi

    model, processor, image, question = example()
    return cvi.fusion_visualizer(model, processor, [image], [question], ANSWERS)


if __name__ == "__main__":
    visualizer().serve(blocking=True, port=int(sys.argv[1]))
