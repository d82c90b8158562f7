"""Linear probes per layer of the vision tower, with a label-shuffled control.

Alain & Bengio (2016), "Understanding intermediate layers using linear classifier probes": fit a
linear classifier on a layer's representation; its held-out accuracy says how linearly readable a
concept is there. Hewitt & Liang (2019), "Designing and interpreting probes with control tasks":
the same probe on shuffled labels shows what a probe reaches without the concept (chance).

Example:
    >>> result = cv.lens.probe(model, processor, images, colours)      # doctest: +SKIP
    >>> result.accuracy, result.control                                # per layer  # doctest: +SKIP
    >>> result.plot()                                                  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from captum_vlm._checks import check_choice, check_count, check_one_tower_run, check_pixel_values
from captum_vlm.adapters import get_adapter
from captum_vlm.hooks import capture, preserved_model_state

__all__ = ["ProbeResult", "probe", "layer_features", "patch_labels"]


def _estimator(C: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))


@dataclass
class ProbeResult:
    """Cross-validated probe accuracy per layer and its shuffled-label control.

    Attributes:
        where: ``"image"`` (the pooled token) or ``"patches"`` (every patch token).
        layers: the probed layers (0 = embeddings, ``l`` = output of block ``l``).
        accuracy, accuracy_std: mean and standard deviation over the folds, per layer.
        control, control_std: the same with the labels shuffled once (seeded).
        chance: the share of the most frequent class.
        classes: the label values, in the order of the probes' decision columns.
        estimators: per layer, the probe refitted on all samples (for :meth:`heat_map`).
        grid: the patch grid ``(rows, cols)`` of the probed images.
    """

    where: str
    layers: list[int]
    accuracy: np.ndarray
    accuracy_std: np.ndarray
    control: np.ndarray
    control_std: np.ndarray
    chance: float
    classes: list
    grid: tuple[int, int]
    estimators: dict[int, Any] = field(default_factory=dict, repr=False)

    def plot(self, title: str | None = None):
        """Accuracy per layer with the shuffled control and the chance level (a Figure)."""
        from captum_vlm.viz.lens_inside import plot_probe_curves

        return plot_probe_curves(self, title=title)

    def html_section(self, title: str | None = None) -> str:
        """This result as one ``<section>`` of an inside-the-model report (escaped, no script)."""
        from captum_vlm.viz.lens_inside import probe_html

        return probe_html(self, title=title or f"linear probe ({self.where})")

    def to_html(self, path: str | Path | None = None, title: str | None = None) -> str:
        """A self-contained HTML page of this result (see :func:`captum_vlm.lens.inside_report`)."""
        from captum_vlm.lens.inside_report import inside_report

        return inside_report([self], path, title=title)

    def heat_map(self, model: nn.Module, pixel_values: torch.Tensor, layer: int, class_index: int = -1) -> np.ndarray:
        """The fitted patch probe's decision values over the patches of new images.

        Args:
            model: the probed model.
            pixel_values: ``[B, 3, H, W]`` with the probed images' size.
            layer: one of :attr:`layers`.
            class_index: which class's decision column (binary probes have one; -1 = last).

        Returns:
            ``[B, rows, cols]`` decision values (positive: the probe says the class).
        """
        if self.where != "patches":
            raise ValueError(f"where: heat maps need a patch probe (where='patches'), this one is {self.where!r}")
        if layer not in self.estimators:
            raise ValueError(f"layer: expected one of the probed layers {self.layers}, got {layer!r}")
        features = layer_features(model, pixel_values, [layer], "patches")[layer]
        b, p, d = features.shape
        scores = self.estimators[layer].decision_function(features.reshape(b * p, d))
        if scores.ndim == 2:
            scores = scores[:, class_index]
        return scores.reshape(b, *self.grid)


def _num_layers(adapter) -> int:
    return len(adapter.vision_blocks()) + 1


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    chosen = list(layers)
    bad = [x for x in chosen if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n_layers]
    if bad or not chosen:
        raise ValueError(f"layers: expected ints in 0..{n_layers - 1} (0 = embeddings, "
                         f"{n_layers - 1} = last block), got {layers!r}")
    return chosen


def layer_features(
    model: nn.Module,
    pixel_values: torch.Tensor,
    layers: Sequence[int] | None = None,
    where: str = "image",
    batch_size: int = 32,
) -> dict[int, np.ndarray]:
    """The vision tower's hidden states per layer, as probe features.

    Layer 0 is the input of the first block (the embeddings), layer ``l`` the output of block
    ``l``. ``where="image"``: the pooled token, the first prefix (CLS) token where the tower has
    one, else the mean of the patch tokens, ``[N, D]``; ``"patches"``: every patch token,
    ``[N, rows * cols, D]``.
    """
    check_choice(where, ("image", "patches"), "where")
    check_pixel_values(pixel_values)
    check_count(batch_size, "batch_size")
    adapter = get_adapter(model)
    check_one_tower_run(adapter, "model", "probe features are the tower's patch tokens")
    layers = _check_layers(layers, _num_layers(adapter))
    prefix = adapter.num_prefix_tokens
    chunks: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    with preserved_model_state(model), torch.no_grad():
        for start in range(0, pixel_values.shape[0], batch_size):
            with capture(model, blocks=adapter.vision_blocks(), grads=False) as rec:
                adapter.vision_outputs(pixel_values[start : start + batch_size])
            hidden = [rec.block_inputs[0], *rec.block_outputs]
            for layer in layers:
                h = hidden[layer]
                if where == "patches":
                    out = h[:, prefix:]
                else:
                    out = h[:, 0] if prefix > 0 else h[:, prefix:].mean(dim=1)
                chunks[layer].append(out.float().cpu().numpy())
    return {layer: np.concatenate(parts) for layer, parts in chunks.items()}


def patch_labels(mask: Any, grid: tuple[int, int], fraction: float = 0.5) -> np.ndarray:
    """Per-patch labels from a pixel mask at the model's input resolution.

    Args:
        mask: boolean ``[H, W]`` (e.g. a zoo scene object's mask, drawn at the input size).
        grid: the patch grid ``(rows, cols)``; ``H`` and ``W`` must be multiples of it.
        fraction: a patch is True when at least this share of its pixels lie in the mask.

    Returns:
        Boolean ``[rows, cols]``.
    """
    mask = np.asarray(mask, dtype=float)
    rows, cols = grid
    if mask.ndim != 2 or mask.shape[0] % rows or mask.shape[1] % cols:
        raise ValueError(f"mask: expected [H, W] with H, W multiples of the grid {grid}, got shape {mask.shape}")
    blocks = mask.reshape(rows, mask.shape[0] // rows, cols, mask.shape[1] // cols)
    return blocks.mean(axis=(1, 3)) >= fraction


def _check_labels(labels: Any, where: str, n_images: int, grid: tuple[int, int]) -> np.ndarray:
    y = np.asarray(labels)
    if where == "image":
        if y.ndim != 1 or len(y) != n_images:
            raise ValueError(f"labels: expected one label per image ({n_images}), got shape {y.shape}")
        return y
    rows, cols = grid
    if y.shape not in ((n_images, rows, cols), (n_images, rows * cols)):
        raise ValueError(f"labels: patch probes take one label per patch, shape ({n_images}, {rows}, {cols}), "
                         f"got shape {y.shape}")
    return y.reshape(n_images * rows * cols)


def probe(
    model: nn.Module,
    processor: Any,
    images: Any,
    labels: Any,
    where: str = "image",
    layers: Sequence[int] | None = None,
    cv: int = 5,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 1000,
    batch_size: int = 32,
    show_progress: bool = False,
) -> ProbeResult:
    """Fit a logistic-regression probe at every layer of the vision tower.

    The probe is ``StandardScaler`` then ``LogisticRegression(C, max_iter)``, scored with
    ``cross_val_score``: image probes on ``StratifiedKFold(cv, shuffle=True, random_state=seed)``,
    patch probes on ``GroupKFold(cv)`` with the image as group (no image in train and test). The
    control shuffles the labels with ``numpy.random.default_rng(seed).permutation``.

    Args:
        model: any model whose adapter has a vision tower.
        processor: its processor (``images`` -> ``pixel_values``); None when ``images`` already
            is a ``pixel_values`` tensor.
        images: a list of images, or ``pixel_values`` ``[N, 3, H, W]``.
        labels: ``where="image"``: one label per image; ``"patches"``: ``[N, rows, cols]`` per
            patch (see :func:`patch_labels`).
        where: ``"image"`` (pooled token) or ``"patches"`` (each patch token).
        layers: layers to probe (0 = embeddings); None for all.
        cv: number of folds.
        seed: folds and control shuffle.
        C, max_iter: the logistic regression's.
        batch_size: images per forward.
        show_progress: a tqdm bar over the layers.

    Returns:
        :class:`ProbeResult`.
    """
    from sklearn.model_selection import GroupKFold, StratifiedKFold, cross_val_score

    check_choice(where, ("image", "patches"), "where")
    check_count(cv, "cv", minimum=2)
    adapter = get_adapter(model)
    check_one_tower_run(adapter, "model", "probe features are the tower's patch tokens")
    n_layers = _num_layers(adapter)
    layers = _check_layers(layers, n_layers)
    if isinstance(images, torch.Tensor):
        pixel_values = check_pixel_values(images, name="images")
    else:
        if processor is None:
            raise ValueError("processor: needed to turn images into pixel_values (or pass a tensor)")
        pixel_values = processor(images=list(images), return_tensors="pt")["pixel_values"]
    n_images = pixel_values.shape[0]
    grid = adapter.vision_grid(pixel_values)  # the vision blocks' patch tokens
    y = _check_labels(labels, where, n_images, grid)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"labels: a probe needs at least two classes, got only {classes.tolist()}")
    if where == "image" and counts.min() < cv:
        raise ValueError(f"labels: the rarest class has {counts.min()} examples, fewer than cv={cv} folds; "
                         "give more examples or lower cv")
    if where == "patches" and n_images < cv:
        raise ValueError(f"images: patch probes split by image; {n_images} images for cv={cv} folds")
    features = layer_features(model, pixel_values, layers, where, batch_size)
    if where == "image":
        folds, groups = StratifiedKFold(cv, shuffle=True, random_state=seed), None
    else:
        folds, groups = GroupKFold(cv), np.repeat(np.arange(n_images), grid[0] * grid[1])
    shuffled = np.random.default_rng(seed).permutation(y)
    acc, acc_std, ctl, ctl_std, estimators = [], [], [], [], {}
    iterator = layers
    if show_progress:
        from tqdm.auto import tqdm

        iterator = tqdm(layers, desc="probe layers")
    for layer in iterator:
        x = features[layer].reshape(len(y), -1)
        scores = cross_val_score(_estimator(C, max_iter), x, y, cv=folds, groups=groups)
        control = cross_val_score(_estimator(C, max_iter), x, shuffled, cv=folds, groups=groups)
        acc.append(scores.mean())
        acc_std.append(scores.std())
        ctl.append(control.mean())
        ctl_std.append(control.std())
        estimators[layer] = _estimator(C, max_iter).fit(x, y)
    return ProbeResult(
        where=where, layers=layers, accuracy=np.array(acc), accuracy_std=np.array(acc_std),
        control=np.array(ctl), control_std=np.array(ctl_std), chance=float(counts.max() / counts.sum()),
        classes=classes.tolist(), grid=grid, estimators=estimators,
    )
