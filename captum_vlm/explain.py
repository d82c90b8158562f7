"""The convenience layer: ``explain(model, processor, image, texts, methods=[...])``.

It picks the adapter and the target, runs the methods (found by name in :data:`METHODS`), and
returns an :class:`Explanation` holding maps, token scores, model scores and metadata, which
draws (``.plot()``), writes a self-contained report (``.to_html(path)``), saves PNGs + JSON
(``.save(dir)``) and shows itself in a notebook.

Example:
    >>> import captum_vlm as cv                                                 # doctest: +SKIP
    >>> model, processor = cv.zoo.load("shapes-clip")                           # doctest: +SKIP
    >>> report = cv.explain(model, processor, image, ["a red circle", "a blue square"],
    ...                     methods=["grad-eclip", "rollout"])                  # doctest: +SKIP
    >>> report.to_html("report.html")                                          # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from captum_vlm._checks import check_count, check_processor, check_texts
from captum_vlm.adapters import get_adapter
from captum_vlm.evidence import (
    VALUE_LABELS,
    attach_evidence,
    collapse_prompt_independent,
    compare_records,
    default_methods,
    layers_label,
    rank_agreement,
)

__all__ = [
    "Answers", "Explanation", "MapRecord", "MethodSpec", "METHODS", "answer_questions", "explain", "method_names",
    "register_method",
]


# ----------------------------------------------------------------------------------------------
# The method registry
# ----------------------------------------------------------------------------------------------
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
            (see :mod:`captum_vlm.evidence`).
        evidence_values: the same as numbers.
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
    name: str, *, summary: str, limits: str, families: Sequence[str]
) -> Callable[[Callable[[ExplainContext], list[MapRecord]]], Callable]:
    """Decorator: register ``run(context) -> list[MapRecord]`` under ``name``.

    Example:
        >>> @register_method("my-method", summary="...", limits="...", families=["clip"])
        ... def run_my_method(context):
        ...     return []
    """

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


@dataclass
class Answers:
    """A VQA or generative model's own answer to each text: what their maps explain.

    Args:
        texts: the answers as strings, one per text.
        probabilities: BLIP, LLaVA: the probability of the answer's tokens (teacher-forced);
            ViLT: the sigmoid of the answer's logit.
        label_ids: ViLT: the answer label id per question ``[n]``.
        answer_ids, answer_mask: BLIP: the generated answer tokens ``[n, T]`` (start token first).
        sequences, prompt_lengths: LLaVA: per text, the prompt followed by the generated tokens
            ``[1, L]``, and where the generated tokens start.
        tokens: BLIP: the answer's token strings; LLaVA: the whole sequence's; per text.
    """

    texts: list[str]
    probabilities: list[float]
    label_ids: torch.Tensor | None = None
    answer_ids: torch.Tensor | None = None
    answer_mask: torch.Tensor | None = None
    sequences: list[torch.Tensor] | None = None
    prompt_lengths: list[int] | None = None
    tokens: list[list[str]] | None = None


def answer_questions(
    model: nn.Module, tokenizer: Any, inputs: dict[str, torch.Tensor], max_new_tokens: int = 10
) -> Answers:
    """What a VQA or generative model answers: BLIP and LLaVA generate greedily, ViLT picks its
    top label.

    Args:
        model: ``BlipForQuestionAnswering``, ``ViltForQuestionAnswering`` or
            ``LlavaForConditionalGeneration``.
        tokenizer: the processor's tokenizer (to decode generated answers).
        inputs: the processor's output for the image(s) and the texts (LLaVA: prompts holding
            the image token; padding is dropped, each prompt is answered on its own).
        max_new_tokens: longest generated answer.

    Returns:
        :class:`Answers`, one per text.
    """
    from captum_vlm.targets import TokenLogProbs

    pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    name = type(model).__name__
    with torch.no_grad():
        if name == "ViltForQuestionAnswering":
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                           pixel_mask=inputs.get("pixel_mask")).logits
            labels = logits.argmax(-1)
            texts = [str(model.config.id2label.get(int(k), int(k))) for k in labels]
            probabilities = torch.sigmoid(logits.gather(1, labels[:, None])[:, 0]).tolist()
            return Answers(texts, probabilities, label_ids=labels)
        if name == "LlavaForConditionalGeneration":
            return _generate_each(model, tokenizer, pixels, ids, mask, max_new_tokens)
        generated = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                   max_new_tokens=max_new_tokens, do_sample=False)
        end = model.config.text_config.sep_token_id
        ended_before = (generated == end).long().cumsum(1) - (generated == end).long()  # EOS seen before t
        answer_mask = (ended_before == 0).long()
        log_p = TokenLogProbs(model, reduction="sum")(pixels, ids, mask, generated, answer_mask)
        texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True).strip() for row, m in zip(generated, answer_mask)]
        tokens = [_token_strings(tokenizer, row) for row in generated]
        return Answers(texts, log_p.exp().tolist(), answer_ids=generated, answer_mask=answer_mask, tokens=tokens)


def _generate_each(model, tokenizer, pixels, ids, mask, max_new_tokens) -> Answers:
    """LLaVA: each prompt (padding dropped) answered on its own, so no padding side matters."""
    from captum_vlm.targets import TokenLogProbs

    sequences, lengths, texts, probabilities, tokens = [], [], [], [], []
    for k in range(ids.shape[0]):
        prompt = ids[k][mask[k].bool()][None]
        sequence = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                  pixel_values=pixels[k : k + 1], max_new_tokens=max_new_tokens, do_sample=False)
        start = prompt.shape[1]  # generate() adds at least one token (max_new_tokens >= 1)
        log_p = TokenLogProbs(model, reduction="sum", score_from=start)(
            pixels[k : k + 1], sequence, torch.ones_like(sequence)
        )
        sequences.append(sequence)
        lengths.append(start)
        texts.append(tokenizer.decode(sequence[0, start:], skip_special_tokens=True).strip())
        probabilities.append(float(log_p.exp()[0]))
        tokens.append(_token_strings(tokenizer, sequence[0]))
    return Answers(texts, probabilities, sequences=sequences, prompt_lengths=lengths, tokens=tokens)


def _token_strings(tokenizer: Any, ids: torch.Tensor) -> list[str]:
    """Token strings of ``ids`` ``[T]``; ids the tokenizer does not know show as ``[id N]``."""
    ids = ids.tolist()
    return [t if t is not None else f"[id {i}]" for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids))]


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


_TWO_TOWER = ("clip", "siglip")
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
    register_method(_name, summary=_summary, limits=_limits, families=_TWO_TOWER)(
        _two_tower_runner(_cls, _heads)
    )


def _per_target_runner(class_name: str, details: dict[str, str], **attribute_kwargs):
    """Run a method with Captum's ``attribute`` once per explained prompt (IG, occlusion)."""

    def run(context: ExplainContext) -> list[MapRecord]:
        method = _attr_class(class_name)(context.model)
        ids, mask = context.inputs["input_ids"], context.inputs["attention_mask"]
        records = []
        for k in context.targets:
            grid = method.attribute(
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
    families=_TWO_TOWER,
)(_per_target_runner("TokenIntegratedGradients", {"layers": "input: patch embeddings", "heads": "n/a"},
                     modality="image", n_steps=32, internal_batch_size=16))
