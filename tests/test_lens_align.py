"""The alignment lens against independent computations: the model's own logits, brute-force
ranks and neighbours, scikit-learn, and the Projector files read back."""

from __future__ import annotations

import functools
import html
import math
import re
import sys

import numpy as np
import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from model_state import assert_unchanged, snapshot
from numerics import assert_close_scaled
from PIL import Image

from captum_vlm import lens, zoo
from captum_vlm.adapters import get_adapter
from captum_vlm.cli import main
from captum_vlm.lens.modality_gap import nearest_neighbours
from captum_vlm.lens.projection import label_agreement

ZOO = ("shapes-clip", "shapes-siglip", "shapes-blip-itm")


@functools.cache
def _load(name):
    return zoo.load(name)


@pytest.fixture(scope="module")
def scenes():
    return zoo.scenes.make_scenes(2024, 6)


@pytest.fixture(scope="module", params=ZOO)
def loaded(request):
    model, processor = _load(request.param)
    return request.param, model, processor


def _embed(model, processor, scenes, **kwargs):
    return lens.embed(model, processor, images=[s.pil() for s in scenes], texts=[s.caption for s in scenes],
                      pairs="diagonal", **kwargs)


# ----- embeddings against the model's own outputs ---------------------------------------------


@pytest.mark.parametrize("name", ["shapes-clip", "shapes-siglip"])
def test_similarity_equals_logits_per_image_and_test_cosine(name, scenes):
    model, processor = _load(name)
    emb = _embed(model, processor, scenes)
    texts = [s.caption for s in scenes]
    padding = "max_length" if name == "shapes-siglip" else True
    inputs = processor(images=[s.pil() for s in scenes], text=texts, return_tensors="pt", padding=padding)
    with torch.no_grad():
        out = model(**inputs)
    cosine = F.normalize(out.image_embeds, dim=-1) @ F.normalize(out.text_embeds, dim=-1).T
    assert_close_scaled(emb.similarity("cosine"), cosine)
    assert_close_scaled(emb.similarity("logits"), out.logits_per_image)
    assert_close_scaled(emb.similarity("softmax"), out.logits_per_image.softmax(dim=1))
    if name == "shapes-siglip":
        assert_close_scaled(emb.similarity("sigmoid"), torch.sigmoid(out.logits_per_image))
    else:
        with pytest.raises(ValueError, match="scale: 'sigmoid'"):
            emb.similarity("sigmoid")
    assert torch.allclose(emb.image.norm(dim=1), torch.ones(len(scenes)), atol=1e-5)


def test_blip_itm_similarity_equals_its_contrastive_score(scenes):
    model, processor = _load("shapes-blip-itm")
    emb = _embed(model, processor, scenes)
    inputs = processor(images=[s.pil() for s in scenes], text=[s.caption for s in scenes],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        score = model(**inputs, use_itm_head=False).itm_score  # [images, texts] cosine
    assert score.shape == (len(scenes), len(scenes))
    assert_close_scaled(emb.similarity("cosine"), score)
    assert_close_scaled(emb.similarity("logits"), score)


def test_embed_batched_equals_one_by_one_and_leaves_model_as_found(loaded, scenes):
    _, model, processor = loaded
    texts = [s.caption for s in scenes] + ["a red circle", "a blue square and a green triangle"]
    model.train()  # embed runs in eval mode inside, and restores train mode
    before = snapshot(model)
    batched = lens.embed(model, processor, images=[s.pil() for s in scenes], texts=texts, batch_size=4)
    single = lens.embed(model, processor, images=[s.pil() for s in scenes], texts=texts, batch_size=1)
    assert_unchanged(model, before)
    model.eval()
    eval_mode = lens.embed(model, processor, images=[s.pil() for s in scenes], texts=texts, batch_size=3)
    assert_close_scaled(batched.image, single.image)
    assert_close_scaled(batched.text, single.text)
    assert_close_scaled(batched.image, eval_mode.image)
    assert not batched.image.requires_grad and batched.image.grad_fn is None


def test_model_left_as_found_when_embed_raises(scenes, tmp_path):
    model, processor = _load("shapes-clip")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"images\[1\]: no such image file"):
        lens.embed(model, processor, images=[scenes[0].pil(), tmp_path / "missing.png"], batch_size=1)
    assert_unchanged(model, before)


