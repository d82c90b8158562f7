"""The registered methods: how each runs inside ``explain()`` and the records it returns."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from captum_vlm.explain.evidence import layers_label
from captum_vlm.explain.registry import ExplainContext, MapRecord, register_method


def _attr_class(name: str):
    return getattr(importlib.import_module("captum_vlm.attr"), name)


def _layers_label(method: Any, adapter: Any) -> str:
    return layers_label(getattr(method, "layers", None), len(adapter.vision_blocks()))


def _two_tower_runner(class_name: str, heads: str, **kwargs) -> Callable[[ExplainContext], list[MapRecord]]:
    """Run a two-tower image method for every explained prompt with one image forward; methods
    with a text side (``attribute_text``, Grad-ECLIP) also colour each prompt's tokens."""

    def run(context: ExplainContext) -> list[MapRecord]:
        method = _attr_class(class_name)(context.model, **kwargs)
        pixels, ids, mask = (context.inputs[k] for k in ("pixel_values", "input_ids", "attention_mask"))
        grids = method.attribute_prompts(pixels, additional_forward_args=(ids, mask), prompts=context.targets,
                                         return_grid=True)[0]
        text = None
        if hasattr(method, "attribute_text"):
            text = method.attribute_text(pixels, target=None, additional_forward_args=(ids, mask))[0]  # [K, T]
        records = []
        for k, grid in zip(context.targets, grids):
            details = {"layers": _layers_label(method, context.adapter), "heads": heads,
                       "target": f"prompt {k}: {context.texts[k]}"}
            record = MapRecord(class_name, context.texts[k], grid.numpy(), details, text_index=k)
            if text is not None:
                shown = mask[k].bool()
                record.tokens = [t for t, keep in zip(context.tokens[k], shown.tolist()) if keep]
                record.token_scores = text[k][shown].detach().numpy()
                record.details["tokens"] = "text side: each token's share of the match (attribute_text, sums to 1)"
            records.append(record)
        return records

    return run


_TWO_TOWER = ("similarity",)
for _name, _cls, _heads, _summary, _limits in [
    ("grad-eclip", "GradECLIP", "all (real multi-head forward)",
     "Grad-ECLIP: gradient-weighted values at the pooled token, loosened attention (Zhao et al. 2024)",
     "Shows which patches raise the image-text cosine at the chosen block; blind to what earlier "
     "blocks mixed into each patch token."),
    ("raw-attention", "RawAttention", "mean",
     "Attention of the pooled token to the patches at chosen layers",
     "Attention is not explanation: it says where the pooled token reads from, not what changed the score."),
    ("rollout", "AttentionRollout", "mean",
     "Attention rollout through the layers (Abnar & Zuidema 2020)",
     "Class-agnostic: the same map for every prompt."),
    ("relevancy", "GradientWeightedRelevancy", "grad-weighted mean",
     "Gradient-weighted attention relevancy (Chefer et al. 2021)",
     "Positive gradient × attention only; ignores MLP and value paths."),
]:
    register_method(_name, summary=_summary, limits=_limits, tasks=_TWO_TOWER)(
        _two_tower_runner(_cls, _heads)
    )


def _per_target_runner(class_name: str, details: dict[str, str], all_prompts: bool = False, **attribute_kwargs):
    """Run a method with Captum's ``attribute`` once per explained prompt (IG), or once for all
    prompts with ``target=None`` when the method explains them all from one pass (``all_prompts``:
    occlusion's sweep)."""

    def run(context: ExplainContext) -> list[MapRecord]:
        method = _attr_class(class_name)(context.model)
        ids, mask = context.inputs["input_ids"], context.inputs["attention_mask"]
        every = None
        if all_prompts and len(context.targets) > 1:
            every = method.attribute(context.inputs["pixel_values"], target=None, additional_forward_args=(ids, mask),
                                     return_grid=True, **attribute_kwargs)[0]  # [K, h, w]
        records = []
        for k in context.targets:
            grid = every[k] if every is not None else method.attribute(
                context.inputs["pixel_values"], target=k, additional_forward_args=(ids, mask),
                return_grid=True, **attribute_kwargs,
            )[0]
            records.append(MapRecord(class_name, context.texts[k], grid.detach().numpy(),
                                     {**details, "target": f"prompt {k}: {context.texts[k]}"}, text_index=k))
        return records

    return run


register_method(
    "integrated-gradients",
    summary="Integrated Gradients on the patch embeddings, summed per patch (Sundararajan et al. 2017)",
    limits="Depends on the baseline (zero patch embeddings here); completeness holds for the whole "
    "path, not for single patches.",
    tasks=_TWO_TOWER,
)(_per_target_runner("TokenIntegratedGradients", {"layers": "input: patch embeddings", "heads": "n/a"},
                     modality="image", n_steps=32, internal_batch_size=16))