register_method(
    "occlusion",
    summary="Causal occlusion: drop each patch token and measure the score's fall (Zeiler & Fergus 2014)",
    limits="One patch at a time: misses effects that need several patches removed together.",
    families=_TWO_TOWER,
)(_per_target_runner("CausalOcclusion", {"layers": "input: patch tokens", "heads": "n/a"},
                     intervention="drop", window=1))


_FUSION_KINDS = {
    "BlipForImageTextRetrieval": "match",
    "ViltForImageAndTextRetrieval": "match",
    "BlipForConditionalGeneration": "caption",
    "BlipForQuestionAnswering": "vqa",
    "ViltForQuestionAnswering": "vqa",
    "LlavaForConditionalGeneration": "generate",
}
_ANSWERED = ("vqa", "generate")  # kinds whose maps explain the model's own answer


def _fusion_runner(class_name: str, base_details: dict[str, str]) -> Callable[[ExplainContext], list[MapRecord]]:
    """Fusion models: one map per text and one per token, each text paired with the image. What
    a text's map explains: its match logit, its caption's log-probability, or the model's own
    answer to it (BLIP VQA, LLaVA: one map per generated token; ViLT VQA: the answer label's
    logit, one map per question token)."""

    def run(context: ExplainContext) -> list[MapRecord]:
        kind = _FUSION_KINDS[type(context.model).__name__]
        method = _attr_class(class_name)(context.model)
        details = {**base_details, "layers": f"text cross-attention block {method.layer}"} if hasattr(method, "layer") else base_details
        records = []
        for k, whole, per_token, tokens, shown in _fusion_maps(method, kind, context):
            mass = per_token.flatten(1).sum(1)
            if kind in _ANSWERED:
                answer = context.answers.texts[k]
                what, title = f"answer '{answer}' to text {k}", f"{context.texts[k]} → {answer}"
            else:
                what = f"{'match logit' if kind == 'match' else 'caption log-probability'} of text {k}"
                title = context.texts[k]
            records.append(MapRecord(class_name, title, whole.numpy(),
                                     {**details, "target": what, "tokens": "total of each token's own image map"},
                                     [tokens[j] for j in shown], mass[shown].numpy(), text_index=k))
            for j in shown:
                if per_token[j].abs().sum() > 0:
                    records.append(MapRecord(class_name, f"{title} · {tokens[j]}", per_token[j].numpy(),
                                             {**details, "target": f"token {j} of {what}"}))
        return records

    return run


