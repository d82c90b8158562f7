"""Snapshot of everything a method must leave as it found it, for tests."""

from __future__ import annotations

import torch
from torch import nn

from captum_vlm.hooks import _HOOK_DICTS, attention_implementations, tensor_attributes


def snapshot(model: nn.Module) -> dict:
    return {
        "hooks": [sum(len(getattr(m, name, {}) or {}) for name in _HOOK_DICTS) for m in model.modules()],
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad is None for p in model.parameters()],
        "attn": attention_implementations(model),
        # the tensors a forward caches on a module (Qwen-VL's rope_deltas), by identity
        "cached": [tensor_attributes(m) for m in model.modules()],
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key in ("hooks", "training", "requires_grad", "grads", "attn"):
        assert after[key] == before[key], f"model {key} changed"
    for was, now in zip(before["cached"], after["cached"]):  # the very objects (held by the snapshot)
        assert was.keys() == now.keys() and all(now[k] is v for k, v in was.items()), \
            f"a cached tensor attribute changed: {sorted(k for k in was if now.get(k) is not was[k])}"
    for name, value in before["params"].items():
        assert torch.equal(after["params"][name], value), f"parameter {name} changed"