register_method(
    "occlusion",
    summary="Causal occlusion: drop each patch token and measure the score's fall (Zeiler & Fergus 2014)",
    limits="One patch at a time: misses effects that need several patches removed together.",
    tasks=_TWO_TOWER,
)(_per_target_runner("CausalOcclusion", {"layers": "input: patch tokens", "heads": "n/a"}, all_prompts=True,
                     intervention="drop", window=1))


_FUSION = ("match", "caption", "answer_label", "answer_tokens", "generate")


def _fusion_runner(class_name: str, base_details: dict[str, str]) -> Callable[[ExplainContext], list[MapRecord]]:
    """Fusion models: one map per text and one per token, each text paired with the image. What
    a text's map explains: its match logit, its caption's log-probability, or the model's own
    answer to it (BLIP VQA, LLaVA: one map per generated token; ViLT VQA: the answer label's
    logit, one map per question token)."""

    def run(context: ExplainContext) -> list[MapRecord]:
        task = context.adapter.task
        method = _attr_class(class_name)(context.model)
        details = {**base_details, "layers": f"text cross-attention block {method.layer}"} if hasattr(method, "layer") else base_details
        records = []
        for k, whole, per_token, tokens, shown in _fusion_maps(method, context):
            mass = per_token.flatten(1).sum(1)
            if context.adapter.answers_questions:
                answer = context.answers.texts[k]
                what, title = f"answer '{answer}' to text {k}", f"{context.texts[k]} → {answer}"
            else:
                what = f"{'match logit' if task == 'match' else 'caption log-probability'} of text {k}"
                title = context.texts[k]
            records.append(MapRecord(class_name, title, whole.numpy(),
                                     {**details, "target": what, "tokens": "total of each token's own image map"},
                                     [tokens[j] for j in shown], mass[shown].numpy(), text_index=k))
            for j in shown:
                if per_token[j].abs().sum() > 0:
                    records.append(MapRecord(class_name, f"{title} · {tokens[j]}", per_token[j].numpy(),
                                             {**details, "target": f"token {j} of {what}"}, token=(k, j)))
        return records

    return run


def _fusion_maps(method: Any, context: ExplainContext):
    """``(text index, whole map, per-token maps [T, h, w], token strings, positions shown)`` per
    explained text, both maps from one pass (``attribute_with_tokens``)."""
    pixels, ids, mask = (context.inputs[k] for k in ("pixel_values", "input_ids", "attention_mask"))
    answers, task = context.answers, context.adapter.task
    if task == "generate":  # each prompt with its own generated continuation
        for k in context.targets:
            sequence, start = answers.sequences[k], answers.prompt_lengths[k]
            shown = list(range(start, sequence.shape[1]))
            whole, per_token = method.attribute_with_tokens(
                pixels[k : k + 1], target=shown, additional_forward_args=answers.forward_args[k],
                return_grid=True,
            )
            yield k, whole[0], per_token[0], answers.tokens[k], shown
        return
    rows = torch.tensor(context.targets)
    args: tuple = (ids[rows], mask[rows])
    target, token_strings, token_mask = None, context.tokens, mask.bool()
    if task == "answer_tokens":  # maps over the answer's tokens
        args = (*args, answers.answer_ids[rows], answers.answer_mask[rows])
        token_strings, token_mask = answers.tokens, answers.answer_mask.bool()
        token_mask[:, 0] = False  # the start token predicts, it is not predicted
    elif task == "answer_label":  # the answer label's logit, maps over the question's tokens
        target = answers.label_ids[rows].tolist()
    whole, per_token = method.attribute_with_tokens(pixels[rows], target=target, additional_forward_args=args,
                                                    return_grid=True)
    for i, k in enumerate(context.targets):
        shown = [j for j, keep in enumerate(token_mask[k].tolist()) if keep]
        yield k, whole[i], per_token[i], token_strings[k], shown


register_method(
    "cross-attention-gradcam",
    summary="Cross-attention Grad-CAM: one map per caption and per word (ALBEF, Li et al. 2021)",
    limits="Reads one cross-attention layer: what later layers do with the attended patches is not shown.",
    tasks=_FUSION,
)(_fusion_runner("CrossAttentionGradCAM", {"heads": "mean of A·ReLU(∇A)"}))
register_method(
    "bimodal-relevancy",
    summary="Bi-modal relevancy propagation through self- and co-attention (Chefer et al. 2021)",
    limits="Follows attention and its gradients only; MLP and value paths are not propagated.",
    tasks=_FUSION,
)(_fusion_runner("BimodalRelevancy", {"layers": "all blocks", "heads": "grad-weighted mean"}))
