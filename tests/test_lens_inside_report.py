"""The inside-the-model HTML report: its tables hold exactly the views' numbers; text is escaped."""

import numpy as np
import pytest
import tiny_models as tm
import torch
from html_tables import read_tables, table

from captum_vlm.lens import head_importance, inside_report, probe
from captum_vlm.lens.heads import attention_statistics
from captum_vlm.lens.logit_lens import logit_lens_from_inputs
from captum_vlm.targets import ImageTextSimilarity

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


class _XssTokenizer:
    def convert_ids_to_tokens(self, ids):
        return [f"{XSS}{i}" if i % 2 else f"t{i}" for i in ids]


def _lens():
    ids, mask = tm.text_ids(1, 6)
    lens = logit_lens_from_inputs(tm.blip_vqa(), tm.pixels(1), ids, mask, answer_ids=torch.tensor([[7, 8, 9]]),
                                  k=3, tokenizer=_XssTokenizer())
    lens.prompt = XSS
    return lens


def _probe():
    pixels = tm.pixels(16, seed=3)
    pixels[:8, 0] += 1.0
    labels = np.array([XSS] * 8 + ["plain"] * 8)
    return probe(tm.clip(), None, pixels, labels, cv=4)


def _stats():
    attn = torch.softmax(torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)), -1)
    patches = torch.arange(1, 5)
    return attention_statistics([attn, attn.flip(-1)], sink_keys=torch.tensor([0]), patch_keys=patches,
                                patch_queries=patches, grid=(2, 2))


def _importance():
    model = tm.clip()
    ids, mask = tm.text_ids(3, 6)
    return head_importance(model, ImageTextSimilarity(model), tm.pixels(2), (ids, mask), target=1,
                           heads=[(0, 1), (1, 2), (1, 0)], target_label=XSS)


@pytest.fixture(scope="module")
def views():
    return [_lens(), _probe(), _stats(), _importance()]


@pytest.fixture(scope="module")
def page(views, tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "inside.html"
    text = inside_report(views, path, title=XSS, meta=XSS)
    assert path.read_text(encoding="utf-8") == text
    return text


def test_sections_in_order_with_embedded_figures(page):
    parsed = read_tables(page)
    assert parsed.sections == ["logit-lens", "probe", "head-statistics", "head-importance"]
    assert parsed.images and all(src.startswith("data:image/png;base64,") for src in parsed.images)
    assert "<script" not in page and "http" not in page.replace('lang="en"', "")


def test_xss_payload_stays_text(page):
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    parsed = read_tables(page)
    tokens = [t for row in parsed.tokens["0:top-1"] for t in row]
    assert any(t.startswith(XSS) for t in tokens)  # the attribute round-trips to the raw string


def test_logit_lens_tables_equal_the_lens(views, page):
    lens, parsed = views[0], read_tables(page)
    np.testing.assert_array_equal(table(parsed, 0, "top-1"), lens.top_probs[:, :, 0].numpy())
    np.testing.assert_array_equal(table(parsed, 0, "produced-rank"), lens.produced_ranks.numpy())
    np.testing.assert_array_equal(table(parsed, 0, "produced-probability"), lens.produced_probs.numpy())
    np.testing.assert_array_equal(table(parsed, 0, "entropy"), lens.entropy.numpy())
    shown = [row for row in parsed.tokens["0:top-1"] if row]
    assert shown == [[cell[0] for cell in layer] for layer in lens.top_tokens]


def test_probe_table_equals_the_result(views, page):
    result, parsed = views[1], read_tables(page)
    np.testing.assert_array_equal(table(parsed, 1, "probe-accuracy"),
                                  np.stack([result.accuracy, result.accuracy_std, result.control,
                                            result.control_std], 1))
    assert [row[0] for row in parsed.rows["1:probe-accuracy"][1:]] == [str(x) for x in result.layers]
    assert result.accuracy[-1] > result.control[-1]  # not a vacuous table


def test_head_statistics_tables_equal_the_statistics(views, page):
    stats, parsed = views[2], read_tables(page)
    for name, values in stats.maps().items():
        np.testing.assert_array_equal(table(parsed, 2, name), values)
    assert set(stats.maps()) == {"entropy (nats)", "attention-sink mass", "mean attention distance (patches)"}


def test_head_importance_tables_equal_the_map_nan_for_unscored(views, page):
    result, parsed = views[3], read_tables(page)
    np.testing.assert_array_equal(table(parsed, 3, "importance"), result.importance)  # NaN == NaN here
    assert np.isnan(result.importance).sum() == result.importance.size - 3
    ranked = [(int(r[1]), int(r[2])) for r in parsed.rows["3:ranked-heads"][1:]]
    assert ranked == result.ranked
    drops = table(parsed, 3, "ranked-heads")
    np.testing.assert_array_equal(drops[:, 0], [result.importance[h] for h in result.ranked])
    np.testing.assert_array_equal(drops[:, 1], [np.std(result.per_example[:, layer, head])
                                                for layer, head in result.ranked])


def test_to_html_of_each_view_is_its_own_page(views, tmp_path):
    for view in views:
        text = view.to_html(tmp_path / "one.html")
        assert read_tables(text).sections == [read_tables(view.html_section()).sections[0]]


def test_bad_views():
    with pytest.raises(TypeError, match="views: expected LogitLens"):
        inside_report([object()])
    with pytest.raises(ValueError, match="views"):
        inside_report([])