def _fusion_maps(method: Any, kind: str, context: ExplainContext):
    """``(text index, whole map, per-token maps [T, h, w], token strings, positions shown)`` per
    explained text, both maps from one pass (``attribute_with_tokens``)."""
    pixels, ids, mask = (context.inputs[k] for k in ("pixel_values", "input_ids", "attention_mask"))
    answers = context.answers
    if kind == "generate":  # LLaVA: each prompt with its own generated continuation
        for k in context.targets:
            sequence, start = answers.sequences[k], answers.prompt_lengths[k]
            shown = list(range(start, sequence.shape[1]))
            whole, per_token = method.attribute_with_tokens(
                pixels[k : k + 1], target=shown, additional_forward_args=(sequence, torch.ones_like(sequence)),
                return_grid=True,
            )
            yield k, whole[0], per_token[0], answers.tokens[k], shown
        return
    rows = torch.tensor(context.targets)
    args: tuple = (ids[rows], mask[rows])
    target, token_strings, token_mask = None, context.tokens, mask.bool()
    if kind == "vqa" and answers.answer_ids is not None:  # BLIP: maps over the answer's tokens
        args = (*args, answers.answer_ids[rows], answers.answer_mask[rows])
        token_strings, token_mask = answers.tokens, answers.answer_mask.bool()
        token_mask[:, 0] = False  # the start token predicts, it is not predicted
    elif kind == "vqa":  # ViLT: the answer label's logit, maps over the question's tokens
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
    families=("blip", "vilt", "llava"),
)(_fusion_runner("CrossAttentionGradCAM", {"heads": "mean of A·ReLU(∇A)"}))
register_method(
    "bimodal-relevancy",
    summary="Bi-modal relevancy propagation through self- and co-attention (Chefer et al. 2021)",
    limits="Follows attention and its gradients only; MLP and value paths are not propagated.",
    families=("blip", "vilt", "llava"),
)(_fusion_runner("BimodalRelevancy", {"layers": "all blocks", "heads": "grad-weighted mean"}))


