"""Scoped capture of attention probabilities, their gradients and block inputs/outputs.

Everything here is a context manager that leaves the model exactly as it found it on exit, also
when the body raises: hooks (its own and any left behind by code run inside the scope), each
parameter's ``requires_grad`` and ``.grad``, each module's train/eval mode, and the attention
implementation of every (sub-)config.

Example:
    >>> adapter = get_adapter(model)                                      # doctest: +SKIP
    >>> with capture(model, attentions=adapter.vision_attentions()) as rec:  # doctest: +SKIP
    ...     logits = target(pixel_values.requires_grad_())
    ...     logits[:, 0].sum().backward()
    >>> rec.attentions[-1].shape, rec.attention_grads[-1].shape          # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
)
# transformers installs its output-recording hooks lazily, once, and marks the module with this
# flag; removing the hooks without the flag would leave outputs such as hidden states empty
_TRANSFORMERS_HOOK_FLAGS = ("_output_capturing_hooks_installed",)


def _configs(model: nn.Module) -> list:
    """Every transformers config reachable from the model's modules, sub-configs included."""
    seen: dict[int, object] = {}
    stack = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "sub_configs")]
    while stack:
        config = stack.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if sub is not None and hasattr(sub, "sub_configs"):
                stack.append(sub)
    return list(seen.values())


def attention_implementations(model: nn.Module) -> dict[int, str | None]:
    """``{id(config): attention implementation}`` for every config in the model."""
    return {id(c): getattr(c, "_attn_implementation_internal", None) for c in _configs(model)}


@contextmanager
def preserved_model_state(model: nn.Module, *, freeze_parameters: bool = False) -> Iterator[nn.Module]:
    """Restore hooks, ``requires_grad``, ``.grad``, train/eval mode, attention implementation
    and the tensors a forward caches on a module (:func:`tensor_attributes`, such as Qwen-VL's
    ``rope_deltas``) of ``model`` when the block ends, however it ends.

    Hooks added inside the block are removed, transformers' lazily installed output-recording
    hooks included (with the flag that marks them, so transformers installs them again when
    next needed).

    Args:
        model: any ``nn.Module``.
        freeze_parameters: inside the block, set ``requires_grad=False`` on every parameter
            (gradients then flow to inputs and activations only, and no ``.grad`` accumulates).

    Yields:
        The model itself.
    """
    modules = list(model.modules())
    params = list(model.parameters())
    hooks = [{name: set(getattr(m, name, {}) or {}) for name in _HOOK_DICTS} for m in modules]
    flags = [{name: vars(m)[name] for name in _TRANSFORMERS_HOOK_FLAGS if name in vars(m)} for m in modules]
    training = [m.training for m in modules]
    requires_grad = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    configs = _configs(model)
    implementations = [getattr(c, "_attn_implementation_internal", None) for c in configs]
    cached = [tensor_attributes(m) for m in modules]
    try:
        if freeze_parameters:
            for p in params:
                p.requires_grad_(False)
        yield model
    finally:
        for m, saved in zip(modules, hooks):
            for name, keys in saved.items():
                registry = getattr(m, name, None)
                if registry:
                    for key in [k for k in registry if k not in keys]:
                        del registry[key]
        for m, saved_flags in zip(modules, flags):
            for name in _TRANSFORMERS_HOOK_FLAGS:
                if name in saved_flags:
                    setattr(m, name, saved_flags[name])
                else:
                    vars(m).pop(name, None)
        for m, mode in zip(modules, training):
            m.training = mode
        for p, flag, grad in zip(params, requires_grad, grads):
            p.requires_grad_(flag)
            p.grad = grad
        for c, impl in zip(configs, implementations):
            c._attn_implementation_internal = impl
        for m, saved in zip(modules, cached):
            for name, value in saved.items():
                if vars(m).get(name) is not value:
                    setattr(m, name, value)