def test_image_inputs_as_pil_arrays_paths_and_folder_agree(scenes, tmp_path):
    model, processor = _load("shapes-clip")
    folder = tmp_path / "scenes"
    folder.mkdir()
    paths = []
    for i, s in enumerate(scenes[:3]):
        paths.append(folder / f"scene{i}.png")
        s.pil().save(paths[-1])
    reference = lens.embed(model, processor, images=[s.pil() for s in scenes[:3]]).image
    for images in ([s.image for s in scenes[:3]], [s.image / 255.0 for s in scenes[:3]],
                   [torch.from_numpy(s.image) for s in scenes[:3]], paths, folder, str(folder)):
        emb = lens.embed(model, processor, images=images)
        assert_close_scaled(emb.image, reference)
    assert lens.embed(model, processor, images=folder).image_sources == [str(p) for p in paths]


class _SpyProcessor:
    """Records how many images each processor call receives."""

    def __init__(self, processor):
        self.processor, self.sizes = processor, []

    def __call__(self, images=None, **kwargs):
        if images is not None:
            self.sizes.append(len(images))
        return self.processor(images=images, **kwargs)


def test_embed_holds_one_batch_at_a_time(scenes, tmp_path):
    model, processor = _load("shapes-clip")
    paths = []
    for i in range(7):
        paths.append(tmp_path / f"{i}.png")
        scenes[i % len(scenes)].pil().save(paths[-1])
    spy = _SpyProcessor(processor)
    emb = lens.embed(model, spy, images=paths, batch_size=3)
    assert spy.sizes == [3, 3, 1]
    assert emb.image.shape[0] == 7


def test_embed_progress_bar_only_when_asked(scenes, capsys):
    model, processor = _load("shapes-clip")
    capsys.readouterr()
    _embed(model, processor, scenes[:2])
    assert capsys.readouterr().err == ""
    _embed(model, processor, scenes[:2], show_progress=True)
    assert "embed" in capsys.readouterr().err


# ----- alignment scores against a brute-force count --------------------------------------------


def _brute_force(sim: np.ndarray, pairs: list[int], ks):
    n, m = sim.shape
    i2t = [1 + sum(sim[i, j] > sim[i, pairs[i]] for j in range(m)) for i in range(n)]
    t2i = []
    for t in sorted(set(pairs)):
        own = [i for i in range(n) if pairs[i] == t]
        best = max(sim[i, t] for i in own)
        t2i.append(1 + sum(sim[i, t] > best for i in range(n) if i not in own))
    recall = {k: (np.mean([r <= k for r in i2t]), np.mean([r <= k for r in t2i])) for k in ks}
    return i2t, t2i, recall


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_and_mean_rank_equal_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, m = 15, 9
    sim = rng.integers(0, 6, size=(n, m)).astype(float)  # many ties
    pairs = list(rng.integers(0, m, size=n))  # texts shared by several images
    scores = lens.alignment_scores(torch.tensor(sim), pairs, ks=(1, 3, 5))
    i2t, t2i, recall = _brute_force(sim, pairs, (1, 3, 5))
    assert scores.image_ranks.tolist() == i2t
    assert scores.text_ranks.tolist() == t2i
    for k, (a, b) in recall.items():
        assert scores.image_to_text[k] == pytest.approx(a)
        assert scores.text_to_image[k] == pytest.approx(b)
    assert scores.mean_rank_image_to_text == pytest.approx(np.mean(i2t))
    assert scores.mean_rank_text_to_image == pytest.approx(np.mean(t2i))
    row_max = np.mean([sim[i, pairs[i]] == sim[i].max() for i in range(n)])
    col_max = np.mean([sim[i, pairs[i]] == sim[:, pairs[i]].max() for i in range(n)])
    assert scores.diagonal_row_max == pytest.approx(row_max)
    assert scores.diagonal_column_max == pytest.approx(col_max)


