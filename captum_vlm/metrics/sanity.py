"""Sanity checks for attribution methods.

Adebayo et al. 2018, "Sanity Checks for Saliency Maps" (NeurIPS): a map that barely changes
when the model's weights are re-initialised cannot be explaining what the model learned.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor, nn
from tqdm.auto import tqdm


@dataclass
class RandomizationResult:
    """Outcome of :func:`model_randomization_check`, one entry per step.

    Attributes:
        layers: step names; ``"none"`` first (no layer randomised), then the layer(s)
            randomised at each step (cumulative in the cascading check).
        spearman: Spearman rank correlation between the trained map and each step's map.
        spearman_abs: the same on absolute values (Adebayo et al. report both).
        ssim: structural similarity of min-max-normalised maps, or None if not asked for.
        maps: each step's map (detached, on CPU).
    """

    layers: list[str]
    spearman: list[float]
    spearman_abs: list[float]
    ssim: list[float] | None = None
    maps: list[Tensor] = field(default_factory=list)


def _spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two flattened maps (NaN if one is constant)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic
    return float(value)


def ssim(a: Tensor, b: Tensor, window: int = 7) -> float:
    """Structural similarity (Wang et al. 2004) of two maps, as in Adebayo et al. 2018.

    Each map is min-max normalised to [0, 1]; local means, variances and covariance use a
    uniform ``window`` x ``window`` window (shrunk to fit small maps, valid positions only),
    with the usual constants C1 = (0.01)^2 and C2 = (0.03)^2. The last two dimensions are
    spatial; any leading dimensions are averaged over.

    Args:
        a: map, (..., H, W).
        b: map of the same shape.
        window: side of the averaging window.

    Returns:
        Mean SSIM, 1.0 for identical maps.
    """
    if a.shape != b.shape:
        raise ValueError(
            f"maps to compare must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.ndim < 2:
        raise ValueError(f"ssim needs maps with at least 2 dimensions; got shape {tuple(a.shape)}")

    def prep(m: Tensor) -> Tensor:
        m = m.to(torch.float64).reshape(-1, 1, *m.shape[-2:])
        lo = m.amin(dim=(2, 3), keepdim=True)
        hi = m.amax(dim=(2, 3), keepdim=True)
        return (m - lo) / (hi - lo).clamp(min=1e-12)

    x, y = prep(a), prep(b)
    k = min(window, x.shape[-2], x.shape[-1])
    mean = lambda t: F.avg_pool2d(t, k, stride=1)  # noqa: E731
    mx, my = mean(x), mean(y)
    vx = mean(x * x) - mx**2
    vy = mean(y * y) - my**2
    cov = mean(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def reinitialize(module: nn.Module) -> None:
    """Re-initialise a module's parameters in place (the default for the randomisation check).

    Every submodule with a ``reset_parameters`` method resets itself (PyTorch's default
    initialisation: random weights for linear/conv/embedding layers, ones and zeros for
    norms, as Adebayo et al. re-initialise to the initial distribution); parameters left
    over (e.g. a bare ``nn.Parameter`` such as a class embedding) are drawn from a truncated
    normal with std 0.02.

    Args:
        module: the module to re-initialise.

    Example:
        >>> layer = nn.Linear(2, 2); old = layer.weight.clone()
        >>> reinitialize(layer); bool(torch.equal(layer.weight, old))
        False
    """
    done: set[int] = set()
    for sub in module.modules():
        if hasattr(sub, "reset_parameters") and callable(sub.reset_parameters):
            sub.reset_parameters()
            done.update(id(p) for p in sub.parameters(recurse=False))
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in done:
                nn.init.trunc_normal_(p, std=0.02)


def _layer_names(model: nn.Module, layers: Sequence[str | nn.Module] | None) -> list[str]:
    if layers is None:
        names = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
        if not names:
            raise ValueError("model has no child module with parameters; pass layers=")
        return names[::-1]
    if isinstance(layers, str | nn.Module):
        layers = [layers]
    by_id = {id(m): n for n, m in model.named_modules()}
    names = []
    for layer in layers:
        if isinstance(layer, nn.Module):
            if id(layer) not in by_id or by_id[id(layer)] == "":
                raise ValueError(
                    f"layers: module {type(layer).__name__} is not a submodule of the model; "
                    "pass submodules of the model or their names"
                )
            names.append(by_id[id(layer)])
        elif isinstance(layer, str):
            try:
                model.get_submodule(layer)
            except AttributeError:
                raise ValueError(f"layers: model has no submodule named {layer!r}") from None
            names.append(layer)
        else:
            raise TypeError(f"layers must hold module names or modules, got {type(layer).__name__}")
    return names


def model_randomization_check(
    model: nn.Module,
    explain_fn: Callable[[nn.Module, Any], Tensor],
    inputs: Any,
    layers: Sequence[str | nn.Module] | None = None,
    *,
    cascading: bool = True,
    compute_ssim: bool = False,
    reinit: Callable[[nn.Module], None] = reinitialize,
    seed: int = 0,
    show_progress: bool = False,
) -> RandomizationResult:
    """Model-parameter randomisation test (Adebayo et al. 2018).

    Works on deep copies: the passed model, its parameters, mode and the global random
    state are left as found. The trained map comes from ``explain_fn(copy, inputs)``. Step
    "none" re-runs ``explain_fn`` on the unrandomised copy (correlation 1 for a
    deterministic method; lower values show the method's own noise floor). Then, from the
    top of the network down, each layer in ``layers`` is re-initialised and the map is
    recomputed. In the cascading check (default) layers stay randomised, so step i has the
    top i layers random; with ``cascading=False`` each step randomises one layer of a fresh
    copy (the paper's independent test). A faithful method's correlations should drop.

    Args:
        model: the trained model; never modified.
        explain_fn: ``explain_fn(model, inputs) -> map`` (any shape, same at every step).
        inputs: passed to ``explain_fn`` unchanged.
        layers: modules or their names (as in ``model.named_modules()``) in the order to
            randomise, top first. Default: the model's top-level children that hold
            parameters, last one first.
        cascading: cumulative (True) or independent (False) randomisation.
        compute_ssim: also report :func:`ssim` between maps.
        reinit: function that re-initialises a module in place; default
            :func:`reinitialize`.
        seed: seed for the re-initialisation (the global RNG state is restored after).
        show_progress: draw a tqdm bar over the steps.

    Returns:
        :class:`RandomizationResult`.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> def grad_map(m, x):
        ...     x = x.clone().requires_grad_(True)
        ...     m(x)[:, 0].sum().backward()
        ...     return x.grad
        >>> r = model_randomization_check(net, grad_map, torch.randn(3, 4))
        >>> r.layers
        ['none', '2', '0']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(explain_fn):
        raise TypeError(
            f"explain_fn must be callable as explain_fn(model, inputs), got {explain_fn!r}"
        )
    names = _layer_names(model, layers)

    def run(m: nn.Module) -> Tensor:
        out = explain_fn(m, inputs)
        if not isinstance(out, Tensor | np.ndarray):
            raise TypeError(f"explain_fn must return a tensor, got {type(out).__name__}")
        return torch.as_tensor(out).detach().to("cpu", torch.float64)

    work = copy.deepcopy(model)
    reference = run(work)
    maps = [run(work)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for name in tqdm(names, desc="randomization", disable=not show_progress):
            if not cascading:
                work = copy.deepcopy(model)
            reinit(work.get_submodule(name))
            maps.append(run(work))

    for i, m in enumerate(maps):
        if m.shape != reference.shape:
            raise ValueError(
                f"explain_fn returned shape {tuple(m.shape)} at step {i}, but {tuple(reference.shape)} "
                "for the trained model"
            )
    result = RandomizationResult(
        layers=["none", *names],
        spearman=[_spearman(reference, m) for m in maps],
        spearman_abs=[_spearman(reference.abs(), m.abs()) for m in maps],
        maps=maps,
    )
    if compute_ssim:
        result.ssim = [ssim(reference, m) for m in maps]
    return result
