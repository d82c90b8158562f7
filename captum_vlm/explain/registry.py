"""The method registry: ``register_method`` and what a registered method gets and returns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from captum_vlm.explain.answering import Answers


@dataclass
class MapRecord:
    """One map: what ``method`` says about ``target``.

    Args:
        method: registry name of the method.
        target: the prompt, word or answer token explained.
        grid: the map on the model's patch grid ``(h, w)``.
        details: labels for figures: layers, head aggregation, target...
        tokens: token strings when the method also scores the text.
        token_scores: one score per token.
    """

    method: str
    target: str
    grid: np.ndarray
    details: dict[str, str] = field(default_factory=dict)
    tokens: list[str] | None = None
    token_scores: np.ndarray | None = None


@dataclass
class MethodSpec:
    """A method as the convenience layer and the CLI see it.

    Args:
        name: registry name (``"grad-eclip"``).
        summary: one line for ``--help`` and listings.
        limits: what the method cannot tell, shown in reports.
        families: adapter families it supports (``"clip"``, ``"siglip"``, ...).
        run: ``run(context) -> list[MapRecord]``.
    """

    name: str
    summary: str
    limits: str
    families: tuple[str, ...]
    run: Callable[[ExplainContext], list[MapRecord]]


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str, *, summary: str, limits: str, families: Sequence[str], overwrite: bool = False
) -> Callable[[Callable[[ExplainContext], list[MapRecord]]], Callable]:
    """Decorator: register ``run(context) -> list[MapRecord]`` under ``name``.

    Args:
        name: registry name; a name already taken is refused (ValueError) unless ``overwrite``.
        summary, limits, families: see :class:`MethodSpec`.
        overwrite: replace the method registered under ``name``.

    Example:
        >>> @register_method("my-method", summary="...", limits="...", families=["clip"])
        ... def run_my_method(context):
        ...     return []
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite: expected a bool, got {overwrite!r}")
    if name in METHODS and not overwrite:
        raise ValueError(f"name: a method {name!r} is already registered; pass overwrite=True to replace it")

    def wrap(run):
        METHODS[name] = MethodSpec(name, summary, limits, tuple(families), run)
        return run

    return wrap


def method_names(family: str | None = None) -> list[str]:
    """Registered method names, optionally only those supporting ``family``."""
    return [n for n, s in METHODS.items() if family is None or family in s.families]


@dataclass
class ExplainContext:
    """What a registered method gets: the model, its adapter, processed inputs, the texts and
    which of them to explain."""

    model: nn.Module
    adapter: Any
    inputs: dict[str, torch.Tensor]
    texts: list[str]
    targets: list[int]
    tokens: list[list[str]]
    show_progress: bool = False
    answers: Answers | None = None