def test_similarity_matrix_view_marks_the_best_text_and_carries_scores(scenes):
    model, processor = _load("shapes-clip")
    emb = _embed(model, processor, scenes)
    fig = lens.similarity_matrix(emb, "logits")
    sim = emb.similarity("logits")
    i2t, _, recall = _brute_force(sim.numpy(), list(range(len(scenes))), (1, 5, 10))
    assert fig.scores.image_to_text[1] == pytest.approx(recall[1][0])
    ax = fig.axes[1]  # thumbnails strip first, then the matrix
    dots = ax.collections[0].get_offsets()
    assert np.array_equal(np.asarray(dots)[:, 0], sim.argmax(dim=1).numpy())
    assert "R@1" in fig._suptitle.get_text()
    assert any("logit" in a.get_ylabel() for a in fig.axes)  # the colour bar says what it shows


def test_zero_shot_bars_are_sorted_probabilities_with_the_true_label(scenes):
    model, processor = _load("shapes-siglip")
    prompts = zoo.scenes.zero_shot_prompts()
    emb = lens.embed(model, processor, images=[scenes[0].pil()], texts=prompts)
    truth = zoo.scenes.phrase(*scenes[0].labels[0])
    fig = lens.zero_shot(emb, 0, true_label=truth)
    expected = emb.similarity("sigmoid")[0].numpy()
    assert np.allclose(fig.probabilities, expected)
    bars = [p.get_width() for p in fig.axes[1].patches]
    assert np.allclose(bars, np.sort(expected)[::-1])
    labels = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    assert f"{truth} (true)" in labels


def test_retrieval_top_k_equals_argsort(scenes):
    model, processor = _load("shapes-blip-itm")
    emb = _embed(model, processor, scenes)
    fig = lens.retrieval(emb, k=3, image_queries=[0, 2], text_queries=[1])
    sim = emb.similarity().numpy()
    for i, hits in enumerate(fig.matches["image_to_text"]):
        assert [j for j, _ in hits] == list(np.argsort(-sim[i], kind="stable")[:3])
        assert np.allclose([s for _, s in hits], np.sort(sim[i])[::-1][:3])
    for j, hits in enumerate(fig.matches["text_to_image"]):
        assert [i for i, _ in hits] == list(np.argsort(-sim[:, j], kind="stable")[:3])


# ----- projections and the modality gap ---------------------------------------------------------


def _brute_neighbours(points: np.ndarray, k: int) -> list[set]:
    out = []
    for i in range(len(points)):
        d = [(float(np.sum((points[i] - points[j]) ** 2)), j) for j in range(len(points)) if j != i]
        out.append({j for _, j in sorted(d)[:k]})
    return out


@pytest.fixture(scope="module")
def clip_embeddings(scenes):
    model, processor = _load("shapes-clip")
    more = zoo.scenes.make_scenes(77, 12)
    return lens.embed(model, processor, images=[s.pil() for s in more], texts=[s.caption for s in more],
                      pairs="diagonal", image_labels=[s.objects[0].colour for s in more],
                      text_labels=[s.objects[0].colour for s in more])


def test_projection_numbers_equal_sklearn_and_brute_force(clip_embeddings):
    from sklearn.decomposition import PCA
    from sklearn.manifold import trustworthiness

    points = clip_embeddings.stacked().double().numpy()
    proj = lens.project(clip_embeddings, "pca", k=5)
    reference = PCA(n_components=2).fit_transform(points)
    assert np.allclose(np.abs(proj.coords), np.abs(reference), atol=1e-6)
    assert proj.trustworthiness == pytest.approx(trustworthiness(points, reference, n_neighbors=5))
    full, low = _brute_neighbours(points, 5), _brute_neighbours(proj.coords, 5)
    assert proj.neighbour_agreement == pytest.approx(np.mean([len(a & b) / 5 for a, b in zip(full, low)]))
    labels = clip_embeddings.labels()
    by_hand = np.mean([np.mean([labels[j] == labels[i] for j in nb]) for i, nb in enumerate(full)])
    assert label_agreement(points, labels, 5) == pytest.approx(by_hand)


