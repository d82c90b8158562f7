"""Two-tower image methods (Grad-ECLIP, raw attention, rollout, Chefer relevancy, patch-word
similarity) against references written here formula by formula, plus the library conventions."""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from captum.attr import Attribution, NoiseTunnel
from model_state import assert_unchanged, snapshot

from captum_vlm.attr import (
    AttentionRollout,
    GradECLIP,
    GradientWeightedRelevancy,
    PatchWordSimilarity,
    RawAttention,
)

ATOL = 1e-5


@pytest.fixture(scope="module")
def clip():
    return tm.clip()


@pytest.fixture(scope="module")
def siglip():
    return tm.siglip()


@pytest.fixture(scope="module")
def models(clip, siglip):
    return {"clip": clip, "siglip": siglip}


def eager_copy(model):
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin


def text(k: int = 3, length: int = 8):
    return tm.text_ids(k, length)


# ----- references, by hand ----------------------------------------------------------------------
def split_heads(t, heads):
    b, n, d = t.shape
    return t.reshape(b, n, heads, d // heads).transpose(1, 2)


def attention_by_hand(attn, x_ln, heads, additive_mask=None):
    """q, k, v, o (heads concatenated, before out_proj) and probs of a CLIP-style attention."""
    q = x_ln @ attn.q_proj.weight.T + attn.q_proj.bias
    k = x_ln @ attn.k_proj.weight.T + attn.k_proj.bias
    v = x_ln @ attn.v_proj.weight.T + attn.v_proj.bias
    d = q.shape[-1] // heads
    scores = split_heads(q, heads) @ split_heads(k, heads).transpose(-1, -2) / d**0.5
    if additive_mask is not None:
        scores = scores + additive_mask[:, None]
    probs = scores.softmax(-1)
    o = (probs @ split_heads(v, heads)).transpose(1, 2).reshape(q.shape)
    return q, k, v, o, probs


def block_by_hand(block, x, heads, additive_mask=None):
    ln1 = block.layer_norm1
    x_ln = F.layer_norm(x, ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps)
    q, k, v, o, probs = attention_by_hand(block.self_attn, x_ln, heads, additive_mask)
    x = x + o @ block.self_attn.out_proj.weight.T + block.self_attn.out_proj.bias
    x = x + block.mlp(block.layer_norm2(x))
    return x, dict(q=q, k=k, v=v, o=o, probs=probs)


def block_input(model, block, call):
    """Hidden states entering ``block`` while ``call()`` runs (a test-local hook)."""
    seen = []
    handle = block.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    return seen[-1]


def minmax(x):
    return (x - x.min(-1, keepdim=True).values) / (x.max(-1, keepdim=True).values - x.min(-1, keepdim=True).values)


def clip_vision_by_hand(model, pixel_values, first_layer, heads, interpolate=False):
    """Image embeddings of CLIP with blocks first_layer.. run by hand; per-block records."""
    blocks = model.vision_model.encoder.layers
    x = block_input(model, blocks[first_layer],
                    lambda: model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate))
    records = {}
    for i in range(first_layer, len(blocks)):
        x, records[i] = block_by_hand(blocks[i], x, heads)
    image = model.visual_projection(model.vision_model.post_layernorm(x[:, 0]))
    return image, records


