"""What every image attribution shares: one base for two-tower, fusion, IG and occlusion.

:class:`ImageAttributionBase` binds the model's adapter (and refuses a model whose adapter lacks
a capability the method declares in :attr:`~ImageAttributionBase.requires`), checks the image
inputs and the upsampling mode, splits ``additional_forward_args`` (:func:`split_text_args`),
parses ``target`` into ints (:func:`int_targets`), runs the work with the model's state
preserved (:meth:`~ImageAttributionBase.preserved`), and ends with the grid or the pixel map
(:meth:`~ImageAttributionBase.finish`, the patch-cover rule of :mod:`captum_vlm._grid`).

One per-item call for every method, :meth:`~ImageAttributionBase.attribute_items`: the arguments
of ``attribute``, and one map per explained item, ``[B, K, 3, H, W]`` (``[B, K, h, w]`` with
``return_grid=True``). The items are the prompts for two-tower models, the tokens (or words)
for fusion and generative models, the output columns of the explained target for IG and
occlusion; the older per-item names (``attribute_prompts``, ``attribute_tokens``) are aliases.

Each method then overrides one hook that returns its scores per explained item x image token:
``_patch_maps`` (two-tower: per image and prompt), ``_row_maps`` / ``_reduce_rows`` (fusion:
per text token over the sequence, read onto the grid by the adapter's image layout), or runs
Captum's own IG or occlusion on the patch embeddings or the patch keep mask
(:class:`TargetAttributionBase`: the methods that explain any target of
:mod:`captum_vlm.targets`, whose target checks -- :func:`prompt_targets`,
:func:`check_output_target` -- and score picking, :func:`select_target`, live here too).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from captum_vlm._checks import (
    check_choice,
    check_finite,
    check_input_ids,
    check_pixel_inputs,
    check_same_batch,
    text_vocab_size,
)
from captum_vlm._grid import patch_of_pixel
from captum_vlm.adapters import VLMAdapter, classes_for_tasks, get_adapter
from captum_vlm.hooks import preserved_model_state

__all__ = ["ImageAttributionBase", "TargetAttributionBase", "UPSAMPLE_MODES", "check_output_target",
           "forward_args", "int_targets", "item_targets", "pixel_baseline", "prompt_targets",
           "replacement_token", "select_target", "split_text_args", "upsample_grid"]

UPSAMPLE_MODES = ("nearest", "bilinear")


class ImageAttributionBase:
    """Mixin under every image attribution (next to the Captum ``Attribution`` class it extends).

    Attributes:
        requires: adapter capabilities the method needs, ``{flag: value}`` (e.g.
            ``{"two_tower": True}``); :meth:`bind` refuses other models with a TypeError naming
            the classes that have them.
    """

    requires: Mapping[str, object] = {}

    def bind(self, model: nn.Module | VLMAdapter) -> VLMAdapter:
        """Set ``self.adapter`` and ``self.model`` from ``model``; check :attr:`requires`."""
        self.adapter = get_adapter(model)
        self.model = self.adapter.model
        missing = {k: v for k, v in self.requires.items() if getattr(self.adapter, k, None) != v}
        if missing:
            wanted = ", ".join(f"{k}={v!r}" for k, v in missing.items())
            takes = ""
            if self.requires.get("two_tower") is True:
                takes = f" ({', '.join(classes_for_tasks(['similarity']))})"
            raise TypeError(
                f"model: {type(self).__name__} explains models with {wanted}{takes}, got "
                f"{type(self.model).__name__}"
            )
        return self.adapter

    def image_inputs(self, inputs: object, upsample: str = "nearest") -> tuple[torch.Tensor, tuple[int, int]]:
        """Checked ``pixel_values`` ``[B, 3, H, W]`` and their patch grid ``(h, w)`` (at least one
        patch); ``upsample`` must be one of :data:`UPSAMPLE_MODES`."""
        pixel_values = check_pixel_inputs(inputs)
        check_choice(upsample, UPSAMPLE_MODES, "upsample")
        return pixel_values, self.adapter.patch_grid(pixel_values)

    @contextmanager
    def preserved(self, grad: bool = True, freeze_parameters: bool = True) -> Iterator[None]:
        """The model exactly as found afterwards (also on error), gradients on or off inside."""
        with preserved_model_state(self.model, freeze_parameters=freeze_parameters), torch.set_grad_enabled(grad):
            yield

    def attribute_items(self, inputs: torch.Tensor, target: object = None, additional_forward_args: object = None,
                        return_grid: bool = False, upsample: str = "nearest", **options) -> torch.Tensor:
        """One map per explained item, ``[B, K, 3, H, W]`` (``[B, K, h, w]`` with
        ``return_grid``): the arguments of ``attribute``, and per item what ``attribute`` gives
        for it. What an item is depends on the method's base (see its docstring)."""
        raise NotImplementedError(f"{type(self).__name__} gives one map per example; use attribute")

    def finish(
        self, grid: torch.Tensor, pixel_values: torch.Tensor, return_grid: bool, upsample: str = "nearest"
    ) -> torch.Tensor:
        """The ending every image method shares: the patch grid ``[..., h, w]`` as it is
        (``return_grid``) or spread over the pixels each patch covers, ``[..., 3, H, W]``."""
        grid = grid.detach()
        if return_grid:
            return grid
        return upsample_grid(grid, tuple(pixel_values.shape[-2:]), self.adapter.patch_size(), upsample)