# ----------------------------------------------------------------------------------------------
# The Explanation
# ----------------------------------------------------------------------------------------------
@dataclass
class Explanation:
    """Maps, token scores, model scores and metadata of one image and its texts.

    Args:
        image: the original image.
        texts: the prompts or captions.
        records: the maps, one per (method, target).
        scores: ``{text: score}`` of the model (probability over prompts for CLIP, sigmoid for
            SigLIP).
        score_kind: what ``scores`` holds.
        model_name: the model's name for titles.
        crop_box: region of ``image`` that the processor kept ``(left, top, right, bottom)``.
        notes: ``{method: limits}``.
    """

    image: Image.Image
    texts: list[str]
    records: list[MapRecord]
    scores: dict[str, float]
    score_kind: str
    model_name: str
    crop_box: tuple[float, float, float, float] | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.records))

    def maps(self, method: str | None = None) -> dict[str, np.ndarray]:
        """``{"method: target": grid}`` of every map (of one method if given)."""
        return {f"{r.method}: {r.target}": r.grid for r in self.records if method in (None, r.method)}

    def plot(self, method: str | None = None, ncols: int = 4):
        """All maps (or one method's) over the image, side by side. Returns a Figure."""
        from captum_vlm.viz import overlay_grid

        maps = self.maps(method)
        if not maps:
            raise ValueError(f"method: {method!r} is not in this explanation; it holds {self.methods}")
        labels = {r.details.get("value") for r in self.records if method in (None, r.method)}
        value = labels.pop() if len(labels) == 1 else "attribution (each panel on its own scale)"
        return overlay_grid(self.image, maps, ncols=min(ncols, len(maps)), title=self.model_name,
                            crop_box=self.crop_box, value_label=value)

    def compare(self, target: int | None = None, ncols: int = 4):
        """The compare view: every method's map of one text side by side (prompt-independent
        maps included), titled with the methods' mean pairwise rank agreement. Returns a Figure."""
        from captum_vlm.viz import overlay_grid

        records = compare_records(self.records, target)
        if not records:
            raise ValueError(f"target: no whole-text map of text {target!r} in this explanation")
        maps = {f"{r.method}{' (prompt-independent)' if r.text_index is None else ''}": r.grid for r in records}
        shown = next((r.target for r in records if r.text_index is not None), records[0].target)
        return overlay_grid(self.image, maps, ncols=min(ncols, len(maps)), title=f"{self.model_name}: {shown}",
                            crop_box=self.crop_box, value_label="each panel on its own scale")

    def agreement(self) -> dict[tuple[str, str], float]:
        """Pairwise rank agreement of the methods: Spearman correlation of their maps of each
        explained text, mean over the texts (:func:`captum_vlm.evidence.rank_agreement`)."""
        return rank_agreement(self.records)

    def _flag(self, record: MapRecord) -> str | None:
        """A warning for a map whose target the model does not see (see :func:`confidence`)."""
        if not record.evidence_values.get("absent"):
            return None
        seen = record.evidence.get("model's confidence", "low").split(" — ")[0]
        return (f"The model does not see '{record.target}' (confidence {seen}): this map shows where "
                "it would look, not an object it found.")

    def _record_png(self, record: MapRecord) -> bytes:
        import matplotlib.pyplot as plt

        from captum_vlm.viz import overlay

        flag = "MODEL DOES NOT SEE THIS TARGET" if self._flag(record) else None
        fig = overlay(self.image, record.grid, title=flag, method=record.method,
                      layers=record.details.get("layers"), heads=record.details.get("heads"),
                      target=record.target, crop_box=self.crop_box, value_label=record.details.get("value"))
        try:
            return _png(fig)
        finally:
            plt.close(fig)

    def to_html(self, path: str | Path | None = None, full_page: bool = True) -> str:
        """The self-contained HTML report; written to ``path`` when given. Returns the HTML.

        ``full_page=False`` gives the ``<div>`` fragment that notebooks show."""
        from captum_vlm.viz.report import ReportView, render_report

        views = [
            ReportView(r.method, r.target, self._record_png(r) if i == 0 else None, r.details, r.tokens,
                       None if r.token_scores is None else list(map(float, r.token_scores)),
                       grid=r.grid, evidence=r.evidence, flag=self._flag(r), value_label=r.details.get("value"))
            for i, r in enumerate(self.records)
        ]
        compare_png, compare_title = None, ""
        if len(self.methods) > 1 and compare_records(self.records, None):
            import matplotlib.pyplot as plt

            figure = self.compare()
            compare_png, compare_title = _png(figure), compare_records(self.records, None)[0].target
            plt.close(figure)
        buffer = io.BytesIO()
        self.image.convert("RGB").save(buffer, format="PNG")
        page = render_report(
            f"captum-vlm: {self.model_name}", buffer.getvalue(), views, scores=self.scores,
            score_label=self.score_kind, notes=self.notes,
            meta={"model": self.model_name, "image": f"{self.image.width}×{self.image.height}"},
            full_page=full_page, crop_box=self.crop_box, compare_png=compare_png,
            compare_title=compare_title, agreement=self.agreement() if len(self.methods) > 1 else None,
        )
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page

    def _repr_html_(self) -> str:
        return self.to_html(full_page=False)

    def to_dict(self) -> dict:
        """Everything but the image, as JSON-ready data."""
        return {
            "model": self.model_name,
            "texts": self.texts,
            "scores": self.scores,
            "score_kind": self.score_kind,
            "crop_box": self.crop_box,
            "maps": [
                {
                    "method": r.method,
                    "target": r.target,
                    "details": r.details,
                    "grid": np.asarray(r.grid, dtype=float).tolist(),
                    "tokens": r.tokens,
                    "token_scores": None if r.token_scores is None else np.asarray(r.token_scores, float).tolist(),
                    "text_index": r.text_index,
                    "evidence": r.evidence,
                    "evidence_values": r.evidence_values,
                }
                for r in self.records
            ],
        }

    def save(self, directory: str | Path) -> list[Path]:
        """Write one PNG per map and ``explanation.json``. Returns the paths written.

        Saving again into the same folder first removes the PNGs the previous ``save`` wrote
        (listed in its ``explanation.json``), so no stale map stays beside the new ones; other
        files are left alone."""
        out = Path(directory)
        if out.exists() and not out.is_dir():
            raise ValueError(f"directory: {str(out)!r} is a file; give a folder for the PNGs")
        out.mkdir(parents=True, exist_ok=True)
        remove_previous_save(out)
        written = []
        for i, record in enumerate(self.records):
            path = out / f"{i:02d}-{_slug(record.method)}-{_slug(record.target)}.png"
            path.write_bytes(self._record_png(record))
            written.append(path)
        path = out / "explanation.json"
        record = {**self.to_dict(), "files": [p.name for p in written]}
        path.write_text(json.dumps(record, indent=1), encoding="utf-8")
        return [*written, path]