def test_projection_draws_methods_side_by_side(clip_embeddings):
    fig = lens.projection(clip_embeddings, methods=("pca", "tsne", "umap"), k=5, perplexity=5)
    assert [p.method for p in fig.projections] == ["pca", "tsne", "umap"]
    titles = [ax.get_title() for ax in fig.axes]
    for p, title in zip(fig.projections, titles):
        assert f"trustworthiness {p.trustworthiness:.3f}" in title
        assert 0.0 <= p.neighbour_agreement <= 1.0
        assert p.coords.shape == (24, 2)
    assert len(fig.axes[0].lines) == 12  # one line from each image to its caption


def test_modality_gap_by_hand(clip_embeddings):
    gap = lens.modality_gap(clip_embeddings, k=4)
    image, text = clip_embeddings.image.double(), clip_embeddings.text.double()
    assert gap.centroid_distance == pytest.approx(float((image.mean(0) - text.mean(0)).norm()))
    points = clip_embeddings.stacked().double().numpy()
    kinds = clip_embeddings.modality
    share = [np.mean([kinds[j] != kinds[i] for j in nb]) for i, nb in enumerate(_brute_neighbours(points, 4))]
    assert gap.image_neighbours_text == pytest.approx(np.mean(share[:12]))
    assert gap.text_neighbours_image == pytest.approx(np.mean(share[12:]))
    assert np.array_equal(np.sort(nearest_neighbours(points, 4), axis=1),
                          np.array([sorted(s) for s in _brute_neighbours(points, 4)]))
    assert lens.gap_view(clip_embeddings, k=4).gap == gap


# ----- TensorBoard Projector export ------------------------------------------------------------------


