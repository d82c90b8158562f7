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
        text_index: which text a whole-text map explains (``None`` for per-token maps).
        evidence: display lines: faithfulness, randomisation check, the model's confidence
            (see :mod:`captum_vlm.explain.evidence`).
        evidence_values: the same as numbers.
        token: per-token maps: ``(text index, token position)`` of the token the map explains
            (``None`` for whole-text maps).
    """

    method: str
    target: str
    grid: np.ndarray
    details: dict[str, str] = field(default_factory=dict)
    tokens: list[str] | None = None
    token_scores: np.ndarray | None = None
    text_index: int | None = None
    evidence: dict[str, str] = field(default_factory=dict)
    evidence_values: dict[str, Any] = field(default_factory=dict)
    token: tuple[int, int] | None = None


@dataclass
class MethodSpec:
    """A method as the convenience layer and the CLI see it.

    Args:
        name: registry name (``"grad-eclip"``).
        summary: one line for ``--help`` and listings.
        limits: what the method cannot tell, shown in reports.
        tasks: the adapter tasks it explains (:data:`captum_vlm.adapters.base.TASKS`:
            ``"similarity"``, ``"match"``, ...); the registry asks each model's adapter.
        run: ``run(context) -> list[MapRecord]``.
        only_families: when set, only adapters of these families (a user's own method).
    """

    name: str
    summary: str
    limits: str
    tasks: tuple[str, ...]
    run: Callable[[ExplainContext], list[MapRecord]]
    only_families: tuple[str, ...] | None = None

    def supports(self, adapter: Any) -> bool:
        """Whether the method explains the model behind ``adapter``."""
        if self.only_families is not None and adapter.family not in self.only_families:
            return False
        try:
            return adapter.task in self.tasks
        except NotImplementedError:
            return False

    @property
    def families(self) -> tuple[str, ...]:
        """Families of the registered adapters with a model class this method explains."""
        from captum_vlm.adapters.base import _REGISTRY, class_task

        found = {cls.family for name, cls in _REGISTRY.items() if class_task(cls, name) in self.tasks}
        if self.only_families is not None:
            found &= set(self.only_families)
        return tuple(sorted(found))


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    summary: str,
    limits: str,
    tasks: Sequence[str] | None = None,
    families: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Callable[[Callable[[ExplainContext], list[MapRecord]]], Callable]:
    """Decorator: register ``run(context) -> list[MapRecord]`` under ``name``.

    Args:
        name: registry name; a name already taken is refused (ValueError) unless ``overwrite``.
        summary, limits: see :class:`MethodSpec`.
        tasks: the adapter tasks the method explains (default: every task).
        families: only adapters of these families (default: any family with one of ``tasks``).
        overwrite: replace the method registered under ``name``.

    Example:
        >>> @register_method("my-method", summary="...", limits="...", tasks=["similarity"])
        ... def run_my_method(context):
        ...     return []
    """
    from captum_vlm.adapters.base import TASKS

    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite: expected a bool, got {overwrite!r}")
    if name in METHODS and not overwrite:
        raise ValueError(f"name: a method {name!r} is already registered; pass overwrite=True to replace it")
    if isinstance(tasks, str) or isinstance(families, str):
        raise TypeError("tasks, families: expected lists of names, not one string")
    unknown = [t for t in tasks or () if t not in TASKS]
    if unknown:
        raise ValueError(f"tasks: unknown {unknown}; choose from {list(TASKS)}")
    chosen = tuple(TASKS) if tasks is None else tuple(tasks)
    only = None if families is None else tuple(families)

    def wrap(run):
        METHODS[name] = MethodSpec(name, summary, limits, chosen, run, only)
        return run

    return wrap


def method_names(model: Any = None) -> list[str]:
    """Registered method names, optionally only those that explain ``model`` (a model, its
    adapter, or a family name).

    Example:
        >>> method_names("clip")[:2]
        ['grad-eclip', 'raw-attention']
    """
    if model is None:
        return list(METHODS)
    if isinstance(model, str):
        return [n for n, s in METHODS.items() if model in s.families]
    from captum_vlm.adapters import get_adapter

    adapter = get_adapter(model)
    return [n for n, s in METHODS.items() if s.supports(adapter)]


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
