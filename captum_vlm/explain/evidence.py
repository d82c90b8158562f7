"""What the convenience layer attaches to every map: its evidence, and the words it is shown with.

For each map of :func:`captum_vlm.explain` (one per method and explained text):

- **faithfulness on this input**: deletion and insertion AUC of the explained score against
  random patch orders (:func:`captum_vlm.metrics.maps_evidence`: the maps of all prompts of a
  two-tower model in shared batched forwards, the random orders' curves scored once per input);
- **randomisation check** of the method on this model (Adebayo et al. 2018,
  :func:`captum_vlm.metrics.model_randomization_check`): the rank correlation between the map of
  the trained model and the map after re-initialising the vision blocks top-down; a method whose
  map survives the randomisation does not read the model;
- **the model's confidence** in the target, so a map of an absent object is marked.

Maps that do not depend on the prompt (identical for every text) are kept once and labelled so.
Also here: the default methods per family (from the zoo benchmark ranking in
``benchmarks/RESULTS.md``), what each method's number is (colour-bar labels) and one vocabulary
for layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from captum_vlm.adapters import get_adapter

__all__ = [
    "VALUE_LABELS", "attach_evidence", "collapse_prompt_independent", "confidence",
    "default_methods", "layers_label",
]

VALUE_LABELS: dict[str, str] = {
    "grad-eclip": "Grad-ECLIP relevance: ReLU(∂ logit / ∂ attention) × value (a.u.)",
    "raw-attention": "attention weight of the pooled token (probability)",
    "rollout": "rolled-out attention of the pooled token (probability)",
    "relevancy": "relevancy: gradient-weighted attention, rolled out (a.u.)",
    "integrated-gradients": "logit change credited to the patch (integrated gradients)",
    "occlusion": "logit fall when the patch token is dropped",
    "cross-attention-gradcam": "cross-attention × ReLU(gradient), head mean (a.u.)",
    "bimodal-relevancy": "relevancy: gradient-weighted attention, propagated (a.u.)",
}


def default_methods(adapter: Any, registered: Sequence[str]) -> list[str]:
    """The adapter's :attr:`~captum_vlm.adapters.VLMAdapter.default_methods` that are in
    ``registered``, else the first registered one.

    Example:
        >>> default_methods(get_adapter(model), ["grad-eclip", "relevancy"])  # doctest: +SKIP
        ['relevancy']
    """
    chosen = [m for m in adapter.default_methods if m in registered]
    return chosen or list(registered[:1])


def layers_label(layers: Any, n_blocks: int, where: str = "vision") -> str:
    """One vocabulary for layers: ``"vision block 3 (last)"``, ``"vision blocks 1, 2, 3"``.

    Args:
        layers: ``None`` (the last block), an index or a list of indices (negative from the end).
        n_blocks: blocks in the tower.
        where: the tower's name.

    Example:
        >>> layers_label(None, 4), layers_label([-3, -2, -1], 4)
        ('vision block 3 (last)', 'vision blocks 1, 2, 3')
    """
    if layers is None:
        return f"{where} block {n_blocks - 1} (last)"
    items = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    items = [int(i) % n_blocks if isinstance(i, int) and n_blocks else i for i in items]
    if len(items) == 1:
        last = " (last)" if items[0] == n_blocks - 1 else ""
        return f"{where} block {items[0]}{last}"
    if items == list(range(n_blocks)):
        return f"{where} blocks 0-{n_blocks - 1} (all)"
    return f"{where} blocks {', '.join(map(str, items))}"


def confidence(scores: Sequence[float], kind: str, index: int) -> tuple[str, bool]:
    """The model's confidence in text ``index`` and whether it is too low to trust a map of it.

    Probabilities over prompts mark a text absent below ``1 / (2K)`` (half of an even share);
    sigmoid, match and answer probabilities below 0.5.

    Returns:
        ``(line, absent)``.

    Example:
        >>> confidence([0.5, 0.49, 0.01], "probability over prompts", 2)
        ('0.0100 (probability over prompts; 3 prompts) — the model does not see it', True)
    """
    value = float(scores[index])
    if kind == "probability over prompts":
        absent = value < 1.0 / (2 * len(scores))
        line = f"{value:.4f} ({kind}; {len(scores)} prompts)"
    elif "probability" in kind and "log" not in kind:
        absent = value < 0.5
        line = f"{value:.4f} ({kind})"
    else:
        return f"{value:.4g} ({kind})", False
    return line + (" — the model does not see it" if absent else ""), absent


def _score_function(context: Any, k: int):
    """``(key, forward(images) -> [N] or [N, K], column, unit)`` of the score text ``k``'s map
    explains (asked of the adapter's task), or ``None`` where the map explains no single score.
    Texts with the same ``key`` share one forward: a two-tower model scores every prompt in each
    call (``column`` k), so the maps of all prompts share their random-order curves."""
    from captum_vlm.targets import AnswerLogits, ImageTextSimilarity, MatchLogit, TokenLogProbs

    model, inputs, answers = context.model, context.inputs, context.answers
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    task = context.adapter.task

    def rows(*tensors):
        return lambda n: tuple(t[k : k + 1].expand(n, *t.shape[1:]) for t in tensors)

    if task == "similarity":
        target_fn = ImageTextSimilarity(model)
        return "similarity", (lambda images: target_fn(images, ids, mask)), k, "logit"
    if task == "match":
        target_fn, args = MatchLogit(model), rows(ids, mask)
        return ("text", k), (lambda images: target_fn(images, *args(len(images)))), None, "match logit"
    if task == "caption":
        target_fn, args = TokenLogProbs(model, reduction="sum"), rows(ids, mask)
        return ("text", k), (lambda images: target_fn(images, *args(len(images)))), None, "caption log-probability"
    if task == "answer_tokens" and answers is not None and answers.answer_ids is not None:
        target_fn = TokenLogProbs(model, reduction="sum")
        args = rows(ids, mask, answers.answer_ids, answers.answer_mask)
        return ("text", k), (lambda images: target_fn(images, *args(len(images)))), None, "answer log-probability"
    if task == "answer_label" and answers is not None and answers.label_ids is not None:
        target_fn, args, label = AnswerLogits(model), rows(ids, mask), int(answers.label_ids[k])
        return ("text", k), (lambda images: target_fn(images, *args(len(images)))[:, label]), None, "answer logit"
    if task == "generate" and answers is not None and answers.sequences is not None:
        answer_args = answers.forward_args[k]
        target_fn = TokenLogProbs(model, reduction="sum", score_from=answers.prompt_lengths[k])

        def forward(images):
            return target_fn(images, *(a.expand(len(images), -1) for a in answer_args))

        return ("text", k), forward, None, "answer log-probability"
    return None


def _randomisation(run: Callable, context: Any) -> tuple[str, float | None]:
    """Rank correlation of the first explained text's map before and after re-initialising the
    vision blocks top-down (cascading); ``passes`` below 0.5."""
    from captum_vlm.metrics import model_randomization_check

    try:
        blocks = context.adapter.vision_blocks()
    except (NotImplementedError, AttributeError):
        blocks = None

    def explain_fn(model, _):
        copy = replace(context, model=model, adapter=get_adapter(model), targets=context.targets[:1],
                       show_progress=False)
        maps = [r.grid for r in run(copy) if r.text_index is not None]
        return torch.as_tensor(np.stack(maps)[:1])

    result = model_randomization_check(context.model, explain_fn, None,
                                       layers=None if blocks is None else blocks[::-1])
    rho = result.spearman[-1]
    if rho != rho:  # NaN: a constant map
        return "not measured: the map is constant", None
    where = "all vision blocks" if blocks is not None else "every top-level module"
    verdict = "passes" if abs(rho) < 0.5 else "FAILS"
    return f"{verdict}: rank correlation {rho:.2f} with the map after re-initialising {where}", rho


def attach_evidence(
    context: Any,
    records: list,
    run: Callable,
    scores: Sequence[float],
    score_kind: str,
    *,
    steps: int = 8,
    n_random: int = 3,
    sanity: bool = True,
    cache: dict | None = None,
) -> None:
    """Fill ``record.evidence`` (display lines) and ``record.evidence_values`` (numbers) of every
    whole-text map in ``records`` of one method, in place. The maps that share a score forward
    (all prompts of a two-tower model) are scored together (:func:`captum_vlm.metrics.maps_evidence`);
    ``cache`` (one dict per explained input, shared by the methods) keeps the score functions and
    the curves every map of the input shares (random orders, curve ends)."""
    from captum_vlm.metrics import maps_evidence

    pixels = context.inputs["pixel_values"]
    verdict, rho = _randomisation(run, context) if sanity else ("not run", None)
    cache = {} if cache is None else cache
    groups: dict[tuple, list] = {}
    for record in records:
        k = record.text_index
        if k is None:
            continue
        line, absent = confidence(scores, score_kind, k) if len(scores) > k else ("n/a", False)
        record.evidence["model's confidence"] = line
        record.evidence_values.update(absent=absent, randomisation_spearman=rho)
        record.evidence["randomisation check"] = verdict
        if ("score", k) not in cache:
            found = _score_function(context, k)
            if found is not None and found[0] in cache:  # one forward for every text of this key
                found = (found[0], cache[found[0]][0], *found[2:])
            elif found is not None:
                cache[found[0]] = (found[1],)
            cache[("score", k)] = found
        if cache[("score", k)] is None:
            record.evidence["faithfulness"] = "not measured for this model's task"
            continue
        grid = np.asarray(record.grid, dtype=np.float64)
        groups.setdefault((cache[("score", k)][0], grid.shape), []).append(record)
    for (key, shape), members in groups.items():
        _, forward, _, unit = cache[("score", members[0].text_index)]
        k = members[0].text_index
        row = pixels[k : k + 1] if pixels.shape[0] > 1 else pixels
        columns = [cache[("score", r.text_index)][2] for r in members]
        grids = torch.as_tensor(np.stack([np.asarray(r.grid, dtype=np.float64) for r in members]))
        found = maps_evidence(forward, row, grids, None if columns[0] is None else columns,
                              steps=min(steps, grids[0].numel()), n_random=n_random,
                              shared=cache.get(("shared", key, shape)))
        cache[("shared", key, shape)] = found[0].shared
        for record, evidence in zip(members, found):
            record.evidence["faithfulness"] = evidence.summary(unit) + (
                "" if evidence.beats_random else " — NOT better than a random order"
            )
            record.evidence_values.update(
                deletion_auc=evidence.deletion_auc, insertion_auc=evidence.insertion_auc,
                random_deletion_auc=evidence.random_deletion_auc,
                random_insertion_auc=evidence.random_insertion_auc,
                beats_random=evidence.beats_random, unit=unit,
            )


def collapse_prompt_independent(records: list, texts: Sequence[str]) -> list:
    """Keep one map of a method whose whole-text maps are identical for every text, labelled so.

    Returns the records to keep (per-token maps untouched)."""
    whole = [r for r in records if r.text_index is not None]
    if len(whole) < 2:
        return records
    first = np.asarray(whole[0].grid, dtype=np.float64)
    scale = float(np.abs(first).max()) or 1.0
    if not all(np.allclose(np.asarray(r.grid, np.float64), first, rtol=0, atol=1e-6 * scale) for r in whole[1:]):
        return records
    kept = whole[0]
    kept.target = "every prompt (prompt-independent)"
    kept.details["target"] = f"none: the map is the same for all {len(whole)} texts"
    kept.evidence_values["prompt_independent"] = True
    for r in whole:  # its faithfulness still differs per prompt: list each
        if "faithfulness" in r.evidence:
            kept.evidence[f"faithfulness for '{texts[r.text_index]}'"] = r.evidence["faithfulness"]
        kept.evidence_values.setdefault("per_prompt", {})[texts[r.text_index]] = {
            k: v for k, v in r.evidence_values.items() if k != "per_prompt"
        }
    kept.evidence.pop("faithfulness", None)
    kept.evidence.pop("model's confidence", None)
    kept.text_index = None
    return [kept, *[r for r in records if r.text_index is None and r is not kept]]


def compare_records(records: Sequence, target: int | None) -> list:
    """Each method's whole-text map of text ``target`` (default: the first explained), plus the
    prompt-independent maps; one per method."""
    indices = [r.text_index for r in records if r.text_index is not None]
    if target is None and indices:
        target = indices[0]
    chosen: dict[str, Any] = {}
    for r in records:
        shared = r.evidence_values.get("prompt_independent") and r.text_index is None
        if (r.text_index == target and r.text_index is not None) or shared:
            chosen.setdefault(r.method, r)
    return list(chosen.values())


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def rank_agreement(records: Sequence) -> dict[tuple[str, str], float]:
    """``{(method a, method b): mean Spearman correlation}`` of the two methods' maps of each text
    both explain (a prompt-independent map stands for every text); NaN pairs (a constant map)
    are left out of the mean.

    Example:
        >>> from types import SimpleNamespace as R
        >>> g = np.arange(4.0).reshape(2, 2)
        >>> rank_agreement([R(method="a", text_index=0, grid=g, evidence_values={}),
        ...                 R(method="b", text_index=0, grid=-g, evidence_values={})])
        {('a', 'b'): -1.0}
    """
    per_method: dict[str, dict[Any, np.ndarray]] = {}
    for r in records:
        if r.text_index is not None:
            per_method.setdefault(r.method, {})[r.text_index] = np.asarray(r.grid, np.float64)
        elif r.evidence_values.get("prompt_independent"):
            per_method.setdefault(r.method, {})["*"] = np.asarray(r.grid, np.float64)
    names = list(per_method)
    texts = {k for maps in per_method.values() for k in maps if k != "*"}
    result = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            values = []
            for k in sorted(texts) or ["*"]:
                ma, mb = per_method[a].get(k, per_method[a].get("*")), per_method[b].get(k, per_method[b].get("*"))
                if ma is not None and mb is not None and ma.shape == mb.shape:
                    values.append(_spearman(ma, mb))
            values = [v for v in values if v == v]
            if values:
                result[(a, b)] = float(np.mean(values))
    return result
