"""What every image attribution shares: one base for two-tower, fusion, IG and occlusion.

:class:`ImageAttributionBase` binds the model's adapter (and refuses a model whose adapter lacks
a capability the method declares in :attr:`~ImageAttributionBase.requires`), checks the image
inputs and the upsampling mode, splits ``additional_forward_args`` (:func:`split_text_args`),
parses ``target`` into ints (:func:`int_targets`), runs the work with the model's state
preserved (:meth:`~ImageAttributionBase.preserved`), and ends with the grid or the pixel map
(:meth:`~ImageAttributionBase.finish`, the patch-cover rule of :mod:`captum_vlm._grid`).

Each method then overrides one hook that returns its scores per explained item x image token:
``_patch_maps`` (two-tower: per image and prompt), ``_row_maps`` / ``_reduce_rows`` (fusion:
per text token over the sequence, read onto the grid by the adapter's image layout), or runs
Captum's own IG or occlusion on the patch embeddings or the patch keep mask.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from captum_vlm._checks import check_choice, check_input_ids, check_pixel_inputs, text_vocab_size
from captum_vlm._grid import patch_of_pixel
from captum_vlm.adapters import VLMAdapter, classes_for_tasks, get_adapter
from captum_vlm.hooks import preserved_model_state

__all__ = ["ImageAttributionBase", "UPSAMPLE_MODES", "forward_args", "int_targets", "split_text_args",
           "upsample_grid"]

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

    def finish(
        self, grid: torch.Tensor, pixel_values: torch.Tensor, return_grid: bool, upsample: str = "nearest"
    ) -> torch.Tensor:
        """The ending every image method shares: the patch grid ``[..., h, w]`` as it is
        (``return_grid``) or spread over the pixels each patch covers, ``[..., 3, H, W]``."""
        grid = grid.detach()
        if return_grid:
            return grid
        return upsample_grid(grid, tuple(pixel_values.shape[-2:]), self.adapter.patch_size(), upsample)


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