def remove_previous_save(out: Path) -> None:
    """Delete the PNGs an earlier :meth:`Explanation.save` listed in ``out/explanation.json``."""
    manifest = out / "explanation.json"
    if not manifest.is_file():
        return
    try:
        names = json.loads(manifest.read_text(encoding="utf-8")).get("files", [])
    except (ValueError, AttributeError):
        return
    for name in names:
        candidate = out / str(name)
        if candidate.parent == out and candidate.suffix == ".png" and candidate.is_file():
            candidate.unlink()


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(part for part in keep.split("-") if part)[:40] or "x"


# ----------------------------------------------------------------------------------------------
# explain()
# ----------------------------------------------------------------------------------------------
def _as_image(image: Any) -> Image.Image:
    """A PIL image from a path, a PIL image or an ``(H, W, 3)`` array: uint8 as is, floats in
    [0, 1] times 255, floats in [0, 255] as they are; other float ranges and NaN/inf refused."""
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise ValueError(f"image: no file at {str(image)!r}")
        return Image.open(image).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3:
        return Image.fromarray(_as_uint8(image))
    shape = f" of shape {image.shape}" if isinstance(image, np.ndarray) else ""
    raise TypeError(f"image: expected a PIL image, an (H, W, 3) array or a path, got {type(image).__name__}{shape}")