class TargetAttributionBase(ImageAttributionBase):
    """The base under the methods that explain any target of :mod:`captum_vlm.targets`
    (Integrated Gradients, occlusion): the model's default target or one given, its adapter
    bound, the text arguments split and checked against the images, and ``target`` checked
    against what the target returns (:meth:`explained_target`).

    Attributes:
        target_fn: the target that is explained (``forward_func`` of the Captum attribution).
        two_tower: the adapter's flag: K prompts for B images, ``target`` picks a prompt.
    """

    def bind_target(self, model: nn.Module | object) -> object:
        """Set :attr:`target_fn` (``model``'s default target, or ``model`` when it is a target),
        bind its adapter and set :attr:`two_tower`; returns the target."""
        from captum_vlm.targets import default_target  # targets import the adapters, as this does

        self.target_fn = default_target(model)
        self.bind(self.target_fn.adapter)
        self.two_tower = self.adapter.two_tower
        return self.target_fn

    def text_inputs(self, pixel_values: torch.Tensor, additional_forward_args: object
                    ) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """``(input_ids, attention_mask, extra)`` from ``additional_forward_args`` (see
        :func:`split_text_args`); fusion models need one text per image."""
        ids, mask, extra = split_text_args(self.adapter, additional_forward_args)
        if not self.two_tower:
            check_same_batch(inputs=pixel_values, input_ids=ids)
        return ids, mask, extra

    def attribute_items(self, inputs: torch.Tensor, target: object = None, additional_forward_args: object = None,
                        return_grid: bool = False, upsample: str = "nearest", **options) -> torch.Tensor:
        """``attribute`` once per output column of the target, stacked: ``[B, K, ...]``.

        Args:
            inputs, additional_forward_args, return_grid, upsample: as in ``attribute``.
            target: the columns to explain, each for every example: an int, a list of ints, or
                ``None`` for all of them (the K prompts of a two-tower model, the answers of
                ``AnswerLogits``, the token columns of a per-token ``TokenLogProbs``; a score of
                one number per example is its one item).
            options: the method's other ``attribute`` arguments (``modality``, ``n_steps``...).

        Returns:
            ``attribute``'s result per item, stacked at dimension 1 (elementwise for a tuple,
            e.g. IG's ``modality="both"``).

        Example:
            >>> maps = CausalOcclusion(clip).attribute_items(pixel_values,      # doctest: +SKIP
            ...     additional_forward_args=(ids, mask), return_grid=True)    # [B, K, h, w]
        """
        columns = self.item_columns(inputs, target, additional_forward_args)
        results = [self.attribute(inputs, target=c, additional_forward_args=additional_forward_args,
                                  return_grid=return_grid, upsample=upsample, **options) for c in columns]
        if isinstance(results[0], tuple):
            return tuple(torch.stack(parts, dim=1) for parts in zip(*results))
        return torch.stack(results, dim=1)

    def item_columns(self, inputs: torch.Tensor, target: object, additional_forward_args: object) -> list:
        """The output columns :meth:`attribute_items` explains: ``target``'s (:func:`item_targets`)
        or, for ``None``, every column of the target's output (``[None]`` for one number per
        example)."""
        pixel_values = check_pixel_inputs(inputs)
        ids, mask, extra = self.text_inputs(pixel_values, additional_forward_args)
        if target is not None:
            return item_targets(target)
        if self.two_tower:
            return list(range(ids.shape[0]))
        with self.preserved(grad=False, freeze_parameters=False):
            output = self.target_fn(pixel_values, ids, mask, *extra)
        return list(range(output.shape[1])) if output.dim() == 2 and output.shape[1] > 1 else [None]

    def explained_target(self, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                         extra: tuple, target: object) -> object:
        """``target`` checked, in the form Captum takes: two-tower models one prompt index per
        image (a list, :func:`prompt_targets`); others ``target`` itself once it fits the
        target's output on these inputs (:func:`check_output_target`, one forward without
        gradients)."""
        if self.two_tower:
            return prompt_targets(target, pixel_values.shape[0], ids.shape[0]).tolist()
        with self.preserved(grad=False, freeze_parameters=False):
            check_output_target(self.target_fn(pixel_values, ids, mask, *extra), target)
        return target


