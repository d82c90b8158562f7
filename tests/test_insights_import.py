"""captum_vlm.insights needs captum 0.8; under captum 0.9 its import names the extra."""

import importlib
import sys

import captum
import pytest


@pytest.mark.skipif(not captum.__version__.startswith("0.9"), reason="Insights exists under captum 0.8")
def test_import_without_insights_names_the_extra():
    sys.modules.pop("captum_vlm.insights", None)
    with pytest.raises(ImportError, match=r'pip install "captum-vlm\[insights\]"') as error:
        importlib.import_module("captum_vlm.insights")
    assert "captum 0.8" in str(error.value) and "to_html" in str(error.value)
    assert "captum_vlm.insights" not in sys.modules
