"""Snapshot of everything a method must leave as it found it, for tests."""

from __future__ import annotations

import torch
from torch import nn

from captum_vlm.hooks import _HOOK_DICTS, attention_implementations


def snapshot(model: nn.Module) -> dict:
    return {
        "hooks": [sum(len(getattr(m, name, {}) or {}) for name in _HOOK_DICTS) for m in model.modules()],
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad is None for p in model.parameters()],
        "attn": attention_implementations(model),
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key in ("hooks", "training", "requires_grad", "grads", "attn"):
        assert after[key] == before[key], f"model {key} changed"
    for name, value in before["params"].items():
        assert torch.equal(after["params"][name], value), f"parameter {name} changed"