def forward_args(
    additional_forward_args: object, most: int | None = None,
    wanted: str = "(input_ids, attention_mask, ...)",
) -> tuple:
    """``additional_forward_args`` as a tuple: a bare tensor is ``(input_ids,)``; a tuple or list
    must hold 1..``most`` entries. TypeError naming ``wanted`` otherwise."""
    if isinstance(additional_forward_args, torch.Tensor):
        return (additional_forward_args,)
    fits = isinstance(additional_forward_args, (tuple, list)) and additional_forward_args and (
        most is None or len(additional_forward_args) <= most)
    if not fits:
        length = (f" of length {len(additional_forward_args)}"
                  if isinstance(additional_forward_args, (tuple, list)) else "")
        raise TypeError(
            f"additional_forward_args: expected {wanted} from the processor, got "
            f"{type(additional_forward_args).__name__}{length}"
        )
    return tuple(additional_forward_args)


def split_text_args(
    adapter: VLMAdapter, additional_forward_args: object, most: int | None = None,
    wanted: str = "(input_ids, attention_mask, ...)",
) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """``additional_forward_args`` -> ``(input_ids, attention_mask, extra)``, the text checked
    against the model's longest sequence (a missing mask is all ones)."""
    args = forward_args(additional_forward_args, most, wanted)
    mask = args[1] if len(args) > 1 else None
    ids, mask = check_input_ids(args[0], mask, max_length=adapter.max_text_length(),
                                vocab_size=text_vocab_size(adapter))
    return ids, mask, tuple(args[2:])