def test_projector_files_read_back(clip_embeddings, tmp_path):
    logdir = clip_embeddings.to_projector(tmp_path / "tb", thumbnail_size=16)
    config = (logdir / "projector_config.pbtxt").read_text()
    paths = dict(re.findall(r'(tensor_path|metadata_path|image_path): "([^"]+)"', config))
    assert set(paths) == {"tensor_path", "metadata_path", "image_path"}
    tensors = np.loadtxt(logdir / paths["tensor_path"], delimiter="\t")
    assert np.allclose(tensors, clip_embeddings.stacked().numpy(), atol=1e-6)
    rows = [line.split("\t") for line in (logdir / paths["metadata_path"]).read_text().splitlines()]
    assert rows[0] == ["kind", "label", "text"]
    assert [r[0] for r in rows[1:]] == clip_embeddings.modality
    assert [r[1] for r in rows[1:]] == clip_embeddings.labels()
    assert [r[2] for r in rows[1:]] == clip_embeddings.image_sources + clip_embeddings.texts
    sprite = np.asarray(Image.open(logdir / paths["image_path"]).convert("RGB")).astype(float)
    side = math.ceil(math.sqrt(24))
    assert sprite.shape == (16 * side, 16 * side, 3)
    first = np.asarray(clip_embeddings.thumbnails[0].convert("RGB").resize((16, 16), Image.Resampling.BILINEAR))
    assert np.abs(sprite[:16, :16] - first).max() <= 1.0  # image row 0's tile is its thumbnail
    text_tile = sprite[(12 // side) * 16:(12 // side + 1) * 16, (12 % side) * 16:(12 % side + 1) * 16]
    assert text_tile.mean() > 150 and text_tile.min() < 100  # white tile with dark text drawn


def test_optional_extras_missing_name_the_extra(clip_embeddings, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "umap", None)
    with pytest.raises(ImportError, match=r"captum-vlm\[umap\]"):
        lens.project(clip_embeddings, "umap", k=5)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"captum-vlm\[tensorboard\]"):
        clip_embeddings.to_projector(tmp_path)


# ----- the HTML report ---------------------------------------------------------------------------


def test_report_is_self_contained_and_its_hover_labels_are_inert(scenes, tmp_path):
    model, processor = _load("shapes-clip")
    payload = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    texts = [s.caption for s in scenes[:5]] + [payload]
    emb = lens.embed(model, processor, images=[s.pil() for s in scenes[:5]], texts=texts, pairs=[0, 1, 2, 3, 4],
                     image_labels=[payload] * 5, model_name=f"m{payload}")
    page = lens.report(emb, tmp_path / "r.html", methods=("pca",), neighbours=3)
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == page
    assert payload not in page and "<script" not in page.lower() and "onerror=alert" not in page.replace(
        html.escape("onerror=alert"), "")
    titles = re.findall(r"<title>(.*?)</title>", page)
    assert len(titles) == 1 + 11  # the page title, then one hover label per point
    assert sum(html.escape(payload, quote=True) in t for t in titles) == 1 + 5 + 1  # page, 5 images, 1 text
    assert len(re.findall(r'<image class="hov" href="data:image/png;base64,', page)) == 5
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert links and all(link.startswith("data:image/png;base64,") for link in links)
    assert "image→text R@1" in page and "centroid distance" in page


# ----- misuse --------------------------------------------------------------------------------------


def test_unsupported_models_get_a_type_error_listing_supported_classes():
    processor = None
    for model in (tm.blip_caption(), tm.llava(), torch.nn.Linear(2, 2)):
        with pytest.raises(TypeError, match="BlipForImageTextRetrieval, CLIPModel, Siglip2Model, SiglipModel"):
            lens.embed(model, processor, texts=["a"])
    assert lens.joint_embedding_classes() == ["BlipForImageTextRetrieval", "CLIPModel", "Siglip2Model", "SiglipModel"]
    assert get_adapter(tm.blip_itm()).has_joint_embeddings and not get_adapter(tm.blip_vqa()).has_joint_embeddings


def test_misuse_gives_clear_errors_before_work(scenes):
    model, processor = _load("shapes-clip")
    pil = [s.pil() for s in scenes[:3]]
    spy = _SpyProcessor(processor)
    cases = [
        (dict(images=[]), ValueError, "images: the list is empty"),
        (dict(texts=[]), ValueError, "texts: the list is empty"),
        (dict(), ValueError, "images, texts"),
        (dict(images=pil, image_labels=["a"]), ValueError, "image_labels: got 1 labels for 3 images"),
        (dict(texts=["a", "b"], text_labels=["a"]), ValueError, "text_labels: got 1"),
        (dict(images=pil, texts=["a"], pairs="diagonal"), ValueError, "pairs: 'diagonal' needs"),
        (dict(images=pil, texts=["a"], pairs=[0, 0]), ValueError, "pairs: got 2 entries"),
        (dict(images=pil, texts=["a"], pairs=[0, 0, 3]), ValueError, "pairs: text indices"),
        (dict(images=[pil[0], np.full((8, 8, 3), np.nan)]), ValueError, r"images\[1\]: the array holds NaN"),
        (dict(images=[np.zeros((3, 8, 8, 2))]), ValueError, r"images\[0\]: expected an array"),
        (dict(images=[3]), TypeError, r"images\[0\]: expected a PIL image"),
        (dict(images=pil, batch_size=0), ValueError, "batch_size"),
        (dict(texts=["a", ""]), ValueError, "texts: entries"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            lens.embed(model, spy, **kwargs)
    assert spy.sizes == []  # every check ran before any image was processed

    only_texts = lens.embed(model, processor, texts=["a red circle", "a blue square"])
    only_images = lens.embed(model, processor, images=pil)
    for view in (lens.similarity_matrix, lens.zero_shot, lens.retrieval, lens.modality_gap, lens.report):
        with pytest.raises(ValueError, match="embeddings: .* needs images"):
            view(only_texts)
        with pytest.raises(ValueError, match="embeddings: .* needs texts"):
            view(only_images)
    emb = lens.embed(model, processor, images=pil, texts=["a red circle", "a blue square"])
    with pytest.raises(ValueError, match="perplexity: t-SNE needs"):
        lens.project(emb, "tsne", k=2, perplexity=30)
    with pytest.raises(ValueError, match="k: trustworthiness needs"):
        lens.project(emb, "pca", k=3)
    with pytest.raises(ValueError, match="method"):
        lens.project(emb, "mds", k=2)
    with pytest.raises(ValueError, match="scale"):
        emb.similarity("dot")
    with pytest.raises(ValueError, match="image: 5 is out of range"):
        lens.zero_shot(emb, 5)
    with pytest.raises(ValueError, match="similarity: holds NaN"):
        lens.alignment_scores(torch.tensor([[float("nan")]]), [0])
    with pytest.raises(ValueError, match="methods"):
        lens.projection(emb, methods="pca")


# ----- the command line --------------------------------------------------------------------------


def test_cli_lens_writes_report_and_projector(scenes, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    lines = []
    for i, s in enumerate(scenes[:4]):
        s.pil().save(folder / f"s{i}.png")
        lines.append(f"imgs/s{i}.png\t{s.caption}")
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    rc = main(["lens", str(folder), "--text", "a green circle", "--captions", str(tsv), "--model", "zoo:shapes-clip",
               "--out", str(tmp_path / "lens.html"), "--projector", str(tmp_path / "tb"), "--quiet"])
    assert rc == 0
    page = (tmp_path / "lens.html").read_text(encoding="utf-8")
    assert "image→text R@1" in page and html.escape(scenes[0].caption) in page
    assert (tmp_path / "tb" / "projector_config.pbtxt").is_file()
    # images listed only in the TSV, read relative to it
    rc = main(["lens", "--captions", str(tmp_path / "captions.tsv"), "--out", str(tmp_path / "b.html"), "--quiet"])
    assert rc == 0 or print(capsys.readouterr().err)


@pytest.mark.parametrize("argv, message", [
    (["lens", "missing.png", "--text", "a"], "image not found: missing.png"),
    (["lens", "{img}"], "no texts"),
    (["lens", "{img}", "--text", "a", "--captions", "nope.tsv"], "captions file not found"),
    (["lens", "{img}", "--text", "a", "--captions", "{bad_tsv}"], "expected IMAGE<TAB>CAPTION"),
    (["lens", "{img}", "--text", "a", "--model", "zoo:shapes-blip-vqa"], "has no joint image-text embedding space"),
    (["lens", "{img}", "--text", "a", "--model", "zoo:nope"], "unknown zoo model"),
    (["lens", "{img}", "--text", "a", "--batch-size", "0"], "--batch-size"),
])
def test_cli_lens_errors_are_one_line_with_exit_code_2(argv, message, scenes, tmp_path, capsys):
    img = tmp_path / "a.png"
    scenes[0].pil().save(img)
    bad = tmp_path / "bad.tsv"
    bad.write_text("no tab here\n")
    argv = [a.format(img=img, bad_tsv=bad) for a in argv]
    assert main(argv + ["--quiet", "--out", str(tmp_path / "o.html")]) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # not transformers' loading bar
    assert len(errors) == 1 and errors[0].startswith("captum-vlm: error:") and message in errors[0]
    assert "Traceback" not in err


def test_top_level_package_exposes_the_lens_and_thumbnails_are_optional(scenes):
    import captum_vlm as cv

    assert cv.lens.embed is lens.embed and cv.lens.Embeddings is lens.Embeddings
    model, processor = _load("shapes-clip")
    emb = lens.embed(model, processor, images=[s.pil() for s in scenes[:2]], texts=["a red circle"],
                     thumbnail_size=None)
    assert emb.thumbnails == []
    assert emb.model_name == "shapes-clip"  # the checkpoint's folder name
    fig = lens.similarity_matrix(emb)
    assert len(fig.axes) == 2  # the matrix and its colour bar, no thumbnail strip
