"""References for generative (joint-sequence) models, computed from the eager model's own outputs:
teacher-forced log-probabilities, Grad-CAM over the language model's attention and the bimodal
relevancy rule (Chefer et al., 2021), shared by the family tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


def eager_copy(model):
    """A deep copy of ``model`` running eager attention (which returns probabilities)."""
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin


def log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t] | ids[<t]) at t = 1.. ``[B, T-1]``."""
    return F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]


def gradcam_rows(attention: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of one attention layer ``[B, heads, Q, K]`` for ``score``: ``mean_h(A * relu(dS/dA))``
    ``[B, Q, K]`` (the caller sums the text query rows)."""
    grad = torch.autograd.grad(score, attention, retain_graph=True)[0]
    return (attention * grad.clamp(min=0)).mean(1)


def relevancy(attentions, score: torch.Tensor, row: int = 0) -> torch.Tensor:
    """The joint relevancy matrix ``R = prod_l (I + mean_h relu(A_l * dS/dA_l))`` ``[T, T]`` of example ``row``."""
    grads = torch.autograd.grad(score, attentions, retain_graph=True)
    length = attentions[0].shape[-1]
    r = torch.eye(length, dtype=attentions[0].dtype)
    for a, g in zip(attentions, grads):
        r = r + (a * g).clamp(min=0).mean(1)[row] @ r
    return r


def explained_lenses(model, processor, image, prompts: list[str]) -> list:
    """``cv.lens.logit_lens`` of ``prompts``, checked against ``explain(..., logit_lens=True)``:
    the last layer's produced probabilities multiply to the explained answer's probability, the
    answer ranks first there, and both calls lens the same tokens with the same probabilities.
    The model is left as found."""
    import pytest
    from model_state import assert_unchanged, snapshot
    from numerics import assert_close_scaled

    import captum_vlm as cv

    before = snapshot(model)
    result = cv.explain(model, processor, image, prompts, methods=["bimodal-relevancy"], max_new_tokens=3,
                        evidence=False, logit_lens=True)
    lenses = cv.lens.logit_lens(model, processor, image, prompts, max_new_tokens=3)
    assert_unchanged(model, before)
    assert len(result.lenses) == len(lenses) == len(prompts)
    for lens, direct, (title, probability) in zip(result.lenses, lenses, result.scores.items()):
        assert title.startswith(lens.prompt)
        # the last layer's probabilities of the produced tokens multiply to the explained answer's
        assert float(lens.produced_probs[-1].double().prod()) == pytest.approx(probability, rel=1e-4)
        assert (lens.produced_ranks[-1] == 1).all()  # greedy: the answer is top at the last layer
        assert torch.equal(direct.produced_ids, lens.produced_ids)
        assert_close_scaled(direct.produced_probs, lens.produced_probs)
    return lenses


def assert_tower_views_refused(model, raw: dict, canvas: torch.Tensor) -> None:
    """A model whose vision tower runs once per view: head statistics of the vision stream,
    probes and layer features each refuse (naming the argument) before any forward, and the model
    is left as found. ``raw``: the processor's output; ``canvas``: the adapter's image tensor."""
    import pytest
    from model_state import assert_unchanged, snapshot

    from captum_vlm.adapters import get_adapter
    from captum_vlm.lens import head_statistics, layer_features, probe

    before, runs = snapshot(model), []
    handle = model.register_forward_pre_hook(lambda *_: runs.append("model"))
    tower = get_adapter(model).vision_model().register_forward_pre_hook(lambda *_: runs.append("tower"))
    try:
        with pytest.raises(ValueError, match=r"stream: .*vision tower runs once per view"):
            head_statistics(model, raw, stream="vision")
        with pytest.raises(ValueError, match=r"model: .*vision tower runs once per view"):
            probe(model, None, canvas, [0, 1], cv=2)
        with pytest.raises(ValueError, match=r"model: .*vision tower runs once per view"):
            layer_features(model, canvas, [0])
    finally:
        handle.remove()
        tower.remove()
    assert runs == []
    assert_unchanged(model, before)


def sharpened(model, factor: float = 40.0):
    """A deep copy of ``model`` whose LM head is ``factor`` times larger: a tiny random model's
    next-token distributions are near uniform, so a word's probability hardly differs between image
    tokens; the copy's differ enough that a misplaced token shows in a word map."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.get_output_embeddings().weight.mul_(factor)
    return twin


def word_probs_at(model, forward_kwargs: dict, positions: torch.Tensor, word_ids: list[int]) -> torch.Tensor:
    """``[layers + 1, len(positions), len(word_ids)]``: per layer (0 = embeddings) the probability of
    each word at ``positions`` of example 0, from ``output_hidden_states`` through the language
    model's final norm and LM head (the last entry is normed already: checked against the logits)."""
    from captum_vlm.adapters import get_adapter

    adapter = get_adapter(model)
    norm, head = adapter.final_norm(), model.get_output_embeddings()
    with torch.no_grad():
        out = model(**forward_kwargs, output_hidden_states=True)
        states = [head(norm(h)) for h in out.hidden_states[:-1]] + [head(out.hidden_states[-1])]
    torch.testing.assert_close(states[-1], out.logits)
    return torch.stack([F.softmax(s[0, positions].double(), -1)[:, word_ids] for s in states])


def mean_over_covering(token_values: torch.Tensor, covers: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-token values ``[..., N]`` on the grid ``[..., h, w]``: each cell the mean over the tokens
    whose cells ``covers`` ``[N, h * w]`` (bool) holds it, 0 where no token does."""
    covers = covers.to(token_values.dtype)
    total = token_values @ covers
    return (total / covers.sum(0).clamp_min(1)).reshape(*token_values.shape[:-1], *grid)


def assert_varied(grid: torch.Tensor) -> None:
    """A map whose cells differ (relative to its largest value) by far more than the comparison's
    tolerance, so that a token put on the wrong cell cannot pass."""
    assert float((grid.max() - grid.min()) / grid.abs().max()) > 0.05, "the reference map is near constant"