def _as_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise TypeError(f"image: expected a uint8 or float array, got dtype {image.dtype}")
    if not np.isfinite(image).all():
        raise ValueError("image: the array holds NaN or infinite values; expected finite pixels")
    lo, hi = float(image.min()), float(image.max())
    if lo >= 0 and hi <= 1 and np.issubdtype(image.dtype, np.floating):
        return np.round(image * 255).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return np.round(image).astype(np.uint8)
    raise ValueError(
        f"image: values from {lo:.4g} to {hi:.4g} fit neither [0, 1] nor [0, 255]; pass the original "
        "picture (uint8, or floats in [0, 1]), not normalised pixel_values"
    )


def processor_crop_box(processor: Any, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """Region of an image of ``size`` (width, height) that ``processor`` keeps after resize and
    centre crop, in original pixels; ``None`` when it keeps (a resized copy of) the whole image."""
    from captum_vlm.viz import resize_crop_box

    ip = getattr(processor, "image_processor", processor)
    if not getattr(ip, "do_center_crop", False):
        return None
    resize = getattr(ip, "size", None) or {}
    crop = getattr(ip, "crop_size", None) or {}
    if "shortest_edge" in resize:
        resize_to: int | tuple[int, int] = int(resize["shortest_edge"])
    elif "height" in resize:
        resize_to = (int(resize["width"]), int(resize["height"]))
    else:
        return None
    crop_to = (int(crop.get("width", 0)), int(crop.get("height", 0)))
    if not all(crop_to):
        return None
    return resize_crop_box(size, resize_to, crop_to)


def _model_name(model: nn.Module) -> str:
    path = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return Path(path).name if path else type(model).__name__


def explain(
    model: nn.Module,
    processor: Any,
    image: Any,
    texts: Sequence[str],
    methods: Sequence[str] | None = None,
    target: int | Sequence[int] | None = None,
    *,
    model_name: str | None = None,
    show_progress: bool = False,
    max_new_tokens: int = 10,
    evidence: bool = True,
) -> Explanation:
    """Explain how ``model`` relates ``image`` to ``texts`` with one or more methods.

    Args:
        model: a supported transformers model (see :func:`captum_vlm.adapters.supported_model_classes`).
        processor: its processor (``processor(images=..., text=[...], return_tensors="pt", padding=True)``).
        image: a PIL image, an ``(H, W, 3)`` array or a path.
        texts: the prompts (two-tower models: each explained against the image; matching and
            captioning models: captions; VQA models: questions; LLaVA: prompts holding the
            image token. VQA models and LLaVA are explained through their own answer, see
            :func:`answer_questions`).
        methods: registry names, see :func:`method_names`. Default: the method the zoo
            benchmark ranks most faithful for the model's family
            (:data:`captum_vlm.evidence.DEFAULT_METHODS`: CLIP ``relevancy``, SigLIP
            ``grad-eclip``, BLIP/ViLT/LLaVA ``bimodal-relevancy``; see ``benchmarks/RESULTS.md``).
        target: which prompts to explain (index or list); ``None`` explains all.
        model_name: name for titles (default: the checkpoint's folder or the class name).
        show_progress: a tqdm bar over methods.
        max_new_tokens: VQA and generative models: longest answer generated (greedy).
        evidence: attach each map's evidence (:mod:`captum_vlm.evidence`): deletion and
            insertion AUC against random orders, the method's randomisation check, the model's
            confidence. Prompt-independent maps are kept once either way.

    Returns:
        An :class:`Explanation`.
    """
    adapter = get_adapter(model)
    check_processor(processor)
    picture = _as_image(image)
    texts = check_texts(texts)
    if isinstance(target, str) or isinstance(target, bool):
        raise TypeError(f"target: expected a text index (int) or a list of them, got {target!r}; "
                        "pass the text itself in texts")
    if methods is None:
        methods = default_methods(adapter.family, method_names(adapter.family))
    if isinstance(methods, str):
        methods = [methods]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods: unknown {unknown or methods!r}; choose from {method_names()}")
    unsupported = [m for m in methods if adapter.family not in METHODS[m].families]
    if unsupported:
        raise ValueError(
            f"methods: {unsupported} do not support {type(model).__name__}; for it use "
            f"{method_names(adapter.family)}"
        )
    if target is None:
        targets = list(range(len(texts)))
    else:
        if not isinstance(target, (int, Sequence)):
            raise TypeError(f"target: expected a text index (int) or a list of them, got {type(target).__name__}")
        targets = [target] if isinstance(target, int) else list(target)
        bad = [t for t in targets if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < len(texts)]
        if bad or not targets:
            raise ValueError(f"target: {bad or targets} out of range for {len(texts)} texts (0..{len(texts) - 1})")
        if len(set(targets)) != len(targets):
            raise ValueError(f"target: {targets} names a text more than once; give each index once")
    # SigLIP pools the last position and is trained on texts padded to the full length
    padding = "max_length" if adapter.family == "siglip" else True
    two_tower = getattr(adapter, "two_tower", False)
    images = picture if two_tower else [picture] * len(texts)  # fusion models: each text with the image
    inputs = processor(images=images, text=list(texts), return_tensors="pt", padding=padding)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokens = [tokenizer.convert_ids_to_tokens(row.tolist()) for row in inputs["input_ids"]]
    check_count(max_new_tokens, "max_new_tokens")
    answers = None
    if _FUSION_KINDS.get(type(model).__name__) in _ANSWERED:
        answers = answer_questions(model, tokenizer, dict(inputs), max_new_tokens=max_new_tokens)
    context = ExplainContext(model, adapter, dict(inputs), list(texts), targets, tokens, show_progress, answers)
    scores, kind = _model_scores(model, adapter, inputs, texts, answers)
    records: list[MapRecord] = []
    shared: dict = {}  # score functions and random-order curves, shared by the methods
    for name in tqdm(methods, desc="methods", disable=not show_progress):
        found = METHODS[name].run(context)
        for record in found:
            record.method = name
            record.details.setdefault("value", VALUE_LABELS.get(name, "attribution (method units)"))
        if evidence:
            attach_evidence(context, found, METHODS[name].run, list(scores.values()), kind,
                            _FUSION_KINDS.get(type(model).__name__), cache=shared)
        records.extend(collapse_prompt_independent(found, texts))
    return Explanation(
        image=picture,
        texts=list(texts),
        records=records,
        scores=scores,
        score_kind=kind,
        model_name=model_name or _model_name(model),
        crop_box=processor_crop_box(processor, picture.size),
        notes={m: METHODS[m].limits for m in methods},
    )


def _model_scores(model, adapter, inputs, texts, answers: Answers | None) -> tuple[dict[str, float], str]:
    from captum_vlm.targets import ImageTextSimilarity, MatchLogit, TokenLogProbs

    pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    kind = _FUSION_KINDS.get(type(model).__name__)
    if answers is not None:
        return {f"{q} → {a}": p for q, a, p in zip(texts, answers.texts, answers.probabilities)}, "answer probability"
    with torch.no_grad():
        if getattr(adapter, "two_tower", False):
            logits = ImageTextSimilarity(model)(pixels, ids, mask)[0]
            if adapter.family == "siglip":
                return dict(zip(texts, torch.sigmoid(logits).tolist())), "sigmoid probability"
            if len(texts) == 1:  # a softmax over one prompt is always 1
                return dict(zip(texts, logits.tolist())), "logit (one prompt: no probability over prompts)"
            return dict(zip(texts, logits.softmax(-1).tolist())), "probability over prompts"
        if kind == "match":
            return dict(zip(texts, torch.sigmoid(MatchLogit(model)(pixels, ids, mask)).tolist())), "match probability"
        if kind == "caption":
            return dict(zip(texts, TokenLogProbs(model, reduction="sum")(pixels, ids, mask).tolist())), "log-probability"
    return {}, "score"
