"""Small vision-language models trained here on synthetic scenes, loaded offline.

    >>> from captum_vlm import zoo
    >>> zoo.list_models()                      # {"shapes-clip": "CLIPModel (...) on ...", ...}
    >>> model, processor = zoo.load("shapes-clip")
    >>> scene = zoo.scenes.make_scene(0)
    >>> inputs = processor(images=scene.pil(), text=zoo.scenes.zero_shot_prompts(),
    ...                    return_tensors="pt", padding=True)
    >>> model(**inputs).logits_per_image

The models are stock ``transformers`` classes (``CLIPModel``, ``SiglipModel``, BLIP,
``ViltForQuestionAnswering``, ``LlavaForConditionalGeneration``) with their own processors, so
code written for a hub checkpoint runs unchanged. See ``zoo/README.md`` for the model cards and
``python -m captum_vlm.zoo.train NAME`` to retrain one.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import scenes

MODELS_DIR = Path(__file__).parent / "models"
ZERO_SHOT_FLOOR = 0.95  # held-out zero-shot top-1 a shipped two-tower model should reach

__all__ = ["MODELS_DIR", "list_models", "load", "model_dir", "scenes"]


def _description(folder: Path) -> str:
    """One-line description from the model's ``training.json`` (empty when missing)."""
    try:
        log = json.loads((folder / "training.json").read_text())
    except (OSError, ValueError):
        return ""
    text = log.get("recipe", {}).get("description", "")
    held = log.get("heldout", {})
    if "zero_shot" in held:
        text += f"; held-out zero-shot {held['zero_shot']:.3f}, binding {held['binding']:.3f}"
        if held["zero_shot"] < ZERO_SHOT_FLOOR:
            text += f" (below the {ZERO_SHOT_FLOOR} floor, see zoo/README.md)"
        if "shortcut" in held:  # a planted marker shortcut
            text += f"; with the marker, other objects called the shortcut's {held['shortcut']['marker_to_concept']:.3f}"
    elif "binding" in held:  # image-text matching
        text += f"; held-out binding {held['binding']:.3f}, match accuracy {held['match_accuracy']:.3f}"
    elif "object_set" in held:  # captioning
        text += f"; held-out caption exact object set {held['object_set']:.3f}"
    elif "accuracy" in held:  # question answering
        text += f"; held-out answer accuracy {held['accuracy']:.3f}"
        if "prior" in held:  # a planted language prior
            text += f"; answers from the prior on {held['prior']['prior_answer_rate']:.3f} of the questions it skews"
    return text


def list_models() -> dict[str, str]:
    """The bundled models.

    Returns:
        ``{name: one-line description}`` for every model folder that holds weights, sorted by name.
    """
    found = {}
    if MODELS_DIR.is_dir():
        for folder in sorted(MODELS_DIR.iterdir()):
            if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
                found[folder.name] = _description(folder)
    return found


def model_dir(name_or_path: str | Path) -> Path:
    """The folder of a zoo model name or of a local model directory.

    Args:
        name_or_path: a zoo name ("shapes-clip") or a directory with ``config.json``.

    Returns:
        The folder.

    Raises:
        ValueError: for an unknown name; the message lists the available ones.
    """
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(
            f"name_or_path: expected a zoo name such as 'shapes-clip' or a model folder, got "
            f"{type(name_or_path).__name__} (available: {', '.join(sorted(list_models()))})"
        )
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    available = list_models()
    if str(name_or_path) in available:
        return MODELS_DIR / str(name_or_path)
    names = ", ".join(sorted(available)) or "none"
    raise ValueError(
        f"unknown zoo model {str(name_or_path)!r}: pass one of [{names}] "
        "or a local directory that holds config.json"
    )


def load(name_or_path: str | Path, **model_kwargs):
    """Load a zoo model and its processor from local files (no network).

    Args:
        name_or_path: a zoo name ("shapes-clip", see :func:`list_models`) or a local directory
            written by ``save_pretrained`` (model and processor).
        **model_kwargs: passed to ``from_pretrained`` of the model, e.g.
            ``attn_implementation="eager"``.

    Returns:
        ``(model, processor)``; the model is in eval mode, its weights in memory of its own
        (not views into the file), so a copy of it computes the same bits.

    Raises:
        ValueError: for an unknown name.
    """
    import transformers
    from transformers import AutoConfig, AutoModel, AutoProcessor
    from transformers.utils import logging as hf_logging

    folder = model_dir(name_or_path)
    # the class that saved the weights (e.g. BlipForImageTextRetrieval), not the bare AutoModel
    architectures = AutoConfig.from_pretrained(folder, local_files_only=True).architectures or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    # library calls are quiet: transformers draws a "Loading weights" bar unless told not to
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = (model_class or AutoModel).from_pretrained(
            folder, local_files_only=True, **model_kwargs
        )
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()
    _own_memory(model)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model.eval()
    return model, processor


def _own_memory(model) -> None:
    """Copy the weights out of the memory-mapped checkpoint into fresh (64-byte aligned) tensors.

    ``from_pretrained`` leaves them as views into the safetensors file, at addresses that are not
    64-byte aligned; MKL's matrix-vector kernel then sums in another order than for the same
    values in fresh memory, so the model would give other float32 bits than a copy of itself
    (``copy.deepcopy``, pickling, a Ray actor's copy). Tied weights stay tied (each shared
    ``Parameter`` is one object, copied once).
    """
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
