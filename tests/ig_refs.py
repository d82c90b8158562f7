"""Integrated Gradients worked by hand at a patch embedding, the reference the family tests
compare ``TokenIntegratedGradients`` with (Sundararajan et al., 2017; Captum's trapezoid nodes)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from captum.attr._utils.approximation_methods import approximation_parameters
from torch import nn


def embedding_path_integral(
    embed: nn.Module, inputs: torch.Tensor, score: Callable[[], torch.Tensor], n_steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """IG at ``embed``'s output: the output scaled from the embedding of zero inputs to that of
    ``inputs`` (``riemann_trapezoid``), the gradient of ``score()`` (a scalar, computed by a
    forward that runs ``embed``) summed along the path, times the embedding's change.

    Returns:
        ``(attributions, base)``: per element of ``embed(inputs)``, and the baseline embedding.
    """
    with torch.no_grad():
        full, base = embed(inputs), embed(torch.zeros_like(inputs))
    step_sizes, alphas = approximation_parameters("riemann_trapezoid")
    total = torch.zeros_like(full)
    for step, alpha in zip(step_sizes(n_steps), alphas(n_steps)):
        point = (base + alpha * (full - base)).requires_grad_(True)
        handle = embed.register_forward_hook(lambda m, a, out, point=point: point)
        try:
            value = score()
        finally:
            handle.remove()
        total += step * torch.autograd.grad(value, point)[0]
    return total * (full - base), base