def int_targets(target: object, what: str = "an int, a list of ints or a tensor") -> list[int] | None:
    """Captum's ``target`` as a list of ints (``None`` stays ``None``): an int gives ``[int]``, an
    integer tensor ``[]`` or ``[n]`` its values. TypeError for bools, floats and other types."""
    if target is None:
        return None
    if isinstance(target, bool):
        raise TypeError(f"target: expected {what}, got bool")
    if isinstance(target, torch.Tensor):
        if target.dim() > 1 or target.is_floating_point():
            raise TypeError(f"target: expected an integer tensor of shape [] or [n], got {target.dtype} "
                            f"{tuple(target.shape)}")
        target = target.tolist()
    if isinstance(target, int):
        return [target]
    if not isinstance(target, (list, tuple)):
        raise TypeError(f"target: expected {what}, got {type(target).__name__}")
    for t in target:
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"target: expected ints, got {t!r}")
    return list(target)


def item_targets(target: object, what: str = "an item index or a list of them") -> list[int]:
    """The items ``attribute_items`` explains, each for every example: an int, a non-empty list
    of ints or an integer tensor ``[]`` / ``[n]`` as a list (checked against the items later).

    Example:
        >>> item_targets(torch.tensor([2, 0]))
        [2, 0]
    """
    values = int_targets(target, what)
    if not values:
        raise TypeError(f"target: expected {what}, got {target!r}")
    return values


def prompt_targets(target: object, batch: int, n_prompts: int) -> torch.Tensor:
    """Captum-style ``target`` of a two-tower model to one prompt index per image ``[B]`` (long).

    Args:
        target: an int, a list of ints (one per image), a tensor (scalar or ``[B]``), or ``None``
            when there is a single prompt.
        batch: number of images.
        n_prompts: number of prompts K.

    Returns:
        Non-negative prompt indices ``[B]``.

    Example:
        >>> prompt_targets(-1, 2, 3)
        tensor([2, 2])
    """
    if target is None:
        if n_prompts != 1:
            raise ValueError(f"target: {n_prompts} prompts were given; say which to explain (target=k)")
        target = 0
    single = isinstance(target, int) or (isinstance(target, torch.Tensor) and target.dim() == 0)
    values = int_targets(target)
    if single:
        values = values * batch
    if len(values) != batch:
        raise ValueError(f"target: {len(values)} targets for {batch} images; give one per image or one int")
    out = []
    for t in values:
        if not -n_prompts <= t < n_prompts:
            raise ValueError(f"target: {t} is out of range for {n_prompts} prompts (0..{n_prompts - 1})")
        out.append(t % n_prompts)
    return torch.tensor(out, dtype=torch.long)


def check_output_target(output: torch.Tensor, target: object) -> None:
    """``target`` must fit the forward output: None for ``[B]``, valid columns for ``[B, C]``.

    Example:
        >>> check_output_target(torch.zeros(2, 3), 5)
        Traceback (most recent call last):
        ValueError: target: 5 is out of range for 3 outputs (0..2)
    """
    if output.dim() == 1:
        if target is not None:
            raise ValueError(
                f"target: this score is one number per example (shape {tuple(output.shape)}); pass target=None"
            )
        return
    columns = output.shape[1]
    if target is None:
        if columns != 1:
            raise ValueError(f"target: the output has {columns} columns; say which to explain (target=...)")
        return
    values = int_targets(target.flatten() if isinstance(target, torch.Tensor) else target)
    for value in values:
        if not -columns <= value < columns:
            raise ValueError(f"target: {value} is out of range for {columns} outputs (0..{columns - 1})")
    if len(values) not in (1, output.shape[0]):
        raise ValueError(f"target: {len(values)} targets for {output.shape[0]} examples; give one per example")


