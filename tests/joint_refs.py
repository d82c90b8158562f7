"""References for generative (joint-sequence) models, computed from the eager model's own outputs:
teacher-forced log-probabilities, Grad-CAM over the language model's attention and the bimodal
relevancy rule (Chefer et al., 2021), shared by the family tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


def eager_copy(model):
    """A deep copy of ``model`` running eager attention (which returns probabilities)."""
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin


def log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t] | ids[<t]) at t = 1.. ``[B, T-1]``."""
    return F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]


def gradcam_rows(attention: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of one attention layer ``[B, heads, Q, K]`` for ``score``: ``mean_h(A * relu(dS/dA))``
    ``[B, Q, K]`` (the caller sums the text query rows)."""
    grad = torch.autograd.grad(score, attention, retain_graph=True)[0]
    return (attention * grad.clamp(min=0)).mean(1)


def relevancy(attentions, score: torch.Tensor, row: int = 0) -> torch.Tensor:
    """The joint relevancy matrix ``R = prod_l (I + mean_h relu(A_l * dS/dA_l))`` ``[T, T]`` of example ``row``."""
    grads = torch.autograd.grad(score, attentions, retain_graph=True)
    length = attentions[0].shape[-1]
    r = torch.eye(length, dtype=attentions[0].dtype)
    for a, g in zip(attentions, grads):
        r = r + (a * g).clamp(min=0).mean(1)[row] @ r
    return r