def siglip_head_by_hand(model, pixel_values, heads=None):
    """SigLIP image embeddings with the attention-pooling head run by hand."""
    head = model.vision_model.head
    with torch.no_grad():
        x = model.vision_model(pixel_values=pixel_values).last_hidden_state
    mha = head.attention
    d = mha.embed_dim
    w, bias = mha.in_proj_weight, mha.in_proj_bias
    probe = head.probe.expand(x.shape[0], 1, d)
    q = probe @ w[:d].T + bias[:d]
    k = x @ w[d : 2 * d].T + bias[d : 2 * d]
    v = x @ w[2 * d :].T + bias[2 * d :]
    heads = heads or mha.num_heads
    probs = (split_heads(q, heads) @ split_heads(k, heads).transpose(-1, -2) / (d // heads) ** 0.5).softmax(-1)
    o = (probs @ split_heads(v, heads)).transpose(1, 2).reshape(q.shape)
    y = o @ mha.out_proj.weight.T + mha.out_proj.bias
    y = y + head.mlp(head.layernorm(y))
    return y[:, 0], dict(q=q, k=k, v=v, o=o, probs=probs)


def text_embeds(model, ids, mask):
    with torch.no_grad():
        return model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output


def cosine(image, text_embeds_):
    return F.normalize(image, dim=-1) @ F.normalize(text_embeds_, dim=-1).T


# ----- Grad-ECLIP ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [None, [0, 1]])
@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_grad_eclip_clip_matches_hand_formula(clip, layers, size):
    ids, mask = text()
    pv = tm.pixels(2, *size, seed=1)
    interpolate = size != (32, 32)
    target = [2, 0]
    got = GradECLIP(clip, layers=layers, interpolate_pos_encoding=interpolate).attribute(
        pv, target=target, additional_forward_args=(ids, mask), return_grid=True)

    chosen = [1] if layers is None else layers
    image, records = clip_vision_by_hand(clip, pv, min(chosen), tm.HEADS, interpolate)
    with torch.no_grad():
        real = clip.get_image_features(pixel_values=pv, interpolate_pos_encoding=interpolate).pooler_output
    torch.testing.assert_close(image, real, atol=ATOL, rtol=0)  # the hand forward is the model's
    score = cosine(image, text_embeds(clip, ids, mask))[[0, 1], target].sum()
    grads = torch.autograd.grad(score, [records[i]["o"] for i in chosen])
    want = 0
    for i, g in zip(chosen, grads):
        r = records[i]
        lam = minmax(F.cosine_similarity(r["q"][:, :1], r["k"][:, 1:], dim=-1))
        want = want + torch.relu((g[:, :1] * r["v"][:, 1:]).sum(-1) * lam)
    grid = (size[0] // tm.PATCH, size[1] // tm.PATCH)
    assert got.shape == (2, *grid)
    torch.testing.assert_close(got, want.reshape(2, *grid), atol=ATOL, rtol=0)
    assert got.abs().sum() > 0


def test_grad_eclip_clip_paper_mode_single_head(clip):
    ids, mask = text()
    pv = tm.pixels(1, seed=2)
    got = GradECLIP(clip, mode="paper").attribute(pv, target=1, additional_forward_args=(ids, mask), return_grid=True)

    blocks = clip.vision_model.encoder.layers
    x = block_input(clip, blocks[-1], lambda: clip.vision_model(pixel_values=pv))
    x, r = block_by_hand(blocks[-1], x, heads=1)
    image = clip.visual_projection(clip.vision_model.post_layernorm(x[:, 0]))
    score = cosine(image, text_embeds(clip, ids, mask))[0, 1]
    (g,) = torch.autograd.grad(score, [r["o"]])
    out = blocks[-1].self_attn.out_proj
    lam = minmax(F.cosine_similarity(out(r["q"][:, :1]), out(r["k"][:, 1:]), dim=-1))
    want = torch.relu((g[:, :1] * r["v"][:, 1:]).sum(-1) * lam).reshape(1, 4, 4)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    default = GradECLIP(clip).attribute(pv, target=1, additional_forward_args=(ids, mask), return_grid=True)
    assert not torch.allclose(got, default, atol=1e-4)  # the single-head re-run is a different map


@pytest.mark.parametrize("mode", ["model", "paper"])
def test_grad_eclip_siglip_at_pooling_head(siglip, mode):
    ids, mask = text()
    pv = tm.pixels(2, seed=3)
    got = GradECLIP(siglip, mode=mode).attribute(pv, target=[1, 2], additional_forward_args=(ids, mask),
                                                 return_grid=True)
    image, r = siglip_head_by_hand(siglip, pv, heads=1 if mode == "paper" else None)
    if mode == "model":
        with torch.no_grad():
            real = siglip.get_image_features(pixel_values=pv).pooler_output
        torch.testing.assert_close(image, real, atol=ATOL, rtol=0)
    score = cosine(image, text_embeds(siglip, ids, mask))[[0, 1], [1, 2]].sum()
    (g,) = torch.autograd.grad(score, [r["o"]])
    q, k = r["q"], r["k"]
    if mode == "paper":
        out = siglip.vision_model.head.attention.out_proj
        q, k = out(q), out(k)
    lam = minmax(F.cosine_similarity(q, k, dim=-1))
    want = torch.relu((g * r["v"]).sum(-1) * lam).reshape(2, 4, 4)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def causal_additive_mask(mask):
    t = mask.shape[1]
    allowed = torch.ones(t, t).tril().bool()[None] & mask.bool()[:, None, :]
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


@pytest.mark.parametrize("text_layers,full_mask,mode", [
    (None, False, "model"), ([0, 1], False, "model"), ([0, 1], True, "model"), ([0, 1], False, "paper"),
    ([1], True, "paper")])
def test_grad_eclip_text_clip_matches_hand_formula(clip, text_layers, full_mask, mode):
    ids, mask = text(3, 8)
    if full_mask:  # padding after EOS left unmasked: only tokens up to EOS count
        mask = torch.ones_like(mask)
    pv = tm.pixels(2, seed=0)
    got = GradECLIP(clip, text_layers=text_layers, mode=mode).attribute_text(pv, additional_forward_args=(ids, mask))
    assert got.shape == (2, 3, 8)  # [B, K, T] without a target
    paper = mode == "paper"  # chosen layers re-run as one head, q/k through out_proj, ReLU after the sum

    chosen = [1] if text_layers is None else text_layers
    blocks = clip.text_model.encoder.layers
    x = block_input(clip, blocks[chosen[0]], lambda: clip.text_model(input_ids=ids, attention_mask=mask))
    records = {}
    for i in range(chosen[0], len(blocks)):
        heads = 1 if paper and i in chosen else tm.HEADS
        x, records[i] = block_by_hand(blocks[i], x, heads, causal_additive_mask(mask))
    hidden = clip.text_model.final_layer_norm(x)
    eos = (ids == tm.EOS).int().argmax(-1)
    txt = clip.text_projection(hidden[torch.arange(3), eos])
    if not paper:
        torch.testing.assert_close(txt, text_embeds(clip, ids, mask), atol=ATOL, rtol=0)
    with torch.no_grad():
        image = clip.get_image_features(pixel_values=pv).pooler_output
    scores = cosine(image, txt)
    for b in range(2):
        grads = torch.autograd.grad(scores[b].sum(), [records[i]["o"] for i in chosen], retain_graph=True)
        for k in range(3):
            n = int(eos[k]) + 1  # tokens the EOS attends to
            h = 0
            for i, g in zip(chosen, grads):
                r = records[i]
                q, keys = r["q"][k, eos[k]][None], r["k"][k, :n]
                if paper:
                    q, keys = blocks[i].self_attn.out_proj(q), blocks[i].self_attn.out_proj(keys)
                lam = minmax(F.cosine_similarity(q, keys, dim=-1))
                layer_map = (g[k, eos[k]] * r["v"][k, :n]).sum(-1) * lam
                h = h + (layer_map if paper else torch.relu(layer_map))
            h = torch.relu(h)
            h[0] = 0  # BOS
            h[-1] = 0  # EOS (pooled)
            want = torch.zeros(8)
            want[:n] = h / h.sum() if h.sum() > 0 else h
            torch.testing.assert_close(got[b, k], want, atol=ATOL, rtol=0)
    # conventions: special tokens and padding get 0, the rest sums to 1
    assert (got[..., 0] == 0).all() and (got[:, 1, 7] == 0).all() and (got[:, 1, 6] == 0).all()
    assert (got[..., 1:6] > 0).any()
    sums = got.sum(-1)
    assert (sums > 0).any() and torch.allclose(sums[sums > 0], torch.ones(1), atol=1e-5)
    picked = GradECLIP(clip, text_layers=text_layers, mode=mode).attribute_text(pv, target=[2, 1], additional_forward_args=(ids, mask))
    torch.testing.assert_close(picked, got[[0, 1], [2, 1]])


def test_models_still_report_attentions_afterwards():
    model = tm.clip()  # fresh: transformers installs its output-recording hooks lazily
    ids, mask = text()
    pv = tm.pixels(1)
    GradECLIP(model).attribute_text(pv, target=0, additional_forward_args=(ids, mask))
    GradientWeightedRelevancy(model).attribute(pv, target=0, additional_forward_args=(ids, mask))
    model.set_attn_implementation("eager")
    out = model(pixel_values=pv, input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert len(out.vision_model_output.attentions) == 2 and len(out.text_model_output.attentions) == 2
    assert len(out.vision_model_output.hidden_states) == 3


def test_grad_eclip_text_special_tokens_mask_and_siglip(clip, siglip):
    ids, mask = text(2, 8)
    pv = tm.pixels(1, seed=5)
    special = torch.zeros_like(ids)
    special[:, 1] = 1
    got = GradECLIP(clip).attribute_text(pv, target=0, additional_forward_args=(ids, mask), special_tokens_mask=special)
    assert got[0, 1] == 0
    sig = GradECLIP(siglip).attribute_text(pv, additional_forward_args=(ids, mask))
    assert sig.shape == (1, 2, 8)
    assert (sig[..., -1] == 0).all()  # SigLIP pools at the last position
    with pytest.raises(ValueError, match="special_tokens_mask"):
        GradECLIP(clip).attribute_text(pv, target=0, additional_forward_args=(ids, mask), special_tokens_mask=special[:, :3])


# ----- attention baselines -------------------------------------------------------------------
def clip_attentions(clip, pv, ids, mask, target=None):
    """Eager copy's attentions ``[B, H, N, N]`` per layer and, with a target, d logit / d A."""
    twin = eager_copy(clip)
    pv = pv.clone().requires_grad_(target is not None)
    out = twin(pixel_values=pv, input_ids=ids, attention_mask=mask, output_attentions=True)
    attentions = list(out.vision_model_output.attentions)
    grads = None
    if target is not None:
        score = out.logits_per_image[torch.arange(pv.shape[0]), target].sum()
        grads = torch.autograd.grad(score, attentions)
    return [a.detach() for a in attentions], grads


def siglip_head_attention(siglip, pv, ids, mask, target=None):
    image, r = siglip_head_by_hand(siglip, pv)
    grad = None
    if target is not None:
        logits = siglip.logit_scale.exp() * cosine(image, text_embeds(siglip, ids, mask)) + siglip.logit_bias
        (grad,) = torch.autograd.grad(logits[torch.arange(pv.shape[0]), target].sum(), [r["probs"]])
    return r["probs"].detach(), grad


@pytest.mark.parametrize("fusion", ["mean", "max", "grad"])
def test_raw_attention_clip(clip, fusion):
    ids, mask = text()
    pv = tm.pixels(2, seed=6)
    got = RawAttention(clip, layers=[0, -1], head_fusion=fusion).attribute(
        pv, target=[1, 0], additional_forward_args=(ids, mask), return_grid=True)
    attentions, grads = clip_attentions(clip, pv, ids, mask, target=[1, 0])
    per_layer = []
    for a, g in zip(attentions, grads):
        row, grow = a[:, :, 0, 1:], g[:, :, 0, 1:]
        per_layer.append({"mean": row.mean(1), "max": row.max(1).values, "grad": (grow * row).clamp(min=0).mean(1)}[fusion])
    want = (per_layer[0] + per_layer[1]) / 2
    torch.testing.assert_close(got, want.reshape(2, 4, 4), atol=ATOL, rtol=0)


@pytest.mark.parametrize("fusion", ["mean", "grad"])
def test_raw_attention_siglip_head(siglip, fusion):
    ids, mask = text()
    pv = tm.pixels(2, seed=7)
    got = RawAttention(siglip, head_fusion=fusion).attribute(pv, target=2, additional_forward_args=(ids, mask),
                                                             return_grid=True)
    probs, grad = siglip_head_attention(siglip, pv, ids, mask, target=[2, 2])
    want = probs[:, :, 0].mean(1) if fusion == "mean" else (grad * probs)[:, :, 0].clamp(min=0).mean(1)
    torch.testing.assert_close(got, want.reshape(2, 4, 4), atol=ATOL, rtol=0)


@pytest.mark.parametrize("start_layer", [0, 1])
def test_attention_rollout_clip(clip, start_layer):
    ids, mask = text()
    pv = tm.pixels(2, seed=8)
    got = AttentionRollout(clip, start_layer=start_layer).attribute(pv, target=0, additional_forward_args=(ids, mask),
                                                                     return_grid=True)
    attentions, _ = clip_attentions(clip, pv, ids, mask)
    eye = torch.eye(17)
    aug = [(a.mean(1) + eye) / (a.mean(1) + eye).sum(-1, keepdim=True) for a in attentions]
    joint = aug[start_layer]
    for layer in range(start_layer + 1, len(aug)):
        joint = torch.bmm(aug[layer], joint)
    torch.testing.assert_close(got, joint[:, 0, 1:].reshape(2, 4, 4), atol=ATOL, rtol=0)


def test_attention_rollout_siglip_reads_through_head(siglip):
    ids, mask = text()
    pv = tm.pixels(1, seed=9)
    got = AttentionRollout(siglip).attribute(pv, target=0, additional_forward_args=(ids, mask), return_grid=True)
    twin = eager_copy(siglip)
    with torch.no_grad():
        attentions = twin.vision_model(pixel_values=pv, output_attentions=True).attentions
    eye = torch.eye(16)
    a0, a1 = [(a.mean(1) + eye) / (a.mean(1) + eye).sum(-1, keepdim=True) for a in attentions]
    probs, _ = siglip_head_attention(siglip, pv, ids, mask)
    want = probs.mean(1) @ a1 @ a0
    torch.testing.assert_close(got, want.reshape(1, 4, 4), atol=ATOL, rtol=0)


@pytest.mark.parametrize("start_layer", [0, -1])
def test_gradient_weighted_relevancy_clip(clip, start_layer):
    ids, mask = text()
    pv = tm.pixels(2, seed=10)
    got = GradientWeightedRelevancy(clip, start_layer=start_layer).attribute(
        pv, target=[2, 1], additional_forward_args=(ids, mask), return_grid=True)
    attentions, grads = clip_attentions(clip, pv, ids, mask, target=[2, 1])
    relevancy = torch.eye(17).repeat(2, 1, 1)
    for layer in range(start_layer % 2, 2):
        abar = (grads[layer] * attentions[layer]).clamp(min=0).mean(1)
        relevancy = relevancy + torch.bmm(abar, relevancy)
    torch.testing.assert_close(got, relevancy[:, 0, 1:].reshape(2, 4, 4), atol=ATOL, rtol=0)


def test_gradient_weighted_relevancy_siglip(siglip):
    ids, mask = text()
    pv = tm.pixels(1, seed=11)
    got = GradientWeightedRelevancy(siglip).attribute(pv, target=1, additional_forward_args=(ids, mask),
                                                      return_grid=True)
    twin = eager_copy(siglip)
    pvg = pv.clone().requires_grad_()
    out = twin(pixel_values=pvg, input_ids=ids, attention_mask=mask, output_attentions=True)
    attentions = out.vision_model_output.attentions
    grads = torch.autograd.grad(out.logits_per_image[0, 1], attentions)
    relevancy = torch.eye(16)[None]
    for a, g in zip(attentions, grads):
        relevancy = relevancy + (g * a).clamp(min=0).mean(1) @ relevancy
    probs, grad = siglip_head_attention(siglip, pv, ids, mask, target=[1])
    want = (grad * probs).clamp(min=0).mean(1) @ relevancy
    torch.testing.assert_close(got, want.reshape(1, 4, 4), atol=ATOL, rtol=0)


# ----- patch-word similarity -------------------------------------------------------------------
def test_patch_word_similarity_clip(clip):
    ids, mask = text()
    pv = tm.pixels(2, seed=12)
    method = PatchWordSimilarity(clip)
    words = method.attribute_words(pv, target=[1, 2], additional_forward_args=(ids, mask), return_grid=True)
    pooled = method.attribute(pv, target=[1, 2], additional_forward_args=(ids, mask), return_grid=True)
    with torch.no_grad():
        out = clip(pixel_values=pv, input_ids=ids, attention_mask=mask)
        patches = clip.visual_projection(clip.vision_model.post_layernorm(out.vision_model_output.last_hidden_state[:, 1:]))
        tokens = clip.text_projection(out.text_model_output.last_hidden_state)
    for b, k in enumerate([1, 2]):
        want = F.normalize(tokens[k], dim=-1) @ F.normalize(patches[b], dim=-1).T * mask[k, :, None]
        torch.testing.assert_close(words[b], want.reshape(8, 4, 4), atol=ATOL, rtol=0)
        # the pooled map compares patches with the prompt's own text embedding
        want_pooled = F.normalize(patches[b], dim=-1) @ F.normalize(out.text_embeds[k], dim=-1)
        torch.testing.assert_close(pooled[b], want_pooled.reshape(4, 4), atol=ATOL, rtol=0)
    assert mask[1, 7] == 0 and (words[0, 7] == 0).all()


def test_patch_word_similarity_siglip(siglip):
    ids, mask = text()
    pv = tm.pixels(1, seed=13)
    words = PatchWordSimilarity(siglip).attribute_words(pv, target=0, additional_forward_args=(ids, mask),
                                                        return_grid=True)
    head = siglip.vision_model.head
    d = head.attention.embed_dim
    with torch.no_grad():
        x = siglip.vision_model(pixel_values=pv).last_hidden_state[0]
        v = x @ head.attention.in_proj_weight[2 * d :].T + head.attention.in_proj_bias[2 * d :]
        y = head.attention.out_proj(v)
        y = y + head.mlp(head.layernorm(y))
        tokens = siglip.text_model.head(siglip.text_model(input_ids=ids, attention_mask=mask).last_hidden_state[0])
    want = F.normalize(tokens, dim=-1) @ F.normalize(y, dim=-1).T * mask[0, :, None]
    torch.testing.assert_close(words[0], want.reshape(8, 4, 4), atol=ATOL, rtol=0)


# ----- conventions shared by every method ------------------------------------------------------
FACTORIES = {
    "grad_eclip": lambda m: GradECLIP(m),
    "grad_eclip_paper": lambda m: GradECLIP(m, mode="paper"),
    "raw_mean": lambda m: RawAttention(m),
    "raw_grad": lambda m: RawAttention(m, head_fusion="grad"),
    "rollout": lambda m: AttentionRollout(m),
    "relevancy": lambda m: GradientWeightedRelevancy(m),
    "patch_word": lambda m: PatchWordSimilarity(m),
}
CASES = [(f, m) for f in FACTORIES for m in ("clip", "siglip")]


@pytest.mark.parametrize("name,family", CASES)
def test_sdpa_equals_eager_and_model_unchanged(models, name, family):
    model = models[family]
    assert model.config._attn_implementation == "sdpa"
    ids, mask = text()
    pv = tm.pixels(2, seed=14)
    before = snapshot(model)
    got = FACTORIES[name](model).attribute(pv, target=[0, 2], additional_forward_args=(ids, mask))
    assert_unchanged(model, before)
    eager = FACTORIES[name](eager_copy(model)).attribute(pv, target=[0, 2], additional_forward_args=(ids, mask))
    assert got.shape == pv.shape
    torch.testing.assert_close(got, eager, atol=ATOL, rtol=0)
    assert torch.equal(got[:, 0], got[:, 1]) and torch.equal(got[:, 0], got[:, 2])


@pytest.mark.parametrize("name,family", CASES)
def test_batched_and_several_prompts_equal_one_at_a_time(models, name, family):
    model = models[family]
    ids, mask = text()
    pv = tm.pixels(3, seed=15)
    method = FACTORIES[name](model)
    args = (ids, mask)
    batched = method.attribute(pv, target=[2, 0, 1], additional_forward_args=args, return_grid=True)
    alone = torch.cat([method.attribute(pv[i : i + 1], target=t, additional_forward_args=args, return_grid=True)
                       for i, t in enumerate([2, 0, 1])])
    torch.testing.assert_close(batched, alone, atol=ATOL, rtol=0)
    every = method.attribute_prompts(pv, additional_forward_args=args, return_grid=True)  # [B, K, h, w]
    assert every.shape == (3, 3, 4, 4)
    for k in range(3):
        one = method.attribute(pv, target=k, additional_forward_args=args, return_grid=True)
        torch.testing.assert_close(every[:, k], one, atol=ATOL, rtol=0)
    some = method.attribute_prompts(pv, additional_forward_args=args, prompts=[2, 0])
    assert some.shape == (3, 2, 3, 32, 32)
    torch.testing.assert_close(some[:, 0, 0, ::8, ::8], every[:, 2], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["grad_eclip", "relevancy", "rollout", "patch_word"])
def test_model_unchanged_when_the_call_raises(clip, name):
    ids, mask = text()
    pv = tm.pixels(1)
    clip.train()  # an unusual state to preserve: training mode and a hook of the user's own
    boom = clip.vision_model.encoder.layers[-1].mlp.register_forward_hook(lambda *a: 1 / 0)
    try:
        before = snapshot(clip)
        method = FACTORIES[name](clip)
        with pytest.raises(ZeroDivisionError):
            method.attribute(pv, target=0, additional_forward_args=(ids, mask))
        assert_unchanged(clip, before)
        with pytest.raises(ValueError, match="target"):
            method.attribute(pv, target=3, additional_forward_args=(ids, mask))
        assert_unchanged(clip, before)
    finally:
        boom.remove()
        clip.eval()


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_non_square_inputs_and_upsampling(models, family):
    model = models[family]
    ids, mask = text()
    pv = tm.pixels(2, 36, 48, seed=16)  # 36 rows: the last 4 are not seen by the model
    method = GradECLIP(model, interpolate_pos_encoding=True)
    grid = method.attribute(pv, target=1, additional_forward_args=(ids, mask), return_grid=True)
    assert grid.shape == (2, 4, 6)
    full = method.attribute(pv, target=1, additional_forward_args=(ids, mask))
    assert full.shape == pv.shape
    assert torch.equal(full[:, 0], full[:, 2])
    torch.testing.assert_close(full[:, 0, :32].reshape(2, 4, 8, 6, 8)[:, :, 3, :, 5], grid)
    assert (full[:, :, 32:] == 0).all()
    smooth = method.attribute(pv, target=1, additional_forward_args=(ids, mask), upsample="bilinear")
    assert smooth.shape == pv.shape and not torch.equal(smooth, full)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        GradECLIP(model).attribute(pv, target=1, additional_forward_args=(ids, mask))


def test_bad_arguments_name_the_argument(clip, siglip):
    ids, mask = text()
    pv = tm.pixels(1)
    args = (ids, mask)
    with pytest.raises(ValueError, match="target"):
        GradECLIP(clip).attribute(pv, target=3, additional_forward_args=args)
    with pytest.raises(ValueError, match="target"):
        RawAttention(clip).attribute(pv, target=[0, 1], additional_forward_args=args)
    with pytest.raises(ValueError, match="target"):
        RawAttention(clip).attribute(pv, additional_forward_args=args)
    with pytest.raises(TypeError, match="target"):
        RawAttention(clip).attribute(pv, target=0.5, additional_forward_args=args)
    with pytest.raises(ValueError, match="inputs"):
        GradECLIP(clip).attribute(pv[0], target=0, additional_forward_args=args)
    with pytest.raises(ValueError, match="inputs"):
        GradECLIP(clip).attribute(pv[:, :1], target=0, additional_forward_args=args)
    with pytest.raises(TypeError, match="additional_forward_args"):
        GradECLIP(clip).attribute(pv, target=0, additional_forward_args=None)
    with pytest.raises(ValueError, match="layers"):
        GradECLIP(clip, layers=2)
    with pytest.raises(ValueError, match="text_layers"):
        GradECLIP(clip, text_layers=[-3])
    with pytest.raises(ValueError, match="layers"):
        RawAttention(clip, layers=[0, 5])
    with pytest.raises(ValueError, match="layers"):
        GradECLIP(siglip, layers=-1)
    with pytest.raises(ValueError, match="start_layer"):
        AttentionRollout(clip, start_layer=2)
    with pytest.raises(ValueError, match="start_layer"):
        GradientWeightedRelevancy(clip, start_layer=-3)
    with pytest.raises(ValueError, match="head_fusion"):
        RawAttention(clip, head_fusion="median")
    with pytest.raises(ValueError, match="head_fusion"):
        AttentionRollout(clip, head_fusion="grad")
    with pytest.raises(ValueError, match="mode"):
        GradECLIP(clip, mode="official")
    with pytest.raises(ValueError, match="upsample"):
        RawAttention(clip).attribute(pv, target=0, additional_forward_args=args, upsample="cubic")
    with pytest.raises(TypeError, match="model"):
        RawAttention(tm.vilt_itm())


def test_captum_compatibility(clip):
    ids, mask = text()
    pv = tm.pixels(2, seed=17)
    method = GradECLIP(clip)
    assert isinstance(method, Attribution)
    smooth = NoiseTunnel(method).attribute(pv, nt_samples=2, target=[0, 1], additional_forward_args=(ids, mask))
    assert smooth.shape == pv.shape
    with torch.no_grad():  # gradient methods work when called under no_grad
        maps = method.attribute(pv, target=0, additional_forward_args=(ids, mask))
    assert maps.abs().sum() > 0


@pytest.mark.parametrize("batched_backward", [True, False])
def test_prompt_chunks_and_unbatched_fallback(clip, monkeypatch, batched_backward):
    import captum_vlm.attr._base as base

    ids, mask = text()
    pv = tm.pixels(2, seed=18)
    monkeypatch.setattr(base, "PROMPT_CHUNK", 2)  # 3 prompts: a batched chunk of 2, then 1
    if not batched_backward:  # as if an operation of the model had no batching rule
        grad = torch.autograd.grad

        def no_batching(*args, **kwargs):
            if kwargs.get("is_grads_batched"):
                raise RuntimeError("no batching rule")
            return grad(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, "grad", no_batching)
    for method in (GradECLIP(clip, layers=[0, 1]), GradientWeightedRelevancy(clip)):
        every = method.attribute_prompts(pv, additional_forward_args=(ids, mask), return_grid=True)
        for k in range(3):
            one = method.attribute(pv, target=k, additional_forward_args=(ids, mask), return_grid=True)
            torch.testing.assert_close(every[:, k], one, atol=ATOL, rtol=0)


def test_maps_find_the_named_object_on_the_zoo_model():
    from captum_vlm import zoo
    from captum_vlm.metrics import pointing_game

    if "shapes-clip" not in zoo.list_models():
        pytest.skip("shapes-clip is not in the zoo")
    model, processor = zoo.load("shapes-clip")
    scenes = zoo.scenes.make_scenes(4242, 24, size=model.config.vision_config.image_size, n_objects=2)
    pv = processor(images=[s.pil() for s in scenes], return_tensors="pt")["pixel_values"]
    tokens = processor(text=zoo.scenes.zero_shot_prompts(), return_tensors="pt", padding=True)
    labels = zoo.scenes.all_labels()
    target = [labels.index(s.labels[0]) for s in scenes]
    masks = torch.stack([torch.from_numpy(s.objects[0].mask) for s in scenes])
    args = (tokens["input_ids"], tokens["attention_mask"])
    random_hits = pointing_game(torch.rand(len(scenes), 8, 8, generator=torch.Generator().manual_seed(0)), masks).mean
    for method in (GradECLIP(model), GradientWeightedRelevancy(model)):
        hits = pointing_game(method.attribute(pv, target=target, additional_forward_args=args), masks).mean
        assert hits >= 0.6 and hits > random_hits + 0.2, (type(method).__name__, hits, random_hits)