def select_target(output: torch.Tensor, target: object) -> torch.Tensor:
    """One score per row of ``output``: the ``target`` column (int, per-row list or tensor);
    rows past the targets' length reuse them cyclically (Captum's expanded batches).

    Example:
        >>> select_target(torch.tensor([[1., 2.], [3., 4.]]), [1, 0])
        tensor([2., 3.])
    """
    if output.dim() == 1:
        return output
    if target is None:
        return output[:, 0]
    if isinstance(target, int):
        return output[:, target]
    index = torch.as_tensor(target, dtype=torch.long, device=output.device).flatten()
    if index.numel() == 1:
        return output[:, int(index)]
    index = index.repeat(output.shape[0] // index.numel())
    return output.gather(1, index[:, None])[:, 0]


def pixel_baseline(baselines: object, pixel_values: torch.Tensor) -> torch.Tensor:
    """The pixel baseline shaped like ``pixel_values``: 0 for ``None``, a number everywhere, or a
    tensor broadcast to it; ValueError for anything else or non-finite values."""
    return check_finite(_pixel_baseline_unchecked(baselines, pixel_values), "baselines")


def _pixel_baseline_unchecked(baselines: object, pixel_values: torch.Tensor) -> torch.Tensor:
    if baselines is None:
        return torch.zeros_like(pixel_values)
    if isinstance(baselines, (int, float)) and not isinstance(baselines, bool):
        return torch.full_like(pixel_values, float(baselines))
    if isinstance(baselines, torch.Tensor):
        if baselines.dim() == 0:
            return torch.full_like(pixel_values, float(baselines))
        try:
            return torch.broadcast_to(baselines, pixel_values.shape).to(pixel_values)
        except RuntimeError:
            pass
    raise ValueError(
        f"baselines: expected a number or a tensor broadcastable to {tuple(pixel_values.shape)}, got {baselines!r}"
    )


def replacement_token(adapter: VLMAdapter, text_baseline: object, expected: str = "a token id (int)") -> int:
    """The token id that stands in for occluded or baseline text: ``text_baseline``, by default
    the model's pad token. ValueError when the config names none, TypeError (saying
    ``expected``) for anything but an int."""
    if text_baseline is None:
        text_baseline = adapter.pad_token_id
        if text_baseline is None:
            raise ValueError("text_baseline: the model config names no pad token; pass a token id")
    if isinstance(text_baseline, bool) or not isinstance(text_baseline, int):
        raise TypeError(f"text_baseline: expected {expected}, got {type(text_baseline).__name__}")
    return text_baseline


def upsample_grid(
    grid: torch.Tensor, size: tuple[int, int], patch: tuple[int, int], mode: str = "nearest"
) -> torch.Tensor:
    """Patch grid ``[..., h, w]`` to pixel map ``[..., 3, H, W]`` (same map in each channel).

    Args:
        grid: patch-grid map, any leading dimensions.
        size: ``(H, W)`` of the input.
        patch: patch ``(height, width)`` in pixels.
        mode: ``"nearest"`` (each pixel gets its patch's value) or ``"bilinear"``.

    Returns:
        ``[..., 3, H, W]``; pixels beyond ``h * patch_h`` or ``w * patch_w`` are 0.

    Example:
        >>> upsample_grid(torch.ones(1, 2, 2), (17, 16), (8, 8)).shape
        torch.Size([1, 3, 17, 16])
    """
    check_choice(mode, UPSAMPLE_MODES, "upsample")
    lead, (h, w) = grid.shape[:-2], grid.shape[-2:]
    flat = grid.reshape(-1, 1, h, w)
    if mode == "nearest":  # the one patch-cover rule (captum_vlm._grid), shared with metrics
        rows = torch.as_tensor(patch_of_pixel(size[0], h, patch[0]), device=grid.device)
        cols = torch.as_tensor(patch_of_pixel(size[1], w, patch[1]), device=grid.device)
        padded = F.pad(flat, (0, 1, 0, 1))  # index -1: the zero row / column of unseen pixels
        up = padded[..., rows[:, None], cols[None, :]]
    else:  # smooth inside the covered pixels, the same unseen margin
        covered = (h * patch[0], w * patch[1])
        up = F.interpolate(flat.float(), size=covered, mode="bilinear", align_corners=False)
        up = F.pad(up, (0, size[1] - covered[1], 0, size[0] - covered[0]))
    return up.reshape(*lead, 1, *size).expand(*lead, 3, *size).to(grid.dtype).contiguous()