def tensor_attributes(module: nn.Module) -> dict:
    """A module's own attributes that hold a tensor or ``None`` (not its parameters, buffers or
    submodules): where a forward caches a value for the next one."""
    return {name: value for name, value in vars(module).items()
            if not name.startswith("_") and (value is None or isinstance(value, torch.Tensor))}


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with eager attention inside the block (so attention modules return their
    probabilities), restoring the previous implementation afterwards."""
    with preserved_model_state(model):
        if hasattr(model, "set_attn_implementation") and any(
            impl not in (None, "eager") for impl in attention_implementations(model).values()
        ):
            model.set_attn_implementation("eager")
        yield model


def _output_flag_index(module: nn.Module) -> int | None:
    """Position of an ``output_attentions`` parameter in ``module.forward``, if it has one."""
    params = list(inspect.signature(module.forward).parameters)
    return params.index("output_attentions") if "output_attentions" in params else None


@dataclass
class Capture:
    """What :func:`capture` recorded; lists follow the order of the modules given.

    Each module may run several times inside the scope; ``*_calls[i]`` holds every call in
    order, and the plain attributes hold the last call.
    """

    attention_calls: list[list[torch.Tensor]] = field(default_factory=list)
    attention_grad_calls: list[dict[int, torch.Tensor]] = field(default_factory=list)
    block_input_calls: list[list[torch.Tensor]] = field(default_factory=list)
    block_output_calls: list[list[torch.Tensor]] = field(default_factory=list)

    @property
    def attentions(self) -> list[torch.Tensor]:
        """Attention probabilities ``[B, heads, queries, keys]`` of the last call, per module."""
        return [calls[-1] for calls in self.attention_calls]

    @property
    def attention_grads(self) -> list[torch.Tensor]:
        """Gradients of the last call's attention probabilities (after ``backward``)."""
        out = []
        for i, grads in enumerate(self.attention_grad_calls):
            last = len(self.attention_calls[i]) - 1
            if last not in grads:
                raise RuntimeError(
                    f"no gradient reached attention module {i}: call backward() on a result that "
                    "depends on it, with inputs that require grad"
                )
            out.append(grads[last])
        return out

    @property
    def block_inputs(self) -> list[torch.Tensor]:
        return [calls[-1] for calls in self.block_input_calls]

    @property
    def block_outputs(self) -> list[torch.Tensor]:
        return [calls[-1] for calls in self.block_output_calls]


@contextmanager
def capture(
    model: nn.Module,
    attentions: Sequence[nn.Module] = (),
    blocks: Sequence[nn.Module] = (),
    *,
    grads: bool = True,
    freeze_parameters: bool = False,
) -> Iterator[Capture]:
    """Record attention probabilities (and their gradients) and block inputs/outputs.

    Inside the block the model runs with eager attention, so a model loaded with the default
    ``sdpa`` attention gives the same probabilities as one loaded with
    ``attn_implementation="eager"``. Attention modules must return the probabilities as output
    ``[1]`` (every adapter's ``*_attentions()`` does); a module with an ``output_attentions``
    argument is asked for them.

    Args:
        model: the model the modules belong to.
        attentions: attention modules to record.
        blocks: transformer blocks whose input hidden states and output hidden states to record.
        grads: also record gradients of the attention probabilities on ``backward``.
        freeze_parameters: see :func:`preserved_model_state`.

    Yields:
        A :class:`Capture` that fills up as the model runs.
    """
    record = Capture(
        attention_calls=[[] for _ in attentions],
        attention_grad_calls=[{} for _ in attentions],
        block_input_calls=[[] for _ in blocks],
        block_output_calls=[[] for _ in blocks],
    )
    with preserved_model_state(model, freeze_parameters=freeze_parameters), eager_attention(model):
        for i, module in enumerate(attentions):
            flag = _output_flag_index(module)
            if flag is not None:
                module.register_forward_pre_hook(_ask_for_attentions(flag), with_kwargs=True)
            module.register_forward_hook(_record_attention(record, i, grads))
        for i, module in enumerate(blocks):
            module.register_forward_hook(_record_block(record, i), with_kwargs=True)
        yield record


def _ask_for_attentions(index: int):
    def hook(module, args, kwargs):
        # `index` counts `self`'s absence: forward's parameters exclude self when bound
        if len(args) > index:
            args = (*args[:index], True, *args[index + 1 :])
        else:
            kwargs = {**kwargs, "output_attentions": True}
        return args, kwargs

    return hook


def _record_attention(record: Capture, i: int, grads: bool):
    def hook(module, args, output):
        if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
            raise RuntimeError(
                f"{type(module).__name__} returned no attention probabilities; the adapter must "
                "name modules whose output [1] holds them under eager attention"
            )
        probs = output[1]
        call = len(record.attention_calls[i])
        record.attention_calls[i].append(probs)
        if grads and probs.requires_grad:
            probs.register_hook(lambda g: record.attention_grad_calls[i].__setitem__(call, g))

    return hook


def _record_block(record: Capture, i: int):
    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs.get("hidden_states")
        record.block_input_calls[i].append(hidden)
        record.block_output_calls[i].append(output[0] if isinstance(output, tuple) else output)

    return hook
